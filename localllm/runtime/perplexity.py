"""Perplexity of a text: llama.cpp's chunked way, and StreamingLLM's streaming way.

`perplexity`: as llama.cpp's perplexity tool computes it. The text is tokenized once (with BOS
when the model adds one) and cut into non-overlapping chunks of n_ctx tokens; a trailing
partial chunk is ignored. Each chunk runs on a fresh context, its first token replaced by BOS
when the model uses BOS. Only the second half of each chunk is scored, so every scored token
has at least n_ctx/2 tokens of context.

`streaming_perplexity`: as the StreamingLLM paper evaluates. The whole text is fed in order
through one `sink` cache, and every token after the first is scored from the cache state
before it: the first `sinks` tokens and the `window - 1` before it. It is fed in blocks, which
gives each token exactly that state (the kernel masks each query to its own window).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from localllm.errors import InvalidParameterError
from localllm.runtime.cache import CacheSpec
from localllm.runtime.models.base import PREFILL_BLOCK


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    stderr: float
    n_tokens: int  # tokens scored
    tokens_per_second: float  # tokens evaluated (scored or not) per second of forward passes
    # Negative log-likelihood of each scored token, in text order (streaming_perplexity only).
    nll: np.ndarray | None = field(default=None, compare=False, repr=False)


def _negative_log_likelihoods(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    rows = logits.astype(np.float64)
    peak = rows.max(axis=1)
    log_sum = peak + np.log(np.exp(rows - peak[:, None]).sum(axis=1))
    return log_sum - rows[np.arange(len(targets)), targets]


def perplexity(llm, text: str, n_ctx: int = 512) -> PerplexityResult:
    """exp(mean NLL) of `text` under `llm`, with llama.cpp's standard error of that estimate."""
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 4:
        raise InvalidParameterError(f"perplexity context must be an int of at least 4, got {n_ctx!r}")
    if n_ctx > llm.n_ctx:
        raise InvalidParameterError(f"perplexity context {n_ctx} exceeds the model context {llm.n_ctx}")
    tokens = np.asarray(llm.tokenize(text, add_bos=True), dtype=np.int64)
    n_chunks = len(tokens) // n_ctx
    if n_chunks == 0:
        raise InvalidParameterError(f"text has {len(tokens)} tokens; perplexity needs at least one chunk of {n_ctx}")
    tokenizer = llm.tokenizer
    # A cache of its own: the LLM's may follow the sink policy, which would evict mid-chunk.
    cache = llm.model.new_cache(CacheSpec(n_ctx=n_ctx, kv_dtype=llm.cache_spec.kv_dtype))
    first = n_ctx // 2
    nll_sum = nll_sq_sum = 0.0
    count = 0
    seconds = 0.0
    for chunk in range(n_chunks):
        ids = tokens[chunk * n_ctx : (chunk + 1) * n_ctx].copy()
        if tokenizer.add_bos:
            ids[0] = tokenizer.bos_id
        cache.clear()
        started = time.perf_counter()
        # Logits are needed only from position `first` on; the first half just fills the cache.
        llm.model.forward(ids[:first], cache)
        logits = llm.model.forward(ids[first:-1], cache, all_logits=True)
        seconds += time.perf_counter() - started
        nll = _negative_log_likelihoods(logits, ids[first + 1 :])
        nll_sum += float(nll.sum())
        nll_sq_sum += float((nll * nll).sum())
        count += len(nll)
    ppl, stderr = _summary(nll_sum, nll_sq_sum, count)
    evaluated = n_chunks * (n_ctx - 1)
    return PerplexityResult(ppl=ppl, stderr=stderr, n_tokens=count, tokens_per_second=evaluated / seconds)


def _summary(nll_sum: float, nll_sq_sum: float, count: int) -> tuple[float, float]:
    """exp(mean NLL) and llama.cpp's standard error of it."""
    mean = nll_sum / count
    ppl = math.exp(mean)
    variance = nll_sq_sum / count - mean * mean
    stderr = math.sqrt(variance / (count - 1)) * ppl if variance > 0 and count > 1 else float("nan")
    return ppl, stderr


def streaming_perplexity(
    llm, text: str | Sequence[int], sinks: int = 4, window: int = 1024, max_tokens: int | None = None, progress=None
) -> PerplexityResult:
    """exp(mean NLL) of `text` (or token ids, used as they are) fed through a StreamingLLM cache
    of `sinks` + `window` entries (sinks=0: plain window attention); `max_tokens` evaluates only
    the start and `progress(done, total)` follows the tokens fed. The result's `nll` holds every
    token's."""
    spec = CacheSpec(policy="sink", sinks=sinks, window=window, kv_dtype=llm.cache_spec.kv_dtype)
    ids = llm.tokenize(text, add_bos=True) if isinstance(text, str) else llm._prompt_ids(text)
    tokens = np.asarray(ids, dtype=np.int64)
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
            raise InvalidParameterError(f"max_tokens must be an int of at least 2, got {max_tokens!r}")
        tokens = tokens[:max_tokens]
    if len(tokens) < 2:
        raise InvalidParameterError(f"text has {len(tokens)} tokens; streaming perplexity needs at least 2")
    cache = llm.model.new_cache(spec)
    nll = np.empty(len(tokens) - 1)
    seconds = 0.0
    for start in range(0, len(tokens) - 1, PREFILL_BLOCK):
        stop = min(start + PREFILL_BLOCK, len(tokens) - 1)
        started = time.perf_counter()
        logits = llm.model.forward(tokens[start:stop], cache, all_logits=True)
        seconds += time.perf_counter() - started
        nll[start:stop] = _negative_log_likelihoods(logits, tokens[start + 1 : stop + 1])
        if progress is not None:
            progress(stop, len(tokens) - 1)
    ppl, stderr = _summary(float(nll.sum()), float((nll * nll).sum()), len(nll))
    return PerplexityResult(ppl=ppl, stderr=stderr, n_tokens=len(nll), tokens_per_second=len(nll) / seconds, nll=nll)
