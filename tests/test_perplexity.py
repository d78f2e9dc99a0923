"""Perplexity as llama.cpp's perplexity tool computes it."""

from pathlib import Path

import numpy as np
import pytest

from localllm import InvalidParameterError
from localllm.runtime.llm import LLM
from localllm.runtime.perplexity import perplexity

from conftest import model_params

GPL3 = Path("/usr/share/common-licenses/GPL-3")
# llama.cpp's perplexity tool on GPL-3 with --ctx-size 512.
LLAMA_CPP_PPL = {
    "smollm2-135m-instruct": 18.391,
    "gemma-3-270m": 13.906,
    "qwen2.5-coder-0.5b-instruct": 5.318,
    "qwen2.5-coder-1.5b-instruct": 1.761,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", [param.values[0] for param in model_params()])
def test_gpl3_perplexity_within_one_percent_of_llama_cpp(name, model_path):
    with LLM(model_path(name), n_ctx=512) as llm:
        result = perplexity(llm, GPL3.read_text(), n_ctx=512)
    assert abs(result.ppl / LLAMA_CPP_PPL[name] - 1) <= 0.01, f"{result.ppl:.3f} vs {LLAMA_CPP_PPL[name]}"
    assert 0 < result.stderr < result.ppl
    assert result.tokens_per_second > 0


@pytest.fixture(scope="module")
def smollm2(model_path):
    # Float32 activations, so logits do not depend on how a chunk is split into calls.
    with LLM(model_path("smollm2-135m-instruct"), n_ctx=64, quantize_activations=False) as llm:
        yield llm


def test_scores_the_second_half_of_each_chunk(smollm2):
    """Recompute from full-chunk logits: chunks of n_ctx, second half scored, BOS if used."""
    text = GPL3.read_text()[:600]
    n_ctx = 32
    tokens = smollm2.tokenize(text)
    n_chunks = len(tokens) // n_ctx
    assert n_chunks >= 2
    nlls = []
    for chunk in range(n_chunks):
        ids = tokens[chunk * n_ctx : (chunk + 1) * n_ctx]
        if smollm2.tokenizer.add_bos:
            ids[0] = smollm2.tokenizer.bos_id
        logits = smollm2.logits(ids).astype(np.float64)
        for pos in range(n_ctx // 2, n_ctx - 1):
            row = logits[pos]
            nlls.append(np.log(np.exp(row - row.max()).sum()) + row.max() - row[ids[pos + 1]])
    nlls = np.array(nlls)
    result = perplexity(smollm2, text, n_ctx=n_ctx)
    assert result.n_tokens == len(nlls) == n_chunks * (n_ctx - 1 - n_ctx // 2)
    assert result.ppl == pytest.approx(np.exp(nlls.mean()), rel=1e-4)
    assert result.stderr == pytest.approx(nlls.std() * np.sqrt(1 / (len(nlls) - 1)) * result.ppl, rel=1e-3)


def test_text_shorter_than_one_chunk_is_refused(smollm2):
    with pytest.raises(InvalidParameterError, match="at least one chunk of 64"):
        perplexity(smollm2, "Too short.", n_ctx=64)


def test_chunk_larger_than_the_context_is_refused(smollm2):
    with pytest.raises(InvalidParameterError, match="exceeds the model context"):
        perplexity(smollm2, GPL3.read_text(), n_ctx=128)
