"""Products for the 32-value block formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (convention: products.py).

Block layouts (ggml's block_q4_0 ... block_q8_0, little-endian, no padding):
  Q4_0 18 bytes: f16 d, 16 bytes of nibbles     value = d * (q - 8)
  Q4_1 20 bytes: f16 d, f16 m, 16 bytes          value = d * q + m
  Q5_0 22 bytes: f16 d, u32 high bits, 16 bytes  value = d * (q - 16)
  Q5_1 24 bytes: f16 d, f16 m, u32 high bits, 16 bytes   value = d * q + m
  Q8_0 34 bytes: f16 d, 32 int8                  value = d * q
Nibble byte j holds value j in its low half and value j + 16 in its high half; bit j of the
high-bit word is the fifth bit of value j.

matvec fuses decoding into the dot product (weights are read once, never materialized) with
float32 activations, which keeps results exact to float32 rounding; the offsets of Q4_1/Q5_1
are applied once per block through the block sums of x. Every block is addressed through
slices (qs, xb) indexed by the loop counter: with a computed index Numba adds a negative-index
fix-up per element and LLVM then loads element by element instead of 8 lanes at once.
matvec accumulates into 32 per-position lanes (one small buffer per row chunk) instead of
reducing every block to a scalar: the per-block horizontal sum cost more than the decoding, and
independent lanes vectorize without fastmath. matvec is compiled without fastmath on purpose:
with reassociation allowed, LLVM vectorized the reductions differently in a process that
compiled the kernels than in one that loaded them from Numba's cache, so the first run after
installing gave other greedy tokens than every later run.
matmul decodes each weight row once into a float32 buffer and dots it with four activation
rows per pass. dequantize_rows multiplies in the same order as ggml (no fast-math), so it is bit-exact.
"""

import numpy as np
from gguf import GGMLQuantizationType
from numba import literally, njit, prange

from localllm.kernels.cpu.floats import load_half

_OPTIONS = dict(cache=True, nogil=True)
BLOCK = 32
# Rows handled per parallel task, so each task allocates its buffers once.
_ROW_CHUNK = 16
# Activation rows matmul dots against one decoded weight row at a time: each load of the
# decoded row then feeds four FMAs instead of one.
_ACTIVATION_TILE = 4


@njit(**_OPTIONS)
def _block_sums(x, out):
    for b in range(out.shape[0]):
        xb = x[b * BLOCK:(b + 1) * BLOCK]
        acc = np.float32(0.0)
        for j in range(BLOCK):
            acc += xb[j]
        out[b] = acc


@njit(**_OPTIONS)
def _lane_sum(lanes):
    total = np.float32(0.0)
    for j in range(BLOCK):
        total += lanes[j]
    return total


# Format tags for _matvec, which runs the same row loop for every format.
_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0 = range(5)


@njit(**_OPTIONS)
def _dot(kind, row, x, x_sums, lanes):
    if kind == _Q4_0:
        return _dot_q4_0(row, x, lanes)
    if kind == _Q4_1:
        return _dot_q4_1(row, x, x_sums, lanes)
    if kind == _Q5_0:
        return _dot_q5_0(row, x, lanes)
    if kind == _Q5_1:
        return _dot_q5_1(row, x, x_sums, lanes)
    return _dot_q8_0(row, x, lanes)


@njit(**_OPTIONS, parallel=True)
def _matvec(raw, x, out, kind):
    """out = raw @ x in chunks of _ROW_CHUNK rows, each chunk with its own 32 accumulator lanes;
    Q4_1/Q5_1 also need the block sums of x for their offsets. `kind` is made a compile-time
    constant so each format gets its own specialization with the dispatch folded away."""
    literally(kind)
    x_sums = np.empty(x.shape[0] // BLOCK, dtype=np.float32)
    if kind == _Q4_1 or kind == _Q5_1:
        _block_sums(x, x_sums)
    rows = raw.shape[0]
    chunks = (rows + _ROW_CHUNK - 1) // _ROW_CHUNK
    lanes = np.empty((chunks, BLOCK), dtype=np.float32)
    for c in prange(chunks):
        for r in range(c * _ROW_CHUNK, min(rows, (c + 1) * _ROW_CHUNK)):
            out[r] = _dot(kind, raw[r], x, x_sums, lanes[c])


@njit(**_OPTIONS)
def _high_bits(row, offset):
    return (np.uint32(row[offset]) | (np.uint32(row[offset + 1]) << np.uint32(8))
            | (np.uint32(row[offset + 2]) << np.uint32(16)) | (np.uint32(row[offset + 3]) << np.uint32(24)))


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
        o = b * 18
        d = load_half(row, o)
        qs = row[o + 2:o + 18]
        values = out[b * BLOCK:(b + 1) * BLOCK]
        for j in range(16):
            values[j] = d * np.float32(np.int32(qs[j] & 15) - 8)
            values[16 + j] = d * np.float32(np.int32(qs[j] >> 4) - 8)


@njit(**_OPTIONS)
def _dot_q4_0(row, x, lanes):
    lanes[:] = 0
    for b in range(x.shape[0] // BLOCK):
        o = b * 18
        d = load_half(row, o)
        qs = row[o + 2:o + 18]
        xb = x[b * BLOCK:(b + 1) * BLOCK]
        for j in range(16):
            lanes[j] += d * (np.float32(np.int32(qs[j] & 15) - 8) * xb[j])
            lanes[16 + j] += d * (np.float32(np.int32(qs[j] >> 4) - 8) * xb[16 + j])
    return _lane_sum(lanes)


@njit(**_OPTIONS)
def matvec_q4_0(raw, x, out):
    _matvec(raw, x, out, _Q4_0)


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
        o = b * 20
        d = load_half(row, o)
        m = load_half(row, o + 2)
        qs = row[o + 4:o + 20]
        values = out[b * BLOCK:(b + 1) * BLOCK]
        for j in range(16):
            values[j] = d * np.float32(qs[j] & 15) + m
            values[16 + j] = d * np.float32(qs[j] >> 4) + m


@njit(**_OPTIONS)
def _dot_q4_1(row, x, x_sums, lanes):
    lanes[:] = 0
    offsets = np.float32(0.0)
    for b in range(x_sums.shape[0]):
        o = b * 20
        d = load_half(row, o)
        qs = row[o + 4:o + 20]
        xb = x[b * BLOCK:(b + 1) * BLOCK]
        for j in range(16):
            lanes[j] += d * (np.float32(qs[j] & 15) * xb[j])
            lanes[16 + j] += d * (np.float32(qs[j] >> 4) * xb[16 + j])
        offsets += load_half(row, o + 2) * x_sums[b]
    return _lane_sum(lanes) + offsets


@njit(**_OPTIONS)
def matvec_q4_1(raw, x, out):
    _matvec(raw, x, out, _Q4_1)


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
        o = b * 22
        d = load_half(row, o)
        high = _high_bits(row, o + 2)
        qs = row[o + 6:o + 22]
        values = out[b * BLOCK:(b + 1) * BLOCK]
        for j in range(16):
            q = np.uint32(qs[j])
            low = (q & 15) | (((high >> j) & 1) << 4)
            top = (q >> 4) | (((high >> (j + 16)) & 1) << 4)
            values[j] = d * np.float32(np.int32(low) - 16)
            values[16 + j] = d * np.float32(np.int32(top) - 16)


@njit(**_OPTIONS)
def _dot_q5_0(row, x, lanes):
    lanes[:] = 0
    for b in range(x.shape[0] // BLOCK):
        o = b * 22
        d = load_half(row, o)
        high = _high_bits(row, o + 2)
        xb = x[b * BLOCK:(b + 1) * BLOCK]
        qs = row[o + 6:o + 22]
        for j in range(16):
            q = np.uint32(qs[j])
            low = (q & 15) | (((high >> j) & 1) << 4)
            top = (q >> 4) | (((high >> (j + 16)) & 1) << 4)
            lanes[j] += d * (np.float32(np.int32(low) - 16) * xb[j])
            lanes[16 + j] += d * (np.float32(np.int32(top) - 16) * xb[16 + j])
    return _lane_sum(lanes)


@njit(**_OPTIONS)
def matvec_q5_0(raw, x, out):
    _matvec(raw, x, out, _Q5_0)


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
        o = b * 24
        d = load_half(row, o)
        m = load_half(row, o + 2)
        high = _high_bits(row, o + 4)
        qs = row[o + 8:o + 24]
        values = out[b * BLOCK:(b + 1) * BLOCK]
        for j in range(16):
            q = np.uint32(qs[j])
            low = (q & 15) | (((high >> j) & 1) << 4)
            top = (q >> 4) | (((high >> (j + 16)) & 1) << 4)
            values[j] = d * np.float32(low) + m
            values[16 + j] = d * np.float32(top) + m


@njit(**_OPTIONS)
def _dot_q5_1(row, x, x_sums, lanes):
    lanes[:] = 0
    offsets = np.float32(0.0)
    for b in range(x_sums.shape[0]):
        o = b * 24
        d = load_half(row, o)
        high = _high_bits(row, o + 4)
        xb = x[b * BLOCK:(b + 1) * BLOCK]
        qs = row[o + 8:o + 24]
        for j in range(16):
            q = np.uint32(qs[j])
            low = (q & 15) | (((high >> j) & 1) << 4)
            top = (q >> 4) | (((high >> (j + 16)) & 1) << 4)
            lanes[j] += d * (np.float32(low) * xb[j])
            lanes[16 + j] += d * (np.float32(top) * xb[16 + j])
        offsets += load_half(row, o + 2) * x_sums[b]
    return _lane_sum(lanes) + offsets


@njit(**_OPTIONS)
def matvec_q5_1(raw, x, out):
    _matvec(raw, x, out, _Q5_1)


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
        o = b * 34
        d = load_half(row, o)
        qs = row[o + 2:o + 34]
        values = out[b * BLOCK:(b + 1) * BLOCK]
        for j in range(BLOCK):
            values[j] = np.float32(np.int8(qs[j])) * d


@njit(**_OPTIONS)
def _dot_q8_0(row, x, lanes):
    lanes[:] = 0
    for b in range(x.shape[0] // BLOCK):
        o = b * 34
        d = load_half(row, o)
        qs = row[o + 2:o + 34]
        xb = x[b * BLOCK:(b + 1) * BLOCK]
        for j in range(BLOCK):
            lanes[j] += d * (np.float32(np.int8(qs[j])) * xb[j])
    return _lane_sum(lanes)


@njit(**_OPTIONS)
def matvec_q8_0(raw, x, out):
    _matvec(raw, x, out, _Q8_0)


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
    GGMLQuantizationType.Q4_0: (matvec_q4_0, matmul_q4_0, dequantize_rows_q4_0),
    GGMLQuantizationType.Q4_1: (matvec_q4_1, matmul_q4_1, dequantize_rows_q4_1),
    GGMLQuantizationType.Q5_0: (matvec_q5_0, matmul_q5_0, dequantize_rows_q5_0),
    GGMLQuantizationType.Q5_1: (matvec_q5_1, matmul_q5_1, dequantize_rows_q5_1),
    GGMLQuantizationType.Q8_0: (matvec_q8_0, matmul_q8_0, dequantize_rows_q8_0),
}
