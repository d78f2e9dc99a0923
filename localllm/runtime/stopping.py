"""When generation ends, and keeping stop strings out of streamed text."""

from collections.abc import Iterable
from enum import StrEnum

from localllm.errors import InvalidParameterError


class StopReason(StrEnum):
    """Why a generation ended (the values are OpenAI's `finish_reason` strings)."""

    STOP = "stop"  # an end-of-generation token or a stop string
    LENGTH = "length"  # the token budget or the context ran out
    CANCELLED = "cancelled"  # the caller asked to stop


class StopStrings:
    """Streaming matcher that ends generation at the first stop string and never emits it.

    Text arrives in arbitrary pieces (one token's worth at a time), so a stop string may be split
    across pieces. `feed` emits text as soon as it can no longer be the start of a stop string
    and holds back the rest; `flush` hands back what is held when generation ends for another
    reason. The generation stops at the stop string that is completed first (the longest of
    those completed at the same character), and everything before it is emitted exactly once,
    however the text was split.
    """

    def __init__(self, stops: Iterable[str]):
        if isinstance(stops, str):
            stops = [stops]
        stops = list(stops)
        for stop in stops:
            if not isinstance(stop, str) or not stop:
                raise InvalidParameterError(f"stop strings must be non-empty strings, got {stop!r}")
        self.stops = tuple(dict.fromkeys(stops))
        self._held = ""
        self.stopped = False

    def feed(self, text_delta: str) -> tuple[str, bool]:
        """Take the next piece of generated text; return (text safe to show, whether to stop)."""
        if self.stopped:
            return "", True
        text = self._held + text_delta
        match_start = self._first_completed_match(text)
        if match_start is not None:
            self._held = ""
            self.stopped = True
            return text[:match_start], True
        held_from = len(text) - self._longest_partial_suffix(text)
        self._held = text[held_from:]
        return text[:held_from], False

    def flush(self) -> str:
        """Held-back text, emitted at the end of a generation that no stop string ended."""
        held, self._held = self._held, ""
        return held

    def _first_completed_match(self, text: str) -> int | None:
        """Start of the stop string that ends earliest in `text` (longest on a tie), if any."""
        best = None
        for stop in self.stops:
            start = text.find(stop)
            if start >= 0:
                key = (start + len(stop), start)
                if best is None or key < best:
                    best = key
        return None if best is None else best[1]

    def _longest_partial_suffix(self, text: str) -> int:
        """Length of the longest end of `text` that some stop string starts with."""
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
