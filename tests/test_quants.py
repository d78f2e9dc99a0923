import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from test_gguf import random_blocks

from localllm import GGUFError
from localllm.formats import quants
from localllm.formats.gguf import open_gguf

from conftest import model_params

ALL_TYPES = [
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "TQ1_0", "TQ2_0",
]  # fmt: skip
# Reference rows dequantized per call: keeps gguf-py's temporaries small on 1 GB tensors.
REFERENCE_ROWS = 4096


def test_every_required_type_has_a_layout():
    assert {t.name for t in quants.SUPPORTED_TYPES} == set(ALL_TYPES)


@pytest.mark.parametrize("name", ALL_TYPES)
def test_layout_matches_ggml_sizes_and_tiles_the_block(name):
    qtype = GGMLQuantizationType[name]
    layout = quants.LAYOUTS[qtype]
    assert (layout.block_size, layout.type_size) == GGML_QUANT_SIZES[qtype]
    offset = 0
    for field in layout.fields:
        assert field.offset == offset, field
        assert field.size == field.count * np.dtype(field.dtype).itemsize
        offset += field.size
    assert offset == layout.type_size
    assert layout.field(layout.fields[-1].name) is layout.fields[-1]


@pytest.mark.parametrize("n_blocks_per_row", [1, 2, 7])
@pytest.mark.parametrize("name", ALL_TYPES)
def test_random_blocks_match_gguf_reference_bit_for_bit(name, n_blocks_per_row):
    qtype = GGMLQuantizationType[name]
    layout = quants.LAYOUTS[qtype]
    rng = np.random.default_rng([n_blocks_per_row, int(qtype)])
    rows = 64
    raw = random_blocks(rng, qtype, rows * n_blocks_per_row).reshape(rows, -1)
    values = quants.dequantize(raw, qtype, (rows, n_blocks_per_row * layout.block_size))
    reference = gguf.quants.dequantize(raw, qtype)
    assert values.dtype == np.float32
    assert values.shape == reference.shape
    assert np.array_equal(values, reference, equal_nan=True)
    if qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.BF16):
        assert np.isfinite(values).all()  # the finite scales must actually have reached the output


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q8_0", "TQ1_0"])
def test_non_finite_scales_propagate_like_ggml(name):
    qtype = GGMLQuantizationType[name]
    layout = quants.LAYOUTS[qtype]
    raw = random_blocks(np.random.default_rng(1), qtype, 8)
    d = layout.field("d")
    raw[:4, d.offset : d.offset + 2] = (
        np.array([np.inf, -np.inf, np.nan, 65504], np.float16).view(np.uint8).reshape(4, 2)
    )
    with np.errstate(all="raise"):
        values = quants.dequantize(raw, qtype, (8, layout.block_size))
    with np.errstate(all="ignore"):
        reference = gguf.quants.dequantize(raw, qtype)
    assert np.array_equal(values, reference, equal_nan=True)
    assert not np.isfinite(values[:3]).all()


def test_chunked_dequantization_of_a_long_tensor():
    qtype = GGMLQuantizationType.Q4_K
    n_blocks = (quants._CHUNK_WEIGHTS // 256) * 2 + 3
    raw = random_blocks(np.random.default_rng(2), qtype, n_blocks)
    values = quants.dequantize(raw, qtype, (n_blocks, 256))
    assert np.array_equal(values, gguf.quants.dequantize(raw, qtype), equal_nan=True)


def test_bad_arguments_raise_gguf_error():
    raw = np.zeros((2, 18), np.uint8)
    q4_0 = GGMLQuantizationType.Q4_0
    assert quants.dequantize(raw, q4_0, (2, 32)).shape == (2, 32)
    with pytest.raises(GGUFError, match="needs 36 bytes, got 35"):
        quants.dequantize(np.zeros(35, np.uint8), q4_0, (2, 32))
    with pytest.raises(GGUFError, match="multiple of 32"):
        quants.dequantize(raw, q4_0, (3, 24))
    with pytest.raises(GGUFError, match="positive"):
        quants.dequantize(raw, q4_0, ())
    with pytest.raises(GGUFError, match="IQ2_XXS is not supported"):
        quants.dequantize(raw, GGMLQuantizationType.IQ2_XXS, (1, 256))
    with pytest.raises(GGUFError, match="unknown tensor type 999"):
        quants.dequantize(raw, 999, (2, 32))
    with pytest.raises(GGUFError, match="uint8"):
        quants.dequantize(raw.astype(np.int16), q4_0, (2, 32))


@pytest.mark.parametrize("name", model_params())
def test_every_tensor_of_catalog_models_matches_gguf_reference(model_path, name):
    seen_types = set()
    with open_gguf(model_path(name)) as g:
        for t in g.tensors.values():
            values = t.dequantize()
            assert values.dtype == np.float32 and values.shape == t.shape, t.name
            rows = values.reshape(-1, t.shape[-1])
            raw = t.raw
            for start in range(0, raw.shape[0], REFERENCE_ROWS):
                chunk = raw[start : start + REFERENCE_ROWS]
                reference = gguf.quants.dequantize(chunk, t.type)
                assert np.array_equal(rows[start : start + REFERENCE_ROWS], reference, equal_nan=True), t.name
            seen_types.add(t.type)
            del values, rows
    assert GGMLQuantizationType.F32 in seen_types and len(seen_types) >= 3
