"""The app's one door into the runtime: load a model, answer a conversation turn as a stream.

A conversation is answered through a runtime `Session`, which keeps its KV cache between
turns so that each turn prefills only its new tokens, and which is saved to a session file
after each turn, so that a reopened conversation (after a restart too) continues from its
cache. Two files are kept per conversation: after the last turn, and before it, which is what
regenerating the last reply or editing the last message continues from. Where no file fits
(a changed system prompt or cache policy, a reply cut by a kill, a file saved with another
model), a new session is started from the stored messages: that turn prefills the whole
conversation, and later turns only what is new. Each conversation's session follows its own
settings: its cache policy, and whether it drafts (speculative decoding with the app's drafter).

Everything here blocks (loading, pulling, generating, saving) and runs in the app's worker
threads; the kernels release the GIL, so the event loop keeps running meanwhile.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from localllm.errors import SessionFileError
from localllm.runtime.cache import CacheSpec
from localllm.runtime.catalog import catalog, entry_for_path, is_present, pull
from localllm.runtime.engine import Generation
from localllm.runtime.llm import LLM
from localllm.runtime.session import Session
from localllm.tui.settings import ChatSettings


@dataclass(frozen=True)
class CacheUsage:
    """What the KV cache holds: `used` of `capacity` entries; under the sink policy the
    capacity is `sinks` + `window` and `evicted` counts the entries shifted out so far."""

    policy: str
    used: int
    capacity: int
    sinks: int
    window: int
    evicted: int


def model_label(model: str | os.PathLike) -> str:
    """How the app names a model: its catalog name (also for the path of its file in the store),
    or the file name of a path."""
    text = os.fspath(model)
    if text in catalog():
        return text
    entry = entry_for_path(Path(text))
    return entry.name if entry is not None else Path(text).name


def needs_pull(model: str | os.PathLike) -> bool:
    """Whether `model` is a catalog name whose file is not in the store yet."""
    text = os.fspath(model)
    return text in catalog() and not Path(text).is_file() and not is_present(catalog()[text])


def pull_model(name: str, progress: Callable[[int, int], None]) -> Path:
    """Fetch a catalog model into the store, reporting `progress(bytes done, bytes in all)`
    (the catalog's own display would draw over the app)."""
    return pull(name, progress=progress)


@dataclass(frozen=True)
class Answer:
    """A reply being generated, and the session it continues."""

    generation: Generation
    session: Session

    def save(self, saved: Path) -> None:
        """Once the generation has ended: write the session to `saved`, keeping the file from
        before this turn as `previous_file(saved)`."""
        saved.parent.mkdir(parents=True, exist_ok=True)
        if saved.exists():
            os.replace(saved, previous_file(saved))
        self.session.save(saved)


def previous_file(saved: Path) -> Path:
    """Where the session file from before the last turn is kept, next to `saved`."""
    return saved.with_name(saved.stem + ".previous" + saved.suffix)


def remove_files(saved: Path) -> None:
    """Delete a conversation's session files."""
    saved.unlink(missing_ok=True)
    previous_file(saved).unlink(missing_ok=True)


def memory_in_use() -> int:
    """Resident memory of this process in bytes (the peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Backend:
    """A loaded model: `reply` answers a conversation, streamed (see the module docstring).

    Loading pulls nothing: call `pull_model` first for a catalog model that is missing.
    `compile_progress(label, done, total)` follows the kernel warm-up (a cold Numba cache
    compiles for tens of seconds); `cache` are LLM's cache, speculative decoding and device
    keywords (cache, sinks, window, kv_dtype, draft, draft_max, device), the defaults of every
    session. One conversation's session is held in memory at a time.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        n_ctx: int | None = None,
        threads: int | str | None = None,
        compile_progress: Callable[[str, int, int], None] | None = None,
        **cache,
    ):
        self.llm = LLM(model, n_ctx=n_ctx, threads=threads, compile_progress=compile_progress, **cache)
        self._session: Session | None = None
        self._key: object = None

    def reply(
        self,
        messages: Sequence[dict],
        settings: ChatSettings,
        *,
        key: object = None,
        saved: Path | None = None,
        cancel=None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Answer:
        """Stream the assistant's answer to `messages` (user and assistant turns, the last one
        the user's) under `settings`. `key` names the conversation; `saved` is its session
        file, read when its session is not the one in memory. Nothing runs until the first
        chunk is asked for; `Answer.save` writes the file once the generation has ended."""
        history = [{"role": "system", "content": settings.system}] if settings.system else []
        history += [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
        options = {"cancel": cancel, "progress": progress, **settings.generation_options()}
        spec = settings.cache_spec(self.llm.cache_spec) or self.llm.cache_spec
        draft = self.llm.draft if settings.draft else None
        session = self._session_for(key, history, saved, spec, draft)
        self._session, self._key = session, key
        return Answer(session.send(messages[-1]["content"], stream=True, **options), session)

    def _session_for(self, key: object, history: list[dict], saved: Path | None, spec: CacheSpec, draft) -> Session:
        """A session whose conversation is `history`, in a cache of `spec`, drafting with `draft`:
        the one in memory, the conversation's file, or a new one that prefills the history."""
        session = self._session
        if session is not None and self._key == key and session.messages == history:
            if session.spec == spec and session.draft == draft:
                return session
        if saved is not None:
            for path in (saved, previous_file(saved)):
                try:
                    session = Session.load(path, self.llm, draft=draft)
                except SessionFileError:
                    # Another model's (kept for it), or damaged.
                    continue
                if session.messages == history and session.spec == spec:
                    return session
                # This model's, for a conversation that has since gone another way or changed
                # its cache.
                path.unlink()
        # The file is missing, another model's, or for other settings: this turn prefills the
        # whole conversation, later ones only what is new.
        return self.llm.session(messages=history, cache=spec, draft=draft)

    def forget(self, key: object) -> None:
        """Drop conversation `key`'s session from memory (the conversation was deleted)."""
        if self._key == key:
            self._session = self._key = None

    def cache_usage(self) -> CacheUsage:
        cache = self._session.cache if self._session is not None else self.llm.cache
        spec = cache.spec
        return CacheUsage(spec.policy, cache.in_use, spec.size, spec.sinks, spec.window, cache.evicted)

    def close(self) -> None:
        self.llm.close()
