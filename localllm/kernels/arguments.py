"""Checks of the scalar and shape arguments that the CPU (Numba) and GPU (Triton) kernels take
alike, whatever their arrays are: each returns the checked values or raises KernelError before
a kernel runs. The array checks stay with each device (kernels/cpu/checks.py, gpu/products.py)."""

import numpy as np

from localllm.errors import KernelError

INTEGERS = (int, np.integer)


def check_finite_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise KernelError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise KernelError(f"{name} must be finite, got {value}")
    return value


def check_rope_arguments(n_rot, head_dim: int, base, freq_scale) -> tuple[int, float, float]:
    """(n_rot, base, freq_scale) of a RoPE over heads of `head_dim` values."""
    if isinstance(n_rot, bool) or not isinstance(n_rot, INTEGERS):
        raise KernelError(f"n_rot must be an int, got {n_rot!r}")
    if n_rot <= 0 or n_rot % 2 or n_rot > head_dim:
        raise KernelError(f"n_rot must be even and in [2, head_dim={head_dim}], got {n_rot}")
    base = check_finite_float("base", base)
    freq_scale = check_finite_float("freq_scale", freq_scale)
    if base <= 0 or freq_scale <= 0:
        raise KernelError(f"base and freq_scale must be > 0, got {base} and {freq_scale}")
    return int(n_rot), base, freq_scale


def check_attention_arguments(q_shape, k_shape, v_shape, scale, window, n_sink) -> tuple[float, int, int]:
    """(scale, window, n_sink) of attention of queries q_shape (n, H, D) over keys and values
    k_shape, v_shape (S, KV, D), once the shapes fit together."""
    n_heads, head_dim = q_shape[1], q_shape[2]
    n_keys, n_kv_heads, key_dim = k_shape
    if tuple(v_shape) != tuple(k_shape):
        raise KernelError(f"k and v must have the same shape, got {tuple(k_shape)} and {tuple(v_shape)}")
    if key_dim != head_dim:
        raise KernelError(f"q head_dim is {head_dim} but k/v head_dim is {key_dim}")
    if n_kv_heads == 0 or n_heads % n_kv_heads:
        raise KernelError(f"query heads ({n_heads}) must be a multiple of kv heads ({n_kv_heads})")
    scale = check_finite_float("scale", scale)
    if isinstance(window, bool) or not isinstance(window, INTEGERS) or window < 0:
        raise KernelError(f"window must be an int >= 0 (0 = no window), got {window!r}")
    if isinstance(n_sink, bool) or not isinstance(n_sink, INTEGERS) or not 0 <= n_sink <= n_keys:
        raise KernelError(f"n_sink must be an int in [0, {n_keys}], got {n_sink!r}")
    return scale, int(window), int(n_sink)
