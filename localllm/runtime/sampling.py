"""Turning a logits vector into the next token.

The chain and its semantics follow llama.cpp's default sampler chain (common/sampling.cpp,
src/llama-sampler.cpp), so the same settings mean the same thing here as in `llama-cli`:

    logit bias -> penalties -> top-k -> top-p -> min-p -> temperature -> draw

Where llama.cpp leaves the choice among tokens with equal logits to an unstable sort, we keep
the lowest token ids, so results never depend on sort internals.

Everything is vectorized NumPy over the vocabulary; nothing sorts the whole vocabulary unless
top-p without top-k genuinely needs tens of thousands of tokens to reach its mass.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

from localllm.errors import InvalidParameterError, ModelError

# Without top-k, top-p looks for its nucleus among this many best tokens, then the next count,
# before sorting everything; llama.cpp starts at 256 too.
_TOP_P_SEARCH_SIZES = (256, 4096, 32768)
# Draws over more candidates than this first choose a block of this many by its total weight.
_DRAW_BLOCK = 1024


def _require_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise InvalidParameterError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise InvalidParameterError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _require_real(name: str, value, low: float, high: float, allowed: str, low_inclusive=True) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InvalidParameterError(f"{name} must be a number {allowed}, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidParameterError(f"{name} must be a finite number {allowed}, got {value}")
    above_low = value >= low if low_inclusive else value > low
    if not (above_low and value <= high):
        shown = int(value) if value.is_integer() else value
        raise InvalidParameterError(f"{name} must be {allowed}, got {shown}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token; defaults are llama.cpp's.

    temperature 0 means greedy decoding (argmax). top_k 0, top_p 1 and min_p 0 each disable
    their filter. repeat_penalty 1, presence_penalty 0 and frequency_penalty 0 disable the
    penalties; they look at the last `penalty_last_n` tokens (0: none, -1: all given).
    logit_bias adds a value to a token's logit (-inf bans the token). seed None draws a fresh
    random seed.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    logit_bias: dict[int, float] | None = None
    seed: int | None = None

    def __post_init__(self):
        checked = {
            "temperature": _require_real("temperature", self.temperature, 0.0, math.inf, ">= 0"),
            "top_k": _require_int("top_k", self.top_k, 0),
            "top_p": _require_real("top_p", self.top_p, 0.0, 1.0, "in [0, 1]"),
            "min_p": _require_real("min_p", self.min_p, 0.0, 1.0, "in [0, 1]"),
            "repeat_penalty": _require_real(
                "repeat_penalty", self.repeat_penalty, 0.0, math.inf, "> 0", low_inclusive=False
            ),
            "presence_penalty": _require_real("presence_penalty", self.presence_penalty, -2.0, 2.0, "in [-2, 2]"),
            "frequency_penalty": _require_real("frequency_penalty", self.frequency_penalty, -2.0, 2.0, "in [-2, 2]"),
            "penalty_last_n": _require_int("penalty_last_n", self.penalty_last_n, -1),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", _checked_logit_bias(self.logit_bias))
        if self.seed is not None:
            object.__setattr__(self, "seed", _require_int("seed", self.seed, 0))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _checked_logit_bias(logit_bias) -> dict[int, float]:
    if not isinstance(logit_bias, dict):
        raise InvalidParameterError(f"logit_bias must be a dict of token id -> bias, got {type(logit_bias).__name__}")
    checked = {}
    for token, bias in logit_bias.items():
        token = _require_int("logit_bias token id", token, 0)
        if isinstance(bias, bool) or not isinstance(bias, Real) or math.isnan(bias) or bias == math.inf:
            raise InvalidParameterError(f"logit_bias for token {token} must be a finite number or -inf, got {bias!r}")
        checked[token] = float(bias)
    return checked


class Sampler:
    """Draws tokens from logits under fixed `SamplingParams`, with its own seeded generator.

    The generator is `np.random.default_rng(seed)`, so a given seed and settings produce the
    same tokens in every process.
    """

    def __init__(self, params: SamplingParams, n_vocab: int):
        if not isinstance(params, SamplingParams):
            raise InvalidParameterError(f"params must be SamplingParams, got {type(params).__name__}")
        self.params = params
        self.n_vocab = _require_int("n_vocab", n_vocab, 1)
        self.rng = np.random.default_rng(params.seed)
        bias = params.logit_bias or {}
        out_of_range = [token for token in bias if token >= self.n_vocab]
        if out_of_range:
            raise InvalidParameterError(
                f"logit_bias token id {out_of_range[0]} is outside the vocabulary of {self.n_vocab} tokens"
            )
        self._bias_ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        self._bias_values = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))

    def sample(self, logits: np.ndarray, recent_tokens: Sequence[int] = ()) -> tuple[int, float]:
        """Return (token id, its log-probability).

        The log-probability is under the distribution the token was drawn from (after every
        filter and the temperature); for greedy decoding it is under the softmax of the biased
        and penalized logits over the whole vocabulary, since the one-hot distribution greedy
        really draws from would always give 0.
        """
        x = self.processed_logits(logits, recent_tokens)
        shift = _checked_max(x)

        if self.params.greedy:
            token = int(np.argmax(x))
            log_normalizer = math.log(float(np.exp(x - shift).sum(dtype=np.float64)))
            return token, float(x[token] - shift) - log_normalizer

        ids = self._filtered(x, shift)
        values = x if ids is None else x[ids]
        scaled = (values - shift) / np.float32(self.params.temperature)
        drawn, total = _draw(np.exp(scaled), self.rng.random())
        token = drawn if ids is None else int(ids[drawn])
        return token, float(scaled[drawn]) - math.log(total)

    def distribution(self, logits: np.ndarray, recent_tokens: Sequence[int] = ()) -> np.ndarray:
        """The probabilities `sample` draws from, over the whole vocabulary (float64): after
        bias, penalties, the filters and the temperature; one-hot on the argmax when greedy.

        Speculative sampling compares the target's and the draft's versions of this."""
        x = self.processed_logits(logits, recent_tokens)
        shift = _checked_max(x)
        probs = np.zeros(self.n_vocab, dtype=np.float64)
        if self.params.greedy:
            probs[int(np.argmax(x))] = 1.0
            return probs
        ids = self._filtered(x, shift)
        values = x if ids is None else x[ids]
        weights = np.exp(((values - shift) / np.float32(self.params.temperature)).astype(np.float64))
        probs[slice(None) if ids is None else ids] = weights / weights.sum()
        return probs

    def draw(self, weights: np.ndarray) -> int:
        """An index drawn with probability proportional to the non-negative `weights`, from this
        sampler's generator (speculative sampling's resampling step)."""
        return _draw(weights, self.rng.random())[0]

    def candidates(self, logits: np.ndarray, recent_tokens: Sequence[int] = ()) -> np.ndarray:
        """Ids of the tokens a non-greedy draw can pick, best first when top-k or top-p ran."""
        x = self.processed_logits(logits, recent_tokens)
        ids = self._filtered(x, _checked_max(x))
        return np.arange(self.n_vocab) if ids is None else ids

    def processed_logits(self, logits: np.ndarray, recent_tokens: Sequence[int] = ()) -> np.ndarray:
        """The logits after logit bias and penalties, as float32; never modifies `logits`."""
        if not isinstance(logits, np.ndarray) or logits.shape != (self.n_vocab,):
            shape = logits.shape if isinstance(logits, np.ndarray) else type(logits).__name__
            raise InvalidParameterError(f"logits must be a 1-D array of {self.n_vocab} values, got {shape}")
        params = self.params
        window = self._penalty_window(recent_tokens)
        if not len(self._bias_ids) and window is None:
            return logits if logits.dtype == np.float32 else logits.astype(np.float32)
        x = logits.astype(np.float32, copy=True)
        if len(self._bias_ids):
            x[self._bias_ids] += self._bias_values
        if window is not None:
            ids, counts = np.unique(window, return_counts=True)
            values = x[ids]
            repeat = np.float32(params.repeat_penalty)
            values = np.where(values <= 0, values * repeat, values / repeat)
            values -= counts.astype(np.float32) * np.float32(params.frequency_penalty) + np.float32(
                params.presence_penalty
            )
            x[ids] = values
        return x

    def _penalty_window(self, recent_tokens: Sequence[int]) -> np.ndarray | None:
        """The recent tokens the penalties look at, or None when no penalty applies."""
        params = self.params
        if params.penalty_last_n == 0 or (
            params.repeat_penalty == 1.0 and params.frequency_penalty == 0.0 and params.presence_penalty == 0.0
        ):
            return None
        try:
            window = np.asarray(recent_tokens, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise InvalidParameterError(f"recent_tokens must be a sequence of token ids: {exc}") from None
        if params.penalty_last_n > 0:
            window = window[-params.penalty_last_n :]
        if not len(window):
            return None
        if window.min() < 0 or window.max() >= self.n_vocab:
            bad = window[(window < 0) | (window >= self.n_vocab)][0]
            raise InvalidParameterError(f"recent token id {bad} is outside the vocabulary of {self.n_vocab} tokens")
        return window

    def _filtered(self, x: np.ndarray, shift: np.float32) -> np.ndarray | None:
        """Ids of the tokens that survive top-k, top-p and min-p; None when all survive.

        Whenever top-k or top-p ran, the ids come best first (ties: lowest id first).
        """
        params = self.params
        ids = top_k_ids(x, params.top_k) if 0 < params.top_k < len(x) else None
        # llama.cpp's min-p compares logits in float32: p_i >= min_p * p_max <=> l_i >= l_max + log(min_p).
        threshold = shift + np.float32(math.log(params.min_p)) if params.min_p > 0.0 else None

        if params.top_p < 1.0:
            pool = x if ids is None else x[ids]
            normalizer = np.exp(pool - shift).sum(dtype=np.float32)
            if ids is None:
                # top-p and min-p each keep a best-first prefix, so together they keep the shorter
                # one, and top-p only needs to search within min-p's survivors.
                pool_ids = None if threshold is None else np.flatnonzero(x >= threshold)
                ids = _nucleus_candidates(x, pool_ids, shift, normalizer, np.float32(params.top_p))
            probs = np.exp(x[ids] - shift) / normalizer
            keep = _prefix_reaching(probs, np.float32(params.top_p))
            if keep is not None:
                ids = ids[:keep]

        if threshold is not None:
            if ids is None:
                ids = np.flatnonzero(x >= threshold)
            else:
                ids = ids[: int(np.count_nonzero(x[ids] >= threshold))]
        return ids


def _checked_max(x: np.ndarray) -> np.float32:
    max_logit = x.max()
    if np.isnan(max_logit):
        raise ModelError("logits contain NaN; the forward pass produced invalid values")
    if max_logit == -np.inf:
        raise InvalidParameterError("every token has logit -inf (all banned); nothing can be sampled")
    return np.float32(max_logit)


def _nucleus_candidates(x, pool_ids, shift, normalizer, top_p) -> np.ndarray:
    """Best-first ids from the pool (all tokens if None) that contain the top-p nucleus.

    Tries the best few hundred, then few thousand tokens before sorting the whole pool, as
    llama.cpp does: real distributions put their mass on few tokens.
    """
    pool = x if pool_ids is None else x[pool_ids]
    for size in _TOP_P_SEARCH_SIZES:
        if size >= len(pool):
            break
        best = top_k_ids(pool, size)
        if _prefix_reaching(np.exp(pool[best] - shift) / normalizer, top_p) is not None:
            return best if pool_ids is None else pool_ids[best]
    best = _sorted_ids(pool, np.arange(len(pool)))
    return best if pool_ids is None else pool_ids[best]


def _draw(weights: np.ndarray, uniform: float) -> tuple[int, float]:
    """Index drawn with probability proportional to `weights`, given a uniform [0, 1) number,
    and the weights' total.

    A running sum over a whole vocabulary is a slow sequential scan, so for long inputs this
    first picks a block of weights by its sum, then the index within the block.
    """
    if len(weights) <= _DRAW_BLOCK:
        total = float(weights.sum(dtype=np.float64))
        return _locate(weights, uniform * total)[0], total
    n_full = len(weights) // _DRAW_BLOCK * _DRAW_BLOCK
    block_sums = np.empty(-(-len(weights) // _DRAW_BLOCK), dtype=np.float64)
    block_sums[: n_full // _DRAW_BLOCK] = weights[:n_full].reshape(-1, _DRAW_BLOCK).sum(axis=1)
    if n_full < len(weights):
        block_sums[-1] = weights[n_full:].sum(dtype=np.float64)
    total = float(block_sums.sum())
    block, remainder = _locate(block_sums, uniform * total)
    start = block * _DRAW_BLOCK
    index, _ = _locate(weights[start : start + _DRAW_BLOCK], remainder)
    return start + index, total


def _locate(weights: np.ndarray, target: float) -> tuple[int, float]:
    """First index whose running sum exceeds `target`, and how far into that weight it falls.

    Zero weights are never chosen: rounding that pushes `target` past the end lands on the last
    positive weight instead.
    """
    cumulative = np.cumsum(weights, dtype=np.float64)
    index = int(np.searchsorted(cumulative, target, side="right"))
    if index >= len(weights):
        index = int(np.flatnonzero(weights > 0)[-1])
    before = float(cumulative[index - 1]) if index else 0.0
    return index, target - before


def _prefix_reaching(probs: np.ndarray, top_p: np.float32) -> int | None:
    """Length of the shortest prefix whose float32 running sum is >= top_p, None if none is."""
    reached = np.flatnonzero(np.cumsum(probs, dtype=np.float32) >= top_p)
    return int(reached[0]) + 1 if len(reached) else None


def _sorted_ids(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """`ids` (ascending) ordered by logit, best first, ties keeping ascending id order."""
    return ids[np.argsort(-x[ids], kind="stable")]


def top_k_ids(x: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest logits, best first; among equal logits the lowest ids win."""
    n = len(x)
    if k >= n:
        return _sorted_ids(x, np.arange(n))
    stride = int(math.sqrt(n / k))
    if stride >= 4:
        # The k-th best of every stride-th logit is no better than the k-th best overall, so the
        # tokens at least that good include the whole answer; there are about k * stride of them,
        # which makes the exact selection below cheap. (stride <= sqrt(n/k) keeps k samples.)
        floor = np.partition(x[::stride], -k)[-k]
        pool = np.flatnonzero(x >= floor)
    else:
        pool = np.arange(n)
    values = x[pool]
    kth = np.partition(values, len(values) - k)[len(values) - k]
    at_least_kth = values >= kth
    ids = pool[at_least_kth]
    surplus = len(ids) - k
    if surplus:
        # Tied at the k-th value: drop the highest-id ties so the lowest ids stay.
        tied = np.flatnonzero(values[at_least_kth] == kth)
        ids = np.delete(ids, tied[len(tied) - surplus :])
    return _sorted_ids(x, ids)
