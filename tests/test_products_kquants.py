"""Products for the K-quant and ternary formats (256-value super-blocks) against float64 NumPy."""

import numpy as np
import pytest
from gguf.quants import quantize as reference_quantize

from localllm.formats import quants
from localllm.formats.gguf import open_gguf
from localllm.kernels.cpu import KERNELS, embed

from kernel_helpers import (
    F16_FIELDS,
    Q,
    RawWeight,
    product_errors,
    random_activations,
    random_weight,
)

# Products are exact up to float32 rounding, both on float32 activations and on activations
# rounded to 8 bits (compared with the same rounding done in NumPy).
TOLERANCE = 1e-5
FORMATS = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.TQ1_0, Q.TQ2_0]
BATCH_SIZES = [1, 2, 3, 16, 64, 129]


def check_products(weight, dequantized, batch_sizes=BATCH_SIZES):
    cols = weight.shape[1]
    for n in batch_sizes:
        X = random_activations(n, cols, seed=n)
        exact, quantized = product_errors(weight, dequantized, X)
        assert exact <= TOLERANCE and quantized <= TOLERANCE, (weight.name, n, exact, quantized)


def test_every_format_is_dispatched():
    assert set(FORMATS) <= set(KERNELS)


@pytest.mark.parametrize("blocks_per_row", [1, 2, 7])
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_random_blocks_match_float64(qtype, blocks_per_row):
    # 45 rows: not a multiple of the row tile or of the matvec row chunk.
    weight = random_weight(qtype, 45, blocks_per_row, seed=blocks_per_row)
    check_products(weight, weight.dequantize())


@pytest.mark.parametrize("rows", [1, 2, 3, 5])
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.TQ1_0], ids=lambda q: q.name)
def test_fewer_rows_than_a_tile(qtype, rows):
    weight = random_weight(qtype, rows, 2, seed=rows)
    check_products(weight, weight.dequantize(), batch_sizes=[2, 17])


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_embed_is_bit_exact_on_random_blocks(qtype):
    weight = random_weight(qtype, 30, 3, seed=5)
    ids = np.array([7, 0, 29, 7, 13])
    got = embed(weight, ids)
    np.testing.assert_array_equal(got.view(np.uint32), weight.dequantize()[ids].view(np.uint32))
    ours = quants.dequantize(weight.raw, qtype, weight.shape)
    np.testing.assert_array_equal(got.view(np.uint32), ours[ids].view(np.uint32))


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_embed_keeps_subnormal_and_extreme_scales(qtype):
    weight = random_weight(qtype, 4, 4, seed=3)
    block_bytes = weight.raw.shape[1] // 4
    blocks = weight.raw.reshape(4, 4, block_bytes)
    halves = [np.float16(6e-8), np.float16(-65504.0), np.float16(0.0), np.float16(-1e-5)]
    for k, half in enumerate(halves):
        for offset in F16_FIELDS[qtype]:
            blocks[:, k, offset : offset + 2] = np.array([half], dtype=np.float16).view(np.uint8)
    np.testing.assert_array_equal(embed(weight, np.arange(4)), weight.dequantize())


@pytest.mark.parametrize("qtype", [Q.TQ1_0, Q.TQ2_0], ids=lambda q: q.name)
def test_ternary_blocks_from_the_reference_quantizer(qtype):
    rows, cols = 37, 3 * 256
    values = np.random.default_rng(11).standard_normal((rows, cols)).astype(np.float32)
    raw = np.ascontiguousarray(reference_quantize(values, qtype))
    weight = RawWeight(qtype, raw, (rows, cols), name=f"quantized {qtype.name}")
    dequantized = weight.dequantize()
    assert set(np.unique(np.sign(dequantized))) == {-1.0, 0.0, 1.0}
    check_products(weight, dequantized)
    np.testing.assert_array_equal(embed(weight, np.arange(rows)), dequantized)


def first_rows(tensor, rows):
    """The first `rows` rows of a real tensor, as a weight of its own."""
    part = RawWeight(tensor.type, tensor.raw[:rows], (rows, tensor.shape[1]), tensor.name)
    return part, part.dequantize()


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, qtype",
    [
        ("blk.0.attn_output.weight", Q.Q4_K),
        ("blk.0.ffn_down.weight", Q.Q6_K),
    ],
)
def test_gemma_tensors(model_path, name, qtype):
    with open_gguf(model_path("gemma-3-270m")) as g:
        tensor = g.tensor(name)
        assert tensor.type == qtype
        dequantized = tensor.dequantize()
        check_products(tensor, dequantized)
        ids = np.array([0, tensor.shape[0] - 1, 17, 17])
        np.testing.assert_array_equal(embed(tensor, ids), dequantized[ids])


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, names",
    [
        ("qwen2.5-coder-0.5b-instruct", ["blk.0.ffn_down.weight", "blk.11.ffn_down.weight"]),
        (
            "qwen2.5-coder-1.5b-instruct",
            [
                "blk.0.ffn_gate.weight",
                "blk.0.ffn_down.weight",
                "blk.0.attn_k.weight",
                "output.weight",
                "token_embd.weight",
            ],
        ),
    ],
)
def test_qwen_tensors(model_path, model, names):
    with open_gguf(model_path(model)) as g:
        for name in names:
            tensor = g.tensor(name)
            assert tensor.type in (Q.Q4_K, Q.Q6_K)
            weight, dequantized = first_rows(tensor, min(tensor.shape[0], 2048))
            check_products(weight, dequantized, batch_sizes=[2, 64, 129])
            ids = np.array([0, tensor.shape[0] - 1, tensor.shape[0] // 2])
            picked = RawWeight(tensor.type, tensor.raw[ids], (len(ids), tensor.shape[1]))
            np.testing.assert_array_equal(embed(tensor, ids), picked.dequantize())
