"""Products for the 256-weight super-block formats Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, TQ1_0, TQ2_0.

Kernel convention: see products.py. Block layouts: localllm/formats/quants.py (from ggml's
ggml-common.h and dequantize_row_* in ggml-quants.c).

* `dequantize_rows` repeats ggml's float32 operations in ggml's order (no fast-math), so it
  is bit-exact with `gguf.quants.dequantize`: it is the embedding lookup.
* `matvec` (decoding) streams every weight once and must keep up with memory bandwidth, so
  it never materializes weights: the integer codes are converted to float32 and multiplied
  with the float32 activations directly, and the per-sub-block scale, min and offset are
  applied once per sub-block (mins and constant offsets through precomputed activation sums).
  Numba widens integer arithmetic to 64 bits; LLVM narrows masks back to 32-bit vector lanes
  but not shifts (or masks merged with shifts), which fall back to 4-lane int64 code. So upper
  bit fields are masked in place (`v & 0xF0`), never shifted, and their power of two is folded
  into a float scale. Q6_K's two high bits therefore go through their own float product instead
  of being or-ed into the code (measured 1.5x). Q4_K's and Q6_K's scales are decoded branch-free
  once per block into a stack buffer (`_stack_pointer`: a Numba-allocated array would make LLVM
  guard every vectorized loop with aliasing checks). Every matvec accumulates 16/32-lane partial
  sums over the whole row (scale folded into each product) instead of reducing a vector to a
  scalar per sub-block, which cost more than the products on these short sub-blocks. Independent
  lanes vectorize without fast-math, and matvec is compiled without it on purpose: with
  reassociation allowed, LLVM vectorized the reductions differently in a process that compiled
  the kernels than in one that loaded them from Numba's cache, and greedy decoding then
  depended on whether it was the first run after installing.
  The kernels multiply float32 activations; products.py first rounds them to 8 bits the way
  llama.cpp does (activations.py). Integer SIMD products would be faster, but Numba cannot
  express 8/16-bit SIMD products (its integers are 64-bit lanes).
* `matmul` (prefill, speculative verification) decodes a tile of `ROW_TILE` weight rows one
  block at a time into a small float32 buffer that stays in L1, then reuses each decoded block
  for every activation row. Dequantizing row tiles for NumPy's BLAS measured 1.4x faster on one
  thread at n=128, but 2.4x slower on two: OpenBLAS's threads and Numba's OpenMP threads spin
  against each other on a two-core machine, and with OpenBLAS held to one thread it only ties.
"""

import numba
import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from localllm.kernels.cpu.floats import half_to_float, load_half

QK_K = 256
ROW_TILE = 4
# Rows per parallel work item of matvec: big enough to amortize scheduling and scratch
# allocation, small enough to balance across cores on the 256-row projections.
ROW_CHUNK = 16
# Reassociation lets LLVM vectorize the float reductions; contraction lets it use FMA.
_FAST = {"reassoc", "contract", "nsz"}

Q = GGMLQuantizationType


@intrinsic
def _stack_pointer(typingctx, size):
    """Pointer to `size` (a compile-time constant) float32 values in the caller's stack frame."""
    if not isinstance(size, types.IntegerLiteral):
        return None
    count = size.literal_value

    def codegen(context, builder, signature, args):
        # alloca_once puts the buffer in the entry block, so a call inside a loop reuses it.
        return cgutils.alloca_once(builder, context.get_value_type(types.float32), size=count)

    return types.CPointer(types.float32)(size), codegen


@njit(nogil=True, inline="always")
def _half(row, offset):
    return half_to_float(np.uint16(row[offset]) | (np.uint16(row[offset + 1]) << np.uint16(8)))


# Block decoders: exact dequantization of one block at row[o:] into w[0:256].


@njit(cache=True, nogil=True)
def _k_scale_min(row, o, j):
    """6-bit scale and min of sub-block j (0..7) from the 12 packed bytes at row[o:]."""
    if j < 4:
        return row[o + j] & 63, row[o + j + 4] & 63
    scale = (row[o + j + 4] & 0xF) | ((row[o + j - 4] >> 6) << 4)
    minimum = (row[o + j + 4] >> 4) | ((row[o + j] >> 6) << 4)
    return scale, minimum


@njit(cache=True, nogil=True)
def _q3_k_scale(row, o, i):
    """Signed 6-bit scale i (0..15) from the 12 packed bytes at row[o:]."""
    low = (row[o + (i & 7)] >> (4 * (i >> 3))) & 0xF
    high = (row[o + 8 + (i & 3)] >> (2 * (i >> 2))) & 3
    return np.int32(low | (high << 4)) - 32


@njit(cache=True, nogil=True)
def _decode_q2_k(row, o, w):
    d = load_half(row, o + 80)
    dmin = load_half(row, o + 82)
    for h in range(2):
        for j in range(4):
            for half in range(2):
                packed = row[o + 8 * h + 2 * j + half]
                dl = d * np.float32(packed & 0xF)
                ml = dmin * np.float32(packed >> 4)
                base = o + 16 + 32 * h + 16 * half
                p = 128 * h + 32 * j + 16 * half
                for l in range(16):
                    w[p + l] = dl * np.float32((row[base + l] >> (2 * j)) & 3) - ml


@njit(cache=True, nogil=True)
def _decode_q3_k(row, o, w):
    d = load_half(row, o + 108)
    for h in range(2):
        for j in range(4):
            bit = 4 * h + j
            for half in range(2):
                dl = d * np.float32(_q3_k_scale(row, o + 96, 8 * h + 2 * j + half))
                p = 128 * h + 32 * j + 16 * half
                for l in range(16 * half, 16 * half + 16):
                    low = np.int32((row[o + 32 + 32 * h + l] >> (2 * j)) & 3)
                    high = np.int32((row[o + l] >> bit) & 1)
                    w[p + l - 16 * half] = dl * np.float32(low - 4 + 4 * high)


@njit(cache=True, nogil=True)
def _decode_q4_k(row, o, w):
    d = load_half(row, o)
    dmin = load_half(row, o + 2)
    for j in range(4):
        sc1, m1 = _k_scale_min(row, o + 4, 2 * j)
        sc2, m2 = _k_scale_min(row, o + 4, 2 * j + 1)
        d1 = d * np.float32(sc1)
        d2 = d * np.float32(sc2)
        min1 = dmin * np.float32(m1)
        min2 = dmin * np.float32(m2)
        for l in range(32):
            v = row[o + 16 + 32 * j + l]
            w[64 * j + l] = d1 * np.float32(v & 0xF) - min1
            w[64 * j + 32 + l] = d2 * np.float32(v >> 4) - min2


@njit(cache=True, nogil=True)
def _decode_q5_k(row, o, w):
    d = load_half(row, o)
    dmin = load_half(row, o + 2)
    for j in range(4):
        sc1, m1 = _k_scale_min(row, o + 4, 2 * j)
        sc2, m2 = _k_scale_min(row, o + 4, 2 * j + 1)
        d1 = d * np.float32(sc1)
        d2 = d * np.float32(sc2)
        min1 = dmin * np.float32(m1)
        min2 = dmin * np.float32(m2)
        for l in range(32):
            v = row[o + 48 + 32 * j + l]
            hbits = row[o + 16 + l] >> (2 * j)
            w[64 * j + l] = d1 * np.float32((v & 0xF) | ((hbits & 1) << 4)) - min1
            w[64 * j + 32 + l] = d2 * np.float32((v >> 4) | ((hbits & 2) << 3)) - min2


@njit(cache=True, nogil=True)
def _decode_q6_k(row, o, w):
    d = load_half(row, o + 208)
    for h in range(2):
        ql = o + 64 * h
        qh = o + 128 + 32 * h
        for g in range(2):
            s = o + 192 + 8 * h + g
            d1 = d * np.float32(np.int8(row[s]))
            d2 = d * np.float32(np.int8(row[s + 2]))
            d3 = d * np.float32(np.int8(row[s + 4]))
            d4 = d * np.float32(np.int8(row[s + 6]))
            for l in range(16 * g, 16 * g + 16):
                a = np.int32(row[ql + l])
                b = np.int32(row[ql + 32 + l])
                hb = np.int32(row[qh + l])
                p = 128 * h + l
                w[p] = d1 * np.float32(((a & 0xF) | ((hb & 3) << 4)) - 32)
                w[p + 32] = d2 * np.float32(((b & 0xF) | (((hb >> 2) & 3) << 4)) - 32)
                w[p + 64] = d3 * np.float32(((a >> 4) | (((hb >> 4) & 3) << 4)) - 32)
                w[p + 96] = d4 * np.float32(((b >> 4) | (((hb >> 6) & 3) << 4)) - 32)


@njit(cache=True, nogil=True)
def _ternary_digit(byte, power_of_3):
    """Base-3 digit of a TQ1_0 byte minus 1: the byte is a fixed-point fraction of 3**5."""
    shifted = (np.int32(byte) * power_of_3) & 0xFF
    return np.float32(((shifted * 3) >> 8) - 1)


@njit(cache=True, nogil=True)
def _decode_tq1_0(row, o, w):
    d = load_half(row, o + 52)
    power_of_3 = 1
    for n in range(5):
        for m in range(32):
            w[32 * n + m] = _ternary_digit(row[o + m], power_of_3) * d
        for m in range(16):
            w[160 + 16 * n + m] = _ternary_digit(row[o + 32 + m], power_of_3) * d
        if n < 4:
            for m in range(4):
                w[240 + 4 * n + m] = _ternary_digit(row[o + 48 + m], power_of_3) * d
        power_of_3 *= 3


@njit(cache=True, nogil=True)
def _decode_tq2_0(row, o, w):
    d = load_half(row, o + 64)
    for h in range(2):
        for j in range(4):
            for l in range(32):
                q = np.int32((row[o + 32 * h + l] >> (2 * j)) & 3)
                w[128 * h + 32 * j + l] = np.float32(q - 1) * d


# Format-independent loop bodies. The format is a small integer rather than the decoder
# itself: Numba cannot cache a parallel function that passes a function object into its
# parallel loop. The branch is taken once per block, and always the same way.

_Q2_K, _Q3_K, _Q4_K, _Q5_K, _Q6_K, _TQ1_0, _TQ2_0 = range(7)
_BLOCK_BYTES = (84, 110, 144, 176, 210, 54, 66)


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
        _decode(kind, row, k * block_bytes, target[k * QK_K:(k + 1) * QK_K])


@njit(cache=True, nogil=True)
def _matvec_chunk(raw, x, out, chunk, kind):
    """Rows of one ROW_CHUNK through a decoded block in L1 (formats without a dedicated matvec)."""
    block_bytes = _BLOCK_BYTES[kind]
    n_blocks = raw.shape[1] // block_bytes
    w = np.empty(QK_K, dtype=np.float32)
    lanes = numba.carray(_stack_pointer(32), 32)
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
            xa = X[i, xo:xo + QK_K]
            xb = X[i + 1, xo:xo + QK_K]
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
            xa = X[n - 1, xo:xo + QK_K]
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
        low_scale = np.int32(row[o + 4 + j])
        low_min = np.int32(row[o + 8 + j])
        high = np.int32(row[o + 12 + j])
        scales[j] = np.float32(low_scale & 63)
        mins[j] = np.float32(low_min & 63)
        scales[j + 4] = np.float32((high & 0xF) | ((low_scale & 0xC0) >> 2))
        mins[j + 4] = np.float32((high >> 4) | ((low_min & 0xC0) >> 2))


@njit(cache=True, nogil=True, parallel=True)
def matvec_q4_k(raw, x, out):
    rows = raw.shape[0]
    n_blocks = raw.shape[1] // 144
    sums32 = _sums(x, 32)
    for chunk in prange((rows + ROW_CHUNK - 1) // ROW_CHUNK):
        scales = numba.carray(_stack_pointer(8), 8)
        mins = numba.carray(_stack_pointer(8), 8)
        lanes = numba.carray(_stack_pointer(32), 32)
        for r in range(chunk * ROW_CHUNK, min(rows, (chunk + 1) * ROW_CHUNK)):
            row = raw[r]
            for l in range(32):
                lanes[l] = 0.0
            shifted = np.float32(0.0)
            for k in range(n_blocks):
                o = k * 144
                _q4_k_scales_mins(row, o, scales, mins)
                d = _half(row, o)
                block_shift = np.float32(0.0)
                for j in range(8):
                    block_shift += mins[j] * sums32[8 * k + j]
                shifted += _half(row, o + 2) * block_shift
                for j in range(4):
                    qo = o + 16 + 32 * j
                    xo = k * QK_K + 64 * j
                    f_low = d * scales[2 * j]
                    f_high = d * scales[2 * j + 1] * np.float32(1 / 16)
                    for l in range(32):
                        v = row[qo + l]
                        lanes[l] += (np.float32(v & 0xF) * f_low) * x[xo + l] + (
                            np.float32(v & 0xF0) * f_high) * x[xo + 32 + l]
            total = np.float32(0.0)
            for l in range(32):
                total += lanes[l]
            out[r] = total - shifted


@njit(cache=True, nogil=True, parallel=True)
def matvec_q6_k(raw, x, out):
    rows = raw.shape[0]
    n_blocks = raw.shape[1] // 210
    sums16 = _sums(x, 16)
    for chunk in prange((rows + ROW_CHUNK - 1) // ROW_CHUNK):
        # scales[i] = d * scale i; scales[16 + i] = 16 * that, the weight of the two high bits.
        scales = numba.carray(_stack_pointer(32), 32)
        lanes = numba.carray(_stack_pointer(16), 16)
        for r in range(chunk * ROW_CHUNK, min(rows, (chunk + 1) * ROW_CHUNK)):
            row = raw[r]
            for l in range(16):
                lanes[l] = 0.0
            shifted = np.float32(0.0)
            for k in range(n_blocks):
                o = k * 210
                d = _half(row, o + 208)
                for i in range(16):
                    scales[i] = d * np.float32(np.int8(row[o + 192 + i]))
                    scales[16 + i] = scales[i] * np.float32(16)
                for i in range(16):
                    shifted += scales[i] * sums16[16 * k + i]
                for h in range(2):
                    ql = o + 64 * h
                    qh = o + 128 + 32 * h
                    xo = k * QK_K + 128 * h
                    for g in range(2):
                        i = 8 * h + g
                        # Each 6-bit code q = low nibble + 16 * (2 high bits); the fields are
                        # masked in place, their powers of two folded into these scales.
                        f1 = scales[i]
                        f2 = scales[i + 2]
                        f3 = scales[i + 4] * np.float32(1 / 16)
                        f4 = scales[i + 6] * np.float32(1 / 16)
                        e1 = scales[16 + i]
                        e2 = scales[18 + i] * np.float32(1 / 4)
                        e3 = scales[20 + i] * np.float32(1 / 16)
                        e4 = scales[22 + i] * np.float32(1 / 64)
                        b0 = 16 * g
                        for l in range(16):
                            a = row[ql + b0 + l]
                            b = row[ql + 32 + b0 + l]
                            hb = row[qh + b0 + l]
                            x1 = x[xo + b0 + l]
                            x2 = x[xo + 32 + b0 + l]
                            x3 = x[xo + 64 + b0 + l]
                            x4 = x[xo + 96 + b0 + l]
                            lanes[l] += ((np.float32(a & 0xF) * f1) * x1 + (np.float32(hb & 3) * e1) * x1
                                         + (np.float32(b & 0xF) * f2) * x2 + (np.float32(hb & 12) * e2) * x2
                                         + (np.float32(a & 0xF0) * f3) * x3 + (np.float32(hb & 48) * e3) * x3
                                         + (np.float32(b & 0xF0) * f4) * x4 + (np.float32(hb & 192) * e4) * x4)
            total = np.float32(0.0)
            for l in range(16):
                total += lanes[l]
            # The codes are stored offset by 32: subtract 32 * scale * (sum of x) per sub-block.
            out[r] = total - 32 * shifted


@njit(cache=True, nogil=True, parallel=True)
def matvec_tq2_0(raw, x, out):
    rows = raw.shape[0]
    n_blocks = raw.shape[1] // 66
    sums = _sums(x, QK_K)
    for chunk in prange((rows + ROW_CHUNK - 1) // ROW_CHUNK):
        lanes = numba.carray(_stack_pointer(32), 32)
        for r in range(chunk * ROW_CHUNK, min(rows, (chunk + 1) * ROW_CHUNK)):
            row = raw[r]
            for l in range(32):
                lanes[l] = 0.0
            shifted = np.float32(0.0)
            for k in range(n_blocks):
                o = k * 66
                d = _half(row, o + 64)
                # (q - 1) summed against x is (sum of q*x) - (sum of x).
                shifted += d * sums[k]
                d1 = d * np.float32(1 / 4)
                d2 = d * np.float32(1 / 16)
                d3 = d * np.float32(1 / 64)
                for h in range(2):
                    xo = k * QK_K + 128 * h
                    for l in range(32):
                        v = row[o + 32 * h + l]
                        lanes[l] += ((np.float32(v & 3) * d) * x[xo + l]
                                     + (np.float32(v & 12) * d1) * x[xo + 32 + l]
                                     + (np.float32(v & 48) * d2) * x[xo + 64 + l]
                                     + (np.float32(v & 192) * d3) * x[xo + 96 + l])
            total = np.float32(0.0)
            for l in range(32):
                total += lanes[l]
            out[r] = total - shifted


# Per-format entry points with the kernel convention's signatures.


@njit(cache=True, nogil=True, parallel=True)
def matvec_q2_k(raw, x, out):
    for chunk in prange((raw.shape[0] + ROW_CHUNK - 1) // ROW_CHUNK):
        _matvec_chunk(raw, x, out, chunk, _Q2_K)


@njit(cache=True, nogil=True, parallel=True)
def matvec_q3_k(raw, x, out):
    for chunk in prange((raw.shape[0] + ROW_CHUNK - 1) // ROW_CHUNK):
        _matvec_chunk(raw, x, out, chunk, _Q3_K)


@njit(cache=True, nogil=True, parallel=True)
def matvec_q5_k(raw, x, out):
    for chunk in prange((raw.shape[0] + ROW_CHUNK - 1) // ROW_CHUNK):
        _matvec_chunk(raw, x, out, chunk, _Q5_K)


@njit(cache=True, nogil=True, parallel=True)
def matvec_tq1_0(raw, x, out):
    for chunk in prange((raw.shape[0] + ROW_CHUNK - 1) // ROW_CHUNK):
        _matvec_chunk(raw, x, out, chunk, _TQ1_0)


@njit(cache=True, nogil=True, parallel=True)
def matmul_q2_k(raw, X, out):
    for tile in prange((raw.shape[0] + ROW_TILE - 1) // ROW_TILE):
        _matmul_tile(raw, X, out, tile, _Q2_K)


@njit(cache=True, nogil=True, parallel=True)
def matmul_q3_k(raw, X, out):
    for tile in prange((raw.shape[0] + ROW_TILE - 1) // ROW_TILE):
        _matmul_tile(raw, X, out, tile, _Q3_K)


@njit(cache=True, nogil=True, parallel=True)
def matmul_q4_k(raw, X, out):
    for tile in prange((raw.shape[0] + ROW_TILE - 1) // ROW_TILE):
        _matmul_tile(raw, X, out, tile, _Q4_K)


@njit(cache=True, nogil=True, parallel=True)
def matmul_q5_k(raw, X, out):
    for tile in prange((raw.shape[0] + ROW_TILE - 1) // ROW_TILE):
        _matmul_tile(raw, X, out, tile, _Q5_K)


@njit(cache=True, nogil=True, parallel=True)
def matmul_q6_k(raw, X, out):
    for tile in prange((raw.shape[0] + ROW_TILE - 1) // ROW_TILE):
        _matmul_tile(raw, X, out, tile, _Q6_K)


@njit(cache=True, nogil=True, parallel=True)
def matmul_tq1_0(raw, X, out):
    for tile in prange((raw.shape[0] + ROW_TILE - 1) // ROW_TILE):
        _matmul_tile(raw, X, out, tile, _TQ1_0)


@njit(cache=True, nogil=True, parallel=True)
def matmul_tq2_0(raw, X, out):
    for tile in prange((raw.shape[0] + ROW_TILE - 1) // ROW_TILE):
        _matmul_tile(raw, X, out, tile, _TQ2_0)


@njit(cache=True, nogil=True, parallel=True)
def dequantize_rows_q2_k(raw, row_ids, out):
    for i in prange(row_ids.shape[0]):
        _dequantize_row(raw[row_ids[i]], out[i], _Q2_K)


@njit(cache=True, nogil=True, parallel=True)
def dequantize_rows_q3_k(raw, row_ids, out):
    for i in prange(row_ids.shape[0]):
        _dequantize_row(raw[row_ids[i]], out[i], _Q3_K)


@njit(cache=True, nogil=True, parallel=True)
def dequantize_rows_q4_k(raw, row_ids, out):
    for i in prange(row_ids.shape[0]):
        _dequantize_row(raw[row_ids[i]], out[i], _Q4_K)


@njit(cache=True, nogil=True, parallel=True)
def dequantize_rows_q5_k(raw, row_ids, out):
    for i in prange(row_ids.shape[0]):
        _dequantize_row(raw[row_ids[i]], out[i], _Q5_K)


@njit(cache=True, nogil=True, parallel=True)
def dequantize_rows_q6_k(raw, row_ids, out):
    for i in prange(row_ids.shape[0]):
        _dequantize_row(raw[row_ids[i]], out[i], _Q6_K)


@njit(cache=True, nogil=True, parallel=True)
def dequantize_rows_tq1_0(raw, row_ids, out):
    for i in prange(row_ids.shape[0]):
        _dequantize_row(raw[row_ids[i]], out[i], _TQ1_0)


@njit(cache=True, nogil=True, parallel=True)
def dequantize_rows_tq2_0(raw, row_ids, out):
    for i in prange(row_ids.shape[0]):
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
