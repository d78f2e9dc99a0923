"""Hyperparameters and weight loading shared by the architectures.

Everything a forward pass needs comes from the GGUF file itself: hyperparameters from its
metadata, weights as quantized tensors that stay in the memory map (on the CPU) or are copied
once to the GPU. A model computes with the kernels module of its device (`self.kernels`) and
the device's few array operations (`self.device`, localllm/runtime/device.py), so the
architecture files serve both devices unchanged.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from localllm.errors import CancelledError, GGUFError, ModelError
from localllm.runtime.cache import CacheLayout, CacheSpec, KVCache, new_cache
from localllm.runtime.device import CPU, Device

# Prompts are processed in blocks of this many tokens: big enough that matmul amortises
# reading each weight, small enough that the activations of a block stay modest.
PREFILL_BLOCK = 256
# How far back sliding-window layers can always be truncated (speculative decoding rolls back
# at most the rejected draft tokens, far fewer than this).
DEFAULT_MAX_ROLLBACK = 256


@dataclass(frozen=True)
class HParams:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_rot: int
    rms_eps: float
    rope_base: float
    rope_freq_scale: float
    n_ctx_train: int
    n_vocab: int


def _meta(metadata: dict, key: str, source: str, default=None):
    if key in metadata:
        return metadata[key]
    if default is not None:
        return default
    raise ModelError(f"missing metadata key {key} in {source}")


def read_hparams(metadata: dict, source: str, n_vocab: int) -> HParams:
    """The hyperparameters every supported architecture shares, read from GGUF metadata."""
    arch = metadata["general.architecture"]

    def get(suffix, default=None):
        return _meta(metadata, f"{arch}.{suffix}", source, default)

    n_embd = int(get("embedding_length"))
    n_head = int(get("attention.head_count"))
    if n_head <= 0 or n_embd <= 0:
        raise ModelError(f"{source}: head_count and embedding_length must be positive")
    n_head_kv = int(get("attention.head_count_kv", n_head))
    if n_head_kv <= 0 or n_head % n_head_kv:
        raise ModelError(f"{source}: head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
    head_dim_k = int(get("attention.key_length", n_embd // n_head))
    head_dim_v = int(get("attention.value_length", head_dim_k))
    n_rot = int(get("rope.dimension_count", head_dim_k))
    if n_rot % 2 or n_rot > head_dim_k:
        raise ModelError(f"{source}: rope.dimension_count {n_rot} does not fit head size {head_dim_k}")
    return HParams(
        arch=arch,
        n_layer=int(get("block_count")),
        n_embd=n_embd,
        n_ff=int(get("feed_forward_length")),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        n_rot=n_rot,
        rms_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_base=float(get("rope.freq_base", 10000.0)),
        rope_freq_scale=_rope_freq_scale(metadata, arch, source),
        n_ctx_train=int(get("context_length")),
        n_vocab=n_vocab,
    )


def _rope_freq_scale(metadata: dict, arch: str, source: str) -> float:
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    factor = float(metadata.get(f"{arch}.rope.scaling.factor", 0.0))
    if kind == "none" or factor in (0.0, 1.0):
        return 1.0
    if kind == "linear":
        return 1.0 / factor
    raise ModelError(f"unsupported RoPE scaling {kind!r} in {source}")


class Weights:
    """Looks tensors up by name, turning a missing or misshapen one into a ModelError; hands
    them out for `device`."""

    def __init__(self, gguf_file, source: str, device: Device = CPU):
        self._gguf = gguf_file
        self.source = source
        self.device = device

    def has(self, name: str) -> bool:
        return name in self._gguf.tensors

    def matrix(self, name: str, rows: int, cols: int):
        """A quantized weight used by matvec/matmul: shape (rows, cols), checked once."""
        tensor = self._get(name)
        if tuple(tensor.shape) != (rows, cols):
            raise ModelError(f"tensor {name} in {self.source} has shape {tuple(tensor.shape)}, expected {(rows, cols)}")
        return self.device.kernels.CheckedWeight(tensor)

    def vector(self, name: str, size: int) -> np.ndarray:
        """A small float32 vector (norm weight, bias), dequantized once, as an array of the device."""
        tensor = self._get(name)
        if tuple(tensor.shape) != (size,):
            raise ModelError(f"tensor {name} in {self.source} has shape {tuple(tensor.shape)}, expected {(size,)}")
        return self.device.asarray(np.ascontiguousarray(tensor.dequantize(), dtype=np.float32))

    def _get(self, name: str):
        try:
            return self._gguf.tensor(name)
        except (GGUFError, KeyError):
            raise ModelError(f"missing tensor {name} in {self.source}") from None


class Model(ABC):
    """A decoder-only transformer over one GGUF file.

    Subclasses load their layers in __init__ and implement `_layer(i, x, positions, cache)`,
    the residual stream update of layer i for a block of tokens. This class owns what all
    architectures share: embedding, blocking of long inputs, final norm and output head.
    """

    def __init__(self, gguf_file, hparams: HParams, weights: Weights):
        self.gguf = gguf_file
        self.hparams = hparams
        self.device = weights.device
        self.kernels = weights.device.kernels
        hp = hparams
        self.token_embd = weights.matrix("token_embd.weight", hp.n_vocab, hp.n_embd)
        self.output_norm = weights.vector("output_norm.weight", hp.n_embd)
        # Tied embeddings: files without output.weight reuse the token embedding as the head.
        if weights.has("output.weight"):
            self.output = weights.matrix("output.weight", hp.n_vocab, hp.n_embd)
        else:
            self.output = self.token_embd
        self.embedding_scale = 1.0
        # The head's rows and the token each stands for: all of them, until `restrict_head`.
        self._head_weight = self.output
        self.head_token_ids: np.ndarray | None = None
        # Round activations to 8 bits before each quantized product, as llama.cpp does, so
        # logits match its logits; False keeps float32 activations (closer to the trained
        # model, and prefill then equals token-by-token decoding to float32 rounding).
        self.quantize_activations = True

    @property
    def n_vocab(self) -> int:
        return self.hparams.n_vocab

    @classmethod
    def windows_for(cls, metadata: dict, n_layer: int, source: str) -> list[int]:
        """Sliding-window size per layer of the model `metadata` describes; 0: the whole context."""
        return [0] * n_layer

    def layer_windows(self) -> list[int]:
        return self.windows_for(self.gguf.metadata, self.hparams.n_layer, "metadata")

    def cache_layout(self, max_rollback: int = DEFAULT_MAX_ROLLBACK) -> CacheLayout:
        hp = self.hparams
        return CacheLayout(
            n_layer=hp.n_layer,
            n_head_kv=hp.n_head_kv,
            head_dim_k=hp.head_dim_k,
            head_dim_v=hp.head_dim_v,
            windows=tuple(self.layer_windows()),
            max_append=PREFILL_BLOCK,
            max_rollback=max_rollback,
        )

    def new_cache(self, spec: CacheSpec | int, max_rollback: int = DEFAULT_MAX_ROLLBACK) -> KVCache:
        """An empty cache (`spec`, or an int: the full policy with that n_ctx), able to
        `truncate` back by max_rollback."""
        if not isinstance(spec, CacheSpec):
            spec = CacheSpec(n_ctx=spec)
        return new_cache(self.cache_layout(max_rollback), spec, self.device)

    def forward(self, tokens, cache: KVCache, all_logits: bool = False, cancel=None, progress=None) -> np.ndarray:
        """Run `tokens` at the cache's next positions and append them to the cache.

        Returns float32 logits (numpy, on either device) of shape (len(tokens), n_vocab) when
        all_logits, else the logits of the last token, shape (n_vocab,); after `restrict_head`,
        len(head_token_ids) columns instead of n_vocab. Long inputs run in
        blocks: `cancel` (a threading.Event) is checked before each block after the first,
        raising CancelledError with the blocks done so far left in the cache, and
        `progress(done, total)` is called after each block with the tokens done.
        """
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ModelError("forward needs at least one token")
        if ids.min() < 0 or ids.max() >= self.n_vocab:
            bad = int(ids[(ids < 0) | (ids >= self.n_vocab)][0])
            raise ModelError(f"token id {bad} is outside the vocabulary of {self.n_vocab}")
        cache.check_room(ids.size)
        outputs = []
        for start in range(0, ids.size, PREFILL_BLOCK):
            if start and cancel is not None and cancel.is_set():
                raise CancelledError(f"cancelled after {start} of {ids.size} tokens")
            block = ids[start : start + PREFILL_BLOCK]
            is_last = start + PREFILL_BLOCK >= ids.size
            hidden = self._run_block(block, cache)
            if progress is not None:
                progress(start + block.size, ids.size)
            if all_logits:
                outputs.append(self.device.numpy(self._head(hidden)))
            elif is_last:
                outputs.append(self.device.numpy(self._head(hidden[-1:])[0]))
        return np.concatenate(outputs) if all_logits else outputs[0]

    def _run_block(self, ids: np.ndarray, cache: KVCache) -> np.ndarray:
        positions = self.device.asarray(cache.append(ids.size))
        x = self.kernels.embed(self.token_embd, self.device.asarray(ids))
        if self.embedding_scale != 1.0:
            x *= np.float32(self.embedding_scale)
        for i in range(self.hparams.n_layer):
            self._layer(i, x, positions, cache)
        return x

    def restrict_head(self, token_ids: np.ndarray) -> None:
        """Score only `token_ids` (increasing, distinct) from now on: the logits `forward`
        returns then have one column per id, in that order, each equal to the full head's column
        (a product's rows do not depend on each other). A draft model's FR-Spec head."""
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.ndim != 1 or not ids.size or ids[0] < 0 or ids[-1] >= self.n_vocab or np.any(np.diff(ids) <= 0):
            raise ModelError(f"a head restriction needs increasing, distinct token ids below {self.n_vocab}")
        # The file's rows (self.output may hold them on another device): output.weight, or the
        # token embedding where the head is tied to it.
        tensor = self.gguf.tensors[self.output.name]
        rows = SimpleNamespace(
            raw=np.ascontiguousarray(tensor.raw[ids]),
            type=tensor.type,
            shape=(ids.size, self.hparams.n_embd),
            name=f"{tensor.name}[{ids.size} rows]",
        )
        self._head_weight = self.kernels.CheckedWeight(rows)
        self.head_token_ids = ids

    def _head(self, hidden: np.ndarray) -> np.ndarray:
        normed = self.kernels.rms_norm(hidden, self.output_norm, self.hparams.rms_eps)
        return self.linear(self._head_weight, normed)

    def attend(self, i: int, q, k, v, positions, cache: KVCache, rotate) -> np.ndarray:
        """Rotate q and k (`rotate(x, positions)` applies the layer's RoPE in place), store k
        and v in the cache and attend over layer i's entries; returns (n, n_head, head_dim_v)."""
        sink_positions = cache.sink_query_positions(i)
        q_sink = rotate(self.device.clone(q), sink_positions) if sink_positions is not None else None
        rotate(q, positions)
        rotate(k, positions)
        cache.write(i, k, v)
        view = cache.view(i)
        return self.kernels.attention(
            q,
            view.keys,
            view.values,
            positions,
            view.positions,
            scale=self.scale,
            window=view.window,
            q_sink=q_sink,
            n_sink=view.n_sink,
        )

    def linear(self, weight, x: np.ndarray) -> np.ndarray:
        """x (n, cols) times weight transposed: matvec for a single row, matmul for a block."""
        if x.shape[0] == 1:
            return self.kernels.matvec(weight, x[0], quantize=self.quantize_activations)[None, :]
        return self.kernels.matmul(weight, x, quantize=self.quantize_activations)

    @abstractmethod
    def _layer(self, i: int, x: np.ndarray, positions: np.ndarray, cache: KVCache) -> None:
        """Update the residual stream x (n, n_embd) in place with layer i."""


def attention_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def source_name(path) -> str:
    return Path(path).name if path is not None else "<gguf>"
