"""Batch invariance of a whole forward pass: the logits of a token do not depend on how many
tokens were fed with it. Speculative decoding verifies k draft tokens in one forward and keeps
the rows that agree; this makes its output exactly that of plain greedy decoding."""

import numpy as np
import pytest

from localllm.runtime.llm import LLM

from conftest import model_params

PROMPT_TOKENS = 200
MAX_BATCH = 16
TEXT = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "The GNU General Public License is a free, copyleft license for software and other kinds of works. "
) * 12


@pytest.mark.parametrize("name", model_params())
def test_batched_rows_equal_tokens_fed_one_at_a_time(name, model_path):
    with LLM(str(model_path(name)), n_ctx=PROMPT_TOKENS + MAX_BATCH + 8) as llm:
        tokens = llm.tokenize(TEXT)[: PROMPT_TOKENS + MAX_BATCH]
        assert len(tokens) == PROMPT_TOKENS + MAX_BATCH
        one_at_a_time = np.stack([llm.model.forward([token], llm.cache) for token in tokens])
        assert np.isfinite(one_at_a_time).all()

        llm.reset()
        prefill = llm.model.forward(tokens[:PROMPT_TOKENS], llm.cache, all_logits=True)
        np.testing.assert_array_equal(prefill, one_at_a_time[:PROMPT_TOKENS], err_msg="prefill")
        for n in range(1, MAX_BATCH + 1):
            llm.cache.truncate(PROMPT_TOKENS)
            batch = llm.model.forward(tokens[PROMPT_TOKENS : PROMPT_TOKENS + n], llm.cache, all_logits=True)
            np.testing.assert_array_equal(
                batch, one_at_a_time[PROMPT_TOKENS : PROMPT_TOKENS + n], err_msg=f"{n} tokens after the prompt"
            )
