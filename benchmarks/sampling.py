"""Time per sampled token for the sampler chain, against the < 1 ms target at Qwen's vocabulary.

Run: python benchmarks/sampling.py [--n-vocab 151936] [--draws 300]

Logits are synthetic but shaped like a language model's: a broad Gaussian body with a few
dozen clearly preferred tokens. Each configuration reports the median and 90th percentile over
`--draws` single samples (after a warm-up); on a shared machine expect noise.
"""

import argparse
import time

import numpy as np

from localllm.runtime.sampling import Sampler, SamplingParams

TARGET_MS = 1.0

CONFIGS = {
    "default (k=40 p=0.95 min_p=0.05 T=0.8)": SamplingParams(seed=0),
    "greedy (T=0)": SamplingParams(temperature=0, seed=0),
    "default + repeat/presence/frequency": SamplingParams(
        repeat_penalty=1.1, presence_penalty=0.3, frequency_penalty=0.2, seed=0
    ),
    "top_k=0 (p=0.95 min_p=0.05)": SamplingParams(top_k=0, seed=0),
    "top_k=0 min_p=0 (p=0.95)": SamplingParams(top_k=0, min_p=0.0, seed=0),
    "no filters (T=1, whole vocabulary)": SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0),
}


def language_model_like_logits(n_vocab: int, rng: np.random.Generator) -> np.ndarray:
    logits = rng.standard_normal(n_vocab).astype(np.float32) * 2.5
    favoured = rng.choice(n_vocab, 30, replace=False)
    logits[favoured] += rng.uniform(8, 14, len(favoured)).astype(np.float32)
    return logits


def time_config(params: SamplingParams, logits: np.ndarray, recent: list[int], draws: int) -> np.ndarray:
    sampler = Sampler(params, len(logits))
    for _ in range(10):
        sampler.sample(logits, recent)
    times = np.empty(draws)
    for i in range(draws):
        start = time.perf_counter()
        sampler.sample(logits, recent)
        times[i] = time.perf_counter() - start
    return times * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-vocab", type=int, default=151936)
    parser.add_argument("--draws", type=int, default=300)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    logits = language_model_like_logits(args.n_vocab, rng)
    recent = rng.integers(0, args.n_vocab, 64).tolist()
    print(f"n_vocab={args.n_vocab}, {args.draws} draws each, 64 recent tokens; target {TARGET_MS} ms")
    print(f"{'configuration':<40} {'median ms':>10} {'p90 ms':>8}")
    for name, params in CONFIGS.items():
        times = time_config(params, logits, recent, args.draws)
        median, p90 = np.median(times), np.percentile(times, 90)
        flag = "" if median < TARGET_MS else "  (over target)"
        print(f"{name:<40} {median:>10.3f} {p90:>8.3f}{flag}")


if __name__ == "__main__":
    main()
