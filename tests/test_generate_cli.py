"""`localllm generate`, run as a real subprocess on the real models."""

import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from localllm.runtime.llm import LLM

from conftest import comparable_greedy, load_reference
from test_cli import is_progress

SMOLLM = "smollm2-135m-instruct"
PROMPT = "The capital of France is"
# Greedy decoding counts on for thousands of tokens: a generation that is still running when
# the test interrupts it, whichever way near-ties fall.
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"


def run_generate(*args, stdin: str | None = None, timeout: float = 300):
    """`localllm generate` as plain completion (--raw) unless the arguments ask for --chat."""
    mode = [] if "--chat" in args else ["--raw"]
    return subprocess.run(
        [sys.executable, "-m", "localllm.runtime.cli", "generate", *mode, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(result, fragment: str):
    assert result.returncode == 2, result
    lines = [line for line in result.stderr.strip().splitlines() if not is_progress(line)]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("localllm: error: ")
    assert fragment in lines[0]


@pytest.fixture(scope="module")
def smollm(model_path):
    with LLM(model_path(SMOLLM)) as llm:
        yield llm


@pytest.fixture(scope="module")
def greedy_json(model_path):
    result = run_generate("-m", SMOLLM, "-n", "12", "--temp", "0", "--json", PROMPT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_streamed_greedy_text_equals_the_python_api(smollm):
    result = run_generate("-m", SMOLLM, "-n", "32", "--temp", "0", PROMPT)
    assert result.returncode == 0, result.stderr
    expected = smollm.generate(PROMPT, temperature=0, max_tokens=32)
    assert expected.text
    assert result.stdout == expected.text


def test_greedy_tokens_equal_llama_cpp_up_to_its_first_near_tie(greedy_json):
    case = next(c for c in load_reference(SMOLLM)["cases"] if c["text"] == PROMPT)
    expected = comparable_greedy(SMOLLM, case)
    assert len(expected) >= 4
    assert greedy_json["token_ids"][: len(expected)] == expected


def test_json_output_parses_and_its_counts_add_up(smollm, greedy_json):
    data = greedy_json
    assert data["stop_reason"] in ("stop", "length")
    assert data["completion_tokens"] == len(data["token_ids"]) == 12
    assert data["prompt_tokens"] == len(smollm.tokenize(PROMPT))
    assert data["text"] == smollm.detokenize(data["token_ids"])
    timings = data["timings"]
    assert timings["decode_tokens"] == data["completion_tokens"] - 1
    assert 0 < timings["time_to_first_token"] <= timings["total_seconds"]
    assert timings["tokens_per_second"] > 0 and timings["prompt_tokens_per_second"] > 0


def test_prompt_from_stdin(greedy_json):
    result = run_generate("-m", SMOLLM, "-n", "12", "--temp", "0", "--json", "-", stdin=PROMPT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["token_ids"] == greedy_json["token_ids"]


def test_stop_string_split_across_tokens_is_not_printed(smollm, greedy_json):
    pieces = [smollm.detokenize([t]) for t in greedy_json["token_ids"]]
    boundary = len(pieces[0]) + len(pieces[1])
    full = greedy_json["text"]
    stop = full[boundary - 2 : boundary + 1]
    assert full.find(stop) == boundary - 2
    result = run_generate("-m", SMOLLM, "-n", "12", "--temp", "0", "--stop", stop, PROMPT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == full[: boundary - 2]


def test_same_seed_same_output_across_processes():
    args = ("-m", SMOLLM, "-n", "8", "--temp", "1", "--top-k", "0", "--min-p", "0", "--seed", "1234", "--json", PROMPT)
    first, second = run_generate(*args), run_generate(*args)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert json.loads(first.stdout)["token_ids"] == json.loads(second.stdout)["token_ids"]


def test_verbose_reports_stats_on_stderr():
    result = run_generate("-m", SMOLLM, "-n", "4", "--temp", "0", "-v", PROMPT)
    assert result.returncode == 0, result.stderr
    for label in ("load time", "prompt:", "generation:", "time to 1st tok", "peak RSS"):
        assert label in result.stderr
    assert re.search(r"generation:\s+4 tokens", result.stderr)


def test_missing_model_file(tmp_path):
    assert_one_line_error(run_generate("-m", str(tmp_path / "absent.gguf"), PROMPT), "absent.gguf")


def test_corrupt_model_file(tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(200))
    assert_one_line_error(run_generate("-m", str(corrupt), PROMPT), "corrupt.gguf")


def test_negative_temperature():
    assert_one_line_error(run_generate("-m", SMOLLM, "--temp", "-1", PROMPT), "--temp must be >= 0")


def test_prompt_longer_than_context():
    result = run_generate("-m", SMOLLM, "--ctx", "4", PROMPT)
    assert_one_line_error(result, "but the context holds 4")


def test_sigint_stops_generation_with_stats_and_exit_130():
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "localllm.runtime.cli",
            "generate",
            "--raw",
            "-m",
            SMOLLM,
            "-n",
            "-1",
            "--temp",
            "0",
            COUNTING,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], 120)
        assert ready, "no output within 120 s"
        first = os.read(process.stdout.fileno(), 100)
        assert first
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr.decode()
    assert b"Traceback" not in stderr
    assert b"stop reason:      cancelled" in stderr
    assert re.search(rb"generation:\s+\d+ tokens", stderr)


@pytest.mark.slow
def test_chat_writes_a_working_string_reversal_function(model_path, tmp_path):
    result = run_generate(
        "-m", "qwen2.5-coder-1.5b-instruct", "--chat", "--temp", "0", "-n", "300",
        "Write a Python function that reverses a string.",
        timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    code = re.search(r"```python\n(.*?)```", result.stdout, re.DOTALL)
    assert code, result.stdout
    script = tmp_path / "reverse.py"
    script.write_text(
        code.group(1)
        + "\nimport types\n"
        + "functions = [f for f in list(globals().values()) if isinstance(f, types.FunctionType)]\n"
        + "assert any(f('hello, world') == 'dlrow ,olleh' for f in functions), functions\n"
        + "print('reversed')\n"
    )
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and run.stdout.strip().endswith("reversed"), run.stdout + run.stderr
