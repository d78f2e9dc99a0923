"""Products for the unquantized formats F32, F16 and BF16 (kernel convention: see products.py).

The raw rows are bytes; each kernel reinterprets them in place (no copy). Half and bfloat16
conversions go through LLVM's own `fpext half` and a bit shift, so they are exact and
vectorize (F16C on x86).
"""

import numpy as np
from gguf import GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

_OPTIONS = dict(cache=True, nogil=True)


@intrinsic
def half_to_float(typingctx, bits):
    """float32 value of the IEEE half whose bit pattern is the low 16 bits of `bits`."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        (value,) = args
        width = signature.args[0].bitwidth
        if width > 16:
            value = builder.trunc(value, ir.IntType(16))
        elif width < 16:
            value = builder.zext(value, ir.IntType(16))
        return builder.fpext(builder.bitcast(value, ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def stored_to_float(typingctx, value):
    """float32 value of an element of a float32 or f16 store: float32 as it is, f16 given as
    its uint16 bit pattern (Numba has no float16 type), so one kernel body reads both."""
    if isinstance(value, types.Float) and value.bitwidth == 32:
        return types.float32(value), lambda context, builder, signature, args: args[0]
    if isinstance(value, types.Integer) and value.bitwidth == 16 and not value.signed:

        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        return types.float32(value), codegen
    return None


@intrinsic
def bfloat_to_float(typingctx, bits):
    """float32 value of the bfloat16 whose bit pattern is the low 16 bits of `bits`."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        (value,) = args
        width = signature.args[0].bitwidth
        i32 = ir.IntType(32)
        if width > 32:
            value = builder.trunc(value, i32)
        elif width < 32:
            value = builder.zext(value, i32)
        value = builder.shl(builder.and_(value, ir.Constant(i32, 0xFFFF)), ir.Constant(i32, 16))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def float_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of the integer `bits`."""
    if not isinstance(bits, types.Integer) or bits.bitwidth < 32:
        return None

    def codegen(context, builder, signature, args):
        (value,) = args
        if signature.args[0].bitwidth > 32:
            value = builder.trunc(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


@njit(nogil=True, inline="always")
def load_half(row, offset):
    """The f16 stored little-endian at row[offset:offset + 2] (an array or a raw pointer), as
    float32. Inlined at Numba level: the matvec loops call it per block."""
    return half_to_float(np.uint16(row[offset]) | (np.uint16(row[offset + 1]) << np.uint16(8)))


# F32


@njit(**_OPTIONS, parallel=True, fastmath=True)
def matvec_f32(raw, x, out):
    weights = raw.view(np.float32)
    for r in prange(weights.shape[0]):
        acc = np.float32(0.0)
        row = weights[r]
        for j in range(row.shape[0]):
            acc += row[j] * x[j]
        out[r] = acc


@njit(**_OPTIONS, parallel=True, fastmath=True)
def matmul_f32(raw, X, out):
    weights = raw.view(np.float32)
    for r in prange(weights.shape[0]):
        row = weights[r]
        for i in range(X.shape[0]):
            xi = X[i]
            acc = np.float32(0.0)
            for j in range(row.shape[0]):
                acc += row[j] * xi[j]
            out[i, r] = acc


@njit(**_OPTIONS)
def dequantize_rows_f32(raw, row_ids, out):
    weights = raw.view(np.float32)
    # An element loop: a slice assignment compiles Numba's shape-mismatch error formatting.
    for i in range(row_ids.shape[0]):
        row = weights[row_ids[i]]
        for j in range(row.shape[0]):
            out[i, j] = row[j]


# F16


@njit(**_OPTIONS, parallel=True, fastmath=True)
def matvec_f16(raw, x, out):
    weights = raw.view(np.uint16)
    for r in prange(weights.shape[0]):
        acc = np.float32(0.0)
        row = weights[r]
        for j in range(row.shape[0]):
            acc += half_to_float(row[j]) * x[j]
        out[r] = acc


@njit(**_OPTIONS)
def _decode_f16(row, out):
    for j in range(row.shape[0]):
        out[j] = half_to_float(row[j])


@njit(**_OPTIONS, parallel=True, fastmath=True)
def matmul_f16(raw, X, out):
    weights = raw.view(np.uint16)
    rows, cols = weights.shape
    chunk = 16
    for c in prange((rows + chunk - 1) // chunk):
        buffer = np.empty(cols, dtype=np.float32)
        for r in range(c * chunk, min(rows, (c + 1) * chunk)):
            _decode_f16(weights[r], buffer)
            for i in range(X.shape[0]):
                xi = X[i]
                acc = np.float32(0.0)
                for j in range(cols):
                    acc += buffer[j] * xi[j]
                out[i, r] = acc


@njit(**_OPTIONS)
def dequantize_rows_f16(raw, row_ids, out):
    weights = raw.view(np.uint16)
    for i in range(row_ids.shape[0]):
        _decode_f16(weights[row_ids[i]], out[i])


# BF16


@njit(**_OPTIONS, parallel=True, fastmath=True)
def matvec_bf16(raw, x, out):
    weights = raw.view(np.uint16)
    for r in prange(weights.shape[0]):
        acc = np.float32(0.0)
        row = weights[r]
        for j in range(row.shape[0]):
            acc += bfloat_to_float(row[j]) * x[j]
        out[r] = acc


@njit(**_OPTIONS)
def _decode_bf16(row, out):
    for j in range(row.shape[0]):
        out[j] = bfloat_to_float(row[j])


@njit(**_OPTIONS, parallel=True, fastmath=True)
def matmul_bf16(raw, X, out):
    weights = raw.view(np.uint16)
    rows, cols = weights.shape
    chunk = 16
    for c in prange((rows + chunk - 1) // chunk):
        buffer = np.empty(cols, dtype=np.float32)
        for r in range(c * chunk, min(rows, (c + 1) * chunk)):
            _decode_bf16(weights[r], buffer)
            for i in range(X.shape[0]):
                xi = X[i]
                acc = np.float32(0.0)
                for j in range(cols):
                    acc += buffer[j] * xi[j]
                out[i, r] = acc


@njit(**_OPTIONS)
def dequantize_rows_bf16(raw, row_ids, out):
    weights = raw.view(np.uint16)
    for i in range(row_ids.shape[0]):
        _decode_bf16(weights[row_ids[i]], out[i])


KERNELS = {
    GGMLQuantizationType.F32: (matvec_f32, matmul_f32, dequantize_rows_f32),
    GGMLQuantizationType.F16: (matvec_f16, matmul_f16, dequantize_rows_f16),
    GGMLQuantizationType.BF16: (matvec_bf16, matmul_bf16, dequantize_rows_bf16),
}
