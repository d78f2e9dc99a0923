"""Decode speed on a shared CPU: localllm and llama.cpp side by side, idle and with a busy core.

Run: python benchmarks/contention.py [MODEL ...] [-n 64] [-r 3] [--ours-threads auto]
     [--llama-threads N] [--llama-python PATH]

A desktop user always has other programs running. For each model (default: the catalog default
and qwen2.5-coder-1.5b-instruct) this times tg (N tokens decoded one at a time, as
compare_llamacpp.py does) in three conditions: idle, and with one busy process (a plain Python
loop) pinned to each of our cores in turn. Both engines run in their own worker process for the
whole run; runs alternate which engine goes first. Printed per condition: tokens/s (mean ± sd)
of each engine, ours / llama.cpp, and ours under load / ours idle.

Targets (issue 14): under one busy core, ours >= 0.5x our idle speed and >= llama.cpp under the
same load; idle speed unchanged. `--ours-threads 2` gives the behaviour before `auto` existed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_llamacpp import Worker, llama_cpp_version  # noqa: E402

DEFAULT_MODELS = ("smollm2-135m-instruct", "qwen2.5-coder-1.5b-instruct")
BUSY_LOOP = "while True: pass"
# Time for a busy loop to start and for auto threads to notice it (they look every 0.5 s).
SETTLE_SECONDS = 1.5


class BusyCore:
    """A Python busy loop pinned to one core, for the duration of a `with` block."""

    def __init__(self, cpu: int | None):
        self.cpu = cpu
        self.process = None

    def __enter__(self):
        if self.cpu is not None:
            self.process = subprocess.Popen(["taskset", "-c", str(self.cpu), sys.executable, "-c", BUSY_LOOP])
            time.sleep(SETTLE_SECONDS)
        return self

    def __exit__(self, *exc_info):
        if self.process is not None:
            self.process.kill()
            self.process.wait()


def _mean_sd(samples: list[float]) -> tuple[float, float]:
    return statistics.fmean(samples), statistics.stdev(samples) if len(samples) > 1 else 0.0


def measure(path: str, args) -> list[str]:
    from localllm.formats.gguf import open_gguf
    from localllm.formats.tokenizer import Tokenizer

    with open_gguf(path) as gguf:
        bos = Tokenizer.from_gguf(gguf).bos_id
    n_ctx = args.n_gen + 16
    workers = [
        Worker(sys.executable, "ours", path, args.ours_threads, n_ctx),
        Worker(args.llama_python, "llama.cpp", path, args.llama_threads, n_ctx),
    ]
    request = dict(op="tg", start=[bos if bos is not None else 0], n=args.n_gen)
    conditions = [("idle", None)] + [(f"core {cpu} busy", cpu) for cpu in sorted(os.sched_getaffinity(0))]
    speeds = {}
    try:
        for label, cpu in conditions:
            with BusyCore(cpu):
                for w in workers:
                    w.ask(**request)  # unmeasured: lets auto threads settle on this load
                for repetition in range(args.repetitions):
                    order = workers if repetition % 2 == 0 else workers[::-1]
                    for w in order:
                        seconds = w.ask(**request)["seconds"]
                        speeds.setdefault((label, w.engine), []).append(args.n_gen / seconds)
    finally:
        for w in workers:
            w.close()
    name = os.path.basename(path)
    idle = statistics.fmean(speeds[("idle", "ours")])
    lines = []
    for label, _ in conditions:
        ours, ours_sd = _mean_sd(speeds[(label, "ours")])
        theirs, theirs_sd = _mean_sd(speeds[(label, "llama.cpp")])
        lines.append(
            f"{name:<42} {label:<12} {ours:>8.2f} ± {ours_sd:<6.2f} {theirs:>8.2f} ± {theirs_sd:<6.2f} "
            f"{ours / theirs:>6.2f}x {ours / idle:>6.2f}x"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "models", nargs="*", help=f"catalog names or .gguf paths (default: {', '.join(DEFAULT_MODELS)})"
    )
    parser.add_argument("-n", "--n-gen", type=int, default=64)
    parser.add_argument("-r", "--repetitions", type=int, default=3)
    parser.add_argument("--ours-threads", default="auto", help="localllm's --threads (default auto)")
    parser.add_argument(
        "--llama-threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="llama.cpp's thread count (default: all our cores, as llama-bench)",
    )
    parser.add_argument(
        "--llama-python",
        default=sys.executable,
        help="Python interpreter that has llama-cpp-python (default: this one)",
    )
    args = parser.parse_args()
    version = llama_cpp_version(args.llama_python)
    if version is None:
        return 0

    from localllm.runtime.catalog import ensure_model

    paths = [str(ensure_model(name)) for name in (args.models or DEFAULT_MODELS)]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(
        f"{cpu}, {len(os.sched_getaffinity(0))} cores; tg{args.n_gen}, {args.repetitions} repetitions; "
        f"threads: ours {args.ours_threads}, llama.cpp {args.llama_threads} (llama-cpp-python {version})"
    )
    print(f"{'model':<42} {'load':<12} {'ours t/s':>17} {'llama.cpp t/s':>17} {'ratio':>7} {'/idle':>7}")
    for path in paths:
        for line in measure(path, args):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
