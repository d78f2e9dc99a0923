"""Snapshots of the chat app's screens whose content is deterministic: no model loaded, no
generated text, a fixed terminal size. `pytest --snapshot-update` rewrites the baselines in
tests/__snapshots__/ after a deliberate change to the screens."""

import json
from pathlib import Path

import pytest

from localllm.tui.app import ChatApp
from localllm.tui.settings import ChatSettings
from localllm.tui.store import ChatStore

FIXTURE = Path(__file__).parent / "data" / "tui" / "conversation.json"
SIZE = (100, 32)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALLLM_HOME", str(tmp_path))
    store = ChatStore()
    yield store
    store.close()


def load_fixture(store: ChatStore) -> int:
    data = json.loads(FIXTURE.read_text())
    conversation = store.create_conversation(data["model"], ChatSettings(**data["settings"]), title=data["title"])
    for message in data["messages"]:
        store.add_message(conversation.id, message["role"], message["content"])
    return conversation.id


def test_empty_app(snap_compare, store):
    assert snap_compare(ChatApp(None, store), terminal_size=SIZE)


def test_settings_dialog(snap_compare, store):
    assert snap_compare(ChatApp(None, store), press=["ctrl+s"], terminal_size=SIZE)


def test_model_picker(snap_compare, store):
    assert snap_compare(ChatApp(None, store), press=["ctrl+o"], terminal_size=SIZE)


def test_help(snap_compare, store):
    assert snap_compare(ChatApp(None, store), press=["f1"], terminal_size=SIZE)


def test_a_stored_conversation(snap_compare, store):
    conversation_id = load_fixture(store)
    app = ChatApp(None, store)

    async def open_it(pilot):
        app.open_conversation(conversation_id)
        await pilot.pause()

    assert snap_compare(app, run_before=open_it, terminal_size=SIZE)
