"""The chat app's dialogs: settings, help, model picker, a line of text, a confirmation."""

from __future__ import annotations

from dataclasses import dataclass

from rich.filesize import decimal
from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen, ScreenResultType
from textual.widgets import Button, Input, Label, OptionList, Select, Static, TextArea
from textual.widgets.option_list import Option

from localllm.errors import InvalidParameterError
from localllm.runtime.catalog import list_models, store_dir
from localllm.tui.settings import ChatSettings


class Dialog(ModalScreen[ScreenResultType]):
    """A box in the middle of the screen, its content in one Vertical."""

    # Unscoped, so that the rules reach the subclasses' widgets.
    SCOPED_CSS = False
    DEFAULT_CSS = """
    Dialog { align: center middle; }
    Dialog > Vertical {
        width: 72; height: auto; max-height: 90%; padding: 1 2;
        border: thick $primary; background: $surface;
    }
    Dialog .title { text-style: bold; margin-bottom: 1; }
    Dialog .buttons { height: auto; align-horizontal: right; margin-top: 1; }
    Dialog .buttons Button { margin-left: 1; }
    Dialog .error { color: $error; height: auto; }
    """


# (field, label, type, whether it may be left empty) of the numeric settings, in dialog order.
_NUMERIC = (
    ("temperature", "Temperature (0: greedy)", float, False),
    ("top_k", "Top-k (0: off)", int, False),
    ("top_p", "Top-p (1: off)", float, False),
    ("min_p", "Min-p (0: off)", float, False),
    ("repeat_penalty", "Repeat penalty (1: off)", float, False),
    ("seed", "Seed (empty: random)", int, True),
    ("max_tokens", "Max tokens (empty: no limit)", int, True),
    ("sinks", "Sinks (empty: the app's)", int, True),
    ("window", "Window (empty: the app's)", int, True),
)
_CACHE_CHOICES = (("the app's", ""), ("full", "full"), ("sink (StreamingLLM)", "sink"))
_DRAFT_CHOICES = (("on", True), ("off", False))


def _parse(name: str, text: str, optional: bool, kind: type):
    text = text.strip()
    if not text:
        if optional:
            return None
        raise InvalidParameterError(f"{name} needs a value")
    try:
        return kind(text)
    except ValueError:
        raise InvalidParameterError(
            f"{name}: {text!r} is not a {'whole number' if kind is int else 'number'}"
        ) from None


class SettingsScreen(Dialog[ChatSettings | None]):
    """Edit a conversation's settings; dismisses with the new settings, or None if cancelled."""

    DEFAULT_CSS = """
    SettingsScreen Grid {
        grid-size: 4; grid-columns: 1fr 12 1fr 12; grid-rows: 1; grid-gutter: 1 2; height: auto; margin-top: 1;
    }
    SettingsScreen > Vertical { width: 100; }
    SettingsScreen #cache-row { height: 1; margin-top: 1; }
    SettingsScreen #cache { width: 28; }
    SettingsScreen #draft { width: 10; }
    SettingsScreen #system { height: 5; }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, settings: ChatSettings) -> None:
        super().__init__()
        self.settings = settings

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Conversation settings", classes="title")
            yield Label("System prompt")
            yield TextArea(self.settings.system, id="system", soft_wrap=True, tab_behavior="focus")
            with Horizontal(id="cache-row"):
                yield Label("KV cache policy ")
                yield Select(_CACHE_CHOICES, value=self.settings.cache, allow_blank=False, id="cache", compact=True)
                yield Label("  Draft (the app's --draft) ")
                yield Select(_DRAFT_CHOICES, value=self.settings.draft, allow_blank=False, id="draft", compact=True)
            with Grid():
                for name, label, kind, _ in _NUMERIC:
                    value = getattr(self.settings, name)
                    yield Label(label)
                    yield Input(
                        "" if value is None else str(value),
                        id=name,
                        compact=True,
                        type="integer" if kind is int else "number",
                    )
            yield Label("", id="error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def collect(self) -> ChatSettings:
        """The settings the fields describe; InvalidParameterError names a bad one."""
        values = {
            "system": self.query_one("#system", TextArea).text,
            "cache": self.query_one("#cache", Select).value,
            "draft": self.query_one("#draft", Select).value,
        }
        for name, _, kind, optional in _NUMERIC:
            values[name] = _parse(name, self.query_one(f"#{name}", Input).value, optional, kind)
        return ChatSettings(**values)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "cancel":
            self.dismiss(None)
            return
        try:
            settings = self.collect()
        except InvalidParameterError as error:
            self.query_one("#error", Label).update(str(error))
            return
        self.dismiss(settings)

    def action_cancel(self) -> None:
        self.dismiss(None)


KEYS = (
    ("Enter", "send the message"),
    ("Shift+Enter, Ctrl+J", "new line in the message"),
    ("Esc", "stop the reply (keeps what was generated)"),
    ("Ctrl+N", "new conversation"),
    ("Ctrl+B", "show or hide the conversation list"),
    ("Ctrl+F", "search the conversations"),
    ("Ctrl+R", "regenerate the last reply"),
    ("Ctrl+G", "edit the last message and send it again"),
    ("Ctrl+S", "conversation settings"),
    ("Ctrl+O", "choose a model"),
    ("Ctrl+T", "copy the last reply"),
    ("click a code block", "copy it"),
    ("click You / Assistant", "copy that message"),
    ("Ctrl+P", "command palette: all of these, plus rename, delete, export, themes"),
    ("F1", "this help"),
    ("Ctrl+Q", "quit"),
)


class HelpScreen(Dialog[None]):
    BINDINGS = [Binding("escape,f1,q", "close", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Keys", classes="title")
            table = Table(box=None, show_header=False, padding=(0, 2, 0, 0))
            table.add_column(style="bold", no_wrap=True)
            table.add_column()
            for key, action in KEYS:
                table.add_row(key, action)
            yield Static(table)
            with Horizontal(classes="buttons"):
                yield Button("Close", variant="primary", id="close")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None)

    def action_close(self) -> None:
        self.dismiss(None)


@dataclass(frozen=True)
class ModelChoice:
    """A model the picker offers: a catalog name, or the path of a file in the store."""

    model: str
    present: bool


def model_choices() -> list[tuple[ModelChoice, str]]:
    """The catalog (present or not) and any other .gguf file in the store, with a label."""
    choices = []
    catalog_files = set()
    for listing in list_models():
        entry = listing.entry
        catalog_files.add(entry.file)
        state = "in store" if listing.present else "pull"
        default = " (default)" if entry.default else ""
        label = f"{entry.name}{default}  {entry.kind}, {decimal(entry.bytes)}, {state}"
        choices.append((ModelChoice(entry.name, listing.present), label))
    if store_dir().is_dir():
        for path in sorted(store_dir().glob("*.gguf")):
            if path.name not in catalog_files:
                choices.append((ModelChoice(str(path), True), f"{path.name}  file, {decimal(path.stat().st_size)}"))
    return choices


class ModelPicker(Dialog[ModelChoice | None]):
    """Pick a model from the catalog and the store; one not present is pulled when chosen."""

    DEFAULT_CSS = """
    ModelPicker OptionList { height: auto; max-height: 16; }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, current: str | None) -> None:
        super().__init__()
        self.current = current
        self.choices = model_choices()

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"Model (now: {self.current or 'none'})", classes="title")
            yield OptionList(*(Option(label, id=str(i)) for i, (_, label) in enumerate(self.choices)))
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.choices[int(event.option.id)][0])

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class TextPrompt(Dialog[str | None]):
    """Ask for one line of text (a new title); None if cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, value: str = "") -> None:
        super().__init__()
        self.prompt_title = title
        self.value = value

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.prompt_title, classes="title")
            yield Input(self.value, id="value")
            with Horizontal(classes="buttons"):
                yield Button("OK", variant="primary", id="ok")
                yield Button("Cancel", id="cancel")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(self.query_one(Input).value if event.button.id == "ok" else None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class Confirm(Dialog[bool]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question, classes="title", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Yes", variant="error", id="yes")
                yield Button("No", variant="primary", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_cancel(self) -> None:
        self.dismiss(False)
