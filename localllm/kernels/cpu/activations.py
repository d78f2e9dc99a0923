"""8-bit activation quantization, as llama.cpp applies it before every quantized product.

llama.cpp never multiplies a quantized weight by float activations: it first rounds the
activation row to an 8-bit block format (ggml's `vec_dot_type` of the weight's type) and
takes integer dot products. That rounding shifts logits by up to a few tenths, and on rows
with outlier activations (Qwen2's first position, Gemma 3) by much more, so matching
llama.cpp's logits means rounding the same way. `activation_codes` gives the integer codes,
scales and code sums (integer.py multiplies those, as ggml does); `quantize_activations` the
rounded values as float32 (for the float kernels, equal to ggml's integer arithmetic up to
float32 rounding).

Formats (constants from ggml-quants.c / the x86 quantizers):
  Q8_0 and Q8_1  32-value blocks; d = amax / 127 stored as f16; q = round-half-even(x * 127 / amax);
                 the value is q * f16(d). Q8_1 also stores s = f16(d * sum q) for Q4_1's and
                 Q5_1's m: activation_codes gives it for the integer kernels; the float
                 kernels (without AVX2) use the sum of the rounded values instead, about 5e-4
                 relative apart on real rows (the m term nearly cancels the rest).
  Q8_K           256-value blocks; with `max` the first value of largest magnitude,
                 iscale = -127 / max, q = min(127, round-half-even(iscale * x)), d = 1 / iscale
                 stored as f32; the value is q * d.
"""

from __future__ import annotations

import math

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit, prange, types
from numba.extending import overload

from localllm.formats.quants import ACTIVATION_LAYOUTS, LAYOUTS

_OPTIONS = dict(cache=True, nogil=True)

# Block sizes from the activation layouts (localllm/formats/quants.py). Q8_1 rounds as Q8_0 does.
Q8_0_BLOCK = ACTIVATION_LAYOUTS[T.Q8_0].block_size
Q8_K_BLOCK = ACTIVATION_LAYOUTS[T.Q8_K].block_size
Q8_K_SUM_GROUP = Q8_K_BLOCK // ACTIVATION_LAYOUTS[T.Q8_K].field("bsums").count
# Weights whose integer products take ggml's Q8_1 activations: Q8_0's codes and scales plus each
# block's s = f16(unrounded scale * sum of codes), which multiplies the weights' m.
Q8_1_WEIGHTS = tuple(qtype for qtype, layout in LAYOUTS.items() if layout.activation == T.Q8_1)

# The activation format ggml's CPU backend pairs with each weight type (`vec_dot_type`).
ACTIVATION_BLOCK = {
    qtype: ACTIVATION_LAYOUTS[layout.activation].block_size
    for qtype, layout in LAYOUTS.items()
    if layout.activation in ACTIVATION_LAYOUTS
}


@njit(**_OPTIONS)
def _round_to_half(value):
    """The float16 nearest to a non-negative float32 (ties to even), as a float32."""
    if value == 0.0 or not math.isfinite(value):
        return np.float32(value)
    _, exponent = math.frexp(value)
    # float16 keeps 11 significant bits down to 2**-14, then fixed steps of 2**-24.
    step = 2.0 ** max(exponent - 11, -24)
    rounded = np.rint(np.float64(value) / step) * step
    if rounded > 65504.0:
        return np.float32(np.inf)
    return np.float32(rounded)


def _store_block_sum(sums, b, total, scale):
    """sums[b] = the block's code sum: as is into int32 sums (Q8_0), or as Q8_1's
    s = f16(unrounded scale * sum) into float32 sums."""


@overload(_store_block_sum, inline="always")
def _store_block_sum_impl(sums, b, total, scale):
    if isinstance(sums.dtype, types.Float):

        def store_value_sum(sums, b, total, scale):
            value_sum = scale * np.float32(total)
            sums[b] = _round_to_half(value_sum) if value_sum >= 0 else -_round_to_half(-value_sum)

        return store_value_sum

    def store_code_sum(sums, b, total, scale):
        sums[b] = total

    return store_code_sum


@njit(**_OPTIONS)
def _q8_0_row(x, codes, scales, sums):
    for b in range(x.shape[0] // Q8_0_BLOCK):
        xb = x[b * Q8_0_BLOCK : (b + 1) * Q8_0_BLOCK]
        amax = np.float32(0.0)
        for j in range(Q8_0_BLOCK):
            amax = max(amax, abs(xb[j]))
        scale = amax / np.float32(127.0)
        scales[b] = _round_to_half(scale)
        inverse = np.float32(127.0) / amax if amax != 0.0 else np.float32(0.0)
        total = 0
        for j in range(Q8_0_BLOCK):
            code = np.int8(np.rint(xb[j] * inverse))
            codes[b * Q8_0_BLOCK + j] = code
            total += code
        _store_block_sum(sums, b, total, scale)


@njit(**_OPTIONS)
def _q8_k_row(x, codes, scales, sums):
    for b in range(x.shape[0] // Q8_K_BLOCK):
        xb = x[b * Q8_K_BLOCK : (b + 1) * Q8_K_BLOCK]
        amax = np.float32(0.0)
        signed_max = np.float32(0.0)
        for j in range(Q8_K_BLOCK):
            if abs(xb[j]) > amax:
                amax = abs(xb[j])
                signed_max = xb[j]
        iscale = np.float32(-127.0) / signed_max if amax != 0.0 else np.float32(0.0)
        scales[b] = np.float32(1.0) / iscale if amax != 0.0 else np.float32(0.0)
        for g in range(Q8_K_BLOCK // Q8_K_SUM_GROUP):
            total = 0
            for j in range(g * Q8_K_SUM_GROUP, (g + 1) * Q8_K_SUM_GROUP):
                code = np.int8(min(np.float32(127.0), np.rint(iscale * xb[j])))
                codes[b * Q8_K_BLOCK + j] = code
                total += code
            sums[b * (Q8_K_BLOCK // Q8_K_SUM_GROUP) + g] = total


@njit(**_OPTIONS)
def _sum_group(block):
    """Values per code sum: ggml's bsums cover 16 values of a Q8_K block, Q8_0/Q8_1 one block."""
    return Q8_K_SUM_GROUP if block == Q8_K_BLOCK else Q8_0_BLOCK


@njit(**_OPTIONS)
def _codes_row(x, block, codes, scales, sums):
    if block == Q8_K_BLOCK:
        _q8_k_row(x, codes, scales, sums)
    else:
        _q8_0_row(x, codes, scales, sums)


@njit(**_OPTIONS, parallel=True)
def _codes_rows(X, block, codes, scales, sums):
    for i in prange(X.shape[0]):
        _codes_row(X[i], block, codes[i], scales[i], sums[i])


def _sums_dtype(qtype, block):
    if qtype in Q8_1_WEIGHTS:
        return np.float32
    # ggml's bsums are 16-bit (|a sum of 16 codes| <= 2032), which the K kernels multiply by
    # 16-bit scales and mins with one vpmaddwd.
    return np.int16 if block == Q8_K_BLOCK else np.int32


@njit(**_OPTIONS)
def codes_of(rows, block, sums_dtype):
    """activation_codes for 2-D rows, inside compiled code: the integer kernels round their
    activations in the same call that multiplies them (one dispatch per product)."""
    n, cols = rows.shape
    codes = np.empty((n, cols), dtype=np.int8)
    scales = np.empty((n, cols // block), dtype=np.float32)
    sums = np.empty((n, cols // _sum_group(block)), dtype=sums_dtype)
    if n == 1:
        # A decode step's single row: starting the thread pool would cost more than the work.
        _codes_row(rows[0], block, codes[0], scales[0], sums[0])
    else:
        _codes_rows(rows, block, codes, scales, sums)
    return codes, scales, sums


def warm_up_rows() -> None:
    """Compile, or load, the one-row rounding for each code-sum dtype. Kernels compiled in both
    processes of a parallel warm_up call it, so it is compiled before they start (two processes
    adding entries for one function to Numba's cache at once could lose one)."""
    x = np.zeros(Q8_K_BLOCK, dtype=np.float32)
    for block, dtype in ((Q8_0_BLOCK, np.int32), (Q8_0_BLOCK, np.float32), (Q8_K_BLOCK, np.int16)):
        codes = np.empty(x.shape[0], dtype=np.int8)
        scales = np.empty(x.shape[0] // block, dtype=np.float32)
        _codes_row(x, block, codes, scales, np.empty(x.shape[0] // _sum_group(block), dtype=dtype))


def activation_codes(X: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """X (float32, C-contiguous, last axis a multiple of `qtype`'s activation block) rounded to
    8 bits the way llama.cpp rounds activations for `qtype` weights: int8 codes shaped like X,
    float32 scales per block (a value is code * scale) and sums of the codes, for weights whose
    codes carry an offset: int16 per 16 values (Q8_K, ggml's bsums) or int32 per block (Q8_0);
    for Q4_1, float32 Q8_1 sums s instead."""
    block = ACTIVATION_BLOCK[qtype]
    codes, scales, sums = codes_of(X.reshape(-1, X.shape[-1]), block, _sums_dtype(qtype, block))
    lead = X.shape[:-1]
    return codes.reshape(X.shape), scales.reshape(*lead, -1), sums.reshape(*lead, -1)


@njit(**_OPTIONS)
def _values_row(x, block, out):
    n = x.shape[0]
    codes = np.empty(n, dtype=np.int8)
    scales = np.empty(n // block, dtype=np.float32)
    sums = np.empty(n // _sum_group(block), dtype=np.int32)
    _codes_row(x, block, codes, scales, sums)
    for j in range(n):
        out[j] = np.float32(codes[j]) * scales[j // block]


@njit(**_OPTIONS, parallel=True)
def _values_rows(X, block, out):
    for i in prange(X.shape[0]):
        _values_row(X[i], block, out[i])


def quantize_activations(X: np.ndarray, qtype) -> np.ndarray:
    """X (float32, C-contiguous, last axis a multiple of the block) rounded the way llama.cpp
    rounds activations for products with `qtype` weights, as float32 values; X itself if that
    type has none."""
    block = ACTIVATION_BLOCK.get(qtype)
    if block is None:
        return X
    rows = X.reshape(-1, X.shape[-1])
    out = np.empty_like(rows)
    if rows.shape[0] == 1:
        _values_row(rows[0], block, out[0])
    else:
        _values_rows(rows, block, out)
    return out.reshape(X.shape)
