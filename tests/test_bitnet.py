"""The `bitnet` architecture against llama.cpp, on the synthetic ternary model of
tests/data/bitnet (llama.cpp's logits: tests/data/reference/bitnet-synthetic.json)."""

import hashlib
import sys
from pathlib import Path

import pytest

from localllm import ModelError
from localllm.runtime.llm import LLM

from conftest import MIN_COMPARED_TOKENS, load_reference
from test_models import assert_greedy_agrees, assert_within_tolerances, compare_with_reference

sys.path.insert(0, str(Path(__file__).parent / "data" / "bitnet"))
from synthetic import write_model  # noqa: E402

NAME = "bitnet-synthetic"
SMOLLM = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def bitnet_file(model_path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bitnet") / f"{NAME}.gguf"
    write_model(model_path(SMOLLM), path)
    return path


def test_the_recipe_makes_the_file_llama_cpp_computed(bitnet_file):
    digest = hashlib.sha256(bitnet_file.read_bytes()).hexdigest()
    assert digest == load_reference(NAME)["file_sha256"]


def test_logits_and_greedy_tokens_match_llama_cpp(bitnet_file):
    reference = load_reference(NAME)
    with LLM(str(bitnet_file)) as llm:
        assert llm.model.n_vocab == reference["n_vocab"]
        for case in reference["cases"]:
            assert llm.tokenize(case["text"]) == case["tokens"], case["name"]
        top1, median, worst, greedy = compare_with_reference(NAME, llm, reference["cases"])
    assert_within_tolerances(top1, median, worst)
    assert_greedy_agrees(greedy, MIN_COMPARED_TOKENS)


def test_a_missing_sub_norm_is_one_line(model_path, tmp_path):
    path = tmp_path / "broken.gguf"
    write_model(model_path(SMOLLM), path, omit=frozenset({"blk.1.ffn_sub_norm.weight"}))
    with pytest.raises(ModelError, match=r"^missing tensor blk\.1\.ffn_sub_norm\.weight in broken\.gguf$"):
        LLM(str(path))
