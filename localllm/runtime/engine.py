"""The generation loop: prefill a prompt, then sample and decode one token at a time.

`Generation` runs one request over a model, a tokenizer and a KV cache. Iterating it yields
`Chunk`s as tokens arrive; once the iteration ends (finished, or abandoned by the consumer),
`Generation.completion` holds the whole `Completion` with its `GenerationStats`.

Text is produced by the tokenizer's streaming decoder, so a chunk never holds half a UTF-8
character, and passes through `StopStrings`, so a stop string split across tokens is never
emitted. A chunk's text may therefore be empty (held back while it could still start a stop
string); held text is released by later chunks or, at the end, by one last chunk without a token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from numbers import Integral

from localllm.errors import ContextOverflowError, InvalidParameterError
from localllm.runtime.sampling import Sampler, SamplingParams
from localllm.runtime.stopping import StopReason, StopStrings

# Keyword arguments a generation call takes besides the SamplingParams fields.
_REQUEST_OPTIONS = ("max_tokens", "stop", "cancel")
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
    prompt_seconds: float = 0.0
    completion_tokens: int = 0
    # Decode steps: forward passes over one sampled token (the first token comes from prefill).
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    time_to_first_token: float | None = None
    total_seconds: float = 0.0

    @property
    def prompt_tokens_per_second(self) -> float | None:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else None

    @property
    def tokens_per_second(self) -> float | None:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else None

    def as_dict(self) -> dict:
        data = asdict(self)
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
        object.__setattr__(self, "stop", StopStrings(stop).stops)
        if self.cancel is not None and not isinstance(self.cancel, threading.Event):
            raise InvalidParameterError(f"cancel must be a threading.Event, got {type(self.cancel).__name__}")

    @classmethod
    def from_kwargs(cls, options: dict) -> GenerationRequest:
        """Build from keyword arguments: SamplingParams fields plus max_tokens, stop and cancel."""
        unknown = sorted(set(options) - set(SAMPLING_OPTIONS) - set(_REQUEST_OPTIONS))
        if unknown:
            allowed = ", ".join((*SAMPLING_OPTIONS, *_REQUEST_OPTIONS))
            raise InvalidParameterError(f"unknown generation option {unknown[0]!r} (allowed: {allowed})")
        sampling = SamplingParams(**{k: v for k, v in options.items() if k in SAMPLING_OPTIONS})
        return cls(sampling=sampling, **{k: v for k, v in options.items() if k in _REQUEST_OPTIONS})


def check_prompt_fits(n_prompt: int, n_ctx: int) -> None:
    if n_prompt == 0:
        raise InvalidParameterError("the prompt is empty: nothing to generate from")
    if n_prompt > n_ctx:
        raise ContextOverflowError(f"prompt has {n_prompt} tokens but the context holds {n_ctx}")


class Generation:
    """One generation: iterate for `Chunk`s, then read `completion`.

    `cache` must be empty or hold a prefix of `prompt_ids` (the first `cache.n_tokens` ids);
    only the rest of the prompt is prefilled. The context limit is the cache's `n_ctx`.
    """

    def __init__(
        self,
        model,
        tokenizer,
        cache,
        prompt_ids: Sequence[int],
        request: GenerationRequest,
        *,
        load_seconds: float = 0.0,
    ):
        self.prompt_ids = [int(i) for i in prompt_ids]
        check_prompt_fits(len(self.prompt_ids), cache.n_ctx)
        if cache.n_tokens >= len(self.prompt_ids):
            raise InvalidParameterError(
                f"the cache holds {cache.n_tokens} tokens; at least the last prompt token must be fed"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.cache = cache
        self.request = request
        self.sampler = Sampler(request.sampling, model.n_vocab)
        self.stats = GenerationStats(load_seconds=load_seconds, prompt_tokens=len(self.prompt_ids))
        self.completion: Completion | None = None
        self._started = False

    def __iter__(self) -> Iterator[Chunk]:
        if self._started:
            raise InvalidParameterError("a Generation can only be iterated once")
        self._started = True
        return self._run()

    def run(self) -> Completion:
        """Generate to the end without streaming."""
        for _ in self:
            pass
        return self.completion

    def _run(self) -> Iterator[Chunk]:
        request, stats, cache = self.request, self.stats, self.cache
        eos_ids = frozenset(self.tokenizer.eos_ids)
        decoder = self.tokenizer.stream_decoder(skip_special=True)
        stops = StopStrings(request.stop)
        context = list(self.prompt_ids)
        generated: list[int] = []
        texts: list[str] = []
        reason = StopReason.CANCELLED
        started = time.perf_counter()
        try:
            logits = self.model.forward(context[cache.n_tokens :], cache)
            stats.prompt_seconds = time.perf_counter() - started
            while True:
                if request.cancel is not None and request.cancel.is_set():
                    break
                token, logprob = self.sampler.sample(logits, context)
                if stats.time_to_first_token is None:
                    stats.time_to_first_token = time.perf_counter() - started
                if token in eos_ids:
                    reason = StopReason.STOP
                    break
                context.append(token)
                generated.append(token)
                text, stopped = stops.feed(decoder.push(token))
                texts.append(text)
                yield Chunk(text, token, logprob)
                if stopped:
                    reason = StopReason.STOP
                    break
                if len(generated) == request.max_tokens or cache.n_tokens >= cache.n_ctx:
                    reason = StopReason.LENGTH
                    break
                if request.cancel is not None and request.cancel.is_set():
                    break
                step_start = time.perf_counter()
                logits = self.model.forward([token], cache)
                stats.decode_seconds += time.perf_counter() - step_start
                stats.decode_tokens += 1
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
            stats.completion_tokens = len(generated)
            stats.total_seconds = time.perf_counter() - started
            self.completion = Completion("".join(texts), generated, reason, stats)

