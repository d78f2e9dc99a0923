import math
import subprocess
import sys

import numpy as np
import pytest

from localllm import InvalidParameterError, LocalLLMError, ModelError
from localllm.runtime.sampling import Sampler, SamplingParams, top_k_ids

NO_FILTERS = dict(top_k=0, top_p=1.0, min_p=0.0)


def best_first(x):
    """Reference order: logit descending, then id ascending."""
    return np.lexsort((np.arange(len(x)), -x.astype(np.float64)))


def softmax64(x):
    z = np.asarray(x, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def chi_square_p_value(statistic, dof):
    """Upper tail of the chi-square distribution (Wilson-Hilferty normal approximation)."""
    z = ((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def quantized_logits(seed, n, step=0.5, scale=3.0):
    """Random logits on a coarse grid, so many tokens tie."""
    rng = np.random.default_rng(seed)
    return (np.round(rng.standard_normal(n) * scale / step) * step).astype(np.float32)


# --- greedy ---------------------------------------------------------------------------------


def test_greedy_returns_argmax_and_its_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(1000).astype(np.float32) * 4
    sampler = Sampler(SamplingParams(temperature=0, seed=0), 1000)
    for _ in range(3):
        token, logprob = sampler.sample(logits)
        assert token == int(np.argmax(logits))
        assert logprob == pytest.approx(math.log(softmax64(logits)[token]), abs=1e-5)


def test_greedy_breaks_ties_by_lowest_id():
    logits = np.zeros(50, dtype=np.float32)
    logits[[31, 7, 12]] = 2.5
    token, logprob = Sampler(SamplingParams(temperature=0), 50).sample(logits)
    assert token == 7
    assert logprob == pytest.approx(math.log(softmax64(logits)[7]), abs=1e-6)


def test_greedy_ignores_seed_and_filters():
    logits = quantized_logits(3, 500)
    tokens = {
        Sampler(SamplingParams(temperature=0, seed=seed, top_k=k, top_p=0.1), 500).sample(logits)[0]
        for seed, k in [(1, 1), (2, 0), (3, 40)]
    }
    assert tokens == {int(np.argmax(logits))}


# --- truncation filters ------------------------------------------------------------------------


def test_top_k_never_draws_outside_the_k_best():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(2000).astype(np.float32)
    allowed = set(best_first(logits)[:5].tolist())
    sampler = Sampler(SamplingParams(temperature=1.5, top_k=5, top_p=1.0, min_p=0.0, seed=4), 2000)
    drawn = [sampler.sample(logits)[0] for _ in range(1000)]
    assert set(drawn) <= allowed
    assert len(set(drawn)) == 5


@pytest.mark.parametrize("seed", range(40))
def test_top_k_ids_match_reference_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5000))
    k = int(rng.integers(1, n + 1))
    x = quantized_logits(seed, n)
    if seed % 3 == 1:
        x = np.sort(x)
    elif seed % 3 == 2:
        x = np.sort(x)[::-1].copy()
    np.testing.assert_array_equal(top_k_ids(x, k), best_first(x)[:k])


def reference_top_p(logits, top_p, candidate_ids=None):
    """Shortest best-first prefix whose probability mass reaches top_p, computed in float64."""
    order = best_first(logits) if candidate_ids is None else candidate_ids
    probs = softmax64(logits[order])
    cumulative = np.cumsum(probs)
    reached = np.flatnonzero(cumulative >= top_p)
    keep = reached[0] + 1 if len(reached) else len(order)
    margin = np.min(np.abs(cumulative - top_p))
    return order[:keep], margin


def top_p_cases(n, vocab, steps=(0.5, 0.25)):
    """(seed, logits, top_p) cases whose nucleus boundary is not within float32 rounding of top_p."""
    cases = []
    seed = 0
    while len(cases) < n:
        seed += 1
        rng = np.random.default_rng(seed)
        logits = quantized_logits(seed, vocab, step=steps[seed % len(steps)], scale=2.0)
        top_p = float(rng.choice([0.1, 0.5, 0.8, 0.9, 0.95, 0.99]))
        _, margin = reference_top_p(logits, top_p)
        if margin > 1e-5:
            cases.append((seed, logits, top_p))
    return cases


@pytest.mark.parametrize("seed, logits, top_p", top_p_cases(30, 3000))
def test_top_p_keeps_the_shortest_prefix_reaching_p(seed, logits, top_p):
    expected, _ = reference_top_p(logits, top_p)
    sampler = Sampler(SamplingParams(top_k=0, top_p=top_p, min_p=0.0, seed=seed), len(logits))
    np.testing.assert_array_equal(sampler.candidates(logits), expected)


def test_top_p_with_a_nucleus_larger_than_the_partial_search():
    # Nearly flat logits over a Qwen-sized vocabulary: the nucleus holds >100k tokens, so the
    # 256/4096/32768-token searches all fall short and the whole vocabulary is sorted. Over so
    # many tokens float32 rounding of the running sum moves the cut by a few tokens, so the
    # reference sums in float32 in best-first order, as llama.cpp does.
    logits = quantized_logits(11, 151_936, step=0.125, scale=0.5)
    order = best_first(logits)
    weights = np.exp(logits[order] - logits.max())
    cumulative = np.cumsum(weights / weights.sum(dtype=np.float32), dtype=np.float32)
    keep = int(np.flatnonzero(cumulative >= np.float32(0.9))[0]) + 1
    assert keep > 32768
    float64_expected, _ = reference_top_p(logits, 0.9)
    assert abs(len(float64_expected) - keep) < 100
    sampler = Sampler(SamplingParams(top_k=0, top_p=0.9, min_p=0.0), len(logits))
    np.testing.assert_array_equal(sampler.candidates(logits), order[:keep])


@pytest.mark.parametrize("min_p", [0.01, 0.05, 0.2, 0.6, 1.0])
def test_min_p_keeps_tokens_with_p_at_least_min_p_times_p_max(min_p):
    logits = quantized_logits(5, 4000, step=0.3)
    probs = softmax64(logits)
    expected = set(np.flatnonzero(probs >= min_p * probs.max()).tolist())
    sampler = Sampler(SamplingParams(top_k=0, top_p=1.0, min_p=min_p), len(logits))
    got = sampler.candidates(logits)
    assert set(got.tolist()) == expected
    assert len(got) == len(expected)


@pytest.mark.parametrize("seed", range(10))
def test_full_chain_applies_top_k_then_top_p_then_min_p(seed):
    rng = np.random.default_rng(seed)
    logits = quantized_logits(seed + 100, 5000, step=0.25, scale=2.5)
    top_k = int(rng.integers(5, 200))
    top_p = float(rng.choice([0.5, 0.8, 0.95]))
    min_p = float(rng.choice([0.02, 0.05, 0.1]))
    after_k = best_first(logits)[:top_k]
    after_p, margin = reference_top_p(logits, top_p, after_k)
    assert margin > 1e-5
    probs = softmax64(logits[after_p])
    expected = after_p[probs >= min_p * probs.max()]
    sampler = Sampler(SamplingParams(top_k=top_k, top_p=top_p, min_p=min_p), len(logits))
    np.testing.assert_array_equal(sampler.candidates(logits), expected)


@pytest.mark.parametrize("seed, logits, top_p", top_p_cases(4, 20_000))
@pytest.mark.parametrize("min_p", [0.01, 0.3])
def test_min_p_without_top_k_matches_top_p_then_min_p(seed, logits, top_p, min_p):
    after_p, _ = reference_top_p(logits, top_p)
    probs = softmax64(logits[after_p])
    expected = after_p[probs >= min_p * probs.max()]
    sampler = Sampler(SamplingParams(top_k=0, top_p=top_p, min_p=min_p), len(logits))
    np.testing.assert_array_equal(sampler.candidates(logits), expected)


# --- the draw --------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.7, 1.6])
def test_temperature_sampling_matches_softmax_frequencies(temperature):
    rng = np.random.default_rng(7)
    logits = rng.uniform(-1.5, 1.5, 20).astype(np.float32)
    draws = 20_000
    sampler = Sampler(SamplingParams(temperature=temperature, seed=99, **NO_FILTERS), 20)
    counts = np.bincount([sampler.sample(logits)[0] for _ in range(draws)], minlength=20)
    expected = softmax64(logits / temperature) * draws
    statistic = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square_p_value(statistic, 19) > 0.001, (statistic, counts, expected)


def test_sampling_over_a_large_vocabulary_matches_softmax_frequencies():
    # Large enough that the draw goes through its block-wise path.
    rng = np.random.default_rng(8)
    logits = np.full(20_000, -30.0, dtype=np.float32)
    hot = rng.choice(20_000, 12, replace=False)
    logits[hot] = rng.uniform(0, 2, 12)
    sampler = Sampler(SamplingParams(temperature=1.0, seed=5, **NO_FILTERS), 20_000)
    draws = 5_000
    tokens = [sampler.sample(logits)[0] for _ in range(draws)]
    probs = softmax64(logits)
    counts = np.array([tokens.count(int(t)) for t in hot])
    expected = probs[hot] * draws
    cold = draws - counts.sum()
    assert cold <= 5  # the other 19,988 tokens hold about 1e-9 of the mass together
    statistic = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square_p_value(statistic, 11) > 0.001, (statistic, counts, expected)


def test_logprob_is_under_the_final_distribution():
    logits = quantized_logits(9, 300, step=0.1)
    sampler = Sampler(SamplingParams(temperature=0.5, top_k=4, top_p=1.0, min_p=0.0, seed=2), 300)
    kept = best_first(logits)[:4]
    final = softmax64(logits[kept] / 0.5)
    for _ in range(50):
        token, logprob = sampler.sample(logits)
        assert token in kept
        assert logprob == pytest.approx(math.log(final[list(kept).index(token)]), abs=1e-5)


def test_all_banned_tokens_raise():
    bias = {i: -math.inf for i in range(10)}
    sampler = Sampler(SamplingParams(logit_bias=bias), 10)
    with pytest.raises(InvalidParameterError, match="-inf"):
        sampler.sample(np.zeros(10, dtype=np.float32))


def test_nan_logits_raise_model_error():
    logits = np.zeros(10, dtype=np.float32)
    logits[4] = np.nan
    with pytest.raises(ModelError, match="NaN"):
        Sampler(SamplingParams(), 10).sample(logits)


# --- seeds -----------------------------------------------------------------------------------

SEEDED_SCRIPT = """
import numpy as np
from localllm.runtime.sampling import Sampler, SamplingParams
logits = np.random.default_rng(0).standard_normal(32000).astype(np.float32) * 2
sampler = Sampler(SamplingParams(temperature=1.0, top_k=50, top_p=0.95, min_p=0.01, seed={seed}), 32000)
print(" ".join(str(sampler.sample(logits)[0]) for _ in range(100)))
"""


def run_seeded(seed):
    out = subprocess.run(
        [sys.executable, "-c", SEEDED_SCRIPT.format(seed=seed)], capture_output=True, text=True, check=True
    )
    return [int(t) for t in out.stdout.split()]


def test_same_seed_gives_same_tokens_across_processes():
    first, second = run_seeded(1234), run_seeded(1234)
    assert len(first) == 100
    assert first == second
    logits = np.random.default_rng(0).standard_normal(32000).astype(np.float32) * 2
    here = Sampler(SamplingParams(temperature=1.0, top_k=50, top_p=0.95, min_p=0.01, seed=1234), 32000)
    assert [here.sample(logits)[0] for _ in range(100)] == first


def test_different_seeds_give_different_tokens():
    logits = np.random.default_rng(0).standard_normal(32000).astype(np.float32) * 2
    runs = []
    for seed in (1, 2):
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed), 32000)
        runs.append([sampler.sample(logits)[0] for _ in range(100)])
    assert runs[0] != runs[1]


def test_unseeded_samplers_differ():
    logits = np.zeros(1000, dtype=np.float32)
    runs = [
        [Sampler(SamplingParams(temperature=1.0, **NO_FILTERS), 1000).sample(logits)[0] for _ in range(20)]
        for _ in range(2)
    ]
    assert runs[0] != runs[1]


# --- logit bias and penalties --------------------------------------------------------------------


def test_logit_bias_adds_to_the_given_tokens_only():
    logits = quantized_logits(12, 100)
    bias = {3: 2.5, 50: -1.0, 99: -math.inf}
    got = Sampler(SamplingParams(logit_bias=bias), 100).processed_logits(logits)
    expected = logits.copy()
    for token, value in bias.items():
        expected[token] += np.float32(value)
    np.testing.assert_array_equal(got, expected)
    assert got is not logits and logits[99] != -np.inf


def test_logit_bias_steers_greedy():
    logits = np.zeros(10, dtype=np.float32)
    logits[2] = 1.0
    sampler = Sampler(SamplingParams(temperature=0, logit_bias={2: -math.inf, 8: 0.5}), 10)
    assert sampler.sample(logits)[0] == 8


@pytest.mark.parametrize(
    "repeat, presence, frequency, last_n",
    [(1.3, 0.0, 0.0, 64), (1.0, 0.7, 0.0, 64), (1.0, 0.0, 0.4, 64), (1.15, -0.5, 1.2, 6), (0.8, 0.2, 0.3, -1)],
)
def test_penalties_change_exactly_the_recent_tokens(repeat, presence, frequency, last_n):
    rng = np.random.default_rng(13)
    logits = (rng.standard_normal(200) * 3).astype(np.float32)
    logits[[5, 6]] = [0.0, -2.0]  # zero and negative logits are multiplied, not divided
    recent = [5, 6, 9, 9, 9, 17, 6, 120, 9, 42]
    window = recent if last_n < 0 else recent[-last_n:]
    params = SamplingParams(
        repeat_penalty=repeat, presence_penalty=presence, frequency_penalty=frequency, penalty_last_n=last_n
    )
    got = Sampler(params, 200).processed_logits(logits, recent)

    expected = logits.astype(np.float64)
    for token in set(window):
        count = window.count(token)
        value = expected[token]
        value = value * repeat if value <= 0 else value / repeat
        expected[token] = value - count * frequency - presence
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    untouched = np.setdiff1d(np.arange(200), window)
    np.testing.assert_array_equal(got[untouched], logits[untouched])


def test_penalties_disabled_by_last_n_zero_or_neutral_values():
    logits = quantized_logits(14, 50)
    recent = [1, 2, 3, 3]
    for params in (
        SamplingParams(repeat_penalty=1.5, penalty_last_n=0),
        SamplingParams(repeat_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0),
    ):
        np.testing.assert_array_equal(Sampler(params, 50).processed_logits(logits, recent), logits)


def test_repeat_penalty_lowers_a_repeated_tokens_chance():
    logits = np.zeros(4, dtype=np.float32)
    logits[1] = 3.0
    logits[2] = 2.9
    sampler = Sampler(SamplingParams(temperature=0, repeat_penalty=1.3), 4)
    assert sampler.sample(logits, [])[0] == 1
    assert sampler.sample(logits, [1])[0] == 2


def test_recent_token_outside_vocabulary_is_rejected():
    sampler = Sampler(SamplingParams(repeat_penalty=1.1), 10)
    with pytest.raises(InvalidParameterError, match="recent token id 10"):
        sampler.sample(np.zeros(10, dtype=np.float32), [1, 10])


# --- parameter validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, text",
    [
        ("temperature", -1.0, "temperature must be >= 0, got -1"),
        ("top_p", 1.5, "top_p must be in [0, 1], got 1.5"),
        ("top_k", -3, "top_k must be >= 0, got -3"),
        ("min_p", 2, "min_p must be in [0, 1], got 2"),
        ("repeat_penalty", 0.0, "repeat_penalty must be > 0, got 0"),
        ("presence_penalty", 2.5, "presence_penalty must be in [-2, 2], got 2.5"),
        ("frequency_penalty", -3, "frequency_penalty must be in [-2, 2], got -3"),
        ("penalty_last_n", -2, "penalty_last_n must be >= -1, got -2"),
        ("seed", -1, "seed must be >= 0, got -1"),
        ("temperature", float("nan"), "temperature must be a finite number >= 0, got nan"),
        ("top_k", 2.5, "top_k must be an integer >= 0, got 2.5"),
        ("temperature", "hot", "temperature must be a number >= 0, got 'hot'"),
    ],
)
def test_invalid_parameters_raise_one_line_messages(field, value, text):
    with pytest.raises(InvalidParameterError) as caught:
        SamplingParams(**{field: value})
    message = str(caught.value)
    assert message == text
    assert "\n" not in message
    assert isinstance(caught.value, LocalLLMError)


def test_invalid_logit_bias_is_rejected():
    with pytest.raises(InvalidParameterError, match="logit_bias"):
        SamplingParams(logit_bias={1: float("nan")})
    with pytest.raises(InvalidParameterError, match="logit_bias"):
        SamplingParams(logit_bias={-4: 1.0})
    with pytest.raises(InvalidParameterError, match="outside the vocabulary of 10 tokens"):
        Sampler(SamplingParams(logit_bias={10: 1.0}), 10)


def test_wrong_logits_shape_is_rejected():
    sampler = Sampler(SamplingParams(), 10)
    with pytest.raises(InvalidParameterError, match="1-D array of 10 values"):
        sampler.sample(np.zeros(11, dtype=np.float32))
    with pytest.raises(InvalidParameterError, match="1-D array of 10 values"):
        sampler.sample([0.0] * 10)


def test_params_are_frozen_and_default_to_llama_cpp():
    params = SamplingParams()
    assert (params.temperature, params.top_k, params.top_p, params.min_p) == (0.8, 40, 0.95, 0.05)
    assert (params.repeat_penalty, params.penalty_last_n) == (1.0, 64)
    with pytest.raises(AttributeError):
        params.temperature = 1.0
