import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localllm import InvalidParameterError
from localllm.runtime.stopping import StopReason, StopStrings


def expected_output(text, stops):
    """What a whole-text scan gives: text before the stop string completed first (longest on a tie)."""
    matches = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    if not matches:
        return text, False
    _, start = min(matches)
    return text[:start], True


def longest_pending(text, stops):
    """Length of the longest end of `text` that could still grow into a stop string."""
    return max(
        (len(text) - j for j in range(len(text)) for s in stops if len(text) - j < len(s) and s.startswith(text[j:])),
        default=0,
    )


def stream(matcher, pieces):
    emitted = []
    for piece in pieces:
        out, stopped = matcher.feed(piece)
        emitted.append(out)
        if stopped:
            return "".join(emitted), True
    emitted.append(matcher.flush())
    return "".join(emitted), False


@st.composite
def chunked_text(draw):
    alphabet = st.sampled_from("ab<|>x")
    text = draw(st.text(alphabet, max_size=30))
    stops = draw(st.lists(st.text(alphabet, min_size=1, max_size=5), max_size=4))
    cuts = sorted(draw(st.sets(st.integers(1, max(len(text) - 1, 1)), max_size=len(text))))
    bounds = [0, *[c for c in cuts if c < len(text)], len(text)]
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    return text, stops, pieces


@settings(max_examples=250, deadline=None)
@given(chunked_text())
def test_any_chunking_gives_the_whole_text_answer(case):
    text, stops, pieces = case
    assert "".join(pieces) == text
    assert stream(StopStrings(stops), pieces) == expected_output(text, stops)


@settings(max_examples=200, deadline=None)
@given(chunked_text())
def test_text_is_emitted_as_soon_as_it_cannot_start_a_stop(case):
    text, stops, pieces = case
    matcher = StopStrings(stops)
    seen = ""
    emitted = ""
    for piece in pieces:
        seen += piece
        out, stopped = matcher.feed(piece)
        emitted += out
        if stopped:
            break
        assert emitted == seen[: len(seen) - longest_pending(seen, stops)]


def test_stop_split_across_tokens_is_never_emitted():
    matcher = StopStrings(["<|end|>"])
    outputs = [matcher.feed(piece) for piece in ["Hel", "lo <", "|en", "d|>", " more"]]
    assert outputs == [("Hel", False), ("lo ", False), ("", False), ("", True), ("", True)]
    assert matcher.stopped
    assert matcher.flush() == ""


def test_false_start_is_released_once_it_diverges():
    matcher = StopStrings(["<|end|>"])
    assert matcher.feed("a <|en") == ("a ", False)
    assert matcher.feed("joy") == ("<|enjoy", False)
    assert matcher.flush() == ""


def test_prefix_sharing_stops_end_at_the_first_completed():
    matcher = StopStrings(["<|endoftext|>", "<|end|>"])
    assert matcher.feed("x<|end") == ("x", False)
    assert matcher.feed("oftext|>y") == ("", True)

    matcher = StopStrings(["abc", "ab"])
    assert stream(matcher, ["z", "a", "bc"]) == ("z", True)


def test_overlapping_occurrences_of_one_stop():
    assert stream(StopStrings(["aab"]), list("aaaab")) == ("aa", True)
    assert stream(StopStrings(["abab"]), ["ab", "a", "bab"]) == ("", True)


def test_stop_completed_inside_a_longer_candidate_wins():
    # "bc" completes before "abcd" could; whole-text and streamed answers agree.
    assert stream(StopStrings(["abcd", "bc"]), ["abcd"]) == ("a", True)
    assert stream(StopStrings(["abcd", "bc"]), list("abcd")) == ("a", True)


def test_no_stop_emits_everything_after_flush():
    matcher = StopStrings(["###"])
    out = [matcher.feed(p)[0] for p in ["one #", "two ##"]]
    assert out == ["one ", "#two "]
    assert matcher.flush() == "##"
    assert "".join(out) + "##" == "one #two ##"


def test_without_stops_everything_passes_straight_through():
    matcher = StopStrings([])
    assert matcher.feed("any text") == ("any text", False)
    assert matcher.flush() == ""


def test_a_single_string_is_one_stop():
    assert StopStrings("\n\n").stops == ("\n\n",)


@pytest.mark.parametrize("bad", [[""], ["ok", 3], [None]])
def test_invalid_stops_are_rejected(bad):
    with pytest.raises(InvalidParameterError, match="non-empty strings"):
        StopStrings(bad)


def test_stop_reason_values():
    assert [r.value for r in StopReason] == ["stop", "length", "cancelled"]
    assert StopReason("length") is StopReason.LENGTH
    assert StopReason.STOP == "stop"
