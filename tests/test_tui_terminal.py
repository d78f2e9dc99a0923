"""`localllm chat` as a process: the REPL over pipes, and the app in a real terminal (tmux)."""

import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from localllm.runtime.cli import main
from localllm.tui.store import ChatStore

SMOLLM = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm(model_path):
    return str(model_path(SMOLLM))


def chat_command(model: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "localllm.runtime.cli", "chat", "-m", model, *flags]


def test_without_a_terminal_chat_is_a_line_by_line_repl(smollm, tmp_path):
    result = subprocess.run(
        chat_command(smollm, "-n", "24"),
        input="Hello! What is your name?\n\nName a colour.\n",
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LOCALLLM_HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    # A reply per non-empty line, each followed by a blank line (a reply may hold blank lines
    # of its own, so there are at least two).
    assert result.stdout.strip() and result.stdout.endswith("\n\n"), result.stdout
    assert result.stdout.count("\n\n") >= 2, result.stdout


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-n", "0"], "-n/--max-tokens must be a positive number"),
        (["--temp", "-1"], "--temp must be >= 0"),
        (["--cache", "sink", "--sinks", "8", "--window", "4"], "sinks (8) must be smaller than window (4)"),
    ],
)
def test_bad_chat_flags_are_one_line_errors_before_anything_loads(flags, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALLLM_HOME", str(tmp_path))
    assert main(["chat", "-m", "no-such-model", *flags]) == 2
    assert message in capsys.readouterr().err


# ---- in a real terminal ---------------------------------------------------------------------

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Terminal:
    """The app running in a detached tmux session of a fixed size."""

    def __init__(self, command: list[str], home, name: str, exit_line: bool):
        self.name = name
        # A server of its own: the user's tmux server and its options are left alone.
        self.tmux = ["tmux", "-L", name]
        # COLUMNS and LINES, when the test runner has them, would override the pane's size.
        env = f"-u COLUMNS -u LINES LOCALLLM_HOME={shlex.quote(str(home))}"
        if exit_line:
            # tmux does not always record a dead pane's exit status: the shell prints it.
            shell = f"env {env} {shlex.join(command)}; echo exited with status $?; sleep 60"
        else:
            # The pane's process is the app itself, so that it can be killed by pid.
            shell = f"exec env {env} {shlex.join(command)}"
        subprocess.run(
            [*self.tmux, "-f", "/dev/null", "new-session", "-d", "-s", name, "-x", "120", "-y", "40", shell], check=True
        )
        subprocess.run([*self.tmux, "set-option", "-t", name, "remain-on-exit", "on"], check=True)
        self.screens: list[str] = []

    def screen(self) -> str:
        text = subprocess.run(
            [*self.tmux, "capture-pane", "-p", "-t", self.name], capture_output=True, text=True
        ).stdout
        self.screens.append(text)
        return text

    def keys(self, *keys: str) -> None:
        subprocess.run([*self.tmux, "send-keys", "-t", self.name, *keys], check=True)

    def pane(self, field: str) -> str:
        return subprocess.run(
            [*self.tmux, "display-message", "-p", "-t", self.name, f"#{{{field}}}"], capture_output=True, text=True
        ).stdout.strip()

    def wait(self, condition, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if condition(screen):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"timed out; the screen was:\n{self.screens[-1]}")

    def close(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], capture_output=True)


@pytest.fixture
def terminal(smollm, tmp_path):
    opened = []

    def open_terminal(exit_line: bool = False):
        name = f"localllm-test-{os.getpid()}-{secrets.token_hex(4)}"
        term = Terminal(chat_command(smollm), tmp_path, name, exit_line)
        opened.append(term)
        return term

    yield open_terminal
    for term in opened:
        term.close()
        assert not any("Traceback" in screen for screen in term.screens), term.screens[-1]


def status(screen: str) -> str:
    lines = screen.rstrip().splitlines()
    return lines[-2] if len(lines) >= 2 else ""


def loaded(screen: str) -> bool:
    # The status bar shows memory in use once the model is loaded.
    return " mem " in status(screen)


def tokens_so_far(screen: str) -> int:
    found = re.search(r"(\d+) tokens,", status(screen))
    return int(found.group(1)) if found else 0


def streaming(screen: str) -> bool:
    # While a reply streams the status bar counts its tokens.
    return "tokens," in status(screen)


@pytest.mark.slow
@needs_tmux
def test_the_app_in_a_real_terminal(terminal):
    term = terminal(exit_line=True)
    term.wait(loaded)
    term.keys("Tell me a long story about a lighthouse keeper.", "Enter")
    term.wait(streaming)
    time.sleep(1.0)
    term.keys("Escape")
    term.wait(lambda screen: "(stopped)" in screen or "processed" in screen, timeout=10)
    # Quitting in the middle of a reply ends the app at once, too.
    term.keys("Now a very long story about a baker, in many chapters.", "Enter")
    term.wait(streaming)
    term.keys("C-q")
    term.wait(lambda screen: "exited with status" in screen, timeout=10)
    assert "exited with status 0" in term.screen()


def words(text: str) -> str:
    return " ".join(re.findall(r"\w+", text))


@pytest.mark.slow
@needs_tmux
def test_a_kill_mid_reply_keeps_what_was_shown(terminal, tmp_path):
    term = terminal()
    term.wait(loaded)
    prompt = "Write a long story about a fox who learns to sail, with many chapters."
    term.keys(prompt, "Enter")
    term.wait(lambda screen: tokens_so_far(screen) >= 60)
    pid = int(term.pane("pane_pid"))
    screen = term.screen()
    os.kill(pid, signal.SIGKILL)
    assert streaming(screen), "the reply ended before the kill"

    store = ChatStore(tmp_path / "chat" / "chats.sqlite3")
    [conversation] = store.conversations()
    messages = store.messages(conversation.id)
    assert [m.role for m in messages] == ["user", "assistant"]
    assert messages[0].content == prompt
    asked, stored = words(prompt), words(messages[1].content)
    # Every line of the conversation on screen (a reply is drawn after it is stored) is in
    # the database.
    shown = [words(line.split("█", 1)[1]) for line in screen.splitlines() if "█" in line]
    reply = [line for line in shown if line and line not in ("You", "Assistant") and line not in asked]
    assert len(" ".join(reply).split()) >= 20, screen
    for line in reply:
        assert line in stored, f"{line!r} was on screen but not in the database"
