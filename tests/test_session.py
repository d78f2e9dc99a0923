"""Sessions: conversations that keep their KV cache between turns, and session files."""

import json
import struct
import threading
import time

import numpy as np
import pytest

from localllm import ContextOverflowError, SessionFileError
from localllm.runtime.cache import CacheSpec
from localllm.runtime.llm import LLM
from localllm.runtime.session import MAGIC, Session

SMOLLM = "smollm2-135m-instruct"
QUESTIONS = [
    "What is the capital of France?",
    "And of Italy?",
    "Name one river in that country.",
    "How long is it?",
    "Write a haiku about it.",
    "Thanks! Summarise our chat in one line.",
]


class ForwardRecorder:
    """Watches the model's real forward passes: the tokens fed and the logits returned."""

    def __init__(self, model):
        self.model = model
        self.calls = []

    def __enter__(self):
        forward = self.model.forward

        def recorded(tokens, cache, *args, **kwargs):
            logits = forward(tokens, cache, *args, **kwargs)
            self.calls.append((list(tokens), logits.copy()))
            return logits

        self.model.forward = recorded
        return self

    def __exit__(self, *exc_info):
        del self.model.forward


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def converse(llm, session, questions, max_tokens=10):
    """Send each question; per turn: the prompt, the fed tokens and the first logits."""
    turns = []
    for question in questions:
        prompt = llm.chat_prompt([*session.messages, {"role": "user", "content": question}])
        with ForwardRecorder(llm.model) as recorder:
            completion = session.send(question, temperature=0, max_tokens=max_tokens)
        fed, first_logits = recorder.calls[0]
        turns.append(dict(prompt=prompt, fed=fed, logits=first_logits, completion=completion))
    return turns


@pytest.fixture(scope="module")
def smollm2(model_path):
    with LLM(model_path(SMOLLM), n_ctx=1024) as llm:
        yield llm


def test_each_turn_feeds_only_what_the_cache_does_not_hold(smollm2):
    session = smollm2.session(system="You are terse.")
    turns = converse(smollm2, session, QUESTIONS[:3])
    held = []
    for turn in turns:
        reused = turn["completion"].stats.reused_tokens
        assert reused == common_prefix(held, turn["prompt"])
        assert turn["fed"] == turn["prompt"][reused:]
        # The cache now holds the prompt and the reply tokens fed back: all of them after an
        # end-of-turn token (never part of the reply), all but the last one sampled otherwise.
        completion = turn["completion"]
        held = turn["prompt"] + completion.token_ids
        if completion.stop_reason == "length":
            held = held[:-1]
    assert turns[1]["completion"].stats.reused_tokens >= len(turns[0]["prompt"])
    assert turns[2]["completion"].stats.reused_tokens >= len(turns[1]["prompt"])
    assert [m["role"] for m in session.messages] == ["system"] + ["user", "assistant"] * 3
    assert session.messages[-1]["content"] == turns[-1]["completion"].text


def test_two_sessions_in_two_threads_keep_their_own_conversations(smollm2):
    conversations = [(None, QUESTIONS[:2]), ("Answer in French.", QUESTIONS[2:4])]
    alone = [
        [t["completion"].token_ids for t in converse(smollm2, smollm2.session(system=system), questions)]
        for system, questions in conversations
    ]
    together = [[], []]

    def talk(i):
        system, questions = conversations[i]
        session = smollm2.session(system=system, temperature=0, max_tokens=10)
        for question in questions:
            together[i].append(session.send(question).token_ids)

    threads = [threading.Thread(target=talk, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert together == alone


def test_sending_again_closes_the_open_stream_and_keeps_what_it_showed(smollm2):
    session = smollm2.session(temperature=0)
    stream = session.send(QUESTIONS[0], stream=True, max_tokens=20)
    shown = "".join(next(stream).text for _ in range(3))
    completion = session.send(QUESTIONS[1], max_tokens=5)
    assert stream.completion.stop_reason == "cancelled"
    assert [m["content"] for m in session.messages] == [QUESTIONS[0], shown, QUESTIONS[1], completion.text]
    assert completion.stats.reused_tokens > 0


def test_a_sink_session_never_runs_out_of_room(smollm2):
    small = CacheSpec(policy="full", n_ctx=96)
    with pytest.raises(ContextOverflowError):
        converse(smollm2, smollm2.session(cache=small), QUESTIONS, max_tokens=20)
    session = smollm2.session(cache=CacheSpec(policy="sink", sinks=4, window=92))
    turns = converse(smollm2, session, QUESTIONS[:4], max_tokens=20)
    # Past sinks + window: the latest token attends to the sinks and its window only.
    assert session.cache.n_tokens > 96 + 50 and session.cache.view(0)[3:] == (92, 4)
    assert all(np.isfinite(turn["logits"]).all() for turn in turns)
    assert turns[-1]["completion"].stats.reused_tokens > 96


def test_stream_records_the_reply_when_it_ends(smollm2):
    session = smollm2.session()
    chunks = list(session.send(QUESTIONS[0], stream=True, temperature=0, max_tokens=6))
    assert session.messages[-1] == {"role": "assistant", "content": "".join(c.text for c in chunks)}


def next_logits(llm, session, text):
    with ForwardRecorder(llm.model) as recorder:
        session.send(text, temperature=0, max_tokens=1)
    return recorder.calls[0]


def test_save_and_load_continue_bit_for_bit(smollm2, tmp_path):
    session = smollm2.session(system="You are terse.")
    converse(smollm2, session, QUESTIONS[:2])
    path = tmp_path / "chat.session"
    session.save(path)
    loaded = Session.load(path, smollm2)
    assert loaded.messages == session.messages and loaded.cached_tokens == session.cached_tokens
    fed, expected = next_logits(smollm2, session, QUESTIONS[2])
    fed_after_load, got = next_logits(smollm2, loaded, QUESTIONS[2])
    assert fed_after_load == fed and len(fed) < 30
    assert np.array_equal(got, expected)


def corrupt(path, tmp_path, edit_header=None, cut=0):
    data = path.read_bytes()
    (length,) = struct.unpack_from("<Q", data, len(MAGIC))
    start = len(MAGIC) + 8
    header = json.loads(data[start : start + length])
    if edit_header:
        edit_header(header)
    encoded = json.dumps(header).encode()
    out = tmp_path / "bad.session"
    body = MAGIC + struct.pack("<Q", len(encoded)) + encoded + data[start + length :]
    out.write_bytes(body[: len(body) - cut])
    return out


@pytest.mark.parametrize(
    "damage, message",
    [
        (dict(cut=1000), r"is truncated: [\d,]+ of [\d,]+ payload bytes"),
        (dict(edit_header=lambda h: h["model"].update(sha256="0" * 64)), "was saved with model"),
        (dict(edit_header=lambda h: h.update(version=99)), "format version 99; this localllm reads version 1"),
        (dict(edit_header=lambda h: h["cache"].update(window=0)), "window must be an int of at least 1"),
        (dict(edit_header=lambda h: h["layers"].__setitem__(0, h["layers"][0] - 1)), "payload has \\d+ bytes more"),
    ],
)
def test_a_bad_session_file_is_a_one_line_error_and_changes_nothing(smollm2, tmp_path, damage, message):
    session = smollm2.session()
    converse(smollm2, session, QUESTIONS[:1])
    path = tmp_path / "chat.session"
    session.save(path)
    bad = corrupt(path, tmp_path, **damage)
    before = (session.messages, session.cached_tokens, session.cache)
    with pytest.raises(SessionFileError, match=message) as error:
        session.restore(bad)
    assert "\n" not in str(error.value)
    assert (session.messages, session.cached_tokens, session.cache) == before
    with pytest.raises(SessionFileError):
        Session.load(bad, smollm2)


def test_a_file_that_is_not_a_session_is_refused(smollm2, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(SessionFileError, match="notes.txt is not a localllm session file"):
        Session.load(path, smollm2)
    with pytest.raises(SessionFileError, match="cannot read session file"):
        Session.load(tmp_path / "missing.session", smollm2)


@pytest.mark.slow
def test_a_session_file_from_another_model_is_refused(model_path, smollm2, tmp_path):
    session = smollm2.session()
    converse(smollm2, session, QUESTIONS[:1])
    session.save(tmp_path / "chat.session")
    with LLM(model_path("qwen2.5-coder-0.5b-instruct"), n_ctx=256) as other:
        with pytest.raises(SessionFileError, match="saved with model SmolLM2-135M-Instruct.Q4_1.gguf, not qwen"):
            Session.load(tmp_path / "chat.session", other)


@pytest.mark.slow
def test_loading_a_long_conversation_is_much_faster_than_prefilling_it(smollm2, tmp_path):
    session = smollm2.session(cache=CacheSpec(n_ctx=2048))
    text = " ".join(f"Item {i}: the quick brown fox jumps over the lazy dog." for i in range(110))
    session.send(text, temperature=0, max_tokens=1)
    assert session.cached_tokens >= 1500
    prompt = smollm2.chat_prompt(session.messages[:-1])
    session.save(tmp_path / "long.session")
    started = time.perf_counter()
    loaded = Session.load(tmp_path / "long.session", smollm2)
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    smollm2.model.forward(prompt, smollm2.model.new_cache(2048))
    prefill_seconds = time.perf_counter() - started
    assert loaded.cached_tokens == session.cached_tokens
    assert load_seconds < 0.1 * prefill_seconds, (load_seconds, prefill_seconds)


@pytest.mark.slow
def test_six_turns_reuse_the_cache_and_match_a_fresh_prefill(model_path):
    """Float32 activations and the full policy: the first logits of each turn equal those of
    the whole conversation prefilled on a fresh context."""
    with LLM(model_path("qwen2.5-coder-0.5b-instruct"), n_ctx=2048, quantize_activations=False) as llm:
        session = llm.session()
        turns = converse(llm, session, QUESTIONS, max_tokens=24)
        for number, turn in enumerate(turns):
            stats = turn["completion"].stats
            assert len(turn["fed"]) == stats.prompt_tokens - stats.reused_tokens
            if number:
                assert stats.reused_tokens >= len(turns[number - 1]["prompt"])
            fresh = llm.logits(turn["prompt"])[-1]
            error = np.abs(turn["logits"] - fresh).max()
            assert error <= 1e-3 * np.abs(fresh).max(), f"turn {number}: {error}"
