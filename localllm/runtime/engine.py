"""The generation loop: prefill a prompt, then sample and decode one token at a time.

`Generation` runs one request over a model, a tokenizer and a KV cache: a fresh one, or a
session's, which may already hold the start of the prompt. It is an iterator of `Chunk`s as
tokens arrive; once it ends (finished, or closed by the consumer), `Generation.completion`
holds the whole `Completion` with its `GenerationStats`.

Tokens come from a token stepper: `plain_steps` (one forward per token) or, with a drafter,
`speculative.speculative_steps` (several tokens per forward); the loop here is the text layer
over either, as mlx-lm separates `generate_step` from `stream_generate`.

Text is produced by the tokenizer's streaming decoder, so a chunk never holds half a UTF-8
character, and passes through `StopStrings`, so a stop string split across tokens is never
emitted. A chunk's text may therefore be empty (held back while it could still start a stop
string); held text is released by later chunks or, at the end, by one last chunk without a token.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from numbers import Integral

from localllm.errors import CancelledError, ContextOverflowError, InvalidParameterError
from localllm.runtime.sampling import Sampler, SamplingParams
from localllm.runtime.speculative import Speculation, SpeculativeStats
from localllm.runtime.stopping import StopReason, StopStrings

# Keyword arguments a generation call takes besides the SamplingParams fields.
_REQUEST_OPTIONS = ("max_tokens", "stop", "cancel", "progress")
SAMPLING_OPTIONS = tuple(f.name for f in fields(SamplingParams))


@dataclass(frozen=True)
class Chunk:
    """One step of a streamed generation.

    `text` is the new text to show (possibly empty); `token_id` and `logprob` describe the
    token sampled at this step, both None for the final chunk that only releases held-back text.
    """

    text: str
    token_id: int | None
    logprob: float | None


@dataclass
class GenerationStats:
    load_seconds: float = 0.0
    prompt_tokens: int = 0
    # Prompt tokens found already in the cache (a session's earlier turns): not processed again.
    reused_tokens: int = 0
    prompt_seconds: float = 0.0
    completion_tokens: int = 0
    # Decode steps: forward passes over one sampled token (the first token comes from prefill).
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    time_to_first_token: float | None = None
    total_seconds: float = 0.0
    # Set when the generation speculated: drafted and accepted tokens, time in draft and verify.
    speculative: SpeculativeStats | None = None

    @property
    def processed_prompt_tokens(self) -> int:
        return self.prompt_tokens - self.reused_tokens

    @property
    def prompt_tokens_per_second(self) -> float | None:
        return self.processed_prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else None

    @property
    def tokens_per_second(self) -> float | None:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else None

    def as_dict(self) -> dict:
        data = asdict(self)
        data["speculative"] = self.speculative.as_dict() if self.speculative is not None else None
        data["processed_prompt_tokens"] = self.processed_prompt_tokens
        data["prompt_tokens_per_second"] = self.prompt_tokens_per_second
        data["tokens_per_second"] = self.tokens_per_second
        return data


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    stop_reason: StopReason
    stats: GenerationStats = field(default_factory=GenerationStats)


@dataclass(frozen=True)
class GenerationRequest:
    """Everything about one generation call except the prompt: validated options."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = 256
    stop: tuple[str, ...] = ()
    cancel: threading.Event | None = None
    # progress(done, total): prompt tokens processed so far, after each prefill block.
    progress: Callable[[int, int], None] | None = None

    def __post_init__(self):
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, Integral) or self.max_tokens < 1
        ):
            raise InvalidParameterError(f"max_tokens must be a positive integer or None, got {self.max_tokens!r}")
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif not isinstance(stop, (list, tuple)):
            raise InvalidParameterError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
        object.__setattr__(self, "stop", StopStrings(stop).stops)
        if self.cancel is not None and not isinstance(self.cancel, threading.Event):
            raise InvalidParameterError(f"cancel must be a threading.Event, got {type(self.cancel).__name__}")
        if self.progress is not None and not callable(self.progress):
            raise InvalidParameterError(f"progress must be callable, got {type(self.progress).__name__}")

    @classmethod
    def from_kwargs(cls, options: dict) -> GenerationRequest:
        """Build from keyword arguments: SamplingParams fields plus max_tokens, stop, cancel and
        progress."""
        unknown = sorted(set(options) - set(SAMPLING_OPTIONS) - set(_REQUEST_OPTIONS))
        if unknown:
            allowed = ", ".join((*SAMPLING_OPTIONS, *_REQUEST_OPTIONS))
            raise InvalidParameterError(f"unknown generation option {unknown[0]!r} (allowed: {allowed})")
        sampling = SamplingParams(**{k: v for k, v in options.items() if k in SAMPLING_OPTIONS})
        return cls(sampling=sampling, **{k: v for k, v in options.items() if k in _REQUEST_OPTIONS})


def check_prompt_fits(n_prompt: int, n_ctx: int) -> None:
    if n_prompt > n_ctx:
        raise ContextOverflowError(f"prompt has {n_prompt} tokens but the context holds {n_ctx}")


class GenerationLock:
    """Serializes generations on one model, across threads.

    Another thread waits its turn. The thread that holds the lock can only be asking again if
    its own generation is suspended (a stream it stopped reading but still references); that
    stream is closed, as if abandoned, so the thread does not wait for itself forever.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._holder: weakref.ref | None = None

    def acquire(self, holder: weakref.ref | None = None) -> None:
        """Take the lock; `holder` (a weak reference to the generator that will hold it) lets
        the same thread close it later."""
        if self._owner == threading.get_ident():
            suspended = self._holder() if self._holder is not None else None
            if suspended is None:
                raise InvalidParameterError("this thread already holds the model; finish what it is doing first")
            suspended.close()
        self._lock.acquire()
        self._owner = threading.get_ident()
        self._holder = holder

    def release(self) -> None:
        self._owner = None
        self._holder = None
        # A plain Lock may be released from another thread: an abandoned stream is finalized
        # wherever the garbage collector runs.
        self._lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc_info):
        self.release()
        return False


class _Outcome:
    """What a running generation reports back; shared with its chunk generator, which must not
    reference the `Generation` itself (that cycle would keep an abandoned stream, and the model
    lock it holds, alive until the cyclic garbage collector happens to run)."""

    def __init__(self, stats: GenerationStats):
        self.stats = stats
        self.completion: Completion | None = None


class Generation:
    """One generation: an iterator of `Chunk`s; `completion` once it has ended.

    Nothing runs until the first chunk is requested. Then `lock` (if given) is taken and held
    until the generation ends or is closed (`close()`, dropping the last reference, or the same
    thread starting another generation under the lock), and `prepare_cache(prompt_ids)` returns
    the KV cache to use and how many leading prompt tokens it already holds; only the rest is
    prefilled. `n_ctx`, when given, refuses at once a prompt that cannot fit. `on_end(completion,
    cache)` is called, still under the lock, once the generation has ended. With `speculation`,
    tokens are drafted and verified several at a time (the same tokens, when greedy).
    """

    def __init__(
        self,
        model,
        tokenizer,
        prompt_ids: Sequence[int],
        request: GenerationRequest,
        *,
        prepare_cache: Callable[[list[int]], tuple[object, int]],
        n_ctx: int | None = None,
        lock: GenerationLock | None = None,
        load_seconds: float = 0.0,
        on_end: Callable[[Completion, object], None] | None = None,
        speculation: Speculation | None = None,
    ):
        self.prompt_ids = [int(i) for i in prompt_ids]
        if not self.prompt_ids:
            raise InvalidParameterError("the prompt is empty: nothing to generate from")
        if n_ctx is not None:
            check_prompt_fits(len(self.prompt_ids), n_ctx)
        self.request = request
        sampler = Sampler(request.sampling, model.n_vocab)
        self._outcome = _Outcome(GenerationStats(load_seconds=load_seconds, prompt_tokens=len(self.prompt_ids)))
        chunks = _chunks(
            model, tokenizer, sampler, self.prompt_ids, request, prepare_cache, self._outcome, on_end, speculation
        )
        if lock is None:
            self._chunks = chunks
        else:
            # The generator gets a weak reference to itself, for the lock; a strong one would
            # be a cycle that keeps it (and the lock) alive after the caller drops it.
            itself = []
            self._chunks = _holding(lock, chunks, itself)
            itself.append(weakref.ref(self._chunks))

    @property
    def stats(self) -> GenerationStats:
        return self._outcome.stats

    @property
    def completion(self) -> Completion | None:
        return self._outcome.completion

    def __iter__(self) -> Iterator[Chunk]:
        return self

    def __next__(self) -> Chunk:
        return next(self._chunks)

    def close(self) -> None:
        """Stop early (the completion's reason is "cancelled") and release the model."""
        self._chunks.close()

    def run(self) -> Completion:
        """Generate to the end without streaming."""
        for _ in self:
            pass
        return self.completion


def _holding(lock: GenerationLock, chunks: Iterator[Chunk], itself: list[weakref.ref]) -> Iterator[Chunk]:
    lock.acquire(itself[0])
    try:
        yield from chunks
    finally:
        chunks.close()
        lock.release()


def plain_steps(model, cache, sampler: Sampler, context: list[int], logits, stats: GenerationStats
                ) -> Iterator[tuple[int, float]]:  # fmt: skip
    """Yield (token, logprob) one decode step at a time, appending each token to `context`;
    `logits` are the model's after `context`, which the cache holds. Ends when the cache is full."""
    while True:
        token, logprob = sampler.sample(logits, context)
        context.append(token)
        yield token, logprob
        if not cache.has_room(1):
            return
        step_start = time.perf_counter()
        logits = model.forward([token], cache)
        stats.decode_seconds += time.perf_counter() - step_start
        stats.decode_tokens += 1


def _chunks(model, tokenizer, sampler: Sampler, prompt_ids: list[int], request: GenerationRequest,
            prepare_cache: Callable[[list[int]], tuple[object, int]], outcome: _Outcome,
            on_end: Callable[[Completion, object], None] | None,
            speculation: Speculation | None) -> Iterator[Chunk]:  # fmt: skip
    stats = outcome.stats
    eos_ids = frozenset(tokenizer.eos_ids)
    decoder = tokenizer.stream_decoder(skip_special=True)
    stops = StopStrings(request.stop)
    context = list(prompt_ids)
    generated: list[int] = []
    texts: list[str] = []
    reason = StopReason.CANCELLED
    started = time.perf_counter()
    cache = None
    steps = None
    try:
        cache, reused = prepare_cache(context)
        stats.reused_tokens = reused
        cache.check_room(len(context) - reused)
        try:
            logits = model.forward(context[reused:], cache, cancel=request.cancel, progress=request.progress)
        except CancelledError:
            return
        stats.prompt_seconds = time.perf_counter() - started
        if speculation is None:
            steps = plain_steps(model, cache, sampler, context, logits, stats)
        else:
            steps = speculation.steps(model, cache, sampler, context, logits, stats, request.max_tokens, request.cancel)
        while True:
            if request.cancel is not None and request.cancel.is_set():
                break
            step = next(steps, None)
            if step is None:
                reason = StopReason.LENGTH
                break
            token, logprob = step
            if stats.time_to_first_token is None:
                stats.time_to_first_token = time.perf_counter() - started
            if token in eos_ids:
                reason = StopReason.STOP
                break
            generated.append(token)
            text, stopped = stops.feed(decoder.push(token))
            texts.append(text)
            yield Chunk(text, token, logprob)
            if stopped:
                reason = StopReason.STOP
                break
            if len(generated) == request.max_tokens:
                reason = StopReason.LENGTH
                break
        if not stops.stopped:
            tail, stopped = stops.feed(decoder.flush())
            if stopped:
                reason = StopReason.STOP
            else:
                tail += stops.flush()
            if tail:
                texts.append(tail)
                yield Chunk(tail, None, None)
    finally:
        # Closing a speculative stepper rolls its cache back to the tokens consumed.
        if steps is not None:
            steps.close()
        stats.completion_tokens = len(generated)
        stats.total_seconds = time.perf_counter() - started
        outcome.completion = Completion("".join(texts), generated, reason, stats)
        if on_end is not None and cache is not None:
            on_end(outcome.completion, cache)
