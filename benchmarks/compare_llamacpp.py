"""localllm against llama.cpp (through llama-cpp-python) on the same GGUF files, side by side.

Run: python benchmarks/compare_llamacpp.py [MODEL ...] [-p 128] [-n 64] [-r 3] [--threads N]
     [--llama-python PATH]

Each engine runs in its own worker process (so load time and peak RSS are its own) with the
same thread count. The parent sends both the same work and alternates which engine goes first
on every repetition, so drift in the load of a shared machine hits both alike:
  pp: the same N random prompt tokens through a fresh context;
  tg: N tokens decoded one at a time after BOS, each step feeding the greedy token of the last.
It prints tokens/s (mean ± sd) per engine with the ratio ours/theirs, load time and peak RSS,
and as a sanity line whether both produce the same first 8 greedy tokens for a fixed prompt.

llama-cpp-python is not a dependency. Install it from the package registry (it compiles
llama.cpp, about 6 minutes on two cores):
    pip install llama-cpp-python==0.3.36
or point --llama-python at the interpreter of another environment that has it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

GREEDY_PROMPT = "The capital of France is"
GREEDY_TOKENS = 8
INSTALL_HINT = (
    "llama-cpp-python is not installed for {python}.\n"
    "Install it from the package registry (compiles llama.cpp, about 6 minutes on two cores):\n"
    "    pip install llama-cpp-python==0.3.36\n"
    "or run with --llama-python /path/to/python of an environment that has it."
)


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _argmax(values) -> int:
    import numpy as np

    return int(np.argmax(values))


class _Ours:
    def __init__(self, path: str, threads: int, n_ctx: int):
        from localllm.runtime.llm import LLM

        self.llm = LLM(path, n_ctx=n_ctx, threads=threads)
        self.bos = self.llm.tokenizer.bos_id

    def prompt(self, tokens):
        self.llm.reset()
        return self.llm.model.forward(tokens, self.llm.cache)

    def step(self, token):
        return self.llm.model.forward([token], self.llm.cache)


class _LlamaCpp:
    def __init__(self, path: str, threads: int, n_ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(path, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.bos = self.llm.token_bos()

    def _last_logits(self):
        import numpy as np

        # Without logits_all, Llama.eval keeps no scores; the context holds the last row.
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))

    def prompt(self, tokens):
        self.llm.reset()
        self.llm.eval(tokens)
        return self._last_logits()

    def step(self, token):
        self.llm.eval([token])
        return self._last_logits()


def worker(engine: str, path: str, threads: int, n_ctx: int) -> None:
    """Serve line-delimited JSON requests on stdin until it closes."""
    started = time.perf_counter()
    runner = (_Ours if engine == "ours" else _LlamaCpp)(path, threads, n_ctx)
    print(json.dumps({"load_seconds": time.perf_counter() - started, "bos": runner.bos}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        started = time.perf_counter()
        if request["op"] == "pp":
            runner.prompt(request["tokens"])
            reply = {"seconds": time.perf_counter() - started}
        elif request["op"] == "tg":
            token = _argmax(runner.prompt(request["start"]))
            started = time.perf_counter()
            for _ in range(request["n"]):
                token = _argmax(runner.step(token))
            reply = {"seconds": time.perf_counter() - started}
        elif request["op"] == "greedy":
            token = _argmax(runner.prompt(request["tokens"]))
            generated = [token]
            while len(generated) < request["n"]:
                token = _argmax(runner.step(token))
                generated.append(token)
            reply = {"tokens": generated}
        else:
            reply = {"peak_rss_bytes": _peak_rss_bytes()}
        print(json.dumps(reply), flush=True)


class Worker:
    def __init__(self, python: str, engine: str, path: str, threads: int, n_ctx: int):
        self.engine = engine
        self.process = subprocess.Popen(
            [python, os.path.abspath(__file__), "--worker", engine, path, str(threads), str(n_ctx)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.engine} worker exited (see its error above)")
        return json.loads(line)

    def ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def _speed(samples: list[float]) -> tuple[float, float]:
    return statistics.fmean(samples), statistics.stdev(samples) if len(samples) > 1 else 0.0


def compare(path: str, args, python_for_llamacpp: str) -> list[str]:
    import numpy as np

    from localllm.formats.gguf import open_gguf
    from localllm.formats.tokenizer import Tokenizer

    with open_gguf(path) as gguf:
        tokenizer = Tokenizer.from_gguf(gguf)
        n_vocab = tokenizer.vocab_size
        greedy_prompt = tokenizer.encode(GREEDY_PROMPT, add_special=True)
    n_ctx = max(args.n_prompt, args.n_gen + 1, len(greedy_prompt) + GREEDY_TOKENS) + 8
    prompt = np.random.default_rng(0).integers(0, n_vocab, size=args.n_prompt).tolist()
    workers = [
        Worker(sys.executable, "ours", path, args.threads, n_ctx),
        Worker(python_for_llamacpp, "llama.cpp", path, args.threads, n_ctx),
    ]
    try:
        start = [workers[0].hello["bos"] if workers[0].hello["bos"] is not None else 0]
        tests = []
        if args.n_prompt:
            tests.append((f"pp{args.n_prompt}", args.n_prompt, dict(op="pp", tokens=prompt)))
        if args.n_gen:
            tests.append((f"tg{args.n_gen}", args.n_gen, dict(op="tg", start=start, n=args.n_gen)))
        speeds = {(w.engine, name): [] for w in workers for name, _, _ in tests}
        for w in workers:
            for _, _, request in tests:
                w.ask(**request)
        for repetition in range(args.repetitions):
            order = workers if repetition % 2 == 0 else workers[::-1]
            for name, n_tokens, request in tests:
                for w in order:
                    speeds[(w.engine, name)].append(n_tokens / w.ask(**request)["seconds"])
        greedy = [w.ask(op="greedy", tokens=greedy_prompt, n=GREEDY_TOKENS)["tokens"] for w in workers]
        rss = [w.ask(op="rss")["peak_rss_bytes"] for w in workers]
    finally:
        for w in workers:
            w.close()

    name = os.path.basename(path)
    lines = []
    for test, _, _ in tests:
        ours, ours_sd = _speed(speeds[("ours", test)])
        theirs, theirs_sd = _speed(speeds[("llama.cpp", test)])
        lines.append(
            f"{name:<42} {test:>6} {ours:>9.2f} ± {ours_sd:<6.2f} {theirs:>9.2f} ± {theirs_sd:<6.2f} "
            f"{ours / theirs:>6.2f}x"
        )
    lines.append(
        f"{'':<42} {'load':>6} {workers[0].hello['load_seconds']:>9.2f} s        "
        f"{workers[1].hello['load_seconds']:>9.2f} s"
    )
    lines.append(f"{'':<42} {'RSS':>6} {rss[0] / 2**20:>9.0f} MiB      {rss[1] / 2**20:>9.0f} MiB")
    same = greedy[0] == greedy[1]
    lines.append(
        f"{'':<42} first {GREEDY_TOKENS} greedy tokens "
        + ("equal" if same else f"DIFFER: ours {greedy[0]} llama.cpp {greedy[1]}")
    )
    return lines


def llama_cpp_version(python: str) -> str | None:
    """llama-cpp-python's version in `python`, or None (after saying how to install it)."""
    probe = subprocess.run(
        [python, "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        print(INSTALL_HINT.format(python=python))
        return None
    return probe.stdout.strip()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        engine, path, threads, n_ctx = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
        # localllm also takes "auto" (follow the free cores); llama.cpp only counts.
        threads = threads if threads == "auto" and engine == "ours" else int(threads)
        worker(engine, path, threads, n_ctx)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="catalog names or .gguf paths (default: every catalog model)")
    parser.add_argument("-p", "--n-prompt", type=int, default=128)
    parser.add_argument("-n", "--n-gen", type=int, default=64)
    parser.add_argument("-r", "--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--llama-python",
        default=sys.executable,
        help="Python interpreter that has llama-cpp-python (default: this one)",
    )
    args = parser.parse_args()

    version = llama_cpp_version(args.llama_python)
    if version is None:
        return 0

    from localllm.runtime.catalog import catalog, ensure_model

    paths = [str(ensure_model(name)) for name in (args.models or catalog())]
    print(f"llama-cpp-python {version}, {args.threads} threads, {args.repetitions} repetitions, alternating A/B")
    print(f"{'model':<42} {'test':>6} {'ours t/s':>18} {'llama.cpp t/s':>18} {'ratio':>7}")
    for path in paths:
        for line in compare(path, args, args.llama_python):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
