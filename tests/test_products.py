"""Products for the float and legacy (32-value block) formats against float64 NumPy."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from localllm import KernelError
from localllm.formats.gguf import open_gguf
from localllm.kernels.cpu import KERNELS, CheckedWeight, embed, get_threads, integer, matmul, matvec, set_threads
from localllm.kernels.cpu.activations import quantize_activations
from localllm.kernels.cpu.threads import max_threads
from localllm.kernels.cpu.warmup import warm_up

from kernel_helpers import (
    Q,
    RawWeight,
    block_size,
    llama_activations,
    product_errors,
    random_activations,
    random_weight,
)

# Products are exact up to float32 rounding, both on float32 activations and on activations
# rounded to 8 bits (compared with the same rounding done in NumPy).
TOLERANCE = 1e-5
# Q4_1 and Q5_1 on 8-bit activations, as llama.cpp computes them (integer.py): on SmolLM2's
# real rows the m * s terms nearly cancel the d terms, so float32 rounding relative to the
# small result reaches 4e-5 (against the same arithmetic in float64). The bound here
# is 1e-3.
QUANTIZED_MINIMUM_TOLERANCE = 1e-4
FORMATS = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
BATCH_SIZES = [1, 2, 3, 16, 64, 129]


def random_case(qtype, blocks_per_row, rows=45, seed=0):
    """A random weight whose rows are `blocks_per_row` blocks (32 values for the float types)."""
    per_block = 32 if qtype in (Q.F32, Q.F16, Q.BF16) else 1
    return random_weight(qtype, rows, blocks_per_row * per_block, seed=seed)


def check_products(weight, dequantized, batch_sizes=BATCH_SIZES):
    cols = weight.shape[1]
    for n in batch_sizes:
        X = random_activations(n, cols, seed=n)
        exact, quantized = product_errors(weight, dequantized, X)
        bound = QUANTIZED_MINIMUM_TOLERANCE if weight.type in (Q.Q4_1, Q.Q5_1) else TOLERANCE
        assert exact <= TOLERANCE and quantized <= bound, (weight.name, n, exact, quantized)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.TQ2_0])
def test_activation_rounding_matches_ggml(qtype):
    """Blocks of zeros, a lone outlier (Qwen2's first position has such rows) and values that
    land exactly on a rounding tie are rounded exactly as ggml rounds them."""
    rng = np.random.default_rng(7)
    X = rng.standard_normal((4, 512)).astype(np.float32)
    X[0, :256] = 0.0
    X[1, 300] = -4000.0
    X[2, :32] = np.arange(32, dtype=np.float32) - 15.5
    X[2, 31] = 127.0
    X[3] *= np.float32(1e-7)
    np.testing.assert_array_equal(quantize_activations(X, qtype), llama_activations(X, qtype))


def test_float_weights_keep_float_activations():
    X = random_activations(2, 64)
    assert quantize_activations(X, Q.F16) is X


def test_every_format_is_dispatched():
    assert set(FORMATS) <= set(KERNELS)


@pytest.mark.parametrize("blocks_per_row", [1, 2, 7])
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_random_blocks_match_float64(qtype, blocks_per_row):
    weight = random_case(qtype, blocks_per_row)
    check_products(weight, weight.dequantize())


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_embed_is_bit_exact_on_random_blocks(qtype):
    weight = random_case(qtype, 3)
    ids = np.array([7, 0, 44, 7, 13])
    np.testing.assert_array_equal(embed(weight, ids), weight.dequantize()[ids])


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_out_argument_is_filled_and_returned(qtype):
    weight = random_case(qtype, 2)
    X = random_activations(4, weight.shape[1])
    out = np.full((4, weight.shape[0]), np.nan, dtype=np.float32)
    assert matmul(weight, X, out=out) is out
    np.testing.assert_array_equal(out, matmul(weight, X))
    vec_out = np.full(weight.shape[0], np.nan, dtype=np.float32)
    assert matvec(weight, X[0], out=vec_out) is vec_out
    np.testing.assert_array_equal(vec_out, matvec(weight, X[0]))


def test_half_scales_cover_subnormals_and_extremes():
    weight = random_case(Q.Q8_0, 4, rows=8)
    blocks = weight.raw.reshape(8, 4, 34)
    for k, half in enumerate([np.float16(6e-8), np.float16(-65504.0), np.float16(0.0), np.float16(1e-5)]):
        blocks[:, k, 0:2] = np.array([half], dtype=np.float16).view(np.uint8)
    np.testing.assert_array_equal(embed(weight, np.arange(8)), weight.dequantize())


def store_tensor(path, name):
    """A tensor of a real model, with its reference dequantization from the store."""
    g = open_gguf(path)
    tensor = g.tensor(name)
    return tensor, tensor.dequantize()


def first_rows(tensor, rows):
    """The first `rows` rows of a big real tensor, as a weight of its own."""
    part = RawWeight(tensor.type, tensor.raw[:rows], (rows, tensor.shape[1]), tensor.name)
    return part, part.dequantize()


@pytest.mark.parametrize("name", ["blk.0.ffn_down.weight", "blk.5.attn_q.weight", "token_embd.weight"])
def test_smollm2_tensors(model_path, name):
    tensor, dequantized = store_tensor(model_path("smollm2-135m-instruct"), name)
    assert tensor.type in (Q.Q4_1, Q.Q8_0)
    check_products(tensor, dequantized, batch_sizes=[1, 3, 16] if tensor.shape[0] > 4096 else BATCH_SIZES)
    ids = np.array([0, tensor.shape[0] - 1, 17, 17, 300])
    np.testing.assert_array_equal(embed(tensor, ids), dequantized[ids])


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, names",
    [
        ("gemma-3-270m", ["blk.0.attn_k.weight", "token_embd.weight"]),
        ("qwen2.5-coder-0.5b-instruct", ["token_embd.weight", "output.weight"]),
    ],
)
def test_larger_model_tensors(model_path, model, names):
    g = open_gguf(model_path(model))
    for name in names:
        tensor = g.tensor(name)
        assert tensor.type in (Q.Q5_0, Q.Q8_0)
        weight, dequantized = first_rows(tensor, min(tensor.shape[0], 3000))
        check_products(weight, dequantized)
        ids = np.array([0, 2999 if tensor.shape[0] >= 3000 else 1, 5])
        np.testing.assert_array_equal(embed(tensor, ids), dequantized[ids])


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_products_do_not_depend_on_the_thread_count(qtype):
    weight = random_weight(qtype, rows=1000, blocks_per_row=1536 // block_size(qtype), seed=2)
    batches = [random_activations(n, weight.shape[1], seed=n) for n in (1, 16, 129)]
    results = {}
    configured = get_threads()
    try:
        for threads in sorted({1, max_threads()}):
            set_threads(threads)
            results[threads] = [matmul(weight, X) for X in batches]
    finally:
        set_threads(configured)
    for got, want in zip(results[max_threads()], results[1]):
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_warm_up_reports_progress():
    seen = []
    warm_up(types=[Q.Q4_0, Q.F16], progress=lambda label, done, total: seen.append((label, done, total)), processes=1)
    assert [done for _, done, _ in seen] == [0, 1, 2]
    assert all(total == 3 for _, _, total in seen)


PARALLEL_WARM_UP = """
import json
from gguf import GGMLQuantizationType as Q
from localllm.kernels.cpu.warmup import warm_up
seen = []
warm_up(types=[Q.Q4_0, Q.TQ1_0], progress=lambda label, done, total: seen.append([label, done, total]), processes=2)
print(json.dumps(seen))
"""


@pytest.mark.slow
def test_parallel_warm_up_compiles_in_two_processes_into_one_cache(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-c", PARALLEL_WARM_UP], env=env, capture_output=True, text=True, check=True, timeout=600
    )
    seen = json.loads(result.stdout.splitlines()[-1])
    labels = [label for label, _, _ in seen]
    assert labels[0] == "activation rounding" and "other kernels and ops (second process)" in labels, labels
    assert [done for _, done, _ in seen] == list(range(len(seen)))
    assert all(total == len(seen) for _, _, total in seen)
    # The second process left the float kernels (both embedding lookups) and the ops in the
    # shared cache; this process compiled the integer products.
    cached = {path.name.split("-")[0] for path in tmp_path.rglob("*.nbi")}
    expected = {
        "legacy.dequantize_rows_q4_0",
        "kquants.dequantize_rows_tq1_0",
        "integer.products_q4_0",
        # the row-interleaved TQ1_0 kernel where the host has AVX-512 VBMI
        f"integer.{integer.KERNELS[Q.TQ1_0].__name__}",
        "attention._attention_kernel",
    }
    assert expected <= cached, expected - cached


# Bad input is refused before any kernel runs.


@pytest.fixture(scope="module")
def q4_weight():
    return random_case(Q.Q4_0, 2, rows=6)


def test_x_too_short(q4_weight):
    with pytest.raises(KernelError, match="63 values per row"):
        matvec(q4_weight, np.zeros(63, dtype=np.float32))


def test_wrong_dtype(q4_weight):
    with pytest.raises(KernelError, match="float32"):
        matvec(q4_weight, np.zeros(64, dtype=np.float64))
    with pytest.raises(KernelError, match="float32"):
        matmul(q4_weight, np.zeros((2, 64), dtype=np.float16))


def test_non_contiguous(q4_weight):
    X = np.zeros((4, 128), dtype=np.float32)[:, ::2]
    with pytest.raises(KernelError, match="contiguous"):
        matmul(q4_weight, X)
    with pytest.raises(KernelError, match="contiguous"):
        matvec(q4_weight, X[0])
    strided = RawWeight(Q.Q4_0, np.zeros((6, 72), dtype=np.uint8)[:, ::2], (6, 64))
    with pytest.raises(KernelError, match="contiguous"):
        matvec(strided, np.zeros(64, dtype=np.float32))


def test_wrong_rank_and_batch(q4_weight):
    with pytest.raises(KernelError, match="2-D"):
        matmul(q4_weight, np.zeros(64, dtype=np.float32))
    with pytest.raises(KernelError, match="1 to 512"):
        matmul(q4_weight, np.zeros((513, 64), dtype=np.float32))
    with pytest.raises(KernelError, match="1 to 512"):
        matmul(q4_weight, np.zeros((0, 64), dtype=np.float32))


def test_ids_out_of_range(q4_weight):
    with pytest.raises(KernelError, match="id 6 is out of range"):
        embed(q4_weight, [0, 6])
    with pytest.raises(KernelError, match="id -1 is out of range"):
        embed(q4_weight, np.array([-1]))
    with pytest.raises(KernelError, match="integers"):
        embed(q4_weight, np.array([0.5]))


def test_wrong_out_shape(q4_weight):
    with pytest.raises(KernelError, match="out has shape"):
        matvec(q4_weight, np.zeros(64, dtype=np.float32), out=np.empty(5, dtype=np.float32))
    with pytest.raises(KernelError, match="out has shape"):
        matmul(q4_weight, np.zeros((3, 64), dtype=np.float32), out=np.empty((6, 3), dtype=np.float32))
    with pytest.raises(KernelError, match="float32"):
        embed(q4_weight, [1], out=np.empty((1, 64), dtype=np.float64))


def test_row_bytes_must_match_type():
    short_rows = RawWeight(Q.Q4_0, np.zeros((6, 35), dtype=np.uint8), (6, 64))
    with pytest.raises(KernelError, match="need 6x36"):
        matvec(short_rows, np.zeros(64, dtype=np.float32))
    wrong_type = RawWeight(Q.Q8_0, np.zeros((6, 36), dtype=np.uint8), (6, 64))
    with pytest.raises(KernelError, match="need 6x68"):
        embed(wrong_type, [0])
    partial_block = RawWeight(Q.Q4_0, np.zeros((6, 36), dtype=np.uint8), (6, 60))
    with pytest.raises(KernelError, match="block size 32"):
        matvec(partial_block, np.zeros(60, dtype=np.float32))


def test_unsupported_type_and_object():
    iq = RawWeight(Q.IQ2_XXS, np.zeros((2, 66), dtype=np.uint8), (2, 256))
    with pytest.raises(KernelError, match="IQ2_XXS"):
        matvec(iq, np.zeros(256, dtype=np.float32))
    with pytest.raises(KernelError, match=r"\.raw"):
        matvec(np.zeros((2, 2), dtype=np.float32), np.zeros(2, dtype=np.float32))


def test_checked_weight_is_checked_once_and_gives_the_same_products():
    weight = random_case(Q.Q4_1, 3, rows=9)
    checked = CheckedWeight(weight)
    assert checked.shape == weight.shape and checked.type == weight.type and checked.name == weight.name
    X = random_activations(5, weight.shape[1])
    np.testing.assert_array_equal(matmul(checked, X), matmul(weight, X))
    np.testing.assert_array_equal(matvec(checked, X[0]), matvec(weight, X[0]))
    np.testing.assert_array_equal(embed(checked, [8, 0]), embed(weight, [8, 0]))
    with pytest.raises(KernelError, match="need 6x36"):
        CheckedWeight(RawWeight(Q.Q4_0, np.zeros((6, 35), dtype=np.uint8), (6, 64)))
    with pytest.raises(KernelError, match="63 values per row"):
        matvec(checked, np.zeros(63, dtype=np.float32))
