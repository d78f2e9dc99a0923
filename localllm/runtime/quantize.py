"""`localllm quantize IN OUT --type T`: a GGUF model's weights in another block format, as
llama-quantize makes them (llama.cpp's src/llama-quant.cpp, as vendored in llama-cpp-python
0.3.36, with --allow-requantize and no importance matrix).

Targets are named as llama-quantize names them: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, TQ1_0 and TQ2_0
put every weight matrix in that type; Q6_K likewise; Q4_K_M is llama-quantize's mixture, Q4_K
with Q6_K for attention-V (attn_v, attn_qkv, attn_kv_b) and ffn_down in the layers its
`use_more_bits` picks (the first and last eighth, and every third between). Which tensors
change, and to what:
- Only tensors whose names end in "weight", have two or more dimensions and are not norms are
  quantized; the rest (norms, biases) are copied as they are.
- The output head (`output.weight`, or `token_embd.weight` when the model ties it to the
  embedding) becomes Q6_K, or Q8_0 for a Q8_0 target, a Falcon model or a row length the
  target's block does not divide; `token_embd.weight` becomes Q4_K for the ternary targets.
- llama-quantize's rules for particular models apply as well: attn_v and attn_k become Q8_0
  in 8-expert models; for Q4_K_M, attn_output becomes Q5_K in 8-expert models, attn_v's Q4_K
  becomes Q5_K in 70B models, and Falcon's ffn_down is Q6_K, Q5_K or Q4_K by layer.
- A tensor whose row length does not fit the chosen type's block falls back as llama-quantize
  falls back (TQ1_0, TQ2_0 -> Q4_0; Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0); if even that
  does not fit, it is an error naming the tensor (llama-quantize would store it as F16).
- A tensor already in its chosen type is copied byte for byte; any other is dequantized
  exactly to float32 (from any type this runtime reads) and encoded as llama.cpp encodes it
  without an importance matrix: the legacy and ternary types by the `gguf` package's NumPy
  quantizers, Q4_K and Q6_K by localllm.formats.kquant_encoders. A type with no encoder here
  (Q5_K, which the 8-expert, 70B and Falcon rules above can ask for) is an error naming the
  tensor when it would need encoding.

Tensors go out in llama-quantize's order (those outside the layers first, then layer by
layer, by name within each), with the input's metadata, `general.file_type` and
`general.quantization_version` set, and the input's alignment. The output is written to a
temporary file beside OUT and renamed to OUT only once complete and synced, so an interrupted
run or a full disk leaves no partial OUT.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf import quants as gguf_quants

from localllm.errors import GGUFError, InvalidParameterError, QuantizeError
from localllm.formats.gguf import open_gguf
from localllm.formats.kquant_encoders import quantize_q4_k, quantize_q6_k
from localllm.kernels import cpu as kernels

Q = GGMLQuantizationType

# Target name (llama-quantize's) -> (the type of ordinary weight matrices, general.file_type).
TARGETS = {
    "Q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "Q4_1": (Q.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "Q5_0": (Q.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "Q5_1": (Q.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "Q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "Q4_K_M": (Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "Q6_K": (Q.Q6_K, LlamaFileType.MOSTLY_Q6_K),
    "TQ1_0": (Q.TQ1_0, LlamaFileType.MOSTLY_TQ1_0),
    "TQ2_0": (Q.TQ2_0, LlamaFileType.MOSTLY_TQ2_0),
}
# The block types this tool can encode: gguf.quants' and the K-quant encoders.
ENCODERS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    **{t: partial(gguf_quants.quantize, qtype=t) for t in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.TQ1_0, Q.TQ2_0)},
    Q.Q4_K: quantize_q4_k,
    Q.Q6_K: quantize_q6_k,
}
# ggml's GGML_QNT_VERSION, which llama-quantize writes into every file it makes.
QUANTIZATION_VERSION = 2
_FALLBACK = {Q.TQ1_0: Q.Q4_0, Q.TQ2_0: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
# Rows converted at a time: the float32 copy of a chunk stays around 64 MB for the widest rows.
_CHUNK_VALUES = 1 << 24
# Layer counts at which llama.cpp's loader calls a model of these architectures 70B
# (src/models/<arch>.cpp); for llama only with grouped-query attention.
_LAYERS_OF_70B = {"llama": 80, "qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}


@dataclass(frozen=True)
class TensorPlan:
    name: str
    source: GGMLQuantizationType
    target: GGMLQuantizationType
    shape: tuple[int, ...]
    nbytes: int

    @property
    def converted(self) -> bool:
        return self.source != self.target


ProgressCallback = Callable[[int, int, int, int], None]


def target_of(name: str) -> tuple[GGMLQuantizationType, LlamaFileType]:
    key = name.upper()
    if key not in TARGETS:
        raise InvalidParameterError(f"unknown quantization type {name!r}; choose from {', '.join(TARGETS)}")
    return TARGETS[key]


def _layer_then_name(name: str) -> tuple[int, str]:
    """llama-quantize's tensor order: tensors outside the layers first, then by layer number."""
    match = re.match(r"blk\.(\d+)\.", name)
    return (int(match.group(1)) if match else -1, name)


def _quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


class _Mixture:
    """llama-quantize's per-tensor choices (`llama_tensor_get_type_impl` in src/llama-quant.cpp)
    for the targets offered here: the output head and embedding rules, Q4_K_M's Q6_K for
    attention-V and ffn_down in the layers `use_more_bits` picks, and the rules for Falcon,
    8-expert and 70B models. Its counters advance as llama-quantize's do, so tensors must be
    asked in llama-quantize's order."""

    def __init__(self, gguf_file, target: str):
        self.target = target.upper()
        self.default = TARGETS[self.target][0]
        self.arch = gguf_file.architecture or ""
        meta = gguf_file.metadata
        self.n_layer = int(meta.get(f"{self.arch}.block_count", 0))
        self.n_expert = int(meta.get(f"{self.arch}.expert_count", 0))
        attention = f"{self.arch}.attention."
        heads, kv_heads = meta.get(attention + "head_count"), meta.get(attention + "head_count_kv")
        self.is_70b = self.n_layer == _LAYERS_OF_70B.get(self.arch) and (self.arch != "llama" or heads != kv_heads)
        self.tied = "output.weight" not in gguf_file.tensors
        self.n_attention_wv = sum(_attn_v_like(name) for name in gguf_file.tensors)
        self.i_attention_wv = 0
        self.i_ffn_down = 0

    def type_for(self, name: str, shape: tuple[int, ...]) -> GGMLQuantizationType:
        cols = shape[-1]
        chosen = self._preferred(name, cols)
        block = GGML_QUANT_SIZES[chosen][0]
        if cols % block:
            fallback = _FALLBACK.get(chosen, chosen)
            if cols % GGML_QUANT_SIZES[fallback][0]:
                raise QuantizeError(
                    f"tensor {name}: rows of {cols} values fit neither {chosen.name} blocks of {block} "
                    f"nor {fallback.name} blocks of {GGML_QUANT_SIZES[fallback][0]}"
                )
            chosen = fallback
        return chosen

    def _preferred(self, name: str, cols: int) -> GGMLQuantizationType:
        default, q4_k_m = self.default, self.target == "Q4_K_M"
        if name == "output.weight" or (self.tied and name == "token_embd.weight"):
            if self.arch == "falcon" or cols % GGML_QUANT_SIZES[default][0]:
                return Q.Q8_0
            return Q.Q6_K if default != Q.Q8_0 else default
        if name == "token_embd.weight":
            return Q.Q4_K if default in (Q.TQ1_0, Q.TQ2_0) else default
        if _attn_v_like(name):
            chosen = default
            if q4_k_m and _use_more_bits(self.i_attention_wv, self.n_attention_wv):
                chosen = Q.Q6_K
            if self.is_70b and chosen == Q.Q4_K:
                chosen = Q.Q5_K
            if self.n_expert == 8:
                chosen = Q.Q8_0
            self.i_attention_wv += 1
            return chosen
        if "attn_k.weight" in name:
            return Q.Q8_0 if self.n_expert == 8 else default
        if "ffn_down" in name:
            layer = self.i_ffn_down
            if self.n_expert > 1:
                match = re.match(r"blk\.(\d+)\.", name)
                if match is None or not 0 <= int(match.group(1)) < self.n_layer:
                    raise QuantizeError(f"tensor {name}: cannot tell its layer")
                layer = int(match.group(1))
            self.i_ffn_down += 1
            if not q4_k_m:
                return default
            if self.arch == "falcon":
                if layer < self.n_layer // 16:
                    return Q.Q6_K
                return Q.Q5_K if _use_more_bits(layer, self.n_layer) else default
            return Q.Q6_K if _use_more_bits(layer, self.n_layer) else default
        if "attn_output.weight" in name and q4_k_m and self.n_expert == 8 and self.arch != "falcon":
            return Q.Q5_K
        return default


def _attn_v_like(name: str) -> bool:
    return any(part in name for part in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight"))


def _use_more_bits(layer: int, n_layers: int) -> bool:
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def plan(gguf_file, target: str) -> list[TensorPlan]:
    """Every tensor of `gguf_file` (a localllm GGUFFile) in output order, with its new type."""
    target_of(target)
    mixture = _Mixture(gguf_file, target)
    plans = []
    for name in sorted(gguf_file.tensors, key=_layer_then_name):
        tensor = gguf_file.tensors[name]
        shape = tuple(tensor.shape)
        new = mixture.type_for(name, shape) if _quantizable(name, shape) else tensor.type
        if new != tensor.type and new not in ENCODERS:
            raise QuantizeError(
                f"tensor {name}: {new.name} would have to be encoded from {tensor.type.name}, and this "
                f"quantizer has no {new.name} encoder"
            )
        if new != tensor.type and tensor.type not in kernels.KERNELS:
            raise QuantizeError(f"tensor {name}: cannot read its type {tensor.type.name}")
        rows = int(np.prod(shape[:-1]))
        block, type_size = GGML_QUANT_SIZES[new]
        plans.append(TensorPlan(name, tensor.type, new, shape, rows * (shape[-1] // block) * type_size))
    return plans


def _converted(tensor, target: GGMLQuantizationType) -> np.ndarray:
    """The tensor's rows dequantized exactly, a chunk at a time, and encoded as `target`."""
    shape = tuple(tensor.shape)
    cols = shape[-1]
    rows = int(np.prod(shape[:-1]))
    block, type_size = GGML_QUANT_SIZES[target]
    out = np.empty((rows, cols // block * type_size), dtype=np.uint8)
    weight = kernels.CheckedWeight(_Rows(tensor, rows, cols))
    step = max(1, _CHUNK_VALUES // cols)
    for start in range(0, rows, step):
        ids = np.arange(start, min(rows, start + step), dtype=np.int64)
        out[start : start + ids.size] = ENCODERS[target](kernels.embed(weight, ids))
    return out


class _Rows:
    """A tensor of any rank as the 2-D (rows, cols) weight the row dequantizers take."""

    def __init__(self, tensor, rows: int, cols: int):
        self.name, self.type, self.shape = tensor.name, tensor.type, (rows, cols)
        self.raw = tensor.raw.reshape(rows, -1)


def _copy_metadata(reader: GGUFReader, writer: GGUFWriter, file_type: LlamaFileType) -> None:
    for field in reader.fields.values():
        # GGUF.* are the reader's view of the header; the writer adds the architecture itself.
        if field.name.startswith("GGUF.") or field.name == "general.architecture" or field.name in _SPLIT_KEYS:
            continue
        if field.name in ("general.file_type", "general.quantization_version", "general.alignment"):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
    writer.add_key_value("general.quantization_version", QUANTIZATION_VERSION, GGUFValueType.UINT32)
    writer.add_key_value("general.file_type", int(file_type), GGUFValueType.UINT32)


def quantize(
    source: str | os.PathLike, destination: str | os.PathLike, target: str, progress: ProgressCallback | None = None
) -> list[TensorPlan]:
    """Write `source` quantized to `target` at `destination` (see the module docstring);
    `progress(tensors done, tensors, bytes written, bytes in all)` follows the tensors.
    Returns the plan that was carried out."""
    _, file_type = target_of(target)
    destination = Path(destination)
    if not destination.parent.is_dir():
        raise QuantizeError(f"cannot write {destination}: directory {destination.parent} does not exist")
    with open_gguf(source) as gguf_file:
        plans = plan(gguf_file, target)
        total = sum(p.nbytes for p in plans)
        try:
            reader = GGUFReader(gguf_file.path)
        except (ValueError, OSError) as exc:
            raise GGUFError(f"{gguf_file.path}: {exc}") from exc
        partial = destination.with_name(f".{destination.name}.{os.getpid()}.partial")
        try:
            writer = GGUFWriter(partial, gguf_file.architecture or "", use_temp_file=False)
            writer.data_alignment = gguf_file.alignment
            if "general.alignment" in gguf_file.metadata:
                writer.add_custom_alignment(gguf_file.alignment)
            _copy_metadata(reader, writer, file_type)
            for p in plans:
                block, type_size = GGML_QUANT_SIZES[p.target]
                byte_shape = (*p.shape[:-1], p.shape[-1] // block * type_size)
                writer.add_tensor_info(p.name, byte_shape, np.uint8, p.nbytes, raw_dtype=p.target)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            written = 0
            for done, p in enumerate(plans, 1):
                tensor = gguf_file.tensors[p.name]
                data = _converted(tensor, p.target) if p.converted else tensor.raw.reshape(-1)
                writer.write_tensor_data(data)
                written += p.nbytes
                if progress is not None:
                    progress(done, len(plans), written, total)
            writer.close()
            _sync(partial)
            os.replace(partial, destination)
        finally:
            partial.unlink(missing_ok=True)
    return plans


def _sync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
