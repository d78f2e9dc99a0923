"""FR-Spec drafting: the shipped frequent-token table is what its corpus and tokenizer give, a
restricted head scores exactly the full head's columns, and a draft model with one stays exact
and proposes only the tokens it keeps."""

import collections
import json

import numpy as np
import pytest

from localllm.errors import IncompatibleDraftError, InvalidParameterError, ModelError
from localllm.formats.gguf import open_gguf
from localllm.formats.tokenizer import Tokenizer
from localllm.runtime.cache import CacheSpec
from localllm.runtime.drafters.draft_model import DraftModelDrafter, load_draft_model
from localllm.runtime.drafters.frequent_tokens import (
    DEFAULT_SIZE,
    MERGES_KEY,
    FrequentTokens,
    corpus_text,
    head_tokens,
    shipped_tables,
)
from localllm.runtime.llm import LLM
from localllm.runtime.models import load_model
from localllm.runtime.sampling import Sampler, SamplingParams

from test_generate_cli import assert_one_line_error
from test_speculative import run_cli

SMOLLM = "smollm2-135m-instruct"
QWEN_DRAFT = "qwen2.5-coder-0.5b-instruct"
# Text for a small table of smollm2's vocabulary: the tokens of a code reply and little else.
TABLE_TEXT = (
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n'
    "    for _ in range(n):\n        a, b = b, a + b\n    return a\n" * 3
)


@pytest.fixture(scope="module")
def smollm(model_path):
    with LLM(model_path(SMOLLM), n_ctx=512) as llm:
        yield llm


@pytest.fixture()
def smollm_table(smollm, tmp_path):
    path = tmp_path / "smollm.tsv"
    FrequentTokens.count(TABLE_TEXT, smollm.tokenizer).write(path, "test table")
    return path


@pytest.mark.slow
def test_the_shipped_table_is_its_corpus_counted_then_the_earliest_merges(model_path):
    """Recounted here with a plain Counter, and the merges walked on the GGUF's own token list."""
    (table_file,) = shipped_tables()
    table = FrequentTokens.read(table_file)
    with open_gguf(model_path(QWEN_DRAFT)) as gguf:
        tokenizer = Tokenizer.from_gguf(gguf)
        merges = list(gguf.metadata[MERGES_KEY])
        texts = list(gguf.metadata["tokenizer.ggml.tokens"])
    assert table.vocabulary == tokenizer.vocabulary_digest
    counts = collections.Counter(tokenizer.encode(corpus_text(), add_special=False))
    counted = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    assert len(counted) > 10_000
    assert list(zip(table.ids[: len(counted)].tolist(), table.counts[: len(counted)].tolist())) == counted
    index = {text: i for i, text in enumerate(texts)}
    seen, filled = set(counts), []
    for merge in merges:
        if len(seen) == DEFAULT_SIZE:
            break
        left, right = merge.split(" ", 1)
        token = index[left + right]
        if token not in seen:
            seen.add(token)
            filled.append(token)
    assert table.ids[len(counted) :].tolist() == filled
    assert not table.counts[len(counted) :].any()


def test_a_restricted_head_scores_the_full_heads_columns_bit_for_bit(smollm):
    ids = smollm.tokenize("The quick brown fox jumps over the lazy dog.")
    full = smollm.model.forward(ids, smollm.cache, all_logits=True)
    rng = np.random.default_rng(7)
    keep = np.sort(rng.choice(smollm.n_vocab, size=1000, replace=False))
    with open_gguf(smollm.path) as gguf:
        model = load_model(gguf, smollm.path, smollm.model.device)
        model.restrict_head(keep)
        restricted = model.forward(ids, model.new_cache(512), all_logits=True)
    assert restricted.shape == (len(ids), keep.size)
    np.testing.assert_array_equal(restricted, full[:, keep])
    smollm.reset()
    for bad in (keep[::-1], np.array([0, 0, 5]), np.array([smollm.n_vocab]), np.array([], dtype=np.int64)):
        with pytest.raises(ModelError, match="increasing, distinct token ids"):
            model.restrict_head(bad)


def test_a_draft_with_a_restricted_head_stays_exact_and_proposes_only_its_tokens(smollm, smollm_table):
    head = head_tokens(smollm_table, smollm.tokenizer)
    assert set(smollm.tokenizer.eos_ids) <= set(head.tolist())
    assert 20 < head.size < 200
    prompt = "Write a Python function that returns the n-th Fibonacci number."
    messages = [{"role": "user", "content": prompt}]
    expected = smollm.chat(messages, max_tokens=64, temperature=0)
    with LLM(smollm.path, n_ctx=512, draft=smollm.path, draft_max=4, draft_adaptive=False,
             draft_vocab=smollm_table) as speculative:  # fmt: skip
        got = speculative.chat(messages, max_tokens=64, temperature=0)
        assert got.token_ids == expected.token_ids
        assert got.stats.speculative.drafter == f"model ({head.size}-token head)"
        assert 0 < got.stats.speculative.accepted <= got.stats.speculative.drafted
        _, model = speculative._draft_models[smollm.path]
    drafter = DraftModelDrafter(model, CacheSpec(n_ctx=512), min_confidence=0.0)
    context = smollm.chat_prompt(messages) + list(expected.token_ids[:20])
    greedy = drafter.propose(context, 8, Sampler(SamplingParams(temperature=0), smollm.n_vocab))
    sampled = drafter.propose(context, 8, Sampler(SamplingParams(temperature=1.0, seed=3), smollm.n_vocab))
    assert len(greedy.tokens) == 8 and len(sampled.tokens) == 8
    assert set(greedy.tokens + sampled.tokens) <= set(head.tolist())
    # The rejection scheme's q: a distribution over the whole vocabulary, zero off the head.
    outside = np.setdiff1d(np.arange(smollm.n_vocab), head)
    for q in sampled.distributions:
        assert q.shape == (smollm.n_vocab,) and abs(q.sum() - 1.0) < 1e-5 and not q[outside].any()


def test_auto_keeps_the_whole_head_of_a_vocabulary_without_a_table(smollm):
    assert head_tokens("auto", smollm.tokenizer) is None
    assert head_tokens("full", smollm.tokenizer) is None
    gguf, model = load_draft_model(smollm.path, smollm.model, smollm.tokenizer)
    with gguf:
        assert model.head_token_ids is None


def test_tables_that_do_not_fit_are_refused(smollm, tmp_path):
    (qwen_table,) = shipped_tables()
    with pytest.raises(IncompatibleDraftError, match="counted for another vocabulary"):
        head_tokens(str(qwen_table), smollm.tokenizer)
    broken = tmp_path / "broken.tsv"
    broken.write_text("vocabulary\tabc\n12\n")
    with pytest.raises(InvalidParameterError, match="not a frequent-token table"):
        head_tokens(broken, smollm.tokenizer)
    with pytest.raises(InvalidParameterError, match="draft_vocab must be"):
        head_tokens(3, smollm.tokenizer)
    with pytest.raises(InvalidParameterError, match="absent.tsv"):
        head_tokens(tmp_path / "absent.tsv", smollm.tokenizer)


def test_cli_draft_vocab(smollm_table, tmp_path):
    (qwen_table,) = shipped_tables()
    result = run_cli("-m", SMOLLM, "--draft", SMOLLM, "--draft-vocab", str(smollm_table), "-n", "16", "--temp", "0",
                     "--json", "def fibonacci(n):")  # fmt: skip
    assert result.returncode == 0, result.stderr
    drafter = json.loads(result.stdout)["timings"]["speculative"]["drafter"]
    assert drafter.startswith("model (") and drafter.endswith("-token head)")
    assert_one_line_error(run_cli("--draft-vocab", "full", "x"), "--draft-vocab needs --draft")
    assert_one_line_error(
        run_cli("-m", SMOLLM, "--draft", SMOLLM, "--draft-vocab", str(tmp_path / "none.tsv"), "x"), "no table file"
    )
    foreign = run_cli("-m", SMOLLM, "--draft", SMOLLM, "--draft-vocab", str(qwen_table), "x")
    assert_one_line_error(foreign, "counted for another vocabulary")
