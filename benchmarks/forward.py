"""Forward-pass throughput per catalog model: prefill of a 128-token prompt and decode.

    python benchmarks/forward.py [MODEL ...] [--threads N] [--decode 32]

Models default to every catalog model already in the store. Prints one line per model.
Timings on a shared machine are noisy; repeat runs before comparing numbers.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from localllm.runtime.catalog import list_models
from localllm.runtime.llm import LLM

PROMPT = "The GNU General Public License is a free, copyleft license for software and other kinds of works. " * 16
PREFILL_TOKENS = 128


def bench(model: str, threads: int | None, decode_tokens: int) -> tuple[float, float]:
    with LLM(model, n_ctx=PREFILL_TOKENS + decode_tokens + 1, threads=threads) as llm:
        ids = llm.tokenize(PROMPT)[:PREFILL_TOKENS]
        llm.model.forward(ids[:8], llm.cache)  # compile or load every kernel before timing
        llm.reset()
        started = time.perf_counter()
        logits = llm.model.forward(ids, llm.cache)
        prefill = len(ids) / (time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(decode_tokens):
            logits = llm.model.forward([int(np.argmax(logits))], llm.cache)
        decode = decode_tokens / (time.perf_counter() - started)
    return prefill, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--decode", type=int, default=32, help="decode steps to time")
    args = parser.parse_args()
    models = args.models or [listing.name for listing in list_models() if listing.present]
    for model in models:
        prefill, decode = bench(model, args.threads, args.decode)
        print(f"{model:32s} prefill {prefill:8.1f} tok/s ({PREFILL_TOKENS} tokens)   decode {decode:7.2f} tok/s")


if __name__ == "__main__":
    main()
