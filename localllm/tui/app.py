"""`localllm chat`: the Textual chat app.

The model runs in this process. Loading, pulling and generating run in worker threads and
report back with messages; the app thread owns the widgets and the database. A reply is
written to the database before it is drawn, so what the screen shows is always stored.
"""

from __future__ import annotations

import functools
import gc
import inspect
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.message import Message
from textual.widgets import Footer, Input, ListView, ProgressBar
from textual.widgets.markdown import MarkdownFence

from localllm.errors import LocalLLMError
from localllm.runtime.engine import Completion
from localllm.tui.backend import Backend, memory_in_use, model_label, needs_pull, pull_model, remove_files
from localllm.tui.screens import Confirm, HelpScreen, ModelChoice, ModelPicker, SettingsScreen, TextPrompt
from localllm.tui.settings import ChatSettings
from localllm.tui.store import ChatStore, ChatStoreError, Conversation, title_of
from localllm.tui.widgets import ConversationItem, MessageView, PromptInput, ReplyWriter, StatusBar

# Streamed text reaches the screen at most this often: each update re-renders Markdown, and
# batching keeps the event loop free however fast tokens come.
FLUSH_SECONDS = 1 / 12
# Collections of the middle generation between two automatic full ones (Python's default: 10).
FULL_COLLECTION_EVERY = 1000
# Prompts shorter than this prefill too fast for a progress bar to be worth drawing.
PREFILL_BAR_MIN_TOKENS = 256


@dataclass(eq=False)
class Turn:
    """One reply being generated, and where it goes."""

    conversation_id: int
    settings: ChatSettings
    view: MessageView
    cancel: threading.Event = field(default_factory=threading.Event)
    text: str = ""
    message_id: int | None = None
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    writer: ReplyWriter | None = None
    ended: bool = False
    # Set when its conversation is deleted: what is still to come goes nowhere.
    discarded: bool = False


class Loaded(Message):
    def __init__(self, model: str, backend: Backend | None, error: Exception | None) -> None:
        super().__init__()
        self.model = model
        self.backend = backend
        self.error = error


class LoadProgress(Message):
    def __init__(self, text: str, done: int | None = None, total: int | None = None) -> None:
        super().__init__()
        self.text = text
        self.done = done
        self.total = total


class PrefillProgress(Message):
    def __init__(self, turn: Turn, done: int, total: int) -> None:
        super().__init__()
        self.turn = turn
        self.done = done
        self.total = total


class ReplyDelta(Message):
    def __init__(self, turn: Turn, text: str, tokens: int) -> None:
        super().__init__()
        self.turn = turn
        self.text = text
        self.tokens = tokens


class ReplyEnded(Message):
    def __init__(self, turn: Turn, completion: Completion | None, error: Exception | None) -> None:
        super().__init__()
        self.turn = turn
        self.completion = completion
        self.error = error


def _store_errors_notified(handler):
    """Run an app handler that uses the database; a database error becomes a notification
    instead of ending the app (the conversation on screen stays as it is)."""

    def notify(app: ChatApp, error: ChatStoreError) -> None:
        app.notify(str(error), title="Database error", severity="error", timeout=10)

    if inspect.iscoroutinefunction(handler):

        @functools.wraps(handler)
        async def guarded_async(self, *args, **kwargs):
            try:
                return await handler(self, *args, **kwargs)
            except ChatStoreError as error:
                notify(self, error)

        return guarded_async

    @functools.wraps(handler)
    def guarded(self, *args, **kwargs):
        try:
            return handler(self, *args, **kwargs)
        except ChatStoreError as error:
            notify(self, error)

    return guarded


class ChatApp(App):
    """The chat app over `model` (a catalog name or a .gguf path; None: none until one is
    chosen), with its conversations in `store`; new conversations start with `settings`.
    `cache` holds LLM's cache keywords (cache, sinks, window, kv_dtype)."""

    TITLE = "localllm chat"
    CSS = """
    Screen:inline { height: 80vh; }
    #body { height: 1fr; }
    #sidebar { width: 32; border-right: solid $panel-lighten-2; }
    #sidebar.hidden { display: none; }
    #search { margin: 0 0 1 0; }
    #chat { height: 1fr; }
    #progress { height: 1; margin: 0 1; }
    #progress.hidden { display: none; }
    """
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+n", "new_chat", "New"),
        Binding("ctrl+b", "toggle_sidebar", "Chats"),
        Binding("ctrl+f", "search", "Search", show=False),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+g", "edit_last", "Edit last"),
        Binding("ctrl+s", "settings", "Settings"),
        Binding("ctrl+o", "models", "Model"),
        Binding("ctrl+t", "copy_reply", "Copy reply", show=False),
        Binding("f1", "help", "Help"),
    ]

    def __init__(
        self,
        model: str | None,
        store: ChatStore,
        *,
        n_ctx: int | None = None,
        threads: int | str | None = None,
        cache: dict | None = None,
        settings: ChatSettings | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        # How the status bar and the stored conversations name the model.
        self.label = model_label(model) if model is not None else None
        self.store = store
        self.backend: Backend | None = None
        self._load_options = {"n_ctx": n_ctx, "threads": threads, **(cache or {})}
        self.conversation: Conversation | None = None
        # What a new conversation starts with; `new_settings` holds the next one's, until its
        # first message creates it.
        self.default_settings = settings or ChatSettings()
        self.new_settings = self.default_settings
        self.turn: Turn | None = None
        self.editing: int | None = None
        self.last_stats: dict = {}
        self.loading = False

    # ---- layout -------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with Horizontal(id="body"):
            with Vertical(id="sidebar"):
                yield Input(placeholder="search conversations", id="search")
                yield ListView(id="conversations")
            with Vertical(id="main"):
                yield VerticalScroll(id="chat")
                yield ProgressBar(id="progress", classes="hidden", show_eta=False)
                yield PromptInput(id="prompt")
        yield StatusBar(id="status")
        yield Footer()

    @_store_errors_notified
    def on_mount(self) -> None:
        theme = self.store.preference("theme")
        if theme in self.available_themes:
            self.theme = theme
        self.watch(self, "theme", self._save_theme, init=False)
        self.query_one("#chat", VerticalScroll).anchor()
        self.refresh_conversations()
        self.query_one(PromptInput).focus()
        self.update_status()
        if self.model is not None:
            self.load_model(self.model)

    @_store_errors_notified
    def _save_theme(self, theme: str) -> None:
        self.store.set_preference("theme", theme)

    def exit(self, result=None, return_code: int = 0, message=None) -> None:
        # The app waits for its worker threads: a reply still running would keep it open.
        if self.busy:
            self.turn.cancel.set()
        super().exit(result, return_code, message)

    @property
    def busy(self) -> bool:
        return self.turn is not None and not self.turn.ended

    @property
    def settings(self) -> ChatSettings:
        return self.conversation.settings if self.conversation is not None else self.new_settings

    # ---- status -------------------------------------------------------------------------

    def update_status(self, note: str = "") -> None:
        try:
            status = self.query_one(StatusBar)
        except NoMatches:
            # A reply's last pieces can arrive while the app closes and its screen is gone.
            return
        if self.model is None:
            status.show("no model", note=note or "Ctrl+O chooses one")
            return
        if self.backend is None:
            status.show(self.label, note=note or ("loading…" if self.loading else "not loaded"))
            return
        stats = {} if note else self.last_stats
        status.show(self.label, cache=self.backend.cache_usage(), memory=memory_in_use(), note=note, **stats)

    def show_progress(self, done: int | None = None, total: int | None = None, *, visible: bool = True) -> None:
        """The progress bar above the input: `done` of `total`, or an indeterminate one
        without a total; hidden when not `visible`."""
        bar = self.query_one("#progress", ProgressBar)
        bar.set_class(not visible, "hidden")
        if visible:
            bar.update(total=total, progress=done or 0)

    # ---- the model ----------------------------------------------------------------------

    def load_model(self, model: str) -> None:
        if self.busy:
            self.turn.cancel.set()
        self.model = model
        self.label = model_label(model)
        self.loading = True
        previous, self.backend = self.backend, None
        self.update_status()
        self._load(model, previous)

    @work(thread=True, exclusive=True, group="load")
    def _load(self, model: str, previous: Backend | None) -> None:
        if previous is not None:
            # Waits for a cancelled reply to let go of the model: off the app thread.
            previous.close()
        try:
            if needs_pull(model):
                self.post_message(LoadProgress(f"pulling {model}…"))
                pull_model(model, self._pull_progress(model))

            def compiling(label: str, done: int, total: int) -> None:
                self.post_message(LoadProgress(f"compiling kernels {done + 1}/{total}: {label}", done + 1, total))

            self.post_message(LoadProgress("loading…"))
            backend = Backend(model, compile_progress=compiling, **self._load_options)
        except (LocalLLMError, OSError, MemoryError) as error:
            self.post_message(Loaded(model, None, error))
            return
        self.post_message(Loaded(model, backend, None))

    def _pull_progress(self, model: str):
        """A pull callback posting progress each time another percent of the bytes is in (a
        message per chunk read would flood the app's queue)."""
        from rich.filesize import decimal

        shown = [-1]

        def report(done: int, total: int) -> None:
            percent = done * 100 // max(total, 1)
            if percent > shown[0]:
                shown[0] = percent
                text = f"pulling {model}: {decimal(done)} of {decimal(total)}"
                self.post_message(LoadProgress(text, done, total))

        return report

    def on_load_progress(self, event: LoadProgress) -> None:
        self.update_status(event.text)
        self.show_progress(event.done, event.total)

    def on_loaded(self, event: Loaded) -> None:
        if event.model != self.model:
            # A later choice superseded this load.
            if event.backend is not None:
                event.backend.close()
            return
        self.loading = False
        self.show_progress(visible=False)
        if event.error is not None:
            self.model = self.label = None
            self.update_status()
            self.notify(str(event.error), title="Cannot load the model", severity="error", timeout=10)
            return
        self.backend = event.backend
        # A full collection walks every object alive, and the model's libraries (Numba, LLVM)
        # bring hundreds of thousands: about 200 ms with the GIL held, whichever thread
        # triggers it, so the screen froze every second or two while a reply streamed. What is
        # alive now lives as long as the app: exempt it from collections. The widgets a
        # streamed reply renders and drops still take 100 ms to collect in full, so full
        # collections wait for the end of a reply (on_reply_ended) rather than coming every
        # ten young ones.
        gc.freeze()
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)
        self.last_stats = {}
        self.update_status()
        self.notify(f"{self.label} is ready", timeout=3)

    # ---- conversations ------------------------------------------------------------------

    def refresh_conversations(self) -> None:
        search = self.query_one("#search", Input).value
        listing = self.query_one("#conversations", ListView)
        listing.clear()
        conversations = self.store.conversations(search)
        listing.extend(ConversationItem(c.id, c.title) for c in conversations)
        if self.conversation is not None:
            for index, conversation in enumerate(conversations):
                if conversation.id == self.conversation.id:
                    listing.index = index

    @on(Input.Changed, "#search")
    @_store_errors_notified
    def _search_changed(self) -> None:
        self.refresh_conversations()

    @on(ListView.Selected, "#conversations")
    @_store_errors_notified
    def _conversation_selected(self, event: ListView.Selected) -> None:
        if self.conversation is None or event.item.conversation_id != self.conversation.id:
            self.open_conversation(event.item.conversation_id)
        self.query_one(PromptInput).focus()

    def open_conversation(self, conversation_id: int | None) -> None:
        """Show a stored conversation, or an empty new one (None); a running reply stops."""
        if self.busy:
            self.turn.cancel.set()
        self.editing = None
        chat = self.query_one("#chat", VerticalScroll)
        chat.remove_children()
        if conversation_id is None:
            self.conversation = None
            self.new_settings = self.default_settings
        else:
            self.conversation = self.store.conversation(conversation_id)
            chat.mount_all(MessageView(m.role, m.content, m.id) for m in self.store.messages(conversation_id))
        chat.anchor()
        self.refresh_conversations()

    @_store_errors_notified
    def action_new_chat(self) -> None:
        self.open_conversation(None)
        self.query_one(PromptInput).focus()

    def action_toggle_sidebar(self) -> None:
        self.query_one("#sidebar").toggle_class("hidden")

    def action_search(self) -> None:
        self.query_one("#sidebar").remove_class("hidden")
        self.query_one("#search", Input).focus()

    def action_rename(self) -> None:
        if self.conversation is None:
            self.notify("Nothing to rename yet: send a first message", severity="warning")
            return
        renamed = functools.partial(self._renamed, self.conversation.id)
        self.push_screen(TextPrompt("Rename the conversation", self.conversation.title), renamed)

    @_store_errors_notified
    def _renamed(self, conversation_id: int, title: str | None) -> None:
        if title is not None:
            self.store.rename(conversation_id, title)
            if self.conversation is not None and self.conversation.id == conversation_id:
                self.conversation = self.store.conversation(conversation_id)
            self.refresh_conversations()

    def action_delete(self) -> None:
        if self.conversation is None:
            return
        confirmed = functools.partial(self._delete_confirmed, self.conversation.id)
        self.push_screen(Confirm(f"Delete “{self.conversation.title}”?"), confirmed)

    @_store_errors_notified
    def _delete_confirmed(self, conversation_id: int, yes: bool | None) -> None:
        if not yes:
            return
        if self.busy and self.turn.conversation_id == conversation_id:
            self.turn.cancel.set()
            self.turn.discarded = True
        if self.conversation is not None and self.conversation.id == conversation_id:
            self.open_conversation(None)
        self.store.delete(conversation_id)
        remove_files(self.store.session_path(conversation_id))
        if self.backend is not None:
            self.backend.forget(conversation_id)
        self.refresh_conversations()

    @_store_errors_notified
    def action_export(self) -> None:
        if self.conversation is None:
            self.notify("Nothing to export yet", severity="warning")
            return
        path = self.export_path(self.conversation)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self.store.export_markdown(self.conversation.id), encoding="utf-8")
        except OSError as error:
            self.notify(f"Cannot write {path}: {error.strerror}", severity="error")
            return
        self.notify(f"Exported to {path}", timeout=8)

    def export_path(self, conversation: Conversation) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in conversation.title).strip("-")[:40]
        return self.store.path.parent / "exports" / f"{conversation.id}-{safe or 'chat'}.md"

    # ---- settings, models, help ---------------------------------------------------------

    def action_settings(self) -> None:
        conversation_id = self.conversation.id if self.conversation is not None else None
        self.push_screen(SettingsScreen(self.settings), functools.partial(self._settings_chosen, conversation_id))

    @_store_errors_notified
    def _settings_chosen(self, conversation_id: int | None, settings: ChatSettings | None) -> None:
        if settings is None:
            return
        if conversation_id is None:
            self.new_settings = settings
            return
        self.store.set_settings(conversation_id, settings)
        if self.conversation is not None and self.conversation.id == conversation_id:
            self.conversation = self.store.conversation(conversation_id)
        self.notify("Settings saved", timeout=2)

    def action_models(self) -> None:
        def chosen(choice: ModelChoice | None) -> None:
            if choice is not None:
                self.load_model(choice.model)

        self.push_screen(ModelPicker(self.label), chosen)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        commands = (
            ("New conversation", "Start an empty conversation (Ctrl+N)", self.action_new_chat),
            ("Regenerate reply", "Answer the last message again (Ctrl+R)", self.action_regenerate),
            ("Edit last message", "Change the last message and send it again (Ctrl+G)", self.action_edit_last),
            ("Stop reply", "Stop the reply being generated (Esc)", self.action_stop),
            ("Conversation settings", "System prompt and sampling (Ctrl+S)", self.action_settings),
            ("Choose model", "Pick a model from the store or the catalog (Ctrl+O)", self.action_models),
            ("Rename conversation", "Give the conversation a title", self.action_rename),
            ("Delete conversation", "Delete the conversation and its messages", self.action_delete),
            ("Export conversation", "Write the conversation as Markdown", self.action_export),
            ("Copy last reply", "Copy the last reply to the clipboard (Ctrl+T)", self.action_copy_reply),
            ("Copy last code block", "Copy the last code block of the conversation", self.action_copy_code),
            ("Search conversations", "Filter the conversation list by text (Ctrl+F)", self.action_search),
            ("Toggle conversation list", "Show or hide the conversation list (Ctrl+B)", self.action_toggle_sidebar),
            ("Key bindings", "Show the keys (F1)", self.action_help),
        )
        for title, help_text, callback in commands:
            yield SystemCommand(title, help_text, callback)

    # ---- copying ------------------------------------------------------------------------

    def copy_text(self, text: str, what: str) -> None:
        """To the system clipboard through a clipboard tool when there is one, and always as an
        OSC 52 escape, which terminals (also over ssh) pass to theirs."""
        for command in (["wl-copy"], ["xclip", "-selection", "clipboard"], ["xsel", "-ib"], ["pbcopy"]):
            if not shutil.which(command[0]):
                continue
            try:
                # A tool without its display (wl-copy over ssh, say) fails: try the next one.
                done = subprocess.run(
                    command, input=text.encode(), timeout=2, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            except (OSError, subprocess.SubprocessError):
                continue
            if done.returncode == 0:
                break
        self.copy_to_clipboard(text)
        self.notify(f"Copied the {what}", timeout=2)

    def on_message_view_copy_requested(self, event: MessageView.CopyRequested) -> None:
        self.copy_text(event.text, event.what)

    def _views(self) -> list[MessageView]:
        return list(self.query_one("#chat").query_children(MessageView))

    def action_copy_reply(self) -> None:
        replies = [view for view in self._views() if view.role == "assistant"]
        if not replies:
            self.notify("No reply to copy yet", severity="warning")
            return
        view = replies[-1]
        self.copy_text(view.text, "reply")

    def action_copy_code(self) -> None:
        fences = list(self.query_one("#chat").query(MarkdownFence))
        if not fences:
            self.notify("No code block in this conversation", severity="warning")
            return
        self.copy_text(fences[-1].code, "code block")

    # ---- sending and replies ------------------------------------------------------------

    def _check_ready(self) -> bool:
        if self.busy:
            self.notify("A reply is still being generated: Esc stops it", severity="warning")
            return False
        if self.backend is None:
            self.notify(
                "No model loaded yet" + (": loading…" if self.loading else ": Ctrl+O chooses one"), severity="warning"
            )
            return False
        return True

    @on(PromptInput.Submitted)
    @_store_errors_notified
    async def _submitted(self, event: PromptInput.Submitted) -> None:
        if not self._check_ready():
            return
        prompt = self.query_one(PromptInput)
        prompt.clear()
        if self.conversation is None:
            self.conversation = self.store.create_conversation(
                self.label, self.new_settings, title=title_of(event.text)
            )
        elif self.editing is not None:
            self.store.delete_messages_from(self.conversation.id, self.editing)
            for view in self._views():
                if view.message_id is not None and view.message_id >= self.editing:
                    view.remove()
        self.editing = None
        message_id = self.store.add_message(self.conversation.id, "user", event.text)
        await self.query_one("#chat").mount(MessageView("user", event.text, message_id))
        self.refresh_conversations()
        await self.start_reply()

    async def start_reply(self) -> None:
        """Answer the conversation as stored: its last message is the user's."""
        conversation = self.conversation
        history = [{"role": m.role, "content": m.content} for m in self.store.messages(conversation.id)]
        view = MessageView("assistant", "")
        await self.query_one("#chat", VerticalScroll).mount(view)
        turn = Turn(conversation.id, conversation.settings, view)
        turn.writer = ReplyWriter(view)
        self.turn = turn
        self.update_status("prefill…")
        self._generate(self.backend, turn, history, self.store.session_path(conversation.id))

    @work(thread=True, group="reply")
    def _generate(self, backend: Backend, turn: Turn, history: list[dict], saved: Path) -> None:
        completion = None
        try:
            answer = backend.reply(
                history,
                turn.settings,
                key=turn.conversation_id,
                saved=saved,
                cancel=turn.cancel,
                progress=lambda done, total: self.post_message(PrefillProgress(turn, done, total)),
            )
            generation = answer.generation
            pending: list[str] = []
            tokens = 0
            flushed = time.perf_counter()
            for chunk in generation:
                if chunk.token_id is not None:
                    tokens += 1
                if chunk.text:
                    pending.append(chunk.text)
                now = time.perf_counter()
                if pending and now - flushed >= FLUSH_SECONDS:
                    self.post_message(ReplyDelta(turn, "".join(pending), tokens))
                    pending.clear()
                    flushed = now
            if pending:
                self.post_message(ReplyDelta(turn, "".join(pending), tokens))
            completion = generation.completion
        except (LocalLLMError, OSError, MemoryError) as error:
            self.post_message(ReplyEnded(turn, completion, error))
            return
        self.post_message(ReplyEnded(turn, completion, None))
        if turn.discarded:
            return
        # After the reply has ended on screen: saving a long conversation's cache takes a
        # moment, and the first save with a model file hashes it.
        try:
            answer.save(saved)
        except (LocalLLMError, OSError) as error:
            self.notify(f"The conversation's cache was not saved: {error}", severity="warning", timeout=8)

    def on_prefill_progress(self, event: PrefillProgress) -> None:
        if event.turn is self.turn and not event.turn.ended and event.total >= PREFILL_BAR_MIN_TOKENS:
            self.show_progress(event.done, event.total)
            self.update_status(f"prefill {event.done}/{event.total}")

    @_store_errors_notified
    async def on_reply_delta(self, event: ReplyDelta) -> None:
        turn = event.turn
        if turn.discarded:
            return
        if turn is self.turn and turn.tokens == 0:
            self.show_progress(visible=False)
        turn.text += event.text
        turn.tokens = event.tokens
        # Stored before it is drawn: a kill at any moment leaves on disk all that was shown.
        if turn.message_id is None:
            turn.message_id = self.store.add_message(turn.conversation_id, "assistant", turn.text)
            turn.view.message_id = turn.message_id
        else:
            self.store.update_message(turn.message_id, turn.text)
        if turn.view.is_attached:
            await turn.writer.write(event.text)
        if turn is self.turn:
            elapsed = time.perf_counter() - turn.started
            self.update_status(f"{turn.tokens} tokens, {turn.tokens / elapsed:.1f} tok/s" if elapsed > 0 else "")

    @_store_errors_notified
    def on_reply_ended(self, event: ReplyEnded) -> None:
        turn = event.turn
        turn.ended = True
        # The garbage of the reply's renders, now that no more are coming (see on_loaded).
        gc.collect()
        empty = turn.message_id is None and event.error is None and not turn.cancel.is_set()
        if empty and not turn.discarded:
            # Stored although empty: the conversation goes on from it, as its session does.
            turn.message_id = self.store.add_message(turn.conversation_id, "assistant", "")
            turn.view.message_id = turn.message_id
        view = turn.view
        if view.is_attached:
            if empty:
                view.set_note("(the model ended its reply at once)")
            elif turn.message_id is None:
                view.remove()
            elif turn.cancel.is_set():
                view.set_note("(stopped)")
            elif event.completion is not None and event.completion.stop_reason == "length":
                limit = turn.settings.max_tokens
                full = limit is None or event.completion.stats.completion_tokens < limit
                view.set_note("(the context is full)" if full else f"(stopped at the limit of {limit} tokens)")
        if turn is self.turn:
            self.show_progress(visible=False)
            completion = event.completion
            if completion is not None:
                stats = completion.stats
                self.last_stats = {
                    "rate": stats.tokens_per_second,
                    "reused": stats.reused_tokens,
                    "processed": stats.processed_prompt_tokens,
                    "drafted": stats.speculative,
                }
            self.update_status()
        if event.error is not None:
            self.notify(str(event.error), title=type(event.error).__name__, severity="error", timeout=10)

    def action_stop(self) -> None:
        if self.busy:
            self.turn.cancel.set()
        elif self.editing is not None:
            self.editing = None
            self.query_one(PromptInput).clear()
            self.notify("Edit cancelled", timeout=2)

    @_store_errors_notified
    async def action_regenerate(self) -> None:
        if self.conversation is None or not self._check_ready():
            return
        messages = self.store.messages(self.conversation.id)
        if not messages:
            return
        if messages[-1].role == "assistant":
            self.store.delete_messages_from(self.conversation.id, messages[-1].id)
            for view in self._views():
                if view.message_id == messages[-1].id:
                    await view.remove()
        await self.start_reply()

    @_store_errors_notified
    def action_edit_last(self) -> None:
        if self.conversation is None or self.busy:
            return
        users = [m for m in self.store.messages(self.conversation.id) if m.role == "user"]
        if not users:
            return
        self.editing = users[-1].id
        prompt = self.query_one(PromptInput)
        prompt.load_text(users[-1].content)
        prompt.focus()
        self.notify("Editing the last message: Enter sends it again, Esc cancels", timeout=4)


def run(
    model: str | None,
    *,
    n_ctx: int | None = None,
    threads: int | str | None = None,
    cache: dict | None = None,
    inline: bool = False,
    settings: ChatSettings | None = None,
) -> None:
    """Run the app; `inline` draws it below the shell prompt instead of on the whole screen."""
    store = ChatStore()
    try:
        app = ChatApp(model, store, n_ctx=n_ctx, threads=threads, cache=cache, settings=settings)
        app.run(inline=inline)
    finally:
        store.close()
