"""A conversation's settings: its system prompt and how replies are sampled."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from numbers import Integral

from localllm.errors import InvalidParameterError
from localllm.runtime.cache import POLICIES, CacheSpec
from localllm.runtime.sampling import SamplingParams

SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed")


@dataclass(frozen=True)
class ChatSettings:
    """Stored with each conversation as JSON. Sampling defaults are the runtime's (llama.cpp's);
    max_tokens None lets a reply run until the model ends it."""

    system: str = ""
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 1024
    # The conversation's KV cache: "" keeps the app's (its --cache options); "full" or "sink"
    # choose a policy, with the sink policy's sinks and window (None: the app's, or the default).
    cache: str = ""
    sinks: int | None = None
    window: int | None = None
    # Speculative decoding with the app's drafter (`localllm chat --draft`), when it has one.
    draft: bool = True

    def __post_init__(self):
        if not isinstance(self.system, str):
            raise InvalidParameterError(f"system prompt must be text, got {type(self.system).__name__}")
        SamplingParams(**{name: getattr(self, name) for name in SAMPLING_FIELDS})
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, Integral) or self.max_tokens < 1
        ):
            raise InvalidParameterError(f"max_tokens must be a positive integer or empty, got {self.max_tokens!r}")
        if not isinstance(self.draft, bool):
            raise InvalidParameterError(f"draft must be true or false, got {self.draft!r}")
        if self.cache not in ("", *POLICIES):
            raise InvalidParameterError(f"cache must be empty or one of {', '.join(POLICIES)}, got {self.cache!r}")
        self.cache_spec(CacheSpec())

    def cache_spec(self, base: CacheSpec) -> CacheSpec | None:
        """The conversation's cache: `base` (the app's) with this conversation's choices, or None
        to keep the app's. InvalidParameterError names a bad combination."""
        if not self.cache:
            return None
        sizes = {name: value for name in ("sinks", "window") if (value := getattr(self, name)) is not None}
        return replace(base, policy=self.cache, **sizes)

    def generation_options(self) -> dict:
        """Keyword arguments of a generation call."""
        options = {name: getattr(self, name) for name in SAMPLING_FIELDS}
        options["max_tokens"] = self.max_tokens
        return options

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ChatSettings:
        """Settings stored by this or another version of the app: fields it does not know are
        dropped and missing ones take their defaults, so old conversations keep opening."""
        try:
            data = json.loads(text)
        except ValueError:
            return cls()
        if not isinstance(data, dict):
            return cls()
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{key: value for key, value in data.items() if key in known})
        except (InvalidParameterError, TypeError):
            return cls()
