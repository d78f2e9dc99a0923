"""KV cache: blocking, rollback and sliding windows give the same logits as one plain pass."""

from pathlib import Path

import numpy as np
import pytest
from conftest import load_reference

from localllm import ContextOverflowError, InvalidParameterError
from localllm.formats.gguf import open_gguf
from localllm.runtime.cache import KVCache
from localllm.runtime.llm import LLM
from localllm.runtime.models import kv_bytes_per_token

GPL3 = Path("/usr/share/common-licenses/GPL-3")


def prompt_ids(name, case="long_gpl3"):
    return next(c["tokens"] for c in load_reference(name)["cases"] if c["name"] == case)


def feed(llm, ids, sizes, last_only=False):
    """Feed ids to a fresh context in blocks of `sizes` (cycled): the logits of every
    position, or with last_only the cache they were fed to."""
    cache = llm.model.new_cache(llm.n_ctx)
    rows, start, i = [], 0, 0
    while start < len(ids):
        size = sizes[i % len(sizes)]
        rows.append(llm.model.forward(ids[start : start + size], cache, all_logits=not last_only))
        start += size
        i += 1
    return cache if last_only else np.concatenate(rows)


def assert_close(actual, expected):
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= 1e-3 * scale


@pytest.fixture(scope="module")
def smollm2(model_path):
    # Float32 activations: with llama.cpp's 8-bit rounding, the last-bit differences between
    # matmul and matvec can flip a rounding and the two paths drift apart as they do in llama.cpp.
    with LLM(model_path("smollm2-135m-instruct"), n_ctx=512, quantize_activations=False) as llm:
        yield llm


def test_prefill_equals_token_by_token_and_uneven_blocks(smollm2):
    ids = prompt_ids("smollm2-135m-instruct")[:24]
    whole = smollm2.logits(ids)
    assert_close(feed(smollm2, ids, [1]), whole)
    assert_close(feed(smollm2, ids, [7, 1, 13, 2]), whole)


def test_last_logits_equal_last_row_of_all_logits(smollm2):
    ids = prompt_ids("smollm2-135m-instruct")[:20]
    smollm2.reset()
    last = smollm2.model.forward(ids, smollm2.cache)
    assert last.shape == (smollm2.n_vocab,)
    assert_close(last, smollm2.logits(ids)[-1])


def test_truncate_and_refeed_equals_never_going_past(smollm2):
    ids = prompt_ids("smollm2-135m-instruct")[:60]
    expected = smollm2.logits(ids[:45])[30:]
    smollm2.reset()
    smollm2.model.forward(ids, smollm2.cache)
    smollm2.cache.truncate(30)
    assert smollm2.cache.n_tokens == 30 and smollm2.cache.next_position == 30
    assert_close(smollm2.model.forward(ids[30:45], smollm2.cache, all_logits=True), expected)


def test_context_overflow_is_reported(smollm2):
    cache = smollm2.model.new_cache(16)
    smollm2.model.forward([1] * 10, cache)
    with pytest.raises(ContextOverflowError, match="exceed the context size of 16"):
        smollm2.model.forward([1] * 7, cache)
    assert cache.n_tokens == 10


@pytest.mark.slow
def test_gemma3_sliding_window_blocks_and_rollback_past_512(model_path):
    """Local layers trim their buffers past ~1300 tokens; logits must not depend on it, nor
    on how the tokens arrived, nor on a rollback."""
    with LLM(model_path("gemma-3-270m"), n_ctx=2048, quantize_activations=False) as llm:
        ids = llm.tokenize(GPL3.read_text())[:1400]
        assert len(ids) == 1400
        untrimmed = llm.model.new_cache(2048, max_rollback=2048)
        llm.model.forward(ids[:1300], untrimmed)
        expected = llm.model.forward(ids[1300:], untrimmed, all_logits=True)

        trimmed = feed(llm, ids[:1300], [200, 1, 1, 130, 3], last_only=True)
        assert trimmed.keys[0].shape[0] < 1300 and trimmed.view(0)[2][0] > 0
        assert_close(llm.model.forward(ids[1300:], trimmed, all_logits=True), expected)

        trimmed.truncate(1350)
        assert_close(llm.model.forward(ids[1350:], trimmed, all_logits=True), expected[50:])


def test_windowed_layer_keeps_what_the_window_sees():
    window, rollback = 4, 2
    cache = KVCache(n_layer=2, n_head_kv=1, head_dim_k=2, head_dim_v=2, n_ctx=100,
                    windows=[window, 0], max_append=3, max_rollback=rollback)
    for step, n in enumerate([3, 1, 2, 3, 1, 3, 3, 2, 1, 3] * 3):
        positions = cache.append(n)
        marks = np.repeat(positions.astype(np.float32), 2).reshape(n, 1, 2)
        for layer in range(2):
            cache.write(layer, marks, -marks)
        keys, values, key_positions = cache.view(0)
        # Each slot still holds the key written for its position...
        assert np.array_equal(keys[:, 0, 0], key_positions) and np.array_equal(values[:, 0, 0], -key_positions)
        # ...and every position the window (plus the rollback margin) can see is there.
        assert key_positions[0] <= max(0, cache.next_position - n - (window - 1) - rollback)
        assert len(keys) <= cache.keys[0].shape[0] < 100
    full_keys, _, full_positions = cache.view(1)
    assert np.array_equal(full_positions, np.arange(cache.n_tokens))
    assert np.array_equal(full_keys[:, 0, 0], full_positions)


def test_rollback_beyond_the_margin_is_refused():
    cache = KVCache(n_layer=1, n_head_kv=1, head_dim_k=2, head_dim_v=2, n_ctx=100,
                    windows=[4], max_append=4, max_rollback=2)
    for _ in range(10):
        positions = cache.append(4)
        cache.write(0, np.zeros((4, 1, 2), np.float32), np.zeros((4, 1, 2), np.float32))
    assert positions[-1] == 39
    with pytest.raises(InvalidParameterError, match="cannot roll back"):
        cache.truncate(10)
    with pytest.raises(InvalidParameterError, match="cannot truncate"):
        cache.truncate(41)


def test_kv_bytes_per_token_matches_cache_storage(model_path):
    with LLM(model_path("smollm2-135m-instruct"), n_ctx=16) as llm:
        per_token = sum(k.strides[0] + v.strides[0] for k, v in zip(llm.cache.keys, llm.cache.values))
        assert kv_bytes_per_token(llm.gguf.metadata) == per_token


@pytest.mark.slow
def test_kv_bytes_per_token_for_gemma3(model_path):
    with open_gguf(model_path("gemma-3-270m")) as g:
        meta = g.metadata
    n_layer, n_kv = meta["gemma3.block_count"], meta["gemma3.attention.head_count_kv"]
    head_bytes = 4 * (meta["gemma3.attention.key_length"] + meta["gemma3.attention.value_length"])
    assert kv_bytes_per_token(meta) == n_layer * n_kv * head_bytes
