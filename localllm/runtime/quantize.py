"""`localllm quantize IN OUT --type T`: a GGUF model's weights in another block format, as
llama-quantize makes them (llama.cpp's src/llama-quant.cpp, as vendored in llama-cpp-python
0.3.36, with --allow-requantize and no importance matrix).

Which tensors change, and to what:
- Only tensors whose names end in "weight", have two or more dimensions and are not norms are
  quantized; the rest (norms, biases) are copied as they are.
- The output head (`output.weight`, or `token_embd.weight` when the model ties it to the
  embedding) becomes Q6_K, or Q8_0 for a Q8_0 target or a row length that is not a multiple
  of 256; `token_embd.weight` becomes Q4_K for the ternary targets.
- A tensor whose row length does not fit the chosen type's block falls back as llama-quantize
  falls back (TQ1_0, TQ2_0 -> Q4_0; Q4_K -> Q5_0; Q6_K -> Q8_0); if even that does not fit, it
  is an error naming the tensor (llama-quantize would store it as F16).
- A tensor already in its chosen type is copied byte for byte; any other is dequantized
  exactly to float32 (from any type this runtime reads) and quantized with the `gguf`
  package's NumPy quantizers, which produce llama.cpp's bytes. They have no K-quant encoders:
  a K-quant that would need encoding (a Q6_K head made from another type) is an error.

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
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf import quants as gguf_quants

from localllm.errors import GGUFError, InvalidParameterError, QuantizeError
from localllm.formats.gguf import open_gguf
from localllm.kernels import cpu as kernels

Q = GGMLQuantizationType

# Target name -> (the type of ordinary weight matrices, general.file_type).
TARGETS = {
    "Q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "Q4_1": (Q.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "Q5_0": (Q.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "Q5_1": (Q.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "Q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "TQ1_0": (Q.TQ1_0, LlamaFileType.MOSTLY_TQ1_0),
    "TQ2_0": (Q.TQ2_0, LlamaFileType.MOSTLY_TQ2_0),
}
# The block types gguf.quants can encode.
ENCODABLE = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.TQ1_0, Q.TQ2_0}
# ggml's GGML_QNT_VERSION, which llama-quantize writes into every file it makes.
QUANTIZATION_VERSION = 2
_FALLBACK = {Q.TQ1_0: Q.Q4_0, Q.TQ2_0: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q6_K: Q.Q8_0}
_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
# Rows converted at a time: the float32 copy of a chunk stays around 64 MB for the widest rows.
_CHUNK_VALUES = 1 << 24


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


def _type_for(name: str, shape: tuple[int, ...], default: GGMLQuantizationType, tied: bool) -> GGMLQuantizationType:
    cols = shape[-1]
    chosen = default
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if cols % 256:
            chosen = Q.Q8_0
        elif default != Q.Q8_0:
            chosen = Q.Q6_K
    elif name == "token_embd.weight" and default in (Q.TQ1_0, Q.TQ2_0):
        chosen = Q.Q4_K
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


def plan(gguf_file, target: str) -> list[TensorPlan]:
    """Every tensor of `gguf_file` (a localllm GGUFFile) in output order, with its new type."""
    default, _ = target_of(target)
    tied = "output.weight" not in gguf_file.tensors
    plans = []
    for name in sorted(gguf_file.tensors, key=_layer_then_name):
        tensor = gguf_file.tensors[name]
        shape = tuple(tensor.shape)
        new = _type_for(name, shape, default, tied) if _quantizable(name, shape) else tensor.type
        if new != tensor.type and new not in ENCODABLE:
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
        out[start : start + ids.size] = gguf_quants.quantize(kernels.embed(weight, ids), target)
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
