"""`localllm chat`: the Textual chat app, or a plain REPL when stdin is not a terminal."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

from localllm.tui.settings import ChatSettings


def chat(
    model: str,
    *,
    n_ctx: int | None = None,
    threads: int | str | None = None,
    cache: dict | None = None,
    inline: bool = False,
    settings: ChatSettings | None = None,
    cancel: threading.Event | None = None,
    compile_progress: Callable[[str, int, int], None] | None = None,
) -> None:
    """Chat with `model`: the app on a terminal; otherwise, as `ollama run` does for scripts
    and pipes, each line of stdin is a message and each reply goes to stdout. `cancel` stops
    the REPL's reply (the app has Esc); `compile_progress` follows its kernel warm-up;
    `inline` draws the app below the shell prompt rather than on the whole screen; `settings`
    (system prompt, sampling) are those of new conversations; `cache` holds LLM's cache,
    speculative decoding and device keywords (cache, sinks, window, kv_dtype, draft, draft_max,
    device)."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        from localllm.tui.app import run

        run(
            model,
            n_ctx=n_ctx,
            threads=threads,
            cache=cache,
            inline=inline,
            settings=settings,
        )
        return
    from localllm.tui.backend import Backend
    from localllm.tui.repl import repl

    backend = Backend(model, n_ctx=n_ctx, threads=threads, compile_progress=compile_progress, **(cache or {}))
    try:
        repl(backend, settings or ChatSettings(), cancel=cancel)
    finally:
        backend.close()
