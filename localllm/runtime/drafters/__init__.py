"""Drafters for speculative decoding: cheap guesses of the next tokens, one file per drafter.

A drafter has `propose(context, k, sampler, cancel) -> Draft`: up to k tokens that may follow
`context` (the prompt and every token generated so far), drawn with `sampler`'s settings and
generator. It may propose fewer, or none (also when `cancel`, a threading.Event, is set while
it works on a long catch-up). The
target model then checks them all in one forward pass (`localllm/runtime/speculative.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Draft:
    """Proposed tokens; `distributions[i]` is the probability vector token i was drawn from
    (the draft's q of the rejection scheme), or None when the drafter is deterministic (q is
    one-hot on the token). `step_seconds` is what proposing one token cost, when the drafter
    measured it (a draft model's single-token forward), for choosing the draft length."""

    tokens: tuple[int, ...] = ()
    distributions: tuple[np.ndarray, ...] | None = None
    step_seconds: float | None = None


NO_DRAFT = Draft()
