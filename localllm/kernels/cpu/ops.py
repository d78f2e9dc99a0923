"""The transformer's element-wise and per-row CPU ops: RMS norm, RoPE, softmax, SwiGLU, GeGLU.

Every public function checks its arguments in Python and raises KernelError before a Numba kernel
touches memory; the kernels themselves assume float32, C-contiguous arrays of matching shapes.
"""

from functools import lru_cache

import numba
import numpy as np

from localllm.errors import KernelError
from localllm.kernels.arguments import check_finite_float, check_rope_arguments
from localllm.kernels.cpu.attention import attention
from localllm.kernels.cpu.checks import FAST_REDUCTION, check_f32, check_out, check_positions
from localllm.kernels.cpu.floats import float_from_bits
from localllm.kernels.cpu.threads import apply_threads

# The parallel ops cast the prange index to int64 when they pass it on: Numba types it int64
# before parfor conversion and uint64 after, and would compile the per-row function twice.

# Element-wise ops hand each thread runs of this many values; smaller inputs run serially,
# where a thread launch would cost more than the work.
_ELEMENTWISE_BLOCK = 8192
_PARALLEL_MIN_ELEMENTS = 32768

# --- RMS norm ---------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, fastmath=FAST_REDUCTION)
def _rms_norm_row(x, weight, has_weight, eps, out, row):
    d = x.shape[1]
    sum_squares = 0.0
    for c in range(d):
        value = np.float64(x[row, c])
        sum_squares += value * value
    scale = np.float32(1.0 / np.sqrt(sum_squares / d + eps))
    if has_weight:
        for c in range(d):
            out[row, c] = (x[row, c] * scale) * weight[c]
    else:
        for c in range(d):
            out[row, c] = x[row, c] * scale


@numba.njit(cache=True, nogil=True, parallel=True)
def _rms_norm_parallel(x, weight, has_weight, eps, out):
    for row in numba.prange(x.shape[0]):
        _rms_norm_row(x, weight, has_weight, eps, out, np.int64(row))


@numba.njit(cache=True, nogil=True)
def _rms_norm_serial(x, weight, has_weight, eps, out):
    for row in range(x.shape[0]):
        _rms_norm_row(x, weight, has_weight, eps, out, row)


def rms_norm(x: np.ndarray, weight: np.ndarray | None, eps: float, out=None) -> np.ndarray:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last axis of a 2-D [n, d] or 3-D [n, h, d] x.

    As in ggml, x is scaled first and then multiplied by the weight. `weight=None` skips the
    multiplication. `out` may be `x` itself.
    """
    check_f32("x", x, (2, 3))
    d = x.shape[-1]
    if weight is None:
        weight_array = np.ones(0, dtype=np.float32)
    else:
        weight_array = check_f32("weight", weight, 1)
        if weight_array.shape[0] != d:
            raise KernelError(f"weight has {weight_array.shape[0]} values, x rows have {d}")
    eps = check_finite_float("eps", eps)
    if eps < 0:
        raise KernelError(f"eps must be >= 0, got {eps}")
    out = check_out(out, x.shape)
    rows = x.reshape(-1, d)
    out_rows = out.reshape(-1, d)
    if rows.size >= _PARALLEL_MIN_ELEMENTS and rows.shape[0] > 1:
        apply_threads()
        _rms_norm_parallel(rows, weight_array, weight is not None, eps, out_rows)
    else:
        _rms_norm_serial(rows, weight_array, weight is not None, eps, out_rows)
    return out


# --- RoPE -------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _rope_frequencies(n_rot: int, base: float, freq_scale: float) -> np.ndarray:
    """freq_scale * base^(-2i/n_rot) for i in [0, n_rot/2), in float64.

    ggml builds these by repeated float32 multiplication; float64 keeps the angle exact to
    ~1e-12 rad even at position 32,768, where float32 would be off by ~1e-3 rad.
    """
    exponents = -2.0 * np.arange(n_rot // 2, dtype=np.float64) / n_rot
    frequencies = freq_scale * np.power(np.float64(base), exponents)
    frequencies.flags.writeable = False
    return frequencies


@numba.njit(cache=True, nogil=True)
def _rope_token(x, positions, frequencies, neox, token):
    half = frequencies.shape[0]
    n_heads = x.shape[1]
    position = np.float64(positions[token])
    cosines = np.empty(half, dtype=np.float64)
    sines = np.empty(half, dtype=np.float64)
    for i in range(half):
        theta = position * frequencies[i]
        cosines[i] = np.cos(theta)
        sines[i] = np.sin(theta)
    for h in range(n_heads):
        for i in range(half):
            if neox:
                first, second = i, i + half
            else:
                first, second = 2 * i, 2 * i + 1
            a = np.float64(x[token, h, first])
            b = np.float64(x[token, h, second])
            x[token, h, first] = a * cosines[i] - b * sines[i]
            x[token, h, second] = a * sines[i] + b * cosines[i]


@numba.njit(cache=True, nogil=True, parallel=True)
def _rope_parallel(x, positions, frequencies, neox):
    for token in numba.prange(x.shape[0]):
        _rope_token(x, positions, frequencies, neox, np.int64(token))


@numba.njit(cache=True, nogil=True)
def _rope_serial(x, positions, frequencies, neox):
    for token in range(x.shape[0]):
        _rope_token(x, positions, frequencies, neox, token)


def rope(
    x: np.ndarray,
    positions: np.ndarray,
    *,
    n_rot: int,
    base: float,
    freq_scale: float = 1.0,
    neox: bool,
) -> np.ndarray:
    """Rotate x [n, n_heads, head_dim] in place by its tokens' positions; returns x.

    theta_i = position * freq_scale * base^(-2i/n_rot) for i < n_rot/2. Normal mode rotates the
    pairs (x[2i], x[2i+1]), NeoX mode the pairs (x[i], x[i + n_rot/2]); dims >= n_rot are untouched.
    """
    check_f32("x", x, 3)
    n, _, head_dim = x.shape
    positions = check_positions("positions", positions, n)
    n_rot, base, freq_scale = check_rope_arguments(n_rot, head_dim, base, freq_scale)
    frequencies = _rope_frequencies(n_rot, base, freq_scale)
    if n > 1 and x.size >= _PARALLEL_MIN_ELEMENTS:
        apply_threads()
        _rope_parallel(x, positions, frequencies, bool(neox))
    else:
        _rope_serial(x, positions, frequencies, bool(neox))
    return x


# --- softmax ----------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _softmax_row(x, out, row):
    m = x.shape[1]
    largest = -np.inf
    for c in range(m):
        if x[row, c] > largest:
            largest = x[row, c]
    if largest == -np.inf:
        # Every entry is masked: no distribution to speak of, so emit zeros rather than NaNs.
        for c in range(m):
            out[row, c] = 0.0
        return
    total = 0.0
    for c in range(m):
        e = np.exp(x[row, c] - largest)
        out[row, c] = e
        total += np.float64(e)
    inverse = np.float32(1.0 / total)
    for c in range(m):
        out[row, c] *= inverse


@numba.njit(cache=True, nogil=True, parallel=True)
def _softmax_parallel(x, out):
    for row in numba.prange(x.shape[0]):
        _softmax_row(x, out, np.int64(row))


@numba.njit(cache=True, nogil=True)
def _softmax_serial(x, out):
    for row in range(x.shape[0]):
        _softmax_row(x, out, row)


def softmax(x: np.ndarray, out=None) -> np.ndarray:
    """Row-wise softmax of x [n, m]; a row that is entirely -inf becomes zeros. `out` may be x."""
    check_f32("x", x, 2)
    out = check_out(out, x.shape)
    if x.shape[0] > 1 and x.size >= _PARALLEL_MIN_ELEMENTS:
        apply_threads()
        _softmax_parallel(x, out)
    else:
        _softmax_serial(x, out)
    return out


# --- gated activations ------------------------------------------------------------------------

_GELU_SQRT_2_OVER_PI = np.float32(np.sqrt(2.0 / np.pi))
_GELU_CUBIC = np.float32(0.044715)


# Cephes' single-precision exp: n = round(x / ln 2), r = x - n ln 2 in two parts (exact for
# |n| < 2^9), exp(r) by a degree-6 polynomial, 2^n put straight into the exponent bits. At most
# 0.97 ulp from float64 exp over 2 million points of [-87.3, 88.3], and, unlike libm's expf (a
# call per value), a straight-line body LLVM vectorizes: one 8960-wide SwiGLU row 34 -> 7 us.
_LOG2E = np.float32(1.44269504088896341)
_LN2_HIGH = np.float32(0.693359375)
_LN2_LOW = np.float32(-2.12194440e-4)
_EXP_MAX = np.float32(88.3762626647949)
_EXP_MIN = np.float32(-87.3365447504019)
_EXP_POLY = tuple(
    np.float32(c)
    for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
)


@numba.njit(cache=True, nogil=True, inline="always")
def _exp(x):
    a = min(max(x, _EXP_MIN), _EXP_MAX)
    n = np.floor(a * _LOG2E + np.float32(0.5))
    r = (a - n * _LN2_HIGH) - n * _LN2_LOW
    c0, c1, c2, c3, c4, c5 = _EXP_POLY
    y = (((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + c5) * (r * r) + r + np.float32(1.0)
    scaled = y * float_from_bits((np.int64(n) + 127) << 23)
    # Past the clamp: exp overflows to inf as libm's does (silu's far negative tail is then -0).
    return np.float32(np.inf) if x > _EXP_MAX else scaled


@numba.njit(cache=True, nogil=True, inline="always")
def _silu(x):
    return x / (np.float32(1.0) + _exp(-x))


@numba.njit(cache=True, nogil=True, inline="always")
def _gelu_tanh(x):
    # 0.5*x*(1 + tanh(u)) == x * sigmoid(2u): the same tanh GELU as ggml, written so the
    # negative tail keeps full relative precision instead of cancelling in 1 + tanh(u).
    u = _GELU_SQRT_2_OVER_PI * x * (np.float32(1.0) + _GELU_CUBIC * x * x)
    return x / (np.float32(1.0) + np.exp(np.float32(-2.0) * u))


# NumPy's error model: Python's would test every division for a zero divisor, a branch that
# keeps the loop from vectorizing (and silu's divisor is never zero). The slices give indices
# from 0, which need no negative-index wraparound either.
@numba.njit(cache=True, nogil=True, error_model="numpy")
def _swiglu_span(gate, up, out, start, stop):
    gate, up, out = gate[start:stop], up[start:stop], out[start:stop]
    for i in range(gate.shape[0]):
        out[i] = _silu(gate[i]) * up[i]


@numba.njit(cache=True, nogil=True)
def _geglu_span(gate, up, out, start, stop):
    for i in range(start, stop):
        out[i] = _gelu_tanh(gate[i]) * up[i]


@numba.njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _swiglu_parallel(gate, up, out, block):
    n_blocks = (gate.shape[0] + block - 1) // block
    for b in numba.prange(n_blocks):
        _swiglu_span(gate, up, out, b * block, min((b + 1) * block, gate.shape[0]))


@numba.njit(cache=True, nogil=True, parallel=True)
def _geglu_parallel(gate, up, out, block):
    n_blocks = (gate.shape[0] + block - 1) // block
    for b in numba.prange(n_blocks):
        _geglu_span(gate, up, out, b * block, min((b + 1) * block, gate.shape[0]))


def _gated(gate, up, out, serial_kernel, parallel_kernel) -> np.ndarray:
    check_f32("gate", gate, 2)
    check_f32("up", up, 2)
    if gate.shape != up.shape:
        raise KernelError(f"gate and up must have the same shape, got {gate.shape} and {up.shape}")
    out = check_out(out, gate.shape)
    flat_gate, flat_up, flat_out = gate.reshape(-1), up.reshape(-1), out.reshape(-1)
    if flat_gate.shape[0] >= _PARALLEL_MIN_ELEMENTS:
        apply_threads()
        parallel_kernel(flat_gate, flat_up, flat_out, _ELEMENTWISE_BLOCK)
    else:
        serial_kernel(flat_gate, flat_up, flat_out, 0, flat_gate.shape[0])
    return out


def swiglu(gate: np.ndarray, up: np.ndarray, out=None) -> np.ndarray:
    """silu(gate) * up for gate, up [n, f]. `out` may be gate or up."""
    return _gated(gate, up, out, _swiglu_span, _swiglu_parallel)


def geglu(gate: np.ndarray, up: np.ndarray, out=None) -> np.ndarray:
    """gelu(gate) * up with ggml's tanh GELU, for gate, up [n, f]. `out` may be gate or up."""
    return _gated(gate, up, out, _geglu_span, _geglu_parallel)


def warm_up_ops() -> None:
    """Compile, or load from Numba's on-disk cache, every op for the types the runtime uses.

    Tiny inputs, but sized to reach both the serial and the parallel variant of each op.
    """
    rng = np.random.default_rng(0)
    big_rows = _PARALLEL_MIN_ELEMENTS // 64 + 1
    for rows in (1, big_rows):
        x = rng.standard_normal((rows, 64), dtype=np.float32)
        rms_norm(x, np.ones(64, dtype=np.float32), 1e-6)
        rms_norm(x, None, 1e-6)
        softmax(x)
        swiglu(x, x)
        geglu(x, x)
    # The runtime's KV cache keeps int32 positions; int64 ones compile on first use (each dtype
    # costs about ten seconds of a cold compile).
    for n in (1, big_rows):
        positions = np.arange(n, dtype=np.int32)
        for neox in (False, True):
            rope(np.zeros((n, 1, 64), dtype=np.float32), positions, n_rot=64, base=10000.0, neox=neox)
    # The KV cache is f16 by default, float32 on request: both are compiled.
    for n in (1, 3):
        positions = np.arange(n, dtype=np.int32)
        q = rng.standard_normal((n, 2, 8), dtype=np.float32)
        for kv_dtype in (np.float16, np.float32):
            kv = rng.standard_normal((n, 1, 8)).astype(kv_dtype)
            attention(q, kv, kv, positions, positions, scale=0.35)
