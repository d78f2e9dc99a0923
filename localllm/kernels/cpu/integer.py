"""Integer products on AVX2: 8-bit weight codes times 8-bit activation codes, as llama.cpp does it.

The float kernels (kquants.py, legacy.py) convert every code to float32 and spend most of their
time on that conversion: their matvecs ran at 0.3 (TQ1_0) to 7 (Q5_1) GB/s. llama.cpp
instead multiplies the integer codes of the weights by the integer codes of the activations
(rounded to 8 bits, activations.py) with `vpmaddubsw` (32 unsigned-by-signed byte products,
summed in pairs) and `vpmaddwd` (16-bit pairs times a sub-block scale, summed to 32 bits), and
goes to float once per block. Numba cannot express 8- and 16-bit vector arithmetic (its
integers are 64-bit), so a block's dot product here is an `@intrinsic` that emits the LLVM
vector IR directly, with those two instructions as `llvm.x86.avx2.*` intrinsics.

Every block's integer sums are exact, in llama.cpp's lanes; the float side does what ggml's
AVX2 vec_dot does: `acc = fma(d_weight * d_activation, float(lane sums), acc)` in 8 lanes per
row (a stack buffer that LLVM keeps in registers), reduced once per row. The constant offsets
of the codes (-1, -4, -8, -16, -32) are subtracted inside the integer sums through the
activation code sums (Q8_0's block sums, Q8_K's 16-value bsums); Q2_K's and Q4_K's mins meet the
code sums in their own lanes; Q4_1's and Q5_1's m meets ggml's Q8_1 block sums
s = f16(d_x * sum of codes), as in ggml. Lanes are reduced in ggml's hsum_float_8 order.
(Plain multiply-then-add instead of the FMA cost Qwen2.5-0.5B a near-tie greedy continuation
of llama.cpp's reference; Q4_1 with exact block sums instead of s, or without the hsum order,
or two blocks at a time, cost SmolLM2 one or two.) Q4_K, Q5_K and Q6_K leave ggml's lanes: their
codes are repacked once per weight (pack()) so that each 32-bit lane holds one sub-block and
the sub-block scales apply once per lane instead of once per 32 codes (see
_sub_blocks_in_lanes); each block's total is the same integer, the float rounding across lanes
differs, within the reference tolerances. TQ1_0 and TQ2_0 take each block's total as one
integer and meet it with one multiply-add per row and block; with AVX-512 VNNI (and VBMI for
TQ1_0) their rows are interleaved by sixteen (pack()), a 32-bit lane per row
(_row_group_codegen), and so are Q4_K's and Q6_K's, each row keeping the float lanes of its
file-layout kernel (_q4_k_row_group_codegen, _q6_k_row_group_codegen).

One kernel per format serves decoding (one activation row) and prefill (n rows): a tile of four
activation rows meets each weight block once it is decoded, and a chunk of weight rows is the
parallel work item. A product is bit-identical whether its activation row came alone or in a
tile. Each block's weight bytes are prefetched 2 KB ahead: the hardware prefetchers alone kept
a matvec from DRAM a quarter below the streaming read rate. Q5_0, whose per-block work is the
heaviest for its size, takes blocks two at a time where a row has an even number of them (its
lanes, and so its float rounding, then differ from ggml's; the totals of each block are the
same integers).

Formats: every block format. Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 (32-value blocks) take Q8_0 or
Q8_1 activation codes; Q2_K..Q6_K, TQ1_0 and TQ2_0 (256-value blocks) take Q8_K codes. Only
used when Numba compiles for a host with AVX2 (`AVAILABLE`); elsewhere products.py keeps the
float kernels, which give the same results up to float32 rounding.
"""

import numpy as np
from gguf import GGMLQuantizationType
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import literally, njit, prange, types
from numba.core import cgutils, config
from numba.extending import intrinsic

from localllm.formats.quants import LAYOUTS, k_scales_mins
from localllm.kernels.cpu.activations import Q8_0_BLOCK, Q8_K_BLOCK, Q8_K_SUM_GROUP, codes_of
from localllm.kernels.cpu.pointers import data_pointer, stack_pointer

Q = GGMLQuantizationType

# Numba targets the host CPU unless told otherwise: NUMBA_CPU_FEATURES (with NUMBA_CPU_NAME, e.g.
# a generic AVX2 target for a portable cache, or to test the AVX2 path on an AVX-512 host)
# replaces the host's features. The AVX2 intrinsics only exist on an AVX2 target, and _halves
# uses F16C; a CPU name given without its features leaves the target unknown, so float kernels.
if config.CPU_FEATURES is not None:
    _TARGET_FEATURES = config.CPU_FEATURES.split(",")
elif config.CPU_NAME is None:
    _TARGET_FEATURES = llvm_binding.get_host_cpu_features().flatten().split(",")
else:
    _TARGET_FEATURES = []
AVAILABLE = "+avx2" in _TARGET_FEATURES and "+f16c" in _TARGET_FEATURES
# 8-bit and 16-bit dot products that add into 32-bit lanes in one instruction (vpdpbusd,
# vpdpwssd): AVX-512 VNNI on 256-bit vectors (with AVX-512 VL), or AVX-VNNI.
HAS_VNNI = AVAILABLE and ({"+avx512vnni", "+avx512vl"} <= set(_TARGET_FEATURES) or "+avxvnni" in _TARGET_FEATURES)
# vpdpbusd on 64-byte vectors: the ternary formats' row-interleaved kernels.
HAS_VNNI_512 = AVAILABLE and {"+avx512f", "+avx512bw", "+avx512vnni"} <= set(_TARGET_FEATURES)
# Byte permutes across 64-byte vectors (vpermi2b): TQ1_0's digits by table lookup.
HAS_VBMI = HAS_VNNI_512 and "+avx512vbmi" in _TARGET_FEATURES

# _halves emits inline assembly, which LLVM parses only with the host's assembly parser.
llvm_binding.initialize_native_asmparser()

_ROW_CHUNK = 16
# How far ahead of the block being multiplied its weight bytes are prefetched. Two threads,
# 8960x1536 matvecs over 1 GB of weights (benchmarks/kernels.py), without -> with: Q6_K 23.7 ->
# 31.6 GB/s, Q8_0 23.5 -> 28.0, Q4_K 20.9 -> 26.9 (streaming sum: 32-34). 4 KB ahead measured
# the same; one prefetch per block instead of per cache line made 144-byte Q4_K slower.
_PREFETCH_BYTES = 2048

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32 = ir.FloatType()


def _vector(element, count):
    return ir.VectorType(element, count)


def _splat(element, count, value):
    return ir.Constant(_vector(element, count), [value] * count)


def _address(builder, pointer, offset):
    """The i8* at byte pointer + offset (an int or an i64 value)."""
    if not isinstance(offset, ir.Value):
        offset = ir.Constant(_I64, offset)
    return builder.gep(builder.bitcast(pointer, _I8.as_pointer()), [offset])


def _load(builder, pointer, offset, element, count):
    """count elements of `element` type at byte pointer + offset (an int or an i64 value)."""
    address = _address(builder, pointer, offset)
    return builder.load(builder.bitcast(address, _vector(element, count).as_pointer()), align=1)


def _pick(builder, vector, lanes):
    """A new vector of vector's lanes `lanes` (a list of indices)."""
    return builder.shuffle_vector(vector, vector, ir.Constant(_vector(_I32, len(lanes)), list(lanes)))


def _broadcast(builder, scalar, count):
    """`scalar` (an i32 or a float) in all `count` lanes."""
    vector = _vector(scalar.type, count)
    return _pick(builder, builder.insert_element(ir.Constant(vector, None), scalar, ir.Constant(_I32, 0)), [0] * count)


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


def _dot_bytes(builder, vnni, total, unsigned, signed):
    """total (<8 x i32>, or None for zeros) plus, in 32-bit lane j, the sum of the four products
    of bytes 4j..4j+3 of <32 x u8> `unsigned` and <32 x i8> `signed`: one vpdpbusd with VNNI,
    else vpmaddubsw, vpmaddwd by ones and an add. The same integers either way: no pair sum of
    our codes reaches vpmaddubsw's 16-bit saturation (at most 2 * 128 * 127)."""
    if total is None:
        total = ir.Constant(_vector(_I32, 8), None)
    if vnni:
        fn = _function(builder, "llvm.x86.avx512.vpdpbusd.256", _vector(_I32, 8), [_vector(_I32, 8)] * 3)
        return builder.call(
            fn, [total, builder.bitcast(unsigned, _vector(_I32, 8)), builder.bitcast(signed, _vector(_I32, 8))]
        )
    pairs = _madd_unsigned_signed(builder, unsigned, signed)
    return builder.add(total, _madd_words(builder, pairs, _splat(_I16, 16, 1)))


def _dot_words(builder, vnni, total, a, b):
    """total plus vpmaddwd(a, b) (<16 x i16> operands): one vpdpwssd with VNNI."""
    if vnni:
        fn = _function(builder, "llvm.x86.avx512.vpdpwssd.256", _vector(_I32, 8), [_vector(_I32, 8)] * 3)
        return builder.call(fn, [total, builder.bitcast(a, _vector(_I32, 8)), builder.bitcast(b, _vector(_I32, 8))])
    return builder.add(total, _madd_words(builder, a, b))


def _signed_operands(builder, weights, activations):
    """(|w|, sign(w) a) for two signed <32 x i8> vectors: the byte products need one unsigned
    operand, so the weights' signs move onto the activations."""
    sign = _function(builder, "llvm.x86.avx2.psign.b", _vector(_I8, 32), [_vector(_I8, 32)] * 2)
    magnitude = _function(builder, "llvm.abs.v32i8", _vector(_I8, 32), [_vector(_I8, 32), ir.IntType(1)])
    unsigned = builder.call(magnitude, [weights, ir.Constant(ir.IntType(1), 0)])
    return unsigned, builder.call(sign, [activations, weights])


def _accumulate(builder, acc_pointer, scale, integer_sums):
    """acc[0:8] += scale * float(integer_sums), scale a float32 scalar or <8 x float>."""
    pointer = builder.bitcast(acc_pointer, _vector(_F32, 8).as_pointer())
    scales = scale if isinstance(scale.type, ir.VectorType) else _broadcast(builder, scale, 8)
    fma = _function(builder, "llvm.fma.v8f32", _vector(_F32, 8), [_vector(_F32, 8)] * 3)
    total = builder.call(fma, [scales, builder.sitofp(integer_sums, _vector(_F32, 8)), builder.load(pointer, align=4)])
    builder.store(total, pointer, align=4)


def _halves(builder, pointer, offset):
    """The two f16 values at byte pointer + offset (offset an int), as float32s.

    One vcvtph2ps that reads 8 bytes from memory, written as inline assembly so that LLVM keeps
    it: left to itself, LLVM loads the f16 with vpinsrw, which merges into whatever register it
    picks, and where that register was in use the false dependency cost Q4_1 and Q5_0 up to a
    third of their speed (depending on each compile's register allocation). Every caller's
    block has 8 bytes from `offset` on."""
    convert = ir.FunctionType(_vector(_F32, 4), [_I8.as_pointer()])
    floats = builder.asm(convert, "vcvtph2ps ($1), $0", "=x,r", [_address(builder, pointer, offset)], side_effect=False)
    return [builder.extract_element(floats, ir.Constant(_I32, i)) for i in range(4)]


def _block_halves(builder, block, qtype, *names):
    """The named f16 fields of a `qtype` block as float32s, from one _halves load that stays
    inside the block: it starts at the first of them, or ends with the block's last bytes."""
    layout = LAYOUTS[qtype]
    offsets = layout.offsets(*names)
    start = min(min(offsets), layout.type_size - 8)
    halves = _halves(builder, block, start)
    return [halves[(offset - start) // 2] for offset in offsets]


class _Bytes:
    """An LLVM integer vector with the operators k_scales_mins uses (integer operands splat), so
    that one statement of the Q4_K/Q5_K scale packing also unpacks four blocks' bytes here. Each
    operation is emitted when its value is first asked for: the caller sets the IR's order."""

    def __init__(self, builder, emit):
        self.builder, self._emit, self._value = builder, emit, None

    @property
    def value(self):
        if self._value is None:
            self._value = self._emit()
        return self._value

    def _apply(self, operation, other):
        def emit():
            left = self.value
            right = other.value if isinstance(other, _Bytes) else _splat(left.type.element, left.type.count, other)
            return operation(left, right)

        return _Bytes(self.builder, emit)

    def __and__(self, other):
        return self._apply(self.builder.and_, other)

    def __or__(self, other):
        return self._apply(self.builder.or_, other)

    def __rshift__(self, other):
        return self._apply(self.builder.lshr, other)


def _word_splats(builder, words, lanes):
    """<16 x i16> vectors with words[lanes[k]] in 16-bit lane k (each index < 8 within each
    128-bit half: [i] * 16, or [i] * 8 + [j] * 8), from <8 x i16> `words`.

    One in-lane vpshufb each from the words copied into both halves, as inline assembly: LLVM
    turns a shuffle intrinsic back into its own lowering of splats, a shift and a vpbroadcastw
    per vector, on the same two shuffle ports."""
    doubled = builder.bitcast(
        builder.shuffle_vector(words, words, ir.Constant(_vector(_I32, 16), list(range(8)) * 2)), _vector(_I8, 32)
    )
    shuffle = ir.FunctionType(_vector(_I8, 32), [_vector(_I8, 32)] * 2)
    splats = []
    for indices in lanes:
        mask = ir.Constant(_vector(_I8, 32), [byte for word in indices for byte in (2 * word, 2 * word + 1)])
        splat = builder.asm(shuffle, "vpshufb $2, $1, $0", "=x,x,x", [doubled, mask], side_effect=False)
        splats.append(builder.bitcast(splat, _vector(_I16, 16)))
    return splats


class _Rows:
    """IR access to activation row `first + t` of an intrinsic's tile at block k: its codes,
    code sums and scale (codes: int8[n, cols], sums: [n, cols / group] (int16 for the K
    formats, int32 or float32 for the 32-value ones), scales: float32[n, cols / block], all
    C-contiguous with `n_blocks` blocks per row)."""

    def __init__(self, builder, codes, sums, scales, first, n_blocks, k, block, sum_group):
        self.builder, self.codes, self.sums, self.scales = builder, codes, sums, scales
        self.first, self.n_blocks, self.k = first, n_blocks, k
        self.block, self.sum_group = block, sum_group

    def _index(self, t):
        b = self.builder
        return b.add(b.mul(b.add(self.first, ir.Constant(_I64, t)), self.n_blocks), self.k)

    def codes_at(self, t):
        b = self.builder
        return b.gep(b.bitcast(self.codes, _I8.as_pointer()), [b.mul(self._index(t), ir.Constant(_I64, self.block))])

    def sums_at(self, t):
        b = self.builder
        per_block = self.block // self.sum_group
        return b.gep(self.sums, [b.mul(self._index(t), ir.Constant(_I64, per_block))])

    def scale(self, t):
        b = self.builder
        return b.load(b.gep(self.scales, [self._index(t)]))

    def scale_of(self, t, i, per_block):
        """Activation scale i of the `per_block` that block k spans (a block of several of
        the activations' blocks)."""
        b = self.builder
        index = b.add(b.mul(self._index(t), ir.Constant(_I64, per_block)), ir.Constant(_I64, i))
        return b.load(b.gep(self.scales, [index]))

    def lane_scales(self, t):
        """<8 x float> at scales[8 * index]: the paired formats' per-lane activation scales."""
        b = self.builder
        return _load(b, b.gep(self.scales, [b.mul(self._index(t), ir.Constant(_I64, 8))]), 0, _F32, 8)


def _prefetch_ahead(builder, block, block_bytes):
    """Prefetch every cache line of the block _PREFETCH_BYTES on (past a row's end, the next
    rows'; an x86 prefetch of an address outside the map does not fault)."""
    _prefetch_lines(builder, block, _PREFETCH_BYTES, range(block_bytes // 64))


def _prefetch_lines(builder, block, distance, lines):
    prefetch = _function(builder, "llvm.prefetch.p0i8", ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32])
    for line in lines:
        ahead = _address(builder, block, distance + 64 * line)
        # read, keep in all cache levels, data
        builder.call(prefetch, [ahead, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _acc_at(builder, acc, lane):
    return builder.gep(acc, [ir.Constant(_I64, lane)])


def _or_where_bit_set(builder, values, bits, value):
    """values[i] |= `value` in each byte whose byte of `bits` (<32 x i8>) has bit i set: the
    extra high bit of Q5_K's (16) and Q3_K's (4) codes, bit i for sub-block i."""
    for i in range(len(values)):
        is_set = builder.icmp_unsigned("!=", builder.and_(bits, _splat(_I8, 32, 1 << i)), _splat(_I8, 32, 0))
        values[i] = builder.or_(values[i], builder.and_(builder.sext(is_set, _vector(_I8, 32)), _splat(_I8, 32, value)))


def _sixteen_scale_splats(builder, scales):
    """For 16 scales of 16 values each (<16 x i16>), the vpmaddwd operand of each 32-value
    vector: scale 2i in its first 128-bit half, 2i + 1 in its second."""
    splats = []
    for half in range(2):
        words = _pick(builder, scales, range(8 * half, 8 * half + 8))
        splats += _word_splats(builder, words, [[2 * i] * 8 + [2 * i + 1] * 8 for i in range(4)])
    return splats


def _scaled_dot(builder, vnni, values, codes, splats):
    """<8 x i32> sum over i of splats[i] times the pair sums of values[i] . 32 activation codes
    at codes + 32 i."""
    # Integer sums are exact in any order: with VNNI, two chains of vpdpwssd (latency 5 each)
    # instead of one halve the wait.
    chains = [ir.Constant(_vector(_I32, 8), None)] * (2 if vnni else 1)
    for i, value in enumerate(values):
        pairs = _madd_unsigned_signed(builder, value, _load(builder, codes, 32 * i, _I8, 32))
        chain = i % len(chains)
        chains[chain] = _dot_words(builder, vnni, chains[chain], pairs, splats[i])
    return chains[0] if len(chains) == 1 else builder.add(*chains)


# Q4_K: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles; Q5_K has 32
# bytes of fifth bits between the scales and the nibbles. In the file, byte l of nibble chunk c
# holds value 64c + l (low) and 64c + 32 + l (high), and bit i of fifth-bit byte l value 32i + l.
# The kernels take the nibbles and fifth bits repacked (pack(), once per weight) to hold the
# eight vectors of _lane_values(32) instead: 32-bit lane j of each holds codes of sub-block j
# (values 32j..32j+31) only, chunk c's low nibbles vector 2c, its high nibbles vector 2c + 1,
# bit m of a fifth-bit byte vector m. The activation codes are laid out to match. Eight
# vpdpbusd then leave sub-block j's whole dot product in lane j, and one vpmulld by the eight
# scales weighs them: per activation row 8 + 1 multiplies, where the file's layout needs 8
# vpmaddubsw and 8 vpdpwssd by splatted scales (one Zen 4 core, a tile of four rows: 11.5
# cycles a block and row against 15.8). Per activation row, acc[0:8] gets
# d * d_x * scale_j (values_j . codes_j) and acc[8:16] dmin * d_x * min_j * sum(codes_j),
# lane j for sub-block j.


def _lane_values(group: int) -> np.ndarray:
    """For byte 32m + 4j + b of a K-quant block's eight 32-byte code vectors (m the vector, j
    its 32-bit lane), the value it holds when lane j holds sub-block j (of `group` = 32 or 16
    values; with 16, vectors 4..7 hold sub-blocks 8..15)."""
    vectors_per_sub_block = group // 4
    order = np.empty(Q8_K_BLOCK, dtype=np.int64)
    for m in range(8):
        for j in range(8):
            sub_block = j + 8 * (m // vectors_per_sub_block)
            for b in range(4):
                order[32 * m + 4 * j + b] = group * sub_block + 4 * (m % vectors_per_sub_block) + b
    return order


_LANES_32, _LANES_16 = _lane_values(32), _lane_values(16)


def _k_scales_codegen(qtype):
    layout = LAYOUTS[qtype]
    scales_at, nibbles_at = layout.offsets("scales", "qs")
    bits_at = layout.field("qh").offset if qtype == Q.Q5_K else None

    def codegen(builder, block, rows, count, acc, vnni):
        _sub_blocks_in_lanes(builder, block, rows, count, acc, vnni, qtype, scales_at, nibbles_at, bits_at)

    return codegen


def _sub_blocks_in_lanes(builder, block, rows, count, acc, vnni, qtype, scales_at, nibbles_at, bits_at):
    loaded = [_load(builder, block, scales_at + 4 * i, _I8, 4) for i in range(3)]
    low_scales, low_mins, high_scales, high_mins = k_scales_mins(*(_Bytes(builder, lambda v=v: v) for v in loaded))
    concatenate = ir.Constant(_vector(_I32, 8), list(range(8)))
    scales = builder.zext(builder.shuffle_vector(low_scales.value, high_scales.value, concatenate), _vector(_I32, 8))
    # Each min twice: one vpmaddwd with the 16-value code sums gives min_j * (sum of chunk j).
    mins = builder.zext(
        builder.shuffle_vector(
            low_mins.value, high_mins.value, ir.Constant(_vector(_I32, 16), [j // 2 for j in range(16)])
        ),
        _vector(_I16, 16),
    )
    nibbles = []
    for j in range(4):
        packed = _load(builder, block, nibbles_at + 32 * j, _I8, 32)
        nibbles += [builder.and_(packed, _splat(_I8, 32, 15)), builder.lshr(packed, _splat(_I8, 32, 4))]
    if bits_at is not None:
        _or_where_bit_set(builder, nibbles, _load(builder, block, bits_at, _I8, 32), 16)
    d, dmin = _block_halves(builder, block, qtype, "d", "dmin")
    for t in range(count):
        codes = rows.codes_at(t)
        # Integer sums are exact in any order: two chains halve the wait on vpdpbusd's latency.
        chains = [None, None]
        for m, values in enumerate(nibbles):
            chains[m % 2] = _dot_bytes(builder, vnni, chains[m % 2], values, _load(builder, codes, 32 * m, _I8, 32))
        d_x = rows.scale(t)
        scaled = builder.mul(builder.add(*chains), scales)
        _accumulate(builder, _acc_at(builder, acc, 16 * t), builder.fmul(d, d_x), scaled)
        code_sums = _load(builder, rows.sums_at(t), 0, _I16, 16)
        _accumulate(
            builder, _acc_at(builder, acc, 16 * t + 8), builder.fmul(dmin, d_x), _madd_words(builder, code_sums, mins)
        )


# Q6_K: 128 bytes of low nibbles, 64 bytes of high bit pairs, 16 int8 scales, f16 d. Scale i
# covers 16 values; the codes are 0..63 with an offset of -32, which goes through the 16-value
# code sums. In the file, in half h (128 values), byte l of ql[64h:] / ql[64h + 32:] holds
# values l, l + 32 (low nibbles) and l + 64, l + 96 (high nibbles), and byte l of qh[32h:] their
# two high bits at bits 0, 2, 4, 6. Repacked (pack()), the same bytes and bits hold the eight
# vectors of _lane_values(16): lane j of the first four holds sub-block j, of the last four
# sub-block 8 + j, so two accumulators of four vpdpbusd each and one vpmulld each by eight
# scales replace 8 vpmaddubsw and 8 vpdpwssd. Per activation row, acc[0:8] gets
# d * d_x * sum_i scale_i ((q_i - 32) . codes_i).


_Q6_K_QL, _Q6_K_QH, _Q6_K_SCALES = LAYOUTS[Q.Q6_K].offsets("ql", "qh", "scales")


def _q6_k_codegen(builder, block, rows, count, acc, vnni):
    scales = builder.sext(_load(builder, block, _Q6_K_SCALES, _I8, 16), _vector(_I16, 16))
    lane_scales = [builder.sext(_pick(builder, scales, range(8 * g, 8 * g + 8)), _vector(_I32, 8)) for g in range(2)]
    low_nibble, field = _splat(_I8, 32, 15), _splat(_I8, 32, 0x30)
    values = []
    for h in range(2):
        low_a = _load(builder, block, _Q6_K_QL + 64 * h, _I8, 32)
        low_b = _load(builder, block, _Q6_K_QL + 64 * h + 32, _I8, 32)
        high = _load(builder, block, _Q6_K_QH + 32 * h, _I8, 32)
        values += [
            builder.or_(builder.and_(low_a, low_nibble), builder.and_(builder.shl(high, _splat(_I8, 32, 4)), field)),
            builder.or_(builder.and_(low_b, low_nibble), builder.and_(builder.shl(high, _splat(_I8, 32, 2)), field)),
            builder.or_(builder.lshr(low_a, _splat(_I8, 32, 4)), builder.and_(high, field)),
            builder.or_(
                builder.lshr(low_b, _splat(_I8, 32, 4)), builder.and_(builder.lshr(high, _splat(_I8, 32, 2)), field)
            ),
        ]
    (d,) = _block_halves(builder, block, Q.Q6_K, "d")
    for t in range(count):
        codes = rows.codes_at(t)
        groups = [None, None]
        for m, value in enumerate(values):
            groups[m // 4] = _dot_bytes(builder, vnni, groups[m // 4], value, _load(builder, codes, 32 * m, _I8, 32))
        total = builder.add(*(builder.mul(group, lanes) for group, lanes in zip(groups, lane_scales)))
        code_sums = _load(builder, rows.sums_at(t), 0, _I16, 16)
        offsets = builder.shl(_madd_words(builder, code_sums, scales), _splat(_I32, 8, 5))
        _accumulate(builder, _acc_at(builder, acc, 8 * t), builder.fmul(d, rows.scale(t)), builder.sub(total, offsets))


# Q2_K: 16 bytes of 4-bit scales (low) and mins (high), 64 bytes of 2-bit codes,
# f16 d, f16 dmin. Q3_K: 32 bytes of third bits, 64 bytes of 2-bit codes, 12 bytes
# of 6-bit scales (offset -32), f16 d. In half h, byte m of the codes holds values
# 128h + 32j + m at bits 2j, and (Q3_K) bit 4h + j of third-bit byte m is set where that value's
# code is not 4 lower; scale (and min) 8h + 2j + m // 16 covers it. Per activation row,
# acc[0:8] gets d * d_x * sum_i scale_i (q_i . codes_i) (Q3_K: q - 4, the offset through the
# 16-value code sums) and, for Q2_K, acc[8:16] dmin * d_x * min_i * sum(codes_i).


def _q3_k_scales(builder, block):
    """Q3_K's 16 signed 6-bit scales as <16 x i16>: low 4 bits from the nibbles of bytes 0..7
    (low nibbles first), high 2 bits from the bit pairs of bytes 8..11 (bits 0-1 first)."""
    scales_at = LAYOUTS[Q.Q3_K].field("scales").offset
    packed = _load(builder, block, scales_at, _I8, 8)
    low = builder.shuffle_vector(
        builder.and_(packed, _splat(_I8, 8, 15)),
        builder.lshr(packed, _splat(_I8, 8, 4)),
        ir.Constant(_vector(_I32, 16), list(range(16))),
    )
    tops = _load(builder, block, scales_at + 8, _I8, 4)
    pairs = [
        builder.and_(builder.lshr(tops, _splat(_I8, 4, 2 * k)) if k else tops, _splat(_I8, 4, 3)) for k in range(4)
    ]
    high = builder.shuffle_vector(
        builder.shuffle_vector(pairs[0], pairs[1], ir.Constant(_vector(_I32, 8), list(range(8)))),
        builder.shuffle_vector(pairs[2], pairs[3], ir.Constant(_vector(_I32, 8), list(range(8)))),
        ir.Constant(_vector(_I32, 16), list(range(16))),
    )
    unsigned = builder.or_(low, builder.shl(high, _splat(_I8, 16, 4)))
    return builder.sext(builder.sub(unsigned, _splat(_I8, 16, 32)), _vector(_I16, 16))


def _two_bit_codegen(qtype):
    with_third_bits = qtype == Q.Q3_K
    codes_at = LAYOUTS[qtype].field("qs").offset
    # Q3_K's third bits (hmask), or Q2_K's 4-bit scales and mins
    packed_at = LAYOUTS[qtype].field("hmask" if with_third_bits else "scales").offset

    def codegen(builder, block, rows, count, acc, vnni):
        values = []
        for h in range(2):
            packed = _load(builder, block, codes_at + 32 * h, _I8, 32)
            for j in range(4):
                shifted = builder.lshr(builder.bitcast(packed, _vector(_I16, 16)), _splat(_I16, 16, 2 * j))
                values.append(builder.and_(builder.bitcast(shifted, _vector(_I8, 32)), _splat(_I8, 32, 3)))
        if with_third_bits:
            _or_where_bit_set(builder, values, _load(builder, block, packed_at, _I8, 32), 4)
            scales = _q3_k_scales(builder, block)
            (d,) = _block_halves(builder, block, qtype, "d")
        else:
            packed_scales = _load(builder, block, packed_at, _I8, 16)
            scales = builder.zext(builder.and_(packed_scales, _splat(_I8, 16, 15)), _vector(_I16, 16))
            mins = builder.zext(builder.lshr(packed_scales, _splat(_I8, 16, 4)), _vector(_I16, 16))
            d, dmin = _block_halves(builder, block, qtype, "d", "dmin")
        scale_splats = _sixteen_scale_splats(builder, scales)
        lanes = 8 if with_third_bits else 16
        for t in range(count):
            total = _scaled_dot(builder, vnni, values, rows.codes_at(t), scale_splats)
            code_sums = _load(builder, rows.sums_at(t), 0, _I16, 16)
            d_x = rows.scale(t)
            if with_third_bits:
                total = builder.sub(total, builder.shl(_madd_words(builder, code_sums, scales), _splat(_I32, 8, 2)))
            _accumulate(builder, _acc_at(builder, acc, lanes * t), builder.fmul(d, d_x), total)
            if not with_third_bits:
                _accumulate(
                    builder,
                    _acc_at(builder, acc, lanes * t + 8),
                    builder.fmul(dmin, d_x),
                    _madd_words(builder, code_sums, mins),
                )

    return codegen


def _nibbles_32(builder, block, offset):
    """The 32 four-bit codes of a 32-value block's 16 bytes at `offset`, as <32 x i8>: byte j's
    low nibble is value j, its high nibble value j + 16. The bytes are loaded into both halves
    (vbroadcasti128, a load) and the upper half shifted by 4 (vpsrlvd): splicing a shifted copy
    in (vinserti128) cost one more op on the two shuffle ports, Q4_1's limit."""
    packed = _load(builder, block, offset, _I8, 16)
    doubled = builder.bitcast(
        builder.shuffle_vector(packed, packed, ir.Constant(_vector(_I32, 32), list(range(16)) * 2)), _vector(_I32, 8)
    )
    shifted = builder.lshr(doubled, ir.Constant(_vector(_I32, 8), [0] * 4 + [4] * 4))
    return builder.and_(builder.bitcast(shifted, _vector(_I8, 32)), _splat(_I8, 32, 15))


def _splatted_half(builder, pointer, offset):
    """The f16 at byte pointer + offset as float32 in all 8 lanes: broadcast from memory, then
    converted (inline assembly, for the reason _halves gives). Scaling a float32 scalar would
    need a 32-byte broadcast on the shuffle ports, which the blocks' codes keep busy."""
    convert = ir.FunctionType(_vector(_F32, 8), [_I8.as_pointer()])
    return builder.asm(
        convert,
        "vpbroadcastw ($1), ${0:x}\n\tvcvtph2ps ${0:x}, $0",
        "=x,r",
        [_address(builder, pointer, offset)],
        side_effect=False,
    )


def _times_splat(builder, vector, scalar):
    """vector * scalar in every lane (the scalar a load, which LLVM broadcasts from memory)."""
    return builder.fmul(vector, _broadcast(builder, scalar, 8))


def _fifth_bit_values(builder, block, bits_at):
    """16 in byte j of a <32 x i8> where bit j of the 32-bit word at `bits_at` is set."""
    bits = builder.load(builder.bitcast(builder.gep(block, [ir.Constant(_I64, bits_at)]), _I32.as_pointer()), align=1)
    fifth = builder.zext(builder.bitcast(bits, _vector(ir.IntType(1), 32)), _vector(_I8, 32))
    return builder.shl(fifth, _splat(_I8, 32, 4))


# The 32-value formats Q4_0, Q5_0 and Q8_0: the constant offset of the codes goes through the
# block's code sum. Per activation row, acc[0:8] gets d * d_x * (values . codes).


def _legacy_codegen(qtype, value_offset):
    layout = LAYOUTS[qtype]
    d_at, codes_at = layout.offsets("d", "qs")
    bits_at = layout.field("qh").offset if qtype == Q.Q5_0 else None

    def codegen(builder, block, rows, count, acc, vnni):
        if value_offset is None:
            weights = _load(builder, block, codes_at, _I8, 32)
        else:
            values = _nibbles_32(builder, block, codes_at)
            if bits_at is not None:
                values = builder.or_(values, _fifth_bit_values(builder, block, bits_at))
        d = _splatted_half(builder, block, d_at)
        for t in range(count):
            activations = _load(builder, rows.codes_at(t), 0, _I8, 32)
            if value_offset is None:
                total = _dot_bytes(builder, vnni, None, *_signed_operands(builder, weights, activations))
            else:
                total = _dot_bytes(builder, vnni, None, values, activations)
            if value_offset:
                offset_sum = builder.mul(builder.load(rows.sums_at(t)), ir.Constant(_I32, value_offset))
                total = builder.sub(
                    total, builder.insert_element(ir.Constant(_vector(_I32, 8), None), offset_sum, ir.Constant(_I32, 0))
                )
            _accumulate(builder, _acc_at(builder, acc, 8 * t), _times_splat(builder, d, rows.scale(t)), total)

    return codegen


def _fifth_bits(builder, words, half):
    """16 in <32 x i8> where a Q5_0 block's fifth bit is set, for values 16 * half .. + 15 of the
    block whose 32-bit word fills each 128-bit half of `words` (<8 x i32>)."""
    spread = ir.Constant(_vector(_I8, 32), ([2 * half] * 8 + [2 * half + 1] * 8) * 2)
    shuffle = _function(builder, "llvm.x86.avx2.pshuf.b", _vector(_I8, 32), [_vector(_I8, 32)] * 2)
    byte_bits = builder.call(shuffle, [builder.bitcast(words, _vector(_I8, 32)), spread])
    selector = ir.Constant(_vector(_I8, 32), [1 << (j % 8) for j in range(32)])
    is_set = builder.icmp_unsigned("==", builder.and_(byte_bits, selector), selector)
    return builder.and_(builder.sext(is_set, _vector(_I8, 32)), _splat(_I8, 32, 16))


_Q5_0_BYTES = LAYOUTS[Q.Q5_0].type_size
_Q5_0_D, _Q5_0_QH, _Q5_0_QS = LAYOUTS[Q.Q5_0].offsets("d", "qh", "qs")


def _q5_0_pair_codegen(builder, block, rows, count, acc, vnni):
    """Two Q5_0 blocks (A at `block`, B one block on) as one: values 0..15 of A and B fill one
    <32 x i8>, values 16..31 another, against activation codes laid out the same way
    (_pair_activations). Per activation row, acc[0:4] gets d_A * d_x,A * (A's lane sums) and
    acc[4:8] the same for B: one conversion and one FMA for both blocks, where one block a
    time spends a 32-byte shuffle on its nibbles and another on its scale."""
    packed = builder.shuffle_vector(
        _load(builder, block, _Q5_0_QS, _I8, 16),
        _load(builder, block, _Q5_0_BYTES + _Q5_0_QS, _I8, 16),
        ir.Constant(_vector(_I32, 32), list(range(32))),
    )
    high_nibbles = builder.bitcast(
        builder.lshr(builder.bitcast(packed, _vector(_I16, 16)), _splat(_I16, 16, 4)), _vector(_I8, 32)
    )
    splat_words = ir.FunctionType(_vector(_I32, 8), [_I8.as_pointer()])
    word_a, word_b = [
        builder.asm(splat_words, "vpbroadcastd ($1), $0", "=x,r", [_address(builder, block, offset)], side_effect=False)
        for offset in (_Q5_0_QH, _Q5_0_BYTES + _Q5_0_QH)
    ]
    words = builder.shuffle_vector(word_a, word_b, ir.Constant(_vector(_I32, 8), [0, 1, 2, 3, 12, 13, 14, 15]))
    values = [
        builder.or_(builder.and_(nibbles, _splat(_I8, 32, 15)), _fifth_bits(builder, words, half))
        for half, nibbles in enumerate((packed, high_nibbles))
    ]
    broadcast = ir.FunctionType(_vector(_I16, 8), [_I8.as_pointer()])
    halves = [
        builder.asm(broadcast, "vpbroadcastw ($1), $0", "=x,r", [_address(builder, block, offset)], side_effect=False)
        for offset in (_Q5_0_D, _Q5_0_BYTES + _Q5_0_D)
    ]
    scales_ab = builder.shuffle_vector(
        halves[0], halves[1], ir.Constant(_vector(_I32, 8), [0, 1, 2, 3, 12, 13, 14, 15])
    )
    weight_scales = builder.fpext(builder.bitcast(scales_ab, _vector(ir.HalfType(), 8)), _vector(_F32, 8))
    for t in range(count):
        codes = rows.codes_at(t)
        activations = [_load(builder, codes, 32 * half, _I8, 32) for half in range(2)]
        if vnni:
            total = _dot_bytes(
                builder, vnni, _dot_bytes(builder, vnni, None, values[0], activations[0]), values[1], activations[1]
            )
        else:
            # Pair sums of at most 2 * 31 * 127 add up in 16 bits: one vpmaddwd for both halves.
            pairs = builder.add(*(_madd_unsigned_signed(builder, values[h], activations[h]) for h in range(2)))
            total = _madd_words(builder, pairs, _splat(_I16, 16, 1))
        total = builder.sub(total, _load(builder, rows.sums_at(t), 0, _I32, 8))
        _accumulate(builder, _acc_at(builder, acc, 8 * t), builder.fmul(weight_scales, rows.lane_scales(t)), total)


def _offset_codegen(qtype):
    layout = LAYOUTS[qtype]
    codes_at = layout.field("qs").offset
    bits_at = layout.field("qh").offset if qtype == Q.Q5_1 else None

    def codegen(builder, block, rows, count, acc, vnni):
        _codes_with_minimum(builder, block, rows, count, acc, vnni, qtype, bits_at, codes_at)

    return codegen


def _codes_with_minimum(builder, block, rows, count, acc, vnni, qtype, bits_at, codes_at):
    """Q4_1 (f16 d, f16 m, 16 bytes of nibbles) and Q5_1 (f16 d, f16 m, fifth-bit word, nibbles)
    against Q8_1 activations, whose sums are ggml's s = f16(d_x * sum of codes): acc[0:8] gets
    d * d_x * (values . codes) and acc[8] m * s, as ggml's AVX2 vec_dot_q4_1_q8_1 and
    vec_dot_q5_1_q8_1 do."""
    values = _nibbles_32(builder, block, codes_at)
    if bits_at is not None:
        values = builder.or_(values, _fifth_bit_values(builder, block, bits_at))
    d, m = _block_halves(builder, block, qtype, "d", "m")
    fma = _function(builder, "llvm.fma.f32", _F32, [_F32] * 3)
    for t in range(count):
        total = _dot_bytes(builder, vnni, None, values, _load(builder, rows.codes_at(t), 0, _I8, 32))
        _accumulate(builder, _acc_at(builder, acc, 16 * t), builder.fmul(d, rows.scale(t)), total)
        offset_lane = _acc_at(builder, acc, 16 * t + 8)
        builder.store(builder.call(fma, [m, builder.load(rows.sums_at(t)), builder.load(offset_lane)]), offset_lane)


# TQ2_0: 64 bytes of 2-bit codes, f16 d. Byte m of chunk c (32 bytes) holds values
# 128c + 32l + m at bits 2l; the codes are 0..2 with an offset of -1, which goes through the
# 16-value code sums. Per activation row, acc[0] gets d * d_x * ((q - 1) . codes), the block's
# total as one integer, as the row-interleaved kernel (below, with TQ1_0's) computes it.


_TQ2_0_QS = LAYOUTS[Q.TQ2_0].field("qs").offset


def _tq2_0_codegen(builder, block, rows, count, acc, vnni):
    # Codes at bits 2 and 6 are masked in place, as 4 * q: one 16-bit shift per chunk instead of
    # three (shifts share two ports with the shuffles; 15.5 -> 14.8 cycles per block on one
    # thread). Their pair sums (multiples of 4) are added apart and divided by 4, exactly,
    # before they meet the others.
    plain, fourfold = [], []
    for c in range(2):
        packed = _load(builder, block, _TQ2_0_QS + 32 * c, _I8, 32)
        shifted = builder.bitcast(
            builder.lshr(builder.bitcast(packed, _vector(_I16, 16)), _splat(_I16, 16, 4)), _vector(_I8, 32)
        )
        for nibble in (packed, shifted):
            plain.append(builder.and_(nibble, _splat(_I8, 32, 3)))
            fourfold.append(builder.and_(nibble, _splat(_I8, 32, 12)))
    # Activation codes of value group l (bits 2l) of chunk c start at byte 128c + 32l.
    plain_at = [128 * c + 32 * l for c in range(2) for l in (0, 2)]
    fourfold_at = [128 * c + 32 * l for c in range(2) for l in (1, 3)]
    (d,) = _block_halves(builder, block, Q.TQ2_0, "d")
    for t in range(count):
        codes = rows.codes_at(t)
        if vnni:
            # The fourfold sums are multiples of 4 in every lane: dividing them after the four
            # products of a lane meet gives the integers of dividing each pair sum.
            sums = []
            for values, offsets in ((plain, plain_at), (fourfold, fourfold_at)):
                lanes = None
                for value, offset in zip(values, offsets):
                    lanes = _dot_bytes(builder, vnni, lanes, value, _load(builder, codes, offset, _I8, 32))
                sums.append(lanes)
            total = builder.add(sums[0], builder.ashr(sums[1], _splat(_I32, 8, 2)))
        else:
            # Pair sums of at most 2 * 3 * 127 (four of them) and 4 * 2 * 3 * 127 (four) fit 16 bits.
            sums = []
            for values, offsets in ((plain, plain_at), (fourfold, fourfold_at)):
                pairs = ir.Constant(_vector(_I16, 16), None)
                for value, offset in zip(values, offsets):
                    pairs = builder.add(
                        pairs, _madd_unsigned_signed(builder, value, _load(builder, codes, offset, _I8, 32))
                    )
                sums.append(pairs)
            pairs = builder.add(sums[0], builder.ashr(sums[1], _splat(_I16, 16, 2)))
            total = _madd_words(builder, pairs, _splat(_I16, 16, 1))
        offsets = _madd_words(builder, _load(builder, rows.sums_at(t), 0, _I16, 16), _splat(_I16, 16, 1))
        scale = builder.fmul(d, rows.scale(t))
        _block_total_into_lane_0(builder, _acc_at(builder, acc, 8 * t), scale, builder.sub(total, offsets))


# TQ1_0: 48 bytes of five base-3 digits each, 4 bytes of four, f16 d. Digit n of a
# byte b is floor(3 * (b * 3^n mod 256) / 256): bytes 0..31 hold values 32n + m, bytes 32..47
# values 160 + 16n + m, bytes 48..51 values 240 + 4n + m. The codes are 0..2 with an offset
# of -1, which goes through the 16-value code sums. Two kernels: with AVX-512 VBMI, sixteen rows
# interleaved (below, _row_group_codegen); elsewhere the file's blocks with the digits
# computed (_tq1_0_codegen). Both add each block's total as one integer and meet it with one
# float multiply-add per row and block, so they give the same floats.
_TQ1_0_BYTES = LAYOUTS[Q.TQ1_0].type_size
_TQ1_0_QS = LAYOUTS[Q.TQ1_0].field("qs").offset
# The file's kernel reads bytes 0..31 and 22..53 (the last 32 bytes of the block), and
# _tq1_0_activations lays each block's activation codes out as ten 32-byte vectors to match:
# for each digit n, digit n of the first, then of the second (zeros against bytes 22..31 and the
# scale).
_TQ1_0_ACTIVATION_BYTES = 320
_TQ1_0_TAIL = _TQ1_0_BYTES - 32


def _tq1_0_arithmetic_digits(builder, block):
    """The ten digit vectors in layout order, computed: times 3 and two compares per digit."""
    digits = [[], []]
    for half, offset in enumerate((_TQ1_0_QS, _TQ1_0_TAIL)):
        powers = _load(builder, block, offset, _I8, 32)
        for n in range(5):
            if n:
                # times 3, modulo 256: byte adds wrap
                powers = builder.add(builder.add(powers, powers), powers)
            # floor(3t / 256) is 1 from t = 86 and 2 from t = 171.
            digit = builder.add(
                builder.zext(builder.icmp_unsigned(">=", powers, _splat(_I8, 32, 86)), _vector(_I8, 32)),
                builder.zext(builder.icmp_unsigned(">=", powers, _splat(_I8, 32, 171)), _vector(_I8, 32)),
            )
            digits[half].append(digit)
    return [digit for n in range(5) for digit in (digits[0][n], digits[1][n])]


def _block_total_into_lane_0(builder, acc, scale, lanes):
    """acc[0] = fma(scale, float(sum of the <8 x i32> or <16 x i32> lanes), acc[0]): a
    block's whole dot product meets the float scale once, as in the row-group kernel."""
    reduce = _function(builder, f"llvm.vector.reduce.add.v{lanes.type.count}i32", _I32, [lanes.type])
    fma = _function(builder, "llvm.fma.f32", _F32, [_F32] * 3)
    total = builder.sitofp(builder.call(reduce, [lanes]), _F32)
    builder.store(builder.call(fma, [scale, total, builder.load(acc)]), acc)


def _tq1_0_codegen(builder, block, rows, count, acc, vnni):
    digits = _tq1_0_arithmetic_digits(builder, block)
    (d,) = _block_halves(builder, block, Q.TQ1_0, "d")
    for t in range(count):
        codes = rows.codes_at(t)
        if vnni:
            chains = [None, None]
            for i, digit in enumerate(digits):
                activations = _load(builder, codes, 32 * i, _I8, 32)
                chains[i % 2] = _dot_bytes(builder, vnni, chains[i % 2], digit, activations)
            total = builder.add(*chains)
        else:
            # Ten pair sums of at most 2 * 2 * 127 each fit 16 bits.
            pairs = ir.Constant(_vector(_I16, 16), None)
            for i, digit in enumerate(digits):
                pairs = builder.add(
                    pairs, _madd_unsigned_signed(builder, digit, _load(builder, codes, 32 * i, _I8, 32))
                )
            total = _madd_words(builder, pairs, _splat(_I16, 16, 1))
        offsets = _madd_words(builder, _load(builder, rows.sums_at(t), 0, _I16, 16), _splat(_I16, 16, 1))
        scale = builder.fmul(d, rows.scale(t))
        _block_total_into_lane_0(builder, _acc_at(builder, acc, 8 * t), scale, builder.sub(total, offsets))


# The ternary formats with 64-byte VNNI: sixteen weight rows interleaved (pack(), once per
# weight) so that 32-bit lane L of a 64-byte vector belongs to row L. A block is its code bytes
# (TQ1_0: qs then qh, 52; TQ2_0: qs, 64), four-byte words, then its f16 d. For each group of
# sixteen rows and each block k the packed bytes are one vector per word (vector w: word w of
# block k of each row), then the rows' sixteen d: the size of the sixteen blocks. A vector's
# digits come as 2-bit fields of one or two vectors (TQ2_0: the codes as they are; TQ1_0: two
# table lookups, _TQ1_0_PACKED_DIGITS), and an and by _FIELDS[i] leaves 4^i times the digit of
# field i, which meets the activation codes of its word and digit (laid out to match,
# _row_group_values) as one 4-byte broadcast. Each field has its own chains, whose sums are
# multiples of 4^i and are divided exactly at the end of the block. Per block and activation
# row that is 65/16 (TQ1_0) or 64/16 (TQ2_0) vpdpbusd with no padding lanes, and the scale,
# code-sum and float work happens once per sixteen blocks. One Zen 4 core, 8960x1536 in L3,
# cycles per block and activation row, file layout -> rows interleaved: TQ1_0 n = 1
# 22.1 -> 10.1, n = 4 12.3 -> 6.0; TQ2_0 n = 1 11.7 -> 5.8, n = 4 7.5 -> 5.1.
_ROWS = 16
_FIELDS = (3, 12, 48, 192)
# Per format: code bytes (all before the block's final d) and digits per code byte.
_TERNARY = {qtype: (LAYOUTS[qtype].field("d").offset, digits) for qtype, digits in ((Q.TQ1_0, 5), (Q.TQ2_0, 4))}
for _qtype, (_code_bytes, _) in _TERNARY.items():
    assert _code_bytes == LAYOUTS[_qtype].type_size - 2, _qtype
# Digit n of every byte value of TQ1_0.
_TQ1_0_DIGITS = [[(3 * (b * 3**n % 256)) >> 8 for b in range(256)] for n in range(5)]
# Digits 0..3 of a TQ1_0 byte in the four fields of one table's entry, digit 4 alone in another's.
_TQ1_0_DIGIT_GROUPS = ((0, 1, 2, 3), (4,))
_TQ1_0_PACKED_DIGITS = [
    [sum(_TQ1_0_DIGITS[n][b] << 2 * field for field, n in enumerate(digits)) for b in range(256)]
    for digits in _TQ1_0_DIGIT_GROUPS
]


def _row_group_values(qtype) -> np.ndarray:
    """For each activation byte of a block in the row-group kernel's order (word w, digit n,
    byte j: index 4 (digits_per_byte w + n) + j), the block value it holds, or -1 for TQ1_0's
    qh bytes' fifth digit, which is always 0 and meets a zero code."""
    code_bytes, digits = _TERNARY[qtype]
    values = np.empty(code_bytes * digits, dtype=np.int64)
    for m in range(code_bytes):
        w, j = divmod(m, 4)
        for n in range(digits):
            if qtype == Q.TQ2_0:
                value = 128 * (m // 32) + 32 * n + m % 32
            elif m < 32:
                value = 32 * n + m
            elif m < 48:
                value = 160 + 16 * n + m - 32
            else:
                value = 240 + 4 * n + m - 48 if n < 4 else -1
            values[4 * (digits * w + n) + j] = value
    return values


_TQ1_0_WORD_VALUES, _TQ2_0_WORD_VALUES = _row_group_values(Q.TQ1_0), _row_group_values(Q.TQ2_0)


def _masked_lookups(builder, index, high, low, quarters):
    """Table entry index (0..255) for each byte, the table in four 64-byte quarters: two
    vpermi2b with merge masking into the index register, the high half's lookup where the top
    bit is set, then the low half's where it is clear (its index bytes still in place). Inline
    assembly, for LLVM blends two unmasked lookups instead: one Zen 4 core, 11.7 -> 10.1
    cycles per TQ1_0 block."""
    bytes64, mask = _vector(_I8, 64), _vector(ir.IntType(1), 64)
    lookups = ir.FunctionType(bytes64, [bytes64, mask, mask] + [bytes64] * 4)
    return builder.asm(
        lookups,
        "vpermi2b $7, $6, $0 {$2}\n\tvpermi2b $5, $4, $0 {$3}",
        "=v,0,^Yk,^Yk,v,vm,v,vm",
        [index, high, low, *quarters],
        side_effect=False,
    )


def _tq1_0_packed_digits(builder, word, count):
    """(vector of packed digits, the digits in its fields) pairs for a vector of TQ1_0 code
    bytes."""
    bytes64 = _vector(_I8, 64)
    lookup = _function(builder, "llvm.x86.avx512.vpermi2var.qi.512", bytes64, [bytes64] * 3)
    high = builder.icmp_signed("<", word, _splat(_I8, 64, 0))
    groups = []
    for table, digits in zip(_TQ1_0_PACKED_DIGITS, _TQ1_0_DIGIT_GROUPS):
        quarters = [ir.Constant(bytes64, table[64 * q : 64 * q + 64]) for q in range(4)]
        if count == 1:
            packed = _masked_lookups(builder, word, high, builder.not_(high), quarters)
        else:
            # A tile's sixteen chains fill the registers, and LLVM's blend spills less there:
            # 6.0 against 6.4 cycles per block and row.
            low_half = builder.call(lookup, [quarters[0], word, quarters[1]])
            high_half = builder.call(lookup, [quarters[2], word, quarters[3]])
            packed = builder.select(high, high_half, low_half)
        groups.append((packed, digits))
    return groups


def _activation_word(builder, rows, t, offset):
    """Activation row t's four code bytes at `offset` of its block, in all sixteen lanes: one
    operand of a row-group vpdpbusd."""
    address = builder.bitcast(_address(builder, rows.codes_at(t), offset), _I32.as_pointer())
    return _broadcast(builder, builder.load(address, align=1), 16)


def _sixteen_halves(builder, block, offset):
    """The sixteen rows' f16 values at block + offset, as <16 x float>."""
    pointer = builder.bitcast(_address(builder, block, offset), _vector(ir.HalfType(), 16).as_pointer())
    return builder.fpext(builder.load(pointer, align=1), _vector(_F32, 16))


def _accumulate_rows(builder, acc, lane, scales, product):
    """acc[lane:lane + 16] = fma(scales, product, acc[lane:lane + 16]), on <16 x float>."""
    fma = _function(builder, "llvm.fma.v16f32", _vector(_F32, 16), [_vector(_F32, 16)] * 3)
    pointer = builder.bitcast(_acc_at(builder, acc, lane), _vector(_F32, 16).as_pointer())
    builder.store(builder.call(fma, [scales, product, builder.load(pointer, align=4)]), pointer, align=4)


def _prefetch_sub_block_share(builder, block, group_bytes, count, j):
    """For a tile of several activation rows, prefetch the eighth j of the group block (of
    `group_bytes`) two blocks ahead: the file-layout kernels' 2 KB ahead, all lines at once,
    filled the core's miss buffers in bursts. 8960x1536 Q4_K from the 1.5B's 28 ffn_gate in
    turn (DRAM, two threads), ms per product: n = 1 0.34 -> 0.25 without prefetching (the
    hardware's keeps up), n = 4 0.45 -> 0.30, n = 16 1.18 -> 1.02; the repacked rows took
    0.275, 0.39, 1.45."""
    if count == 1:
        return
    lines = group_bytes // 64
    _prefetch_lines(builder, block, 2 * group_bytes, range(lines * j // 8, lines * (j + 1) // 8))


def _row_group_codegen(qtype):
    code_bytes, digits_per_byte = _TERNARY[qtype]
    words = code_bytes // 4

    def codegen(builder, block, rows, count, acc, vnni):
        """Block k of sixteen interleaved rows against `count` activation rows: acc[16t + L]
        gets d_L * d_x * ((q_L - 1) . codes) for row L of the group."""
        words16 = _vector(_I32, 16)
        dot = _function(builder, "llvm.x86.avx512.vpdpbusd.512", words16, [words16] * 3)
        # Integer sums are exact in any order; one row has two chains per field, to hide
        # vpdpbusd's latency.
        per_field = 2 if count == 1 else 1
        chains = [[[ir.Constant(words16, None)] * per_field for _ in _FIELDS] for _ in range(count)]
        for w in range(words):
            word = _load(builder, block, 64 * w, _I8, 64)
            groups = _tq1_0_packed_digits(builder, word, count) if qtype == Q.TQ1_0 else [(word, (0, 1, 2, 3))]
            for packed, digits in groups:
                for field, n in enumerate(digits):
                    if len(digits) > 1:
                        digit = builder.and_(packed, _splat(_I8, 64, _FIELDS[field]))
                    else:
                        digit = packed
                    digit = builder.bitcast(digit, words16)
                    for t in range(count):
                        codes = _activation_word(builder, rows, t, 4 * (digits_per_byte * w + n))
                        chain = chains[t][field]
                        chain[w % per_field] = builder.call(dot, [chain[w % per_field], digit, codes])
        d = _sixteen_halves(builder, block, 64 * words)
        for t in range(count):
            total = _broadcast(builder, builder.load(builder.bitcast(rows.sums_at(t), _I32.as_pointer())), 16)
            total = builder.sub(ir.Constant(words16, None), total)
            for field, field_chains in enumerate(chains[t]):
                lanes = field_chains[0] if per_field == 1 else builder.add(*field_chains)
                total = builder.add(total, builder.ashr(lanes, _splat(_I32, 16, 2 * field)))
            scales = builder.fmul(d, _broadcast(builder, rows.scale(t), 16))
            _accumulate_rows(builder, acc, 16 * t, scales, builder.sitofp(total, _vector(_F32, 16)))

    return codegen


# Q4_K rows interleaved by sixteen (AVX-512 VNNI): per group of sixteen rows and block, 32
# vectors of codes, 4 per sub-block j (vector 4j + p: byte 4L + b of row L holds value
# 32j + 4p + b in its low nibble and value 32j + 16 + 4p + b in its high one), the rows' 12
# scale bytes as three vectors (vector i: bytes 4i..4i + 3 of row L at 4L), then the sixteen f16
# d and the sixteen f16 dmin: as many bytes as the sixteen blocks. A sub-block's 32 codes of
# one activation row meet the sixteen rows' in 8 vpdpbusd (4 bytes broadcast), then its scale;
# each row keeps the float lanes of the file-layout kernel (acc[16j + L] for sub-block j,
# acc[128 + 16j + L] for its min term), so both give the same floats. One Zen 4 core,
# 8960x1536 in L3, cycles per block and activation row, repacked rows -> interleaved: n = 1
# 18.1 -> 10.9, n = 4 11.5 -> 8.2, n = 8 11.4 -> 8.1.
# Offsets in a group's block: the scale bytes after the codes, then d and dmin.
_Q4_K_GROUP_SCALES = _ROWS * LAYOUTS[Q.Q4_K].field("qs").size
_Q4_K_GROUP_D = _Q4_K_GROUP_SCALES + _ROWS * LAYOUTS[Q.Q4_K].field("scales").size
# Float lanes per activation row: sixteen rows times eight sub-blocks, for scales and for mins.
_Q4_K_GROUP_LANES = 2 * 8 * _ROWS


def _q4_k_row_group_codegen(builder, block, rows, count, acc, vnni):
    """Block k of sixteen interleaved Q4_K rows against `count` activation rows (Q8_K codes in
    their own order, one code sum per 32 values): acc[256t + 16j + L] gets
    d_L d_x scale_Lj (q_Lj . codes_j) and acc[256t + 128 + 16j + L] dmin_L d_x min_Lj sum_j."""
    words16 = _vector(_I32, 16)
    dot = _function(builder, "llvm.x86.avx512.vpdpbusd.512", words16, [words16] * 3)
    loaded = [_load(builder, block, _Q4_K_GROUP_SCALES + 64 * i, _I8, 64) for i in range(3)]
    packed_scales = k_scales_mins(*(_Bytes(builder, lambda v=v: v) for v in loaded))
    # (scales 0..3, mins 0..3, scales 4..7, mins 4..7): byte j % 4 of row L's lane.
    scale_words = [builder.bitcast(b.value, words16) for b in packed_scales]

    def field(quad, j):
        return _lane_byte(builder, scale_words[quad + 2 * (j // 4)], j % 4, signed=False)

    d, dmin = _sixteen_halves(builder, block, _Q4_K_GROUP_D), _sixteen_halves(builder, block, _Q4_K_GROUP_D + 2 * _ROWS)
    x_scales = [_broadcast(builder, rows.scale(t), 16) for t in range(count)]
    d_x = [builder.fmul(d, x) for x in x_scales]
    dmin_x = [builder.fmul(dmin, x) for x in x_scales]
    per_chain = 2 if count == 1 else 1
    for j in range(8):
        _prefetch_sub_block_share(builder, block, _ROWS * LAYOUTS[Q.Q4_K].type_size, count, j)
        codes = []
        for p in range(4):
            packed = _load(builder, block, 64 * (4 * j + p), _I8, 64)
            low = builder.and_(packed, _splat(_I8, 64, 15))
            high = builder.and_(builder.lshr(packed, _splat(_I8, 64, 4)), _splat(_I8, 64, 15))
            codes += [
                (builder.bitcast(low, words16), 32 * j + 4 * p),
                (builder.bitcast(high, words16), 32 * j + 16 + 4 * p),
            ]
        # Both products are below 2^24, so their floats are exact whichever way they are formed.
        scale, minimum = (builder.sitofp(field(quad, j), _vector(_F32, 16)) for quad in (0, 1))
        for t in range(count):
            chains = [ir.Constant(words16, None)] * per_chain
            for c, (values, at) in enumerate(codes):
                word = _activation_word(builder, rows, t, at)
                chains[c % per_chain] = builder.call(dot, [chains[c % per_chain], values, word])
            lanes = chains[0] if per_chain == 1 else builder.add(*chains)
            code_sum = builder.load(builder.gep(rows.sums_at(t), [ir.Constant(_I64, j)]))
            for offset, scales, product in (
                (16 * j, d_x[t], builder.fmul(builder.sitofp(lanes, _vector(_F32, 16)), scale)),
                (128 + 16 * j, dmin_x[t], builder.fmul(minimum, _broadcast(builder, code_sum, 16))),
            ):
                _accumulate_rows(builder, acc, _Q4_K_GROUP_LANES * t + offset, scales, product)


# Q6_K rows interleaved by sixteen, the same way: per group and block, for each lane j (sub-blocks
# j and 8 + j, as in the file-layout kernel), 4 vectors of low nibbles (byte 4L + b of vector
# p: value 16j + 4p + b of row L low, value 128 + 16j + 4p + b high) and 2 of high bit pairs
# (vector h: bits 2p, 2p + 1 of byte 4L + b for value 16(j + 8h) + 4p + b), 384 bytes; then the
# rows' 16 scale bytes as four vectors and the sixteen f16 d. Lane j of a row gets the integer
# of the file-layout kernel's lane j, scale_j q_j . codes_j + scale_8+j q_8+j . codes_8+j
# - 32 (scale_2j sum_2j + scale_2j+1 sum_2j+1), the last term in one vpdpwssd. One Zen 4
# core, 8960x1536 in L3, cycles per block and activation row, repacked rows -> interleaved:
# n = 1 20.7 -> 16.1, n = 4 10.9 -> 8.5, n = 8 11.0 -> 8.3.
# Bytes per lane j in a group block (4 nibble vectors, then 2 of high bit pairs).
_Q6_K_GROUP_LANE_BYTES, _Q6_K_GROUP_HIGH_BITS = 6 * 64, 4 * 64
_Q6_K_GROUP_SCALES = _ROWS * (LAYOUTS[Q.Q6_K].field("ql").size + LAYOUTS[Q.Q6_K].field("qh").size)
assert _Q6_K_GROUP_SCALES == 8 * _Q6_K_GROUP_LANE_BYTES
_Q6_K_GROUP_D = _Q6_K_GROUP_SCALES + _ROWS * LAYOUTS[Q.Q6_K].field("scales").size
_Q6_K_GROUP_LANES = 8 * _ROWS


def _lane_byte(builder, words, byte, signed):
    """Byte `byte` of each 32-bit lane of <16 x i32> `words`, sign- or zero-extended."""
    shift = builder.ashr if signed else builder.lshr
    return shift(builder.shl(words, _splat(_I32, 16, 24 - 8 * byte)), _splat(_I32, 16, 24))


def _q6_k_row_group_codegen(builder, block, rows, count, acc, vnni):
    """Block k of sixteen interleaved Q6_K rows against `count` activation rows (Q8_K codes in
    their own order, 16-value code sums): acc[128t + 16j + L] gets d_L d_x times row L's
    lane-j integer."""
    words16 = _vector(_I32, 16)
    dot = _function(builder, "llvm.x86.avx512.vpdpbusd.512", words16, [words16] * 3)
    dot_words = _function(builder, "llvm.x86.avx512.vpdpwssd.512", words16, [words16] * 3)
    scale_words = [
        builder.bitcast(_load(builder, block, _Q6_K_GROUP_SCALES + 64 * i, _I8, 64), words16) for i in range(4)
    ]

    def scale(sub_block):
        return _lane_byte(builder, scale_words[sub_block // 4], sub_block % 4, signed=True)

    d = _sixteen_halves(builder, block, _Q6_K_GROUP_D)
    d_x = [builder.fmul(d, _broadcast(builder, rows.scale(t), 16)) for t in range(count)]
    low_nibble, high_bits = _splat(_I8, 64, 15), _splat(_I8, 64, 0x30)
    for j in range(8):
        _prefetch_sub_block_share(builder, block, _ROWS * LAYOUTS[Q.Q6_K].type_size, count, j)
        lane_bytes = _Q6_K_GROUP_LANE_BYTES * j
        high = [_load(builder, block, lane_bytes + _Q6_K_GROUP_HIGH_BITS + 64 * h, _I8, 64) for h in range(2)]
        values = [[], []]
        for p in range(4):
            low = _load(builder, block, lane_bytes + 64 * p, _I8, 64)
            for h, nibble in enumerate((builder.and_(low, low_nibble), builder.lshr(low, _splat(_I8, 64, 4)))):
                shift = 4 - 2 * p
                bits = high[h]
                if shift > 0:
                    bits = builder.shl(bits, _splat(_I8, 64, shift))
                elif shift < 0:
                    bits = builder.lshr(bits, _splat(_I8, 64, -shift))
                values[h].append(builder.bitcast(builder.or_(nibble, builder.and_(bits, high_bits)), words16))
        scales = (scale(j), scale(8 + j))
        # -32 scale_2j and -32 scale_2j+1 as the 16-bit halves of each lane, for vpdpwssd.
        offsets = [
            builder.sub(ir.Constant(words16, None), builder.shl(scale(2 * j + i), _splat(_I32, 16, 5)))
            for i in range(2)
        ]
        offsets = builder.or_(
            builder.and_(offsets[0], _splat(_I32, 16, 0xFFFF)), builder.shl(offsets[1], _splat(_I32, 16, 16))
        )
        for t in range(count):
            total = None
            for h in range(2):
                chain = ir.Constant(words16, None)
                for p, value in enumerate(values[h]):
                    at = 128 * h + 16 * j + 4 * p
                    chain = builder.call(dot, [chain, value, _activation_word(builder, rows, t, at)])
                scaled = builder.mul(chain, scales[h])
                total = scaled if total is None else builder.add(total, scaled)
            sums = builder.bitcast(builder.gep(rows.sums_at(t), [ir.Constant(_I64, 2 * j)]), _I32.as_pointer())
            total = builder.call(dot_words, [total, offsets, _broadcast(builder, builder.load(sums, align=2), 16)])
            product = builder.sitofp(total, _vector(_F32, 16))
            _accumulate_rows(builder, acc, _Q6_K_GROUP_LANES * t + 16 * j, d_x[t], product)


# Q5_0 rows interleaved by sixteen, in pairs of blocks (A, B) as the file-layout kernel takes
# them where a row has an even number of blocks: per group and pair, for each of its 8 float
# lanes L (block L // 4, values 4l..4l + 3 and 16 + 4l..16 + 4l + 3 for l = L % 4), the
# rows' nibble bytes 4l..4l + 3 of that block (row R's at byte 4R: value 4l + b low, 16 + 4l + b
# high), 512 bytes; then per lane and half the fifth bits of those values as a 64-bit mask (bit
# 4R + b), 128 bytes; then the sixteen f16 d of A and those of B. Lane L of a row gets the
# integer of the file-layout kernel's lane L, so every path gives the same floats.
_Q5_0_GROUP_MASKS = 8 * 64
_Q5_0_GROUP_D = _Q5_0_GROUP_MASKS + 16 * 8
_Q5_0_GROUP_BYTES = _ROWS * 2 * _Q5_0_BYTES
assert _Q5_0_GROUP_BYTES == _Q5_0_GROUP_D + 2 * 2 * _ROWS
_Q5_0_GROUP_LANES = 8 * _ROWS


def _q5_0_row_group_codegen(builder, block, rows, count, acc, vnni):
    """Pair k of sixteen interleaved Q5_0 rows against `count` activation rows (Q8_0 codes in
    their own order): acc[128t + 16L + R] gets d_R d_x times row R's lane-L integer."""
    words16 = _vector(_I32, 16)
    dot = _function(builder, "llvm.x86.avx512.vpdpbusd.512", words16, [words16] * 3)
    low_nibble, fifth_bit = _splat(_I8, 64, 15), _splat(_I8, 64, 16)
    operands = []
    for lane in range(8):
        _prefetch_sub_block_share(builder, block, _Q5_0_GROUP_BYTES, count, lane)
        nibbles = _load(builder, block, 64 * lane, _I8, 64)
        high = builder.lshr(nibbles, _splat(_I8, 64, 4))
        halves = (builder.and_(nibbles, low_nibble), builder.and_(high, low_nibble))
        for half, values in enumerate(halves):
            at = _address(builder, block, _Q5_0_GROUP_MASKS + 8 * (2 * lane + half))
            bits = builder.load(builder.bitcast(at, _I64.as_pointer()), align=1)
            is_set = builder.bitcast(bits, _vector(ir.IntType(1), 64))
            operands.append(builder.bitcast(builder.select(is_set, builder.or_(values, fifth_bit), values), words16))
    d = [_sixteen_halves(builder, block, _Q5_0_GROUP_D + 2 * _ROWS * b) for b in range(2)]
    for t in range(count):
        d_x = [builder.fmul(d[b], _broadcast(builder, rows.scale_of(t, b, 2), 16)) for b in range(2)]
        for lane in range(8):
            b, quad = divmod(lane, 4)
            total = ir.Constant(words16, None)
            for half in range(2):
                word = _activation_word(builder, rows, t, Q8_0_BLOCK * b + 16 * half + 4 * quad)
                total = builder.call(dot, [total, operands[2 * lane + half], word])
            if quad == 0:
                code_sum = builder.load(builder.gep(rows.sums_at(t), [ir.Constant(_I64, b)]))
                total = builder.sub(total, _broadcast(builder, builder.mul(code_sum, ir.Constant(_I32, 16)), 16))
            product = builder.sitofp(total, _vector(_F32, 16))
            _accumulate_rows(builder, acc, _Q5_0_GROUP_LANES * t + 16 * lane, d_x[b], product)


(
    _Q4_0,
    _Q5_0,
    _Q8_0,
    _Q4_K,
    _Q6_K,
    _Q4_1,
    _TQ2_0,
    _Q5_0_PAIRS,
    _Q5_K,
    _Q2_K,
    _Q3_K,
    _Q5_1,
    _TQ1_0,
    _TQ1_0_ROW_GROUPS,
    _TQ2_0_ROW_GROUPS,
    _Q4_K_ROW_GROUPS,
    _Q6_K_ROW_GROUPS,
    _Q5_0_ROW_GROUPS,
) = range(18)


def _format(qtype, lanes, codegen):
    """A kind's entry from the format's layout: its bytes and values per block, and the values
    per code sum of its activations (Q8_K's bsums; Q8_0 and Q8_1 sum a block)."""
    layout = LAYOUTS[qtype]
    sum_group = Q8_K_SUM_GROUP if layout.activation == Q.Q8_K else Q8_0_BLOCK
    return layout.type_size, layout.block_size, sum_group, lanes, codegen


def _row_group_format(qtype, values):
    """A row-group kind's entry: a "block" is block k of sixteen interleaved rows, and its
    activation bytes (`values`, _row_group_values) have one code sum."""
    return _ROWS * LAYOUTS[qtype].type_size, len(values), len(values), _ROWS, _row_group_codegen(qtype)


# Per kind: bytes per block, values per block, values per code sum, acc lanes per activation
# row, and the block's code generator.
_FORMATS = {
    _Q4_0: _format(Q.Q4_0, 8, _legacy_codegen(Q.Q4_0, 8)),
    _Q5_0: _format(Q.Q5_0, 8, _legacy_codegen(Q.Q5_0, 16)),
    _Q8_0: _format(Q.Q8_0, 8, _legacy_codegen(Q.Q8_0, None)),
    _Q4_K: _format(Q.Q4_K, 16, _k_scales_codegen(Q.Q4_K)),
    _Q6_K: _format(Q.Q6_K, 8, _q6_k_codegen),
    _Q4_1: _format(Q.Q4_1, 16, _offset_codegen(Q.Q4_1)),
    _TQ2_0: _format(Q.TQ2_0, 8, _tq2_0_codegen),
    # Two blocks as one, with 8 activation lane scales and offsets (_pair_activations) per pair.
    _Q5_0_PAIRS: (2 * _Q5_0_BYTES, 2 * Q8_0_BLOCK, 2 * Q8_0_BLOCK // 8, 8, _q5_0_pair_codegen),
    _Q5_K: _format(Q.Q5_K, 16, _k_scales_codegen(Q.Q5_K)),
    _Q2_K: _format(Q.Q2_K, 16, _two_bit_codegen(Q.Q2_K)),
    _Q3_K: _format(Q.Q3_K, 8, _two_bit_codegen(Q.Q3_K)),
    _Q5_1: _format(Q.Q5_1, 16, _offset_codegen(Q.Q5_1)),
    # "values": the activation bytes per block, with its Q8_K block's code sums over them.
    _TQ1_0: (
        _TQ1_0_BYTES,
        _TQ1_0_ACTIVATION_BYTES,
        _TQ1_0_ACTIVATION_BYTES // (Q8_K_BLOCK // Q8_K_SUM_GROUP),
        8,
        _tq1_0_codegen,
    ),
    _TQ1_0_ROW_GROUPS: _row_group_format(Q.TQ1_0, _TQ1_0_WORD_VALUES),
    _TQ2_0_ROW_GROUPS: _row_group_format(Q.TQ2_0, _TQ2_0_WORD_VALUES),
    # Block k of sixteen interleaved rows; the activations as they are, a code sum per sub-block.
    _Q4_K_ROW_GROUPS: (_ROWS * LAYOUTS[Q.Q4_K].type_size, Q8_K_BLOCK, 32, _Q4_K_GROUP_LANES, _q4_k_row_group_codegen),
    _Q6_K_ROW_GROUPS: (
        _ROWS * LAYOUTS[Q.Q6_K].type_size,
        Q8_K_BLOCK,
        Q8_K_SUM_GROUP,
        _Q6_K_GROUP_LANES,
        _q6_k_row_group_codegen,
    ),
    # Pair k of sixteen interleaved rows; the activations as they are, a code sum per block.
    _Q5_0_ROW_GROUPS: (_Q5_0_GROUP_BYTES, 2 * Q8_0_BLOCK, Q8_0_BLOCK, _Q5_0_GROUP_LANES, _q5_0_row_group_codegen),
}
# Kinds whose code generators prefetch (_prefetch_sub_block_share) instead of _dot_blocks.
_PREFETCHING_THEMSELVES = (_Q4_K_ROW_GROUPS, _Q6_K_ROW_GROUPS, _Q5_0_ROW_GROUPS)
_BLOCK_BYTES = tuple(_FORMATS[kind][0] for kind in range(len(_FORMATS)))
_ACC_LANES = tuple(_FORMATS[kind][3] for kind in range(len(_FORMATS)))
# Activation rows per pass over a weight row: each decoded weight block then feeds four rows
# (the accumulator on the stack holds 16 lanes for each). A batch's last n % 4 rows go as one
# tile of their own.
_TILE = 4


@intrinsic
def _dot_blocks(typingctx, kind, count, weights, offset, codes, sums, scales, first, n_blocks, k, acc):
    """Block k of the weight row at weights + offset (format `kind`) against activation rows
    first .. first + count - 1 (`kind` and `count` compile-time constants), into acc."""
    if not isinstance(kind, types.IntegerLiteral) or not isinstance(count, types.IntegerLiteral):
        return None
    block_bytes, block_values, sum_group, _, generate = _FORMATS[kind.literal_value]
    rows_in_tile = count.literal_value

    def codegen(context, builder, signature, arguments):
        _, _, w, o, q, sum_pointer, scale_pointer, first_row, blocks, block_index, acc_pointer = arguments
        rows = _Rows(builder, q, sum_pointer, scale_pointer, first_row, blocks, block_index, block_values, sum_group)
        block = builder.gep(w, [o])
        if kind.literal_value not in _PREFETCHING_THEMSELVES:
            _prefetch_ahead(builder, block, block_bytes)
        generate(builder, block, rows, rows_in_tile, acc_pointer, HAS_VNNI)
        return context.get_dummy_value()

    return types.void(kind, count, weights, offset, codes, sums, scales, first, n_blocks, k, acc), codegen


@njit(nogil=True, inline="always")
def _hsum_8(acc, lane, stride):
    """acc[lane + stride i] for i = 0..7, summed in the order of ggml's hsum_float_8."""
    a0, a1, a2, a3 = acc[lane], acc[lane + stride], acc[lane + 2 * stride], acc[lane + 3 * stride]
    a4, a5, a6, a7 = acc[lane + 4 * stride], acc[lane + 5 * stride], acc[lane + 6 * stride], acc[lane + 7 * stride]
    return ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))


@njit(nogil=True, inline="always")
def _sum_8(acc, lane, stride):
    """acc[lane + stride i] for i = 0..7, summed in order from zero (the min terms)."""
    total = np.float32(0.0)
    for i in range(8):
        total += acc[lane + stride * i]
    return total


@njit(nogil=True, inline="always")
def _finish(kind, acc, lane):
    """The product from one activation row's accumulator lanes at acc[lane:], summed in the
    order of ggml's hsum_float_8."""
    total = _hsum_8(acc, lane, 1)
    if kind == _Q4_K or kind == _Q5_K or kind == _Q2_K:
        return total - _sum_8(acc, lane + 8, 1)
    if kind == _Q4_1 or kind == _Q5_1:
        return total + acc[lane + 8]
    if kind == _TQ1_0 or kind == _TQ2_0:
        return acc[lane]
    return total


@njit(cache=True, nogil=True, parallel=True)
def _products(raw, codes, scales, sums, out, kind):
    """out[i, r] = weight row r . activation row i (`kind` a compile-time constant). Work items
    are chunks of weight rows; inside one, a tile of activation rows meets every row of the
    chunk, so both stay in cache."""
    literally(kind)
    lanes = _ACC_LANES[kind]
    block_bytes = _BLOCK_BYTES[kind]
    n = codes.shape[0]
    rows, row_bytes = raw.shape
    n_blocks = row_bytes // block_bytes
    tiled = n - n % _TILE
    rest = n - tiled
    for chunk in prange((rows + _ROW_CHUNK - 1) // _ROW_CHUNK):
        acc = stack_pointer(64)  # 16 lanes for each of the _TILE rows
        weights = (data_pointer(raw), row_bytes, block_bytes, n_blocks)
        activations = (data_pointer(codes), data_pointer(sums), data_pointer(scales))
        rows_of_chunk = (chunk * _ROW_CHUNK, min(rows, (chunk + 1) * _ROW_CHUNK))
        for first in range(0, tiled, _TILE):
            _tile(kind, _TILE, weights, activations, acc, lanes, first, rows_of_chunk, out)
        if rest == 3:
            _tile(kind, 3, weights, activations, acc, lanes, tiled, rows_of_chunk, out)
        elif rest == 2:
            _tile(kind, 2, weights, activations, acc, lanes, tiled, rows_of_chunk, out)
        elif rest == 1:
            _tile(kind, 1, weights, activations, acc, lanes, tiled, rows_of_chunk, out)


@njit(nogil=True, inline="always")
def _tile(kind, count, weights, activations, acc, lanes, first, rows_of_chunk, out):
    """Activation rows first .. first + count - 1 against the weight rows of one chunk. Each
    row's lanes, and so its float result, are those it gets in any other tile."""
    p, row_bytes, block_bytes, n_blocks = weights
    qp, sp, xp = activations
    for r in range(rows_of_chunk[0], rows_of_chunk[1]):
        for lane in range(lanes * count):
            acc[lane] = 0.0
        for k in range(n_blocks):
            _dot_blocks(kind, count, p, r * row_bytes + k * block_bytes, qp, sp, xp, first, n_blocks, k, acc)
        for t in range(count):
            out[first + t, r] = _finish(kind, acc, lanes * t)


# One entry point per format, written out: each fixes its literal kind and its activation
# rounding (block, code-sum dtype: activations.ACTIVATION_BLOCK and Q8_1_WEIGHTS). A factory's
# closures would put per-process cells into Numba's cache key (recompiled in every process),
# and calling _products with a literal kind from Python would take Numba's slow dispatch path
# on every product.


@njit(cache=True, nogil=True)
def products_q4_0(raw, X, out):
    codes, scales, sums = codes_of(X, Q8_0_BLOCK, np.int32)
    _products(raw, codes, scales, sums, out, _Q4_0)


@njit(cache=True, nogil=True)
def _pair_activations(codes, scales, sums, value_offset):
    """Q8_0 activation codes for _q5_0_pair_codegen: each 64 codes reordered to values 0..15 of
    block A, 0..15 of B, 16..31 of A, 16..31 of B; each block's scale in 4 lanes and its code
    sum times the weights' offset in the first of them."""
    n, cols = codes.shape
    n_pairs = cols // 64
    paired = np.empty_like(codes)
    lane_scales = np.empty((n, 8 * n_pairs), dtype=np.float32)
    lane_offsets = np.zeros((n, 8 * n_pairs), dtype=np.int32)
    for i in range(n):
        for p in range(n_pairs):
            for half in range(2):
                for b in range(2):
                    source = 64 * p + 32 * b + 16 * half
                    target = 64 * p + 32 * half + 16 * b
                    paired[i, target : target + 16] = codes[i, source : source + 16]
            for b in range(2):
                lane_scales[i, 8 * p + 4 * b : 8 * p + 4 * b + 4] = scales[i, 2 * p + b]
                lane_offsets[i, 8 * p + 4 * b] = value_offset * sums[i, 2 * p + b]
    return paired, lane_scales, lane_offsets


@njit(cache=True, nogil=True)
def products_q5_0(raw, X, out):
    codes, scales, sums = codes_of(X, Q8_0_BLOCK, np.int32)
    if codes.shape[1] % 64:
        _products(raw, codes, scales, sums, out, _Q5_0)
    else:
        paired, lane_scales, lane_offsets = _pair_activations(codes, scales, sums, 16)
        _products(raw, paired, lane_scales, lane_offsets, out, _Q5_0_PAIRS)


@njit(cache=True, nogil=True)
def products_q5_1(raw, X, out):
    codes, scales, sums = codes_of(X, Q8_0_BLOCK, np.float32)
    _products(raw, codes, scales, sums, out, _Q5_1)


@njit(cache=True, nogil=True)
def products_q8_0(raw, X, out):
    codes, scales, sums = codes_of(X, Q8_0_BLOCK, np.int32)
    _products(raw, codes, scales, sums, out, _Q8_0)


@njit(cache=True, nogil=True)
def products_q4_1(raw, X, out):
    codes, scales, sums = codes_of(X, Q8_0_BLOCK, np.float32)
    _products(raw, codes, scales, sums, out, _Q4_1)


@njit(cache=True, nogil=True)
def products_q2_k(raw, X, out):
    codes, scales, sums = codes_of(X, Q8_K_BLOCK, np.int16)
    _products(raw, codes, scales, sums, out, _Q2_K)


@njit(cache=True, nogil=True)
def products_q3_k(raw, X, out):
    codes, scales, sums = codes_of(X, Q8_K_BLOCK, np.int16)
    _products(raw, codes, scales, sums, out, _Q3_K)


@njit(cache=True, nogil=True)
def _in_lanes(codes, order):
    """Q8_K activation codes laid out as the repacked K-quant blocks (`order`: _lane_values)."""
    n, cols = codes.shape
    laid_out = np.empty_like(codes)
    for i in range(n):
        for first in range(0, cols, Q8_K_BLOCK):
            for q in range(Q8_K_BLOCK):
                laid_out[i, first + q] = codes[i, first + order[q]]
    return laid_out


@njit(cache=True, nogil=True)
def products_q4_k(raw, X, out):
    codes, scales, sums = codes_of(X, Q8_K_BLOCK, np.int16)
    _products(raw, _in_lanes(codes, _LANES_32), scales, sums, out, _Q4_K)


@njit(cache=True, nogil=True)
def products_q5_k(raw, X, out):
    codes, scales, sums = codes_of(X, Q8_K_BLOCK, np.int16)
    _products(raw, _in_lanes(codes, _LANES_32), scales, sums, out, _Q5_K)


@njit(cache=True, nogil=True)
def products_q6_k(raw, X, out):
    codes, scales, sums = codes_of(X, Q8_K_BLOCK, np.int16)
    _products(raw, _in_lanes(codes, _LANES_16), scales, sums, out, _Q6_K)


@njit(cache=True, nogil=True)
def _tq1_0_activations(codes):
    """Q8_K activation codes laid out for _tq1_0_codegen: per 256-value block, for digits
    n = 0..4, values 32n .. 32n + 31, then ten zeros, values 160 + 16n .. + 15, values
    240 + 4n .. + 3 (zeros for n = 4) and two zeros."""
    n, cols = codes.shape
    blocks = cols // Q8_K_BLOCK
    laid_out = np.zeros((n, blocks * _TQ1_0_ACTIVATION_BYTES), dtype=np.int8)
    for i in range(n):
        for b in range(blocks):
            source = Q8_K_BLOCK * b
            target = _TQ1_0_ACTIVATION_BYTES * b
            for digit in range(5):
                first = target + 64 * digit
                laid_out[i, first : first + 32] = codes[i, source + 32 * digit : source + 32 * digit + 32]
                second = first + 32
                laid_out[i, second + 10 : second + 26] = codes[i, source + 160 + 16 * digit : source + 176 + 16 * digit]
                if digit < 4:
                    laid_out[i, second + 26 : second + 30] = codes[
                        i, source + 240 + 4 * digit : source + 244 + 4 * digit
                    ]
    return laid_out


@njit(cache=True, nogil=True)
def products_tq1_0(raw, X, out):
    codes, scales, sums = codes_of(X, Q8_K_BLOCK, np.int16)
    _products(raw, _tq1_0_activations(codes), scales, sums, out, _TQ1_0)


@njit(cache=True, nogil=True)
def _row_group_activations(codes, sums, values):
    """Q8_K activation codes laid out for _row_group_codegen (`values`: _row_group_values),
    and each block's code sum."""
    n, cols = codes.shape
    blocks = cols // Q8_K_BLOCK
    per_block = values.shape[0]
    groups = Q8_K_BLOCK // Q8_K_SUM_GROUP
    laid_out = np.zeros((n, blocks * per_block), dtype=np.int8)
    block_sums = np.zeros((n, blocks), dtype=np.int32)
    for i in range(n):
        for b in range(blocks):
            for p in range(per_block):
                if values[p] >= 0:
                    laid_out[i, per_block * b + p] = codes[i, Q8_K_BLOCK * b + values[p]]
            for g in range(groups):
                block_sums[i, b] += sums[i, groups * b + g]
    return laid_out, block_sums


@njit(cache=True, nogil=True, parallel=True)
def _row_group_products(packed, codes, block_sums, scales, out, kind):
    """out[i, r] = weight row r . activation row i, for rows interleaved by sixteen (pack(),
    `kind` a compile-time constant): a group of sixteen rows is the parallel work item, and
    each tile of activation rows passes once over its blocks."""
    literally(kind)
    group_bytes = _BLOCK_BYTES[kind]
    n = codes.shape[0]
    rows = out.shape[1]
    groups, group_row_bytes = packed.shape
    n_blocks = group_row_bytes // group_bytes
    tiled = n - n % _TILE
    rest = n - tiled
    for g in prange(groups):
        acc = stack_pointer(1024)  # _Q4_K_GROUP_LANES (the most of any kind) for each of the _TILE rows
        weights = (data_pointer(packed), g * group_row_bytes, group_bytes, n_blocks)
        activations = (data_pointer(codes), data_pointer(block_sums), data_pointer(scales))
        group_rows = (_ROWS * g, min(rows, _ROWS * (g + 1)))
        for first in range(0, tiled, _TILE):
            _row_group_tile(kind, _TILE, weights, activations, acc, first, group_rows, out)
        if rest == 3:
            _row_group_tile(kind, 3, weights, activations, acc, tiled, group_rows, out)
        elif rest == 2:
            _row_group_tile(kind, 2, weights, activations, acc, tiled, group_rows, out)
        elif rest == 1:
            _row_group_tile(kind, 1, weights, activations, acc, tiled, group_rows, out)


@njit(nogil=True, inline="always")
def _row_group_tile(kind, count, weights, activations, acc, first, group_rows, out):
    p, start, group_bytes, n_blocks = weights
    qp, sp, xp = activations
    lanes = _ACC_LANES[kind]
    for lane in range(lanes * count):
        acc[lane] = 0.0
    for k in range(n_blocks):
        _dot_blocks(kind, count, p, start + k * group_bytes, qp, sp, xp, first, n_blocks, k, acc)
    for t in range(count):
        for r in range(group_rows[0], group_rows[1]):
            out[first + t, r] = _row_group_finish(kind, acc, lanes * t + r - group_rows[0])


@njit(nogil=True, inline="always")
def _row_group_finish(kind, acc, lane):
    """One row's product from its lanes of an activation row's accumulator, for Q4_K, Q6_K
    and Q5_0 summed as _finish sums the file-layout kernel's lanes."""
    if kind == _Q4_K_ROW_GROUPS:
        return _hsum_8(acc, lane, _ROWS) - _sum_8(acc, lane + 8 * _ROWS, _ROWS)
    if kind == _Q6_K_ROW_GROUPS or kind == _Q5_0_ROW_GROUPS:
        return _hsum_8(acc, lane, _ROWS)
    return acc[lane]


@njit(cache=True, nogil=True)
def products_tq1_0_row_groups(packed, X, out):
    codes, scales, sums = codes_of(X, Q8_K_BLOCK, np.int16)
    laid_out, block_sums = _row_group_activations(codes, sums, _TQ1_0_WORD_VALUES)
    _row_group_products(packed, laid_out, block_sums, scales, out, _TQ1_0_ROW_GROUPS)


@njit(cache=True, nogil=True)
def products_q4_k_row_groups(packed, X, out):
    codes, scales, sums = codes_of(X, Q8_K_BLOCK, np.int16)
    n, groups = sums.shape
    sub_block_sums = np.empty((n, groups // 2), dtype=np.float32)
    for i in range(n):
        for j in range(groups // 2):
            sub_block_sums[i, j] = np.float32(sums[i, 2 * j]) + np.float32(sums[i, 2 * j + 1])
    _row_group_products(packed, codes, sub_block_sums, scales, out, _Q4_K_ROW_GROUPS)


@njit(cache=True, nogil=True)
def products_q6_k_row_groups(packed, X, out):
    codes, scales, sums = codes_of(X, Q8_K_BLOCK, np.int16)
    _row_group_products(packed, codes, sums, scales, out, _Q6_K_ROW_GROUPS)


@njit(cache=True, nogil=True)
def products_q5_0_row_groups(packed, X, out):
    if X.shape[1] % (2 * Q8_0_BLOCK):
        # An odd number of blocks a row: pack() left the rows as in the file.
        products_q5_0(packed, X, out)
        return
    codes, scales, sums = codes_of(X, Q8_0_BLOCK, np.int32)
    _row_group_products(packed, codes, sums, scales, out, _Q5_0_ROW_GROUPS)


@njit(cache=True, nogil=True)
def products_tq2_0(raw, X, out):
    codes, scales, sums = codes_of(X, Q8_K_BLOCK, np.int16)
    _products(raw, codes, scales, sums, out, _TQ2_0)


@njit(cache=True, nogil=True)
def products_tq2_0_row_groups(packed, X, out):
    codes, scales, sums = codes_of(X, Q8_K_BLOCK, np.int16)
    laid_out, block_sums = _row_group_activations(codes, sums, _TQ2_0_WORD_VALUES)
    _row_group_products(packed, laid_out, block_sums, scales, out, _TQ2_0_ROW_GROUPS)


_Q4_K_NIBBLES = LAYOUTS[Q.Q4_K].field("qs").offset
_Q4_K_D, _Q4_K_DMIN, _Q4_K_SCALES = LAYOUTS[Q.Q4_K].offsets("d", "dmin", "scales")
_Q4_K_BYTES = LAYOUTS[Q.Q4_K].type_size
_Q6_K_BYTES, _Q6_K_D = LAYOUTS[Q.Q6_K].type_size, LAYOUTS[Q.Q6_K].field("d").offset
_Q4_K_SCALE_BYTES, _Q6_K_SCALE_BYTES = (LAYOUTS[qtype].field("scales").size for qtype in (Q.Q4_K, Q.Q6_K))
_Q5_K_NIBBLES, _Q5_K_BITS = LAYOUTS[Q.Q5_K].offsets("qs", "qh")
# The repacked K-quants, as `kind` of _repack.
_PACKED_Q4_K, _PACKED_Q5_K, _PACKED_Q6_K = range(3)


@njit(nogil=True, inline="always")
def _file_values(kind, block, values):
    """The block's codes (bytes block[0:], laid out as in the file) in value order.

    formats/quants.py decodes the same order in NumPy for dequantization; packing through that
    decode gave the same bytes but took 1.74 s instead of 0.11 s for the 1.5B's 151936x1536
    Q6_K output head (about 5 s added to the model's first forward), so pack decodes here."""
    if kind == _PACKED_Q6_K:
        for h in range(2):
            for l in range(32):
                low_a, low_b = block[_Q6_K_QL + 64 * h + l], block[_Q6_K_QL + 64 * h + 32 + l]
                high = block[_Q6_K_QH + 32 * h + l]
                values[128 * h + l] = (low_a & 15) | ((high & 3) << 4)
                values[128 * h + 32 + l] = (low_b & 15) | (((high >> 2) & 3) << 4)
                values[128 * h + 64 + l] = (low_a >> 4) | (((high >> 4) & 3) << 4)
                values[128 * h + 96 + l] = (low_b >> 4) | (((high >> 6) & 3) << 4)
        return
    nibbles_at = _Q5_K_NIBBLES if kind == _PACKED_Q5_K else _Q4_K_NIBBLES
    for c in range(4):
        for l in range(32):
            byte = block[nibbles_at + 32 * c + l]
            values[64 * c + l] = byte & 15
            values[64 * c + 32 + l] = byte >> 4
    if kind == _PACKED_Q5_K:
        for i in range(8):
            for l in range(32):
                values[32 * i + l] |= ((block[_Q5_K_BITS + l] >> i) & 1) << 4


@njit(nogil=True, inline="always")
def _write_vectors(kind, vectors, block):
    """The eight code vectors (vectors[32m:32m + 32] for vector m) into the block's code bytes,
    where the kernel's decoding of that format takes them from."""
    if kind == _PACKED_Q6_K:
        for h in range(2):
            for p in range(32):
                u = vectors[128 * h + p : 128 * h + 128 : 32]
                block[_Q6_K_QL + 64 * h + p] = (u[0] & 15) | ((u[2] & 15) << 4)
                block[_Q6_K_QL + 64 * h + 32 + p] = (u[1] & 15) | ((u[3] & 15) << 4)
                high = (u[0] >> 4) | ((u[1] >> 4) << 2) | ((u[2] >> 4) << 4) | ((u[3] >> 4) << 6)
                block[_Q6_K_QH + 32 * h + p] = high
        return
    nibbles_at = _Q5_K_NIBBLES if kind == _PACKED_Q5_K else _Q4_K_NIBBLES
    for c in range(4):
        for p in range(32):
            block[nibbles_at + 32 * c + p] = (vectors[64 * c + p] & 15) | ((vectors[64 * c + 32 + p] & 15) << 4)
    if kind == _PACKED_Q5_K:
        for p in range(32):
            bits = 0
            for m in range(8):
                bits |= ((vectors[32 * m + p] >> 4) & 1) << m
            block[_Q5_K_BITS + p] = bits


@njit(cache=True, nogil=True, parallel=True)
def _repack(raw, kind, block_bytes, order):
    """A copy of K-quant rows with each block's codes moved to the kernels' layout (value
    order[q] to position q of the eight code vectors); scales and the rest as they were."""
    rows, row_bytes = raw.shape
    packed = np.empty((rows, row_bytes), dtype=np.uint8)
    for r in prange(rows):
        values = np.empty(Q8_K_BLOCK, dtype=np.uint8)
        vectors = np.empty(Q8_K_BLOCK, dtype=np.uint8)
        for first in range(0, row_bytes, block_bytes):
            block = packed[r, first : first + block_bytes]
            block[:] = raw[r, first : first + block_bytes]
            _file_values(kind, block, values)
            for q in range(Q8_K_BLOCK):
                vectors[q] = values[order[q]]
            _write_vectors(kind, vectors, block)
    return packed


@njit(cache=True, nogil=True, parallel=True)
def _interleave_rows(raw, block_bytes):
    """Ternary rows in _row_group_codegen's layout: per group of sixteen rows (the last one
    padded with zero blocks) and block, word w of the sixteen blocks' code bytes in vector w,
    then their d (a block's last two bytes)."""
    rows, row_bytes = raw.shape
    n_blocks = row_bytes // block_bytes
    code_bytes = block_bytes - 2
    groups = (rows + _ROWS - 1) // _ROWS
    packed = np.zeros((groups, n_blocks * _ROWS * block_bytes), dtype=np.uint8)
    for g in prange(groups):
        for lane in range(min(_ROWS, rows - _ROWS * g)):
            r = _ROWS * g + lane
            for k in range(n_blocks):
                source = k * block_bytes
                target = k * _ROWS * block_bytes
                for m in range(code_bytes):
                    packed[g, target + 64 * (m // 4) + 4 * lane + m % 4] = raw[r, source + m]
                for b in range(2):
                    packed[g, target + _ROWS * code_bytes + 2 * lane + b] = raw[r, source + code_bytes + b]
    return packed


@njit(nogil=True, inline="always")
def _interleave_codes(kind, values, group, target, lane):
    """One block's codes (`values`, in value order) into lane `lane` of its group block at
    group[target:], as _q4_k_row_group_codegen or _q6_k_row_group_codegen reads them."""
    for j in range(8):
        for p in range(4):
            for b in range(4):
                if kind == _PACKED_Q6_K:
                    low, high = values[16 * j + 4 * p + b], values[128 + 16 * j + 4 * p + b]
                    at = target + _Q6_K_GROUP_LANE_BYTES * j + 4 * lane + b
                    group[at + 64 * p] = (low & 15) | ((high & 15) << 4)
                    group[at + _Q6_K_GROUP_HIGH_BITS] |= (low >> 4) << (2 * p)
                    group[at + _Q6_K_GROUP_HIGH_BITS + 64] |= (high >> 4) << (2 * p)
                else:
                    low, high = values[32 * j + 4 * p + b], values[32 * j + 16 + 4 * p + b]
                    group[target + 64 * (4 * j + p) + 4 * lane + b] = low | (high << 4)


@njit(cache=True, nogil=True, parallel=True)
def _interleave_k_quant_rows(raw, kind):
    """Q4_K or Q6_K rows (`kind` _PACKED_Q4_K or _PACKED_Q6_K) in their row-group kernel's
    layout, the last group padded with zero blocks."""
    q6_k = kind == _PACKED_Q6_K
    block_bytes = _Q6_K_BYTES if q6_k else _Q4_K_BYTES
    scales_at, scale_bytes = (_Q6_K_SCALES, _Q6_K_SCALE_BYTES) if q6_k else (_Q4_K_SCALES, _Q4_K_SCALE_BYTES)
    group_scales = _Q6_K_GROUP_SCALES if q6_k else _Q4_K_GROUP_SCALES
    d_at, group_d = (_Q6_K_D, _Q6_K_GROUP_D) if q6_k else (_Q4_K_D, _Q4_K_GROUP_D)
    rows, row_bytes = raw.shape
    n_blocks = row_bytes // block_bytes
    groups = (rows + _ROWS - 1) // _ROWS
    packed = np.zeros((groups, n_blocks * _ROWS * block_bytes), dtype=np.uint8)
    for g in prange(groups):
        values = np.empty(Q8_K_BLOCK, dtype=np.uint8)
        for lane in range(min(_ROWS, rows - _ROWS * g)):
            r = _ROWS * g + lane
            for k in range(n_blocks):
                source = raw[r, k * block_bytes : (k + 1) * block_bytes]
                target = k * _ROWS * block_bytes
                _file_values(kind, source, values)
                _interleave_codes(kind, values, packed[g], target, lane)
                for m in range(scale_bytes):
                    packed[g, target + group_scales + 64 * (m // 4) + 4 * lane + m % 4] = source[scales_at + m]
                for b in range(2):
                    packed[g, target + group_d + 2 * lane + b] = source[d_at + b]
                    if not q6_k:  # Q4_K's sixteen dmin follow its sixteen d
                        packed[g, target + group_d + 2 * _ROWS + 2 * lane + b] = source[_Q4_K_DMIN + b]
    return packed


@njit(cache=True, nogil=True, parallel=True)
def _interleave_q5_0_rows(raw):
    """Q5_0 rows (an even number of blocks each) in _q5_0_row_group_codegen's layout, the last
    group padded with zero blocks."""
    rows, row_bytes = raw.shape
    pairs = row_bytes // (2 * _Q5_0_BYTES)
    groups = (rows + _ROWS - 1) // _ROWS
    packed = np.zeros((groups, pairs * _Q5_0_GROUP_BYTES), dtype=np.uint8)
    for g in prange(groups):
        for lane in range(min(_ROWS, rows - _ROWS * g)):
            r = _ROWS * g + lane
            for k in range(pairs):
                target = k * _Q5_0_GROUP_BYTES
                for b in range(2):
                    source = (2 * k + b) * _Q5_0_BYTES
                    fifth_bits = np.uint32(0)
                    for m in range(4):
                        fifth_bits |= np.uint32(raw[r, source + _Q5_0_QH + m]) << np.uint32(8 * m)
                    for quad in range(4):
                        vector = 4 * b + quad
                        for i in range(4):
                            packed[g, target + 64 * vector + 4 * lane + i] = raw[r, source + _Q5_0_QS + 4 * quad + i]
                            bit_at = 4 * lane + i
                            for half in range(2):
                                bit = (fifth_bits >> np.uint32(16 * half + 4 * quad + i)) & np.uint32(1)
                                mask_at = target + _Q5_0_GROUP_MASKS + 8 * (2 * vector + half) + bit_at // 8
                                packed[g, mask_at] |= np.uint8(bit << np.uint32(bit_at % 8))
                    for i in range(2):
                        packed[g, target + _Q5_0_GROUP_D + 2 * _ROWS * b + 2 * lane + i] = raw[r, source + _Q5_0_D + i]
    return packed


# Per repacked format: its kind and the activation layout of its kernel.
_PACKED = {Q.Q4_K: (_PACKED_Q4_K, _LANES_32), Q.Q5_K: (_PACKED_Q5_K, _LANES_32), Q.Q6_K: (_PACKED_Q6_K, _LANES_16)}


def pack(qtype, raw: np.ndarray) -> np.ndarray:
    """`raw` (2-D uint8 rows of `qtype` blocks, as in the file) in the layout this module's
    kernel for `qtype` reads, read-only: a repacked copy for Q4_K, Q5_K and Q6_K, and for
    TQ1_0 and TQ2_0 where the host has their row-interleaved kernels (rows interleaved by
    sixteen, in ceil(rows / 16) packed rows), and so for Q4_K, Q6_K and Q5_0 (rows of an even
    number of blocks) on hosts where vpdpbusd takes 64-byte vectors; `raw` itself for every
    other format."""
    if qtype in _ROW_GROUP_KERNELS:
        if qtype == Q.Q5_0:
            if raw.shape[1] % (2 * _Q5_0_BYTES):
                return raw
            packed = _interleave_q5_0_rows(raw)
        elif qtype in _PACKED:
            packed = _interleave_k_quant_rows(raw, _PACKED[qtype][0])
        else:
            packed = _interleave_rows(raw, LAYOUTS[qtype].type_size)
        packed.flags.writeable = False
        return packed
    if qtype not in _PACKED:
        return raw
    kind, order = _PACKED[qtype]
    packed = _repack(raw, kind, LAYOUTS[qtype].type_size, order)
    packed.flags.writeable = False
    return packed


# Rows interleaved by sixteen: Q4_K, Q6_K, Q5_0 and TQ2_0 wherever vpdpbusd takes 64-byte vectors,
# TQ1_0 where vpermi2b also looks its digits up; the file's blocks (the K-quants' repacked)
# elsewhere.
_ROW_GROUP_KERNELS = {}
if HAS_VNNI_512:
    _ROW_GROUP_KERNELS[Q.TQ2_0] = products_tq2_0_row_groups
    _ROW_GROUP_KERNELS[Q.Q4_K] = products_q4_k_row_groups
    _ROW_GROUP_KERNELS[Q.Q6_K] = products_q6_k_row_groups
    _ROW_GROUP_KERNELS[Q.Q5_0] = products_q5_0_row_groups
if HAS_VBMI:
    _ROW_GROUP_KERNELS[Q.TQ1_0] = products_tq1_0_row_groups

# products(raw, X float32[n, cols], out float32[n, rows]), raw in pack()'s layout: X rounded to
# 8-bit codes (activations.codes_of, ggml's Q8_0 / Q8_1 / Q8_K for the format) and multiplied,
# in one call.
# One kernel serves matvec (n = 1) and matmul.
KERNELS = {
    Q.Q4_0: products_q4_0,
    Q.Q4_1: products_q4_1,
    Q.Q5_0: _ROW_GROUP_KERNELS.get(Q.Q5_0, products_q5_0),
    Q.Q5_1: products_q5_1,
    Q.Q8_0: products_q8_0,
    Q.Q2_K: products_q2_k,
    Q.Q3_K: products_q3_k,
    Q.Q4_K: _ROW_GROUP_KERNELS.get(Q.Q4_K, products_q4_k),
    Q.Q5_K: products_q5_k,
    Q.Q6_K: _ROW_GROUP_KERNELS.get(Q.Q6_K, products_q6_k),
    Q.TQ1_0: _ROW_GROUP_KERNELS.get(Q.TQ1_0, products_tq1_0),
    Q.TQ2_0: _ROW_GROUP_KERNELS.get(Q.TQ2_0, products_tq2_0),
}
