"""Products for the 256-weight super-block formats Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, TQ1_0, TQ2_0.

Kernel convention: see products.py. Block layouts: localllm/formats/quants.py (from ggml's
ggml-common.h and dequantize_row_* in ggml-quants.c).

* `dequantize_rows` repeats ggml's float32 operations in ggml's order (no fast-math), so it
  is bit-exact with `gguf.quants.dequantize`: it is the embedding lookup (a few rows, so serial).
* `matvec` (decoding) streams every weight once and must keep up with memory bandwidth, so
  it never materializes weights: the integer codes are converted to float32 and multiplied
  with the float32 activations directly, and the per-sub-block scale, min and offset are
  applied once per sub-block (mins and constant offsets through precomputed activation sums).
  Numba widens integer arithmetic to 64 bits; LLVM narrows masks back to 32-bit vector lanes
  but not shifts (or masks merged with shifts), which fall back to 4-lane int64 code. So upper
  bit fields are masked in place (`v & 0xF0`), never shifted, and their power of two is folded
  into a float scale. Q6_K's two high bits therefore go through their own float product instead
  of being or-ed into the code (measured 1.5x). Q4_K's and Q6_K's scales are decoded branch-free
  once per block into a stack buffer (`pointers.stack_pointer`: a Numba-allocated array would make LLVM
  guard every vectorized loop with aliasing checks). Every matvec accumulates 16/32-lane partial
  sums over the whole row (scale folded into each product) instead of reducing a vector to a
  scalar per sub-block, which cost more than the products on these short sub-blocks. Independent
  lanes vectorize without fast-math, and matvec is compiled without it on purpose: with
  reassociation allowed, LLVM vectorized the reductions differently in a process that compiled
  the kernels than in one that loaded them from Numba's cache, and greedy decoding then
  depended on whether it was the first run after installing.
  The kernels multiply float32 activations (rounded to 8 bits first by products.py, the way
  llama.cpp does it, or not at all). On AVX2 machines products.py sends rounded activations to
  the integer kernels of integer.py instead (matvec and matmul), which run several times
  faster; these float kernels serve float activations and other CPUs.
* `matmul` (prefill, speculative verification) decodes a tile of `ROW_TILE` weight rows one
  block at a time into a small float32 buffer that stays in L1, then reuses each decoded block
  for every activation row. Dequantized tiles through sgemm (one BLAS thread per core, so
  OpenBLAS's and Numba's pools do not spin against each other) measured 1.2-1.4x faster at
  64-256 rows, but its float32 sums of 35-bit products rounded differently enough that
  llama.cpp's 8-bit activation rounding flipped more often: Gemma 3's long reference case went
  from max |Δ| 2.10 to 3.22. Accumulating in float64 brought it to 1.72, but dgemm was slower
  than this kernel.
"""

import numba
import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from localllm.formats.quants import LAYOUTS, CpuKernels, k_scales_mins, served_by
from localllm.kernels.cpu.floats import load_half
from localllm.kernels.cpu.pointers import data_pointer, stack_pointer

Q = GGMLQuantizationType

# Block sizes and field offsets (localllm/formats/quants.py), frozen by Numba into the code.
(QK_K,) = {LAYOUTS[qtype].block_size for qtype in served_by(CpuKernels.KQUANTS)}
_Q2_K_SCALES, _Q2_K_QS, _Q2_K_D, _Q2_K_DMIN = LAYOUTS[Q.Q2_K].offsets("scales", "qs", "d", "dmin")
_Q3_K_HMASK, _Q3_K_QS, _Q3_K_SCALES, _Q3_K_D = LAYOUTS[Q.Q3_K].offsets("hmask", "qs", "scales", "d")
_Q4_K_D, _Q4_K_DMIN, _Q4_K_SCALES, _Q4_K_QS = LAYOUTS[Q.Q4_K].offsets("d", "dmin", "scales", "qs")
_Q5_K_D, _Q5_K_DMIN, _Q5_K_SCALES, _Q5_K_QH, _Q5_K_QS = LAYOUTS[Q.Q5_K].offsets("d", "dmin", "scales", "qh", "qs")
_Q6_K_QL, _Q6_K_QH, _Q6_K_SCALES, _Q6_K_D = LAYOUTS[Q.Q6_K].offsets("ql", "qh", "scales", "d")
_TQ1_0_QS, _TQ1_0_QH, _TQ1_0_D = LAYOUTS[Q.TQ1_0].offsets("qs", "qh", "d")
_TQ2_0_QS, _TQ2_0_D = LAYOUTS[Q.TQ2_0].offsets("qs", "d")
_Q4_K_BYTES = LAYOUTS[Q.Q4_K].type_size
_Q6_K_BYTES = LAYOUTS[Q.Q6_K].type_size
_TQ2_0_BYTES = LAYOUTS[Q.TQ2_0].type_size

ROW_TILE = 4
# Rows per parallel work item of matvec: big enough to amortize scheduling and scratch
# allocation, small enough to balance across cores on the 256-row projections.
ROW_CHUNK = 16
# Reassociation lets LLVM vectorize the float reductions; contraction lets it use FMA.
_FAST = {"reassoc", "contract", "nsz"}
# matvec: contraction (FMA fusion) only; it is decided per expression, the same whether a
# kernel was just compiled or loaded from the cache, unlike reassociation (see above).
_CONTRACT = {"contract"}


# Block decoders: exact dequantization of one block at row[o:] into w[0:256].


_k_scales_mins = njit(nogil=True, inline="always")(k_scales_mins)


@njit(cache=True, nogil=True)
def _k_scale_min(row, o, j):
    """6-bit scale and min of sub-block j (0..7) from the 12 packed bytes at row[o:]."""
    i = j & 3
    low_scale, low_min, high_scale, high_min = _k_scales_mins(row[o + i], row[o + 4 + i], row[o + 8 + i])
    if j < 4:
        return low_scale, low_min
    return high_scale, high_min


@njit(cache=True, nogil=True)
def _q3_k_scale(row, o, i):
    """Signed 6-bit scale i (0..15) from the 12 packed bytes at row[o:]."""
    low = (row[o + (i & 7)] >> (4 * (i >> 3))) & 0xF
    high = (row[o + 8 + (i & 3)] >> (2 * (i >> 2))) & 3
    return np.int32(low | (high << 4)) - 32


@njit(cache=True, nogil=True)
def _decode_q2_k(row, o, w):
    d = load_half(row, o + _Q2_K_D)
    dmin = load_half(row, o + _Q2_K_DMIN)
    for h in range(2):
        for j in range(4):
            for half in range(2):
                packed = row[o + _Q2_K_SCALES + 8 * h + 2 * j + half]
                dl = d * np.float32(packed & 0xF)
                ml = dmin * np.float32(packed >> 4)
                base = o + _Q2_K_QS + 32 * h + 16 * half
                p = 128 * h + 32 * j + 16 * half
                for l in range(16):
                    w[p + l] = dl * np.float32((row[base + l] >> (2 * j)) & 3) - ml


@njit(cache=True, nogil=True)
def _decode_q3_k(row, o, w):
    d = load_half(row, o + _Q3_K_D)
    for h in range(2):
        for j in range(4):
            bit = 4 * h + j
            for half in range(2):
                dl = d * np.float32(_q3_k_scale(row, o + _Q3_K_SCALES, 8 * h + 2 * j + half))
                p = 128 * h + 32 * j + 16 * half
                for l in range(16 * half, 16 * half + 16):
                    low = np.int32((row[o + _Q3_K_QS + 32 * h + l] >> (2 * j)) & 3)
                    high = np.int32((row[o + _Q3_K_HMASK + l] >> bit) & 1)
                    w[p + l - 16 * half] = dl * np.float32(low - 4 + 4 * high)


@njit(cache=True, nogil=True)
def _decode_q4_k(row, o, w):
    d = load_half(row, o + _Q4_K_D)
    dmin = load_half(row, o + _Q4_K_DMIN)
    for j in range(4):
        sc1, m1 = _k_scale_min(row, o + _Q4_K_SCALES, 2 * j)
        sc2, m2 = _k_scale_min(row, o + _Q4_K_SCALES, 2 * j + 1)
        d1 = d * np.float32(sc1)
        d2 = d * np.float32(sc2)
        min1 = dmin * np.float32(m1)
        min2 = dmin * np.float32(m2)
        qs = row[o + _Q4_K_QS + 32 * j : o + _Q4_K_QS + 32 + 32 * j]
        low = w[64 * j : 64 * j + 32]
        high = w[64 * j + 32 : 64 * j + 64]
        for l in range(32):
            low[l] = d1 * np.float32(qs[l] & 0xF) - min1
            high[l] = d2 * np.float32(qs[l] >> 4) - min2


@njit(cache=True, nogil=True)
def _decode_q5_k(row, o, w):
    d = load_half(row, o + _Q5_K_D)
    dmin = load_half(row, o + _Q5_K_DMIN)
    for j in range(4):
        sc1, m1 = _k_scale_min(row, o + _Q5_K_SCALES, 2 * j)
        sc2, m2 = _k_scale_min(row, o + _Q5_K_SCALES, 2 * j + 1)
        d1 = d * np.float32(sc1)
        d2 = d * np.float32(sc2)
        min1 = dmin * np.float32(m1)
        min2 = dmin * np.float32(m2)
        for l in range(32):
            v = row[o + _Q5_K_QS + 32 * j + l]
            hbits = row[o + _Q5_K_QH + l] >> (2 * j)
            w[64 * j + l] = d1 * np.float32((v & 0xF) | ((hbits & 1) << 4)) - min1
            w[64 * j + 32 + l] = d2 * np.float32((v >> 4) | ((hbits & 2) << 3)) - min2


@njit(cache=True, nogil=True)
def _decode_q6_k(row, o, w):
    # The 6-bit code is assembled in float32 (exact for these small integers) from masked
    # fields scaled by powers of two: integer shifts would not vectorize (see above).
    d = load_half(row, o + _Q6_K_D)
    for h in range(2):
        for g in range(2):
            s = o + _Q6_K_SCALES + 8 * h + g
            d1 = d * np.float32(np.int8(row[s]))
            d2 = d * np.float32(np.int8(row[s + 2]))
            d3 = d * np.float32(np.int8(row[s + 4]))
            d4 = d * np.float32(np.int8(row[s + 6]))
            ql = o + _Q6_K_QL + 64 * h + 16 * g
            qh = o + _Q6_K_QH + 32 * h + 16 * g
            low = row[ql : ql + 16]
            high = row[ql + 32 : ql + 48]
            top = row[qh : qh + 16]
            p = 128 * h + 16 * g
            w1 = w[p : p + 16]
            w2 = w[p + 32 : p + 48]
            w3 = w[p + 64 : p + 80]
            w4 = w[p + 96 : p + 112]
            for l in range(16):
                a, b, t = low[l], high[l], top[l]
                w1[l] = d1 * (np.float32(a & 0xF) + np.float32(t & 3) * np.float32(16.0) - np.float32(32.0))
                w2[l] = d2 * (np.float32(b & 0xF) + np.float32(t & 12) * np.float32(4.0) - np.float32(32.0))
                w3[l] = d3 * (np.float32(a & 0xF0) * np.float32(0.0625) + np.float32(t & 48) - np.float32(32.0))
                w4[l] = d4 * (
                    np.float32(b & 0xF0) * np.float32(0.0625)
                    + np.float32(t & 192) * np.float32(0.25)
                    - np.float32(32.0)
                )


@njit(cache=True, nogil=True)
def _ternary_digit(byte, power_of_3):
    """Base-3 digit of a TQ1_0 byte minus 1: the byte is a fixed-point fraction of 3**5."""
    shifted = (np.int32(byte) * power_of_3) & 0xFF
    return np.float32(((shifted * 3) >> 8) - 1)


@njit(cache=True, nogil=True)
def _decode_tq1_0(row, o, w):
    d = load_half(row, o + _TQ1_0_D)
    power_of_3 = 1
    for n in range(5):
        for m in range(32):
            w[32 * n + m] = _ternary_digit(row[o + _TQ1_0_QS + m], power_of_3) * d
        for m in range(16):
            w[160 + 16 * n + m] = _ternary_digit(row[o + _TQ1_0_QS + 32 + m], power_of_3) * d
        if n < 4:
            for m in range(4):
                w[240 + 4 * n + m] = _ternary_digit(row[o + _TQ1_0_QH + m], power_of_3) * d
        power_of_3 *= 3


@njit(cache=True, nogil=True)
def _decode_tq2_0(row, o, w):
    d = load_half(row, o + _TQ2_0_D)
    for h in range(2):
        for j in range(4):
            for l in range(32):
                q = np.int32((row[o + _TQ2_0_QS + 32 * h + l] >> (2 * j)) & 3)
                w[128 * h + 32 * j + l] = np.float32(q - 1) * d


# Format-independent loop bodies. The format is a small integer rather than the decoder
# itself: Numba cannot cache a parallel function that passes a function object into its
# parallel loop. The branch is taken once per block, and always the same way.

_Q2_K, _Q3_K, _Q4_K, _Q5_K, _Q6_K, _TQ1_0, _TQ2_0 = range(7)
_BLOCK_BYTES = tuple(LAYOUTS[qtype].type_size for qtype in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.TQ1_0, Q.TQ2_0))


@njit(cache=True, nogil=True)
def _decode(kind, row, o, w):
    if kind == _Q2_K:
        _decode_q2_k(row, o, w)
    elif kind == _Q3_K:
        _decode_q3_k(row, o, w)
    elif kind == _Q4_K:
        _decode_q4_k(row, o, w)
    elif kind == _Q5_K:
        _decode_q5_k(row, o, w)
    elif kind == _Q6_K:
        _decode_q6_k(row, o, w)
    elif kind == _TQ1_0:
        _decode_tq1_0(row, o, w)
    else:
        _decode_tq2_0(row, o, w)


@njit(cache=True, nogil=True)
def _dequantize_row(row, target, kind):
    block_bytes = _BLOCK_BYTES[kind]
    for k in range(row.shape[0] // block_bytes):
        _decode(kind, row, k * block_bytes, target[k * QK_K : (k + 1) * QK_K])


@njit(cache=True, nogil=True)
def _matvec_chunk(raw, x, out, chunk, kind):
    """Rows of one ROW_CHUNK through a decoded block in L1 (formats without a dedicated matvec)."""
    block_bytes = _BLOCK_BYTES[kind]
    n_blocks = raw.shape[1] // block_bytes
    w = np.empty(QK_K, dtype=np.float32)
    lanes = numba.carray(stack_pointer(32), 32)
    for r in range(chunk * ROW_CHUNK, min(raw.shape[0], (chunk + 1) * ROW_CHUNK)):
        row = raw[r]
        for l in range(32):
            lanes[l] = 0.0
        for k in range(n_blocks):
            _decode(kind, row, k * block_bytes, w)
            xo = k * QK_K
            for m in range(QK_K // 32):
                for l in range(32):
                    lanes[l] += w[32 * m + l] * x[xo + 32 * m + l]
        total = np.float32(0.0)
        for l in range(32):
            total += lanes[l]
        out[r] = total


@njit(cache=True, nogil=True, fastmath=_FAST)
def _matmul_tile(raw, X, out, tile, kind):
    """out[:, rows of tile] for all activation rows, each weight block decoded once."""
    r0 = tile * ROW_TILE
    tile_rows = min(ROW_TILE, raw.shape[0] - r0)
    block_bytes = _BLOCK_BYTES[kind]
    n_blocks = raw.shape[1] // block_bytes
    n = X.shape[0]
    # Rows past the end of the matrix stay zero, so the unrolled loop below is safe.
    w = np.zeros((ROW_TILE, QK_K), dtype=np.float32)
    acc = np.zeros((n, ROW_TILE), dtype=np.float32)
    w0 = w[0]
    w1 = w[1]
    w2 = w[2]
    w3 = w[3]
    for k in range(n_blocks):
        for rr in range(tile_rows):
            _decode(kind, raw[r0 + rr], k * block_bytes, w[rr])
        xo = k * QK_K
        # Two activation rows at a time: six loads feed eight FMAs.
        for i in range(0, n - 1, 2):
            xa = X[i, xo : xo + QK_K]
            xb = X[i + 1, xo : xo + QK_K]
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            b0 = np.float32(0.0)
            b1 = np.float32(0.0)
            b2 = np.float32(0.0)
            b3 = np.float32(0.0)
            for l in range(QK_K):
                u = xa[l]
                v = xb[l]
                a0 += w0[l] * u
                a1 += w1[l] * u
                a2 += w2[l] * u
                a3 += w3[l] * u
                b0 += w0[l] * v
                b1 += w1[l] * v
                b2 += w2[l] * v
                b3 += w3[l] * v
            acc[i, 0] += a0
            acc[i, 1] += a1
            acc[i, 2] += a2
            acc[i, 3] += a3
            acc[i + 1, 0] += b0
            acc[i + 1, 1] += b1
            acc[i + 1, 2] += b2
            acc[i + 1, 3] += b3
        if n % 2:
            xa = X[n - 1, xo : xo + QK_K]
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for l in range(QK_K):
                u = xa[l]
                a0 += w0[l] * u
                a1 += w1[l] * u
                a2 += w2[l] * u
                a3 += w3[l] * u
            acc[n - 1, 0] += a0
            acc[n - 1, 1] += a1
            acc[n - 1, 2] += a2
            acc[n - 1, 3] += a3
    for i in range(n):
        for rr in range(tile_rows):
            out[i, r0 + rr] = acc[i, rr]


@njit(cache=True, nogil=True)
def _sums(x, group):
    """Sums of consecutive groups of `group` activations (for mins and constant offsets)."""
    sums = np.empty(x.shape[0] // group, dtype=np.float32)
    for g in range(sums.shape[0]):
        s = np.float32(0.0)
        for l in range(group):
            s += x[g * group + l]
        sums[g] = s
    return sums


# Dedicated matvec kernels for the formats that dominate real models.


@njit(nogil=True, inline="always")
def _q4_k_scales_mins(row, o, scales, mins):
    """The 6-bit scales and mins of the 8 sub-blocks of the Q4_K/Q5_K block at row[o:]."""
    for j in range(4):
        low_scale, low_min, high_scale, high_min = _k_scales_mins(
            np.int32(row[o + _Q4_K_SCALES + j]),
            np.int32(row[o + _Q4_K_SCALES + 4 + j]),
            np.int32(row[o + _Q4_K_SCALES + 8 + j]),
        )
        scales[j] = np.float32(low_scale)
        mins[j] = np.float32(low_min)
        scales[j + 4] = np.float32(high_scale)
        mins[j + 4] = np.float32(high_min)


@njit(cache=True, nogil=True, parallel=True, fastmath=_CONTRACT)
def matvec_q4_k(raw, x, out):
    rows = raw.shape[0]
    row_bytes = raw.shape[1]
    n_blocks = row_bytes // _Q4_K_BYTES
    sums32 = _sums(x, 32)
    for chunk in prange((rows + ROW_CHUNK - 1) // ROW_CHUNK):
        scales = numba.carray(stack_pointer(8), 8)
        mins = numba.carray(stack_pointer(8), 8)
        lanes = numba.carray(stack_pointer(32), 32)
        # Raw pointers: plain loads without the negative-index fix-up of array indexing.
        p = data_pointer(raw)
        xp = data_pointer(x)
        for r in range(chunk * ROW_CHUNK, min(rows, (chunk + 1) * ROW_CHUNK)):
            for l in range(32):
                lanes[l] = 0.0
            shifted = np.float32(0.0)
            for k in range(n_blocks):
                o = r * row_bytes + k * _Q4_K_BYTES
                _q4_k_scales_mins(p, o, scales, mins)
                d = load_half(p, o + _Q4_K_D)
                block_shift = np.float32(0.0)
                for j in range(8):
                    block_shift += mins[j] * sums32[8 * k + j]
                shifted += load_half(p, o + _Q4_K_DMIN) * block_shift
                for j in range(4):
                    qo = o + _Q4_K_QS + 32 * j
                    xo = k * QK_K + 64 * j
                    f_low = d * scales[2 * j]
                    f_high = d * scales[2 * j + 1] * np.float32(1 / 16)
                    for l in range(32):
                        v = p[qo + l]
                        lanes[l] += (np.float32(v & 0xF) * f_low) * xp[xo + l] + (np.float32(v & 0xF0) * f_high) * xp[
                            xo + 32 + l
                        ]
            total = np.float32(0.0)
            for l in range(32):
                total += lanes[l]
            out[r] = total - shifted


# Q6_K scale i (i = 8 * half + 2 * quarter + group) weighs its quarter's low-nibble field by
# 1 (quarters 0, 1) or 1/16 (quarters 2, 3: nibble masked in place, 16 times its value) and its
# two high bits, masked in place, by 16, 4, 1 and 1/4 (fields at bits 0, 2, 4, 6, all worth 16).
_Q6_LOW_FACTOR = np.array([(1.0, 1.0, 1 / 16, 1 / 16)[(i >> 1) & 3] for i in range(16)], dtype=np.float32)
_Q6_HIGH_FACTOR = np.array([(16.0, 4.0, 1.0, 1 / 4)[(i >> 1) & 3] for i in range(16)], dtype=np.float32)


@njit(cache=True, nogil=True, parallel=True, fastmath=_CONTRACT)
def matvec_q6_k(raw, x, out):
    rows = raw.shape[0]
    row_bytes = raw.shape[1]
    n_blocks = row_bytes // _Q6_K_BYTES
    sums16 = _sums(x, 16)
    for chunk in prange((rows + ROW_CHUNK - 1) // ROW_CHUNK):
        # Per block: low[i], high[i] = d * scale i * its two field factors above.
        low = numba.carray(stack_pointer(16), 16)
        high = numba.carray(stack_pointer(16), 16)
        # lanes[8 * quarter + l]: the products, one independent 8-lane set per quarter;
        # lanes[32 + i]: d * scale i * (sum of its 16 x), for the offset of 32 of every code.
        lanes = numba.carray(stack_pointer(48), 48)
        p = data_pointer(raw)
        xp = data_pointer(x)
        sp = data_pointer(sums16)
        for r in range(chunk * ROW_CHUNK, min(rows, (chunk + 1) * ROW_CHUNK)):
            for l in range(48):
                lanes[l] = 0.0
            for k in range(n_blocks):
                o = r * row_bytes + k * _Q6_K_BYTES
                d = load_half(p, o + _Q6_K_D)
                for i in range(16):
                    s = d * np.float32(np.int8(p[o + _Q6_K_SCALES + i]))
                    low[i] = s * _Q6_LOW_FACTOR[i]
                    high[i] = s * _Q6_HIGH_FACTOR[i]
                    lanes[32 + i] += s * sp[16 * k + i]
                for h in range(2):
                    ql = o + _Q6_K_QL + 64 * h
                    qh = o + _Q6_K_QH + 32 * h
                    xo = k * QK_K + 128 * h
                    for g in range(2):
                        i = 8 * h + g
                        f1 = low[i]
                        f2 = low[i + 2]
                        f3 = low[i + 4]
                        f4 = low[i + 6]
                        e1 = high[i]
                        e2 = high[i + 2]
                        e3 = high[i + 4]
                        e4 = high[i + 6]
                        for half in range(2):
                            b0 = 16 * g + 8 * half
                            for l in range(8):
                                a = p[ql + b0 + l]
                                b = p[ql + 32 + b0 + l]
                                hb = p[qh + b0 + l]
                                lanes[l] += (np.float32(a & 0xF) * f1 + np.float32(hb & 3) * e1) * xp[xo + b0 + l]
                                lanes[8 + l] += (np.float32(b & 0xF) * f2 + np.float32(hb & 12) * e2) * xp[
                                    xo + 32 + b0 + l
                                ]
                                lanes[16 + l] += (np.float32(a & 0xF0) * f3 + np.float32(hb & 48) * e3) * xp[
                                    xo + 64 + b0 + l
                                ]
                                lanes[24 + l] += (np.float32(b & 0xF0) * f4 + np.float32(hb & 192) * e4) * xp[
                                    xo + 96 + b0 + l
                                ]
            total = np.float32(0.0)
            for l in range(8):
                total += (lanes[l] + lanes[8 + l]) + (lanes[16 + l] + lanes[24 + l])
            shifted = np.float32(0.0)
            for i in range(16):
                shifted += lanes[32 + i]
            out[r] = total - 32 * shifted


@njit(cache=True, nogil=True, parallel=True)
def matvec_tq2_0(raw, x, out):
    rows = raw.shape[0]
    n_blocks = raw.shape[1] // _TQ2_0_BYTES
    sums = _sums(x, QK_K)
    for chunk in prange((rows + ROW_CHUNK - 1) // ROW_CHUNK):
        lanes = numba.carray(stack_pointer(32), 32)
        for r in range(chunk * ROW_CHUNK, min(rows, (chunk + 1) * ROW_CHUNK)):
            row = raw[r]
            for l in range(32):
                lanes[l] = 0.0
            shifted = np.float32(0.0)
            for k in range(n_blocks):
                o = k * _TQ2_0_BYTES
                d = load_half(row, o + _TQ2_0_D)
                # (q - 1) summed against x is (sum of q*x) - (sum of x).
                shifted += d * sums[k]
                d1 = d * np.float32(1 / 4)
                d2 = d * np.float32(1 / 16)
                d3 = d * np.float32(1 / 64)
                for h in range(2):
                    xo = k * QK_K + 128 * h
                    for l in range(32):
                        v = row[o + _TQ2_0_QS + 32 * h + l]
                        lanes[l] += (
                            (np.float32(v & 3) * d) * x[xo + l]
                            + (np.float32(v & 12) * d1) * x[xo + 32 + l]
                            + (np.float32(v & 48) * d2) * x[xo + 64 + l]
                            + (np.float32(v & 192) * d3) * x[xo + 96 + l]
                        )
            total = np.float32(0.0)
            for l in range(32):
                total += lanes[l]
            out[r] = total - shifted


# Per-format entry points with the kernel convention's signatures. The prange index is cast to
# int64: Numba types it int64 before parfor conversion and uint64 after, and would compile each
# callee twice.


@njit(cache=True, nogil=True, parallel=True)
def matvec_q2_k(raw, x, out):
    for chunk in prange((raw.shape[0] + ROW_CHUNK - 1) // ROW_CHUNK):
        _matvec_chunk(raw, x, out, np.int64(chunk), _Q2_K)


@njit(cache=True, nogil=True, parallel=True)
def matvec_q3_k(raw, x, out):
    for chunk in prange((raw.shape[0] + ROW_CHUNK - 1) // ROW_CHUNK):
        _matvec_chunk(raw, x, out, np.int64(chunk), _Q3_K)


@njit(cache=True, nogil=True, parallel=True)
def matvec_q5_k(raw, x, out):
    for chunk in prange((raw.shape[0] + ROW_CHUNK - 1) // ROW_CHUNK):
        _matvec_chunk(raw, x, out, np.int64(chunk), _Q5_K)


@njit(cache=True, nogil=True, parallel=True)
def matvec_tq1_0(raw, x, out):
    for chunk in prange((raw.shape[0] + ROW_CHUNK - 1) // ROW_CHUNK):
        _matvec_chunk(raw, x, out, np.int64(chunk), _TQ1_0)


@njit(cache=True, nogil=True, parallel=True)
def matmul_q2_k(raw, X, out):
    for tile in prange((raw.shape[0] + ROW_TILE - 1) // ROW_TILE):
        _matmul_tile(raw, X, out, np.int64(tile), _Q2_K)


@njit(cache=True, nogil=True, parallel=True)
def matmul_q3_k(raw, X, out):
    for tile in prange((raw.shape[0] + ROW_TILE - 1) // ROW_TILE):
        _matmul_tile(raw, X, out, np.int64(tile), _Q3_K)


@njit(cache=True, nogil=True, parallel=True)
def matmul_q4_k(raw, X, out):
    for tile in prange((raw.shape[0] + ROW_TILE - 1) // ROW_TILE):
        _matmul_tile(raw, X, out, np.int64(tile), _Q4_K)


@njit(cache=True, nogil=True, parallel=True)
def matmul_q5_k(raw, X, out):
    for tile in prange((raw.shape[0] + ROW_TILE - 1) // ROW_TILE):
        _matmul_tile(raw, X, out, np.int64(tile), _Q5_K)


@njit(cache=True, nogil=True, parallel=True)
def matmul_q6_k(raw, X, out):
    for tile in prange((raw.shape[0] + ROW_TILE - 1) // ROW_TILE):
        _matmul_tile(raw, X, out, np.int64(tile), _Q6_K)


@njit(cache=True, nogil=True, parallel=True)
def matmul_tq1_0(raw, X, out):
    for tile in prange((raw.shape[0] + ROW_TILE - 1) // ROW_TILE):
        _matmul_tile(raw, X, out, np.int64(tile), _TQ1_0)


@njit(cache=True, nogil=True, parallel=True)
def matmul_tq2_0(raw, X, out):
    for tile in prange((raw.shape[0] + ROW_TILE - 1) // ROW_TILE):
        _matmul_tile(raw, X, out, np.int64(tile), _TQ2_0)


@njit(cache=True, nogil=True)
def dequantize_rows_q2_k(raw, row_ids, out):
    for i in range(row_ids.shape[0]):
        _dequantize_row(raw[row_ids[i]], out[i], _Q2_K)


@njit(cache=True, nogil=True)
def dequantize_rows_q3_k(raw, row_ids, out):
    for i in range(row_ids.shape[0]):
        _dequantize_row(raw[row_ids[i]], out[i], _Q3_K)


@njit(cache=True, nogil=True)
def dequantize_rows_q4_k(raw, row_ids, out):
    for i in range(row_ids.shape[0]):
        _dequantize_row(raw[row_ids[i]], out[i], _Q4_K)


@njit(cache=True, nogil=True)
def dequantize_rows_q5_k(raw, row_ids, out):
    for i in range(row_ids.shape[0]):
        _dequantize_row(raw[row_ids[i]], out[i], _Q5_K)


@njit(cache=True, nogil=True)
def dequantize_rows_q6_k(raw, row_ids, out):
    for i in range(row_ids.shape[0]):
        _dequantize_row(raw[row_ids[i]], out[i], _Q6_K)


@njit(cache=True, nogil=True)
def dequantize_rows_tq1_0(raw, row_ids, out):
    for i in range(row_ids.shape[0]):
        _dequantize_row(raw[row_ids[i]], out[i], _TQ1_0)


@njit(cache=True, nogil=True)
def dequantize_rows_tq2_0(raw, row_ids, out):
    for i in range(row_ids.shape[0]):
        _dequantize_row(raw[row_ids[i]], out[i], _TQ2_0)


KERNELS = {
    Q.Q2_K: (matvec_q2_k, matmul_q2_k, dequantize_rows_q2_k),
    Q.Q3_K: (matvec_q3_k, matmul_q3_k, dequantize_rows_q3_k),
    Q.Q4_K: (matvec_q4_k, matmul_q4_k, dequantize_rows_q4_k),
    Q.Q5_K: (matvec_q5_k, matmul_q5_k, dequantize_rows_q5_k),
    Q.Q6_K: (matvec_q6_k, matmul_q6_k, dequantize_rows_q6_k),
    Q.TQ1_0: (matvec_tq1_0, matmul_tq1_0, dequantize_rows_tq1_0),
    Q.TQ2_0: (matvec_tq2_0, matmul_tq2_0, dequantize_rows_tq2_0),
}
