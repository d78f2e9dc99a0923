"""The transformer's element-wise and per-row ops in Triton: RMS norm, RoPE, softmax, SwiGLU, GeGLU.

Same signatures and semantics as localllm.kernels.cpu.ops, on contiguous float32 torch tensors of
one device. Arguments are checked in Python (KernelError) before a kernel runs.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import triton
import triton.language as tl

from localllm.errors import KernelError
from localllm.kernels.arguments import check_finite_float, check_rope_arguments
from localllm.kernels.gpu.products import cdiv, check_out, check_tensor, next_pow2

POSITION_DTYPES = (torch.int32, torch.int64)

# Widest tile a row op holds at once; longer rows loop over tiles of this size.
_ROW_TILE = 4096
_ELEMENTWISE_TILE = 1024

_GELU_SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
_GELU_CUBIC = tl.constexpr(0.044715)


def check_positions(name: str, positions, length: int, device) -> torch.Tensor:
    check_tensor(name, positions, 1, device, POSITION_DTYPES)
    if positions.shape[0] != length:
        raise KernelError(f"{name} must have shape ({length},), got {tuple(positions.shape)}")
    return positions


# --- RMS norm -------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(x, weight, out, d, eps, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * d
    offsets = tl.arange(0, BLOCK)
    squares = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, d, BLOCK):
        c = start + offsets
        v = tl.load(x + row + c, mask=c < d, other=0.0)
        squares += v * v
    scale = 1.0 / tl.sqrt_rn(tl.sum(squares, axis=0) / d + eps)
    for start in range(0, d, BLOCK):
        c = start + offsets
        y = tl.load(x + row + c, mask=c < d, other=0.0) * scale
        if HAS_WEIGHT:
            y = y * tl.load(weight + c, mask=c < d, other=0.0)
        tl.store(out + row + c, y, mask=c < d)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, out=None) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last axis of a 2-D (n, d) or 3-D (n, h, d) x.

    x is scaled first, then multiplied by the weight (as ggml); `weight=None` skips the
    multiplication. `out` may be x itself.
    """
    check_tensor("x", x, (2, 3), None)
    d = x.shape[-1]
    if weight is not None:
        check_tensor("weight", weight, 1, x.device)
        if weight.shape[0] != d:
            raise KernelError(f"weight has {weight.shape[0]} values, x rows have {d}")
    eps = check_finite_float("eps", eps)
    if eps < 0:
        raise KernelError(f"eps must be >= 0, got {eps}")
    out = check_out(out, tuple(x.shape), x.device)
    n_rows = x.numel() // d if d else 0
    if n_rows == 0:
        return out
    _rms_norm_kernel[(n_rows,)](
        x,
        x if weight is None else weight,
        out,
        d,
        eps,
        HAS_WEIGHT=weight is not None,
        BLOCK=min(_ROW_TILE, next_pow2(d)),
        num_warps=4,
    )
    return out


# --- RoPE -----------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _rope_frequencies(n_rot: int, base: float, freq_scale: float, device: torch.device) -> torch.Tensor:
    """freq_scale * base^(-2i/n_rot) for i < n_rot/2, float64 as on the CPU: at position 32k a
    float32 angle would be off by ~1e-3 rad."""
    exponents = -2.0 * torch.arange(n_rot // 2, dtype=torch.float64) / n_rot
    return (freq_scale * torch.pow(torch.tensor(base, dtype=torch.float64), exponents)).to(device)


@triton.jit
def _rope_kernel(
    x,
    positions,
    frequencies,
    n_heads,
    head_dim,
    HALF: tl.constexpr,
    NEOX: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    token = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    i = tl.arange(0, BLOCK_I)[None, :]
    live = (h < n_heads) & (i < HALF)
    # Angles, their sines and cosines and the rotation in float64: a handful per head and token.
    theta = tl.load(positions + token).to(tl.float64) * tl.load(frequencies + i, mask=i < HALF, other=0.0)
    cosine = tl.cos(theta)
    sine = tl.sin(theta)
    if NEOX:
        first = i
        second = i + HALF
    else:
        first = 2 * i
        second = 2 * i + 1
    head = x + (token.to(tl.int64) * n_heads + h) * head_dim
    a = tl.load(head + first, mask=live, other=0.0).to(tl.float64)
    b = tl.load(head + second, mask=live, other=0.0).to(tl.float64)
    tl.store(head + first, (a * cosine - b * sine).to(tl.float32), mask=live)
    tl.store(head + second, (a * sine + b * cosine).to(tl.float32), mask=live)


def rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    *,
    n_rot: int,
    base: float,
    freq_scale: float = 1.0,
    neox: bool,
) -> torch.Tensor:
    """Rotate x (n, n_heads, head_dim) in place by its tokens' positions (int32/int64 (n,) on x's
    device); returns x.

    theta_i = position * freq_scale * base^(-2i/n_rot) for i < n_rot/2. Normal mode rotates the
    pairs (x[2i], x[2i+1]), NeoX mode the pairs (x[i], x[i + n_rot/2]); dims >= n_rot are untouched.
    """
    check_tensor("x", x, 3, None)
    n, n_heads, head_dim = x.shape
    check_positions("positions", positions, n, x.device)
    n_rot, base, freq_scale = check_rope_arguments(n_rot, head_dim, base, freq_scale)
    if n == 0 or n_heads == 0:
        return x
    half = n_rot // 2
    block_i = next_pow2(half)
    block_h = min(next_pow2(n_heads), max(1, _ROW_TILE // block_i))
    _rope_kernel[(n, cdiv(n_heads, block_h))](
        x,
        positions,
        _rope_frequencies(n_rot, base, freq_scale, x.device),
        n_heads,
        head_dim,
        HALF=half,
        NEOX=bool(neox),
        BLOCK_H=block_h,
        BLOCK_I=block_i,
        num_warps=4,
    )
    return x


# --- softmax --------------------------------------------------------------------------------------


@triton.jit
def _softmax_kernel(x, out, m, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * m
    offsets = tl.arange(0, BLOCK)
    # One pass for the running maximum and the sum of exponentials rescaled to it, one to write.
    largest = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, m, BLOCK):
        c = start + offsets
        v = tl.load(x + row + c, mask=c < m, other=float("-inf"))
        new = tl.maximum(largest, v)
        safe = tl.where(new == float("-inf"), 0.0, new)
        total = total * tl.exp(largest - safe) + tl.exp(v - safe)
        largest = new
    peak = tl.max(largest, axis=0)
    safe_peak = tl.where(peak == float("-inf"), 0.0, peak)
    total_all = tl.sum(total * tl.exp(largest - safe_peak), axis=0)
    # An all -inf row has no distribution: zeros rather than NaNs, as on the CPU.
    empty = peak == float("-inf")
    inverse = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, total_all))
    for start in range(0, m, BLOCK):
        c = start + offsets
        v = tl.load(x + row + c, mask=c < m, other=float("-inf"))
        tl.store(out + row + c, tl.exp(v - safe_peak) * inverse, mask=c < m)


def softmax(x: torch.Tensor, out=None) -> torch.Tensor:
    """Row-wise softmax of x (n, m); a row that is entirely -inf becomes zeros. `out` may be x."""
    check_tensor("x", x, 2, None)
    out = check_out(out, tuple(x.shape), x.device)
    n, m = x.shape
    if n == 0 or m == 0:
        return out
    _softmax_kernel[(n,)](x, out, m, BLOCK=min(_ROW_TILE, next_pow2(m)), num_warps=4)
    return out


# --- gated activations ----------------------------------------------------------------------------


@triton.jit
def _gated_kernel(gate, up, out, size, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offsets < size
    g = tl.load(gate + offsets, mask=live, other=0.0)
    u = tl.load(up + offsets, mask=live, other=0.0)
    if GELU:
        # ggml's tanh GELU as x * sigmoid(2t): the negative tail keeps its relative precision
        # instead of cancelling in 1 + tanh(t).
        t = _GELU_SQRT_2_OVER_PI * g * (1.0 + _GELU_CUBIC * g * g)
        activated = g / (1.0 + tl.exp(-2.0 * t))
    else:
        activated = g / (1.0 + tl.exp(-g))
    tl.store(out + offsets, activated * u, mask=live)


def _gated(gate, up, out, gelu: bool) -> torch.Tensor:
    check_tensor("gate", gate, 2, None)
    check_tensor("up", up, 2, gate.device)
    if gate.shape != up.shape:
        raise KernelError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    out = check_out(out, tuple(gate.shape), gate.device)
    size = gate.numel()
    if size:
        grid = (cdiv(size, _ELEMENTWISE_TILE),)
        _gated_kernel[grid](gate, up, out, size, GELU=gelu, BLOCK=_ELEMENTWISE_TILE, num_warps=4)
    return out


def swiglu(gate: torch.Tensor, up: torch.Tensor, out=None) -> torch.Tensor:
    """silu(gate) * up for gate, up (n, f). `out` may be gate or up."""
    return _gated(gate, up, out, gelu=False)


def geglu(gate: torch.Tensor, up: torch.Tensor, out=None) -> torch.Tensor:
    """gelu(gate) * up with ggml's tanh GELU, for gate, up (n, f). `out` may be gate or up."""
    return _gated(gate, up, out, gelu=True)
