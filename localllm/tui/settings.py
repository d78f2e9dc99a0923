"""A conversation's settings: its system prompt and how replies are sampled."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from numbers import Integral

from localllm.errors import InvalidParameterError
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

    def __post_init__(self):
        if not isinstance(self.system, str):
            raise InvalidParameterError(f"system prompt must be text, got {type(self.system).__name__}")
        SamplingParams(**{name: getattr(self, name) for name in SAMPLING_FIELDS})
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, Integral) or self.max_tokens < 1
        ):
            raise InvalidParameterError(f"max_tokens must be a positive integer or empty, got {self.max_tokens!r}")

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
