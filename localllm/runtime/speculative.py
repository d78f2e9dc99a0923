"""Speculative decoding: a drafter guesses the next tokens, the target checks them in one pass.

Each round a drafter (`localllm/runtime/drafters/`) proposes up to k tokens after the context;
the target runs its pending token and the k proposals through one `forward(all_logits=True)`,
whose row i is what decoding one token at a time would have given after the first i
proposals (batched rows equal single rows bit for bit, `tests/test_batch_invariance.py`).
The longest prefix the target agrees with is kept, plus one token of the target's own; the
target's cache is rolled back past the rest (`cache.truncate`), the drafter's follows the
context by itself.

- Greedy: a proposal is kept when it is the target's argmax, so the output is exactly plain
  greedy decoding's.
- Sampling: the rejection scheme of Leviathan et al. and Chen et al. (2023) over the
  distributions after the sampler's filters (`Sampler.distribution`): keep proposal x with
  probability min(1, p(x)/q(x)), else draw from max(0, p - q) normalised and stop; after k
  kept, draw from the next row. Each emitted token is distributed exactly as under p.

`DraftLengthPolicy` picks k each round (0 is a plain decoding step) from measured costs and
the running acceptance rate, so speculation that does not pay switches itself off.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from localllm.errors import InvalidParameterError
from localllm.runtime.drafters import NO_DRAFT, Draft

# Drafts never reach this far back: the caches' rollback margin (DEFAULT_MAX_ROLLBACK) is larger.
MAX_DRAFT = 64
DEFAULT_DRAFT_MAX = 8


def check_draft_max(draft_max) -> int:
    if isinstance(draft_max, bool) or not isinstance(draft_max, int) or not 1 <= draft_max <= MAX_DRAFT:
        raise InvalidParameterError(f"draft_max must be an integer from 1 to {MAX_DRAFT}, got {draft_max!r}")
    return draft_max


@dataclass
class SpeculativeStats:
    drafter: str = ""
    rounds: int = 0
    # Rounds the policy ran as plain decoding steps (k = 0), and rounds with a proposal.
    plain_rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    drafting_rounds: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Proposals kept per round that had a proposal."""
        return self.accepted / self.drafting_rounds if self.drafting_rounds else None

    def as_dict(self) -> dict:
        data = asdict(self)
        data["acceptance_rate"] = self.acceptance_rate
        data["mean_accepted_length"] = self.mean_accepted_length
        return data


class DraftLengthPolicy:
    """Chooses each round's draft length cap k to maximise expected tokens per second.

    Measured as decoding goes: the cost of a draft step (the drafter's own timing), the cost of
    verifying n tokens (forward and acceptance test), and, per draft position i, how often a
    drafter that has proposed i - 1 tokens proposes an i-th (a draft model stops when unsure,
    prompt lookup may find nothing) and how often the target keeps the i-th once it kept the
    ones before. From these follow, for each k, the expected tokens a round yields (its kept
    proposals plus the target's own token) and its expected cost; k = 0 is a plain step.

    Costs are the median of their last few measurements, so a burst of load from another
    process does not turn speculation off; old rounds fade from the position counts, so the
    estimates follow the text. A verify length not measured yet is assumed to cost what the one
    below it costs when that one was measured (optimistic), and a whole single-token step more
    otherwise, so k climbs one token at a time while that pays, each length measured first.
    Every `explore_every` rounds one round takes a neighbour of the best k instead, so the
    estimates next to it stay current; from k = 0 (speculation off) that probe also halves the
    memory of past rejections, in case the text has turned predictable, and each probe that
    does not turn speculation back on doubles the wait before the next. A probe also waits
    until what the last one cost in drafting is at most PROBE_SHARE of the time decoded plainly
    since: a draft model must first catch up on the tokens it skipped (up to its catch-up
    limit, 0.1-0.3 s for the 0.5B, several plain steps), prompt lookup costs nothing.

    A generation is a new text: `new_generation` fades the acceptance memory to a quarter and
    makes its first round draft at least one token whatever the estimates say, so that a reply
    drafts well after one that did not (code after chat), at the price of one catch-up when it
    does not. With `adaptive=False` every round asks for `draft_max` tokens (the drafter may
    still stop early).
    """

    COST_SAMPLES = 5
    MEMORY = 0.9
    PRIOR_WEIGHT = 2.0
    PRIOR_ACCEPTANCE = 0.5
    MAX_EXPLORE_EVERY = 256
    # Of the plain decoding since the last probe. Each generation's first round probes anyway,
    # so this only bounds what probing costs within a long reply.
    PROBE_SHARE = 0.03
    GENERATION_MEMORY = 0.25

    def __init__(self, draft_max: int = DEFAULT_DRAFT_MAX, adaptive: bool = True, explore_every: int = 16):
        self.draft_max = check_draft_max(draft_max)
        self.adaptive = adaptive
        self.explore_every = explore_every
        self._off_explore_every = explore_every
        self._forward_samples: dict[int, deque] = {}
        self._forward_medians: dict[int, float] = {}
        self._draft_step_samples: deque = deque(maxlen=self.COST_SAMPLES)
        # Zero until measured: optimistic, so drafting gets tried.
        self.draft_step_seconds = 0.0
        # Per position i (index i - 1), fading counts of rounds that could propose an i-th token
        # and did; of rounds that proposed it after keeping the ones before, and kept it too.
        self._could_propose = np.zeros(MAX_DRAFT)
        self._proposed = np.zeros(MAX_DRAFT)
        self._could_keep = np.zeros(MAX_DRAFT)
        self._kept = np.zeros(MAX_DRAFT)
        self._rounds = 0
        self._since_explored = 0
        self._explore_up = True
        # Drafting time of the round that last turned drafting on (the first such round
        # included), and the seconds of plain rounds since.
        self._probe_seconds = 0.0
        self._off_seconds = 0.0
        self._drafting = False
        self._probe_next = False

    def new_generation(self) -> None:
        """A new text starts (a prompt, a session's next turn): see the class docstring."""
        for counts in (self._could_propose, self._proposed, self._could_keep, self._kept):
            counts *= self.GENERATION_MEMORY
        self._since_explored = 0
        self._off_explore_every = self.explore_every
        self._probe_next = True

    def forward_seconds(self, longest: int) -> list[float]:
        """Estimated cost of verifying n tokens, for n = 1 .. longest (index n - 1); empty until
        a single token has been measured."""
        if 1 not in self._forward_medians:
            return []
        single = self._forward_medians[1]
        estimates, estimate, floor, measured = [], 0.0, 0.0, 0
        for n in range(1, longest + 1):
            if n in self._forward_medians:
                # A longer forward never costs less than a shorter one; noise must not make it look so.
                floor = max(floor, self._forward_medians[n])
                estimate, measured = floor, n
            elif n > measured + 1:
                # Only the next length is assumed free; beyond it, each token costs a full step,
                # so drafts lengthen one token at a time, each length measured before the next.
                estimate += single
            estimates.append(estimate)
        return estimates

    def _rates(self, counts: np.ndarray, totals: np.ndarray, first_prior: float, limit: int) -> list[float]:
        """Per-position rates; a position seen rarely leans on the rate of the one before it."""
        rates, prior = [], first_prior
        for i in range(limit):
            prior = (counts[i] + self.PRIOR_WEIGHT * prior) / (totals[i] + self.PRIOR_WEIGHT)
            rates.append(prior)
        return rates

    def expected(self, k: int, verify: list[float]) -> tuple[float, float]:
        """(expected tokens, expected seconds) of a round with draft cap k."""
        propose = self._rates(self._proposed, self._could_propose, 1.0, k)
        keep = self._rates(self._kept, self._could_keep, self.PRIOR_ACCEPTANCE, k)
        tokens, proposals, verify_seconds = 1.0, 0.0, 0.0
        reach, keep_all = 1.0, 1.0  # probability the drafter proposes i tokens; that all i are kept
        for i in range(k):
            verify_seconds += reach * (1.0 - propose[i]) * verify[i]
            reach *= propose[i]
            keep_all *= propose[i] * keep[i]
            proposals += reach
            tokens += keep_all
        verify_seconds += reach * verify[k]
        # A drafter that proposes nothing has still run once (a draft model: its catch-up).
        draft_steps = proposals + 1.0 - propose[0]
        return tokens, draft_steps * self.draft_step_seconds + verify_seconds

    def choose(self, limit: int) -> int:
        """k for the next round, at most `limit` (what the cache and max_tokens leave)."""
        limit = min(limit, self.draft_max)
        if limit <= 0:
            return 0
        if not self.adaptive:
            return limit
        verify = self.forward_seconds(limit + 1)
        if not verify:
            return 0
        if self._probe_next:
            self._probe_next = False
            return max(1, self._best(limit, verify))
        best_k = self._best(limit, verify)
        if best_k:
            self._off_explore_every = self.explore_every
        self._since_explored += 1
        if self._since_explored < (self.explore_every if best_k else self._off_explore_every):
            return best_k
        if best_k == 0 and self._probe_seconds > self.PROBE_SHARE * self._off_seconds:
            return 0
        self._since_explored = 0
        if best_k == 0:
            self._off_explore_every = min(2 * self._off_explore_every, self.MAX_EXPLORE_EVERY)
            for counts in (self._could_keep, self._kept):
                counts /= 2
            return 1
        self._explore_up = not self._explore_up
        return min(best_k + 1, limit) if self._explore_up else best_k - 1

    def _best(self, limit: int, verify: list[float]) -> int:
        """The k of the most expected tokens per second, 0 .. limit."""
        best_k, best_rate = 0, 1.0 / verify[0]
        for k in range(1, limit + 1):
            tokens, seconds = self.expected(k, verify)
            if tokens / seconds > best_rate:
                best_k, best_rate = k, tokens / seconds
        return best_k

    def record_forward(self, n: int, seconds: float) -> None:
        """A verification of n tokens took `seconds` (the forward and the acceptance test)."""
        samples = self._forward_samples.setdefault(n, deque(maxlen=self.COST_SAMPLES))
        samples.append(seconds)
        self._forward_medians[n] = float(np.median(samples))

    def record_round_seconds(self, k: int, draft_seconds: float, seconds: float) -> None:
        """A round with draft cap k took `seconds`, `draft_seconds` of them drafting."""
        if k == 0:
            self._off_seconds += seconds
        elif not self._drafting:
            self._probe_seconds, self._off_seconds = draft_seconds, 0.0
        self._drafting = k > 0

    def record_draft_step(self, seconds: float) -> None:
        self._draft_step_samples.append(seconds)
        self.draft_step_seconds = float(np.median(self._draft_step_samples))

    def record_round(self, cap: int, proposed: int, kept: int) -> None:
        """A round allowed `cap` proposals, got `proposed` and the target kept `kept`."""
        if not cap:
            return
        for counts in (self._could_propose, self._proposed, self._could_keep, self._kept):
            counts *= self.MEMORY
        self._could_propose[: min(proposed + 1, cap)] += 1
        self._proposed[:proposed] += 1
        self._could_keep[: min(kept + 1, proposed)] += 1
        self._kept[:kept] += 1


class Speculation:
    """A drafter and its draft-length policy, for the generations of one LLM or session."""

    def __init__(self, drafter, policy: DraftLengthPolicy | None = None):
        self.drafter = drafter
        self.policy = policy or DraftLengthPolicy()

    def steps(self, model, cache, sampler, context: list[int], logits: np.ndarray, stats, limit: int | None,
              cancel=None) -> Iterator[tuple[int, float]]:  # fmt: skip
        return speculative_steps(model, cache, sampler, context, logits, stats, self, limit, cancel)


def accept_or_resample(sampler, p: np.ndarray, q: np.ndarray | None, token: int) -> tuple[int, bool]:
    """One step of the rejection scheme: (`token`, True) with probability min(1, p/q) at it,
    else (a token drawn from max(0, p - q) normalised, False). `q` None means the drafter
    proposed `token` for certain (one-hot q)."""
    q_token = 1.0 if q is None else float(q[token])
    if sampler.rng.random() * q_token < p[token]:
        return token, True
    if q is None:
        residual = p.copy()
        residual[token] = 0.0
    else:
        residual = np.maximum(p - q, 0.0)
    # p == q leaves nothing to resample from, but then the proposal was kept with certainty;
    # rounding can still get here, and p itself is the right distribution then.
    return sampler.draw(residual if residual.sum() > 0 else p), False


def _verify(sampler, rows: np.ndarray, draft: Draft, context: list[int]) -> tuple[list, tuple[int, float]]:
    """(kept proposals with their logprobs, the target's own next token and logprob)."""
    kept = []
    recent = list(context)
    for i, token in enumerate(draft.tokens):
        if sampler.params.greedy:
            choice, logprob = sampler.sample(rows[i], recent)
            agreed = choice == token
        else:
            p = sampler.distribution(rows[i], recent)
            q = draft.distributions[i] if draft.distributions is not None else None
            choice, agreed = accept_or_resample(sampler, p, q, token)
            logprob = math.log(p[choice])
        if not agreed:
            return kept, (choice, logprob)
        kept.append((token, logprob))
        recent.append(token)
    return kept, sampler.sample(rows[len(draft.tokens)], recent)


def speculative_steps(model, cache, sampler, context: list[int], logits: np.ndarray, stats, speculation: Speculation,
                      limit: int | None, cancel=None) -> Iterator[tuple[int, float]]:  # fmt: skip
    """Yield (token, logprob) as plain decoding would, a round at a time.

    `context` is the prompt, all in `cache`, and `logits` the target's logits after it; each
    yielded token is appended to `context`. Ends when the cache is full; `limit` (max_tokens)
    keeps drafts from running past the end of the request; `cancel` stops a draft model's long
    catch-up (a prompt). When the consumer stops, the cache is left as plain decoding leaves it:
    every yielded token but the last.
    """
    drafter, policy = speculation.drafter, speculation.policy
    spec = stats.speculative = SpeculativeStats(drafter=drafter.name)
    policy.new_generation()
    produced = 0
    try:
        token, logprob = sampler.sample(logits, context)
        context.append(token)
        produced += 1
        yield token, logprob
        while cache.has_room(1):
            room = min(MAX_DRAFT, limit - produced - 1) if limit is not None else MAX_DRAFT
            while room > 0 and not cache.has_room(room + 1):
                room -= 1
            k = policy.choose(room)
            started = time.perf_counter()
            draft = drafter.propose(context, k, sampler, cancel) if k else NO_DRAFT
            drafted = time.perf_counter()
            base = cache.n_tokens
            rows = model.forward([context[-1], *draft.tokens], cache, all_logits=True)
            kept, own = _verify(sampler, rows, draft, context)
            if len(kept) < len(draft.tokens):
                cache.truncate(base + 1 + len(kept))
            finished = time.perf_counter()

            policy.record_forward(len(draft.tokens) + 1, finished - drafted)
            policy.record_round_seconds(k, drafted - started, finished - started)
            if draft.step_seconds is not None:
                policy.record_draft_step(draft.step_seconds)
            policy.record_round(k, len(draft.tokens), len(kept))
            spec.rounds += 1
            spec.plain_rounds += k == 0
            spec.drafting_rounds += bool(draft.tokens)
            spec.drafted += len(draft.tokens)
            spec.accepted += len(kept)
            spec.draft_seconds += drafted - started
            spec.verify_seconds += finished - drafted
            stats.decode_seconds += finished - started
            for token, logprob in (*kept, own):
                context.append(token)
                produced += 1
                stats.decode_tokens += 1
                yield token, logprob
    finally:
        held = len(context) - 1
        if cache.n_tokens > held:
            cache.truncate(held)
