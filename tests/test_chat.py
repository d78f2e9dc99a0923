"""Chat templates: the files' own templates and the fallbacks reproduce the reference chat
prompts, and hostile templates fail fast and contained."""

import json
import logging
import re
import time

import pytest

from localllm.errors import TemplateError
from localllm.formats import chat
from localllm.formats.chat import ChatTemplate, render_chat
from localllm.formats.gguf import open_gguf
from localllm.formats.tokenizer import Tokenizer

from conftest import load_reference

TURN_PATTERNS = {
    "chatml": re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>\n", re.S),
    "gemma": re.compile(r"<start_of_turn>(\w+)\n(.*?)<end_of_turn>\n", re.S),
}


def reference_chat(name, style):
    """The reference chat case and the messages its text was rendered from."""
    case = next(c for c in load_reference(name)["cases"] if c["name"] == "chat")
    messages = [
        {"role": "assistant" if role == "model" else role, "content": content}
        for role, content in TURN_PATTERNS[style].findall(case["text"])
    ]
    assert messages and messages[-1]["role"] == "user"
    return case, messages


@pytest.mark.parametrize(
    "name, style",
    [
        pytest.param("smollm2-135m-instruct", "chatml", id="smollm2"),
        pytest.param("qwen2.5-coder-0.5b-instruct", "chatml", id="qwen2.5-coder-0.5b", marks=pytest.mark.slow),
        pytest.param("gemma-3-270m", "gemma", id="gemma3-fallback", marks=pytest.mark.slow),
    ],
)
def test_template_renders_reference_chat(model_path, name, style):
    case, messages = reference_chat(name, style)
    with open_gguf(model_path(name)) as g:
        tokenizer = Tokenizer.from_gguf(g)
        template = ChatTemplate.from_gguf(g, tokenizer)
        has_own_template = "tokenizer.chat_template" in g.metadata
    assert has_own_template == (style == "chatml")
    text = template.render(messages, add_generation_prompt=True)
    assert text == case["text"]
    assert tokenizer.encode(text, parse_special=True) == case["tokens"]


def test_fallback_warns_once_per_architecture(caplog):
    messages = [{"role": "user", "content": "hi"}]
    chat._warned_fallback.discard("test-arch")
    with caplog.at_level(logging.WARNING, logger="localllm.formats.chat"):
        first = render_chat(None, messages, architecture="test-arch")
        second = render_chat(None, messages, architecture="test-arch")
    assert first == second == render_chat(chat.CHATML_TEMPLATE, messages)
    assert caplog.text.count("test-arch") == 1


def test_gemma_fallback_folds_system_into_first_user_turn():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    text = render_chat(None, messages, architecture="gemma3", add_generation_prompt=False)
    turns = TURN_PATTERNS["gemma"].findall(text)
    assert turns == [("user", "Be brief.\n\nHi"), ("model", "Hello"), ("user", "Bye")]


def test_hugging_face_globals_and_filters():
    value = {"name": "<tag> & é", "n": [1, 2]}
    text = render_chat(
        "{{ tools | tojson }}|{{ value | tojson(indent=2) }}|{{ bos_token }}{{ eos_token }}"
        "|{{ strftime_now('%Y') }}|{% generation %}{{ messages[0].content }}{% endgeneration %}"
        "|{% for m in range(5) %}{% if m == 2 %}{% break %}{% endif %}{{ m }}{% endfor %}",
        [{"role": "user", "content": "hi"}],
        tools=[value],
        value=value,
        bos_token="<s>",
        eos_token="</s>",
    )
    tools_json, value_json, special, year, generation, loop = text.split("|")
    assert tools_json == json.dumps([value], ensure_ascii=False)
    assert value_json == json.dumps(value, ensure_ascii=False, indent=2)
    assert special == "<s></s>"
    assert year == time.strftime("%Y")
    assert generation == "hi"
    assert loop == "01"


def test_trim_and_lstrip_blocks_as_hugging_face_sets_them():
    text = render_chat("  {% if true %}\nA\n  {% endif %}\nB", [])
    assert text == "A\nB"


def test_raise_exception_becomes_template_error():
    with pytest.raises(TemplateError, match="Only user and assistant roles"):
        render_chat("{{ raise_exception('Only user and assistant roles are supported') }}", [])


@pytest.mark.parametrize("template", ["{% for %}", "{{ messages[0] }", "{% if x %}"])
def test_syntax_errors_are_one_line_template_errors(template):
    with pytest.raises(TemplateError) as info:
        render_chat(template, [{"role": "user", "content": "x"}])
    assert "\n" not in str(info.value)


HOSTILE = {
    "mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "globals": "{{ raise_exception.__globals__ }}",
    "cycler_os": "{{ cycler.__init__.__globals__.os.system('touch SENTINEL') }}",
    "joiner_os": "{{ joiner.__init__.__globals__.os.system('touch SENTINEL') }}",
    "namespace_os": "{{ namespace.__init__.__globals__['os'].system('touch SENTINEL') }}",
    "huge_range": "{% for i in range(10**12) %}{% endfor %}",
    "nested_loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "endless_output": "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}",
    "gigabyte_string": "{{ 'x' * 10**9 }}",
    "huge_power": "{{ 10 ** (10 ** 10) }}",
    "doubling_concat": (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
    ),
    "doubling_plus": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "wide_center": "{{ 'x' | center(10**9) }}",
    "wide_format": "{{ '{:>999999999}'.format('x') }}",
    "wide_percent": "{{ '%999999999s' % 'x' }}",
    "recursive_macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "branching_macro": "{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_templates_fail_fast_and_contained(tmp_path, name):
    sentinel = tmp_path / "pwned"
    template = HOSTILE[name].replace("SENTINEL", str(sentinel))
    start = time.monotonic()
    with pytest.raises(TemplateError) as info:
        render_chat(template, [{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < 2.0
    assert "\n" not in str(info.value)
    assert not sentinel.exists()


def test_renderer_still_works_after_hostile_templates():
    # The deadline's trace hook must be removed again, whatever stopped the render.
    import sys

    before = sys.gettrace()
    with pytest.raises(TemplateError):
        render_chat(HOSTILE["nested_loops"], [])
    assert sys.gettrace() is before
    assert render_chat(chat.CHATML_TEMPLATE, [{"role": "user", "content": "ok"}]).endswith("assistant\n")
