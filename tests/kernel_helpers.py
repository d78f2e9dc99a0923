"""Shared helpers for the kernel tests: random quantized weights and error measures.

Random blocks are random bytes whose f16 scale fields are overwritten with finite, modest
values, so every bit pattern of the quantized payload is exercised while the dequantized
weights stay in a range where float32 arithmetic is meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as reference_dequantize

from localllm.formats.quants import ACTIVATION_LAYOUTS, LAYOUTS

Q = GGMLQuantizationType

FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)

# Byte offsets, inside one block, of the f16 scale/min fields (test_block_table checks the
# layouts against ggml's block structs).
F16_FIELDS: dict[GGMLQuantizationType, tuple[int, ...]] = {
    qtype: tuple(field.offset for field in layout.scale_fields)
    for qtype, layout in LAYOUTS.items()
    if qtype not in FLOAT_TYPES
}


@dataclass
class RawWeight:
    """Stand-in for localllm.formats.gguf.Tensor built from bytes in memory."""

    type: GGMLQuantizationType
    raw: np.ndarray
    shape: tuple[int, int]
    name: str = "random"

    def dequantize(self) -> np.ndarray:
        return reference_dequantize(self.raw, self.type).reshape(self.shape).astype(np.float32)


def block_size(qtype: GGMLQuantizationType) -> int:
    return LAYOUTS[qtype].block_size


def random_weight(
    qtype: GGMLQuantizationType, rows: int, blocks_per_row: int, seed: int = 0, scale: float = 0.05
) -> RawWeight:
    """A (rows, blocks_per_row * block_size) weight of random blocks of `qtype`."""
    rng = np.random.default_rng(seed)
    elements_per_block, bytes_per_block = LAYOUTS[qtype].block_size, LAYOUTS[qtype].type_size
    cols = blocks_per_row * elements_per_block
    if qtype in FLOAT_TYPES:
        values = rng.standard_normal((rows, cols)).astype(np.float32)
        if qtype == Q.F32:
            raw = values.view(np.uint8)
        elif qtype == Q.F16:
            raw = values.astype(np.float16).view(np.uint8)
        else:
            raw = (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return RawWeight(qtype, np.ascontiguousarray(raw.reshape(rows, -1)), (rows, cols))
    blocks = rng.integers(0, 256, size=(rows * blocks_per_row, bytes_per_block), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        halves = rng.uniform(scale / 20, scale, size=rows * blocks_per_row)
        halves *= rng.choice([-1.0, 1.0], size=halves.shape)
        blocks[:, offset : offset + 2] = halves.astype(np.float16).view(np.uint8).reshape(-1, 2)
    raw = blocks.reshape(rows, blocks_per_row * bytes_per_block)
    return RawWeight(qtype, raw, (rows, cols))


def random_activations(n: int, cols: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, cols)).astype(np.float32)


def relative_error(y: np.ndarray, y_ref: np.ndarray) -> float:
    """‖y − y_ref‖ / ‖y_ref‖ computed in float64."""
    y = np.asarray(y, dtype=np.float64)
    y_ref = np.asarray(y_ref, dtype=np.float64)
    return float(np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref))


def reference_product(weights: np.ndarray, X: np.ndarray) -> np.ndarray:
    """X @ weights.T in float64: (n, cols) x (rows, cols) -> (n, rows)."""
    return np.asarray(X, dtype=np.float64) @ np.asarray(weights, dtype=np.float64).T


def llama_activations(X: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """X rounded to 8 bits the way llama.cpp rounds activations for `qtype` weights, written
    independently of the kernels: ggml's x86/NEON quantize_row_q8_0 (ties to even, unlike the
    scalar reference that gguf.quants follows) for the 32-value formats, quantize_row_q8_K
    (iscale = -127 / signed max, clamp at 127) for the 256-value ones."""
    X = np.asarray(X, dtype=np.float32)
    if qtype in FLOAT_TYPES:
        return X
    activation = LAYOUTS[qtype].activation
    block = ACTIVATION_LAYOUTS[activation].block_size
    if activation != Q.Q8_K:
        blocks = X.reshape(-1, block)
        amax = np.abs(blocks).max(axis=1, keepdims=True)
        scale = (amax / np.float32(127.0)).astype(np.float16).astype(np.float32)
        with np.errstate(divide="ignore"):
            inverse = np.where(amax == 0, np.float32(0.0), np.float32(127.0) / amax).astype(np.float32)
        return (np.rint(blocks * inverse) * scale).astype(np.float32).reshape(X.shape)
    blocks = X.reshape(-1, block)
    signed_max = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(axis=1)]
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.float32(-127.0) / signed_max
        q = np.minimum(np.float32(127.0), np.rint(iscale[:, None] * blocks))
        values = q * (np.float32(1.0) / iscale)[:, None]
    return np.where(signed_max[:, None] == 0, np.float32(0.0), values).astype(np.float32).reshape(X.shape)


def llama_product(weight, dequantized: np.ndarray, X: np.ndarray) -> np.ndarray:
    """X @ dequantized.T in float64 with X rounded as llama.cpp rounds it for the weight's
    type. For Q4_1 and Q5_1, ggml's Q8_1 activations also carry s = f16(amax / 127 * sum of
    codes) per block, and the weights' m multiplies s instead of the rounded values' sum."""
    rounded = llama_activations(X, weight.type)
    layout = LAYOUTS[weight.type]
    if layout.activation != Q.Q8_1:
        return reference_product(dequantized, rounded)
    rows, cols = dequantized.shape
    blocks = np.asarray(X, dtype=np.float32).reshape(X.shape[0], -1, layout.block_size)
    amax = np.abs(blocks).max(axis=2)
    with np.errstate(divide="ignore"):
        inverse = np.where(amax == 0, np.float32(0.0), np.float32(127.0) / amax).astype(np.float32)
    code_sums = np.rint(blocks * inverse[:, :, None]).sum(axis=2).astype(np.float32)
    s = (amax / np.float32(127.0) * code_sums).astype(np.float16).astype(np.float64)
    m_at = layout.field("m").offset
    blocks_m = weight.raw.reshape(rows, -1, layout.type_size)[:, :, m_at : m_at + 2]
    m = blocks_m.copy().view(np.float16)[:, :, 0].astype(np.float64)
    without_m = np.asarray(dequantized, dtype=np.float64) - np.repeat(m, layout.block_size, axis=1)
    return reference_product(without_m, rounded) + s @ m.T


def product_errors(weight, dequantized: np.ndarray, X: np.ndarray) -> tuple[float, float]:
    """Relative errors of matmul (matvec for one row) against float64 NumPy: exact float32
    activations, then llama.cpp's 8-bit activations against the same rounding done in NumPy."""
    from localllm.kernels.cpu import matmul, matvec

    def product(quantize):
        if X.shape[0] == 1:
            return matvec(weight, X[0], quantize=quantize)[None]
        return matmul(weight, X, quantize=quantize)

    from localllm.kernels.cpu.products import INTEGER_PRODUCTS

    exact = relative_error(product(False), reference_product(dequantized, X))
    if weight.type in INTEGER_PRODUCTS:
        want = llama_product(weight, dequantized, X)
    else:
        want = reference_product(dequantized, llama_activations(X, weight.type))
    quantized = relative_error(product(True), want)
    return exact, quantized
