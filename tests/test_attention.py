"""Grouped-query attention against a float64 NumPy reference, with causal and sliding-window masks
over KV slots whose positions are shuffled and non-contiguous."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localllm.errors import KernelError
from localllm.kernels.cpu.attention import KEY_CHUNK, attention
from localllm.kernels.cpu.ops import warm_up_ops
from localllm.kernels.cpu.threads import get_threads, max_threads, set_threads

REL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def compiled():
    warm_up_ops()


def attention_reference(q, k, v, q_pos, k_pos, scale, window):
    n, n_heads, _ = q.shape
    group = n_heads // k.shape[1]
    k64 = np.repeat(k.astype(np.float64), group, axis=1)
    v64 = np.repeat(v.astype(np.float64), group, axis=1)
    scores = np.einsum("nhd,shd->nhs", q.astype(np.float64), k64) * scale
    q_pos = q_pos.astype(np.int64)[:, None]
    k_pos = k_pos.astype(np.int64)[None, :]
    visible = k_pos <= q_pos
    if window:
        visible &= q_pos - k_pos < window
    scores = np.where(visible[:, None, :], scores, -np.inf)
    largest = scores.max(axis=2, keepdims=True)
    seen = np.isfinite(largest)
    weights = np.exp(scores - np.where(seen, largest, 0.0))
    weights /= np.where(seen, weights.sum(axis=2, keepdims=True), 1.0)
    return np.einsum("nhs,shd->nhd", weights, v64)


def assert_close(got, reference):
    assert got.dtype == np.float32 and got.shape == reference.shape
    scale = np.max(np.abs(reference))
    error = np.max(np.abs(got.astype(np.float64) - reference), initial=0.0)
    assert error <= REL * scale, f"max error {error:.3g} vs allowed {REL * scale:.3g}"


def make_cache(rng, n_keys, n_kv_heads, head_dim, position_dtype=np.int64, spread=1):
    """A cache whose slots hold shuffled positions with gaps (as after eviction and reuse)."""
    positions = np.sort(rng.choice(n_keys * spread, n_keys, replace=False))
    k_pos = rng.permutation(positions).astype(position_dtype)
    k = rng.standard_normal((n_keys, n_kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((n_keys, n_kv_heads, head_dim)).astype(np.float32)
    return k, v, k_pos


@pytest.mark.parametrize("group", [1, 3, 6, 7])
@pytest.mark.parametrize("n_keys", [1, 200, 1000])
@pytest.mark.parametrize("window", [0, 64])
def test_decode_matches_reference(group, n_keys, window):
    rng = np.random.default_rng(group * 1000 + n_keys + window)
    n_kv_heads, head_dim = 2, 64
    k, v, k_pos = make_cache(rng, n_keys, n_kv_heads, head_dim, spread=2)
    q = rng.standard_normal((1, n_kv_heads * group, head_dim)).astype(np.float32)
    q_pos = np.array([k_pos.max()], dtype=np.int64)
    scale = head_dim**-0.5
    got = attention(q, k, v, q_pos, k_pos, scale=scale, window=window)
    assert_close(got, attention_reference(q, k, v, q_pos, k_pos, scale, window))


@pytest.mark.parametrize("group", [1, 3, 6, 7])
@pytest.mark.parametrize("n", [2, 5, 70])
@pytest.mark.parametrize("window", [0, 50])
def test_prefill_over_cache_matches_reference(group, n, window):
    """n new tokens appended to a cache of old ones; the new slots are scattered through it."""
    rng = np.random.default_rng(group * 100 + n + window)
    n_kv_heads, head_dim, n_old = 2, 32, 4 * KEY_CHUNK + 17
    k, v, k_pos = make_cache(rng, n_old + n, n_kv_heads, head_dim, position_dtype=np.int32)
    # The queries are the n latest positions, wherever their slots ended up.
    q_pos = np.sort(k_pos)[-n:].astype(np.int32)
    rng.shuffle(q_pos)
    q = rng.standard_normal((n, n_kv_heads * group, head_dim)).astype(np.float32)
    scale = 0.3
    got = attention(q, k, v, q_pos, k_pos, scale=scale, window=window)
    assert_close(got, attention_reference(q, k, v, q_pos, k_pos, scale, window))


def test_sliding_window_excludes_exactly_window_old_keys():
    """With window w, query at position p sees keys p-w+1 .. p (llama.cpp's SWA mask)."""
    n_keys, window = 10, 4
    k_pos = np.arange(n_keys, dtype=np.int64)
    k = np.zeros((n_keys, 1, 1), dtype=np.float32)
    v = np.arange(n_keys, dtype=np.float32).reshape(n_keys, 1, 1)
    q = np.zeros((1, 1, 1), dtype=np.float32)
    got = attention(q, k, v, np.array([9]), k_pos, scale=1.0, window=window)
    # Equal scores: the mean of the visible values 6, 7, 8, 9.
    assert got[0, 0, 0] == pytest.approx(7.5, rel=1e-6)


@pytest.mark.parametrize("n", [1, 3, 20])
def test_query_seeing_no_key_gets_zeros(n):
    rng = np.random.default_rng(n)
    k, v, k_pos = make_cache(rng, 300, 1, 16)
    k_pos += 1000
    q = rng.standard_normal((n, 2, 16)).astype(np.float32)
    q_pos = np.arange(n, dtype=np.int64)
    q_pos[-1] = 1100  # only the last query sees anything
    out = np.full((n, 2, 16), np.nan, dtype=np.float32)
    got = attention(q, k, v, q_pos, k_pos, scale=0.25, out=out)
    assert got is out
    assert np.array_equal(got[:-1], np.zeros_like(got[:-1]))
    assert_close(got, attention_reference(q, k, v, q_pos, k_pos, 0.25, 0))


def test_empty_cache_gives_zeros():
    q = np.ones((3, 2, 8), dtype=np.float32)
    empty = np.zeros((0, 1, 8), dtype=np.float32)
    got = attention(q, empty, empty, np.arange(3), np.arange(0), scale=1.0)
    assert np.array_equal(got, np.zeros((3, 2, 8), dtype=np.float32))


def test_mixed_position_dtypes():
    rng = np.random.default_rng(4)
    k, v, k_pos = make_cache(rng, 50, 1, 8, position_dtype=np.int32)
    q = rng.standard_normal((6, 3, 8)).astype(np.float32)
    q_pos = np.arange(44, 50, dtype=np.int64)
    got = attention(q, k, v, q_pos, k_pos, scale=0.5)
    assert_close(got, attention_reference(q, k, v, q_pos, k_pos, 0.5, 0))


def test_large_scores_stay_finite():
    """Softmax over scores ~1e4 apart must neither overflow nor lose the winning key."""
    rng = np.random.default_rng(6)
    k, v, k_pos = make_cache(rng, 400, 1, 16)
    k *= 100.0
    q = (rng.standard_normal((9, 1, 16)) * 100.0).astype(np.float32)
    q_pos = np.full(9, 10_000, dtype=np.int64)
    for rows in (slice(0, 1), slice(0, 9)):
        got = attention(q[rows], k, v, q_pos[rows], k_pos, scale=1.0)
        assert np.all(np.isfinite(got))
        assert_close(got, attention_reference(q[rows], k, v, q_pos[rows], k_pos, 1.0, 0))


def test_results_do_not_depend_on_thread_count():
    rng = np.random.default_rng(8)
    k, v, k_pos = make_cache(rng, 2000, 2, 32)
    q = rng.standard_normal((1, 12, 32)).astype(np.float32)
    q_pos = np.array([k_pos.max()])
    original = get_threads()
    try:
        set_threads(1)
        single = attention(q, k, v, q_pos, k_pos, scale=0.2)
        set_threads(max_threads())
        several = attention(q, k, v, q_pos, k_pos, scale=0.2)
    finally:
        set_threads(original)
    # Runs of keys get tasks of their own or not depending on the thread count; same bits.
    assert np.array_equal(several, single)


def test_repeated_positions_match_reference():
    """Slots holding the same position (never made by the runtime's cache) are all attended."""
    rng = np.random.default_rng(13)
    k_pos = rng.integers(0, 150, 400).astype(np.int64)
    k = rng.standard_normal((400, 2, 16)).astype(np.float32)
    v = rng.standard_normal((400, 2, 16)).astype(np.float32)
    q = rng.standard_normal((3, 6, 16)).astype(np.float32)
    q_pos = np.array([149, 70, 3], dtype=np.int64)
    got = attention(q, k, v, q_pos, k_pos, scale=0.3, window=90)
    assert_close(got, attention_reference(q, k, v, q_pos, k_pos, 0.3, 90))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    n_kv_heads=st.integers(1, 3),
    group=st.integers(1, 4),
    n_keys=st.integers(1, 400),
    head_dim=st.sampled_from([1, 8, 24]),
    window=st.integers(0, 30),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_shapes_and_masks(n, n_kv_heads, group, n_keys, head_dim, window, seed):
    rng = np.random.default_rng(seed)
    k, v, k_pos = make_cache(rng, n_keys, n_kv_heads, head_dim, spread=3)
    q = rng.standard_normal((n, n_kv_heads * group, head_dim)).astype(np.float32)
    q_pos = rng.integers(-5, 3 * n_keys + 5, n).astype(np.int64)
    got = attention(q, k, v, q_pos, k_pos, scale=0.4, window=window)
    reference = attention_reference(q, k, v, q_pos, k_pos, 0.4, window)
    error = np.max(np.abs(got - reference))
    assert error <= REL * max(np.max(np.abs(reference)), 1.0)


@pytest.mark.parametrize("n", [1, 9, 70])
def test_float16_cache_matches_reference_on_its_values(n):
    """f16 keys/values are read as the f16 values they hold (the reference widens them too).
    int32 positions, as the runtime's cache keeps them (warm_up_ops compiles that variant)."""
    rng = np.random.default_rng(n + 16)
    k, v, k_pos = make_cache(rng, 600, 2, 64, position_dtype=np.int32)
    k16, v16 = k.astype(np.float16), v.astype(np.float16)
    q = rng.standard_normal((n, 6, 64)).astype(np.float32)
    q_pos = np.sort(k_pos)[-n:]
    got = attention(q, k16, v16, q_pos, k_pos, scale=0.125, window=300)
    assert_close(got, attention_reference(q, k16.astype(np.float32), v16.astype(np.float32), q_pos, k_pos, 0.125, 300))


def sink_reference(q, q_sink, k, v, q_pos, k_pos, scale, window, n_sink):
    """Scores of the first n_sink slots from q_sink without the window, the rest from q with it."""
    group = q.shape[1] // k.shape[1]
    k64 = np.repeat(k.astype(np.float64), group, axis=1)
    v64 = np.repeat(v.astype(np.float64), group, axis=1)
    scores = np.einsum("nhd,shd->nhs", q.astype(np.float64), k64) * scale
    sink_scores = np.einsum("nhd,shd->nhs", q_sink.astype(np.float64), k64) * scale
    is_sink = np.arange(len(k_pos)) < n_sink
    scores = np.where(is_sink[None, None, :], sink_scores, scores)
    qp, kp = q_pos.astype(np.int64)[:, None], k_pos.astype(np.int64)[None, :]
    visible = (kp <= qp) & (is_sink[None, :] | (qp - kp < window))
    scores = np.where(visible[:, None, :], scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=2, keepdims=True))
    weights /= weights.sum(axis=2, keepdims=True)
    return np.einsum("nhs,shd->nhd", weights, v64)


@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("n, n_sink, window", [(1, 4, 1024), (1, 1, 7), (40, 4, 64), (300, 8, 200)])
def test_sink_slots_use_their_own_queries_and_skip_the_window(kv_dtype, n, n_sink, window):
    """A streaming cache: sinks at slots 0..n_sink-1 (positions 0..), then the latest window."""
    rng = np.random.default_rng(n * 7 + n_sink + window)
    n_kv_heads, head_dim, recent = 2, 32, window + n + 150
    k_pos = np.concatenate([np.arange(n_sink), np.arange(5000, 5000 + recent)]).astype(np.int32)
    k = rng.standard_normal((len(k_pos), n_kv_heads, head_dim)).astype(kv_dtype)
    v = rng.standard_normal((len(k_pos), n_kv_heads, head_dim)).astype(kv_dtype)
    q = rng.standard_normal((n, 3 * n_kv_heads, head_dim)).astype(np.float32)
    q_sink = rng.standard_normal(q.shape).astype(np.float32)
    q_pos = k_pos[-n:].copy()
    got = attention(q, k, v, q_pos, k_pos, scale=0.2, window=window, q_sink=q_sink, n_sink=n_sink)
    expected = sink_reference(q, q_sink, k.astype(np.float32), v.astype(np.float32), q_pos, k_pos, 0.2, window, n_sink)
    assert_close(got, expected)


def test_without_sinks_q_sink_is_ignored():
    rng = np.random.default_rng(12)
    k, v, k_pos = make_cache(rng, 300, 1, 16)
    q = rng.standard_normal((2, 2, 16)).astype(np.float32)
    q_pos = np.sort(k_pos)[-2:]
    plain = attention(q, k, v, q_pos, k_pos, scale=0.3)
    assert np.array_equal(attention(q, k, v, q_pos, k_pos, scale=0.3, q_sink=-q, n_sink=0), plain)


Q = np.zeros((2, 4, 8), dtype=np.float32)
K = np.zeros((5, 2, 8), dtype=np.float32)
QP = np.arange(2, dtype=np.int64)
KP = np.arange(5, dtype=np.int64)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: attention(Q, np.zeros((5, 3, 8), np.float32), np.zeros((5, 3, 8), np.float32), QP, KP, scale=1.0),
            "multiple of kv heads",
        ),
        (lambda: attention(Q, K, np.zeros((5, 2, 4), np.float32), QP, KP, scale=1.0), "same shape"),
        (
            lambda: attention(Q, np.zeros((5, 2, 4), np.float32), np.zeros((5, 2, 4), np.float32), QP, KP, scale=1.0),
            "head_dim",
        ),
        (lambda: attention(Q, K, K, QP, KP[:4], scale=1.0), "k_pos"),
        (lambda: attention(Q, K, K, QP[:1], KP, scale=1.0), "q_pos"),
        (lambda: attention(Q, K, K, QP.astype(np.float32), KP, scale=1.0), "int32 or int64"),
        (lambda: attention(Q.astype(np.float64), K, K, QP, KP, scale=1.0), "float32"),
        (lambda: attention(Q, K, K, QP, KP, scale=float("inf")), "scale"),
        (lambda: attention(Q, K, K, QP, KP, scale=1.0, window=-1), "window"),
        (lambda: attention(Q, K, K, QP, KP, scale=1.0, out=np.zeros((2, 4, 9), np.float32)), "out must have shape"),
        (lambda: attention(Q, K, K, QP, KP, scale=1.0, out=Q), "overlap"),
        (lambda: attention(Q[:, ::2], K, K, QP, KP, scale=1.0), "C-contiguous"),
        (lambda: attention(Q, K, K.astype(np.float16), QP, KP, scale=1.0), "same dtype"),
        (lambda: attention(Q, K, K, QP, KP, scale=1.0, n_sink=2), "needs q_sink"),
        (lambda: attention(Q, K, K, QP, KP, scale=1.0, q_sink=Q, n_sink=6), "n_sink"),
        (lambda: attention(Q, K, K, QP, KP, scale=1.0, q_sink=Q[:1], n_sink=1), "q_sink must have"),
    ],
)
def test_bad_arguments_raise_kernel_error(call, message):
    with pytest.raises(KernelError, match=message):
        call()


# Batch invariance (issue 17): a row's bits must not depend on the rest of the batch, nor on the
# keys of the cache it cannot see, nor on the slots they sit in.


def streaming_cache(keys, values, n_sink, first, last):
    """The cache of a layer holding sinks at slots [0, n_sink) (positions 0 ..) and then the
    positions first .. last, where keys[p] and values[p] belong to position p."""
    positions = np.concatenate([np.arange(n_sink), np.arange(first, last + 1)]).astype(np.int32)
    return keys[positions], values[positions], positions


# The quick subset runs the default store (f16) at one head size; the rest of the grid is slow.
@pytest.mark.parametrize("kv_dtype", [pytest.param(np.float32, marks=pytest.mark.slow), np.float16])
@pytest.mark.parametrize("window, n_sink", [(0, 0), (203, 0), (0, 4), (203, 4)])
@pytest.mark.parametrize("group", [1, 3, 4, 6, 7])
@pytest.mark.parametrize("head_dim", [64, pytest.param(128, marks=pytest.mark.slow)])
def test_rows_get_the_same_bits_alone_as_in_a_batch(kv_dtype, window, n_sink, group, head_dim):
    """Queries p .. p + n - 1 in one call against each query alone, as token-by-token decoding
    sees the cache: only the keys up to its own position, and (windowed) a different number of
    keys too old for its window in front, so every key sits in another slot."""
    rng = np.random.default_rng([group, head_dim, window, n_sink, np.dtype(kv_dtype).itemsize])
    n_kv_heads, scale, n_positions = 2, head_dim**-0.5, 1400
    keys = rng.standard_normal((n_positions, n_kv_heads, head_dim)).astype(kv_dtype)
    values = rng.standard_normal((n_positions, n_kv_heads, head_dim)).astype(kv_dtype)

    def first_held(position):
        """A first non-sink position for a cache queried at `position`: 50 past the sinks
        without a window (every held key is visible, so all must be held); with one, anything
        from a few hundred too old up to exactly the window."""
        if not window:
            return n_sink + 50
        return max(n_sink, position - window + 1 - int(rng.integers(0, 300)))

    original = get_threads()
    try:
        for threads in sorted({1, min(2, max_threads())}):
            set_threads(threads)
            for n in (1, 2, 7, 17, 45):
                p = int(rng.integers(600, n_positions - n))
                q_pos = np.arange(p, p + n, dtype=np.int32)
                q = rng.standard_normal((n, n_kv_heads * group, head_dim)).astype(np.float32)
                q_sink = rng.standard_normal(q.shape).astype(np.float32) if n_sink else None
                k, v, k_pos = streaming_cache(keys, values, n_sink, first_held(p), p + n - 1)
                batch = attention(q, k, v, q_pos, k_pos, scale=scale, window=window, q_sink=q_sink, n_sink=n_sink)
                for i in range(n) if n <= 17 else [*range(0, n, 3), n - 1]:
                    k, v, k_pos = streaming_cache(keys, values, n_sink, first_held(p + i), p + i)
                    alone = attention(
                        q[i : i + 1],
                        k,
                        v,
                        q_pos[i : i + 1],
                        k_pos,
                        scale=scale,
                        window=window,
                        q_sink=None if q_sink is None else q_sink[i : i + 1],
                        n_sink=n_sink,
                    )
                    assert np.array_equal(alone[0], batch[i]), f"threads={threads} n={n} p={p} row {i}"
    finally:
        set_threads(original)
