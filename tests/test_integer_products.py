"""Integer products (8-bit weight codes times 8-bit activation codes, integer.py) and the
activation codes they consume."""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES

from localllm.formats.gguf import open_gguf
from localllm.kernels.cpu import KERNELS, integer, matvec
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
        integer.KERNELS[qtype](weight.raw, x[None], out[None])
        want = llama_product(weight, weight.dequantize(), x[None])[0]
        # A row of zero activations (one block of 256) must give exactly zero.
        assert np.linalg.norm(out - want) <= 1e-5 * np.linalg.norm(want), seed


@needs_avx2
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_integer_matmul_matches_float64_and_does_not_depend_on_the_tile(qtype):
    """n rows go through tiles of four plus single rows; each row's product is bit-identical
    to the same row computed alone (decoding and prefill agree)."""
    block = GGML_QUANT_SIZES[qtype][0]
    weight = random_weight(qtype, rows=37, blocks_per_row=2 * 256 // block, seed=9)
    dequantized = weight.dequantize()
    for n in (2, 3, 4, 5, 16, 129):
        X = random_activations(n, weight.shape[1], seed=n)
        out = np.full((n, weight.shape[0]), np.nan, dtype=np.float32)
        integer.KERNELS[qtype](weight.raw, X, out)
        assert relative_error(out, llama_product(weight, dequantized, X)) <= 1e-5, n
        alone = np.empty((1, weight.shape[0]), dtype=np.float32)
        integer.KERNELS[qtype](weight.raw, X[-1:], alone)
        np.testing.assert_array_equal(out[-1], alone[0])


@needs_avx2
@pytest.mark.parametrize("blocks_per_row", [1, 3, 7, 8])
@pytest.mark.parametrize("qtype", [q for q in FORMATS if GGML_QUANT_SIZES[q][0] == 32], ids=lambda q: q.name)
def test_rows_of_any_number_of_32_value_blocks(qtype, blocks_per_row):
    """Q5_0 rows with an even number of blocks are multiplied two blocks at a time, odd ones
    one block at a time; both, for one row and for a tile of four plus one."""
    weight = random_weight(qtype, rows=21, blocks_per_row=blocks_per_row, seed=blocks_per_row)
    dequantized = weight.dequantize()
    for n in (1, 5):
        X = random_activations(n, weight.shape[1], seed=n)
        out = np.full((n, weight.shape[0]), np.nan, dtype=np.float32)
        integer.KERNELS[qtype](weight.raw, X, out)
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
    integer.KERNELS[tensor.type](raw, x[None], out[None])
    want = reference_product(tensor.dequantize()[:rows], llama_activations(x[None], tensor.type))[0]
    assert relative_error(out, want) <= 1e-5
