"""Chat templates: render a GGUF's ``tokenizer.chat_template`` the way Hugging Face does.

`render_chat(template, messages, ...)` renders a Jinja chat template in
`jinja2.sandbox.ImmutableSandboxedEnvironment` with what Hugging Face templates expect
(`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `tools`, `raise_exception`,
`strftime_now`, HF's `tojson`, `trim_blocks`/`lstrip_blocks`, loop controls and the
`{% generation %}` block). `ChatTemplate.from_gguf(g, tokenizer).render(messages)` does the same
with the template and special tokens of a GGUF file.

Files without a template get a built-in one chosen by architecture (Gemma turn markers for the
gemma family, ChatML otherwise); a warning says so once per architecture. The fallbacks do not
emit BOS: `Tokenizer.encode` adds it when the file asks for it.

Templates are untrusted input. Besides the sandbox (which blocks attribute escapes such as
``__class__`` or ``__globals__``), rendering is bounded: every operation that can grow a string
or list (``*``, ``+``, ``%``, ``~``, filters, method calls) is checked against a size cap, integer
arguments that size an output (``'x'|center(10**9)``) are capped, and a wall-clock deadline
stops loops and recursion. Any failure raises `TemplateError` with a one-line message.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import sys
import time
from collections.abc import Sequence
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from localllm.errors import TemplateError

logger = logging.getLogger(__name__)

MAX_OUTPUT_CHARS = 4_000_000
RENDER_SECONDS = 1.0
# Largest integer a template may pass to something that sizes its output (widths, repeat counts).
_MAX_SIZE_ARGUMENT = 100_000
# Largest result, in bits, of ``**``; bigger powers take unbounded time in C.
_MAX_POWER_BITS = 100_000
# A format string asking for a field this wide would allocate before any check could run.
_HUGE_FORMAT_WIDTH = re.compile(r"\d{6,}")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Gemma has no system role: its own template prepends the system text to the first user turn.
GEMMA_TEMPLATE = (
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
    "{% else %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{% if message['role'] == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
_GEMMA_ARCHITECTURES = frozenset({"gemma", "gemma2", "gemma3", "gemma3n"})
_warned_fallback: set[str | None] = set()


def fallback_template(architecture: str | None) -> str:
    """The built-in template for a file without ``tokenizer.chat_template``."""
    return GEMMA_TEMPLATE if architecture in _GEMMA_ARCHITECTURES else CHATML_TEMPLATE


class _RenderLimit(BaseException):
    """Raised inside a render that exceeded its budget; a BaseException so that nothing in the
    template runtime that catches ordinary exceptions can swallow it."""


def _size(value) -> int:
    if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)):
        return len(value)
    return 0


def _check_size(value):
    if _size(value) > MAX_OUTPUT_CHARS:
        raise _RenderLimit(f"a value grew past {MAX_OUTPUT_CHARS} items")
    return value


def _check_size_arguments(args, kwargs) -> None:
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > _MAX_SIZE_ARGUMENT:
            raise _RenderLimit(f"argument {arg} is larger than the template limit {_MAX_SIZE_ARGUMENT}")


def _bounded_filter(function):
    # Jinja passes the environment or context first to filters marked for it; the marker must
    # survive the wrapper, and the filtered value sits after it.
    pass_arg = getattr(function, "jinja_pass_arg", None)
    first_argument = 2 if pass_arg is not None else 1

    def bounded(*args, **kwargs):
        _check_size_arguments(args[first_argument:], kwargs)
        return _check_size(function(*args, **kwargs))

    if pass_arg is not None:
        bounded.jinja_pass_arg = pass_arg
    return bounded


class _BoundedCodeGenerator(CodeGenerator):
    """Routes the ``~`` operator through a size check; Jinja otherwise joins with a bare
    ``str.join`` that no sandbox hook sees."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks in HF
    templates; for inference it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


class _ChatEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self):
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[jinja2.ext.loopcontrols, _GenerationBlock],
        )
        self.filters = {name: _bounded_filter(f) for name, f in self.filters.items()}
        self.filters["tojson"] = _bounded_filter(_tojson)
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now

    def bounded_concat(self, parts) -> str:
        strings = [str(part) for part in parts]
        if sum(map(len, strings)) > MAX_OUTPUT_CHARS:
            raise _RenderLimit(f"a string grew past {MAX_OUTPUT_CHARS} characters")
        return "".join(strings)

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if isinstance(count, int) and _size(sequence) and _size(sequence) * count > MAX_OUTPUT_CHARS:
                    raise _RenderLimit(f"repeating a value {count} times exceeds the template limit")
        elif operator == "**":
            if isinstance(left, (int, float)) and isinstance(right, (int, float)) and abs(left) > 1:
                if right * math.log2(abs(left)) > _MAX_POWER_BITS:
                    raise _RenderLimit(f"{left} ** {right} is too large")
        elif operator == "+":
            if _size(left) + _size(right) > MAX_OUTPUT_CHARS:
                raise _RenderLimit(f"a value grew past {MAX_OUTPUT_CHARS} items")
        elif operator == "%" and isinstance(left, str) and _HUGE_FORMAT_WIDTH.search(left):
            raise _RenderLimit("format field width too large")
        return _check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
        _check_size_arguments(args, kwargs)
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value):
        format_string = getattr(value, "__self__", None)
        if isinstance(format_string, str) and _HUGE_FORMAT_WIDTH.search(format_string):
            raise _RenderLimit("format field width too large")
        return super().wrap_str_format(value)

    def unsafe_undefined(self, obj, attribute):
        # Jinja returns an Undefined that prints as "" and fails only when used further; a
        # template that reaches for internals is hostile, so stop it at once.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # HF's tojson: plain json.dumps, no HTML escaping (Jinja's own escapes <, >, & and ').
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise TemplateError(f"chat template raised: {message}")


def _strftime_now(format_string):
    if not isinstance(format_string, str) or _HUGE_FORMAT_WIDTH.search(format_string):
        raise TemplateError("strftime_now needs a reasonable format string")
    return datetime.now().strftime(format_string)


_environment = _ChatEnvironment()


class _Deadline:
    """Raise `_RenderLimit` in the rendering thread once the wall-clock budget is spent.

    A line-level trace function is the only hook that sees a template loop that produces no
    output and calls nothing; it is installed for this thread only and only while rendering.
    """

    def __init__(self, seconds: float):
        self.expires = time.monotonic() + seconds

    def _trace(self, frame, event, arg):
        if time.monotonic() > self.expires:
            raise _RenderLimit(f"rendering took longer than {RENDER_SECONDS} s")
        return self._trace

    def __enter__(self):
        self.previous = sys.gettrace()
        sys.settrace(self._trace)
        return self

    def __exit__(self, *exc_info):
        sys.settrace(self.previous)
        return False


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    return _environment.from_string(template)


def _guarded(work):
    """Run `work()` (compiling and/or rendering) under the deadline, turning every failure
    into a one-line `TemplateError`."""
    try:
        with _Deadline(RENDER_SECONDS):
            return work()
    except TemplateError:
        raise
    except _RenderLimit as exc:
        raise TemplateError(f"chat template stopped: {exc}") from None
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"chat template syntax error at line {exc.lineno}: {_one_line(exc)}") from None
    except SecurityError as exc:
        raise TemplateError(f"chat template blocked by the sandbox: {_one_line(exc)}") from None
    except RecursionError:
        raise TemplateError("chat template recursed too deeply") from None
    except MemoryError:
        raise TemplateError("chat template ran out of memory") from None
    except Exception as exc:
        raise TemplateError(f"chat template failed: {type(exc).__name__}: {_one_line(exc)}") from None


def render_chat(
    template: str | None,
    messages: Sequence[dict],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    architecture: str | None = None,
    tools: list | None = None,
    **extra,
) -> str:
    """Render `messages` ([{"role": ..., "content": ...}, ...]) with a chat template.

    `template=None` uses the fallback for `architecture`. `extra` is passed to the template as
    more variables (e.g. ``documents`` or ``enable_thinking``).
    """
    if template is None:
        if architecture not in _warned_fallback:
            _warned_fallback.add(architecture)
            logger.warning(
                "no chat template in the model file; using the built-in %s template for architecture %r",
                "Gemma" if architecture in _GEMMA_ARCHITECTURES else "ChatML",
                architecture,
            )
        template = fallback_template(architecture)
    if not isinstance(template, str):
        raise TemplateError(f"chat template must be a string, got {type(template).__name__}")
    context = dict(
        extra,
        messages=list(messages),
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
        tools=tools,
    )

    def render() -> str:
        chunks: list[str] = []
        produced = 0
        for chunk in _compile(template).generate(**context):
            produced += len(chunk)
            if produced > MAX_OUTPUT_CHARS:
                raise _RenderLimit(f"output grew past {MAX_OUTPUT_CHARS} characters")
            chunks.append(chunk)
        return "".join(chunks)

    return _guarded(render)


class ChatTemplate:
    """A GGUF file's chat template together with the special tokens it refers to."""

    def __init__(
        self, template: str | None, *, bos_token: str = "", eos_token: str = "", architecture: str | None = None
    ):
        self.template = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.architecture = architecture
        if template is not None:
            _guarded(lambda: _compile(template))

    @classmethod
    def from_gguf(cls, g, tokenizer) -> ChatTemplate:
        metadata = g.metadata
        template = metadata.get("tokenizer.chat_template")
        bos = tokenizer.token_text(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
        eos = tokenizer.token_text(tokenizer.eos_id) if tokenizer.eos_id is not None else ""
        return cls(template, bos_token=bos, eos_token=eos, architecture=metadata.get("general.architecture"))

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True, **extra) -> str:
        return render_chat(
            self.template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            architecture=self.architecture,
            **extra,
        )
