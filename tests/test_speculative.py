"""Speculative decoding: exact greedy output, the rejection sampler's distribution, cache rollback
under both policies, drafter compatibility, and the API, session and CLI around them."""

import subprocess
import sys
import threading

import numpy as np
import pytest

from localllm.errors import IncompatibleDraftError
from localllm.formats.tokenizer import Tokenizer
from localllm.runtime.cache import CacheSpec
from localllm.runtime.drafters.draft_model import DraftModelDrafter, check_compatible
from localllm.runtime.drafters.prompt_lookup import PromptLookupDrafter
from localllm.runtime.llm import LLM
from localllm.runtime.sampling import Sampler, SamplingParams
from localllm.runtime.speculative import DraftLengthPolicy, Speculation, accept_or_resample

from test_generate_cli import assert_one_line_error

SMOLLM = "smollm2-135m-instruct"
# The chi-square statistic a p-value of 0.001 needs, by degrees of freedom (standard tables).
CHI_SQUARE_AT_0_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515}
# Chat prompts where the reply copies from the prompt (prompt lookup pays) and where it does not.
PROMPTS = [
    "Return this code unchanged except that the function is renamed to total:\n\n"
    "def add_all(values):\n    result = 0\n    for value in values:\n        result += value\n    return result\n",
    "Write a Python function that checks whether a number is prime.",
    "Repeat this list exactly: apples, pears, plums, apples, pears, plums, apples, pears, plums.",
    "Summarise in one sentence: The river rises in the mountains, flows through three countries and "
    "reaches the sea after 1,200 kilometres; its delta is a protected wetland.",
]
CODE_PROMPT = "Write a Python function that returns the n-th Fibonacci number, with a docstring."


def chat_messages(prompt):
    return [{"role": "user", "content": prompt}]


@pytest.fixture(scope="module")
def smollm_path(model_path):
    return model_path(SMOLLM)


@pytest.fixture(scope="module")
def plain(smollm_path):
    with LLM(smollm_path, n_ctx=1024) as llm:
        yield llm


def test_greedy_prompt_lookup_equals_plain_greedy(plain, smollm_path):
    drafted = accepted = 0
    with LLM(smollm_path, n_ctx=1024, draft="lookup") as speculative:
        for prompt in PROMPTS:
            expected = plain.chat(chat_messages(prompt), max_tokens=128, temperature=0)
            got = speculative.chat(chat_messages(prompt), max_tokens=128, temperature=0)
            assert got.token_ids == expected.token_ids, prompt
            assert (got.text, got.stop_reason) == (expected.text, expected.stop_reason)
            drafted += got.stats.speculative.drafted
            accepted += got.stats.speculative.accepted
    assert 0 < accepted < drafted


def test_the_target_as_its_own_draft_accepts_every_token(plain, smollm_path):
    """An off-by-one between the draft's and the target's positions would reject proposals."""
    with LLM(smollm_path, n_ctx=1024, draft=smollm_path, draft_max=4, draft_adaptive=False) as speculative:
        for prompt in (CODE_PROMPT, PROMPTS[3]):
            expected = plain.chat(chat_messages(prompt), max_tokens=96, temperature=0)
            got = speculative.chat(chat_messages(prompt), max_tokens=96, temperature=0)
            assert got.token_ids == expected.token_ids
            stats = got.stats.speculative
            assert stats.drafted > 20 and stats.accepted == stats.drafted


def test_adaptive_length_stays_exact_and_switches_drafting_off_when_it_never_pays(plain, smollm_path):
    # Counting with fresh numbers: prompt lookup finds matches ("1, 2" after "1, 1") that are wrong.
    prompt = "Count from 1 to 40, separated by commas."
    with LLM(smollm_path, n_ctx=1024, draft="lookup", draft_max=8) as speculative:
        expected = plain.chat(chat_messages(prompt), max_tokens=128, temperature=0)
        got = speculative.chat(chat_messages(prompt), max_tokens=128, temperature=0)
    assert got.token_ids == expected.token_ids
    assert got.stats.speculative.rounds > got.stats.speculative.drafting_rounds


def test_policy_chooses_the_draft_length_from_measured_costs_and_acceptance():
    policy = DraftLengthPolicy(draft_max=8)
    assert policy.choose(8) == 0  # nothing measured yet: a plain step first
    costs = {1: 1.0, 2: 1.3, 3: 1.8, 4: 2.0, 5: 2.8, 6: 3.0, 7: 3.5, 8: 3.8, 9: 4.0}
    for n, seconds in costs.items():
        policy.record_forward(n, seconds)
    # Free drafts whose first three tokens are always kept and the fourth never: with
    # k = 3, 3.6 expected tokens in 2.0 s beat k = 2 (2.8 in 1.8 s) and k = 4 (3.7 in 2.8 s).
    for _ in range(30):
        policy.record_round(4, 4, 3)
    assert policy.choose(8) == 3
    # A draft step as slow as a target step never pays.
    policy.record_draft_step(1.0)
    assert policy.choose(8) == 0
    policy.record_draft_step(0.0)
    policy.record_draft_step(0.0)
    for _ in range(30):
        policy.record_round(4, 4, 0)
    assert policy.choose(8) == 0
    # Switched off, it probes with one token after explore_every rounds, then waits twice as long.
    probes = [policy.choose(8) for _ in range(3 * policy.explore_every)]
    first, second = [i for i, k in enumerate(probes) if k]
    assert first < policy.explore_every and second - first == 2 * policy.explore_every


def policy_whose_drafts_are_never_kept(forward_seconds: dict, draft_step_seconds: float) -> DraftLengthPolicy:
    """A policy that has measured these costs and seen 30 rounds of four proposals, none kept."""
    policy = DraftLengthPolicy(draft_max=8)
    for n, seconds in forward_seconds.items():
        policy.record_forward(n, seconds)
    policy.record_draft_step(draft_step_seconds)
    for _ in range(30):
        policy.record_round(4, 4, 0)
    return policy


def test_a_costly_probe_waits_until_it_is_a_small_share_of_the_plain_decoding_since():
    """A draft model's probe from k = 0 catches up on the tokens it skipped first; the next
    probe waits until that cost is at most PROBE_SHARE of the plain decoding since."""
    policy = policy_whose_drafts_are_never_kept({1: 1.0, 2: 2.0, 3: 3.0}, 1.0)
    policy.record_round_seconds(1, 2.0, 3.0)  # a probe whose catch-up took 2 s
    probes = []
    for _ in range(200):
        k = policy.choose(8)
        probes.append(k)
        policy.record_round_seconds(k, 2.0 if k else 0.0, 1.0)
    first = probes.index(1)
    # 2 s of drafting is PROBE_SHARE of 40 plain rounds of 1 s
    assert first == round(2.0 / policy.PROBE_SHARE), first


def test_each_generation_starts_with_a_probe_and_a_faded_memory():
    """Drafting that never paid in one reply is tried again at the next (code after chat),
    with one token, and the old rejections weigh a quarter as much."""
    policy = policy_whose_drafts_are_never_kept({1: 1.0, 2: 1.1, 3: 1.2}, 0.1)
    assert [policy.choose(8) for _ in range(5)] == [0] * 5
    kept_before, could_keep_before = policy._kept.copy(), policy._could_keep.copy()
    policy.new_generation()
    np.testing.assert_allclose(policy._could_keep, could_keep_before * policy.GENERATION_MEMORY)
    np.testing.assert_allclose(policy._kept, kept_before * policy.GENERATION_MEMORY)
    assert policy.choose(8) == 1
    # The probe's tokens were kept: a few such rounds outweigh the faded rejections.
    for _ in range(3):
        policy.record_round(1, 1, 1)
    assert policy.choose(8) >= 1


def assert_chi_square_passes(observed, expected):
    """Pearson's goodness-of-fit test at p-value 0.001."""
    statistic = float(((observed - expected) ** 2 / expected).sum())
    assert statistic < CHI_SQUARE_AT_0_001[len(observed) - 1], (observed, expected)


@pytest.mark.parametrize(
    "p, q",
    [
        ([0.1, 0.2, 0.3, 0.15, 0.25, 0.0], [0.3, 0.1, 0.1, 0.2, 0.1, 0.2]),
        ([0.5, 0.0, 0.0, 0.5, 0.0, 0.0], [0.1, 0.3, 0.2, 0.1, 0.2, 0.1]),
        ([0.05, 0.05, 0.4, 0.2, 0.1, 0.2], [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]),
        ([0.3, 0.3, 0.1, 0.1, 0.1, 0.1], [0.6, 0.0, 0.0, 0.0, 0.4, 0.0]),
    ],
)
def test_accept_or_resample_draws_from_the_target_distribution(p, q):
    p, q = np.array(p), np.array(q)
    sampler = Sampler(SamplingParams(seed=1234), len(p))
    draws = 200_000
    proposals = np.random.default_rng(99).choice(len(q), size=draws, p=q)
    tokens = [accept_or_resample(sampler, p, q, int(x))[0] for x in proposals]
    counts = np.bincount(tokens, minlength=len(p))
    assert counts[p == 0].sum() == 0
    support = p > 0
    assert_chi_square_passes(counts[support], draws * p[support])


def test_accept_or_resample_with_a_deterministic_drafter():
    p = np.array([0.1, 0.0, 0.6, 0.3])
    sampler = Sampler(SamplingParams(seed=7), len(p))
    draws = 200_000
    counts = np.bincount([accept_or_resample(sampler, p, None, 2)[0] for _ in range(draws)], minlength=len(p))
    assert counts[1] == 0
    assert_chi_square_passes(counts[p > 0], draws * p[p > 0])


# The quick subset runs one drafter; the draft model's variants are slow (each costs seconds).
@pytest.mark.parametrize("draft", ["lookup", pytest.param("self", marks=pytest.mark.slow)])
def test_seeded_speculative_sampling_is_reproducible(smollm_path, draft):
    draft = smollm_path if draft == "self" else draft
    options = dict(max_tokens=64, temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    runs = []
    for _ in range(2):
        with LLM(smollm_path, n_ctx=1024, draft=draft, draft_max=4, draft_adaptive=False) as llm:
            runs.append(llm.chat(chat_messages(PROMPTS[2]), **options))
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].stats.speculative.drafted > 0


def visible_entries(cache):
    """Per layer: the positions, keys and values the next query attends to, ordered by position."""
    entries = []
    for _, keys, values, positions in cache.held_arrays():
        seen = np.ones(len(positions), dtype=bool)
        if cache.spec.policy == "sink":
            seen = (positions < cache.spec.sinks) | (positions > cache.n_tokens - cache.spec.window)
        order = np.argsort(positions[seen], kind="stable")
        entries.append((positions[seen][order], keys[seen][order], values[seen][order]))
    return entries


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(CacheSpec(policy="full", n_ctx=512), id="full", marks=pytest.mark.slow),
        pytest.param(CacheSpec(policy="sink", sinks=4, window=48), id="sink"),
    ],
)
def test_rollback_leaves_the_cache_of_a_run_that_never_drafted(smollm_path, spec):
    prompt = PROMPTS[0]
    results = {}
    for draft in (None, "lookup"):
        with LLM(smollm_path, cache=spec.policy, n_ctx=spec.n_ctx, sinks=spec.sinks, window=spec.window,
                 draft=draft, draft_max=6, draft_adaptive=False) as llm:  # fmt: skip
            completion = llm.chat(chat_messages(prompt), max_tokens=100, temperature=0)
            probe = llm.model.forward([completion.token_ids[-1]], llm.cache)
            results[draft] = (completion, llm.cache.n_tokens, visible_entries(llm.cache), probe)
    (plain, plain_tokens, plain_entries, plain_probe) = results[None]
    (spec_run, spec_tokens, spec_entries, spec_probe) = results["lookup"]
    stats = spec_run.stats.speculative
    assert stats.accepted < stats.drafted, "no proposal was rejected: nothing rolled back"
    assert spec_run.token_ids == plain.token_ids and spec_tokens == plain_tokens
    if spec.policy == "sink":
        assert plain_tokens > spec.sinks + spec.window, "no eviction happened"
    for (positions, keys, values), (want_positions, want_keys, want_values) in zip(spec_entries, plain_entries):
        np.testing.assert_array_equal(positions, want_positions)
        np.testing.assert_array_equal(keys, want_keys)
        np.testing.assert_array_equal(values, want_values)
    np.testing.assert_array_equal(spec_probe, plain_probe)


def test_draft_cache_rolls_back_to_the_new_context(plain):
    spec = CacheSpec(n_ctx=256)
    drafter = DraftModelDrafter(plain.model, spec, min_confidence=0.0)
    greedy = Sampler(SamplingParams(temperature=0), plain.n_vocab)
    context = plain.tokenize("The quick brown fox jumps over the lazy dog, and then")
    first = drafter.propose(context, 5, greedy)
    assert len(first.tokens) == 5
    other = [*context, (first.tokens[0] + 1) % plain.n_vocab]
    drafter.propose(other, 3, greedy)
    fresh = plain.model.new_cache(spec)
    plain.model.forward(other, fresh)
    held = drafter.cache.n_tokens
    assert held >= len(other)
    for (_, keys, values, positions), (_, want_keys, want_values, want_positions) in zip(
        drafter.cache.held_arrays(), fresh.held_arrays()
    ):
        np.testing.assert_array_equal(positions[: len(other)], want_positions)
        np.testing.assert_array_equal(keys[: len(other)], want_keys)
        np.testing.assert_array_equal(values[: len(other)], want_values)


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    drafter = PromptLookupDrafter(max_ngram=3)
    # The longest suffix that recurs wins, then its latest occurrence.
    assert drafter.propose([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3], 3).tokens == (4, 5, 9)
    assert drafter.propose([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 2, 3], 3).tokens == (7, 8, 2)
    assert drafter.propose([1, 2, 3, 4, 5, 6], 3).tokens == ()
    assert drafter.propose([5, 6, 5], 4).tokens == (6, 5)


def test_a_draft_vocabulary_that_differs_is_refused_naming_the_token(plain):
    metadata = dict(plain.gguf.metadata)
    types = list(metadata["tokenizer.ggml.token_type"])
    types[300] = 3  # control
    metadata["tokenizer.ggml.token_type"] = types
    other = Tokenizer(metadata)
    with pytest.raises(IncompatibleDraftError, match=r"^draft model d.gguf has another vocabulary: token 300 is ") as e:
        check_compatible(plain.tokenizer, other, plain.n_vocab, plain.n_vocab, "d.gguf")
    assert "\n" not in str(e.value) and "(normal)" in str(e.value) and "(control)" in str(e.value)


@pytest.mark.parametrize("draft", ["lookup", pytest.param("self", marks=pytest.mark.slow)])
def test_session_turns_speculate_and_match_a_plain_session(plain, smollm_path, draft):
    questions = [PROMPTS[2], "Now repeat it again, in the same words."]
    draft = smollm_path if draft == "self" else draft
    with LLM(smollm_path, n_ctx=1024, draft=draft) as speculative:
        for cache in ("full", "sink"):
            plain_chat = plain.session(cache=cache, temperature=0, max_tokens=48)
            spec_chat = speculative.session(cache=cache, temperature=0, max_tokens=48)
            assert plain.session(draft="lookup")._speculation is not None
            assert speculative.session(draft=None)._speculation is None
            for question in questions:
                expected, got = plain_chat.send(question), spec_chat.send(question)
                assert got.token_ids == expected.token_ids
                assert got.stats.speculative is not None
            assert spec_chat.cached_tokens == plain_chat.cached_tokens
            assert spec_chat._tokens == plain_chat._tokens


def test_stop_strings_and_cancel_work_while_speculating(plain, smollm_path):
    prompt = PROMPTS[2]
    with LLM(smollm_path, n_ctx=1024, draft="lookup", draft_max=6, draft_adaptive=False) as speculative:
        expected = plain.chat(chat_messages(prompt), max_tokens=64, temperature=0, stop="plums")
        got = speculative.chat(chat_messages(prompt), max_tokens=64, temperature=0, stop="plums")
        assert (got.text, got.stop_reason, got.token_ids) == (expected.text, "stop", expected.token_ids)

        cancel = threading.Event()
        stream = speculative.chat(chat_messages(prompt), stream=True, max_tokens=64, temperature=0, cancel=cancel)
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 5:
                cancel.set()
        completion = stream.completion
        assert completion.stop_reason == "cancelled" and len(completion.token_ids) == 5
        # The cache holds what plain decoding would: the prompt and every token but the last.
        assert speculative.cache.n_tokens == stream.stats.prompt_tokens + 4


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "localllm.runtime.cli", "generate", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_reports_drafting_and_refuses_bad_values():
    result = run_cli("-m", SMOLLM, "--raw", "-n", "24", "--temp", "0", "--draft", "lookup", "-v", "1, 2, 3, 1, 2, 3,")
    assert result.returncode == 0, result.stderr
    assert "draft:            lookup" in result.stderr and "draft / verify:" in result.stderr
    assert_one_line_error(run_cli("--draft", "lookup", "--draft-max", "0", "x"), "--draft-max must be between 1 and")
    assert_one_line_error(run_cli("--draft-max", "3", "x"), "--draft-max needs --draft")
    assert_one_line_error(run_cli("--draft", "no-such-model", "x"), "--draft: no catalog model named")


# Twenty prompts of the four kinds the speculative benchmark times: write code, edit code, chat,
# summarise pasted text.
EXACTNESS_PROMPTS = [
    CODE_PROMPT,
    *PROMPTS,
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Write a JavaScript function that debounces another function.",
    "Write a SQL query that lists the ten customers with the highest total order value.",
    "Write a Rust function that reverses the words of a sentence.",
    "Rename the variable x to count in this code and return it:\n\nx = 0\nfor item in items:\n"
    "    if item.ready:\n        x += 1\nprint(x)\n",
    "Add type hints to this function and return the whole function:\n\ndef scale(values, factor):\n"
    "    return [value * factor for value in values]\n",
    "Convert this loop to a list comprehension:\n\nsquares = []\nfor n in range(10):\n    squares.append(n * n)\n",
    "Fix the bug in this function and return it:\n\ndef average(values):\n    return sum(values) / len(values) + 1\n",
    "Explain what a hash map is in two sentences.",
    "Write a haiku about rust.",
    "What are three good habits for writing maintainable code?",
    "Give me a short packing list for a day of hiking.",
    "Summarise in two sentences: Photosynthesis turns light, water and carbon dioxide into sugar and "
    "oxygen. It happens in the chloroplasts of plant cells, and almost all life on Earth depends on it.",
    "Summarise this commit message in one line: Fix a crash when the configuration file is empty. The "
    "parser assumed at least one line and indexed past the end; it now returns the defaults.",
    "Summarise: The meeting moved the release to Friday, assigned the documentation to Ana, and agreed "
    "to drop support for the old file format after one more version.",
]


@pytest.mark.slow
def test_qwen_coder_draft_model_is_exact_on_the_1_5b(model_path):
    prompts = EXACTNESS_PROMPTS
    assert len(prompts) == 20
    target = model_path("qwen2.5-coder-1.5b-instruct")
    with LLM(target, n_ctx=1024) as plain_llm, LLM(target, n_ctx=1024, draft="auto") as speculative:
        assert speculative.draft == model_path("qwen2.5-coder-0.5b-instruct")
        accepted = 0
        for prompt in prompts:
            expected = plain_llm.chat(chat_messages(prompt), max_tokens=128, temperature=0)
            got = speculative.chat(chat_messages(prompt), max_tokens=128, temperature=0)
            assert got.token_ids == expected.token_ids, prompt
            accepted += got.stats.speculative.accepted
        assert accepted > 0


@pytest.mark.slow
def test_gemma_is_refused_as_a_draft_for_qwen_in_one_line(model_path):
    result = run_cli("-m", str(model_path("qwen2.5-coder-0.5b-instruct")), "--draft", "gemma-3-270m", "hi")
    assert_one_line_error(result, "draft model gemma-3-270m-q4_k_m.gguf has another vocabulary: token 0 is")
    with pytest.raises(IncompatibleDraftError):
        LLM(model_path("qwen2.5-coder-0.5b-instruct"), draft=model_path("gemma-3-270m"))


def test_speculation_object_runs_on_a_plain_model_directly(plain):
    """The token stepper is usable on its own, as the engine uses it: same tokens as plain."""
    from localllm.runtime.engine import GenerationStats, plain_steps

    sampler = Sampler(SamplingParams(temperature=0), plain.n_vocab)
    prompt = plain.chat_prompt(chat_messages(PROMPTS[2]))
    runs = []
    for speculation in (None, Speculation(PromptLookupDrafter(), DraftLengthPolicy(4, adaptive=False))):
        plain.reset()
        logits = plain.model.forward(prompt, plain.cache)
        context, stats = list(prompt), GenerationStats()
        if speculation is None:
            steps = plain_steps(plain.model, plain.cache, sampler, context, logits, stats)
        else:
            steps = speculation.steps(plain.model, plain.cache, sampler, context, logits, stats, limit=40)
        runs.append([token for token, _ in (next(steps) for _ in range(40))])
        steps.close()
    assert runs[0] == runs[1]


def test_a_draft_far_behind_starts_over_on_the_latest_tokens(plain):
    """A prompt longer than max_catch_up is not fed to the draft whole: its cache then holds
    the last max_catch_up tokens, as a fresh cache fed only those, and later rounds follow on."""
    spec = CacheSpec(n_ctx=256)
    drafter = DraftModelDrafter(plain.model, spec, min_confidence=0.0, max_catch_up=8)
    greedy = Sampler(SamplingParams(temperature=0), plain.n_vocab)
    context = plain.tokenize("The quick brown fox jumps over the lazy dog, and then the dog woke up and")
    assert len(context) > 12
    first = drafter.propose(context, 3, greedy)
    assert len(first.tokens) == 3
    following = [*context, first.tokens[0]]
    drafter.propose(following, 2, greedy)
    fresh = plain.model.new_cache(spec)
    plain.model.forward(following[-9:], fresh)
    assert drafter.cache.n_tokens >= 9
    for (_, keys, values, positions), (_, want_keys, want_values, want_positions) in zip(
        drafter.cache.held_arrays(), fresh.held_arrays()
    ):
        np.testing.assert_array_equal(positions[:9], want_positions)
        np.testing.assert_array_equal(keys[:9], want_keys)
        np.testing.assert_array_equal(values[:9], want_values)
    # Far behind again (twelve new tokens): it starts over on the latest eight.
    later = [*following, *context[:12]]
    drafter.propose(later, 1, greedy)
    fresh = plain.model.new_cache(spec)
    plain.model.forward(later[-8:], fresh)
    for (_, keys, _, _), (_, want_keys, _, _) in zip(drafter.cache.held_arrays(), fresh.held_arrays()):
        np.testing.assert_array_equal(keys[:8], want_keys)
