"""The chat app's conversations, in one SQLite database under `$LOCALLLM_HOME/chat`.

The schema carries its version in `PRAGMA user_version`; `MIGRATIONS[i]` brings a database
from version i to i + 1, so a database written by an older app is upgraded in place when it is
opened, and one written by a newer app is refused rather than misread.

Every write is committed at once (autocommit) in WAL mode: a reply is stored as it streams, so
an app killed mid-reply leaves a database that opens with everything that was on screen.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from localllm.errors import LocalLLMError
from localllm.runtime.catalog import home_dir
from localllm.tui.settings import ChatSettings

TITLE_LENGTH = 48

MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: conversations and their messages. AUTOINCREMENT: an id is never reused, so a
    # deleted conversation's files or a late write to a deleted message cannot hit a new one.
    """
    CREATE TABLE conversations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        title TEXT NOT NULL,
        model TEXT NOT NULL,
        settings TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        created REAL NOT NULL
    );
    CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
    """,
    # 1 -> 2: a title the user chose is kept; others follow the first message.
    """
    ALTER TABLE conversations ADD COLUMN renamed INTEGER NOT NULL DEFAULT 0;
    """,
    # 2 -> 3: the app's own preferences (its theme).
    """
    CREATE TABLE preferences (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class ChatStoreError(LocalLLMError):
    """The conversation database cannot be opened or used."""


def _checked(method):
    """SQLite's errors (a full disk, a locked or damaged file) as ChatStoreError."""

    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as error:
            raise ChatStoreError(f"conversation database {self.path}: {error}") from None

    return checked


@dataclass(frozen=True)
class Conversation:
    id: int
    title: str
    model: str
    settings: ChatSettings
    created: float
    updated: float


@dataclass(frozen=True)
class Message:
    id: int
    role: str
    content: str


def default_path() -> Path:
    return home_dir() / "chat" / "chats.sqlite3"


def title_of(text: str) -> str:
    """A conversation's title from its first message: the first line, shortened."""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if len(line) > TITLE_LENGTH:
        line = line[: TITLE_LENGTH - 1].rstrip() + "…"
    return line or "New chat"


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class ChatStore:
    """Conversations and messages; used from one thread (the app's)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL still survives the process being killed; only a power loss
            # can lose the last commits, and it saves an fsync per streamed update.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.Error as error:
            raise ChatStoreError(f"cannot open the conversation database {self.path}: {error}") from None

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ChatStoreError(
                f"{self.path} has schema version {version}, newer than this localllm's {SCHEMA_VERSION}"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            # executescript commits first, so the migration and its version bump are made one
            # transaction by hand: a crash mid-way leaves the previous version intact.
            self._db.executescript(f"BEGIN; {MIGRATIONS[target - 1]} PRAGMA user_version = {target}; COMMIT;")

    @property
    def schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    # ---- preferences --------------------------------------------------------------------

    @_checked
    def preference(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM preferences WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    @_checked
    def set_preference(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO preferences (key, value) VALUES (?, ?)", (key, value))

    # ---- conversations ------------------------------------------------------------------

    @_checked
    def create_conversation(self, model: str, settings: ChatSettings, title: str = "New chat") -> Conversation:
        now = time.time()
        cursor = self._db.execute(
            "INSERT INTO conversations (title, model, settings, created, updated) VALUES (?, ?, ?, ?, ?)",
            (title, model, settings.to_json(), now, now),
        )
        return self.conversation(cursor.lastrowid)

    @_checked
    def conversation(self, conversation_id: int) -> Conversation:
        row = self._db.execute(
            "SELECT id, title, model, settings, created, updated FROM conversations WHERE id = ?", (conversation_id,)
        ).fetchone()
        if row is None:
            raise ChatStoreError(f"no conversation {conversation_id}")
        return self._conversation(row)

    @staticmethod
    def _conversation(row) -> Conversation:
        return Conversation(row[0], row[1], row[2], ChatSettings.from_json(row[3]), row[4], row[5])

    @_checked
    def conversations(self, search: str = "") -> list[Conversation]:
        """Every conversation, most recently active first; `search` keeps those whose title or
        any message contains it (case-insensitively, for ASCII letters)."""
        query = "SELECT id, title, model, settings, created, updated FROM conversations"
        params: tuple = ()
        if search:
            pattern = f"%{_escape_like(search)}%"
            query += (
                " WHERE title LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 FROM messages m"
                " WHERE m.conversation_id = conversations.id AND m.content LIKE ? ESCAPE '\\')"
            )
            params = (pattern, pattern)
        query += " ORDER BY updated DESC, id DESC"
        return [self._conversation(row) for row in self._db.execute(query, params)]

    @_checked
    def rename(self, conversation_id: int, title: str) -> None:
        title = " ".join(title.split()) or "New chat"
        self._db.execute("UPDATE conversations SET title = ?, renamed = 1 WHERE id = ?", (title, conversation_id))

    @_checked
    def set_settings(self, conversation_id: int, settings: ChatSettings) -> None:
        self._db.execute("UPDATE conversations SET settings = ? WHERE id = ?", (settings.to_json(), conversation_id))

    @_checked
    def delete(self, conversation_id: int) -> None:
        self._db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # ---- messages -----------------------------------------------------------------------

    @_checked
    def messages(self, conversation_id: int) -> list[Message]:
        rows = self._db.execute(
            "SELECT id, role, content FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)
        )
        return [Message(*row) for row in rows]

    @_checked
    def add_message(self, conversation_id: int, role: str, content: str) -> int:
        now = time.time()
        with self._db:
            self._db.execute("BEGIN")
            cursor = self._db.execute(
                "INSERT INTO messages (conversation_id, role, content, created) VALUES (?, ?, ?, ?)",
                (conversation_id, role, content, now),
            )
            self._db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation_id))
            if role == "user":
                # The first user message names a conversation the user has not renamed.
                self._db.execute(
                    "UPDATE conversations SET title = ? WHERE id = ? AND renamed = 0 AND title = 'New chat'",
                    (title_of(content), conversation_id),
                )
        return cursor.lastrowid

    @_checked
    def update_message(self, message_id: int, content: str) -> None:
        self._db.execute("UPDATE messages SET content = ? WHERE id = ?", (content, message_id))

    @_checked
    def delete_messages_from(self, conversation_id: int, message_id: int) -> None:
        """Delete message `message_id` and every later one of the conversation."""
        self._db.execute("DELETE FROM messages WHERE conversation_id = ? AND id >= ?", (conversation_id, message_id))

    def session_path(self, conversation_id: int) -> Path:
        """Where the conversation's KV cache is saved (a runtime session file), beside the
        database."""
        return self.path.parent / "sessions" / f"{conversation_id}.session"

    # ---- export -------------------------------------------------------------------------

    @_checked
    def export_markdown(self, conversation_id: int) -> str:
        conversation = self.conversation(conversation_id)
        lines = [f"# {conversation.title}", "", f"*Model: {conversation.model}*", ""]
        if conversation.settings.system:
            lines += ["## System", "", conversation.settings.system, ""]
        for message in self.messages(conversation_id):
            lines += [f"## {message.role.capitalize()}", "", message.content, ""]
        return "\n".join(lines)
