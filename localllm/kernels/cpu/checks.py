"""Argument checks shared by the CPU ops (ops.py) and attention (attention.py): each returns the
checked value or raises KernelError before a Numba kernel touches memory."""

import numpy as np

from localllm.errors import KernelError

# Only reassociation and contraction: they let LLVM vectorise float reductions, while keeping
# IEEE infinities and NaNs (masked scores are -inf).
FAST_REDUCTION = {"reassoc", "contract", "nsz"}

POSITION_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


def check_f32(name: str, a, ndim: int | tuple[int, ...]) -> np.ndarray:
    """Return `a` if it is a C-contiguous float32 array of rank `ndim`, else raise KernelError."""
    if not isinstance(a, np.ndarray):
        raise KernelError(f"{name} must be a numpy array, got {type(a).__name__}")
    ranks = (ndim,) if isinstance(ndim, int) else ndim
    if a.ndim not in ranks:
        wanted = " or ".join(f"{r}-D" for r in ranks)
        raise KernelError(f"{name} must be {wanted}, got shape {a.shape}")
    if a.dtype != np.float32:
        raise KernelError(f"{name} must be float32, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise KernelError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
    return a


def check_positions(name: str, positions, length: int) -> np.ndarray:
    if not isinstance(positions, np.ndarray):
        raise KernelError(f"{name} must be a numpy array, got {type(positions).__name__}")
    if positions.dtype not in POSITION_DTYPES:
        raise KernelError(f"{name} must be int32 or int64, got {positions.dtype}")
    if positions.ndim != 1 or positions.shape[0] != length:
        raise KernelError(f"{name} must have shape ({length},), got {positions.shape}")
    return np.ascontiguousarray(positions)


def check_out(out, shape: tuple[int, ...]) -> np.ndarray:
    """Return a fresh float32 array of `shape`, or `out` after checking it fits."""
    if out is None:
        return np.empty(shape, dtype=np.float32)
    check_f32("out", out, len(shape))
    if out.shape != shape:
        raise KernelError(f"out must have shape {shape}, got {out.shape}")
    return out
