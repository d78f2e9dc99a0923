"""Gemma 3 (text).

Differences from Llama, as llama.cpp implements them: the token embedding is scaled by
sqrt(n_embd); queries and keys get a per-head RMSNorm before NeoX RoPE; attention and FFN
outputs are RMS-normed again before joining the residual stream; the FFN is GeGLU; five of
every six layers attend through a sliding window with RoPE base 10000, the sixth globally
with the file's base; the output head is tied to the embedding. The GGUF converter already
folded Gemma's "1 + weight" into the stored norm weights, so they are used as stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from localllm.errors import ModelError
from localllm.runtime.device import CPU, Device
from localllm.runtime.models.base import Model, Weights, read_hparams

SLIDING_PATTERN = 6
LOCAL_ROPE_BASE = 10000.0
# llama.cpp scales the 27B model's queries by its model width per head instead of head size.
BLOCK_COUNT_27B = 62


@dataclass
class Gemma3Layer:
    attn_norm: np.ndarray
    wq: object
    wk: object
    wv: object
    wo: object
    q_norm: np.ndarray
    k_norm: np.ndarray
    post_attn_norm: np.ndarray
    ffn_norm: np.ndarray
    gate: object
    up: object
    down: object
    post_ffn_norm: np.ndarray


class Gemma3Model(Model):
    def __init__(self, gguf_file, source: str, n_vocab: int, device: Device = CPU):
        hp = read_hparams(gguf_file.metadata, source, n_vocab)
        weights = Weights(gguf_file, source, device)
        super().__init__(gguf_file, hp, weights)
        self.embedding_scale = math.sqrt(hp.n_embd)
        self.windows = self.windows_for(gguf_file.metadata, hp.n_layer, source)
        if hp.n_layer == BLOCK_COUNT_27B:
            self.scale = 1.0 / math.sqrt(hp.n_embd / hp.n_head)
        else:
            self.scale = 1.0 / math.sqrt(hp.head_dim_k)
        q_dim, kv_dim = hp.n_head * hp.head_dim_k, hp.n_head_kv * hp.head_dim_k

        self.layers = []
        for i in range(hp.n_layer):
            p = f"blk.{i}."
            self.layers.append(
                Gemma3Layer(
                    attn_norm=weights.vector(p + "attn_norm.weight", hp.n_embd),
                    wq=weights.matrix(p + "attn_q.weight", q_dim, hp.n_embd),
                    wk=weights.matrix(p + "attn_k.weight", kv_dim, hp.n_embd),
                    wv=weights.matrix(p + "attn_v.weight", hp.n_head_kv * hp.head_dim_v, hp.n_embd),
                    wo=weights.matrix(p + "attn_output.weight", hp.n_embd, hp.n_head * hp.head_dim_v),
                    q_norm=weights.vector(p + "attn_q_norm.weight", hp.head_dim_k),
                    k_norm=weights.vector(p + "attn_k_norm.weight", hp.head_dim_k),
                    post_attn_norm=weights.vector(p + "post_attention_norm.weight", hp.n_embd),
                    ffn_norm=weights.vector(p + "ffn_norm.weight", hp.n_embd),
                    gate=weights.matrix(p + "ffn_gate.weight", hp.n_ff, hp.n_embd),
                    up=weights.matrix(p + "ffn_up.weight", hp.n_ff, hp.n_embd),
                    down=weights.matrix(p + "ffn_down.weight", hp.n_embd, hp.n_ff),
                    post_ffn_norm=weights.vector(p + "post_ffw_norm.weight", hp.n_embd),
                )
            )

    @classmethod
    def windows_for(cls, metadata: dict, n_layer: int, source: str) -> list[int]:
        window = int(metadata.get("gemma3.attention.sliding_window", 0))
        if window < 0:
            raise ModelError(f"gemma3.attention.sliding_window is negative in {source}")
        return [window if window and i % SLIDING_PATTERN < SLIDING_PATTERN - 1 else 0 for i in range(n_layer)]

    def layer_windows(self) -> list[int]:
        return list(self.windows)

    def _rotate_local(self, x, positions):
        return self.kernels.rope(x, positions, n_rot=self.hparams.n_rot, base=LOCAL_ROPE_BASE, neox=True)

    def _rotate_global(self, x, positions):
        hp = self.hparams
        return self.kernels.rope(
            x, positions, n_rot=hp.n_rot, base=hp.rope_base, freq_scale=hp.rope_freq_scale, neox=True
        )

    def _layer(self, i, x, positions, cache):
        hp, layer = self.hparams, self.layers[i]
        n = x.shape[0]
        rotate = self._rotate_local if self.windows[i] else self._rotate_global

        h = self.kernels.rms_norm(x, layer.attn_norm, hp.rms_eps)
        q = self.linear(layer.wq, h).reshape(n, hp.n_head, hp.head_dim_k)
        k = self.linear(layer.wk, h).reshape(n, hp.n_head_kv, hp.head_dim_k)
        v = self.linear(layer.wv, h).reshape(n, hp.n_head_kv, hp.head_dim_v)
        q = self.kernels.rms_norm(q, layer.q_norm, hp.rms_eps)
        k = self.kernels.rms_norm(k, layer.k_norm, hp.rms_eps)
        attn = self.attend(i, q, k, v, positions, cache, rotate)
        attn_out = self.linear(layer.wo, attn.reshape(n, hp.n_head * hp.head_dim_v))
        x += self.kernels.rms_norm(attn_out, layer.post_attn_norm, hp.rms_eps)

        h = self.kernels.rms_norm(x, layer.ffn_norm, hp.rms_eps)
        ffn_out = self.linear(layer.down, self.kernels.geglu(self.linear(layer.gate, h), self.linear(layer.up, h)))
        x += self.kernels.rms_norm(ffn_out, layer.post_ffn_norm, hp.rms_eps)


ARCHITECTURES = {"gemma3": Gemma3Model}
