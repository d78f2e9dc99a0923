"""The format table (localllm.formats.quants.LAYOUTS) against gguf's sizes and ggml's block structs,
and the kernels' constants against the table."""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from localllm.formats.quants import ACTIVATION_LAYOUTS, LAYOUTS, CpuKernels, k_scales_mins, served_by
from localllm.kernels.cpu import floats, integer, kquants, legacy, products

Q = GGMLQuantizationType
QK_K = 256
K_SCALE_SIZE = 12

# ggml's block structs (ggml/src/ggml-common.h), written out field by field: (name, C type,
# element count). ggml_half is an f16; TQ1_0's qs holds five ternary digits per byte for all
# but the last QK_K / 64 bytes' worth of values, which qh holds four to a byte.
GGML_STRUCTS = {
    Q.F32: [("value", "float", 1)],
    Q.F16: [("value", "ggml_half", 1)],
    Q.BF16: [("value", "ggml_bf16_t", 1)],
    Q.Q4_0: [("d", "ggml_half", 1), ("qs", "uint8_t", 32 // 2)],
    Q.Q4_1: [("d", "ggml_half", 1), ("m", "ggml_half", 1), ("qs", "uint8_t", 32 // 2)],
    Q.Q5_0: [("d", "ggml_half", 1), ("qh", "uint8_t", 4), ("qs", "uint8_t", 32 // 2)],
    Q.Q5_1: [("d", "ggml_half", 1), ("m", "ggml_half", 1), ("qh", "uint8_t", 4), ("qs", "uint8_t", 32 // 2)],
    Q.Q8_0: [("d", "ggml_half", 1), ("qs", "int8_t", 32)],
    Q.Q8_1: [("d", "ggml_half", 1), ("s", "ggml_half", 1), ("qs", "int8_t", 32)],
    Q.Q2_K: [
        ("scales", "uint8_t", QK_K // 16),
        ("qs", "uint8_t", QK_K // 4),
        ("d", "ggml_half", 1),
        ("dmin", "ggml_half", 1),
    ],
    Q.Q3_K: [
        ("hmask", "uint8_t", QK_K // 8),
        ("qs", "uint8_t", QK_K // 4),
        ("scales", "uint8_t", 12),
        ("d", "ggml_half", 1),
    ],
    Q.Q4_K: [
        ("d", "ggml_half", 1),
        ("dmin", "ggml_half", 1),
        ("scales", "uint8_t", K_SCALE_SIZE),
        ("qs", "uint8_t", QK_K // 2),
    ],
    Q.Q5_K: [
        ("d", "ggml_half", 1),
        ("dmin", "ggml_half", 1),
        ("scales", "uint8_t", K_SCALE_SIZE),
        ("qh", "uint8_t", QK_K // 8),
        ("qs", "uint8_t", QK_K // 2),
    ],
    Q.Q6_K: [
        ("ql", "uint8_t", QK_K // 2),
        ("qh", "uint8_t", QK_K // 4),
        ("scales", "int8_t", QK_K // 16),
        ("d", "ggml_half", 1),
    ],
    Q.Q8_K: [("d", "float", 1), ("qs", "int8_t", QK_K), ("bsums", "int16_t", QK_K // 16)],
    Q.TQ1_0: [
        ("qs", "uint8_t", (QK_K - 4 * QK_K // 64) // 5),
        ("qh", "uint8_t", QK_K // 64),
        ("d", "ggml_half", 1),
    ],
    Q.TQ2_0: [("qs", "uint8_t", QK_K // 4), ("d", "ggml_half", 1)],
}
# NumPy dtype of each C type as the layouts store it (bf16 as its bit pattern).
C_TYPES = {
    "float": "<f4",
    "ggml_half": "<f2",
    "ggml_bf16_t": "<u2",
    "uint8_t": "u1",
    "int8_t": "i1",
    "int16_t": "<i2",
}
# ggml-cpu's vec_dot_type of each weight type; the float types' activations are not rounded.
GGML_VEC_DOT_TYPE = {
    Q.Q4_0: Q.Q8_0,
    Q.Q4_1: Q.Q8_1,
    Q.Q5_0: Q.Q8_0,
    Q.Q5_1: Q.Q8_1,
    Q.Q8_0: Q.Q8_0,
    Q.Q2_K: Q.Q8_K,
    Q.Q3_K: Q.Q8_K,
    Q.Q4_K: Q.Q8_K,
    Q.Q5_K: Q.Q8_K,
    Q.Q6_K: Q.Q8_K,
    Q.TQ1_0: Q.Q8_K,
    Q.TQ2_0: Q.Q8_K,
}
FLOAT_MODULES = {CpuKernels.FLOATS: floats, CpuKernels.LEGACY: legacy, CpuKernels.KQUANTS: kquants}
ALL_LAYOUTS = {**LAYOUTS, **ACTIVATION_LAYOUTS}


@pytest.mark.parametrize("qtype", list(ALL_LAYOUTS), ids=lambda q: q.name)
def test_layout_is_ggmls_block_struct(qtype):
    layout = ALL_LAYOUTS[qtype]
    offset = 0
    expected = []
    for name, c_type, count in GGML_STRUCTS[qtype]:
        dtype = np.dtype(C_TYPES[c_type])
        expected.append((name, offset, count * dtype.itemsize, dtype.str, count))
        offset += count * dtype.itemsize
    got = [(f.name, f.offset, f.size, np.dtype(f.dtype).str, f.count) for f in layout.fields]
    assert got == expected
    assert layout.type_size == offset
    # gguf-py still lists Q8_1 with float32 d and s (40 bytes), ggml's struct has f16 ones.
    if qtype != Q.Q8_1:
        assert (layout.block_size, layout.type_size) == GGML_QUANT_SIZES[qtype]
    assert layout.offsets(*(f.name for f in layout.fields)) == tuple(f.offset for f in layout.fields)


@pytest.mark.parametrize("qtype", list(LAYOUTS), ids=lambda q: q.name)
def test_activation_format_is_ggmls_vec_dot_type(qtype):
    layout = LAYOUTS[qtype]
    assert layout.activation == GGML_VEC_DOT_TYPE.get(qtype, Q.F32)
    if layout.activation != Q.F32:
        assert layout.block_size % ACTIVATION_LAYOUTS[layout.activation].block_size == 0


@pytest.mark.parametrize("qtype", list(LAYOUTS), ids=lambda q: q.name)
def test_every_format_has_one_float_module_and_the_modules_serve_what_the_table_says(qtype):
    kernels = LAYOUTS[qtype].cpu_kernels
    float_modules = [k for k in kernels if k in FLOAT_MODULES]
    assert len(float_modules) == 1
    assert qtype in FLOAT_MODULES[float_modules[0]].KERNELS
    assert products.KERNELS[qtype] is FLOAT_MODULES[float_modules[0]].KERNELS[qtype]
    assert (CpuKernels.INTEGER in kernels) == (qtype in integer.KERNELS)
    for kernel, module in FLOAT_MODULES.items():
        assert set(module.KERNELS) == set(served_by(kernel))


def test_kernel_constants_come_from_the_table():
    assert kquants.QK_K == QK_K and legacy.BLOCK == 32
    kinds = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "TQ1_0", "TQ2_0")
    for kind, name in enumerate(kinds):
        assert getattr(kquants, f"_{name}") == kind
        assert kquants._BLOCK_BYTES[kind] == LAYOUTS[Q[name]].type_size
    for kind, (block_bytes, values, sum_group, _, _) in integer._FORMATS.items():
        if kind in (
            integer._Q5_0_PAIRS,
            integer._TQ1_0,
            integer._TQ1_0_ROW_GROUPS,
            integer._TQ2_0_ROW_GROUPS,
            integer._Q4_K_ROW_GROUPS,
            integer._Q6_K_ROW_GROUPS,
            integer._Q5_0_ROW_GROUPS,
        ):
            continue
        qtype = next(q for q in integer.KERNELS if getattr(integer, f"_{q.name}", None) == kind)
        assert (block_bytes, values) == (LAYOUTS[qtype].type_size, LAYOUTS[qtype].block_size)
        assert sum_group == (16 if LAYOUTS[qtype].activation == Q.Q8_K else 32)
    assert integer._FORMATS[integer._Q5_0_PAIRS][:3] == (44, 64, 8)
    assert integer._FORMATS[integer._TQ1_0][:3] == (54, 320, 20)
    # sixteen interleaved blocks; 13 words of digit bytes, five digits, four codes each
    assert integer._FORMATS[integer._TQ1_0_ROW_GROUPS][:3] == (16 * 54, 260, 260)
    # sixteen interleaved blocks; 16 words of codes, four fields, four codes each
    assert integer._FORMATS[integer._TQ2_0_ROW_GROUPS][:3] == (16 * 66, 256, 256)
    # sixteen interleaved blocks; the activations in their order, one code sum per sub-block
    assert integer._FORMATS[integer._Q4_K_ROW_GROUPS][:3] == (16 * 144, 256, 32)
    assert integer._FORMATS[integer._Q6_K_ROW_GROUPS][:3] == (16 * 210, 256, 16)
    # sixteen interleaved pairs of blocks; the activations in their order, a code sum per block
    assert integer._FORMATS[integer._Q5_0_ROW_GROUPS][:3] == (16 * 44, 64, 32)


def _ggml_scale_min_k4(j, q):
    """ggml-quants.c's get_scale_min_k4, transcribed."""
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4)


def test_the_one_k_scale_unpacking_matches_ggml_in_numpy_and_in_the_kernels():
    packed = np.random.default_rng(0).integers(0, 256, size=(64, 12), dtype=np.uint8)
    packed[0] = 255
    packed[1] = 0
    want = np.array([[_ggml_scale_min_k4(j, [int(b) for b in row]) for j in range(8)] for row in packed])
    low_scales, low_mins, high_scales, high_mins = k_scales_mins(packed[:, 0:4], packed[:, 4:8], packed[:, 8:12])
    np.testing.assert_array_equal(np.concatenate([low_scales, high_scales], axis=1), want[:, :, 0])
    np.testing.assert_array_equal(np.concatenate([low_mins, high_mins], axis=1), want[:, :, 1])
    row = packed.reshape(-1)
    for b in range(len(packed)):
        for j in range(8):
            assert kquants._k_scale_min(row, 12 * b, j) == tuple(want[b, j])
