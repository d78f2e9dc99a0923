"""`localllm bench`: prompt-processing and token-generation speed, in the manner of llama-bench.

A `pp<N>` test runs an N-token prompt through a fresh context in one forward call; a `tg<N>`
test decodes N tokens one at a time after a single BOS token, each step feeding the greedy
token of the last. With a draft (`draft=`, as `LLM` takes it), a `tg<N>+<drafter>` test
decodes the same N greedy tokens by speculative decoding (the same token stepper generation
uses: drafts verified in one forward each, an adaptive draft length) and reports its
acceptance. Every test runs once unmeasured, then `repetitions` timed times; the speed of each
repetition is tokens / seconds and the table shows their mean and sample standard deviation.

Besides speed, each model reports its load time, the time from starting to load it to the first
generated token of a short prompt (kernels come from Numba's cache when it is warm), its peak
resident memory, and for token generation the memory-bandwidth roofline: decoding one token
reads every weight matrix once, so measured read bandwidth / bytes read per token bounds tg.
"""

from __future__ import annotations

import datetime
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from localllm.errors import InvalidParameterError
from localllm.kernels import cpu as kernels
from localllm.kernels.cpu.bandwidth import read_bandwidth
from localllm.runtime.drafters.frequent_tokens import AUTO
from localllm.runtime.engine import GenerationStats
from localllm.runtime.llm import LLM
from localllm.runtime.profile import OpTimers
from localllm.runtime.sampling import Sampler, SamplingParams
from localllm.runtime.speculative import DEFAULT_DRAFT_MAX

# Enough to exceed every L3 cache this runs on, small enough not to dominate peak memory.
BANDWIDTH_PROBE_BYTES = 512 << 20
FIRST_TOKEN_PROMPT = "Hello"


@dataclass
class BenchResult:
    """One model and test; field names follow llama-bench's JSON where it has them."""

    model_filename: str
    model_type: str
    model_size: int
    model_n_params: int
    n_threads: int
    test: str
    n_prompt: int
    n_gen: int
    test_time: str
    samples_ns: list[int]
    samples_ts: list[float]
    avg_ns: int
    stddev_ns: int
    avg_ts: float
    stddev_ts: float
    load_seconds: float
    first_token_seconds: float
    peak_rss_bytes: int
    weight_bytes_per_token: int
    bandwidth_gbs: float | None = None
    roofline_ts: float | None = None
    roofline_fraction: float | None = None
    op_seconds: dict[str, float] = field(default_factory=dict)
    # Speculative rows: the drafter, and the share of drafted tokens the target kept (last run).
    draft: str | None = None
    acceptance_rate: float | None = None
    mean_accepted_length: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def weight_bytes_per_token(gguf_file) -> int:
    """Bytes of weights one decoded token reads: every matrix once, but only one embedding row
    (unless the embedding doubles as the output head, which is then read whole)."""
    tensors = gguf_file.tensors
    embedding = tensors.get("token_embd.weight")
    total = sum(t.nbytes for name, t in tensors.items() if name != "token_embd.weight")
    if embedding is not None:
        tied = "output.weight" not in tensors
        total += embedding.nbytes if tied else embedding.nbytes // max(1, embedding.shape[0])
    return total


def peak_rss_bytes() -> int:
    """The process's peak resident set size since the last `reset_peak_rss`."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> None:
    """Start a new peak-RSS measurement where Linux allows it (clear_refs 5), else keep the old one."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def _model_type(llm: LLM) -> str:
    """Architecture and the most common matrix type, like llama-bench's "llama 1B Q4_K - Medium"."""
    counts: dict[str, int] = {}
    for tensor in llm.gguf.tensors.values():
        if len(tensor.shape) == 2:
            counts[tensor.type.name] = counts.get(tensor.type.name, 0) + tensor.nbytes
    main_type = max(counts, key=counts.get) if counts else "?"
    return f"{llm.model.hparams.arch} {main_type}"


def _tokens(llm: LLM, n: int, seed: int = 0) -> list[int]:
    """n ids drawn uniformly from the vocabulary (llama-bench also times random tokens)."""
    return np.random.default_rng(seed).integers(0, llm.n_vocab, size=n).tolist()


def _run_prompt(llm: LLM, ids: list[int]) -> None:
    llm.reset()
    llm.model.forward(ids, llm.cache)


def _run_generation(llm: LLM, n_gen: int) -> None:
    llm.reset()
    bos = llm.tokenizer.bos_id
    token = bos if bos is not None else 0
    for _ in range(n_gen):
        token = int(np.argmax(llm.model.forward([token], llm.cache)))


def _run_speculative_generation(llm: LLM, n_gen: int, speculation) -> GenerationStats:
    """tg's N greedy tokens after BOS, through the speculative token stepper."""
    llm.reset()
    bos = llm.tokenizer.bos_id
    context = [bos if bos is not None else 0]
    logits = llm.model.forward(context, llm.cache)
    stats = GenerationStats()
    sampler = Sampler(SamplingParams(temperature=0.0), llm.n_vocab)
    steps = speculation.steps(llm.model, llm.cache, sampler, context, logits, stats, limit=n_gen)
    for produced, _ in enumerate(steps, 1):
        if produced == n_gen:
            break
    steps.close()
    return stats


def _timed(run: Callable[[], None], repetitions: int) -> list[int]:
    run()
    samples = []
    for _ in range(repetitions):
        started = time.perf_counter_ns()
        run()
        samples.append(time.perf_counter_ns() - started)
    return samples


def bench_model(
    model: str | os.PathLike,
    n_prompt: int,
    n_gen: int,
    repetitions: int,
    threads: int,
    bandwidth_gbs: float | None,
    profile: bool = False,
    draft=None,
    draft_max: int = DEFAULT_DRAFT_MAX,
    device: str = "cpu",
    draft_vocab: str | os.PathLike = AUTO,
) -> list[BenchResult]:
    """Load `model`, measure its first token, then run its pp and tg tests (and with `draft`, the
    speculative tg test)."""
    reset_peak_rss()
    started = time.perf_counter()
    # Speculative rounds can hold a whole draft beyond the last token kept.
    n_ctx = max(n_prompt, n_gen + 1 + (draft_max if draft is not None else 0), 16)
    llm = LLM(model, n_ctx=n_ctx, threads=threads, draft=draft, draft_max=draft_max, draft_vocab=draft_vocab,
              device=device)  # fmt: skip
    with llm:
        load_seconds = time.perf_counter() - started
        llm.model.forward(llm.tokenize(FIRST_TOKEN_PROMPT), llm.cache)
        first_token_seconds = time.perf_counter() - started
        per_token = weight_bytes_per_token(llm.gguf)
        common = dict(
            model_filename=str(llm.path),
            model_type=_model_type(llm),
            model_size=llm.path.stat().st_size,
            model_n_params=sum(int(np.prod(t.shape)) for t in llm.gguf.tensors.values()),
            n_threads=threads,
            load_seconds=load_seconds,
            first_token_seconds=first_token_seconds,
            weight_bytes_per_token=per_token,
        )
        tests = []
        if n_prompt > 0:
            prompt = _tokens(llm, n_prompt)
            tests.append((f"pp{n_prompt}", n_prompt, 0, lambda: _run_prompt(llm, prompt)))
        if n_gen > 0:
            tests.append((f"tg{n_gen}", 0, n_gen, lambda: _run_generation(llm, n_gen)))
        speculation = llm.speculation(draft, llm.cache_spec) if n_gen > 0 and draft is not None else None
        speculative_runs: list[GenerationStats] = []
        if speculation is not None:
            drafter = "lookup" if speculation.drafter.name == "lookup" else "draft"

            def run_speculative():
                speculative_runs.append(_run_speculative_generation(llm, n_gen, speculation))

            tests.append((f"tg{n_gen}+{drafter}", 0, n_gen, run_speculative))
        results = []
        for name, test_prompt, test_gen, run in tests:
            test_time = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            samples_ns = _timed(run, repetitions)
            op_seconds = {}
            if profile:
                with OpTimers() as timers:
                    run()
                op_seconds = timers.per_token(test_prompt + test_gen)
            n_tokens = test_prompt + test_gen
            speeds = [n_tokens * 1e9 / ns for ns in samples_ns]
            result = BenchResult(
                **common,
                test=name,
                n_prompt=test_prompt,
                n_gen=test_gen,
                test_time=test_time,
                samples_ns=samples_ns,
                samples_ts=speeds,
                avg_ns=int(statistics.fmean(samples_ns)),
                stddev_ns=int(statistics.stdev(samples_ns)) if len(samples_ns) > 1 else 0,
                avg_ts=statistics.fmean(speeds),
                stddev_ts=statistics.stdev(speeds) if len(speeds) > 1 else 0.0,
                peak_rss_bytes=0,
                op_seconds=op_seconds,
            )
            if "+" in name:
                spec = speculative_runs[-1].speculative
                result.draft = "lookup" if drafter == "lookup" else Path(llm.draft).name
                result.acceptance_rate = spec.acceptance_rate
                result.mean_accepted_length = spec.mean_accepted_length
            # One decode step's weight bytes bound plain decoding only: speculation verifies
            # several tokens per read of the weights.
            elif test_gen and bandwidth_gbs:
                result.bandwidth_gbs = bandwidth_gbs
                result.roofline_ts = bandwidth_gbs * 1e9 / per_token
                result.roofline_fraction = result.avg_ts / result.roofline_ts
            results.append(result)
    peak = peak_rss_bytes()
    for result in results:
        result.peak_rss_bytes = peak
    return results


def run_bench(
    models: Sequence[str | os.PathLike],
    n_prompt: int = 128,
    n_gen: int = 64,
    repetitions: int = 3,
    threads: int | None = None,
    measure_bandwidth: bool = True,
    profile: bool = False,
    progress: Callable[[str], None] | None = None,
    draft=None,
    draft_max: int = DEFAULT_DRAFT_MAX,
    device: str = "cpu",
    draft_vocab: str | os.PathLike = AUTO,
) -> list[BenchResult]:
    """Every model's pp and tg results, in order, on `device`; host read bandwidth is measured
    once, first, on the CPU only (it bounds no GPU's decoding). Each timed forward ends with
    the logits back in host memory, so GPU times include the wait for the device."""
    if not models:
        raise InvalidParameterError("bench needs at least one model")
    for name, value, low in (("-p", n_prompt, 0), ("-n", n_gen, 0), ("-r", repetitions, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidParameterError(f"{name} must be an integer >= {low}, got {value!r}")
    if n_prompt == 0 and n_gen == 0:
        raise InvalidParameterError("nothing to measure: -p and -n are both 0")
    if threads is None:
        threads = kernels.get_threads()
    kernels.set_threads(threads)
    bandwidth = None
    if measure_bandwidth and device == "cpu":
        if progress:
            progress("measuring memory read bandwidth")
        bandwidth = read_bandwidth(BANDWIDTH_PROBE_BYTES)
    results = []
    for model in models:
        if progress:
            progress(f"benchmarking {model}")
        results += bench_model(
            model, n_prompt, n_gen, repetitions, threads, bandwidth, profile, draft, draft_max, device, draft_vocab
        )
    return results
