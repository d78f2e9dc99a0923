"""Prompt lookup: draft the tokens that followed the latest earlier occurrence of the text's
last few tokens (Saxena, 2023). No model at all; it pays wherever the output copies its input:
code edits, summaries, answers quoting a pasted text."""

from __future__ import annotations

import time

import numpy as np

from localllm.runtime.drafters import NO_DRAFT, Draft


class PromptLookupDrafter:
    """Matches the last `max_ngram` tokens of the context, then shorter suffixes down to
    `min_ngram`, against everything before them; the most recent match wins, since recent text
    predicts the next tokens best."""

    name = "lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, context: list[int], k: int, sampler=None, cancel=None) -> Draft:
        started = time.perf_counter()
        tokens = np.asarray(context, dtype=np.int64)
        n_tokens = len(tokens)
        for n in range(min(self.max_ngram, n_tokens - 1), self.min_ngram - 1, -1):
            suffix = tokens[n_tokens - n :]
            # Starts of earlier occurrences; one that ends right before the suffix would propose it.
            starts = np.flatnonzero(tokens[: n_tokens - n] == suffix[0])
            for offset in range(1, n):
                starts = starts[tokens[starts + offset] == suffix[offset]]
            if len(starts):
                follow = int(starts[-1]) + n
                proposal = tuple(int(token) for token in tokens[follow : follow + k])
                step = (time.perf_counter() - started) / len(proposal)
                return Draft(tokens=proposal, step_seconds=step)
        return NO_DRAFT
