"""End-to-end generation speed through the Python API: load time, prompt tokens/s, generation
tokens/s and time to first token per catalog model, plus the engine's own overhead per token
(generation wall time not spent in the model's forward pass: sampling, decoding, stop strings).

Run: python benchmarks/generate.py [MODEL ...] [--prompt-tokens 128] [--new-tokens 64] [--repeats 2]

Greedy decoding with EOS banned, so every run generates exactly --new-tokens tokens. The best
of --repeats runs is reported; on a shared machine expect noise.
"""

import argparse
import time

from localllm.runtime.catalog import catalog
from localllm.runtime.llm import LLM

TEXT = (
    "The history of computing is a story of abstraction. Early machines were programmed by "
    "rewiring them; then came stored programs, assemblers, compilers and operating systems. "
)


def prompt_of(llm: LLM, n_tokens: int) -> list[int]:
    ids = llm.tokenize(TEXT)
    while len(ids) < n_tokens:
        ids += llm.tokenize(TEXT, add_bos=False)
    return ids[:n_tokens]


def measure(name: str, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    started = time.perf_counter()
    with LLM(name, n_ctx=prompt_tokens + new_tokens + 8) as llm:
        load_seconds = time.perf_counter() - started
        prompt = prompt_of(llm, prompt_tokens)
        no_eos = {token: float("-inf") for token in llm.tokenizer.eos_ids}
        best = None
        for _ in range(repeats):
            completion = llm.generate(prompt, temperature=0, max_tokens=new_tokens, logit_bias=no_eos)
            stats = completion.stats
            if best is None or stats.total_seconds < best.total_seconds:
                best = stats
    return {
        "model": name,
        "load s": load_seconds,
        "prompt tok/s": best.prompt_tokens_per_second,
        "gen tok/s": best.tokens_per_second,
        "TTFT ms": best.time_to_first_token * 1000,
        # Wall time outside prefill and decode forward passes, per generated token.
        "overhead ms/tok": (best.total_seconds - best.prompt_seconds - best.decode_seconds)
        / best.completion_tokens
        * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="catalog names (default: every catalog model)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = [measure(name, args.prompt_tokens, args.new_tokens, args.repeats) for name in args.models or catalog()]
    columns = list(rows[0])
    print("  ".join(f"{c:>16}" if c != "model" else f"{c:<28}" for c in columns))
    for row in rows:
        cells = [f"{row['model']:<28}"] + [f"{row[c]:>16.2f}" for c in columns[1:]]
        print("  ".join(cells))


if __name__ == "__main__":
    main()
