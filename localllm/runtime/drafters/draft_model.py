"""A small model of the same family drafts for the big one: it proposes tokens one decode step
at a time, on its own KV cache, until it has k of them or is no longer confident."""

from __future__ import annotations

import math
import time

import numpy as np

from localllm.errors import CancelledError, IncompatibleDraftError, InvalidParameterError
from localllm.formats.gguf import open_gguf
from localllm.formats.tokenizer import Tokenizer
from localllm.runtime.drafters import NO_DRAFT, Draft
from localllm.runtime.drafters.frequent_tokens import AUTO, head_tokens
from localllm.runtime.models import load_model

# Drafting stops once the draft's most likely next token has less probability than this: such
# a token is rarely the target's, and verifying it would cost more than it is likely to give.
DEFAULT_MIN_CONFIDENCE = 0.5
# The most context tokens the draft is fed at once: further behind (the prompt, a long stretch
# without drafting) it starts over on this many of the latest. Catching up on a whole prompt
# cost the 0.5B drafting for the 1.5B (2 threads, Zen 4) its 230 tokens/s of prefill, about 0.4 s
# or a tenth of a 128-token reply, before it could tell whether drafting pays; with 64 tokens
# it still drafted code at 97% acceptance.
DEFAULT_MAX_CATCH_UP = 64
# Tokens a round normally feeds the draft before proposing: the last proposal, when every one
# was kept, and the target's own token.
_ROUND_CATCH_UP = 2


def check_compatible(target_tokenizer, draft_tokenizer, target_n_vocab: int, draft_n_vocab: int, name: str) -> None:
    """Refuse a draft whose token ids do not mean what the target's mean: the same texts, types
    and special tokens, in the same order. The error names the first token that differs."""

    def describe(tokenizer, token_id):
        if token_id >= tokenizer.vocab_size:
            return "absent"
        return f"{tokenizer.token_text(token_id)!r} ({tokenizer.token_type(token_id).name.lower()})"

    for token_id in range(max(target_tokenizer.vocab_size, draft_tokenizer.vocab_size)):
        target, draft = describe(target_tokenizer, token_id), describe(draft_tokenizer, token_id)
        if target != draft:
            raise IncompatibleDraftError(
                f"draft model {name} has another vocabulary: token {token_id} is {target} for the target, "
                f"{draft} for the draft"
            )
    for label in ("bos_id", "eos_id", "eos_ids"):
        if getattr(target_tokenizer, label) != getattr(draft_tokenizer, label):
            raise IncompatibleDraftError(
                f"draft model {name} has other special tokens: {label} is {getattr(target_tokenizer, label)} "
                f"for the target, {getattr(draft_tokenizer, label)} for the draft"
            )
    if target_n_vocab != draft_n_vocab:
        raise IncompatibleDraftError(f"draft model {name} has {draft_n_vocab} output rows, the target {target_n_vocab}")


class DraftModelDrafter:
    """Drafts with `model` on a cache of its own (built from `cache_spec`, so it follows the
    target's policy). The cache is kept in step with the context by its longest common prefix,
    so rejected draft tokens are rolled back and a session's earlier turns are reused; it holds
    the context from `_start` on, the latest `max_catch_up` tokens when it had to start over
    (None: the whole context). A model with a restricted head (`Model.restrict_head`, FR-Spec)
    proposes only the tokens it scores."""

    def __init__(
        self,
        model,
        cache_spec,
        min_confidence: float = DEFAULT_MIN_CONFIDENCE,
        max_catch_up: int | None = DEFAULT_MAX_CATCH_UP,
    ):
        self.model = model
        self.cache = model.new_cache(cache_spec)
        self.min_confidence = min_confidence
        self.max_catch_up = max_catch_up
        head = model.head_token_ids
        self.name = "model" if head is None else f"model ({len(head)}-token head)"
        # The token of every cache entry, in order: context[_start:], as far as the cache goes.
        self._start = 0
        self._tokens: list[int] = []

    def propose(self, context: list[int], k: int, sampler, cancel=None) -> Draft:
        started = time.perf_counter()
        try:
            logits, fed = self._catch_up(context, cancel)
        except CancelledError:
            return NO_DRAFT
        recent = list(context)
        tokens, distributions = [], []
        forwards = 1
        while True:
            if sampler.params.greedy:
                token, logprob = sampler.sample(logits, recent)
                confidence = math.exp(logprob)
            else:
                distribution = sampler.distribution(logits, recent)
                token = sampler.draw(distribution)
                confidence = float(distribution.max())
                distributions.append(distribution)
            if confidence < self.min_confidence:
                if distributions:
                    distributions.pop()
                break
            tokens.append(token)
            recent.append(token)
            if len(tokens) == k or not self.cache.has_room(1):
                break
            logits = self._vocabulary_logits(self.model.forward([token], self.cache))
            forwards += 1
            self._tokens.append(token)
        if not tokens:
            return NO_DRAFT
        # A round feeds the draft the one or two tokens the target added, then one token per
        # proposal after the first: about one forward per proposal, sampling included. A long
        # catch-up (the prompt, or tokens decoded while drafting was off) says nothing about that.
        step = (time.perf_counter() - started) / forwards if fed <= _ROUND_CATCH_UP else None
        return Draft(tuple(tokens), tuple(distributions) if distributions else None, step)

    def _catch_up(self, context: list[int], cancel):
        """Feed the draft what the context has and its cache lacks; the logits after the context
        and how many tokens that took."""
        seen = context[self._start :]
        # The last context token is fed again when the cache already holds it: its logits are needed.
        keep = max(0, min(_common_prefix(self._tokens, seen), len(seen) - 1))
        if seen and keep < self.cache.n_tokens:
            try:
                self.cache.truncate(keep)
            except InvalidParameterError:
                # Entries before `keep` were evicted past the rollback margin.
                keep = None
        if keep is None or not seen or (self.max_catch_up is not None and len(seen) - keep > self.max_catch_up):
            # Start over: after an eviction, on a new, shorter context, or too far behind (a
            # prompt, a long stretch without drafting), where the latest max_catch_up tokens
            # are context enough to draft from and cost far less than all of them.
            self.cache.clear()
            self._start = 0 if self.max_catch_up is None else max(0, len(context) - self.max_catch_up)
            self._tokens, keep = [], 0
            seen = context[self._start :]
        try:
            logits = self.model.forward(seen[keep:], self.cache, cancel=cancel)
        finally:
            # A cancelled catch-up leaves the blocks it finished in the cache.
            self._tokens = seen[: self.cache.n_tokens]
        return self._vocabulary_logits(logits), len(seen) - keep

    def _vocabulary_logits(self, logits: np.ndarray) -> np.ndarray:
        """A restricted head's logits spread over the whole vocabulary, the tokens it does not
        score at -inf: the sampler's biases and penalties address tokens by id."""
        head = self.model.head_token_ids
        if head is None:
            return logits
        full = np.full(self.model.n_vocab, -np.inf, dtype=np.float32)
        full[head] = logits
        return full


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def load_draft_model(path, target_model, target_tokenizer, quantize_activations: bool = True, vocab=AUTO):
    """(open GGUF file, model) of the draft at `path`, on the target's device, refused unless
    its vocabulary is the target's (IncompatibleDraftError). `vocab` is the head it keeps, as
    `frequent_tokens.head_tokens` takes it: "auto" (the shipped frequent-token table of this
    vocabulary, when there is one), "full", or a table's path."""
    gguf = open_gguf(path)
    try:
        model = load_model(gguf, path, target_model.device)
        draft_tokenizer = Tokenizer.from_gguf(gguf)
        check_compatible(target_tokenizer, draft_tokenizer, target_model.n_vocab, model.n_vocab, path.name)
        model.quantize_activations = quantize_activations
        head = head_tokens(vocab, draft_tokenizer)
        if head is not None:
            model.restrict_head(head)
    except BaseException:
        gguf.close()
        raise
    return gguf, model
