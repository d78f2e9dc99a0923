"""StreamingLLM measurements: streaming perplexity, flat memory and speed, KV storage types.

    python benchmarks/streaming.py ppl -m smollm2-135m-instruct --windows 256 1024 --sinks 0 1 4 8
    python benchmarks/streaming.py flat -m smollm2-135m-instruct --window 1024 -n 20000
    python benchmarks/streaming.py decode -m qwen2.5-coder-1.5b-instruct --contexts 1000 8000
    python benchmarks/streaming.py sink-cost -m smollm2-135m-instruct --window 1024 --depth 20000

The text of `ppl`: the licence texts GPL-2, GPL-3, LGPL-2.1, Apache-2.0 and MPL-2.0 from
/usr/share/common-licenses, in that order, joined by one blank line ("\\n\\n"), tokenized once
with BOS where the model adds it (23,426 tokens for smollm2, 22,814 for qwen2.5-coder), first
`--tokens` tokens. Streaming rows feed it in order through a sink cache and score every token
but the first from the cache state before it; the dense row cuts it into non-overlapping chunks
of `window` tokens, each on a fresh context, scoring every token of a chunk but its first.

`decode` and `sink-cost` time decode steps over a cache filled with random keys and values
(the cost of a step depends on how many entries it reads, not on what they hold), alternating
the configurations compared.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np

from localllm.runtime.cache import CacheSpec
from localllm.runtime.llm import LLM
from localllm.runtime.perplexity import _negative_log_likelihoods, streaming_perplexity

LICENSES = ["GPL-2", "GPL-3", "LGPL-2.1", "Apache-2.0", "MPL-2.0"]


def license_text() -> str:
    return "\n\n".join((Path("/usr/share/common-licenses") / name).read_text() for name in LICENSES)


def chunked_dense_ppl(llm, tokens: np.ndarray, size: int) -> tuple[float, int]:
    cache = llm.model.new_cache(CacheSpec(n_ctx=size, kv_dtype=llm.cache_spec.kv_dtype))
    nll = []
    for start in range(0, len(tokens) - 1, size):
        chunk = tokens[start : start + size]
        if len(chunk) < 2:
            break
        cache.clear()
        logits = llm.model.forward(chunk[:-1], cache, all_logits=True)
        nll.append(_negative_log_likelihoods(logits, chunk[1:]))
    nll = np.concatenate(nll)
    return math.exp(nll.mean()), len(nll)


def run_ppl(args) -> None:
    text = license_text()
    for model in args.model:
        with LLM(model, threads=args.threads) as llm:
            tokens = np.asarray(llm.tokenize(text, add_bos=True)[: args.tokens + 1], dtype=np.int64)
            print(f"{model}: {len(tokens) - 1} tokens scored", flush=True)
            for window in args.windows:
                row = [f"window {window}"]
                for sinks in args.sinks:
                    started = time.perf_counter()
                    result = streaming_perplexity(llm, text, sinks=sinks, window=window, max_tokens=len(tokens))
                    first = math.exp(result.nll[: args.span].mean())
                    last = math.exp(result.nll[-args.span :].mean())
                    finite = bool(np.isfinite(result.nll).all())
                    row.append(f"sinks {sinks}: {result.ppl:.3f}")
                    print(
                        f"  window {window} sinks {sinks}: ppl {result.ppl:.3f} (first {args.span}: {first:.3f}, "
                        f"last {args.span}: {last:.3f}), finite {finite}, {result.tokens_per_second:.0f} tok/s, "
                        f"{time.perf_counter() - started:.0f} s",
                        flush=True,
                    )
                ppl, scored = chunked_dense_ppl(llm, tokens, window)
                row.append(f"dense chunks: {ppl:.3f}")
                print(f"  window {window} dense chunks of {window}: ppl {ppl:.3f} over {scored} tokens", flush=True)
                print("  | " + " | ".join(row) + " |", flush=True)


def _rss_mib() -> tuple[float, float]:
    """Current and peak resident memory of this process, MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def run_flat(args) -> None:
    with LLM(args.model[0], threads=args.threads, cache="sink", sinks=args.keep, window=args.window) as llm:
        forward = llm.model.forward
        bad = []

        def checked(tokens, cache, *rest, **options):
            logits = forward(tokens, cache, *rest, **options)
            if not np.isfinite(logits).all():
                bad.append(cache.n_tokens)
            return logits

        llm.model.forward = checked
        eos = llm.tokenizer.eos_ids
        stamps, cpu, rss = [], [], {}
        stream = llm.stream("Once upon a time", max_tokens=args.n, seed=0, logit_bias={e: -100.0 for e in eos})
        for count, _ in enumerate(stream, 1):
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())
            if count in (2000, args.n):
                rss[count] = _rss_mib()
        completion = stream.completion
        filled = args.keep + args.window
        stamps, cpu = np.array(stamps), np.array(cpu)

        def rate(clock, first, last):
            return (last - first) / (clock[last - 1] - clock[first - 1])

        early, late = rate(stamps, filled, filled + 1000), rate(stamps, args.n - 1000, args.n)
        # CPU seconds of the whole process per token: what a token costs, whatever else the
        # machine was running meanwhile (wall-clock rates follow the load of the machine).
        cpu_early, cpu_late = 1000 / rate(cpu, filled, filled + 1000), 1000 / rate(cpu, args.n - 1000, args.n)
        print(
            f"{args.model[0]}: {completion.stats.completion_tokens} tokens, stop {completion.stop_reason}, "
            f"non-finite logits at {len(bad)} steps"
        )
        for count, (now, peak) in rss.items():
            print(f"  after {count} tokens: RSS {now:.1f} MiB, peak {peak:.1f} MiB")
        print(
            f"  tokens {filled}-{filled + 1000}: {early:.2f} tok/s, {cpu_early:.2f} CPU-ms/token; "
            f"last 1000: {late:.2f} tok/s, {cpu_late:.2f} CPU-ms/token "
            f"(wall rate {late / early - 1:+.1%}, CPU cost {cpu_late / cpu_early - 1:+.1%})"
        )
        print(
            f"  peak RSS ratio {rss[args.n][1] / rss[2000][1] - 1:+.2%}, ru_maxrss "
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB"
        )


def filled_cache(llm, spec: CacheSpec, n: int):
    cache = llm.model.new_cache(spec)
    layout = cache.layout
    rng = np.random.default_rng(0)
    k = rng.standard_normal((layout.max_append, layout.n_head_kv, layout.head_dim_k)).astype(np.float32)
    v = rng.standard_normal((layout.max_append, layout.n_head_kv, layout.head_dim_v)).astype(np.float32)
    while cache.n_tokens < n:
        m = min(layout.max_append, n - cache.n_tokens)
        cache.append(m)
        for layer in range(layout.n_layer):
            cache.write(layer, k[:m], v[:m])
    return cache


def time_steps(llm, cache, depth: int, steps: int) -> float:
    """Seconds per decode step from `depth` entries on (the cache is rolled back first)."""
    cache.truncate(depth)
    token = [int(llm.tokenize("The", add_bos=False)[0])]
    started = time.perf_counter()
    for _ in range(steps):
        llm.model.forward(token, cache)
    return (time.perf_counter() - started) / steps


def compare(llm, configs: dict, steps: int, rounds: int) -> dict:
    """Alternate the configurations (name -> (cache, depth)) round by round; best ms/token."""
    timings = {name: [] for name in configs}
    for cache, depth in configs.values():
        time_steps(llm, cache, depth, 2)
    for _ in range(rounds):
        for name, (cache, depth) in configs.items():
            timings[name].append(time_steps(llm, cache, depth, steps) * 1000)
    return {name: (min(values), float(np.median(values))) for name, values in timings.items()}


def run_decode(args) -> None:
    with LLM(args.model[0], threads=args.threads, n_ctx=max(args.contexts) + 64) as llm:
        for depth in args.contexts:
            configs = {
                dtype: (filled_cache(llm, CacheSpec(n_ctx=depth + 64, kv_dtype=dtype), depth), depth)
                for dtype in ("f16", "f32")
            }
            results = compare(llm, configs, args.steps, args.rounds)
            for dtype, (best, median) in results.items():
                print(
                    f"{args.model[0]} depth {depth} kv {dtype}: {1000 / best:.2f} tok/s best, "
                    f"{1000 / median:.2f} tok/s median ({median:.2f} ms/token)",
                    flush=True,
                )
            del configs


def run_sink_cost(args) -> None:
    with LLM(args.model[0], threads=args.threads) as llm:
        sink = CacheSpec(policy="sink", sinks=args.keep, window=args.window)
        configs = {
            f"full at {args.short}": (filled_cache(llm, CacheSpec(n_ctx=args.short + 64), args.short), args.short),
            f"sink window {args.window} at {args.depth}": (filled_cache(llm, sink, args.depth), args.depth),
        }
        results = compare(llm, configs, args.steps, args.rounds)
        for name, (best, median) in results.items():
            print(f"{args.model[0]} {name}: {best:.2f} ms/token best, {median:.2f} ms/token median", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["ppl", "flat", "decode", "sink-cost"])
    parser.add_argument("-m", "--model", action="append", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--windows", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--sinks", type=int, nargs="+", default=[0, 1, 4, 8])
    parser.add_argument("--tokens", type=int, default=20_000, help="ppl: tokens scored")
    parser.add_argument("--span", type=int, default=2000, help="ppl: first/last tokens compared")
    parser.add_argument("--window", type=int, default=1024, help="flat, sink-cost: the sink policy's window")
    parser.add_argument("--keep", type=int, default=4, help="flat, sink-cost: the sink policy's sinks")
    parser.add_argument("-n", type=int, default=20_000, help="flat: tokens generated")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1000, 8000])
    parser.add_argument("--short", type=int, default=1000, help="sink-cost: depth of the full cache")
    parser.add_argument("--depth", type=int, default=20_000, help="sink-cost: depth of the sink cache")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    args.model = args.model or ["smollm2-135m-instruct"]
    {"ppl": run_ppl, "flat": run_flat, "decode": run_decode, "sink-cost": run_sink_cost}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
