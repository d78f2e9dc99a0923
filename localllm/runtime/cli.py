"""The `localllm` command line.

Each subcommand is one `_cmd_*` function taking the parsed arguments and returning an exit
status, plus one entry in `_SUBCOMMANDS` that declares its arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from localllm.errors import InvalidParameterError, LocalLLMError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def _console(stderr: bool = False, **options):
    from rich.console import Console

    class PipeAwareConsole(Console):
        # rich exits with status 1 when the reader of a pipe goes away; let main() end with
        # SIGPIPE's status instead, as for every other write.
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError

    return PipeAwareConsole(stderr=stderr, highlight=False, **options)


def _cmd_pull(args: argparse.Namespace) -> int:
    from localllm.runtime.catalog import lookup, pull

    # Validate every name first so a typo in the last one does not waste a long download.
    for name in args.names:
        lookup(name)
    for name in args.names:
        path = pull(name, progress=not args.quiet)
        print(f"{name}: {path}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from rich import box
    from rich.filesize import decimal
    from rich.table import Table

    from localllm.runtime.catalog import list_models, store_dir

    table = Table(title=f"models in {store_dir()}  (* = default)", box=box.SIMPLE_HEAD)
    table.add_column("name", no_wrap=True)
    table.add_column("arch", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("present", no_wrap=True)
    table.add_column("file", overflow="fold")
    for listing in list_models():
        entry = listing.entry
        table.add_row(
            f"{entry.name}{' *' if entry.default else ''}",
            entry.architecture,
            entry.kind,
            decimal(entry.bytes),
            "yes" if listing.present else "no",
            listing.path.name,
        )
    # A pipe or file gets the full width; rich would otherwise fold the file names at 80 columns.
    (_console() if sys.stdout.isatty() else _console(width=200)).print(table)
    return 0


def _cmd_rm(args: argparse.Namespace) -> int:
    from localllm.runtime.catalog import remove

    print(f"removed {remove(args.name)}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from localllm.runtime.catalog import default_model, ensure_model, entry_for_path
    from localllm.runtime.info import model_info, render_info

    spec = _cache_spec(args) if args.cache else None
    path = ensure_model(args.model or default_model())
    info = model_info(path, cache=spec)
    entry = entry_for_path(path)
    info["kind"] = entry.kind if entry is not None else None
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        render_info(info, _console())
    return 0


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt in (None, "-"):
        if args.prompt is None and sys.stdin.isatty():
            raise InvalidParameterError("no prompt: give PROMPT, or `-` to read it from stdin")
        return sys.stdin.read()
    return args.prompt


# (flag, SamplingParams field) of each sampling flag, so that errors name the flag.
_SAMPLING_FLAGS = (
    ("--temp", "temperature"),
    ("--top-k", "top_k"),
    ("--top-p", "top_p"),
    ("--min-p", "min_p"),
    ("--repeat-penalty", "repeat_penalty"),
    ("--seed", "seed"),
)
UNTIL_THE_END = -1
RANDOM_SEED = -1


def _generation_options(args: argparse.Namespace) -> dict:
    """The generation keyword arguments the flags ask for, each validated, before any model loads."""
    from localllm.runtime.sampling import SamplingParams

    if args.seed == RANDOM_SEED:
        args.seed = secrets.randbits(32)
    options = {}
    for flag, name in _SAMPLING_FLAGS:
        value = getattr(args, name if name != "temperature" else "temp")
        if value is None:
            continue
        try:
            SamplingParams(**{name: value})
        except InvalidParameterError as error:
            raise InvalidParameterError(f"{flag}{str(error).removeprefix(name)}") from None
        options[name] = value
    if args.max_tokens == UNTIL_THE_END:
        options["max_tokens"] = None
    elif args.max_tokens > 0:
        options["max_tokens"] = args.max_tokens
    else:
        raise InvalidParameterError(
            f"-n/--max-tokens must be a positive number of tokens, or -1 for until the reply or the "
            f"context ends, got {args.max_tokens}"
        )
    options["stop"] = args.stop or ()
    if any(not stop for stop in options["stop"]):
        raise InvalidParameterError("--stop needs a non-empty text")
    return options


def _add_draft_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--draft",
        metavar="MODEL|auto|lookup",
        help="speculative decoding, same output: draft with a model sharing this one's vocabulary, the "
        "catalog's draft for this model (auto; lookup when it has none), or prompt lookup (no model)",
    )
    parser.add_argument(
        "--draft-max",
        type=int,
        metavar="K",
        help="with --draft: most tokens drafted per round; each round's length is measured to pay (default 8)",
    )
    parser.add_argument(
        "--draft-vocab",
        metavar="auto|full|TABLE",
        help="with a draft model: its output head scores only the shipped frequent-token table's tokens "
        "(auto, the default, where its vocabulary has one), every token (full), or a table file's",
    )


def _draft_options(args: argparse.Namespace) -> dict:
    """LLM's speculative decoding keywords from --draft and --draft-max, checked before any
    model loads (a draft model is only looked up in the catalog or on disk here)."""
    from localllm.runtime.catalog import lookup
    from localllm.runtime.drafters.frequent_tokens import FULL
    from localllm.runtime.llm import AUTO, LOOKUP
    from localllm.runtime.speculative import DEFAULT_DRAFT_MAX, MAX_DRAFT

    if args.draft is None:
        for given, name in ((args.draft_max, "--draft-max"), (args.draft_vocab, "--draft-vocab")):
            if given is not None:
                raise InvalidParameterError(f"{name} needs --draft")
        return {}
    draft_max = DEFAULT_DRAFT_MAX if args.draft_max is None else args.draft_max
    if not 1 <= draft_max <= MAX_DRAFT:
        raise InvalidParameterError(f"--draft-max must be between 1 and {MAX_DRAFT} tokens, got {draft_max}")
    if args.draft not in (AUTO, LOOKUP) and not Path(args.draft).is_file():
        try:
            lookup(args.draft)
        except LocalLLMError as error:
            raise InvalidParameterError(f"--draft: {error}; or give {AUTO}, {LOOKUP} or a .gguf path") from None
    options = {"draft": args.draft, "draft_max": draft_max}
    if args.draft_vocab is not None:
        if args.draft_vocab not in (AUTO, FULL) and not Path(args.draft_vocab).is_file():
            raise InvalidParameterError(f"--draft-vocab: no table file {args.draft_vocab}; or give {AUTO} or {FULL}")
        options["draft_vocab"] = args.draft_vocab
    return options


def _check_context_and_threads(args: argparse.Namespace) -> None:
    from localllm.kernels.cpu.threads import max_threads

    if args.ctx <= 0:
        raise InvalidParameterError(f"--ctx must be a positive number of tokens, got {args.ctx}")
    if args.threads != "auto" and not 1 <= args.threads <= max_threads():
        raise InvalidParameterError(
            f"--threads must be between 1 and {max_threads()} (this machine's thread pool), got {args.threads}"
        )


def _threads(text: str) -> int | str:
    """--threads: a count, or `auto` to let the kernels follow the cores that are free."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {text!r}") from None


def _add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=_threads,
        default="auto",
        metavar="N|auto",
        help="compute threads; auto (the default) uses the cores other programs leave free",
    )


def _add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where the model runs: cpu (the default) or a CUDA GPU (needs the gpu extra: torch and triton)",
    )


def _check_device(args: argparse.Namespace) -> None:
    """A --device that cannot be used here is a one-line error before any model loads."""
    from localllm.runtime.device import get_device

    get_device(args.device)


def _warn_past_training_context(llm, n_ctx: int) -> None:
    trained = llm.model.hparams.n_ctx_train
    if n_ctx > trained:
        print(
            f"localllm: warning: --ctx {n_ctx} exceeds the model's training context of {trained} tokens; "
            "expect worse output past it",
            file=sys.stderr,
            flush=True,
        )


def _cache_spec(args: argparse.Namespace):
    """The CacheSpec of --cache, --ctx, --sinks, --window and --kv-dtype, built before the model
    loads so that a bad value is a one-line error at once."""
    from localllm.runtime.cache import CacheSpec

    return CacheSpec(policy=args.cache, n_ctx=args.ctx, sinks=args.sinks, window=args.window, kv_dtype=args.kv_dtype)


def _cache_options(args: argparse.Namespace) -> dict:
    """LLM's cache keywords (see _cache_spec)."""
    spec = _cache_spec(args)
    return {"cache": spec.policy, "sinks": spec.sinks, "window": spec.window, "kv_dtype": spec.kv_dtype}


def _add_cache_arguments(parser: argparse.ArgumentParser, cache_help: str, cache_default: str | None = "full") -> None:
    parser.add_argument("--cache", choices=["full", "sink"], default=cache_default, help=cache_help)
    parser.add_argument(
        "--sinks",
        type=int,
        default=4,
        help="with --cache sink: first tokens kept as attention sinks; 0 is plain window attention (default 4)",
    )
    parser.add_argument("--window", type=int, default=1024, help="with --cache sink: latest tokens kept (default 1024)")
    parser.add_argument(
        "--kv-dtype",
        choices=["f16", "f32"],
        default="f16",
        help="how keys and values are stored (default f16, as llama.cpp)",
    )


def _print_stats(completion, seed: int | None = None, stream=sys.stderr) -> None:
    import resource

    stats = completion.stats
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def rate(value):
        return "n/a" if value is None else f"{value:.2f} tokens/s"

    ttft = "n/a" if stats.time_to_first_token is None else f"{stats.time_to_first_token * 1000:.0f} ms"
    lines = [
        f"load time:        {stats.load_seconds:.2f} s",
        f"prompt:           {stats.prompt_tokens} tokens, {rate(stats.prompt_tokens_per_second)}",
        f"generation:       {stats.completion_tokens} tokens, {rate(stats.tokens_per_second)}",
        f"time to 1st tok:  {ttft}",
        f"stop reason:      {completion.stop_reason}",
        f"peak RSS:         {peak_rss_mib:.0f} MiB",
    ]
    if seed is not None:
        lines.append(f"seed:             {seed}")
    speculative = stats.speculative
    if speculative is not None:
        rate = "n/a" if speculative.acceptance_rate is None else f"{speculative.acceptance_rate:.0%}"
        mean = "n/a" if speculative.mean_accepted_length is None else f"{speculative.mean_accepted_length:.2f}"
        lines += [
            f"draft:            {speculative.drafter}, {speculative.drafted} tokens drafted, "
            f"{speculative.accepted} accepted ({rate}), {mean} per drafting round",
            f"rounds:           {speculative.rounds}, {speculative.drafting_rounds} with a draft",
            f"draft / verify:   {speculative.draft_seconds:.2f} s / {speculative.verify_seconds:.2f} s",
        ]
    print("\n".join(lines), file=stream, flush=True)


def _completion_json(completion, seed: int | None) -> str:
    stats = completion.stats
    timings = stats.as_dict()
    for count in ("prompt_tokens", "completion_tokens"):
        del timings[count]
    return json.dumps(
        {
            "text": completion.text,
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "token_ids": completion.token_ids,
            "stop_reason": str(completion.stop_reason),
            "seed": seed,
            "timings": timings,
        },
        ensure_ascii=False,
    )


@contextlib.contextmanager
def _interrupt_sets(cancel: threading.Event):
    """Ctrl-C sets `cancel` as well as raising KeyboardInterrupt, so that generation stops at
    the next token even where the exception never reaches us (raised inside a library that
    drops it: once seen in CI, a SIGINT that left the generation running to the end)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_interrupt(signum, frame):
        cancel.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _CompileNotice:
    """warm_up's progress on stderr, once loading has taken long enough to be compiling: a cold
    Numba cache, on the first run on a machine (a warm one loads everything in about a second)."""

    QUIET_SECONDS = 2.0

    def __init__(self):
        self._started = time.perf_counter()
        self._announced = False

    def __call__(self, label: str, done: int, total: int) -> None:
        if time.perf_counter() - self._started < self.QUIET_SECONDS:
            return
        if not self._announced:
            print(
                "compiling the CPU kernels (first run only; they are cached for the next runs)",
                file=sys.stderr,
                flush=True,
            )
            self._announced = True
        print(f"  [{done + 1}/{total}] {label}", file=sys.stderr, flush=True)


def _cmd_generate(args: argparse.Namespace) -> int:
    from localllm.runtime.catalog import default_model
    from localllm.runtime.llm import LLM

    if args.chat and args.raw:
        raise InvalidParameterError("--chat and --raw cannot be combined")
    if args.system is not None and args.raw:
        raise InvalidParameterError("--system needs the chat template; drop --raw")
    _check_context_and_threads(args)
    cache = _cache_options(args)
    draft = _draft_options(args)
    _check_device(args)
    cancel = threading.Event()
    options = {**_generation_options(args), "cancel": cancel}
    prompt = _read_prompt(args)
    with (
        LLM(
            args.model or default_model(),
            n_ctx=args.ctx,
            threads=args.threads,
            compile_progress=_CompileNotice(),
            device=args.device,
            **cache,
            **draft,
        ) as llm,
        _interrupt_sets(cancel),
    ):
        if args.cache == "full":
            _warn_past_training_context(llm, args.ctx)
        # As mlx-lm's generate: a model with a chat template is asked in chat form unless --raw.
        chat = args.chat or (not args.raw and llm.has_chat_template)
        if chat:
            messages = [{"role": "system", "content": args.system}] if args.system is not None else []
            messages.append({"role": "user", "content": prompt})
            stream = llm.chat(messages, stream=True, **options)
        else:
            stream = llm.stream(llm.tokenize(prompt, add_bos=not args.no_bos), **options)
        echo = not args.json
        try:
            for chunk in stream:
                if echo and chunk.text:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            cancel.set()
        if cancel.is_set():
            stream.close()
        completion = stream.completion
    if args.json:
        print(_completion_json(completion, args.seed), flush=True)
    elif sys.stdout.isatty() or cancel.is_set():
        print(flush=True)
    if args.verbose or cancel.is_set():
        _print_stats(completion, seed=args.seed)
    if not completion.text.strip() and completion.stop_reason != "cancelled":
        reason = "eos" if not completion.token_ids else str(completion.stop_reason)
        print(
            f"localllm: the model ended its reply at once (stop reason: {reason}); try {'--raw' if chat else '--chat'}",
            file=sys.stderr,
            flush=True,
        )
    return EXIT_INTERRUPTED if cancel.is_set() else 0


def _args_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", metavar="PROMPT", help="the prompt; `-` (or nothing) reads stdin")
    parser.add_argument("-m", "--model", help="catalog name or path to a .gguf file (default: the catalog default)")
    parser.add_argument(
        "-n",
        "--max-tokens",
        type=int,
        default=256,
        help="most tokens to generate; -1: until the reply or the context ends (default 256)",
    )
    parser.add_argument("--temp", type=float, help="temperature; 0 is greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, help="keep the k most likely tokens; 0 disables (default 40)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass; 1 disables (default 0.95)")
    parser.add_argument(
        "--min-p", type=float, help="drop tokens below min-p times the best one's probability (default 0.05)"
    )
    parser.add_argument("--repeat-penalty", type=float, help="penalty for recently used tokens; 1 disables (default 1)")
    parser.add_argument(
        "--seed", type=int, help="random seed, for reproducible sampling; -1: a random one (shown by -v)"
    )
    parser.add_argument("--stop", action="append", metavar="TEXT", help="stop before this text (repeatable)")
    parser.add_argument("--ctx", type=int, default=2048, help="context size in tokens (default 2048)")
    _add_threads_argument(parser)
    _add_device_argument(parser)
    parser.add_argument(
        "--chat",
        action="store_true",
        help="use the chat template even when the file has none (the architecture's built-in one)",
    )
    parser.add_argument("--system", help="system message of the chat")
    parser.add_argument(
        "--raw",
        action="store_true",
        help="plain completion: the prompt as is, no chat template (default when the model has none)",
    )
    parser.add_argument("--no-bos", action="store_true", help="with plain completion, do not add the BOS token")
    _add_draft_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="timings, seed, peak memory and drafting stats on stderr"
    )
    _add_cache_arguments(
        parser,
        "KV cache policy: full (--ctx tokens, then the context is full) or sink "
        "(StreamingLLM: the first --sinks tokens and the latest --window, without end; "
        "default full)",
    )


def _cmd_perplexity(args: argparse.Namespace) -> int:
    from localllm.runtime.catalog import default_model
    from localllm.runtime.llm import LLM
    from localllm.runtime.perplexity import perplexity, streaming_perplexity

    _check_context_and_threads(args)
    cache = _cache_options(args)
    _check_device(args)
    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidParameterError(f"cannot read {args.file}: {error}") from None
    with LLM(
        args.model or default_model(),
        n_ctx=args.ctx,
        threads=args.threads,
        compile_progress=_CompileNotice(),
        kv_dtype=cache["kv_dtype"],
        device=args.device,
    ) as llm:
        if args.cache == "sink":
            result = streaming_perplexity(llm, text, sinks=args.sinks, window=args.window)
        else:
            result = perplexity(llm, text, n_ctx=args.ctx)
    print(
        f"PPL = {result.ppl:.4f} +/- {result.stderr:.5f}  "
        f"({result.n_tokens} tokens scored, {result.tokens_per_second:.1f} tokens/s)"
    )
    return 0


def _args_perplexity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="UTF-8 text file to score")
    parser.add_argument("-m", "--model", help="catalog name or path to a .gguf file (default: the catalog default)")
    parser.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    _add_cache_arguments(
        parser,
        "full: llama.cpp's chunks of --ctx tokens (the default); sink: StreamingLLM's "
        "evaluation, the whole file fed in order through the first --sinks tokens and "
        "the latest --window, each token scored from the cache before it",
    )
    _add_threads_argument(parser)
    _add_device_argument(parser)


def _cmd_bench(args: argparse.Namespace) -> int:
    from rich import box
    from rich.filesize import decimal
    from rich.table import Table

    from localllm.runtime.bench import run_bench
    from localllm.runtime.catalog import default_model, ensure_model

    _check_device(args)
    # Resolve (and pull) every model first so a typo in the last one fails before any timing.
    models = [ensure_model(name) for name in (args.model or [default_model()])]
    draft = _draft_options(args)
    console = _console(stderr=True)
    results = run_bench(
        models,
        n_prompt=args.n_prompt,
        n_gen=args.n_gen,
        repetitions=args.repetitions,
        threads=args.threads,
        profile=args.verbose,
        progress=None if args.json else lambda text: console.print(f"[dim]{text}[/dim]"),
        device=args.device,
        **draft,
    )
    if args.json:
        print(json.dumps([result.as_dict() for result in results], indent=2))
        return 0
    table = Table(box=box.MARKDOWN)
    for column in (
        "model",
        "type",
        "size",
        "threads",
        "test",
        "t/s",
        "load s",
        "1st token s",
        "peak RSS",
        "tg roofline",
    ):
        table.add_column(column, justify="left" if column in ("model", "type", "test") else "right")
    for result in results:
        roofline = ""
        test = result.test
        if result.acceptance_rate is not None:
            test += f" ({result.acceptance_rate:.0%} accepted)"
        if result.roofline_ts is not None:
            roofline = f"{result.roofline_ts:.1f} t/s ({result.bandwidth_gbs:.1f} GB/s), {result.roofline_fraction:.0%}"
        table.add_row(
            Path(result.model_filename).name,
            result.model_type,
            decimal(result.model_size),
            str(result.n_threads),
            test,
            f"{result.avg_ts:.2f} ± {result.stddev_ts:.2f}",
            f"{result.load_seconds:.2f}",
            f"{result.first_token_seconds:.2f}",
            decimal(result.peak_rss_bytes),
            roofline,
        )
    # Ten columns do not fit 80 characters; a pipe or file gets the full width instead of wrapping.
    wide = _console() if sys.stdout.isatty() else _console(width=200)
    wide.print(table)
    if args.verbose:
        for result in results:
            wide.print(f"{Path(result.model_filename).name} {result.test}: ms per token by op")
            ops = Table(box=box.SIMPLE_HEAD)
            ops.add_column("op")
            ops.add_column("ms/token", justify="right")
            ops.add_column("share", justify="right")
            total = sum(result.op_seconds.values())
            for label, seconds in result.op_seconds.items():
                ops.add_row(label, f"{seconds * 1000:.3f}", f"{seconds / total:.1%}" if total else "")
            wide.print(ops)
    return 0


def _args_bench(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-m",
        "--model",
        action="append",
        help="catalog name or .gguf path; repeat for several models (default: the catalog default)",
    )
    parser.add_argument(
        "-p", "--n-prompt", type=int, default=128, help="prompt tokens of the pp test; 0 skips it (default 128)"
    )
    parser.add_argument(
        "-n", "--n-gen", type=int, default=64, help="generated tokens of the tg test; 0 skips it (default 64)"
    )
    parser.add_argument("-r", "--repetitions", type=int, default=3, help="timed repetitions of each test (default 3)")
    _add_draft_arguments(parser)
    parser.add_argument("--threads", type=int, help="compute threads (default: all cores)")
    _add_device_argument(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per model and test")
    parser.add_argument("-v", "--verbose", action="store_true", help="also time every op of one extra run of each test")


def _args_pull(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="+", metavar="NAME", help="catalog model name")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display")


def _args_rm(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="catalog model name")


def _args_info(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", metavar="MODEL", nargs="?", help="catalog name or path to a .gguf file (default: the catalog default)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--ctx", type=int, default=4096, help="with --cache full: context size (default 4096)")
    _add_cache_arguments(parser, "also show what a KV cache of this policy costs in total", cache_default=None)


def _cmd_chat(args: argparse.Namespace) -> int:
    from localllm.runtime.catalog import default_model
    from localllm.tui import chat
    from localllm.tui.settings import ChatSettings

    _check_context_and_threads(args)
    cache = _cache_options(args)
    draft = _draft_options(args)
    if args.max_tokens == UNTIL_THE_END:
        max_tokens = None
    elif args.max_tokens > 0:
        max_tokens = args.max_tokens
    else:
        raise InvalidParameterError(
            f"-n/--max-tokens must be a positive number of tokens, or -1 for until the model ends its reply, "
            f"got {args.max_tokens}"
        )
    if args.temp is not None and not args.temp >= 0:
        raise InvalidParameterError(f"--temp must be >= 0, got {args.temp}")
    sampling = {} if args.temp is None else {"temperature": args.temp}
    settings = ChatSettings(system=args.system or "", max_tokens=max_tokens, **sampling)
    _check_device(args)
    cancel = threading.Event()
    with _interrupt_sets(cancel):
        chat(
            args.model or default_model(),
            n_ctx=args.ctx,
            threads=args.threads,
            cache={**cache, **draft, "device": args.device},
            inline=args.inline,
            settings=settings,
            cancel=cancel,
            compile_progress=_CompileNotice(),
        )
    return EXIT_INTERRUPTED if cancel.is_set() else 0


def _args_chat(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", help="catalog name or path to a .gguf file (default: the catalog default)")
    parser.add_argument("--system", help="system prompt of new conversations")
    parser.add_argument("--temp", type=float, help="temperature of new conversations; 0 is greedy (default 0.8)")
    parser.add_argument(
        "-n",
        "--max-tokens",
        type=int,
        default=1024,
        help="most tokens of a reply in new conversations; -1: until the model ends it (default 1024)",
    )
    parser.add_argument("--ctx", type=int, default=4096, help="with --cache full: context size (default 4096)")
    _add_cache_arguments(
        parser,
        "KV cache of conversations: sink (the default) keeps the first --sinks tokens and "
        "the latest --window, so a conversation never runs out of room; full stops at --ctx",
        cache_default="sink",
    )
    _add_draft_arguments(parser)
    _add_threads_argument(parser)
    _add_device_argument(parser)
    parser.add_argument(
        "--inline", action="store_true", help="draw the app below the shell prompt instead of on the whole screen"
    )


def _cmd_quantize(args: argparse.Namespace) -> int:
    from rich.filesize import decimal

    from localllm.runtime.catalog import ensure_model
    from localllm.runtime.quantize import quantize, target_of

    # An unknown type fails before a catalog model is pulled for nothing.
    target_of(args.type)
    source = ensure_model(args.input)
    with _quantize_progress(not args.quiet) as report:
        plans = quantize(source, args.output, args.type, progress=report)
    converted = sum(p.converted for p in plans)
    written = sum(p.nbytes for p in plans)
    print(f"{args.output}: {len(plans)} tensors, {converted} converted, {decimal(written)} of tensor data")
    return 0


@contextlib.contextmanager
def _quantize_progress(enabled: bool):
    """A progress callback for quantize: live bars on a terminal, a line per tenth of the bytes
    elsewhere (a log or a pipe), nothing when not `enabled`."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.filesize import decimal
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        shown = [-1]

        def lines(done: int, n: int, written: int, total: int) -> None:
            tenths = written * 10 // max(total, 1)
            if tenths > shown[0]:
                shown[0] = tenths
                print(
                    f"quantize: {done}/{n} tensors, {decimal(written)} of {decimal(total)}", file=sys.stderr, flush=True
                )

        yield lines
        return
    columns = (TextColumn("quantizing"), BarColumn(), DownloadColumn(), TextColumn("{task.fields[tensors]}"))
    with Progress(*columns, TimeElapsedColumn(), console=console) as display:
        task = display.add_task("quantizing", total=None, tensors="")

        def bars(done: int, n: int, written: int, total: int) -> None:
            display.update(task, completed=written, total=total, tensors=f"{done}/{n} tensors")

        yield bars


def _args_quantize(parser: argparse.ArgumentParser) -> None:
    from localllm.runtime.quantize import TARGETS

    parser.add_argument("input", help="catalog name or path to a .gguf file")
    parser.add_argument("output", help="the .gguf file to write (written whole, then renamed into place)")
    parser.add_argument("--type", required=True, help=f"block format of the weights: {', '.join(TARGETS)}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display")


_SUBCOMMANDS: list[
    tuple[
        str,
        str,
        Callable[[argparse.ArgumentParser], None] | None,
        Callable[[argparse.Namespace], int],
    ]
] = [
    ("pull", "download and verify catalog models", _args_pull, _cmd_pull),
    ("list", "show the catalog and which models are in the store", None, _cmd_list),
    ("rm", "delete a model from the store", _args_rm, _cmd_rm),
    ("info", "describe a model: hyperparameters, tokenizer, tensor types", _args_info, _cmd_info),
    ("generate", "generate text from a prompt, streamed to stdout", _args_generate, _cmd_generate),
    (
        "perplexity",
        "perplexity of a text file, as llama.cpp's perplexity tool computes it",
        _args_perplexity,
        _cmd_perplexity,
    ),
    ("bench", "prompt processing and generation speed, like llama-bench", _args_bench, _cmd_bench),
    ("chat", "chat in a terminal app (a line-by-line REPL without a terminal)", _args_chat, _cmd_chat),
    (
        "quantize",
        "convert a model's weights to another block format, as llama-quantize does",
        _args_quantize,
        _cmd_quantize,
    ),
]


class _OneLineErrors(argparse.ArgumentParser):
    """Usage errors as one line, like every other error, pointing at --help for the details."""

    def error(self, message: str):
        print(f"localllm: error: {' '.join(message.split())} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(EXIT_ERROR)


def build_parser() -> argparse.ArgumentParser:
    from localllm import __version__

    parser = _OneLineErrors(prog="localllm", description="Local LLM inference from GGUF files.")
    parser.add_argument("--version", action="version", version=f"localllm {__version__}")
    debug_help = "show full tracebacks for errors"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    # Also accepted after the subcommand; SUPPRESS keeps the subparser from resetting it.
    common = _OneLineErrors(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, add_arguments, handler in _SUBCOMMANDS:
        sub = commands.add_parser(name, help=help_text, description=help_text, parents=[common])
        if add_arguments is not None:
            add_arguments(sub)
        sub.set_defaults(handler=handler)
    return parser


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        text = f"{exc.strerror}{where}"
    elif isinstance(exc, MemoryError):
        text = f"out of memory ({exc})" if str(exc) else "out of memory"
    else:
        text = str(exc)
    text = " ".join(text.split())
    return text or type(exc).__name__


def _quiet_broken_pipe() -> int:
    """The reader of stdout went away (`| head`): end quietly with SIGPIPE's status, as Unix
    tools do. stdout is pointed at /dev/null so the interpreter's final flush cannot fail too."""
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.handler(args)
        sys.stdout.flush()
        return status
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except (LocalLLMError, OSError, MemoryError) as exc:
        if args.debug:
            traceback.print_exc()
        with contextlib.suppress(OSError):
            print(f"localllm: error: {_one_line(exc)}", file=sys.stderr, flush=True)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
