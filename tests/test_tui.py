"""The chat app (`localllm chat`): its store, and the app driven by Textual's pilot on the real
default model. Replies are sampled, so tests check their structure, never their words."""

import asyncio
import gc
import sqlite3
import time

import pytest
from textual.app import App

from localllm.errors import InvalidParameterError
from localllm.formats.chat import MAX_OUTPUT_CHARS
from localllm.tui.app import ChatApp, ReplyDelta, ReplyEnded
from localllm.tui.backend import previous_file
from localllm.tui.screens import HelpScreen
from localllm.tui.settings import ChatSettings
from localllm.tui.store import SCHEMA_VERSION, ChatStore, ChatStoreError, title_of
from localllm.tui.widgets import ConversationItem, MessageMarkdown, MessageView, PromptInput, ReplyWriter, split_point

SMOLLM = "smollm2-135m-instruct"
SIZE = (110, 36)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh LOCALLLM_HOME: the database goes there; the model is passed by its path."""
    monkeypatch.setenv("LOCALLLM_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="session")
def smollm(model_path):
    # Session scope: resolved from the real store before `home` points LOCALLLM_HOME elsewhere.
    return str(model_path(SMOLLM))


# ---- the store ---------------------------------------------------------------------------


def test_store_creates_the_schema_and_keeps_messages(home):
    store = ChatStore()
    assert store.path.parent == home / "chat"
    assert store.schema_version == SCHEMA_VERSION
    conversation = store.create_conversation("m", ChatSettings(temperature=0.3))
    store.add_message(conversation.id, "user", "What is the capital of France?\nThanks")
    reply = store.add_message(conversation.id, "assistant", "Par")
    store.update_message(reply, "Paris.")
    store.close()
    reopened = ChatStore()
    [stored] = reopened.conversations()
    assert stored.title == "What is the capital of France?"
    assert stored.settings.temperature == 0.3
    assert [(m.role, m.content) for m in reopened.messages(stored.id)] == [
        ("user", "What is the capital of France?\nThanks"),
        ("assistant", "Paris."),
    ]


def test_store_migrates_a_version_1_database(home):
    path = home / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE conversations (id INTEGER PRIMARY KEY AUTOINCREMENT, title TEXT NOT NULL, model TEXT NOT NULL,
            settings TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL);
        CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id INTEGER NOT NULL
            REFERENCES conversations(id) ON DELETE CASCADE, role TEXT NOT NULL, content TEXT NOT NULL,
            created REAL NOT NULL);
        INSERT INTO conversations VALUES (1, 'Old chat', 'm', '{"temperature": 0.5, "gone": 1}', 0, 0);
        INSERT INTO messages VALUES (1, 1, 'user', 'hello', 0);
        PRAGMA user_version = 1;
        """
    )
    db.close()
    store = ChatStore(path)
    assert store.schema_version == SCHEMA_VERSION == 3
    [conversation] = store.conversations()
    assert (conversation.title, conversation.settings.temperature) == ("Old chat", 0.5)
    assert [m.content for m in store.messages(1)] == ["hello"]
    # Version 2's column: a renamed conversation keeps its title past its first message.
    store.rename(1, "  Kept   title ")
    store.add_message(1, "user", "another first line")
    assert store.conversation(1).title == "Kept title"


def test_store_refuses_a_database_from_a_newer_app(home):
    path = home / "new.sqlite3"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(ChatStoreError, match="newer"):
        ChatStore(path)


def test_store_searches_renames_deletes_and_exports(home):
    store = ChatStore()
    first = store.create_conversation("m", ChatSettings(system="Be brief."))
    store.add_message(first.id, "user", "Tell me about owls")
    store.add_message(first.id, "assistant", "Owls hunt at 50% *night*.")
    second = store.create_conversation("m", ChatSettings())
    store.add_message(second.id, "user", "Hello")
    assert [c.id for c in store.conversations()] == [second.id, first.id]
    assert [c.id for c in store.conversations("NIGHT")] == [first.id]
    assert [c.id for c in store.conversations("50%")] == [first.id]
    assert store.conversations("5_%") == []
    assert [c.id for c in store.conversations("hello")] == [second.id]
    exported = store.export_markdown(first.id)
    assert exported.startswith("# Tell me about owls\n")
    assert "## System\n\nBe brief." in exported
    assert exported.index("## User\n\nTell me about owls") < exported.index("## Assistant\n\nOwls hunt")
    store.delete(first.id)
    assert [c.id for c in store.conversations()] == [second.id]
    assert store.messages(first.id) == []


def test_titles_come_from_the_first_line():
    assert title_of("\n  Hello there  \nmore") == "Hello there"
    assert title_of("x" * 100).endswith("…") and len(title_of("x" * 100)) == 48
    assert title_of("   ") == "New chat"


def test_settings_are_validated_and_read_leniently():
    with pytest.raises(InvalidParameterError):
        ChatSettings(top_p=2.0)
    with pytest.raises(InvalidParameterError):
        ChatSettings(max_tokens=0)
    settings = ChatSettings(system="s", temperature=0.1, seed=7, max_tokens=None)
    assert ChatSettings.from_json(settings.to_json()) == settings
    assert ChatSettings.from_json('{"temperature": 0.2, "unknown": 1}') == ChatSettings(temperature=0.2)
    assert ChatSettings.from_json("not json") == ChatSettings()
    assert ChatSettings.from_json('{"temperature": -1}') == ChatSettings()


# ---- the app, on the real model ------------------------------------------------------------


# Generous: on a machine whose cores other jobs keep busy, a reply may take ten times longer.
async def wait_for(pilot, condition, timeout=120.0, step=0.02):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {condition}")
        await pilot.pause(step)


async def ready(app, pilot):
    await wait_for(pilot, lambda: app.backend is not None or (not app.loading and app.model is None))
    assert app.backend is not None, "the model did not load"


async def send(app, pilot, text):
    app.query_one(PromptInput).load_text(text)
    app.query_one(PromptInput).focus()
    await pilot.press("enter")
    await wait_for(pilot, lambda: app.turn is not None)


async def reply_to(app, pilot, text):
    await send(app, pilot, text)
    await wait_for(pilot, lambda: not app.busy)
    # The reply's worker saves the conversation's cache after the reply has ended.
    await app.workers.wait_for_complete()
    await pilot.pause()


def shown(app):
    return [(view.role, view.text) for view in app.query(MessageView)]


def stored(store, conversation_id):
    return [(m.role, m.content) for m in store.messages(conversation_id)]


def short_replies(app, max_tokens=24):
    """Keep replies short: these tests are about the app, not the model's prose."""
    app.new_settings = ChatSettings(max_tokens=max_tokens, temperature=0.0)


@pytest.mark.asyncio
async def test_a_message_gets_a_streamed_reply_that_is_stored(home, smollm):
    store = ChatStore()
    app = ChatApp(smollm, store)
    # What the reply's view held each time the app took the next piece of the stream.
    drawn_before_delta = []

    def hook(message):
        if isinstance(message, ReplyDelta):
            drawn_before_delta.append(message.turn.view.text)

    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        await ready(app, pilot)
        app.new_settings = ChatSettings(max_tokens=96, temperature=0.0)
        await reply_to(app, pilot, "Count from 1 to 100, one number per line.")
        completion_tokens = app.turn.tokens
        # Streamed: several pieces, each drawn before the next came.
        assert len(drawn_before_delta) >= 3
        assert drawn_before_delta[0] == "" and all(drawn_before_delta[1:])
        [(role_u, user), (role_a, reply)] = shown(app)
        assert (role_u, user) == ("user", "Count from 1 to 100, one number per line.")
        assert role_a == "assistant" and reply.strip()
        # Nothing dropped at the end: the screen, the database and the model's text agree.
        assert stored(store, app.conversation.id) == shown(app)
        assert reply == app.turn.text
        assert completion_tokens > 1
        assert [item.conversation_id for item in app.query(ConversationItem)] == [app.conversation.id]
        status = str(app.query_one("#status").render())
        assert "tok/s" in status and "processed" in status and "cache" in status and "mem" in status


@pytest.mark.asyncio
async def test_escape_stops_a_long_reply_at_once_and_keeps_it(home, smollm):
    store = ChatStore()
    app = ChatApp(smollm, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        app.new_settings = ChatSettings(max_tokens=None, temperature=0.0)
        await send(app, pilot, "Tell me a very long story about a dragon and a knight, with many chapters.")
        await wait_for(pilot, lambda: app.turn.tokens >= 8)
        pressed = time.perf_counter()
        await pilot.press("escape")
        await wait_for(pilot, lambda: not app.busy, timeout=5, step=0.005)
        assert time.perf_counter() - pressed < 0.5
        await pilot.pause()
        reply = app.turn.text
        assert reply.strip()
        assert stored(store, app.conversation.id)[-1] == ("assistant", reply)
        assert shown(app)[-1] == ("assistant", reply)
        assert "(stopped)" in [str(label.render()) for label in app.query(".note")]


@pytest.mark.asyncio
async def test_conversations_switch_and_survive_a_restart(home, smollm):
    store = ChatStore()
    app = ChatApp(smollm, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        short_replies(app)
        await reply_to(app, pilot, "Hello! Who are you?")
        first = app.conversation.id
        first_messages = shown(app)
        await pilot.press("ctrl+n")
        assert shown(app) == [] and app.conversation is None
        short_replies(app)
        await reply_to(app, pilot, "Name a colour.")
        second = app.conversation.id
        assert second != first
        items = list(app.query(ConversationItem))
        assert [item.conversation_id for item in items] == [second, first]
        await pilot.click(items[1])
        await pilot.pause()
        assert app.conversation.id == first
        assert shown(app) == first_messages
    store.close()

    store = ChatStore()
    app = ChatApp(None, store)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        items = list(app.query(ConversationItem))
        assert [item.conversation_id for item in items] == [second, first]
        await pilot.click(items[1])
        await pilot.pause()
        assert shown(app) == first_messages


@pytest.mark.asyncio
async def test_regenerate_replaces_the_last_reply(home, smollm):
    store = ChatStore()
    app = ChatApp(smollm, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        short_replies(app)
        await reply_to(app, pilot, "Say something nice.")
        [user, old] = store.messages(app.conversation.id)
        first_turn = app.turn
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.turn is not first_turn and not app.busy)
        await pilot.pause()
        messages = store.messages(app.conversation.id)
        assert [m.role for m in messages] == ["user", "assistant"]
        assert messages[0] == user
        assert messages[1].id != old.id and messages[1].content.strip()
        assert shown(app) == stored(store, app.conversation.id)


@pytest.mark.asyncio
async def test_editing_the_last_message_resends_it(home, smollm):
    store = ChatStore()
    app = ChatApp(smollm, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        short_replies(app)
        await reply_to(app, pilot, "Name a fruit.")
        await pilot.press("ctrl+g")
        assert app.query_one(PromptInput).text == "Name a fruit."
        app.query_one(PromptInput).load_text("Name a vegetable.")
        first_turn = app.turn
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.turn is not first_turn and not app.busy)
        await pilot.pause()
        messages = stored(store, app.conversation.id)
        assert [role for role, _ in messages] == ["user", "assistant"]
        assert messages[0] == ("user", "Name a vegetable.")
        assert shown(app) == messages


@pytest.mark.asyncio
async def test_settings_dialog_stores_the_temperature(home, smollm):
    store = ChatStore()
    app = ChatApp(smollm, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        short_replies(app, 8)
        await reply_to(app, pilot, "Hi")
        await pilot.press("ctrl+s")
        await pilot.pause()
        dialog = app.screen
        dialog.query_one("#temperature").value = "0.25"
        dialog.query_one("#seed").value = "42"
        dialog.query_one("#system").load_text("You are terse.")
        await pilot.click("#save")
        await pilot.pause()
        settings = store.conversation(app.conversation.id).settings
        assert (settings.temperature, settings.seed, settings.system) == (0.25, 42, "You are terse.")
        assert settings.max_tokens == 8

        # A bad value keeps the dialog open with the error, and stores nothing.
        await pilot.press("ctrl+s")
        await pilot.pause()
        app.screen.query_one("#top_p").value = "3"
        await pilot.click("#save")
        await pilot.pause()
        assert "top_p" in str(app.screen.query_one("#error").render())
        await pilot.press("escape")
        await pilot.pause()
        assert store.conversation(app.conversation.id).settings == settings


@pytest.mark.asyncio
async def test_a_conversation_keeps_its_own_cache_policy(home, smollm):
    """The app runs the full policy; a conversation set to the sink policy gets a sink cache of
    its window, shown in the status bar, and one without keeps the app's."""
    store = ChatStore()
    app = ChatApp(smollm, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        app.new_settings = ChatSettings(max_tokens=8, temperature=0.0, cache="sink", sinks=2, window=40)
        await reply_to(app, pilot, "Hi")
        usage = app.backend.cache_usage()
        assert (usage.policy, usage.sinks, usage.window, usage.capacity) == ("sink", 2, 40, 42)
        assert "sink" in str(app.query_one("#status").render())
        assert store.conversation(app.conversation.id).settings.cache == "sink"
        sink_conversation = app.conversation.id

        await pilot.press("ctrl+n")
        short_replies(app, 8)
        await reply_to(app, pilot, "Hi")
        assert app.conversation.id != sink_conversation
        assert app.backend.cache_usage().policy == app.backend.llm.cache_spec.policy == "full"


@pytest.mark.asyncio
async def test_changing_the_cache_policy_mid_conversation_continues_it_in_a_new_cache(home, smollm):
    """Settings changed after a turn: no saved cache fits, so the next turn prefills the stored
    conversation into a cache of the new policy, and the turn after reuses it."""
    store = ChatStore()
    app = ChatApp(smollm, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        short_replies(app, 8)
        await reply_to(app, pilot, "Hi")
        assert app.backend.cache_usage().policy == "full"
        store.set_settings(app.conversation.id, ChatSettings(max_tokens=8, temperature=0.0, cache="sink", window=300))
        app.conversation = store.conversation(app.conversation.id)
        await reply_to(app, pilot, "And again?")
        usage = app.backend.cache_usage()
        assert (usage.policy, usage.window) == ("sink", 300)
        assert app.last_stats["reused"] == 0 and app.last_stats["processed"] > 10
        await reply_to(app, pilot, "Once more.")
        assert app.last_stats["reused"] > 10
        assert [m.role for m in store.messages(app.conversation.id)] == ["user", "assistant"] * 3


@pytest.mark.asyncio
async def test_speculative_decoding_shows_its_acceptance_and_can_be_off(home, smollm):
    store = ChatStore()
    app = ChatApp(smollm, store, cache={"draft": "lookup"})
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        short_replies(app, 48)
        await reply_to(app, pilot, "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox.")
        assert app.last_stats["drafted"].drafter == "lookup"
        assert "draft lookup:" in str(app.query_one("#status").render())

        await pilot.press("ctrl+n")
        app.new_settings = ChatSettings(max_tokens=8, temperature=0.0, draft=False)
        await reply_to(app, pilot, "Hi")
        assert app.last_stats["drafted"] is None
        assert "draft" not in str(app.query_one("#status").render())


@pytest.mark.asyncio
async def test_streaming_does_not_scroll_away_from_a_reader_who_scrolled_up(home, smollm):
    store = ChatStore()
    app = ChatApp(smollm, store)
    async with app.run_test(size=(110, 16)) as pilot:
        await ready(app, pilot)
        app.new_settings = ChatSettings(max_tokens=None, temperature=0.0)
        await send(app, pilot, "Tell me a very long story about a dragon and a knight, with many chapters.")
        chat = app.query_one("#chat")
        # Anchored: the view follows the reply while the reader stays at the bottom.
        await wait_for(pilot, lambda: chat.max_scroll_y > 5)
        await pilot.pause(0.2)
        assert chat.scroll_y == chat.max_scroll_y > 0
        chat.scroll_home(animate=False, immediate=True)
        heights, positions = [chat.max_scroll_y], set()
        parts = len(app.turn.view.query_children(MessageMarkdown))

        def streamed_on():
            positions.add(chat.scroll_y)
            heights.append(chat.max_scroll_y)
            # Until the reply's text has been handed on to new widgets twice (ReplyWriter).
            return len(app.turn.view.query_children(MessageMarkdown)) >= parts + 2

        await wait_for(pilot, streamed_on, step=0.005)
        assert positions == {0}
        # The reply never got shorter on screen, not even for a frame where a streamed part is
        # handed to a new widget, and it kept growing below the reader.
        assert heights == sorted(heights) and heights[-1] > 5
        await pilot.press("escape")
        await wait_for(pilot, lambda: not app.busy)


@pytest.mark.asyncio
async def test_a_long_prompt_shows_prefill_progress(home, smollm):
    store = ChatStore()
    app = ChatApp(smollm, store)
    # The progress bar as the first piece of the reply arrives: prefill has just ended.
    bar_at_first_token = []

    def hook(message):
        if isinstance(message, ReplyDelta) and not bar_at_first_token:
            bar = app.query_one("#progress")
            bar_at_first_token.append((not bar.has_class("hidden"), bar.progress, bar.total))

    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        await ready(app, pilot)
        short_replies(app, 4)
        prompt = "Summarise this text. " + "The quick brown fox jumps over the lazy dog. " * 40
        await reply_to(app, pilot, prompt)
        [(visible, done, total)] = bar_at_first_token
        assert visible and total > 256 and done == total
        assert app.query_one("#progress").has_class("hidden")


@pytest.mark.asyncio
async def test_the_event_loop_never_stalls_while_a_reply_streams(home, smollm):
    store = ChatStore()
    app = ChatApp(smollm, store)
    streaming = []

    def hook(message):
        if isinstance(message, ReplyDelta):
            streaming.append(True)
        elif isinstance(message, ReplyEnded):
            streaming.append(False)

    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        await ready(app, pilot)
        # As in a process of its own: none of the earlier tests' garbage left to collect.
        gc.collect()
        app.new_settings = ChatSettings(max_tokens=200, temperature=0.0)
        # How much later than asked the event loop wakes from each 10 ms sleep, while the
        # reply streams.
        lags = []

        async def probe():
            while True:
                before = time.perf_counter()
                await asyncio.sleep(0.01)
                if streaming and streaming[-1]:
                    lags.append(time.perf_counter() - before - 0.01)

        await send(app, pilot, "Explain how a bicycle works, in detail, with a list of its parts.")
        task = asyncio.get_running_loop().create_task(probe())
        await wait_for(pilot, lambda: not app.busy)
        task.cancel()
        assert app.turn.tokens > 20 and len(lags) > 20
        assert max(lags) < 0.1, f"the event loop stalled for {max(lags) * 1000:.0f} ms"


@pytest.mark.asyncio
async def test_errors_are_notifications_not_crashes(home, smollm, tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 64)
    store = ChatStore()
    app = ChatApp(str(corrupt), store)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: not app.loading)
        assert app.backend is None and app.model is None
        assert any(n.severity == "error" for n in app._notifications)
        # The app still answers keys: a message without a model is a warning.
        await send_without_model(app, pilot)

    app = ChatApp("no-such-model", ChatStore(tmp_path / "missing.sqlite3"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: not app.loading)
        [error] = [n for n in app._notifications if n.severity == "error"]
        assert "no-such-model" in error.message

    # Out of context under the full policy: the prompt alone exceeds the context.
    store = ChatStore(tmp_path / "other.sqlite3")
    app = ChatApp(smollm, store, n_ctx=32)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await send(app, pilot, "word " * 100)
        await wait_for(pilot, lambda: not app.busy)
        await pilot.pause()
        errors = [n for n in app._notifications if n.severity == "error"]
        assert errors and "ContextOverflowError" in errors[-1].title
        assert [m.role for m in store.messages(app.conversation.id)] == ["user"]
        assert [view.role for view in app.query(MessageView)] == ["user"]

    # A template failure: the sandbox stops a rendering past its output limit.
    store = ChatStore(tmp_path / "template.sqlite3")
    app = ChatApp(smollm, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        app.new_settings = ChatSettings(system="x" * (MAX_OUTPUT_CHARS + 1), max_tokens=4, temperature=0.0)
        await send(app, pilot, "Hi")
        await wait_for(pilot, lambda: not app.busy)
        await pilot.pause()
        errors = [n for n in app._notifications if n.severity == "error"]
        assert errors and "TemplateError" in errors[-1].title and "template" in errors[-1].message
        # The app goes on: a new conversation with a normal system prompt gets its reply.
        short_replies(app, 4)
        await pilot.press("ctrl+n")
        await reply_to(app, pilot, "Hi")
        assert [view.role for view in app.query(MessageView)] == ["user", "assistant"]


async def send_without_model(app, pilot):
    app.query_one(PromptInput).load_text("hello")
    await pilot.press("enter")
    await pilot.pause()
    assert app.turn is None
    assert any("No model" in n.message for n in app._notifications)


@pytest.mark.asyncio
async def test_search_rename_delete_and_export_from_the_app(home):
    store = ChatStore()
    owls = store.create_conversation("m", ChatSettings())
    store.add_message(owls.id, "user", "Tell me about owls")
    store.add_message(owls.id, "assistant", "Owls hunt at night.")
    cats = store.create_conversation("m", ChatSettings())
    store.add_message(cats.id, "user", "Tell me about cats")
    app = ChatApp(None, store)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+f")
        await pilot.press(*"night")
        await pilot.pause()
        assert [item.conversation_id for item in app.query(ConversationItem)] == [owls.id]
        await pilot.click(ConversationItem)
        await pilot.pause()
        assert app.conversation.id == owls.id

        app.action_rename()
        await pilot.pause()
        app.screen.query_one("#value").value = "Night birds"
        await pilot.press("enter")
        await pilot.pause()
        assert store.conversation(owls.id).title == "Night birds"

        app.action_export()
        exported = app.export_path(store.conversation(owls.id))
        assert exported.read_text().startswith("# Night birds\n")

        app.action_delete()
        await pilot.pause()
        await pilot.click("#yes")
        await pilot.pause()
        assert app.conversation is None and shown(app) == []
        assert [c.id for c in store.conversations()] == [cats.id]


@pytest.mark.slow
@pytest.mark.asyncio
async def test_choosing_a_missing_catalog_model_pulls_and_loads_it(home, smollm):
    from localllm.runtime.catalog import lookup

    store = ChatStore()
    app = ChatApp(None, store)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+o")
        await pilot.pause()
        picker = app.screen
        [index] = [i for i, (choice, _) in enumerate(picker.choices) if choice.model == SMOLLM]
        assert not picker.choices[index][0].present
        statuses = []
        picker.query_one("OptionList").highlighted = index
        await pilot.press("enter")

        def loaded():
            statuses.append(str(app.query_one("#status").render()))
            return not app.loading

        await wait_for(pilot, loaded, timeout=600, step=0.1)
        assert app.backend is not None
        assert any("pulling" in status for status in statuses)
        assert lookup(SMOLLM).path.is_file() and str(home) in str(lookup(SMOLLM).path)
        short_replies(app, 8)
        await reply_to(app, pilot, "Hi")
        assert stored(store, app.conversation.id)[0] == ("user", "Hi")
        assert store.conversation(app.conversation.id).model == SMOLLM


@pytest.mark.asyncio
async def test_deleting_a_conversation_while_it_streams(home, smollm):
    store = ChatStore()
    app = ChatApp(smollm, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        app.new_settings = ChatSettings(max_tokens=None, temperature=0.0)
        await send(app, pilot, "Tell me a very long story about a dragon.")
        await wait_for(pilot, lambda: app.turn.tokens >= 4)
        deleted = app.conversation.id
        app.action_delete()
        await pilot.pause()
        await pilot.click("#yes")
        await wait_for(pilot, lambda: not app.busy)
        await pilot.pause(0.2)
        assert app.conversation is None and shown(app) == []
        assert store.conversations() == [] and store.messages(deleted) == []
        # The app goes on: the next message starts a new conversation.
        short_replies(app, 8)
        await reply_to(app, pilot, "Hi")
        assert [m.role for m in store.messages(app.conversation.id)] == ["user", "assistant"]


@pytest.mark.asyncio
async def test_copying_a_code_block_and_the_last_reply(home, monkeypatch):
    # No clipboard tool: the copy goes out as an OSC 52 escape only.
    monkeypatch.setenv("PATH", "")
    store = ChatStore()
    conversation = store.create_conversation("m", ChatSettings())
    store.add_message(conversation.id, "user", "Reverse a string?")
    reply = "Like this:\n\n```python\nprint('abc'[::-1])\n```\n\nDone."
    store.add_message(conversation.id, "assistant", reply)
    app = ChatApp(None, store)
    async with app.run_test(size=SIZE) as pilot:
        app.open_conversation(conversation.id)
        await pilot.pause()
        await pilot.click("CodeFence")
        await pilot.pause()
        assert app.clipboard == "print('abc'[::-1])"
        await pilot.press("ctrl+t")
        await pilot.pause()
        assert app.clipboard == reply
        await pilot.click("MessageView.user > .role")
        await pilot.pause()
        assert app.clipboard == "Reverse a string?"


@pytest.mark.asyncio
async def test_the_chosen_theme_is_kept_for_the_next_start(home):
    store = ChatStore()
    async with ChatApp(None, store).run_test(size=SIZE) as pilot:
        assert pilot.app.theme != "nord"
        pilot.app.theme = "nord"
        await pilot.pause()
    async with ChatApp(None, ChatStore()).run_test(size=SIZE) as pilot:
        assert pilot.app.theme == "nord"


@pytest.mark.asyncio
async def test_the_status_bar_shows_sinks_window_and_evictions(home, smollm):
    store = ChatStore()
    app = ChatApp(smollm, store, cache={"cache": "sink", "window": 32})
    async with app.run_test(size=(160, 36)) as pilot:
        await ready(app, pilot)
        short_replies(app, 40)
        prompt = "Tell me a story about a cat who lives in a library."
        await reply_to(app, pilot, prompt)
        usage = app.backend.cache_usage()
        # The cache took the prompt and every reply token but the last one sampled (unless that
        # was the end of the reply, which is never fed).
        fed = app.turn.tokens - (1 if app.turn.tokens == 40 else 0)
        n_tokens = len(app.backend.llm.chat_prompt([{"role": "user", "content": prompt}])) + fed
        assert n_tokens > 36
        assert (usage.used, usage.capacity, usage.evicted) == (36, 36, n_tokens - 36)
        status = str(app.query_one("#status").render())
        assert f"cache 36/36 (sinks 4 + window 32), evicted {n_tokens - 36}" in status


@pytest.mark.asyncio
async def test_enter_sends_and_shift_enter_or_ctrl_j_start_a_new_line(home):
    app = ChatApp(None, ChatStore())
    async with app.run_test(size=SIZE) as pilot:
        prompt = app.query_one(PromptInput)
        await pilot.press("a", "ctrl+j", "b", "shift+enter", "c")
        assert prompt.text == "a\nb\nc"
        await pilot.press("enter")
        await pilot.pause()
        # No model: the message is refused with a warning and kept for later.
        assert prompt.text == "a\nb\nc" and app.conversation is None
        assert any("No model" in n.message for n in app._notifications)


@pytest.mark.asyncio
async def test_a_database_error_is_a_notification(home):
    store = ChatStore()
    conversation = store.create_conversation("m", ChatSettings())
    store.add_message(conversation.id, "user", "Hello")
    app = ChatApp(None, store)
    async with app.run_test(size=SIZE) as pilot:
        store.close()  # the database goes away under the app
        await pilot.press("ctrl+n")
        await pilot.pause()
        [error] = [n for n in app._notifications if n.severity == "error"]
        assert error.title == "Database error" and "chats.sqlite3" in error.message
        await pilot.press("f1")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)


@pytest.mark.asyncio
async def test_escape_during_a_long_prefill_keeps_the_message_and_no_reply(home, smollm):
    store = ChatStore()
    app = ChatApp(smollm, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await send(app, pilot, "Summarise this text. " + "The quick brown fox jumps over the lazy dog. " * 250)
        await pilot.press("escape")
        await wait_for(pilot, lambda: not app.busy)
        await pilot.pause()
        assert app.turn.tokens == 0
        assert [m.role for m in store.messages(app.conversation.id)] == ["user"]
        assert [view.role for view in app.query(MessageView)] == ["user"]


def test_split_points_fall_between_blocks_and_list_items_outside_code():
    assert split_point("One.\n\nTwo.\n") == (6, False)
    assert split_point("One.\n\nTwo") is None  # the line being written may still become anything
    assert split_point("- a\n- b\n- c\n") == (8, True)
    assert split_point("1. a\n2. b\n") == (5, True)
    assert split_point("  - nested\n") is None
    assert split_point("Parts:\n- a\n") is None  # a list right under a paragraph stays with it
    assert split_point("1. a\nmore of a\n2. b\n") == (15, True)  # after a lazy continuation line
    assert split_point("- a\n\n  more of a\n") is None  # a list item's second paragraph
    assert split_point("```\nx\n\ny\n```\n") is None
    assert split_point("```\nx\n\ny\n````\n\nz\n") == (15, False)
    assert split_point("~~~~\n```\n\nz\n~~~~\n") is None


LONG_REPLY = (
    "# A plan\n\nHere is the plan:\n\n"
    + "".join(f"- step {i}: do the thing number {i} carefully\n" for i in range(1, 31))
    + "\nThen, in order:\n\n"
    + "".join(f"{i}. stage {i}\n" for i in range(1, 10))
    + "\n```python\ndef f(x):\n\n    return x * 2\n```\n\n"
    + "## Notes\n\n> Quoted advice that the reader should keep in mind.\n\n"
    + "| a | b |\n|---|---|\n| 1 | 2 |\n\n"
    + "### Last\n\nThat is **all**; one more paragraph to end with.\n"
)


def screen_text(app) -> list[str]:
    """The screen's text, row by row, from Textual's SVG screenshot."""
    import html
    import re

    rows = {}
    for x, y, text in re.findall(r'<text[^>]*x="([\d.]+)" y="([\d.]+)"[^>]*>(.*?)</text>', app.export_screenshot()):
        rows.setdefault(float(y), []).append((float(x), html.unescape(text)))
    return ["".join(text for _, text in sorted(row)).rstrip() for _, row in sorted(rows.items())]


class OneMessage(App):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def compose(self):
        yield MessageView("assistant", self.text)


@pytest.mark.asyncio
async def test_a_streamed_reply_looks_the_same_as_the_stored_one():
    size = (90, 120)
    async with OneMessage(LONG_REPLY).run_test(size=size) as pilot:
        await pilot.pause()
        whole = screen_text(pilot.app)
    async with OneMessage("").run_test(size=size) as pilot:
        view = pilot.app.query_one(MessageView)
        writer = ReplyWriter(view)
        for start in range(0, len(LONG_REPLY), 37):
            await writer.write(LONG_REPLY[start : start + 37])
        await pilot.pause()
        assert view.text == LONG_REPLY
        # Spread over several widgets, so that no append re-rendered the whole list.
        assert len(view.query(MessageMarkdown)) > 5
        assert screen_text(pilot.app) == whole


def reuse(app) -> tuple[int, int]:
    """Prompt tokens of the last reply found in the cache, and processed."""
    return app.last_stats["reused"], app.last_stats["processed"]


@pytest.mark.asyncio
async def test_each_turn_reuses_the_cache_and_a_restart_continues_from_the_saved_one(home, smollm):
    store = ChatStore()
    app = ChatApp(smollm, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        short_replies(app, 12)
        await reply_to(app, pilot, "Name a big city.")
        assert reuse(app)[0] == 0
        first_prompt = sum(reuse(app))
        await reply_to(app, pilot, "Name another one.")
        reused, processed = reuse(app)
        # All of the first turn was in the cache: only the new message was processed.
        assert reused >= first_prompt and processed < 20
        conversation = app.conversation.id
        assert store.session_path(conversation).is_file()
    store.close()

    # A new process, as far as the app knows: the cache comes back from the session file.
    store = ChatStore()
    app = ChatApp(smollm, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        app.open_conversation(conversation)
        await pilot.pause()
        await reply_to(app, pilot, "And a third?")
        reused, processed = reuse(app)
        assert reused > first_prompt and processed < 20
        # Regenerating continues from the cache as it was before the last turn.
        first_turn = app.turn
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.turn is not first_turn and not app.busy)
        assert reuse(app) == (reused, processed)


@pytest.mark.asyncio
async def test_a_conversation_whose_session_file_is_unusable_is_answered_in_full(home, smollm):
    store = ChatStore()
    conversation = store.create_conversation("m", ChatSettings(max_tokens=8))
    store.add_message(conversation.id, "user", "Hello!")
    store.add_message(conversation.id, "assistant", "Hi! How can I help?")
    saved = store.session_path(conversation.id)
    saved.parent.mkdir(parents=True)
    saved.write_bytes(b"LOCALLLM-SESSION\n" + b"\x00" * 10)  # truncated
    app = ChatApp(smollm, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        app.open_conversation(conversation.id)
        await pilot.pause()
        await reply_to(app, pilot, "Tell me a joke.")
        assert reuse(app)[0] == 0 and reuse(app)[1] > 20
        assert [m.role for m in store.messages(conversation.id)] == ["user", "assistant"] * 2
    store.close()


@pytest.mark.asyncio
async def test_changing_the_system_prompt_prefills_the_conversation_once(home, smollm):
    store = ChatStore()
    app = ChatApp(smollm, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        short_replies(app, 8)
        await reply_to(app, pilot, "Hi")
        await reply_to(app, pilot, "Tell me a joke.")
        assert reuse(app)[0] > 0
        saved = store.session_path(app.conversation.id)
        app.action_settings()
        await pilot.pause()
        app.screen.query_one("#system").load_text("Be brief.")
        await pilot.click("#save")
        await pilot.pause()
        await reply_to(app, pilot, "Another one.")
        # No saved cache matches the new system prompt: this turn prefills the whole
        # conversation into a new session, whose file replaces the old ones.
        assert reuse(app)[0] == 0
        assert saved.exists() and not previous_file(saved).exists()
        await reply_to(app, pilot, "And one more.")
        assert reuse(app)[0] > 0
        assert [m.role for m in store.messages(app.conversation.id)] == ["user", "assistant"] * 4


@pytest.mark.asyncio
async def test_deleting_a_conversation_deletes_its_saved_cache(home, smollm):
    store = ChatStore()
    app = ChatApp(smollm, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        short_replies(app, 8)
        await reply_to(app, pilot, "Hi")
        await reply_to(app, pilot, "Hi again")
        saved = store.session_path(app.conversation.id)
        assert saved.is_file() and previous_file(saved).is_file()
        app.action_delete()
        await pilot.pause()
        await pilot.click("#yes")
        await pilot.pause()
        assert not saved.exists() and not previous_file(saved).exists()
