"""Perplexity of a text, computed the way llama.cpp's perplexity tool computes it.

The text is tokenized once (with BOS when the model adds one) and cut into non-overlapping
chunks of n_ctx tokens; a trailing partial chunk is ignored. Each chunk runs on a fresh
context, its first token replaced by BOS when the model uses BOS. Only the second half of
each chunk is scored, so every scored token has at least n_ctx/2 tokens of context.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from localllm.errors import InvalidParameterError


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    stderr: float
    n_tokens: int  # tokens scored
    tokens_per_second: float  # tokens evaluated (scored or not) per second of forward passes


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
        raise InvalidParameterError(
            f"text has {len(tokens)} tokens; perplexity needs at least one chunk of {n_ctx}"
        )
    tokenizer = llm.tokenizer
    first = n_ctx // 2
    nll_sum = nll_sq_sum = 0.0
    count = 0
    seconds = 0.0
    for chunk in range(n_chunks):
        ids = tokens[chunk * n_ctx : (chunk + 1) * n_ctx].copy()
        if tokenizer.add_bos:
            ids[0] = tokenizer.bos_id
        llm.reset()
        started = time.perf_counter()
        # Logits are needed only from position `first` on; the first half just fills the cache.
        llm.model.forward(ids[:first], llm.cache)
        logits = llm.model.forward(ids[first:-1], llm.cache, all_logits=True)
        seconds += time.perf_counter() - started
        nll = _negative_log_likelihoods(logits, ids[first + 1 :])
        nll_sum += float(nll.sum())
        nll_sq_sum += float((nll * nll).sum())
        count += len(nll)
    mean = nll_sum / count
    ppl = math.exp(mean)
    variance = nll_sq_sum / count - mean * mean
    stderr = math.sqrt(variance / (count - 1)) * ppl if variance > 0 and count > 1 else float("nan")
    evaluated = n_chunks * (n_ctx - 1)
    return PerplexityResult(ppl=ppl, stderr=stderr, n_tokens=count, tokens_per_second=evaluated / seconds)
