"""Q4_K and Q6_K encoders: llama.cpp's reference quantizers without an importance matrix,
reproduced bit for bit in NumPy.

Source: ggml/src/ggml-quants.c of llama.cpp as vendored in llama-cpp-python 0.3.36, the code
`ggml_quantize_chunk` (and so llama-quantize) runs for these types when no importance matrix
is given: `quantize_q4_K` -> `quantize_row_q4_K_ref`, `quantize_q6_K` -> `quantize_row_q6_K_ref`.

Q4_K, per super-block of 256 values (eight sub-blocks of 32):
  1. Each sub-block gets a scale and a min from `make_qkx2_quants(32, nmax=15, rmin=-1,
     rdelta=0.1, nstep=20)` with weights ``sqrt(mean(x*x)) + |x|``: start from
     ``scale = (max - min) / 15`` (min clamped to <= 0), then for ``is = 0..20`` quantize
     with ``iscale = (-1 + 0.1*is + 15) / (max - min)``, fit scale and min by weighted least
     squares (scale alone when the fitted min would be positive) and keep the fit whose
     weighted squared error is smallest. A kept fit replaces `min`, which the later steps use.
  2. The eight scales and the eight negated mins are quantized to 6 bits against their
     maxima (``d = max_scale/63``, ``dmin = max_min/63`` as float16), packed as in
     `get_scale_min_k4`.
  3. Each value is requantized as ``nearest_int((x + dmin*m) / (d*sc))`` clamped to 0..15,
     except in a sub-block whose ``d*sc`` is zero, which keeps step 1's codes.
Q6_K, per super-block of 256 values (sixteen sub-blocks of 16):
  1. Each sub-block gets a signed scale from `make_qx_quants(16, nmax=32, rmse_type=1)`:
     ``iscale = -32 / x[argmax |x|]`` and the eighteen ``-(32 + 0.1*is) / max``
     (``is = -9..9``, not 0), codes clamped to -32..31, keeping the candidate that maximizes
     ``sumlx**2 / suml2`` with weights ``x*x`` (a later candidate only when strictly better).
  2. ``d = float16(max_scale / -128)`` for the scale of largest magnitude; the scales become
     int8 ``min(127, nearest_int(-128/max_scale * scale))``; a super-block whose scales are
     all below 1e-15 in magnitude is all zero bytes.
  3. Each value is requantized as ``nearest_int(x / (d*sc))`` clamped to -32..31, except in a
     sub-block whose ``d*sc`` is zero, which keeps step 1's codes.

Exactness: every operation is a float32 operation in C's order (C does these in float; the
compiled libggml-base.so contains no fused multiply-adds, so none are emulated). Sums run
sequentially, as C's loops do, across the values of a sub-block, vectorised across
sub-blocks, never as NumPy's pairwise reductions. `nearest_int` is C's trick, adding 1.5*2**23
and reading the low mantissa bits, so even its out-of-range results match. Conditions are
C's comparisons, so rows with infinities follow the same branches; NaN inputs are out of
scope. float16 conversion is IEEE round-to-nearest-even in both.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from localllm.formats.quants import LAYOUTS, BlockLayout

Q4_K = LAYOUTS[GGMLQuantizationType.Q4_K]
Q6_K = LAYOUTS[GGMLQuantizationType.Q6_K]
QK_K = Q4_K.block_size
# GROUP_MAX_EPS in ggml-quants.c: a sub-block (Q6_K) whose largest magnitude is below it is zero.
_GROUP_MAX_EPS = np.float32(1e-15)
# 1.5 * 2**23: adding it leaves round-to-nearest-even(v) in the low mantissa bits.
_MAGIC = np.float32(12582912.0)
# Super-blocks encoded at a time: small enough that the (values, sub-blocks) working arrays
# of the search loops stay in cache, large enough that NumPy's per-call cost is amortised.
_CHUNK_BLOCKS = 1024

_F = np.float32


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's `nearest_int` of float32 `v`, as int32."""
    return (np.add(v, _MAGIC, dtype=np.float32).view(np.int32) & 0x7FFFFF) - 0x400000


def _running_sum(terms: np.ndarray) -> np.ndarray:
    """C's ``float s = 0; for (i...) s += terms[i];`` over axis 0, for every column at once."""
    total = np.zeros(terms.shape[1:], dtype=np.float32)
    for term in terms:
        total += term
    return total


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype("<f2").view(np.uint8).reshape(*values.shape, 2)


def _fields(out: np.ndarray, layout: BlockLayout, **values: np.ndarray) -> np.ndarray:
    """Write each named field of `layout` into the blocks `out` (one row each); returns out."""
    for name, value in values.items():
        field = layout.field(name)
        out[:, field.offset : field.offset + field.size] = value
    return out


def _encode(values: np.ndarray, layout: BlockLayout, encode_blocks) -> np.ndarray:
    """float32 rows (last axis a multiple of 256) -> their bytes, `encode_blocks` (super-blocks of
    256 values -> blocks of `layout`) a chunk at a time."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.shape[-1] % QK_K:
        raise ValueError(f"rows of {values.shape[-1]} values are not a multiple of {QK_K}")
    blocks = values.reshape(-1, QK_K)
    out = np.empty((*values.shape[:-1], values.shape[-1] // QK_K * layout.type_size), dtype=np.uint8)
    flat = out.reshape(-1, layout.type_size)
    with np.errstate(all="ignore"):
        for start in range(0, len(blocks), _CHUNK_BLOCKS):
            flat[start : start + _CHUNK_BLOCKS] = encode_blocks(blocks[start : start + _CHUNK_BLOCKS])
    return out


def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """float32 rows (last axis a multiple of 256) -> their Q4_K bytes, 144 per 256 values."""
    return _encode(values, Q4_K, _q4_k_blocks)


def quantize_q6_k(values: np.ndarray) -> np.ndarray:
    """float32 rows (last axis a multiple of 256) -> their Q6_K bytes, 210 per 256 values."""
    return _encode(values, Q6_K, _q6_k_blocks)


def _codes(v: np.ndarray, lowest: int, highest: int, in_range: bool) -> np.ndarray:
    """``max(lowest, min(highest, nearest_int(v)))`` as float32, reusing `v`'s memory.
    With `in_range` (every |v| known to be at most 2**21) adding and subtracting 1.5*2**23 in
    float32 gives the same integers as the bit trick, in fewer passes."""
    if not in_range:
        return np.clip(_nearest_int(v), lowest, highest).astype(np.float32)
    v += _MAGIC
    np.clip(v, _MAGIC + lowest, _MAGIC + highest, out=v)
    v -= _MAGIC
    return v


def _within(bound: np.ndarray, relevant: np.ndarray) -> bool:
    """Whether every relevant |v| <= 2**21, given each column's largest |v|; a NaN bound is not."""
    return bool(np.all(np.abs(bound[relevant]) <= _F(2**21)))


def _make_qkx2_quants(x: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`make_qkx2_quants` for n=32, nmax=15, rmin=-1, rdelta=0.1, nstep=20, use_mad=false;
    `x` and `weights` are (32, sub-blocks). Returns (scale, the_min, codes as float32)."""
    nmax = _F(15)
    low, high = x[0].copy(), x[0].copy()
    sum_w = weights[0].copy()
    sum_x = sum_w * x[0]
    for value, weight in zip(x[1:], weights[1:]):
        np.copyto(low, value, where=value < low)
        np.copyto(high, value, where=value > high)
        sum_w += weight
        sum_x += weight * value
    lowest = low.copy()
    low[low > 0] = 0
    varied = high != low
    flat_min = low[~varied]

    def codes(iscale: np.ndarray, low: np.ndarray, exact: bool = False) -> np.ndarray:
        # Rounding is monotonic, so |iscale*(x - low)| peaks at one of the extremes of x.
        reach = np.maximum(np.abs(iscale * (high - low)), np.abs(iscale * (lowest - low)))
        in_range = not exact and _within(reach, varied)
        return _codes(np.multiply(x - low, iscale), 0, 15, in_range)

    def error(scale: np.ndarray, low: np.ndarray, levels: np.ndarray) -> np.ndarray:
        diff = scale * levels
        diff += low
        diff -= x
        diff *= diff
        diff *= weights
        return _running_sum(diff)

    iscale = nmax / (high - low)
    scale = _F(1) / iscale
    best_error = error(scale, low, codes(iscale, low))
    # The codes of the best fit so far are those of (kept_iscale, kept_low): remade at the end.
    kept_iscale, kept_low = iscale, low.copy()
    for step in range(21):
        iscale = (_F(-1) + _F(0.1) * _F(step) + nmax) / (high - low)
        trial = codes(iscale, low)
        weighted = weights * trial
        sum_l = _running_sum(weighted)
        sum_xl = _running_sum(np.multiply(weighted, x))
        weighted *= trial
        sum_l2 = _running_sum(weighted)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_min[positive] = 0
        this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
        current = error(this_scale, this_min, trial)
        better = (det > 0) & (current < best_error)
        np.copyto(kept_iscale, iscale, where=better)
        np.copyto(kept_low, low, where=better)
        np.copyto(best_error, current, where=better)
        np.copyto(scale, this_scale, where=better)
        np.copyto(low, this_min, where=better)
    levels = codes(kept_iscale, kept_low, exact=True)
    levels[:, ~varied] = 0
    scale[~varied] = 0
    low[~varied] = flat_min
    return scale, -low, levels


def _running_max(columns: np.ndarray) -> np.ndarray:
    """C's ``float m = 0; for (j...) if (v[j] > m) m = v[j];`` along axis 1."""
    best = np.zeros(len(columns), dtype=np.float32)
    for column in columns.T:
        np.copyto(best, column, where=column > best)
    return best


def _six_bit(values: np.ndarray, maximum: np.ndarray) -> np.ndarray:
    """`min(63, (uint8_t)nearest_int(63/maximum * value))`, 0 where the maximum is not positive."""
    inverse = np.where(maximum > 0, _F(63) / maximum, _F(0))
    return np.minimum(_nearest_int(inverse[:, None] * values) & 0xFF, 63).astype(np.uint8)


def _q4_k_blocks(x: np.ndarray) -> np.ndarray:
    n = len(x)
    sub = np.ascontiguousarray(x.reshape(n * 8, 32).T)
    av_x = np.sqrt(_running_sum(sub * sub) / _F(32))
    scales, mins, levels = _make_qkx2_quants(sub, av_x + np.abs(sub))
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    levels = levels.T.reshape(n, 8, 32)

    max_scale, max_min = _running_max(scales), _running_max(mins)
    ls, lm = _six_bit(scales, max_scale), _six_bit(mins, max_min)
    d = (max_scale / _F(63)).astype(np.float16)
    dmin = (max_min / _F(63)).astype(np.float16)
    packed = np.empty((n, 12), dtype=np.uint8)
    packed[:, :4] = ls[:, :4] | (ls[:, 4:] >> 4) << 6
    packed[:, 4:8] = lm[:, :4] | (lm[:, 4:] >> 4) << 6
    packed[:, 8:] = (ls[:, 4:] & 0xF) | (lm[:, 4:] & 0xF) << 4

    step = d.astype(np.float32)[:, None] * ls.astype(np.float32)
    offset = dmin.astype(np.float32)[:, None] * lm.astype(np.float32)
    blocks = x.reshape(n, 8, 32)
    requantized = np.clip(_nearest_int((blocks + offset[..., None]) / step[..., None]), 0, 15)
    levels = np.where((step != 0)[..., None], requantized, levels).astype(np.uint8)

    pairs = levels.reshape(n, 4, 2, 32)
    out = np.empty((n, Q4_K.type_size), dtype=np.uint8)
    qs = (pairs[:, :, 0] | pairs[:, :, 1] << 4).reshape(n, 128)
    return _fields(out, Q4_K, d=_f16_bytes(d), dmin=_f16_bytes(dmin), scales=packed, qs=qs)


def _make_qx_quants(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`make_qx_quants` for n=16, nmax=32, rmse_type=1, no importance weights; `x` is
    (16, sub-blocks). Returns (scale, codes + 32 as float32)."""
    nmax = _F(32)
    amax = np.zeros(x.shape[1], dtype=np.float32)
    peak = np.zeros(x.shape[1], dtype=np.float32)
    for value in x:
        larger = np.abs(value) > amax
        np.copyto(amax, np.abs(value), where=larger)
        np.copyto(peak, value, where=larger)
    nonzero = amax >= _GROUP_MAX_EPS
    weights = x * x
    weighted_x = weights * x

    def codes(iscale: np.ndarray, exact: bool = False) -> np.ndarray:
        in_range = not exact and _within(np.abs(iscale) * amax, nonzero)
        return _codes(np.multiply(x, iscale), -32, 31, in_range)

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        trial = codes(iscale)
        sumlx = _running_sum(weighted_x * trial)
        weighted = weights * trial
        weighted *= trial
        return sumlx, _running_sum(weighted)

    iscale = -nmax / peak
    sumlx, suml2 = fit(iscale)
    scale = np.where(suml2 != 0, sumlx / suml2, _F(0))
    best = scale * sumlx
    kept_iscale = iscale.copy()
    for step in (*range(-9, 0), *range(1, 10)):
        iscale = -(nmax + _F(0.1) * _F(step)) / peak
        sumlx, suml2 = fit(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        np.copyto(kept_iscale, iscale, where=better)
        np.copyto(scale, sumlx / suml2, where=better)
        np.copyto(best, scale * sumlx, where=better)
    levels = codes(kept_iscale, exact=True)
    levels += 32
    levels[:, ~nonzero] = 0
    scale[~nonzero] = 0
    return scale, levels


def _q6_k_blocks(x: np.ndarray) -> np.ndarray:
    n = len(x)
    sub = np.ascontiguousarray(x.reshape(n * 16, 16).T)
    scales, levels = _make_qx_quants(sub)
    scales = scales.reshape(n, 16)
    levels = levels.T.reshape(n, 16, 16)

    max_abs = np.zeros(n, dtype=np.float32)
    max_scale = np.zeros(n, dtype=np.float32)
    for column in scales.T:
        larger = np.abs(column) > max_abs
        np.copyto(max_abs, np.abs(column), where=larger)
        np.copyto(max_scale, column, where=larger)
    iscale = _F(-128) / max_scale
    d = (_F(1) / iscale).astype(np.float16)
    # C stores min(127, nearest_int(...)) in an int8_t, keeping the low 8 bits.
    sc = np.minimum(_nearest_int(iscale[:, None] * scales), 127).astype(np.int8)
    step = d.astype(np.float32)[:, None] * sc.astype(np.float32)
    requantized = np.clip(_nearest_int(x.reshape(n, 16, 16) / step[..., None]), -32, 31) + 32
    levels = np.where((step != 0)[..., None], requantized, levels).astype(np.uint8)

    quads = levels.reshape(n, 2, 4, 32)
    low = quads & 0xF
    ql = np.concatenate([low[:, :, 0] | low[:, :, 2] << 4, low[:, :, 1] | low[:, :, 3] << 4], axis=2)
    high = quads >> 4
    qh = high[:, :, 0] | high[:, :, 1] << 2 | high[:, :, 2] << 4 | high[:, :, 3] << 6
    out = np.empty((n, Q6_K.type_size), dtype=np.uint8)
    _fields(out, Q6_K, ql=ql.reshape(n, 128), qh=qh.reshape(n, 64), scales=sc.view(np.uint8), d=_f16_bytes(d))
    out[max_abs < _GROUP_MAX_EPS] = 0
    return out
