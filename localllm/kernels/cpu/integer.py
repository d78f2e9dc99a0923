"""Integer matvec on AVX2: 8-bit weight codes times 8-bit activation codes, as llama.cpp does it.

The float kernels (kquants.py, legacy.py) convert every code to float32 and spend most of their
time on that conversion: they run at a quarter to a half of the memory bandwidth. llama.cpp
instead multiplies the integer codes of the weights by the integer codes of the activations
(rounded to 8 bits, activations.py) with `vpmaddubsw` (32 unsigned-by-signed byte products,
summed in pairs) and `vpmaddwd` (16-bit pairs times a sub-block scale, summed to 32 bits), and
goes to float once per block. Numba cannot express 8- and 16-bit vector arithmetic (its
integers are 64-bit), so each block's dot product here is an `@intrinsic` that emits the LLVM
vector IR directly, with the two instructions as `llvm.x86.avx2.*` intrinsics.

Every block's integer sum is exact, like llama.cpp's; the float side accumulates
`d_weight * d_activation * sum` in 8 vector lanes per row (`acc`, a stack buffer that LLVM keeps
in a register), reduced once per row. The constant offsets of the codes (-8, -16, -32) are
subtracted inside the integer sum through the activation code sums (Q8_0's block sums, Q8_K's
16-value bsums), so they stay exact too; Q4_K's mins meet the code sums in float, as in
llama.cpp. Q4_1 and Q5_1 are not here (see legacy.py).

Formats: Q4_0, Q5_0, Q8_0 (32-value blocks against Q8_0 activation codes) and Q4_K, Q6_K
(256-value blocks against Q8_K codes): what the catalog's models are made of. Only used when
Numba compiles for a host with AVX2 (`AVAILABLE`); elsewhere products.py keeps the float
kernels, which give the same results up to float32 rounding.
"""

import numpy as np
from gguf import GGMLQuantizationType
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import literally, njit, prange, types
from numba.core import cgutils, config
from numba.extending import intrinsic

from localllm.kernels.cpu.pointers import data_pointer, stack_pointer

# Numba targets the host CPU unless told otherwise (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES, e.g.
# for a portable cache); the AVX2 intrinsics only exist on an AVX2 target.
AVAILABLE = (config.CPU_NAME is None and config.CPU_FEATURES is None
             and "+avx2" in llvm_binding.get_host_cpu_features().flatten().split(","))

QK_K = 256
_ROW_CHUNK = 16

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32, _F16 = ir.FloatType(), ir.HalfType()


def _vector(element, count):
    return ir.VectorType(element, count)


def _splat(element, count, value):
    return ir.Constant(_vector(element, count), [value] * count)


def _load(builder, pointer, offset, element, count):
    """count elements of `element` type at byte pointer + offset (an int or an i64 value)."""
    if not isinstance(offset, ir.Value):
        offset = ir.Constant(_I64, offset)
    address = builder.gep(builder.bitcast(pointer, _I8.as_pointer()), [offset])
    return builder.load(builder.bitcast(address, _vector(element, count).as_pointer()), align=1)


def _pick(builder, vector, lanes):
    """A new vector of vector's lanes `lanes` (a list of indices)."""
    return builder.shuffle_vector(vector, vector, ir.Constant(_vector(_I32, len(lanes)), list(lanes)))


def _function(builder, name, result, arguments):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(result, arguments), name)


def _madd_unsigned_signed(builder, unsigned, signed):
    """vpmaddubsw: <32 x u8> times <32 x i8>, adjacent products summed to <16 x i16>."""
    fn = _function(builder, "llvm.x86.avx2.pmadd.ub.sw", _vector(_I16, 16), [_vector(_I8, 32)] * 2)
    return builder.call(fn, [unsigned, signed])


def _madd_words(builder, a, b):
    """vpmaddwd: <16 x i16> times <16 x i16>, adjacent products summed to <8 x i32>."""
    fn = _function(builder, "llvm.x86.avx2.pmadd.wd", _vector(_I32, 8), [_vector(_I16, 16)] * 2)
    return builder.call(fn, [a, b])


def _signed_dot(builder, weights, activations):
    """Pair sums <16 x i16> of two signed <32 x i8> vectors: vpmaddubsw needs one unsigned
    operand, so the weights' signs move onto the activations (|w| * sign(w) a)."""
    sign = _function(builder, "llvm.x86.avx2.psign.b", _vector(_I8, 32), [_vector(_I8, 32)] * 2)
    magnitude = _function(builder, "llvm.abs.v32i8", _vector(_I8, 32), [_vector(_I8, 32), ir.IntType(1)])
    unsigned = builder.call(magnitude, [weights, ir.Constant(ir.IntType(1), 0)])
    return _madd_unsigned_signed(builder, unsigned, builder.call(sign, [activations, weights]))


def _accumulate(builder, acc_pointer, scale, integer_sums):
    """acc[0:8] += scale * float(integer_sums), scale a float32 scalar."""
    pointer = builder.bitcast(acc_pointer, _vector(_F32, 8).as_pointer())
    scales = builder.insert_element(ir.Constant(_vector(_F32, 8), None), scale, ir.Constant(_I32, 0))
    scales = _pick(builder, scales, [0] * 8)
    product = builder.fmul(scales, builder.sitofp(integer_sums, _vector(_F32, 8)))
    builder.store(builder.fadd(builder.load(pointer, align=4), product), pointer, align=4)


def _half(builder, pointer, offset):
    return builder.fpext(builder.load(builder.bitcast(builder.gep(
        builder.bitcast(pointer, _I8.as_pointer()), [offset]), _F16.as_pointer()), align=1), _F32)


def _codes_at(builder, codes, offset):
    return builder.gep(builder.bitcast(codes, _I8.as_pointer()), [offset])


def _reduce(builder, vector):
    fn = _function(builder, "llvm.vector.reduce.add.v8i32", _I32, [_vector(_I32, 8)])
    return builder.call(fn, [vector])


# Q4_K (144 bytes): f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
# (byte l of chunk j: value 64j + l low, 64j + 32 + l high).


@intrinsic
def _q4_k_block(typingctx, weights, offset, codes, code_offset, sums16, sum_offset, d_x, acc):
    """Adds d * d_x * sum_j scale_j (nibbles_j . codes_j) to acc[0:8] for the Q4_K block at
    weights + offset against the 256 activation codes at codes + code_offset, and returns
    dmin * d_x * sum_j min_j * (sum of codes_j), from the 16-value code sums at sums16 + sum_offset."""
    def codegen(context, builder, signature, arguments):
        w, o, q, qo, sums, so, dx, acc_pointer = arguments
        q = _codes_at(builder, q, qo)
        block = builder.gep(w, [o])
        low_scales = _load(builder, block, 4, _I8, 4)
        low_mins = _load(builder, block, 8, _I8, 4)
        high = _load(builder, block, 12, _I8, 4)
        six_bits, four_bits, bits_4_5 = _splat(_I8, 4, 63), _splat(_I8, 4, 15), _splat(_I8, 4, 0x30)
        two, four = _splat(_I8, 4, 2), _splat(_I8, 4, 4)
        scales_4_7 = builder.or_(builder.and_(high, four_bits), builder.and_(builder.lshr(low_scales, two), bits_4_5))
        mins_4_7 = builder.or_(builder.lshr(high, four), builder.and_(builder.lshr(low_mins, two), bits_4_5))
        concatenate = ir.Constant(_vector(_I32, 8), list(range(8)))
        scales = builder.zext(builder.shuffle_vector(builder.and_(low_scales, six_bits), scales_4_7, concatenate),
                              _vector(_I16, 8))
        mins = builder.zext(builder.shuffle_vector(builder.and_(low_mins, six_bits), mins_4_7, concatenate),
                            _vector(_I32, 8))
        total = ir.Constant(_vector(_I32, 8), None)
        for j in range(4):
            packed = _load(builder, block, 16 + 32 * j, _I8, 32)
            nibbles = (builder.and_(packed, _splat(_I8, 32, 15)), builder.lshr(packed, _splat(_I8, 32, 4)))
            for half in range(2):
                pairs = _madd_unsigned_signed(builder, nibbles[half], _load(builder, q, 64 * j + 32 * half, _I8, 32))
                total = builder.add(total, _madd_words(builder, pairs, _pick(builder, scales, [2 * j + half] * 16)))
        _accumulate(builder, acc_pointer, builder.fmul(_half(builder, block, ir.Constant(_I64, 0)), dx), total)
        sums16 = _load(builder, builder.gep(sums, [so]), 0, _I32, 16)
        sums32 = builder.add(_pick(builder, sums16, range(0, 16, 2)), _pick(builder, sums16, range(1, 16, 2)))
        min_sum = builder.sitofp(_reduce(builder, builder.mul(mins, sums32)), _F32)
        return builder.fmul(builder.fmul(_half(builder, block, ir.Constant(_I64, 2)), dx), min_sum)
    return types.float32(weights, offset, codes, code_offset, sums16, sum_offset, d_x, acc), codegen


# Q6_K (210 bytes): 128 bytes of low nibbles, 64 bytes of high bit pairs, 16 int8 scales, f16 d.
# In half h (128 values), byte l of ql[64h:] / ql[64h + 32:] holds values l, l + 32 (low
# nibbles) and l + 64, l + 96 (high nibbles); byte l of qh[32h:] holds their two high bits at
# bits 0, 2, 4, 6. Scale i covers 16 values; the codes are 0..63 with an offset of -32.


@intrinsic
def _q6_k_block(typingctx, weights, offset, codes, code_offset, sums16, sum_offset, d_x, acc):
    """Adds d * d_x * sum_i scale_i ((q_i - 32) . codes_i) to acc[0:8] for the Q6_K block at
    weights + offset; the -32 goes through the 16-value code sums at sums16 + sum_offset."""
    def codegen(context, builder, signature, arguments):
        w, o, q, qo, sums, so, dx, acc_pointer = arguments
        q = _codes_at(builder, q, qo)
        block = builder.gep(w, [o])
        scales = builder.sext(_load(builder, block, 192, _I8, 16), _vector(_I16, 16))
        low_nibble, field = _splat(_I8, 32, 15), _splat(_I8, 32, 0x30)
        total = ir.Constant(_vector(_I32, 8), None)
        for h in range(2):
            low_a = _load(builder, block, 64 * h, _I8, 32)
            low_b = _load(builder, block, 64 * h + 32, _I8, 32)
            high = _load(builder, block, 128 + 32 * h, _I8, 32)
            values = (
                builder.or_(builder.and_(low_a, low_nibble), builder.and_(builder.shl(high, _splat(_I8, 32, 4)), field)),
                builder.or_(builder.and_(low_b, low_nibble), builder.and_(builder.shl(high, _splat(_I8, 32, 2)), field)),
                builder.or_(builder.lshr(low_a, _splat(_I8, 32, 4)), builder.and_(high, field)),
                builder.or_(builder.lshr(low_b, _splat(_I8, 32, 4)), builder.and_(builder.lshr(high, _splat(_I8, 32, 2)), field)),
            )
            for m, value in enumerate(values):
                pairs = _madd_unsigned_signed(builder, value, _load(builder, q, 128 * h + 32 * m, _I8, 32))
                first = 8 * h + 2 * m
                total = builder.add(total, _madd_words(builder, pairs, _pick(builder, scales, [first] * 8 + [first + 1] * 8)))
        # |sum of 16 codes| <= 2032 fits 16 bits.
        code_sums = builder.trunc(_load(builder, builder.gep(sums, [so]), 0, _I32, 16), _vector(_I16, 16))
        offsets = builder.shl(_madd_words(builder, code_sums, scales), _splat(_I32, 8, 5))
        _accumulate(builder, acc_pointer, builder.fmul(_half(builder, block, ir.Constant(_I64, 208)), dx),
                    builder.sub(total, offsets))
        return context.get_dummy_value()
    return types.void(weights, offset, codes, code_offset, sums16, sum_offset, d_x, acc), codegen


# The 32-value formats (layouts in legacy.py): where the fifth-bit word (Q5_0) and the codes
# sit in a block, the constant offset of the codes, and the bytes per block.
_Q4_0, _Q5_0, _Q8_0 = range(3)
_LEGACY = {_Q4_0: (None, 2, 8), _Q5_0: (2, 6, 16), _Q8_0: (None, 2, 0)}
_LEGACY_BYTES = (18, 22, 34)


@intrinsic
def _legacy_block(typingctx, kind, weights, offset, codes, code_offset, code_sum, d_x, acc):
    """Adds d * d_x * (block values . activation codes) to acc[0:8] for the block of format
    `kind` (a compile-time constant) at weights + offset; the codes' constant offset goes
    through code_sum, the sum of the block's activation codes."""
    if not isinstance(kind, types.IntegerLiteral):
        return None
    bits_at, codes_at, value_offset = _LEGACY[kind.literal_value]
    is_q8_0 = kind.literal_value == _Q8_0

    def codegen(context, builder, signature, arguments):
        _, w, o, q, qo, code_total, dx, acc_pointer = arguments
        activations = _load(builder, _codes_at(builder, q, qo), 0, _I8, 32)
        block = builder.gep(w, [o])
        if is_q8_0:
            pairs = _signed_dot(builder, _load(builder, block, codes_at, _I8, 32), activations)
        else:
            packed = _load(builder, block, codes_at, _I8, 16)
            low = builder.and_(packed, _splat(_I8, 16, 15))
            high = builder.lshr(packed, _splat(_I8, 16, 4))
            values = builder.shuffle_vector(low, high, ir.Constant(_vector(_I32, 32), list(range(32))))
            if bits_at is not None:
                bits = builder.load(builder.bitcast(builder.gep(block, [ir.Constant(_I64, bits_at)]),
                                                    _I32.as_pointer()), align=1)
                fifth = builder.zext(builder.bitcast(bits, _vector(ir.IntType(1), 32)), _vector(_I8, 32))
                values = builder.or_(values, builder.shl(fifth, _splat(_I8, 32, 4)))
            pairs = _madd_unsigned_signed(builder, values, activations)
        total = _madd_words(builder, pairs, _splat(_I16, 16, 1))
        if value_offset:
            offset_sum = builder.mul(code_total, ir.Constant(_I32, value_offset))
            total = builder.sub(total, builder.insert_element(
                ir.Constant(_vector(_I32, 8), None), offset_sum, ir.Constant(_I32, 0)))
        _accumulate(builder, acc_pointer, builder.fmul(_half(builder, block, ir.Constant(_I64, 0)), dx), total)
        return context.get_dummy_value()
    return types.void(kind, weights, offset, codes, code_offset, code_sum, d_x, acc), codegen


@njit(nogil=True, inline="always")
def _lanes_total(acc):
    total = np.float32(0.0)
    for lane in range(8):
        total += acc[lane]
    return total


@njit(cache=True, nogil=True, parallel=True)
def matvec_q4_k(raw, codes, scales, sums16, out):
    rows, row_bytes = raw.shape
    n_blocks = row_bytes // 144
    for chunk in prange((rows + _ROW_CHUNK - 1) // _ROW_CHUNK):
        acc = stack_pointer(8)
        p = data_pointer(raw)
        qp = data_pointer(codes)
        sp = data_pointer(sums16)
        for r in range(chunk * _ROW_CHUNK, min(rows, (chunk + 1) * _ROW_CHUNK)):
            for lane in range(8):
                acc[lane] = 0.0
            shifted = np.float32(0.0)
            for k in range(n_blocks):
                shifted += _q4_k_block(p, r * row_bytes + k * 144, qp, k * QK_K, sp, k * 16, scales[k], acc)
            out[r] = _lanes_total(acc) - shifted


@njit(cache=True, nogil=True, parallel=True)
def matvec_q6_k(raw, codes, scales, sums16, out):
    rows, row_bytes = raw.shape
    n_blocks = row_bytes // 210
    for chunk in prange((rows + _ROW_CHUNK - 1) // _ROW_CHUNK):
        acc = stack_pointer(8)
        p = data_pointer(raw)
        qp = data_pointer(codes)
        sp = data_pointer(sums16)
        for r in range(chunk * _ROW_CHUNK, min(rows, (chunk + 1) * _ROW_CHUNK)):
            for lane in range(8):
                acc[lane] = 0.0
            for k in range(n_blocks):
                _q6_k_block(p, r * row_bytes + k * 210, qp, k * QK_K, sp, k * 16, scales[k], acc)
            out[r] = _lanes_total(acc)


@njit(cache=True, nogil=True, parallel=True)
def _legacy_matvec(raw, codes, scales, sums32, out, kind):
    """`kind` is a compile-time constant: each format gets its own specialization."""
    literally(kind)
    block_bytes = _LEGACY_BYTES[kind]
    rows, row_bytes = raw.shape
    n_blocks = row_bytes // block_bytes
    for chunk in prange((rows + _ROW_CHUNK - 1) // _ROW_CHUNK):
        acc = stack_pointer(8)
        p = data_pointer(raw)
        qp = data_pointer(codes)
        for r in range(chunk * _ROW_CHUNK, min(rows, (chunk + 1) * _ROW_CHUNK)):
            for lane in range(8):
                acc[lane] = 0.0
            for k in range(n_blocks):
                _legacy_block(kind, p, r * row_bytes + k * block_bytes, qp, k * 32, sums32[k], scales[k], acc)
            out[r] = _lanes_total(acc)


@njit(cache=True, nogil=True)
def matvec_q4_0(raw, codes, scales, sums, out):
    _legacy_matvec(raw, codes, scales, sums, out, _Q4_0)


@njit(cache=True, nogil=True)
def matvec_q5_0(raw, codes, scales, sums, out):
    _legacy_matvec(raw, codes, scales, sums, out, _Q5_0)


@njit(cache=True, nogil=True)
def matvec_q8_0(raw, codes, scales, sums, out):
    _legacy_matvec(raw, codes, scales, sums, out, _Q8_0)


Q = GGMLQuantizationType
# matvec(raw, codes int8[cols], scales float32[blocks], code sums int32[cols / 16 (K formats)
# or cols / 32], out float32[rows]); activations.activation_codes makes the three inputs.
KERNELS = {
    Q.Q4_0: matvec_q4_0, Q.Q5_0: matvec_q5_0, Q.Q8_0: matvec_q8_0, Q.Q4_K: matvec_q4_k, Q.Q6_K: matvec_q6_k,
}
