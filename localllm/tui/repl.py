"""`localllm chat` without a terminal: a plain REPL over stdin and stdout, as `ollama run` has.

Each line of input is one user message; each reply is printed as it streams, followed by a
blank line. The conversation is kept for the following lines and ends with the input.
"""

from __future__ import annotations

import sys
import threading
from typing import TextIO

from localllm.tui.backend import Backend
from localllm.tui.settings import ChatSettings


def repl(
    backend: Backend,
    settings: ChatSettings,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
    cancel: threading.Event | None = None,
) -> None:
    messages: list[dict] = []
    for line in stdin:
        text = line.rstrip("\n")
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        generation = backend.reply(messages, settings, cancel=cancel).generation
        for chunk in generation:
            if chunk.text:
                stdout.write(chunk.text)
                stdout.flush()
        stdout.write("\n\n")
        stdout.flush()
        messages.append({"role": "assistant", "content": generation.completion.text})
        if cancel is not None and cancel.is_set():
            return
