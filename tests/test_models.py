"""Forward passes against llama.cpp's logits (tests/data/reference) and model loading errors."""

import numpy as np
import pytest
from gguf import GGUFWriter

from localllm import ModelError
from localllm.formats.gguf import open_gguf
from localllm.runtime.llm import LLM
from localllm.runtime.models import load_model

from conftest import MIN_COMPARED_TOKENS, comparable_greedy, load_reference, model_params

LONG_CASE = "long_gpl3"


def compare_with_reference(name, llm, cases):
    """Top-1 agreements, |Δ| over the reference top-10 ids, and per case our greedy tokens next
    to llama.cpp's, both cut before llama.cpp's first near-tie (conftest.comparable_greedy)."""
    agreements, positions, deltas, greedy = 0, 0, [], {}
    for case in cases:
        logits = llm.logits(case["tokens"])
        for row, top10 in zip(logits, case["top10"]):
            ids = [token for token, _ in top10]
            agreements += int(np.argmax(row)) == ids[0]
            positions += 1
            deltas.extend(np.abs(row[ids] - np.array([value for _, value in top10])))
        expected = comparable_greedy(name, case)
        generated = [int(np.argmax(logits[-1]))] if expected else []
        while len(generated) < len(expected):
            generated.append(int(np.argmax(llm.model.forward([generated[-1]], llm.cache))))
        greedy[case["name"]] = (generated, expected)
    return agreements / positions, float(np.median(deltas)), float(np.max(deltas)), greedy


def assert_greedy_agrees(greedy, minimum):
    """Every case's greedy tokens equal llama.cpp's up to its first near-tie, and at least
    `minimum` tokens were compared, so that the check means something."""
    assert sum(len(expected) for _, expected in greedy.values()) >= minimum
    for case, (generated, expected) in greedy.items():
        assert generated == expected, f"case {case}: greedy tokens differ before llama.cpp's first near-tie"


# ../shared/reference/README.md: what a correct implementation meets against llama.cpp.
TOP1_AGREEMENT, MEDIAN_DELTA, MAX_DELTA = 0.90, 0.4, 3.0


def assert_within_tolerances(top1, median, worst):
    assert top1 >= TOP1_AGREEMENT, f"top-1 agreement {top1:.1%}"
    assert median <= MEDIAN_DELTA, f"median |Δ| {median:.3f}"
    assert worst <= MAX_DELTA, f"max |Δ| {worst:.3f}"


@pytest.mark.parametrize("name", model_params())
def test_short_cases_match_llama_cpp(name, model_path):
    reference = load_reference(name)
    cases = [case for case in reference["cases"] if case["name"] != LONG_CASE]
    with LLM(model_path(name)) as llm:
        assert llm.n_vocab == reference["n_vocab"]
        top1, median, worst, greedy = compare_with_reference(name, llm, cases)
    assert_within_tolerances(top1, median, worst)
    assert_greedy_agrees(greedy, MIN_COMPARED_TOKENS)


@pytest.mark.slow
@pytest.mark.parametrize("name", [param.values[0] for param in model_params()])
def test_long_case_matches_llama_cpp(name, model_path):
    """~700 tokens: past gemma3's 512-token window and across prefill blocks."""
    (case,) = [case for case in load_reference(name)["cases"] if case["name"] == LONG_CASE]
    with LLM(model_path(name)) as llm:
        top1, median, worst, greedy = compare_with_reference(name, llm, [case])
    assert_within_tolerances(top1, median, worst)
    assert_greedy_agrees(greedy, 1)


TINY = dict(n_embd=32, n_ff=64, n_head=2, n_vocab=16)


def write_tiny_llama(path, arch="llama", skip=()):
    """A one-layer float32 model with random weights, for loader error tests."""
    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(TINY["n_embd"])
    writer.add_feed_forward_length(TINY["n_ff"])
    writer.add_head_count(TINY["n_head"])
    writer.add_head_count_kv(TINY["n_head"])
    writer.add_layer_norm_rms_eps(1e-5)
    d, f = TINY["n_embd"], TINY["n_ff"]
    shapes = {
        "token_embd.weight": (TINY["n_vocab"], d),
        "output_norm.weight": (d,),
        "blk.0.attn_norm.weight": (d,),
        "blk.0.attn_q.weight": (d, d),
        "blk.0.attn_k.weight": (d, d),
        "blk.0.attn_v.weight": (d, d),
        "blk.0.attn_output.weight": (d, d),
        "blk.0.ffn_norm.weight": (d,),
        "blk.0.ffn_gate.weight": (f, d),
        "blk.0.ffn_up.weight": (f, d),
        "blk.0.ffn_down.weight": (d, f),
    }
    for name, shape in shapes.items():
        if name not in skip:
            writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_synthetic_model_runs(tmp_path):
    """The loader errors below come from the missing piece, not from the synthetic file."""
    with open_gguf(write_tiny_llama(tmp_path / "tiny.gguf")) as g:
        model = load_model(g)
        logits = model.forward([1, 2, 3], model.new_cache(8), all_logits=True)
    assert logits.shape == (3, TINY["n_vocab"]) and np.isfinite(logits).all()


def test_unknown_architecture_is_a_model_error(tmp_path):
    path = write_tiny_llama(tmp_path / "mamba.gguf", arch="mamba")
    with pytest.raises(ModelError, match=r"unsupported architecture 'mamba' in mamba\.gguf"):
        LLM(path)


def test_missing_tensor_is_a_model_error(tmp_path):
    path = write_tiny_llama(tmp_path / "holey.gguf", skip={"blk.0.attn_q.weight"})
    with pytest.raises(ModelError, match=r"missing tensor blk\.0\.attn_q\.weight in holey\.gguf"):
        LLM(path)


def test_token_outside_vocabulary_is_a_model_error(tmp_path):
    with open_gguf(write_tiny_llama(tmp_path / "tiny.gguf")) as g:
        model = load_model(g)
        with pytest.raises(ModelError, match="outside the vocabulary"):
            model.forward([TINY["n_vocab"]], model.new_cache(8))
