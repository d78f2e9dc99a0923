"""Block layouts of the GGML tensor types we support, and their dequantization to float32.

Every quantized tensor row is a sequence of fixed-size blocks; `block_size` weights are packed
into `type_size` bytes. `LAYOUTS[qtype]` describes each block field by name, byte offset
within the block, byte size and NumPy element dtype, so kernels can address fields without
re-deriving ggml's C structs (ggml/src/ggml-common.h). All multi-byte fields are little-endian.

`LAYOUTS` is the one description of every format, in the spirit of ggml's `type_traits`: besides
the byte layout, each entry names the activation format its products round activations to
(`activation`: ggml's `vec_dot_type`, whose layouts are in `ACTIVATION_LAYOUTS`) and the CPU
kernel modules that serve it (`cpu_kernels`). Kernels derive their block sizes, byte counts and
field offsets from it as module constants, which Numba freezes into the compiled code. This
layer imports no kernels (dependencies flow runtime -> kernels -> formats): it names the kernel
modules by `CpuKernels` values, and the kernels' dispatch (kernels/cpu/products.py) keys on
those names.

How the packed bits map to weight positions ``p`` (0-based, within one block):

* F32, F16, BF16: one value per "block". BF16 is the top half of a float32.
* Q4_0  ``p < 16``: low nibble of ``qs[p]``; ``p >= 16``: high nibble of ``qs[p-16]``;
  ``w = (q - 8) * d``.
* Q4_1  same nibbles; ``w = d * q + m``.
* Q5_0  nibble as Q4_0, plus bit ``p`` of the little-endian uint32 ``qh`` as bit 4;
  ``w = (q - 16) * d``.
* Q5_1  as Q5_0 with ``w = d * q + m``.
* Q8_0  ``w = qs[p] * d`` with ``qs`` signed.
* Q2_K  ``p = 128*h + 32*j + l``: ``q = (qs[32*h + l] >> 2*j) & 3``;
  ``w = (d * (scales[p//16] & 15)) * q - dmin * (scales[p//16] >> 4)``.
* Q3_K  ``p = 128*h + 32*j + l``: low two bits ``(qs[32*h + l] >> 2*j) & 3``, minus 4 unless
  bit ``4*h + j`` of ``hmask[l]`` is set; sixteen 6-bit scales ``s`` (see `_q3_k_scales`),
  ``w = (d * (s[p//16] - 32)) * q``.
* Q4_K  ``p = 64*j + 32*i + l``: nibble ``i`` of ``qs[32*j + l]``; eight 6-bit scale/min
  pairs (see `k_scales_mins`) for sub-block ``b = p // 32``;
  ``w = (d * sc[b]) * q - dmin * mn[b]``.
* Q5_K  as Q4_K, plus bit ``p // 32`` of ``qh[p % 32]`` as bit 4.
* Q6_K  ``p = 128*h + 32*j + l``: the low 4 bits are the low nibble (``j < 2``) or high
  nibble (``j >= 2``) of ``ql[64*h + 32*(j & 1) + l]``, the top 2 bits
  ``(qh[32*h + l] >> 2*j) & 3``; ``w = (d * scales[p//16]) * (q - 32)``.
* TQ1_0 base-3 digits: bytes ``qs[0:32]`` give weights ``32*n + m`` (n < 5), ``qs[32:48]``
  give ``160 + 16*n + m``, ``qh[0:4]`` give ``240 + 4*n + m`` (n < 4); digit ``n`` of byte
  ``b`` is ``((b * 3**n mod 256) * 3) >> 8``; ``w = (digit - 1) * d``.
* TQ2_0 ``p = 128*h + 32*j + l``: ``q = (qs[32*h + l] >> 2*j) & 3``; ``w = (q - 1) * d``.

Dequantization is bit-exact with ``gguf.quants.dequantize`` (and so with ggml): the same
float32 operations in the same order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from localllm.errors import GGUFError

Q = GGMLQuantizationType


@dataclass(frozen=True)
class Field:
    """One field of a block: `size` bytes at byte `offset`, holding elements of `dtype`."""

    name: str
    offset: int
    size: int
    dtype: str

    @property
    def count(self) -> int:
        return self.size // np.dtype(self.dtype).itemsize


class CpuKernels(StrEnum):
    """The CPU kernel modules, localllm/kernels/cpu/<value>.py. Every format has one float
    module (products on float32 activations, and the embedding lookup); `INTEGER` also
    serves a format when its products on 8-bit activation codes exist (where AVX2 does)."""

    FLOATS = "floats"
    LEGACY = "legacy"
    KQUANTS = "kquants"
    INTEGER = "integer"


@dataclass(frozen=True)
class BlockLayout:
    """`block_size` weights stored in `type_size` bytes as the concatenation of `fields`.

    `activation`: the format activations are rounded to before a product with these weights
    (ggml's `vec_dot_type`; F32 where they are not rounded). `cpu_kernels`: the kernel modules
    that serve the format.
    """

    qtype: GGMLQuantizationType
    block_size: int
    type_size: int
    fields: tuple[Field, ...]
    activation: GGMLQuantizationType = Q.F32
    cpu_kernels: tuple[CpuKernels, ...] = ()

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.qtype.name} has no field {name!r}")

    def offsets(self, *names: str) -> tuple[int, ...]:
        """The byte offsets of the named fields, in the order given."""
        return tuple(self.field(name).offset for name in names)

    @property
    def scale_fields(self) -> tuple[Field, ...]:
        """The float16 fields (scales and mins) of the block."""
        return tuple(f for f in self.fields if f.dtype == "<f2")


def _layout(
    qtype: GGMLQuantizationType,
    *fields: tuple[str, int, str],
    activation: GGMLQuantizationType = Q.F32,
    cpu_kernels: tuple[CpuKernels, ...] = (),
    sizes: tuple[int, int] | None = None,
) -> BlockLayout:
    """Build a layout from (name, size, dtype) triples laid out back to back; `sizes` (block
    size, bytes) where gguf's GGML_QUANT_SIZES is not ggml's."""
    placed = []
    offset = 0
    for name, size, dtype in fields:
        placed.append(Field(name, offset, size, dtype))
        offset += size
    block_size, type_size = sizes or GGML_QUANT_SIZES[qtype]
    if offset != type_size:
        raise AssertionError(f"{qtype.name} layout covers {offset} bytes, ggml says {type_size}")
    return BlockLayout(qtype, block_size, type_size, tuple(placed), activation, cpu_kernels)


_FLOATS = (CpuKernels.FLOATS,)
_LEGACY = (CpuKernels.LEGACY, CpuKernels.INTEGER)
_KQUANTS = (CpuKernels.KQUANTS, CpuKernels.INTEGER)

LAYOUTS: dict[GGMLQuantizationType, BlockLayout] = {
    layout.qtype: layout
    for layout in (
        _layout(Q.F32, ("value", 4, "<f4"), cpu_kernels=_FLOATS),
        _layout(Q.F16, ("value", 2, "<f2"), cpu_kernels=_FLOATS),
        _layout(Q.BF16, ("value", 2, "<u2"), cpu_kernels=_FLOATS),
        _layout(Q.Q4_0, ("d", 2, "<f2"), ("qs", 16, "u1"), activation=Q.Q8_0, cpu_kernels=_LEGACY),
        _layout(Q.Q4_1, ("d", 2, "<f2"), ("m", 2, "<f2"), ("qs", 16, "u1"), activation=Q.Q8_1, cpu_kernels=_LEGACY),
        _layout(Q.Q5_0, ("d", 2, "<f2"), ("qh", 4, "u1"), ("qs", 16, "u1"), activation=Q.Q8_0, cpu_kernels=_LEGACY),
        _layout(
            Q.Q5_1,
            ("d", 2, "<f2"),
            ("m", 2, "<f2"),
            ("qh", 4, "u1"),
            ("qs", 16, "u1"),
            activation=Q.Q8_1,
            cpu_kernels=_LEGACY,
        ),
        _layout(Q.Q8_0, ("d", 2, "<f2"), ("qs", 32, "i1"), activation=Q.Q8_0, cpu_kernels=_LEGACY),
        _layout(
            Q.Q2_K,
            ("scales", 16, "u1"),
            ("qs", 64, "u1"),
            ("d", 2, "<f2"),
            ("dmin", 2, "<f2"),
            activation=Q.Q8_K,
            cpu_kernels=_KQUANTS,
        ),
        _layout(
            Q.Q3_K,
            ("hmask", 32, "u1"),
            ("qs", 64, "u1"),
            ("scales", 12, "u1"),
            ("d", 2, "<f2"),
            activation=Q.Q8_K,
            cpu_kernels=_KQUANTS,
        ),
        _layout(
            Q.Q4_K,
            ("d", 2, "<f2"),
            ("dmin", 2, "<f2"),
            ("scales", 12, "u1"),
            ("qs", 128, "u1"),
            activation=Q.Q8_K,
            cpu_kernels=_KQUANTS,
        ),
        _layout(
            Q.Q5_K,
            ("d", 2, "<f2"),
            ("dmin", 2, "<f2"),
            ("scales", 12, "u1"),
            ("qh", 32, "u1"),
            ("qs", 128, "u1"),
            activation=Q.Q8_K,
            cpu_kernels=_KQUANTS,
        ),
        _layout(
            Q.Q6_K,
            ("ql", 128, "u1"),
            ("qh", 64, "u1"),
            ("scales", 16, "i1"),
            ("d", 2, "<f2"),
            activation=Q.Q8_K,
            cpu_kernels=_KQUANTS,
        ),
        _layout(Q.TQ1_0, ("qs", 48, "u1"), ("qh", 4, "u1"), ("d", 2, "<f2"), activation=Q.Q8_K, cpu_kernels=_KQUANTS),
        _layout(Q.TQ2_0, ("qs", 64, "u1"), ("d", 2, "<f2"), activation=Q.Q8_K, cpu_kernels=_KQUANTS),
    )
}

# The activation formats (ggml's block_q8_0, block_q8_1, block_q8_K). Q8_1's s is f16(d * sum
# of codes); Q8_K's bsums are the code sums of each 16 values.
ACTIVATION_LAYOUTS: dict[GGMLQuantizationType, BlockLayout] = {
    layout.qtype: layout
    for layout in (
        LAYOUTS[Q.Q8_0],
        # gguf-py lists float32 d and s (40 bytes); ggml's block_q8_1 stores them as f16.
        _layout(Q.Q8_1, ("d", 2, "<f2"), ("s", 2, "<f2"), ("qs", 32, "i1"), sizes=(32, 36)),
        _layout(Q.Q8_K, ("d", 4, "<f4"), ("qs", 256, "i1"), ("bsums", 32, "<i2")),
    )
}


def served_by(kernels: CpuKernels) -> tuple[GGMLQuantizationType, ...]:
    """The formats that the kernel module `kernels` serves, in LAYOUTS order."""
    return tuple(qtype for qtype, layout in LAYOUTS.items() if kernels in layout.cpu_kernels)


SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(LAYOUTS)

# Blocks dequantized per step: bounds the temporaries to a few tens of MB for any tensor.
_CHUNK_WEIGHTS = 1 << 22


def row_nbytes(qtype: GGMLQuantizationType, n_weights: int) -> int:
    """Bytes taken by `n_weights` consecutive weights (a multiple of the block size)."""
    layout = LAYOUTS[qtype]
    return n_weights // layout.block_size * layout.type_size


def _f16(blocks: np.ndarray, field: str, layout: BlockLayout) -> np.ndarray:
    """A float16 field of every block as a float32 column (n_blocks, 1)."""
    f = layout.field(field)
    return blocks[:, f.offset : f.offset + 2].copy().view("<f2").astype(np.float32)


def _bytes(blocks: np.ndarray, field: str, layout: BlockLayout) -> np.ndarray:
    f = layout.field(field)
    return blocks[:, f.offset : f.offset + f.size]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Low nibbles of every byte followed by the high nibbles: (n, k) -> (n, 2k)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _crumbs(qs: np.ndarray, group: int) -> np.ndarray:
    """2-bit fields: each `group` bytes yield four runs of `group` values (shifts 0, 2, 4, 6)."""
    n = qs.shape[0]
    grouped = qs.reshape(n, -1, 1, group)
    shifts = np.arange(0, 8, 2, dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((grouped >> shifts) & 3).reshape(n, -1)


def _bits_of_u32(qh: np.ndarray) -> np.ndarray:
    """Bits 0..31 of a little-endian 4-byte field, one uint8 per bit: (n, 4) -> (n, 32)."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _dequant_q4_0(blocks: np.ndarray, layout: BlockLayout) -> np.ndarray:
    d = _f16(blocks, "d", layout)
    q = _nibbles(_bytes(blocks, "qs", layout)).astype(np.float32) - np.float32(8)
    return q * d


def _dequant_q4_1(blocks: np.ndarray, layout: BlockLayout) -> np.ndarray:
    d = _f16(blocks, "d", layout)
    m = _f16(blocks, "m", layout)
    q = _nibbles(_bytes(blocks, "qs", layout)).astype(np.float32)
    return d * q + m


def _five_bit(blocks: np.ndarray, layout: BlockLayout) -> np.ndarray:
    low = _nibbles(_bytes(blocks, "qs", layout))
    high = _bits_of_u32(np.ascontiguousarray(_bytes(blocks, "qh", layout)))
    return low | (high << 4)


def _dequant_q5_0(blocks: np.ndarray, layout: BlockLayout) -> np.ndarray:
    d = _f16(blocks, "d", layout)
    return (_five_bit(blocks, layout).astype(np.float32) - np.float32(16)) * d


def _dequant_q5_1(blocks: np.ndarray, layout: BlockLayout) -> np.ndarray:
    d = _f16(blocks, "d", layout)
    m = _f16(blocks, "m", layout)
    return d * _five_bit(blocks, layout).astype(np.float32) + m


def _dequant_q8_0(blocks: np.ndarray, layout: BlockLayout) -> np.ndarray:
    d = _f16(blocks, "d", layout)
    return _bytes(blocks, "qs", layout).view(np.int8).astype(np.float32) * d


def _per_16(values: np.ndarray) -> np.ndarray:
    """Repeat each of the 16 per-sub-block values over its 16 weights: (n, 16) -> (n, 256)."""
    return np.repeat(values, 16, axis=1)


def _dequant_q2_k(blocks: np.ndarray, layout: BlockLayout) -> np.ndarray:
    d = _f16(blocks, "d", layout)
    dmin = _f16(blocks, "dmin", layout)
    scales = _bytes(blocks, "scales", layout)
    step = _per_16(d * (scales & 0x0F).astype(np.float32))
    offset = _per_16(dmin * (scales >> 4).astype(np.float32))
    q = _crumbs(_bytes(blocks, "qs", layout), 32).astype(np.float32)
    return step * q - offset


def _q3_k_scales(packed: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit scales from 12 bytes: low nibbles in bytes 0..7, top 2 bits in 8..11."""
    low = _nibbles(packed[:, :8])
    high = _crumbs(np.ascontiguousarray(packed[:, 8:12]), 4)
    return (low | (high << 4)).astype(np.int8) - np.int8(32)


def _dequant_q3_k(blocks: np.ndarray, layout: BlockLayout) -> np.ndarray:
    d = _f16(blocks, "d", layout)
    step = _per_16(d * _q3_k_scales(_bytes(blocks, "scales", layout)).astype(np.float32))
    low = _crumbs(_bytes(blocks, "qs", layout), 32).astype(np.int8)
    # Bit k of hmask[l] belongs to weight 32*k + l: unpack to (n, 8 bits, 32 bytes) order.
    hmask = np.ascontiguousarray(_bytes(blocks, "hmask", layout))
    high = np.unpackbits(hmask[:, None, :], axis=1, bitorder="little").reshape(len(blocks), -1)
    q = low - ((high ^ 1).astype(np.int8) << 2)
    return step * q.astype(np.float32)


def k_scales_mins(first, second, third):
    """The 6-bit scales and mins packed in the 12 scale bytes shared by Q4_K and Q5_K, for
    sub-blocks j and j + 4 (j < 4), from bytes j (`first`), 4 + j (`second`) and 8 + j (`third`):
    (scale j, min j, scale j + 4, min j + 4).

    Sub-blocks 0..3 keep their scale and min in the low 6 bits of bytes 0..3 and 4..7;
    sub-blocks 4..7 take their low 4 bits from the nibbles of bytes 8..11 and their top
    2 bits from the spare top bits of bytes 0..3 (scales) and 4..7 (mins).

    The one statement of this packing: written with operators only, it runs on NumPy arrays of
    bytes (dequantization below), on scalars in Numba kernels (kernels/cpu/kquants.py compiles
    it inline) and on LLVM byte vectors (kernels/cpu/integer.py).
    """
    return (
        first & 0x3F,
        second & 0x3F,
        (third & 0x0F) | ((first >> 2) & 0x30),
        (third >> 4) | ((second >> 2) & 0x30),
    )


def _k_quant_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight scales and the eight mins of each block's 12 packed bytes (`k_scales_mins`)."""
    low_scales, low_mins, high_scales, high_mins = k_scales_mins(packed[:, 0:4], packed[:, 4:8], packed[:, 8:12])
    return np.concatenate([low_scales, high_scales], axis=1), np.concatenate([low_mins, high_mins], axis=1)


def _per_32(values: np.ndarray) -> np.ndarray:
    return np.repeat(values, 32, axis=1)


def _k_quant_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K nibble order: each 32 bytes give 32 low nibbles, then 32 high nibbles."""
    n = qs.shape[0]
    grouped = qs.reshape(n, 4, 1, 32)
    shifts = np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return ((grouped >> shifts) & 0x0F).reshape(n, 256)


def _k_quant_affine(blocks: np.ndarray, layout: BlockLayout, q: np.ndarray) -> np.ndarray:
    d = _f16(blocks, "d", layout)
    dmin = _f16(blocks, "dmin", layout)
    scales, mins = _k_quant_scales_mins(_bytes(blocks, "scales", layout))
    step = _per_32(d * scales.astype(np.float32))
    offset = _per_32(dmin * mins.astype(np.float32))
    return step * q.astype(np.float32) - offset


def _dequant_q4_k(blocks: np.ndarray, layout: BlockLayout) -> np.ndarray:
    return _k_quant_affine(blocks, layout, _k_quant_nibbles(_bytes(blocks, "qs", layout)))


def _dequant_q5_k(blocks: np.ndarray, layout: BlockLayout) -> np.ndarray:
    low = _k_quant_nibbles(_bytes(blocks, "qs", layout))
    qh = np.ascontiguousarray(_bytes(blocks, "qh", layout))
    high = np.unpackbits(qh[:, None, :], axis=1, bitorder="little").reshape(len(blocks), -1)
    return _k_quant_affine(blocks, layout, low | (high << 4))


def _dequant_q6_k(blocks: np.ndarray, layout: BlockLayout) -> np.ndarray:
    n = blocks.shape[0]
    d = _f16(blocks, "d", layout)
    step = _per_16(d * _bytes(blocks, "scales", layout).view(np.int8).astype(np.float32))
    # ql halves of 64 bytes: bytes 0..31 feed weights j=0 (low nibble) and j=2 (high nibble),
    # bytes 32..63 feed j=1 and j=3.
    ql = _bytes(blocks, "ql", layout).reshape(n, 2, 1, 2, 32)
    shifts = np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1, 1)
    low = ((ql >> shifts) & 0x0F).reshape(n, 256)
    high = _crumbs(_bytes(blocks, "qh", layout), 32)
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    return step * q.astype(np.float32)


_POWERS_OF_3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


def _ternary_digits(packed: np.ndarray, n_digits: int) -> np.ndarray:
    """Base-3 digits stored as fixed-point fractions: byte b -> runs of digit 0, 1, ... per byte."""
    n, width = packed.shape
    shifted = packed[:, None, :] * _POWERS_OF_3[:n_digits].reshape(1, n_digits, 1)
    return ((shifted.astype(np.uint16) * 3) >> 8).reshape(n, n_digits * width)


def _dequant_tq1_0(blocks: np.ndarray, layout: BlockLayout) -> np.ndarray:
    d = _f16(blocks, "d", layout)
    qs = _bytes(blocks, "qs", layout)
    digits = np.concatenate(
        [
            _ternary_digits(qs[:, :32], 5),
            _ternary_digits(qs[:, 32:], 5),
            _ternary_digits(_bytes(blocks, "qh", layout), 4),
        ],
        axis=1,
    )
    return (digits.astype(np.float32) - np.float32(1)) * d


def _dequant_tq2_0(blocks: np.ndarray, layout: BlockLayout) -> np.ndarray:
    d = _f16(blocks, "d", layout)
    q = _crumbs(_bytes(blocks, "qs", layout), 32).astype(np.float32) - np.float32(1)
    return q * d


_BLOCK_DEQUANTIZERS = {
    Q.Q4_0: _dequant_q4_0,
    Q.Q4_1: _dequant_q4_1,
    Q.Q5_0: _dequant_q5_0,
    Q.Q5_1: _dequant_q5_1,
    Q.Q8_0: _dequant_q8_0,
    Q.Q2_K: _dequant_q2_k,
    Q.Q3_K: _dequant_q3_k,
    Q.Q4_K: _dequant_q4_k,
    Q.Q5_K: _dequant_q5_k,
    Q.Q6_K: _dequant_q6_k,
    Q.TQ1_0: _dequant_tq1_0,
    Q.TQ2_0: _dequant_tq2_0,
}


def _dequantize_plain(flat: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    if qtype == Q.F32:
        return flat.view("<f4").astype(np.float32)
    if qtype == Q.F16:
        return flat.view("<f2").astype(np.float32)
    return (flat.view("<u2").astype(np.uint32) << 16).view(np.float32)


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Dequantize `raw` (uint8, any shape whose bytes are the tensor) to float32 of `shape`."""
    try:
        qtype = GGMLQuantizationType(qtype)
    except ValueError:
        raise GGUFError(f"unknown tensor type {qtype!r}") from None
    layout = LAYOUTS.get(qtype)
    if layout is None:
        raise GGUFError(f"tensor type {qtype.name} is not supported")
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8:
        raise GGUFError(f"raw {qtype.name} data must be a uint8 array, got {type(raw).__name__}")
    shape = tuple(int(s) for s in shape)
    if not shape or any(s <= 0 for s in shape) or shape[-1] % layout.block_size:
        raise GGUFError(
            f"shape {shape} does not fit {qtype.name}: dims must be positive and the last a "
            f"multiple of {layout.block_size}"
        )
    n_blocks = math.prod(shape) // layout.block_size
    if raw.size != n_blocks * layout.type_size:
        raise GGUFError(
            f"{qtype.name} tensor of shape {shape} needs {n_blocks * layout.type_size} bytes, got {raw.size}"
        )
    flat = np.ascontiguousarray(raw).reshape(-1)
    # Garbage scales in hostile files legitimately produce inf/NaN, as they do in ggml.
    with np.errstate(all="ignore"):
        if qtype in (Q.F32, Q.F16, Q.BF16):
            return _dequantize_plain(flat, qtype).reshape(shape)
        blocks = flat.reshape(n_blocks, layout.type_size)
        out = np.empty((n_blocks, layout.block_size), dtype=np.float32)
        step = max(1, _CHUNK_WEIGHTS // layout.block_size)
        dequant_blocks = _BLOCK_DEQUANTIZERS[qtype]
        for start in range(0, n_blocks, step):
            out[start : start + step] = dequant_blocks(blocks[start : start + step], layout)
    return out.reshape(shape)
