"""Forward-pass throughput per catalog model: prefill of a 128-token prompt and decode; with
`--batch`, what a forward over n new tokens costs next to one token.

    python benchmarks/forward.py [MODEL ...] [--threads N] [--decode 32]
    python benchmarks/forward.py --batch [MODEL ...] [--threads N] [--rounds 5]

Models default to every catalog model already in the store. Prints one line per model.
`--batch` feeds n = 1, 2, 4, 8, 16 tokens after a 200-token prompt (the verification step of
speculative decoding, which needs every row's logits), best of `--rounds` runs each, the sizes
alternated within a round; forward(n) / forward(1) near 1 means n tokens cost about one.
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


BATCH_SIZES = (1, 2, 4, 8, 16)
BATCH_CONTEXT = 200


def bench_batch(model: str, threads: int | None, rounds: int) -> dict[int, float]:
    """Best seconds of one forward over n tokens (all rows' logits) after BATCH_CONTEXT tokens."""
    with LLM(model, n_ctx=BATCH_CONTEXT + max(BATCH_SIZES) + 1, threads=threads) as llm:
        ids = llm.tokenize(PROMPT * 2)[: BATCH_CONTEXT + max(BATCH_SIZES)]
        prompt, new = ids[:BATCH_CONTEXT], ids[BATCH_CONTEXT:]
        llm.model.forward(prompt, llm.cache)
        best = {n: float("inf") for n in BATCH_SIZES}
        for _ in range(rounds + 1):  # the first round compiles or loads every tile's kernels
            for n in BATCH_SIZES:
                llm.cache.truncate(BATCH_CONTEXT)
                started = time.perf_counter()
                llm.model.forward(new[:n], llm.cache, all_logits=True)
                best[n] = min(best[n], time.perf_counter() - started)
        return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--decode", type=int, default=32, help="decode steps to time")
    parser.add_argument("--batch", action="store_true", help="forward(n) / forward(1) for small n")
    parser.add_argument("--rounds", type=int, default=5, help="--batch: timed rounds")
    args = parser.parse_args()
    models = args.models or [listing.name for listing in list_models() if listing.present]
    if args.batch:
        for model in models:
            best = bench_batch(model, args.threads, args.rounds)
            ratios = "  ".join(f"n={n}: {best[n] * 1e3:6.1f} ms {best[n] / best[1]:4.2f}x" for n in BATCH_SIZES)
            print(f"{model:32s} {ratios}", flush=True)
        return
    for model in models:
        prefill, decode = bench(model, args.threads, args.decode)
        print(f"{model:32s} prefill {prefill:8.1f} tok/s ({PREFILL_TOKENS} tokens)   decode {decode:7.2f} tok/s")


if __name__ == "__main__":
    main()
