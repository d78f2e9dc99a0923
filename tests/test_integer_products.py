"""Integer products (8-bit weight codes times 8-bit activation codes, integer.py) and the
activation codes they consume."""

import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFWriter

from localllm.formats.gguf import open_gguf
from localllm.kernels.cpu import KERNELS, CheckedWeight, integer, matmul, matvec
from localllm.kernels.cpu.activations import activation_codes, quantize_activations

from kernel_helpers import (
    Q,
    llama_activations,
    llama_product,
    random_activations,
    random_weight,
    reference_product,
    relative_error,
)

FORMATS = sorted(integer.KERNELS, key=lambda q: q.value)
needs_avx2 = pytest.mark.skipif(not integer.AVAILABLE, reason="integer matvec needs an AVX2 target")


def rows_with_edge_cases(cols):
    """Random rows plus a zero block, a lone outlier and exact rounding ties."""
    X = random_activations(4, cols, seed=3)
    X[0, :256] = 0.0
    X[1, 300 % cols] = -4000.0
    X[2, :32] = np.arange(32, dtype=np.float32) - 15.5
    X[3] *= np.float32(1e-7)
    return X


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K], ids=lambda q: q.name)
def test_codes_times_scales_are_the_rounded_activations(qtype):
    X = rows_with_edge_cases(512)
    codes, scales, sums = activation_codes(X, qtype)
    block = 256 if qtype == Q.Q4_K else 32
    group = 16 if qtype == Q.Q4_K else 32
    assert codes.dtype == np.int8 and codes.shape == X.shape
    assert scales.shape == (4, 512 // block) and sums.shape == (4, 512 // group)
    values = codes.reshape(4, -1, block).astype(np.float32) * scales[:, :, None]
    np.testing.assert_array_equal(values.reshape(X.shape), llama_activations(X, qtype))
    np.testing.assert_array_equal(quantize_activations(X, qtype), llama_activations(X, qtype))
    np.testing.assert_array_equal(sums, codes.reshape(4, -1, group).astype(np.int64).sum(axis=2))


@needs_avx2
@pytest.mark.parametrize("blocks_per_row", [1, 2, 7])
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_integer_matvec_matches_float64(qtype, blocks_per_row):
    """Every bit pattern of random blocks (all scale and min fields, negative d and dmin)."""
    block = GGML_QUANT_SIZES[qtype][0]
    weight = random_weight(qtype, rows=45, blocks_per_row=blocks_per_row * 256 // block, seed=blocks_per_row)
    for seed, x in enumerate(rows_with_edge_cases(weight.shape[1])):
        out = np.full(weight.shape[0], np.nan, dtype=np.float32)
        integer.KERNELS[qtype](integer.pack(qtype, weight.raw), x[None], out[None])
        want = llama_product(weight, weight.dequantize(), x[None])[0]
        # A row of zero activations (one block of 256) must give exactly zero.
        assert np.linalg.norm(out - want) <= 1e-5 * np.linalg.norm(want), seed


@needs_avx2
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_integer_matmul_matches_float64(qtype):
    block = GGML_QUANT_SIZES[qtype][0]
    weight = random_weight(qtype, rows=37, blocks_per_row=2 * 256 // block, seed=9)
    dequantized = weight.dequantize()
    for n in (2, 3, 4, 5, 16, 129):
        X = random_activations(n, weight.shape[1], seed=n)
        out = np.full((n, weight.shape[0]), np.nan, dtype=np.float32)
        integer.KERNELS[qtype](integer.pack(qtype, weight.raw), X, out)
        assert relative_error(out, llama_product(weight, dequantized, X)) <= 1e-5, n


@needs_avx2
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 48])
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.TQ1_0, Q.TQ2_0, Q.Q5_0], ids=lambda q: q.name)
def test_rows_in_groups_of_sixteen_and_a_partial_one(qtype, rows):
    """With AVX-512 VNNI, Q4_K, Q6_K, Q5_0 and ternary rows are interleaved sixteen at a time,
    the last group padded: every row count gives each row's product, and nothing past the last
    row is written."""
    # Q5_0 in pairs of blocks: six blocks, three pairs.
    weight = random_weight(qtype, rows=rows, blocks_per_row=6 if qtype == Q.Q5_0 else 3, seed=rows)
    X = random_activations(5, weight.shape[1], seed=rows)
    memory = np.full(5 * rows + 16, np.nan, dtype=np.float32)
    out = memory[: 5 * rows].reshape(5, rows)
    integer.KERNELS[qtype](integer.pack(qtype, weight.raw), X, out)
    assert relative_error(out, llama_product(weight, weight.dequantize(), X)) <= 1e-5
    assert np.isnan(memory[5 * rows :]).all()


@needs_avx2
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_each_row_of_a_batch_is_bit_identical_to_the_row_alone(qtype):
    """Batch invariance: n rows go through tiles of four and one tile of the rest; whatever
    tile a row lands in, at whatever offset, its product is the one it gets alone (decoding,
    prefill and speculative verification agree bit for bit)."""
    block = GGML_QUANT_SIZES[qtype][0]
    weight = random_weight(qtype, rows=37, blocks_per_row=2 * 256 // block, seed=11)
    X = random_activations(17, weight.shape[1], seed=17)
    alone = np.full((17, weight.shape[0]), np.nan, dtype=np.float32)
    for i in range(17):
        integer.KERNELS[qtype](integer.pack(qtype, weight.raw), X[i : i + 1], alone[i : i + 1])
    assert np.isfinite(alone).all()
    for n in range(1, 18):
        for offset in sorted({0, (17 - n) // 2, 17 - n}):
            out = np.full((n, weight.shape[0]), np.nan, dtype=np.float32)
            integer.KERNELS[qtype](integer.pack(qtype, weight.raw), np.ascontiguousarray(X[offset : offset + n]), out)
            np.testing.assert_array_equal(out, alone[offset : offset + n], err_msg=f"n={n} offset={offset}")


# Numba compiles for these features instead of the host's: AVX2 and F16C, no AVX-512 or VNNI.
HASWELL_FEATURES = (
    "+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+cx8,+f16c,+fma,+fsgsbase,+fxsr,+lzcnt,"
    "+mmx,+movbe,+pclmul,+popcnt,+rdrnd,+sahf,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave,+xsaveopt"
)
OTHER_TARGETS = {
    # Every format's AVX2 path, as on a host without AVX-512 or VNNI.
    "avx2": (HASWELL_FEATURES, FORMATS),
    # vpdpbusd on 32-byte vectors only, as on an AVX-VNNI host (there VEX-encoded, which this
    # AVX-512 host may not have): the file-layout kernels of Q4_K, Q6_K, Q5_0 and the ternary
    # formats, whose rows are interleaved wherever vpdpbusd takes 64-byte vectors.
    "vnni-256": (HASWELL_FEATURES + ",+avx512f,+avx512vl,+avx512vnni", [Q.Q4_K, Q.Q6_K, Q.Q5_0, Q.TQ1_0, Q.TQ2_0]),
}
_OTHER_TARGET_PRODUCTS = """
import sys
import numpy as np
from localllm.kernels.cpu import integer
assert integer.AVAILABLE and not integer.HAS_VNNI_512
assert integer.HAS_VNNI == (sys.argv[3] == "vnni-256")
data = dict(np.load(sys.argv[1]))
out = {}
for name in sys.argv[4:]:
    qtype = integer.Q[name]
    X = data["X"][:, : data[f"{name}.cols"][0]].copy()
    raw = data[f"{name}.raw"]
    raw.flags.writeable = False
    out[name] = np.empty((X.shape[0], raw.shape[0]), dtype=np.float32)
    integer.KERNELS[qtype](integer.pack(qtype, raw), X, out[name])
np.savez(sys.argv[2], **out)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "target",
    [
        pytest.param(
            "avx2", marks=pytest.mark.skipif(not integer.HAS_VNNI, reason="this host's kernels are the AVX2 ones")
        ),
        pytest.param(
            "vnni-256",
            marks=pytest.mark.skipif(not integer.HAS_VNNI_512, reason="this host's kernels are the 32-byte VNNI ones"),
        ),
    ],
)
def test_this_hosts_kernels_equal_other_hosts_kernels_bit_for_bit(tmp_path, target):
    """The VNNI kernels (vpdpbusd, vpdpwssd) add the same integers into the same lanes as the
    AVX2 ones (vpmaddubsw, vpmaddwd), the ternary formats' row-interleaved kernels meet each
    block's integer total with the same multiply-add as their file-layout kernels, and Q4_K's,
    Q6_K's and Q5_0's keep each row's float lanes, so the products are identical. The other
    host's kernels run in a process whose Numba targets its features; a tile of four, one of
    three and one of two (n = 9) and a single row."""
    features, formats = OTHER_TARGETS[target]
    data = {"X": random_activations(9, 1024, seed=21)}
    for qtype in formats:
        block = GGML_QUANT_SIZES[qtype][0]
        weight = random_weight(qtype, rows=29, blocks_per_row=4 * 256 // block, seed=qtype.value)
        data[f"{qtype.name}.raw"], data[f"{qtype.name}.cols"] = weight.raw, np.array([weight.shape[1]])
    np.savez(tmp_path / "in.npz", **data)
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES=features)
    subprocess.run(
        [sys.executable, "-c", _OTHER_TARGET_PRODUCTS, str(tmp_path / "in.npz"), str(tmp_path / "out.npz"), target]
        + [qtype.name for qtype in formats],
        env=env,
        check=True,
        timeout=900,
    )
    other = np.load(tmp_path / "out.npz")
    for qtype in formats:
        raw = data[f"{qtype.name}.raw"]
        raw.flags.writeable = False
        for rows in (slice(0, 9), slice(4, 5)):
            X = np.ascontiguousarray(data["X"][rows, : data[f"{qtype.name}.cols"][0]])
            here = np.empty((X.shape[0], raw.shape[0]), dtype=np.float32)
            integer.KERNELS[qtype](integer.pack(qtype, raw), X, here)
            np.testing.assert_array_equal(here, other[qtype.name][rows], err_msg=qtype.name)


@needs_avx2
@pytest.mark.parametrize("blocks_per_row", [1, 3, 7, 8])
@pytest.mark.parametrize("qtype", [q for q in FORMATS if GGML_QUANT_SIZES[q][0] == 32], ids=lambda q: q.name)
def test_rows_of_any_number_of_32_value_blocks(qtype, blocks_per_row):
    """Q5_0 rows with an even number of blocks are multiplied two blocks at a time (sixteen
    rows interleaved where vpdpbusd takes 64-byte vectors), odd ones one block at a time; both,
    for one row and for a tile of four plus one."""
    weight = random_weight(qtype, rows=21, blocks_per_row=blocks_per_row, seed=blocks_per_row)
    dequantized = weight.dequantize()
    for n in (1, 5):
        X = random_activations(n, weight.shape[1], seed=n)
        out = np.full((n, weight.shape[0]), np.nan, dtype=np.float32)
        integer.KERNELS[qtype](integer.pack(qtype, weight.raw), X, out)
        assert relative_error(out, llama_product(weight, dequantized, X)) <= 1e-5, n


@needs_avx2
def test_matvec_takes_the_integer_kernel_and_agrees_with_the_float_one(model_path):
    """SmolLM2's Q8_0 embedding (its tied output head): integer and float kernels differ only
    by float32 rounding, on all 49,152 rows."""
    tensor = open_gguf(model_path("smollm2-135m-instruct")).tensor("token_embd.weight")
    assert tensor.type in integer.KERNELS
    x = random_activations(1, tensor.shape[1], seed=5)[0]
    floats = np.empty(tensor.shape[0], dtype=np.float32)
    KERNELS[tensor.type][0](tensor.raw, quantize_activations(x, tensor.type), floats)
    assert relative_error(matvec(tensor, x), floats) <= 1e-5


@needs_avx2
@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["blk.0.ffn_up.weight", "blk.0.ffn_down.weight", "blk.0.attn_v.weight", "blk.11.ffn_down.weight"]
)
def test_qwen_tensors(model_path, name):
    """One tensor of each integer format (Q5_0, Q6_K, Q8_0, Q4_K) of a real model."""
    tensor = open_gguf(model_path("qwen2.5-coder-0.5b-instruct")).tensor(name)
    assert tensor.type in integer.KERNELS
    x = random_activations(1, tensor.shape[1], seed=6)[0]
    rows = min(tensor.shape[0], 2000)
    raw = np.ascontiguousarray(tensor.raw[:rows])
    out = np.empty(rows, dtype=np.float32)
    integer.KERNELS[tensor.type](integer.pack(tensor.type, raw), x[None], out[None])
    want = reference_product(tensor.dequantize()[:rows], llama_activations(x[None], tensor.type))[0]
    assert relative_error(out, want) <= 1e-5


@needs_avx2
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_a_file_weight_is_repacked_once_and_its_mapped_bytes_stay_readable(tmp_path, qtype):
    """A checked GGUF tensor packs its codes on its first integer product and then drops its
    mapped pages from the resident set; products, and the tensor's own view of the file, are
    unchanged by that."""
    weight = random_weight(qtype, rows=1024, blocks_per_row=6, seed=qtype.value)
    path = tmp_path / "weights.gguf"
    writer = GGUFWriter(str(path), "synthetic")
    writer.add_tensor("w", weight.raw, raw_shape=weight.raw.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    X = random_activations(5, weight.shape[1], seed=4)
    want = llama_product(weight, weight.dequantize(), X)
    with open_gguf(path) as gguf_file:
        tensor = gguf_file.tensor("w")
        checked = CheckedWeight(tensor)
        first = matmul(checked, X)
        assert checked.integer_raw() is checked.integer_raw()
        assert not np.array_equal(checked.integer_raw(), weight.raw)  # the codes moved
        np.testing.assert_array_equal(tensor.raw, weight.raw)
        np.testing.assert_array_equal(matmul(checked, X), first)
        assert relative_error(first, want) <= 1e-5
