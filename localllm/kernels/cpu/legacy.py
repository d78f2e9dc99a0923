"""Products for the 32-value block formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (convention: products.py).

Block layouts: localllm/formats/quants.py (ggml's block_q4_0 ... block_q8_0, little-endian,
no padding), whose LAYOUTS gives every size and offset below:
  Q4_0: f16 d, 16 bytes of nibbles     value = d * (q - 8)
  Q4_1: f16 d, f16 m, 16 bytes          value = d * q + m
  Q5_0: f16 d, u32 high bits, 16 bytes  value = d * (q - 16)
  Q5_1: f16 d, f16 m, u32 high bits, 16 bytes   value = d * q + m
  Q8_0: f16 d, 32 int8                  value = d * q
Nibble byte j holds value j in its low half and value j + 16 in its high half; bit j of the
high-bit word is the fifth bit of value j.

matvec fuses decoding into the dot product (weights are read once, never materialized) with
float32 activations, which keeps results exact to float32 rounding. (On AVX2 machines, Q4_0,
Q4_1, Q5_0 and Q8_0 products on 8-bit activations go to integer.py instead; Q5_1 stays here.) Offsets are applied once
per block through the block sums of x (Q4_1/Q5_1's m, and the -8 / -16 of Q4_0/Q5_0, which
then decode as plain unsigned codes). The high nibble is masked in place (q & 0xF0, 16 times its
value) and meets an x whose upper half-block was divided by 16 (exact), so no shift is needed:
Numba's integers are 64-bit and LLVM keeps shifts in 4-lane int64 code. Q5's fifth bit is masked
in place too and brought to its weight by an exact float product. Rows are read through raw
pointers and accumulate in 32 lanes on the stack (pointers.py), two blocks per iteration into
two independent 16-lane sets; reducing to a scalar per block cost more than the decoding.
matvec is compiled without fastmath on purpose. With reassociation, LLVM vectorized the
reductions differently in a process that compiled the kernels than in one that loaded them from
Numba's cache, so the first run after installing gave other greedy tokens than every later run.
Contraction into FMAs alone is stable, but costs SmolLM2 (Q4_1) one of its near-tie greedy
continuations of llama.cpp's reference; it gained only 6-10% here.
matmul decodes each weight row once into a float32 buffer and dots it with four activation
rows per pass. dequantize_rows multiplies in the same order as ggml (no fast-math), so it is bit-exact.
"""

import numba
import numpy as np
from gguf import GGMLQuantizationType
from numba import literally, njit, prange

from localllm.formats.quants import LAYOUTS, CpuKernels, served_by
from localllm.kernels.cpu.floats import load_half
from localllm.kernels.cpu.pointers import data_pointer, stack_pointer

Q = GGMLQuantizationType
_OPTIONS = dict(cache=True, nogil=True)
(BLOCK,) = {LAYOUTS[qtype].block_size for qtype in served_by(CpuKernels.LEGACY)}
# Bytes per block and field offsets, frozen by Numba into the code.
_Q4_0_BYTES, _Q4_1_BYTES, _Q5_0_BYTES, _Q5_1_BYTES, _Q8_0_BYTES = (
    LAYOUTS[qtype].type_size for qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)
)
_Q4_0_D, _Q4_0_QS = LAYOUTS[Q.Q4_0].offsets("d", "qs")
_Q4_1_D, _Q4_1_M, _Q4_1_QS = LAYOUTS[Q.Q4_1].offsets("d", "m", "qs")
_Q5_0_D, _Q5_0_QH, _Q5_0_QS = LAYOUTS[Q.Q5_0].offsets("d", "qh", "qs")
_Q5_1_D, _Q5_1_M, _Q5_1_QH, _Q5_1_QS = LAYOUTS[Q.Q5_1].offsets("d", "m", "qh", "qs")
_Q8_0_D, _Q8_0_QS = LAYOUTS[Q.Q8_0].offsets("d", "qs")
# Rows handled per parallel task, so each task allocates its buffers once.
_ROW_CHUNK = 16
# Activation rows matmul dots against one decoded weight row at a time: each load of the
# decoded row then feeds four FMAs instead of one.
_ACTIVATION_TILE = 4


@njit(nogil=True, inline="always")
def _high_bits(row, offset):
    """The little-endian u32 of fifth bits at row[offset:] (an array or a raw pointer)."""
    return (
        np.uint32(row[offset])
        | (np.uint32(row[offset + 1]) << np.uint32(8))
        | (np.uint32(row[offset + 2]) << np.uint32(16))
        | (np.uint32(row[offset + 3]) << np.uint32(24))
    )


@njit(cache=True, nogil=True)
def _prepare_x(x, xs, x_sums):
    """xs: x with the upper 16 values of every block divided by 16 (exact, a power of two), so
    a high nibble masked in place (q & 0xF0) multiplies it directly; x_sums: the block sums."""
    for b in range(x_sums.shape[0]):
        acc = np.float32(0.0)
        for j in range(BLOCK):
            acc += x[b * BLOCK + j]
        x_sums[b] = acc
        for j in range(16):
            xs[b * BLOCK + j] = x[b * BLOCK + j]
            xs[b * BLOCK + 16 + j] = x[b * BLOCK + 16 + j] * np.float32(1 / 16)


_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0 = range(5)


@njit(nogil=True, inline="always")
def _layout(kind):
    """Bytes per block, where in a block its scale d sits and where its 16 bytes of low bits
    (Q8_0: its 32 codes) start."""
    if kind == _Q4_0:
        return _Q4_0_BYTES, _Q4_0_D, _Q4_0_QS
    if kind == _Q4_1:
        return _Q4_1_BYTES, _Q4_1_D, _Q4_1_QS
    if kind == _Q5_0:
        return _Q5_0_BYTES, _Q5_0_D, _Q5_0_QS
    if kind == _Q5_1:
        return _Q5_1_BYTES, _Q5_1_D, _Q5_1_QS
    return _Q8_0_BYTES, _Q8_0_D, _Q8_0_QS


@njit(nogil=True, inline="always")
def _fifth_bits(kind, p, bo):
    if kind == _Q5_0:
        return _high_bits(p, bo + _Q5_0_QH)
    if kind == _Q5_1:
        return _high_bits(p, bo + _Q5_1_QH)
    return np.uint32(0)


# The fifth bit of value j is masked in place (h & 2**j) and converted exactly to float, then
# moved to its weight (16, or 256 for the high nibble's xs scaling) by an exact float product:
# integer compares or variable shifts would run in 64-bit lanes.
_BITS = np.array([1 << j for j in range(16)], dtype=np.uint32)
_LOW_BIT_SCALE = np.array([16.0 / (1 << j) for j in range(16)], dtype=np.float32)
_HIGH_BIT_SCALE = np.array([256.0 / (1 << j) for j in range(16)], dtype=np.float32)


@njit(nogil=True, inline="always")
def _q5_block(p, q_at, h, xp, xo, j):
    """Sum of the two 5-bit codes at position j times x (xs layout)."""
    q = p[q_at + j]
    lo = np.float32(q & 15) + np.float32(h & _BITS[j]) * _LOW_BIT_SCALE[j]
    hi = np.float32(q & 0xF0) + np.float32((h >> np.uint32(16)) & _BITS[j]) * _HIGH_BIT_SCALE[j]
    return lo * xp[xo + j] + hi * xp[xo + 16 + j]


@njit(nogil=True, inline="always")
def _pair(kind, p, codes, h, xp, xo, j):
    """Values j and j + 16 of the block whose codes start at p[codes], times x, before the
    block scale (xp in the xs layout for the nibble formats, plain x for Q8_0)."""
    if kind == _Q8_0:
        return np.float32(np.int8(p[codes + j])) * xp[xo + j] + np.float32(np.int8(p[codes + 16 + j])) * xp[xo + 16 + j]
    if kind == _Q5_0 or kind == _Q5_1:
        return _q5_block(p, codes, h, xp, xo, j)
    q = p[codes + j]
    return np.float32(q & 15) * xp[xo + j] + np.float32(q & 0xF0) * xp[xo + 16 + j]


@njit(nogil=True, inline="always")
def _offset_scale(kind, p, bo, d):
    """What multiplies a block's sum of x: m for Q4_1/Q5_1; d for the others, whose constant
    offset (-8, -16; none for Q8_0) is applied once per row in _with_offsets."""
    if kind == _Q4_1:
        return load_half(p, bo + _Q4_1_M)
    if kind == _Q5_1:
        return load_half(p, bo + _Q5_1_M)
    return d


@njit(nogil=True, inline="always")
def _with_offsets(kind, total, offsets):
    if kind == _Q4_0:
        return total - np.float32(8) * offsets
    if kind == _Q5_0:
        return total - np.float32(16) * offsets
    if kind == _Q8_0:
        return total
    return total + offsets


@njit(nogil=True, inline="always")
def _dot(kind, p, o, xp, x_sums, nb, lanes):
    """One row at p[o:] (p: the weight matrix's data pointer) times the prepared activations
    xp; x_sums: block sums of x, nb: blocks per row, lanes: 32 stack floats. Two blocks per
    iteration go to two independent 16-lane sets; inside a block the values j and j + 16 are
    summed per position before the block scale."""
    size, scale, codes = _layout(kind)
    for j in range(32):
        lanes[j] = 0.0
    off0 = np.float32(0.0)
    off1 = np.float32(0.0)
    for b in range(0, nb - 1, 2):
        bo = o + b * size
        d0 = load_half(p, bo + scale)
        d1 = load_half(p, bo + size + scale)
        h0 = _fifth_bits(kind, p, bo)
        h1 = _fifth_bits(kind, p, bo + size)
        xo = b * BLOCK
        for j in range(16):
            lanes[j] += d0 * _pair(kind, p, bo + codes, h0, xp, xo, j)
            lanes[16 + j] += d1 * _pair(kind, p, bo + size + codes, h1, xp, xo + BLOCK, j)
        off0 += _offset_scale(kind, p, bo, d0) * x_sums[b]
        off1 += _offset_scale(kind, p, bo + size, d1) * x_sums[b + 1]
    if nb % 2:
        b = nb - 1
        bo = o + b * size
        d0 = load_half(p, bo + scale)
        h0 = _fifth_bits(kind, p, bo)
        xo = b * BLOCK
        for j in range(16):
            lanes[j] += d0 * _pair(kind, p, bo + codes, h0, xp, xo, j)
        off0 += _offset_scale(kind, p, bo, d0) * x_sums[b]
    total = np.float32(0.0)
    for j in range(16):
        total += lanes[j] + lanes[16 + j]
    return _with_offsets(kind, total, off0 + off1)


@njit(cache=True, nogil=True, parallel=True)
def _matvec(raw, x, out, kind):
    """out = raw @ x in chunks of _ROW_CHUNK rows; `kind` is a compile-time constant so each
    format gets its own specialization with the dispatch folded away."""
    literally(kind)
    nb = x.shape[0] // BLOCK
    x_sums = np.empty(nb, dtype=np.float32)
    xs = np.empty(x.shape[0], dtype=np.float32)
    _prepare_x(x, xs, x_sums)
    rows = raw.shape[0]
    row_bytes = raw.shape[1]
    for c in prange((rows + _ROW_CHUNK - 1) // _ROW_CHUNK):
        lanes = numba.carray(stack_pointer(32), 32)
        p = data_pointer(raw)
        xp = data_pointer(x) if kind == _Q8_0 else data_pointer(xs)
        sp = data_pointer(x_sums)
        for r in range(c * _ROW_CHUNK, min(rows, (c + 1) * _ROW_CHUNK)):
            out[r] = _dot(kind, p, r * row_bytes, xp, sp, nb, lanes)


@njit(**_OPTIONS)
def matvec_q4_0(raw, x, out):
    _matvec(raw, x, out, _Q4_0)


@njit(**_OPTIONS)
def matvec_q4_1(raw, x, out):
    _matvec(raw, x, out, _Q4_1)


@njit(**_OPTIONS)
def matvec_q5_0(raw, x, out):
    _matvec(raw, x, out, _Q5_0)


@njit(**_OPTIONS)
def matvec_q5_1(raw, x, out):
    _matvec(raw, x, out, _Q5_1)


@njit(**_OPTIONS)
def matvec_q8_0(raw, x, out):
    _matvec(raw, x, out, _Q8_0)


@njit(**_OPTIONS, fastmath=True)
def _dot_buffer(buffer, X, r, out):
    """out[i, r] = buffer . X[i] for every activation row i."""
    n, cols = X.shape
    full = n - n % _ACTIVATION_TILE
    for i in range(0, full, _ACTIVATION_TILE):
        x0, x1, x2, x3 = X[i], X[i + 1], X[i + 2], X[i + 3]
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for j in range(cols):
            w = buffer[j]
            a0 += w * x0[j]
            a1 += w * x1[j]
            a2 += w * x2[j]
            a3 += w * x3[j]
        out[i, r], out[i + 1, r], out[i + 2, r], out[i + 3, r] = a0, a1, a2, a3
    for i in range(full, n):
        xi = X[i]
        acc = np.float32(0.0)
        for j in range(cols):
            acc += buffer[j] * xi[j]
        out[i, r] = acc


# Q4_0


@njit(**_OPTIONS)
def _decode_q4_0(row, out):
    for b in range(out.shape[0] // BLOCK):
        o = b * _Q4_0_BYTES
        d = load_half(row, o + _Q4_0_D)
        qs = row[o + _Q4_0_QS : o + _Q4_0_QS + BLOCK // 2]
        values = out[b * BLOCK : (b + 1) * BLOCK]
        for j in range(16):
            values[j] = d * np.float32(np.int32(qs[j] & 15) - 8)
            values[16 + j] = d * np.float32(np.int32(qs[j] >> 4) - 8)


@njit(**_OPTIONS, parallel=True, fastmath=True)
def matmul_q4_0(raw, X, out):
    rows, cols = raw.shape[0], X.shape[1]
    for c in prange((rows + _ROW_CHUNK - 1) // _ROW_CHUNK):
        buffer = np.empty(cols, dtype=np.float32)
        for r in range(c * _ROW_CHUNK, min(rows, (c + 1) * _ROW_CHUNK)):
            _decode_q4_0(raw[r], buffer)
            _dot_buffer(buffer, X, r, out)


@njit(**_OPTIONS)
def dequantize_rows_q4_0(raw, row_ids, out):
    for i in range(row_ids.shape[0]):
        _decode_q4_0(raw[row_ids[i]], out[i])


# Q4_1


@njit(**_OPTIONS)
def _decode_q4_1(row, out):
    for b in range(out.shape[0] // BLOCK):
        o = b * _Q4_1_BYTES
        d = load_half(row, o + _Q4_1_D)
        m = load_half(row, o + _Q4_1_M)
        qs = row[o + _Q4_1_QS : o + _Q4_1_QS + BLOCK // 2]
        values = out[b * BLOCK : (b + 1) * BLOCK]
        for j in range(16):
            values[j] = d * np.float32(qs[j] & 15) + m
            values[16 + j] = d * np.float32(qs[j] >> 4) + m


@njit(**_OPTIONS, parallel=True, fastmath=True)
def matmul_q4_1(raw, X, out):
    rows, cols = raw.shape[0], X.shape[1]
    for c in prange((rows + _ROW_CHUNK - 1) // _ROW_CHUNK):
        buffer = np.empty(cols, dtype=np.float32)
        for r in range(c * _ROW_CHUNK, min(rows, (c + 1) * _ROW_CHUNK)):
            _decode_q4_1(raw[r], buffer)
            _dot_buffer(buffer, X, r, out)


@njit(**_OPTIONS)
def dequantize_rows_q4_1(raw, row_ids, out):
    for i in range(row_ids.shape[0]):
        _decode_q4_1(raw[row_ids[i]], out[i])


# Q5_0


@njit(**_OPTIONS)
def _decode_q5_0(row, out):
    for b in range(out.shape[0] // BLOCK):
        o = b * _Q5_0_BYTES
        d = load_half(row, o + _Q5_0_D)
        high = _high_bits(row, o + _Q5_0_QH)
        qs = row[o + _Q5_0_QS : o + _Q5_0_QS + BLOCK // 2]
        values = out[b * BLOCK : (b + 1) * BLOCK]
        for j in range(16):
            q = np.uint32(qs[j])
            low = (q & 15) | (((high >> j) & 1) << 4)
            top = (q >> 4) | (((high >> (j + 16)) & 1) << 4)
            values[j] = d * np.float32(np.int32(low) - 16)
            values[16 + j] = d * np.float32(np.int32(top) - 16)


@njit(**_OPTIONS, parallel=True, fastmath=True)
def matmul_q5_0(raw, X, out):
    rows, cols = raw.shape[0], X.shape[1]
    for c in prange((rows + _ROW_CHUNK - 1) // _ROW_CHUNK):
        buffer = np.empty(cols, dtype=np.float32)
        for r in range(c * _ROW_CHUNK, min(rows, (c + 1) * _ROW_CHUNK)):
            _decode_q5_0(raw[r], buffer)
            _dot_buffer(buffer, X, r, out)


@njit(**_OPTIONS)
def dequantize_rows_q5_0(raw, row_ids, out):
    for i in range(row_ids.shape[0]):
        _decode_q5_0(raw[row_ids[i]], out[i])


# Q5_1


@njit(**_OPTIONS)
def _decode_q5_1(row, out):
    for b in range(out.shape[0] // BLOCK):
        o = b * _Q5_1_BYTES
        d = load_half(row, o + _Q5_1_D)
        m = load_half(row, o + _Q5_1_M)
        high = _high_bits(row, o + _Q5_1_QH)
        qs = row[o + _Q5_1_QS : o + _Q5_1_QS + BLOCK // 2]
        values = out[b * BLOCK : (b + 1) * BLOCK]
        for j in range(16):
            q = np.uint32(qs[j])
            low = (q & 15) | (((high >> j) & 1) << 4)
            top = (q >> 4) | (((high >> (j + 16)) & 1) << 4)
            values[j] = d * np.float32(low) + m
            values[16 + j] = d * np.float32(top) + m


@njit(**_OPTIONS, parallel=True, fastmath=True)
def matmul_q5_1(raw, X, out):
    rows, cols = raw.shape[0], X.shape[1]
    for c in prange((rows + _ROW_CHUNK - 1) // _ROW_CHUNK):
        buffer = np.empty(cols, dtype=np.float32)
        for r in range(c * _ROW_CHUNK, min(rows, (c + 1) * _ROW_CHUNK)):
            _decode_q5_1(raw[r], buffer)
            _dot_buffer(buffer, X, r, out)


@njit(**_OPTIONS)
def dequantize_rows_q5_1(raw, row_ids, out):
    for i in range(row_ids.shape[0]):
        _decode_q5_1(raw[row_ids[i]], out[i])


# Q8_0


@njit(**_OPTIONS)
def _decode_q8_0(row, out):
    for b in range(out.shape[0] // BLOCK):
        o = b * _Q8_0_BYTES
        d = load_half(row, o + _Q8_0_D)
        qs = row[o + _Q8_0_QS : o + _Q8_0_QS + BLOCK]
        values = out[b * BLOCK : (b + 1) * BLOCK]
        for j in range(BLOCK):
            values[j] = np.float32(np.int8(qs[j])) * d


@njit(**_OPTIONS, parallel=True, fastmath=True)
def matmul_q8_0(raw, X, out):
    rows, cols = raw.shape[0], X.shape[1]
    for c in prange((rows + _ROW_CHUNK - 1) // _ROW_CHUNK):
        buffer = np.empty(cols, dtype=np.float32)
        for r in range(c * _ROW_CHUNK, min(rows, (c + 1) * _ROW_CHUNK)):
            _decode_q8_0(raw[r], buffer)
            _dot_buffer(buffer, X, r, out)


@njit(**_OPTIONS)
def dequantize_rows_q8_0(raw, row_ids, out):
    for i in range(row_ids.shape[0]):
        _decode_q8_0(raw[row_ids[i]], out[i])


KERNELS = {
    Q.Q4_0: (matvec_q4_0, matmul_q4_0, dequantize_rows_q4_0),
    Q.Q4_1: (matvec_q4_1, matmul_q4_1, dequantize_rows_q4_1),
    Q.Q5_0: (matvec_q5_0, matmul_q5_0, dequantize_rows_q5_0),
    Q.Q5_1: (matvec_q5_1, matmul_q5_1, dequantize_rows_q5_1),
    Q.Q8_0: (matvec_q8_0, matmul_q8_0, dequantize_rows_q8_0),
}
