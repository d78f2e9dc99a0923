"""Weight-times-activation products over quantized GGUF tensors: validation and dispatch.

Kernel convention (every format module follows it):

Each format module exports ``KERNELS: dict[GGMLQuantizationType, tuple[matvec, matmul,
dequantize_rows]]`` of Numba functions (cache=True, nogil=True; matvec and matmul parallel
over output rows with prange):

    matvec(raw, x, out) -> None            raw: uint8[rows, row_bytes], C-contiguous
                                           x: float32[cols], out: float32[rows]
    matmul(raw, X, out) -> None            X: float32[n, cols] C-contiguous, out: float32[n, rows]
    dequantize_rows(raw, row_ids, out)     row_ids: int64[m], out: float32[m, cols];
                                           bit-exact with gguf.quants.dequantize

integer.py adds, for every block format, one kernel for both products,
``products(raw, X, out)``, which rounds X to 8-bit codes and multiplies those; used when
activations are rounded and the CPU has AVX2. Its raw is in the kernel's own layout,
``integer.pack(qtype, raw)`` (the K-quants' codes repacked, the ternary formats' rows
interleaved; a CheckedWeight packs once).

Which module serves which format is the `cpu_kernels` entry of localllm.formats.quants.LAYOUTS;
the tables below are built from it.

Kernels assume validated inputs. This module validates everything first (dtypes, contiguity,
row_bytes == cols / block_size * type_size, lengths, id ranges, out shapes) and raises
KernelError naming the problem before any kernel touches memory.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from localllm.errors import KernelError
from localllm.formats.quants import LAYOUTS, CpuKernels, served_by
from localllm.kernels.cpu import floats, integer, kquants, legacy
from localllm.kernels.cpu.activations import quantize_activations
from localllm.kernels.cpu.threads import apply_threads

_MODULES = {CpuKernels.FLOATS: floats, CpuKernels.LEGACY: legacy, CpuKernels.KQUANTS: kquants}


def _served(kernels: CpuKernels, module) -> dict:
    """The module's kernels for the formats LAYOUTS names it for; it must serve no other."""
    formats = served_by(kernels)
    if set(module.KERNELS) != set(formats):
        served = sorted(qtype.name for qtype in module.KERNELS)
        raise AssertionError(f"{module.__name__} serves {served}, LAYOUTS says {[q.name for q in formats]}")
    return {qtype: module.KERNELS[qtype] for qtype in formats}


KERNELS = {qtype: kernels for name, module in _MODULES.items() for qtype, kernels in _served(name, module).items()}
# Products on integer activation codes (integer.py), where the machine has them: what llama.cpp
# computes, exactly per block, and faster than the float kernels.
INTEGER_PRODUCTS = _served(CpuKernels.INTEGER, integer) if integer.AVAILABLE else {}

MAX_MATMUL_ROWS = 512


def _type_name(qtype) -> str:
    return getattr(qtype, "name", str(qtype))


class CheckedWeight:
    """A weight (anything with .raw, .type and .shape) checked once for the products, with its
    raw bytes held: a decode step makes hundreds of products on the same weights, and checking
    them and viewing the map again cost microseconds each time."""

    __slots__ = ("raw", "type", "shape", "name", "_checked", "_integer_raw", "_drop_pages")

    def __init__(self, weight):
        self._checked = _check_weight(weight)
        self.raw, self.type, rows, cols = self._checked
        self.shape = (rows, cols)
        self.name = getattr(weight, "name", "weight")
        self._integer_raw = None
        self._drop_pages = getattr(weight, "drop_pages", None)

    def integer_raw(self) -> np.ndarray:
        """The bytes in the integer kernel's layout (integer.pack), made on first use: a copy
        for the formats it repacks, which a model on the float kernels never needs. The file's
        pages of a repacked tensor then leave the resident set (GGUF tensors' drop_pages), so
        that the weights do not count twice."""
        if self._integer_raw is None:
            self._integer_raw = integer.pack(self.type, self.raw)
            if self._integer_raw is not self.raw and self._drop_pages is not None:
                self._drop_pages()
        return self._integer_raw

    def __repr__(self) -> str:
        return f"CheckedWeight({self.name!r}, {_type_name(self.type)}, shape={self.shape})"


def _check_weight(weight) -> tuple[np.ndarray, GGMLQuantizationType, int, int]:
    """The weight's raw bytes, type, rows and cols, after checking they agree with each other."""
    if type(weight) is CheckedWeight:
        return weight._checked
    try:
        raw, qtype, shape = weight.raw, weight.type, tuple(weight.shape)
    except AttributeError as exc:
        raise KernelError(f"weight must have .raw, .type and .shape, got {type(weight).__name__}") from exc
    name = getattr(weight, "name", "weight")
    if qtype not in KERNELS:
        raise KernelError(f"{name}: no CPU kernels for tensor type {_type_name(qtype)}")
    if len(shape) != 2:
        raise KernelError(f"{name}: a product needs a 2-D weight, got shape {shape}")
    rows, cols = shape
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 2:
        raise KernelError(f"{name}: raw data must be a 2-D uint8 array")
    if not raw.flags.c_contiguous:
        raise KernelError(f"{name}: raw data must be C-contiguous")
    block_size, type_size = LAYOUTS[qtype].block_size, LAYOUTS[qtype].type_size
    if cols <= 0 or cols % block_size:
        raise KernelError(
            f"{name}: {cols} columns is not a positive multiple of the {_type_name(qtype)} block size {block_size}"
        )
    row_bytes = cols // block_size * type_size
    if raw.shape != (rows, row_bytes):
        raise KernelError(
            f"{name}: raw data is {raw.shape[0]}x{raw.shape[1]} bytes, but {rows} rows of "
            f"{cols} {_type_name(qtype)} values need {rows}x{row_bytes}"
        )
    if raw.flags.writeable:
        # The kernels take read-only bytes, as a model's weights (views of a read-only map) are:
        # writable ones would compile every kernel a second time.
        raw = raw.view()
        raw.flags.writeable = False
    return raw, qtype, rows, cols


def _integer_raw(weight, raw: np.ndarray, qtype) -> np.ndarray:
    if type(weight) is CheckedWeight:
        return weight.integer_raw()
    return integer.pack(qtype, raw)


def _check_activations(name: str, a, ndim: int, cols: int, what: str) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise KernelError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise KernelError(f"{name} must be float32, got {a.dtype}")
    if a.ndim != ndim:
        raise KernelError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if a.shape[-1] != cols:
        raise KernelError(f"{name} has {a.shape[-1]} values per row, but {what} has {cols} columns")
    if not a.flags.c_contiguous:
        raise KernelError(f"{name} must be C-contiguous")
    return a


def _check_out(out, shape: tuple[int, ...]) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if not isinstance(out, np.ndarray) or out.dtype != np.float32:
        raise KernelError("out must be a float32 numpy array")
    if out.shape != shape:
        raise KernelError(f"out has shape {out.shape}, expected {shape}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise KernelError("out must be a writeable C-contiguous array")
    return out


def matvec(weight, x: np.ndarray, out: np.ndarray | None = None, *, quantize: bool = True) -> np.ndarray:
    """weight @ x for one float32 activation vector: float32[rows].

    With `quantize`, x is first rounded to 8 bits as llama.cpp rounds it for this weight type
    (activations.py); without, the product is exact to float32 rounding.
    """
    raw, qtype, rows, cols = _check_weight(weight)
    _check_activations("x", x, 1, cols, getattr(weight, "name", "the weight"))
    out = _check_out(out, (rows,))
    apply_threads()
    if quantize and qtype in INTEGER_PRODUCTS:
        INTEGER_PRODUCTS[qtype](_integer_raw(weight, raw, qtype), x[None], out[None])
        return out
    if quantize:
        x = quantize_activations(x, qtype)
    KERNELS[qtype][0](raw, x, out)
    return out


def matmul(weight, X: np.ndarray, out: np.ndarray | None = None, *, quantize: bool = True) -> np.ndarray:
    """X @ weight.T for n activation rows (1 <= n <= 512): float32[n, rows]; `quantize` as in matvec."""
    raw, qtype, rows, cols = _check_weight(weight)
    _check_activations("X", X, 2, cols, getattr(weight, "name", "the weight"))
    n = X.shape[0]
    if not 1 <= n <= MAX_MATMUL_ROWS:
        raise KernelError(f"matmul takes 1 to {MAX_MATMUL_ROWS} activation rows, got {n}")
    out = _check_out(out, (n, rows))
    if n == 1:
        matvec(weight, X[0], out[0], quantize=quantize)
        return out
    apply_threads()
    if quantize and qtype in INTEGER_PRODUCTS:
        INTEGER_PRODUCTS[qtype](_integer_raw(weight, raw, qtype), X, out)
        return out
    if quantize:
        X = quantize_activations(X, qtype)
    KERNELS[qtype][1](raw, X, out)
    return out


def embed(weight, ids, out: np.ndarray | None = None) -> np.ndarray:
    """Rows `ids` of the dequantized weight (an embedding lookup): float32[len(ids), cols]."""
    raw, qtype, rows, cols = _check_weight(weight)
    ids = np.asarray(ids)
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise KernelError(f"ids must be a 1-D sequence of integers, got shape {ids.shape} dtype {ids.dtype}")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= rows):
        bad = ids[(ids < 0) | (ids >= rows)][0]
        raise KernelError(f"id {bad} is out of range for {getattr(weight, 'name', 'the weight')} with {rows} rows")
    out = _check_out(out, (ids.shape[0], cols))
    KERNELS[qtype][2](raw, ids, out)
    return out
