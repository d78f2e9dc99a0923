"""`Session`: a conversation that owns its KV cache, so each turn costs only its new tokens.

`session.send(text)` adds the user's message, renders the whole conversation through the chat
template, finds the longest token prefix the cache already holds (everything up to the last
reply, usually), rolls the cache back to it and prefills only the rest. Sessions of one `LLM`
share its weights; each has its own cache, and their generations take turns on the model.

A session file (`save`, `Session.load`) holds the conversation and the cache, so a reopened
conversation continues without prefilling anything again. Format, version 1:

    b"LOCALLLM-SESSION\\n"                    17 bytes
    header length                            8 bytes, unsigned little-endian
    header                                   UTF-8 JSON, described below
    payload                                  payload_bytes bytes

The header is {"format": "localllm-session", "version": 1, "model": {"file", "bytes",
"sha256"}, "cache": {"policy", "n_ctx", "sinks", "window", "kv_dtype", "max_rollback"},
"state": {"n_tokens", "dropped"}, "messages": [...], "tokens": [token ids in the cache],
"layers": [slots held per layer], "payload_bytes": n}. The payload is, layer after layer, the
held slots' keys, values (kv_dtype, shape [held, kv_heads, head_dim]) and positions (int32),
little-endian. Loading checks the format and version, the model file's size and SHA-256, and
that the payload is complete, before anything of the session changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import weakref
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from localllm.errors import InvalidParameterError, SessionFileError
from localllm.runtime.cache import KV_DTYPES, POSITION_DTYPE, CacheSpec
from localllm.runtime.engine import Completion, Generation, GenerationRequest

MAGIC = b"LOCALLLM-SESSION\n"
FORMAT = "localllm-session"
VERSION = 1
_LENGTH = struct.Struct("<Q")
# A header this large is not one this module wrote (it would take minutes to render as chat).
_MAX_HEADER_BYTES = 1 << 30

_hashes: dict[tuple[str, int, int], str] = {}


def model_sha256(path: Path) -> str:
    """SHA-256 of a model file: from the store's `<file>.sha256` record when it matches the
    file's size and mtime, else hashed (once per process and file version)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _hashes:
        return _hashes[key]
    try:
        record = json.loads(path.with_name(path.name + ".sha256").read_text())
        if record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns:
            _hashes[key] = str(record["sha256"])
            return _hashes[key]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    _hashes[key] = digest.hexdigest()
    return _hashes[key]


def _checked_history(messages: Sequence[dict]) -> list[dict]:
    """A copy of a conversation to continue: a system message first if any, then user and
    assistant messages, each with text content."""
    history = []
    for index, message in enumerate(messages):
        role, content = (message.get("role"), message.get("content")) if isinstance(message, dict) else (None, None)
        if role not in ("system", "user", "assistant") or (role == "system" and index) or not isinstance(content, str):
            raise InvalidParameterError(
                f"message {index} must be {{'role': 'user' or 'assistant' (or 'system' first), 'content': text}}"
            )
        history.append({"role": role, "content": content})
    return history


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Session:
    """A conversation with its own KV cache (see the module docstring).

    `cache` is a CacheSpec, a policy name ("full" or "sink", with the LLM's other cache
    settings) or None for the LLM's own. Under "sink" the conversation never runs out of room.
    `options` are default generation options (sampling, max_tokens, stop) for every `send`.
    `messages` continue a conversation held elsewhere (system, user and assistant messages, as
    stored): the first `send` prefills all of them, later ones only what is new.
    `draft` turns on speculative decoding as `LLM(draft=...)` does; a draft model gets a cache of
    its own beside the session's, and keeps it between turns too.
    One conversation is one sequence of turns: `send` again closes a stream still open.
    """

    def __init__(self, llm, system: str | None = None, cache: CacheSpec | str | None = None, draft=None,
                 messages: Sequence[dict] | None = None, **options):  # fmt: skip
        if cache is None:
            spec = llm.cache_spec
        elif isinstance(cache, str):
            spec = replace(llm.cache_spec, policy=cache)
        elif isinstance(cache, CacheSpec):
            spec = cache
        else:
            raise InvalidParameterError(f"cache must be a CacheSpec, a policy name or None, got {type(cache).__name__}")
        GenerationRequest.from_kwargs(options)
        self.llm = llm
        self.options = dict(options)
        self.cache = llm.model.new_cache(spec)
        self.draft = draft
        self._speculation = llm.speculation(draft, spec)
        if messages is not None and system is not None:
            raise InvalidParameterError("give the system prompt either as `system` or in `messages`, not both")
        self._messages: list[dict] = [] if system is None else [{"role": "system", "content": system}]
        if messages is not None:
            self._messages = _checked_history(messages)
        # The token of every entry in the cache, in order: what a new prompt is matched against.
        self._tokens: list[int] = []
        self._running: weakref.ref | None = None

    @property
    def spec(self) -> CacheSpec:
        return self.cache.spec

    @property
    def messages(self) -> list[dict]:
        return [dict(message) for message in self._messages]

    @property
    def cached_tokens(self) -> int:
        return len(self._tokens)

    def send(self, text: str, stream: bool = False, **options) -> Completion | Generation:
        """Answer the user's `text` as the assistant; a Generation of chunks when `stream`.

        The user message and the reply join the conversation once the prompt has been
        processed (a reply cut short, by max_tokens, a stop string or cancelling, joins as it
        was shown). `completion.stats.reused_tokens` counts the prompt tokens the cache already
        held."""
        if not isinstance(text, str):
            raise InvalidParameterError(f"text must be a str, got {type(text).__name__}")
        running = self._running() if self._running is not None else None
        if running is not None:
            running.close()
        messages = [*self._messages, {"role": "user", "content": text}]
        prompt = self.llm.chat_prompt(messages)
        spec = self.spec
        generation = Generation(
            self.llm.model,
            self.llm.tokenizer,
            prompt,
            GenerationRequest.from_kwargs({**self.options, **options}),
            prepare_cache=self._prepare,
            n_ctx=spec.n_ctx if spec.policy == "full" else None,
            lock=self.llm._lock,
            load_seconds=self.llm.load_seconds,
            on_end=lambda completion, cache: self._record(messages, prompt, completion, cache),
            speculation=self._speculation,
        )
        self._running = weakref.ref(generation)
        return generation if stream else generation.run()

    def _prepare(self, prompt: list[int]):
        # At least the last prompt token is fed again: its logits give the first reply token.
        reused = min(_common_prefix(self._tokens, prompt), len(prompt) - 1)
        if reused < self.cache.n_tokens:
            try:
                self.cache.truncate(reused)
            except InvalidParameterError:
                # The entries to keep are gone (evicted past the rollback margin): start over.
                self.cache.clear()
                reused = 0
        self._tokens = self._tokens[:reused]
        return self.cache, reused

    def _record(self, messages: list[dict], prompt: list[int], completion: Completion, cache) -> None:
        self._tokens = (prompt + completion.token_ids)[: cache.n_tokens]
        if cache.n_tokens >= len(prompt):
            self._messages = [*messages, {"role": "assistant", "content": completion.text}]

    # ---- saving and loading ---------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the conversation and its cache to `path` (format: module docstring)."""
        path = Path(path)
        with self.llm._lock:
            layers, chunks = [], []
            for _, keys, values, positions in self.cache.held_arrays():
                layers.append(int(keys.shape[0]))
                chunks.extend((keys, values, positions))
            header = {
                "format": FORMAT,
                "version": VERSION,
                "model": self._model_identity(),
                "cache": {**asdict(self.spec), "max_rollback": self.cache.max_rollback},
                "state": self.cache.state(),
                "messages": self._messages,
                "tokens": self._tokens,
                "layers": layers,
                "payload_bytes": sum(chunk.nbytes for chunk in chunks),
            }
            encoded = json.dumps(header).encode()
            staged = path.with_name(f".{path.name}.{os.getpid()}.partial")
            try:
                with staged.open("wb") as f:
                    f.write(MAGIC)
                    f.write(_LENGTH.pack(len(encoded)))
                    f.write(encoded)
                    for chunk in chunks:
                        f.write(np.ascontiguousarray(chunk, dtype=chunk.dtype.newbyteorder("<")).data)
                os.replace(staged, path)
            finally:
                staged.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike, llm, **options) -> Session:
        """A session continuing the conversation saved at `path`, on `llm` (the same model
        file); `options` are its default generation options."""
        header, payload = _read(Path(path), llm)
        session = cls(llm, cache=_spec_of(header), **{"draft": llm.draft, **options})
        session._apply(header, payload, Path(path).name)
        return session

    def restore(self, path: str | os.PathLike) -> None:
        """Replace this conversation by the one saved at `path`; on any error (another model,
        a truncated or foreign file) the session is left as it was."""
        header, payload = _read(Path(path), self.llm)
        replacement = Session(self.llm, cache=_spec_of(header), draft=self.draft, **self.options)
        replacement._apply(header, payload, Path(path).name)
        with self.llm._lock:
            self.cache, self._messages, self._tokens = replacement.cache, replacement._messages, replacement._tokens
            self._speculation = replacement._speculation

    def _apply(self, header: dict, payload: memoryview, name: str) -> None:
        try:
            self._fill(header, payload)
        except (TypeError, ValueError, KeyError) as error:
            raise SessionFileError(f"{name} has a malformed header ({type(error).__name__})") from None

    def _fill(self, header: dict, payload: memoryview) -> None:
        cache = self.cache
        dtype = KV_DTYPES[cache.spec.kv_dtype].newbyteorder("<")
        arrays, offset = [], 0
        for layer, held in enumerate(header["layers"]):
            shapes = ((held, *cache.keys[layer].shape[1:]), (held, *cache.values[layer].shape[1:]), (held,))
            parts = []
            for shape, part_dtype in zip(shapes, (dtype, dtype, np.dtype(POSITION_DTYPE).newbyteorder("<"))):
                count = int(np.prod(shape))
                size = count * part_dtype.itemsize
                if offset + size > len(payload):
                    raise SessionFileError("session file payload is shorter than its layers say")
                parts.append(np.frombuffer(payload, dtype=part_dtype, count=count, offset=offset).reshape(shape))
                offset += size
            arrays.append(tuple(parts))
        if offset != len(payload):
            raise SessionFileError(f"session file payload has {len(payload) - offset} bytes more than its layers use")
        try:
            cache.restore(header["state"], arrays)
        except InvalidParameterError as error:
            raise SessionFileError(f"session file does not fit this model's cache: {error}") from None
        tokens = header["tokens"]
        if len(tokens) != cache.n_tokens:
            raise SessionFileError(f"session file lists {len(tokens)} tokens for {cache.n_tokens} cache entries")
        self._tokens = [int(token) for token in tokens]
        self._messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in header["messages"]]

    def _model_identity(self) -> dict:
        path = Path(self.llm.path)
        return {"file": path.name, "bytes": path.stat().st_size, "sha256": model_sha256(path)}


def _spec_of(header: dict) -> CacheSpec:
    try:
        return CacheSpec(**{key: header["cache"][key] for key in ("policy", "n_ctx", "sinks", "window", "kv_dtype")})
    except KeyError:
        raise SessionFileError("session file has an incomplete cache description") from None
    except InvalidParameterError as error:
        raise SessionFileError(f"session file has an invalid cache: {error}") from None


def _read(path: Path, llm) -> tuple[dict, memoryview]:
    """The checked header and the payload of a session file."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SessionFileError(f"cannot read session file {path}: {error.strerror}") from None
    name = path.name
    if not data.startswith(MAGIC):
        raise SessionFileError(f"{name} is not a localllm session file")
    start = len(MAGIC) + _LENGTH.size
    if len(data) < start:
        raise SessionFileError(f"{name} is truncated")
    (header_bytes,) = _LENGTH.unpack_from(data, len(MAGIC))
    if header_bytes > _MAX_HEADER_BYTES or start + header_bytes > len(data):
        raise SessionFileError(f"{name} is truncated (its header is incomplete)")
    try:
        header = json.loads(data[start : start + header_bytes])
        version = header["version"]
        if header.get("format") != FORMAT:
            raise SessionFileError(f"{name} is not a localllm session file")
        if version != VERSION:
            raise SessionFileError(f"{name} is session format version {version}; this localllm reads version {VERSION}")
        model, payload_bytes = header["model"], int(header["payload_bytes"])
        missing = [key for key in ("cache", "state", "layers", "tokens", "messages") if key not in header]
        if missing or not isinstance(model, dict) or not isinstance(header["cache"], dict):
            raise KeyError(missing)
    except (ValueError, KeyError, TypeError):
        raise SessionFileError(f"{name} has a malformed header") from None
    payload = memoryview(data)[start + header_bytes :]
    if len(payload) != payload_bytes:
        raise SessionFileError(f"{name} is truncated: {len(payload):,} of {payload_bytes:,} payload bytes")
    path_of_model = Path(llm.path)
    if model.get("bytes") != path_of_model.stat().st_size or model.get("sha256") != model_sha256(path_of_model):
        raise SessionFileError(f"{name} was saved with model {model.get('file')}, not {path_of_model.name}")
    if header["cache"].get("max_rollback") != llm.model.cache_layout().max_rollback:
        raise SessionFileError(f"{name} was saved with another rollback margin")
    return header, payload
