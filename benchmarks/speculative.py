"""Speculative decoding against plain decoding on a fixed prompt set: tokens/s and ratios.

Run: python benchmarks/speculative.py [--model qwen2.5-coder-1.5b-instruct] [--draft NAME]
     [--tokens 128] [--draft-max 4] [--threads 2] [--prompts code,edit,...] [--rounds N]
     [--llama-speculative PATH] [--llama-lookup PATH]

Every prompt is answered greedily in chat form with EOS banned, so each run generates exactly
--tokens tokens, by each configuration: plain decoding; prompt lookup and the draft model with
a fixed draft length (--draft-max every round); and both with the adaptive draft length (up to
8). The draft model keeps its default head (`draft_vocab="auto"`: FR-Spec's frequent tokens,
where its vocabulary has a shipped table); "draft adapt. full" is the adaptive draft model
scoring every token, for comparison. Configurations alternate within each prompt so that load
on a shared machine falls on all of them alike; with --rounds N the whole set runs N times and
each speed is the tokens over the time of all N runs (ratios to plain within 5% of each other
differ from one round to the next on a shared two-core machine), the accepted / drafted counts
those of the last round. Speed is generated tokens over the time from the end of the prompt's
prefill to the last token, so it includes the draft model's own prefill. Every speculative run
is checked to produce the plain run's tokens.

Where llama.cpp's `llama-speculative` and `llama-lookup` examples are installed (on PATH, or
given), they run in the same alternation on the same files and chat-rendered prompts, greedy,
EOS ignored, with their own default draft settings: the draft model and prompt lookup as
llama.cpp ships them. Their speed is the "decoded ... t/s" they print, which leaves out the
prompt's prefill for both models (ours includes the draft model's). To build them from the
llama.cpp vendored in the llama-cpp-python sdist:

    cmake -S vendor/llama.cpp -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build build --target llama-speculative llama-lookup
"""

import argparse
import os
import re
import shutil
import subprocess
import time

from localllm.runtime.catalog import ensure_model, lookup
from localllm.runtime.llm import LLM

EDITED_CODE = """def parse_config(path):
    settings = {}
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def merge(defaults, overrides):
    merged = dict(defaults)
    for key, value in overrides.items():
        if value is not None:
            merged[key] = value
    return merged
"""

PARAGRAPH = (
    "The Rhine rises in the Swiss Alps, flows north through Lake Constance, turns west along the "
    "German-Swiss border and then north again through the Upper Rhine Plain, where it forms the "
    "border between France and Germany. Below Mainz it cuts through the Rhine Gorge, a UNESCO "
    "World Heritage Site known for its castles and vineyards, before reaching the industrial "
    "Ruhr area and entering the Netherlands, where it splits into several branches that reach "
    "the North Sea near Rotterdam. For centuries it has been one of Europe's busiest waterways."
)

PROMPTS = {
    "code": 'Write the Python function described by this docstring:\n\ndef top_words(text, n):\n    """Return '
    "the n most frequent words of text, lower-cased, as (word, count) pairs sorted by count then "
    'alphabetically."""',
    "edit": "Return this code with one change: rename the function merge to merge_settings. "
    "Reply with the whole code only.\n\n" + EDITED_CODE,
    "chat": "I am planning a weekend trip to the mountains in autumn. What should I pack, and what "
    "should I watch out for?",
    "summary": "Summarise this paragraph in three sentences:\n\n" + PARAGRAPH,
}


def configurations(model, draft: str, draft_max: int) -> dict[str, dict]:
    return {
        "plain": {},
        f"lookup k={draft_max}": {"draft": "lookup", "draft_max": draft_max, "draft_adaptive": False},
        f"draft k={draft_max}": {"draft": draft, "draft_max": draft_max, "draft_adaptive": False},
        "lookup adaptive": {"draft": "lookup", "draft_max": 8},
        "draft adaptive": {"draft": draft, "draft_max": 8},
        "draft adapt. full": {"draft": draft, "draft_max": 8, "draft_vocab": "full"},
    }


def run(llm: LLM, prompt: str, tokens: int):
    no_eos = {token: float("-inf") for token in llm.tokenizer.eos_ids}
    completion = llm.chat([{"role": "user", "content": prompt}], max_tokens=tokens, temperature=0, logit_bias=no_eos)
    stats = completion.stats
    return completion, stats.completion_tokens / (stats.total_seconds - stats.prompt_seconds)


_DECODED = re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds")
_ACCEPTED = re.compile(r"n_accept\s+=\s+(\d+)")
_DRAFTED = re.compile(r"n_drafted\s+=\s+(\d+)")


def run_llama_cpp(binary: str, llm: LLM, draft_path, prompt: str, tokens: int, threads: int) -> tuple[float, str]:
    """Tokens/s of a llama.cpp speculative example on the chat-rendered prompt, and its
    accepted/drafted counts."""
    text = llm.chat_template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
    command = [binary, "-m", str(llm.path), "-p", text, "-n", str(tokens), "--temp", "0", "--ignore-eos"]
    command += ["-t", str(threads), "-c", "1024"]
    if draft_path is not None:
        command += ["-md", str(draft_path), "-td", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=True)
    output = result.stdout + result.stderr
    decoded = _DECODED.search(output)
    if decoded is None:
        raise RuntimeError(f"{binary} printed no decode speed:\n{output[-2000:]}")
    accepted, drafted = _ACCEPTED.search(output), _DRAFTED.search(output)
    note = f"{accepted.group(1)}/{drafted.group(1)}" if accepted and drafted else ""
    return int(decoded.group(1)) / float(decoded.group(2)), note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--draft", help="draft model (default: the catalog's draft for --model)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--draft-max", type=int, default=4, help="draft length of the fixed-length rows")
    parser.add_argument("--threads", default="2")
    parser.add_argument("--prompts", default=",".join(PROMPTS), help="comma-separated subset of " + ",".join(PROMPTS))
    parser.add_argument("--rounds", type=int, default=1, help="passes over the prompts, timed together")
    parser.add_argument("--llama-speculative", default=shutil.which("llama-speculative"), help="llama.cpp's example")
    parser.add_argument("--llama-lookup", default=shutil.which("llama-lookup"), help="llama.cpp's example")
    args = parser.parse_args()
    draft = args.draft or lookup(args.model).draft or "lookup"
    threads = args.threads if args.threads == "auto" else int(args.threads)
    names = args.prompts.split(",")
    cpp_threads = threads if isinstance(threads, int) else (os.cpu_count() or 1)
    llama_cpp_runs = []
    if args.llama_speculative and draft != "lookup":
        llama_cpp_runs.append(("llama-speculative", args.llama_speculative, ensure_model(draft)))
    if args.llama_lookup:
        llama_cpp_runs.append(("llama-lookup", args.llama_lookup, None))

    llms = {}
    try:
        for label, options in configurations(args.model, draft, args.draft_max).items():
            llms[label] = LLM(args.model, n_ctx=1024, threads=threads, **options)
        # Compile and touch every weight page once before anything is timed.
        for llm in llms.values():
            run(llm, "Hi", 4)
        speeds = {label: {} for label in llms}
        notes = {label: {} for label in llms}
        # Seconds per token summed over the rounds: the table's speeds are tokens over total time.
        seconds = {}
        for _ in range(args.rounds):
            for name in names:
                plain_tokens = None
                for label, llm in llms.items():
                    started = time.perf_counter()
                    completion, speed = run(llm, PROMPTS[name], args.tokens)
                    seconds[label, name] = seconds.get((label, name), 0.0) + 1.0 / speed
                    if plain_tokens is None:
                        plain_tokens = completion.token_ids
                    spec = completion.stats.speculative
                    exact = "" if completion.token_ids == plain_tokens else " NOT EXACT"
                    if spec is not None:
                        rate = 0 if spec.acceptance_rate is None else spec.acceptance_rate
                        notes[label][name] = f"{spec.accepted}/{spec.drafted} ({rate:.0%}){exact}"
                    print(f"  {name:8} {label:18} {speed:6.2f} t/s  ({time.perf_counter() - started:.1f} s){exact}")
                for label, binary, draft_path in llama_cpp_runs:
                    speed, note = run_llama_cpp(
                        binary, llms["plain"], draft_path, PROMPTS[name], args.tokens, cpp_threads
                    )
                    seconds[label, name] = seconds.get((label, name), 0.0) + 1.0 / speed
                    notes.setdefault(label, {})[name] = note
                    print(f"  {name:8} {label:18} {speed:6.2f} t/s")
        for (label, name), per_token in seconds.items():
            speeds.setdefault(label, {})[name] = args.rounds / per_token
    finally:
        for llm in llms.values():
            llm.close()

    setting = f"{args.tokens} tokens, greedy, {args.threads} threads, {args.rounds} round(s)"
    print(f"\n{args.model}, draft {draft}, {setting}")
    print(f"{'configuration':18} " + " ".join(f"{name:>24}" for name in names))
    plain = speeds["plain"]
    for label, row in speeds.items():
        cells = []
        for name in names:
            cell = f"{row[name]:.2f} t/s"
            if label != "plain":
                cell += f" {row[name] / plain[name]:.2f}x"
            cells.append(f"{cell:>24}")
        print(f"{label:18} " + " ".join(cells))
    print("\naccepted / drafted")
    for label, row in notes.items():
        if row:
            print(f"{label:18} " + " ".join(f"{row[name]:>24}" for name in names))


if __name__ == "__main__":
    main()
