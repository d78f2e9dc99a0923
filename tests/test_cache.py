"""KV cache: blocking, rollback and sliding windows give the same logits as one plain pass; the
sink policy (StreamingLLM) against the full one and against attention at in-cache positions."""

from pathlib import Path

import numpy as np
import pytest

from localllm import ContextOverflowError, InvalidParameterError, OutOfMemoryError
from localllm.formats.gguf import open_gguf
from localllm.kernels import cpu as kernels
from localllm.runtime.cache import CacheLayout, CacheSpec, SinkCache, new_cache
from localllm.runtime.llm import LLM
from localllm.runtime.models import kv_bytes_per_token

from conftest import load_reference

GPL3 = Path("/usr/share/common-licenses/GPL-3")


def prompt_ids(name, case="long_gpl3"):
    return next(c["tokens"] for c in load_reference(name)["cases"] if c["name"] == case)


def feed(llm, ids, sizes, last_only=False, spec=None):
    """Feed ids to a fresh context (`spec`, default the full policy over llm.n_ctx) in blocks of
    `sizes` (cycled): the logits of every position, or with last_only the cache they were fed to."""
    cache = llm.model.new_cache(spec or llm.n_ctx)
    rows, start, i = [], 0, 0
    while start < len(ids):
        size = sizes[i % len(sizes)]
        rows.append(llm.model.forward(ids[start : start + size], cache, all_logits=not last_only))
        start += size
        i += 1
    return cache if last_only else np.concatenate(rows)


def assert_close(actual, expected, relative=1e-3):
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= relative * scale


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
        assert trimmed.keys[0].shape[0] < 1300 and trimmed.view(0).positions[0] > 0
        assert_close(llm.model.forward(ids[1300:], trimmed, all_logits=True), expected)

        trimmed.truncate(1350)
        assert_close(llm.model.forward(ids[1350:], trimmed, all_logits=True), expected[50:])


@pytest.mark.slow
def test_gemma3_sink_policy_matches_full_while_covered_and_keeps_its_local_windows(model_path):
    with LLM(model_path("gemma-3-270m"), n_ctx=1024) as llm:
        ids = llm.tokenize(GPL3.read_text())[:700]
        sizes = [256, 1, 1, 442]
        full = feed(llm, ids, sizes)
        assert np.array_equal(feed(llm, ids, sizes, spec=CacheSpec(policy="sink", sinks=4, window=696)), full)
        streaming = llm.model.new_cache(CacheSpec(policy="sink", sinks=4, window=100))
        assert np.isfinite(llm.model.forward(ids, streaming, all_logits=True)).all()
        local, global_ = streaming.view(0), streaming.view(5)
        assert (local.window, local.n_sink) == (512, 0) and (global_.window, global_.n_sink) == (100, 4)


def test_windowed_layer_keeps_what_the_window_sees():
    window, rollback = 4, 2
    layout = CacheLayout(
        n_layer=2, n_head_kv=1, head_dim_k=2, head_dim_v=2, windows=(window, 0), max_append=3, max_rollback=rollback
    )
    cache = new_cache(layout, CacheSpec(n_ctx=100, kv_dtype="f32"))
    for n in [3, 1, 2, 3, 1, 3, 3, 2, 1, 3] * 3:
        positions = cache.append(n)
        marks = np.repeat(positions.astype(np.float32), 2).reshape(n, 1, 2)
        for layer in range(2):
            cache.write(layer, marks, -marks)
        keys, values, key_positions, _, _ = cache.view(0)
        # Each slot still holds the key written for its position...
        assert np.array_equal(keys[:, 0, 0], key_positions) and np.array_equal(values[:, 0, 0], -key_positions)
        # ...and every position the window (plus the rollback margin) can see is there.
        assert key_positions[0] <= max(0, cache.next_position - n - (window - 1) - rollback)
        assert len(keys) <= cache.keys[0].shape[0] < 100
    full_keys, _, full_positions, _, _ = cache.view(1)
    assert np.array_equal(full_positions, np.arange(cache.n_tokens))
    assert np.array_equal(full_keys[:, 0, 0], full_positions)


def test_rollback_beyond_the_margin_is_refused():
    layout = CacheLayout(n_layer=1, n_head_kv=1, head_dim_k=2, head_dim_v=2, windows=(4,), max_append=4, max_rollback=2)
    cache = new_cache(layout, CacheSpec(n_ctx=100))
    for _ in range(10):
        positions = cache.append(4)
        cache.write(0, np.zeros((4, 1, 2), np.float32), np.zeros((4, 1, 2), np.float32))
    assert positions[-1] == 39
    with pytest.raises(InvalidParameterError, match="cannot roll back"):
        cache.truncate(10)
    with pytest.raises(InvalidParameterError, match="cannot truncate"):
        cache.truncate(41)


@pytest.mark.parametrize("kv_dtype", ["f16", "f32"])
def test_kv_bytes_per_token_matches_cache_storage(model_path, kv_dtype):
    with LLM(model_path("smollm2-135m-instruct"), n_ctx=16, kv_dtype=kv_dtype) as llm:
        per_token = sum(k.strides[0] + v.strides[0] for k, v in zip(llm.cache.keys, llm.cache.values))
        assert kv_bytes_per_token(llm.gguf.metadata, kv_dtype) == per_token
        assert llm.cache.layout.bytes_per_token(kv_dtype) == per_token
    assert kv_bytes_per_token(llm.gguf.metadata, "f16") * 2 == kv_bytes_per_token(llm.gguf.metadata, "f32")


def test_a_cache_larger_than_memory_is_refused_before_allocation(model_path):
    with pytest.raises(OutOfMemoryError, match=r"n_ctx=50000000.*needs [\d,]+ bytes but only [\d,]+ are available"):
        LLM(model_path("smollm2-135m-instruct"), n_ctx=50_000_000)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(policy="sink", window=0), "window must be an int of at least 1, got 0"),
        (dict(policy="sink", sinks=-1), "sinks must be an int of at least 0, got -1"),
        (dict(policy="sink", sinks=8, window=8), r"sinks \(8\) must be smaller than window \(8\)"),
        (dict(policy="ring"), "cache policy must be one of full, sink, got 'ring'"),
        (dict(kv_dtype="f8"), "kv_dtype must be one of f16, f32, got 'f8'"),
        (dict(n_ctx=0), "n_ctx must be an int of at least 1, got 0"),
    ],
)
def test_bad_cache_settings_are_one_line_errors(options, message):
    with pytest.raises(InvalidParameterError, match=message) as error:
        CacheSpec(**options)
    assert "\n" not in str(error.value)


def test_sink_policy_equals_full_bit_for_bit_while_the_window_covers_everything(model_path):
    """Default settings (8-bit activations, f16 cache); blocks, single tokens, then a block."""
    with LLM(model_path("smollm2-135m-instruct"), n_ctx=512) as llm:
        ids = prompt_ids("smollm2-135m-instruct")[:200]
        sizes = [120, 1, 1, 1, 77]
        full = feed(llm, ids, sizes)
        sink = feed(llm, ids, sizes, spec=CacheSpec(policy="sink", sinks=4, window=196))
    assert np.array_equal(sink, full)


def rope_reference(x, positions, base=10000.0):
    """Interleaved RoPE in float64 (NumPy), rotating pairs (2i, 2i+1) by position * base^(-2i/d)."""
    d = x.shape[-1]
    theta = np.asarray(positions, np.float64)[:, None] * base ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    even, odd = x[..., 0::2].astype(np.float64), x[..., 1::2].astype(np.float64)
    out = np.empty(x.shape, np.float64)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def test_streaming_attention_equals_attention_at_in_cache_positions():
    """The paper's definition, computed independently: for query t the cache holds the sinks
    and the latest `window` tokens, numbered 0, 1, ... in cache order; keys and query are
    rotated for those numbers. Our cache keeps window keys rotated for their text positions and
    scores sinks with a second rotation of the queries; both must give the same attention."""
    sinks, window, group, head_dim = 3, 10, 2, 16
    layout = CacheLayout(
        n_layer=1, n_head_kv=2, head_dim_k=head_dim, head_dim_v=head_dim, windows=(0,), max_append=6, max_rollback=4
    )
    cache = new_cache(layout, CacheSpec(policy="sink", sinks=sinks, window=window, kv_dtype="f32"))
    assert isinstance(cache, SinkCache)
    rng = np.random.default_rng(3)
    raw_k, raw_v, t = [], [], 0
    for n in [5, 1, 6, 2, 1, 1, 6, 3, 6, 6, 1, 4, 6, 5]:
        q = rng.standard_normal((n, 2 * group, head_dim)).astype(np.float32)
        k = rng.standard_normal((n, 2, head_dim)).astype(np.float32)
        v = rng.standard_normal((n, 2, head_dim)).astype(np.float32)
        raw_k.extend(k.copy())
        raw_v.extend(v)
        positions = cache.append(n)
        sink_positions = cache.sink_query_positions(0)
        q_sink = None
        if sink_positions is not None:
            q_sink = kernels.rope(q.copy(), sink_positions, n_rot=head_dim, base=1e4, neox=False)
        query = kernels.rope(q.copy(), positions, n_rot=head_dim, base=1e4, neox=False)
        kernels.rope(k, positions, n_rot=head_dim, base=1e4, neox=False)
        cache.write(0, k, v)
        view = cache.view(0)
        assert view.keys.shape[0] <= cache.keys[0].shape[0] == sinks + window - 1 + 4 + window
        got = kernels.attention(
            query,
            view.keys,
            view.values,
            positions,
            view.positions,
            scale=0.25,
            window=view.window,
            q_sink=q_sink,
            n_sink=view.n_sink,
        )
        for row in range(n):
            t = int(positions[row])
            held = list(range(min(sinks, t + 1))) + list(range(max(sinks, t - window + 1), t + 1))
            in_cache = np.arange(len(held))
            keys = rope_reference(np.array([raw_k[u] for u in held]), in_cache)
            values = np.array([raw_v[u] for u in held], np.float64)
            query_row = rope_reference(q[row : row + 1], in_cache[-1:])[0]
            for h in range(2 * group):
                scores = keys[:, h // group] @ query_row[h] * 0.25
                weights = np.exp(scores - scores.max())
                expected = weights @ values[:, h // group] / weights.sum()
                assert np.abs(got[row, h] - expected).max() <= 1e-5 * np.abs(expected).max()
    assert t > 3 * (sinks + window)


@pytest.fixture(scope="module")
def streaming_llm(model_path):
    with LLM(model_path("smollm2-135m-instruct"), n_ctx=512, quantize_activations=False) as llm:
        yield llm


STREAM = CacheSpec(policy="sink", sinks=4, window=32)


def test_sink_policy_blocks_equal_token_by_token(streaming_llm):
    """Each query of a block sees the sinks and its own window, as if fed alone."""
    ids = prompt_ids("smollm2-135m-instruct")[:80]
    one_by_one = feed(streaming_llm, ids, [1], spec=STREAM)
    # Blocked and one-row float32 products round differently: up to 1.0e-3 of the largest logit
    # on an AVX2 target (0.038 of 38.2, Numba built for haswell on an AVX-512 host). A query
    # that saw the wrong keys would move logits by whole units.
    assert_close(feed(streaming_llm, ids, [30, 7, 1, 42], spec=STREAM), one_by_one, relative=2e-3)
    assert np.isfinite(one_by_one).all()


def test_sink_policy_rollback_after_evictions_equals_never_going_past(streaming_llm):
    ids = prompt_ids("smollm2-135m-instruct")[:350]
    cache = streaming_llm.model.new_cache(STREAM, max_rollback=8)
    streaming_llm.model.forward(ids[:320], cache)
    expected = streaming_llm.model.forward(ids[320:], cache, all_logits=True)
    assert cache.view(0).positions[4] > 4  # the buffer has shifted entries out
    cache.truncate(328)
    assert_close(streaming_llm.model.forward(ids[328:], cache, all_logits=True), expected[8:])
    with pytest.raises(InvalidParameterError, match="cannot roll back to 200 entries"):
        cache.truncate(200)


def test_sink_cache_holds_sinks_and_window_in_constant_memory():
    layout = CacheLayout(n_layer=1, n_head_kv=1, head_dim_k=1, head_dim_v=1, windows=(0,), max_append=8, max_rollback=3)
    cache = new_cache(layout, CacheSpec(policy="sink", sinks=2, window=5, kv_dtype="f32"))
    capacity = cache.keys[0].shape[0]
    for step in range(300):
        n = 1 + step % 8
        positions = cache.append(n)
        marks = positions.astype(np.float32).reshape(n, 1, 1)
        cache.write(0, marks, -marks)
        view = cache.view(0)
        assert np.array_equal(view.keys[:, 0, 0], view.positions)
        latest = int(positions[-1])
        # The sinks, then every token the oldest query of the block (or a rollback) can see.
        if latest >= 2:
            assert list(view.positions[:2]) == [0, 1]
            assert view.positions[2] <= max(2, int(positions[0]) - 4 - 3) and view.positions[-1] == latest
        assert (view.window, view.n_sink) == ((5, 2) if latest >= 7 else (0, 0))
    assert cache.keys[0].shape[0] == capacity and cache.has_room(10**9)
    assert (cache.in_use, cache.evicted) == (7, cache.n_tokens - 7)


@pytest.mark.slow
def test_kv_bytes_per_token_for_gemma3(model_path):
    with open_gguf(model_path("gemma-3-270m")) as g:
        meta = g.metadata
    n_layer, n_kv = meta["gemma3.block_count"], meta["gemma3.attention.head_count_kv"]
    head_values = meta["gemma3.attention.key_length"] + meta["gemma3.attention.value_length"]
    assert kv_bytes_per_token(meta) == kv_bytes_per_token(meta, "f16") == n_layer * n_kv * head_values * 2
    assert kv_bytes_per_token(meta, "f32") == n_layer * n_kv * head_values * 4
