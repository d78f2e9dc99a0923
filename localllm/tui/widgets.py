"""The chat app's widgets: messages, the prompt input, the conversation list, the status bar."""

from __future__ import annotations

import re

from rich.filesize import decimal
from rich.text import Text
from textual import events
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Label, ListItem, Markdown, Static, TextArea
from textual.widgets.markdown import MarkdownFence

from localllm.runtime.speculative import SpeculativeStats
from localllm.tui.backend import CacheUsage

ROLE_TITLES = {"user": "You", "assistant": "Assistant", "system": "System"}
# Past this many characters, the part of a streamed reply still being written moves on to a
# Markdown widget of its own at the next block boundary (see ReplyWriter).
CHUNK_CHARS = 300
_LIST_ITEM = re.compile(r"([-*+]|\d{1,9}[.)])( |$)")
_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")


class CodeFence(MarkdownFence):
    @classmethod
    def highlight(cls, code: str, language: str, ansi: bool = False, dark: bool = False):
        # Guessing the language of an unlabelled block runs every Pygments lexer over it: a few
        # hundred milliseconds of a blocked event loop, again each time a streamed block grows.
        return super().highlight(code, language or "text", ansi=ansi, dark=dark)


class MessageMarkdown(Markdown):
    BLOCKS = {**Markdown.BLOCKS, "fence": CodeFence, "code_block": CodeFence}


class MessageView(Vertical):
    """One message: who wrote it, and its text rendered as Markdown (code highlighted).
    Clicking a code block copies the block; clicking the author's name copies the message."""

    DEFAULT_CSS = """
    MessageView { height: auto; margin: 0 1 1 1; padding: 0 1; }
    /* Margins between blocks of one Markdown collapse, those across two do not: under a block
       (bottom margin 1), the next part's first block gives up one line of its top margin.
       Each rule sets the whole margin, as a margin-top rule would reset the other sides. */
    MessageView > MessageMarkdown.follows > *:first-child { margin: 0 0 1 0; }
    MessageView > MessageMarkdown.follows > MarkdownH1:first-child { margin: 1 0 1 0; }
    MessageView > MessageMarkdown.follows > MarkdownH2:first-child { margin: 1 0 1 0; }
    MessageView MarkdownBlock.continued { margin: 0 !important; }
    MessageView.user { border-left: thick $primary; }
    MessageView.assistant { border-left: thick $success; }
    MessageView > .role { text-style: bold; color: $text-muted; }
    MessageView > MessageMarkdown { margin: 0; padding: 0; }
    MessageView .note { color: $text-muted; text-style: italic; }
    """

    class CopyRequested(Message):
        def __init__(self, text: str, what: str) -> None:
            super().__init__()
            self.text = text
            self.what = what

    def __init__(self, role: str, content: str, message_id: int | None = None) -> None:
        super().__init__(classes=role)
        self.role = role
        self.initial_text = content
        self.message_id = message_id

    def compose(self):
        yield Label(ROLE_TITLES.get(self.role, self.role), classes="role")
        yield MessageMarkdown(self.initial_text)

    @property
    def text(self) -> str:
        """The message's Markdown source (a streamed reply spreads it over several widgets)."""
        return "".join(part.source for part in self.query_children(MessageMarkdown))

    def set_note(self, text: str) -> None:
        """A line under the message: why a reply ended early, or that it is empty."""
        for note in self.query(".note"):
            note.remove()
        if text:
            self.mount(Label(text, classes="note"))

    def on_click(self, event: events.Click) -> None:
        widget = event.widget
        if widget is self.query_one(".role"):
            self.post_message(self.CopyRequested(self.text, "message"))
            return
        while widget is not None and widget is not self:
            if isinstance(widget, MarkdownFence):
                self.post_message(self.CopyRequested(widget.code, "code block"))
                return
            widget = widget.parent


def split_point(text: str) -> tuple[int, bool] | None:
    """Where a new Markdown widget may take over `text` (a reply being streamed): the offset of
    the last complete line, past the first, that starts a top-level block outside a code fence
    (after a blank line, or as a further item of a list), and whether it continues a list;
    None if there is none."""
    lines = text.split("\n")
    found = None
    offset = 0
    fence: str | None = None
    previous = ""
    # Whether a top-level list item began since the last blank line: a list goes on.
    in_list = False
    # The last element is the line still being written: what it starts is not known yet.
    for index, line in enumerate(lines[:-1]):
        top_level = fence is None and line.strip() and not line[0].isspace()
        item = top_level and _LIST_ITEM.match(line) is not None
        if index and top_level:
            if not previous.strip():
                found = (offset, False)
            elif item and in_list:
                found = (offset, True)
        if not line.strip():
            in_list = False
        elif item:
            in_list = True
        marker = _FENCE.match(line)
        if marker is not None:
            if fence is None:
                fence = marker.group(1)
            elif (
                marker.group(1)[0] == fence[0]
                and len(marker.group(1)) >= len(fence)
                and not line[marker.end() :].strip()
            ):
                fence = None
        previous = line
        offset += len(line) + 1
    return found


class ReplyWriter:
    """Streams a reply into a MessageView.

    Textual's Markdown renders its last block again on every append, and a list is one block:
    a streamed list of 40 items took half a second of the event loop per append. So once the
    text being written grows past CHUNK_CHARS, the finished blocks stay in their widget as they
    were drawn and the rest continues in a new one, split where Markdown renders the same
    either way: between blocks, or between items of a list (an ordered list keeps counting
    from its first number; the gap under the list's first part is dropped). One
    difference remains: each part of an ordered list sizes its number column for its own
    numbers, so a list that passes 9 items shifts its later items one column.
    """

    def __init__(self, view: MessageView) -> None:
        self.view = view
        self.live = view.query_children(MessageMarkdown).last()
        self.live_text = self.live.source

    async def write(self, fragment: str) -> None:
        self.live_text += fragment
        found = split_point(self.live_text) if len(self.live_text) > CHUNK_CHARS else None
        if found is None:
            # The whole (short) part again rather than Markdown.append, whose incremental parse
            # was seen to drop a list item when the line it had began another block.
            await self.live.update(self.live_text)
            return
        offset, continued = found
        head, tail = self.live_text[:offset], self.live_text[offset:]
        # The tail's widget first: trimming the head before it is laid out would shorten the
        # reply for a frame, and a reader at the bottom would see the view jump.
        following = MessageMarkdown(tail, classes="follows")
        with self.view.app.batch_update():
            await self.view.mount(following, after=self.live)
            await self.live.update(head)
            if continued:
                # Not a :last-child rule: that pseudo-class is not updated as blocks are added.
                self.live.children[-1].add_class("continued")
        self.live, self.live_text = following, tail


class PromptInput(TextArea):
    """The message being written: Enter sends it; Shift+Enter or Ctrl+J starts a new line."""

    DEFAULT_CSS = """
    PromptInput { height: auto; min-height: 3; max-height: 10; margin: 0 1; }
    """

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            if self.text.strip():
                self.post_message(self.Submitted(self.text))
            return
        if event.key in ("shift+enter", "ctrl+j"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)


class ConversationItem(ListItem):
    def __init__(self, conversation_id: int, title: str) -> None:
        super().__init__(Label(title, markup=False))
        self.conversation_id = conversation_id


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} tok/s"


def describe_cache(usage: CacheUsage) -> str:
    if usage.policy == "sink":
        text = f"cache {usage.used}/{usage.capacity} (sinks {usage.sinks} + window {usage.window})"
        return text + f", evicted {usage.evicted}"
    return f"cache {usage.used}/{usage.capacity}"


class StatusBar(Static):
    """Model, speed of the last reply (or what is happening now), prompt reuse, cache
    occupancy and memory, on one line."""

    DEFAULT_CSS = """
    StatusBar { height: 1; padding: 0 1; background: $panel; color: $text-muted; }
    """

    def show(
        self,
        model: str,
        *,
        rate: float | None = None,
        reused: int | None = None,
        processed: int | None = None,
        drafted: SpeculativeStats | None = None,
        cache: CacheUsage | None = None,
        memory: int | None = None,
        note: str = "",
    ) -> None:
        # A note (what is happening now: loading, a reply streaming) comes first, so that a
        # narrow terminal cuts the cache and memory figures rather than it.
        parts = [model, note or _rate(rate)]
        if processed is not None:
            parts.append(f"prompt {reused} reused / {processed} processed")
        if drafted is not None:
            rate = drafted.acceptance_rate
            accepted = "nothing drafted" if rate is None else f"{rate:.0%} accepted"
            parts.append(f"draft {drafted.drafter}: {accepted}")
        if cache is not None:
            parts.append(describe_cache(cache))
        if memory is not None:
            parts.append(f"mem {decimal(memory)}")
        # Text, not markup: a file name may hold brackets.
        self.update(Text(" │ ".join(parts)))
