"""The render budget: a hostile chat template fails fast, in bounded memory, and the renderer lives on.

Every bomb below hangs the renderer or takes the machine's memory when its guard is missing.
Each must fail with InvalidRequestError naming "instruction_template", with the message of
the guard that stops it, in under 2 s and with tracemalloc's peak under 200 MB; and the
same renderer must then render a normal template. Real templates (tests/fixtures/chat-templates/,
the model makers' own files) must render exactly as in a plain Jinja sandbox.
"""

from __future__ import annotations

import json
import threading
import time
import tracemalloc
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from modules.chat.templates import CHATML_SOURCE, TemplateRenderer
from modules.core.errors import InvalidRequestError

FIXTURES = Path(__file__).with_name("fixtures") / "chat-templates"
REAL_TEMPLATES = sorted(p.name for p in FIXTURES.glob("*.jinja"))
CHAT = [{"role": "user", "content": "hi"}]
CHATML_PROMPT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
NOW = datetime(2025, 3, 4, 5, 6, 7)
MAX_SECONDS = 2.0
MAX_PEAK_BYTES = 200 * 2**20

# A list that holds itself twice, fifty levels deep: fifty lists in memory, 2**50 items in print.
SHARED = "{% set ns = namespace(l=[1]) %}{% for i in range(50) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}"
TIME = "took longer than 1.0 s"
SPIN = "took longer than 1.0 s|ran over 1,000,000 loop iterations"  # whichever comes first on this machine
STRING = "would build a string of"
LIST = "would build a list of"
WIDTH = "as a width or a count"
PRINT = "would print a value of over"
BITS = "would compute a number of about"
MEMORY = "allocated over 64 MiB"

BOMBS: list[tuple[str, str, str]] = [
    # (id, source, the message of the guard that must stop it)
    ("tilde-doubling", "{% set ns = namespace(s='x' * 1000) %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}", STRING),
    ("filter-center", "{{ 'a'|center(10**9) }}", WIDTH),
    ("filter-center-literal", "{{ 'a'|center(1000000000) }}", WIDTH),
    ("filter-indent", "{{ ('\\n' * 50000)|indent(1000) }}", STRING),
    ("filter-indent-lines", "{{ ('\\n' * 1000000)|indent(0) }}", LIST),
    ("filter-wordwrap", "{{ ('a ' * 200000)|wordwrap(1, wrapstring='x' * 1000) }}", STRING),
    ("filter-wordwrap-slow", "{{ ('a ' * 5000000)|wordwrap }}", "gives the wordwrap filter"),
    ("filter-format", "{{ '%999999999d'|format(1) }}", STRING),
    ("filter-join", "{{ (['x' * 1000000] * 100)|join }}", STRING),
    ("filter-replace", "{{ ('a' * 1000000)|replace('a', 'a' * 1000) }}", STRING),
    ("filter-batch", "{{ [1]|batch(10**9, 'x')|list }}", WIDTH),
    ("filter-slice", "{{ range(10)|slice(10**9)|list }}", WIDTH),
    ("filter-list", "{{ ('\U0001F600' * 16000000)|list|length }}", LIST),
    ("filter-sum-lists", "{{ ([[0] * 1000] * 1000)|sum(start=[])|length }}", LIST),
    ("filter-upper", "{{ ('\ufb03' * 16000000)|upper|length }}", STRING),
    ("filter-title-slow", "{{ ('ab ' * 5000000)|title|length }}", "gives the title filter"),
    ("filter-urlize", "{{ ('a.com ' * 100000)|urlize(target='x' * 10000) }}", STRING),
    ("filter-tojson-indent", "{{ (range(100000)|list)|tojson(indent=999999) }}", PRINT),
    ("str-ljust", "{{ 'x'.ljust(10**9) }}", WIDTH),
    ("str-center", "{{ 'x'.center(999999999) }}", WIDTH),
    ("str-zfill", "{{ 'x'.zfill(10**9) }}", WIDTH),
    ("str-expandtabs", "{{ ('\\t' * 1000000).expandtabs(1000000) }}", STRING),
    ("str-replace", "{{ ('a' * 1000000).replace('a', 'b' * 1000) }}", STRING),
    ("str-join", "{{ 'y'.join(['x' * 1000000] * 100) }}", STRING),
    ("str-translate", "{{ ('a' * 1000000).translate({97: 'b' * 1000}) }}", STRING),
    ("str-split", "{{ ('ab ' * 5000000).split()|length }}", LIST),
    ("str-format-width", "{{ '{:>999999999}'.format(1) }}", STRING),
    ("str-format-repeated", "{{ ('{0:999999}' * 100).format(1) }}", STRING),
    ("percent-width", "{{ '%999999999d' % 1 }}", STRING),
    ("percent-star", "{{ '%*d' % (10**9, 1) }}", STRING),
    ("percent-repeated", "{{ ('%(a)999999s' * 100) % {'a': 'x'} }}", STRING),
    ("int-squaring", "{% set ns = namespace(x=3) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
     BITS),
    ("int-power", "{% set x = (2**4096)**4096 %}{{ (x**4096) is number }}", BITS),  # never printed
    ("print-shared", SHARED + "{{ ns.l }}", PRINT),
    ("print-string", SHARED + "{{ ns.l|string }}", PRINT),
    ("print-tojson", SHARED + "{{ ns.l|tojson }}", PRINT),
    ("print-tilde", SHARED + "{{ 'a' ~ ns.l }}", PRINT),
    ("print-join", SHARED + "{{ [ns.l]|join }}", PRINT),
    ("print-percent", SHARED + "{{ '%s' % [ns.l] }}", PRINT),
    ("print-format-filter", SHARED + "{{ '%s'|format(ns.l) }}", PRINT),
    ("print-str-format", SHARED + "{{ '{}'.format(ns.l) }}", PRINT),
    ("print-namespace", SHARED + "{{ ns }}", PRINT),
    ("print-pprint", SHARED + "{{ ns.l|pprint }}", PRINT),
    ("print-raise-exception", SHARED + "{{ raise_exception(ns.l) }}", PRINT),
    ("loops-empty", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", SPIN),
    ("loops-join", "{% for i in range(100000) %}{% for j in range(100000) %}{{ (range(100000)|list)|join|length }}"
                   "{% endfor %}{% endfor %}", f"{SPIN}|{MEMORY}"),
    ("macro-deep", "{% macro f(n) %}{{ f(n-1) }}{{ f(n-1) }}{% endmacro %}{{ f(60) }}", "RecursionError"),
    ("macro-wide", "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(25) }}", TIME),
    ("loop-recursive", "{% for x in range(20) recursive %}{% if loop.depth < 20 %}{{ loop(range(20)) }}{% endif %}"
                       "{% endfor %}", TIME),
    ("lipsum", "{{ lipsum(10**9) }}", "asks lipsum for up to"),
    ("strftime-now", "{{ strftime_now('%c' * 8000000) }}", "strftime_now"),
    ("keep-strings", "{% set ns = namespace(l=[]) %}{% for i in range(1000) %}{% set ns.l = ns.l + ['x' * 16000000] %}"
                     "{% endfor %}", MEMORY),
    ("keep-slices", "{% set big = 'x' * 16000000 %}{% set ns = namespace(l=[]) %}{% for i in range(1000) %}"
                    "{% set ns.l = ns.l + [big[i:]] %}{% endfor %}", MEMORY),
    ("keep-set-blocks", "{% set ns = namespace(l=[]) %}{% set big = 'x' * 15000000 %}{% for i in range(100) %}"
                        "{% set b %}{{ big }}{% endset %}{% set ns.l = ns.l + [b] %}{% endfor %}", MEMORY),
    ("keep-splits", "{% set big = ('x' * 3999 + ' ') * 4000 %}{% set ns = namespace(l=[]) %}{% for i in range(200) %}"
                    "{% set ns.l = ns.l + [big.split()] %}{% endfor %}", MEMORY),
]


def _nested(depth: int) -> list[object]:
    value: list[object] = [1]
    for _ in range(depth):
        value = [value, value]
    return value


@pytest.fixture(scope="module")
def renderer() -> TemplateRenderer:
    return TemplateRenderer()


def _refused(renderer: TemplateRenderer, source: str, message: str) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError, match=message) as caught:
        renderer.render(source, CHAT)
    assert caught.value.param == "instruction_template"
    return caught.value


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("source", "message"), [b[1:] for b in BOMBS], ids=[b[0] for b in BOMBS])
def test_bomb_fails_fast_in_bounded_memory(renderer: TemplateRenderer, source: str, message: str):
    start = time.perf_counter()
    _refused(renderer, source, message)
    elapsed = time.perf_counter() - start
    assert elapsed < MAX_SECONDS, f"took {elapsed:.2f} s"
    # Again under tracemalloc, which slows allocation down (so the time is taken above).
    tracemalloc.start()
    try:
        _refused(renderer, source, message)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_PEAK_BYTES, f"peak {peak / 2**20:.0f} MiB"
    assert renderer.render(CHATML_SOURCE, CHAT) == CHATML_PROMPT


@pytest.mark.timeout(30)
def test_loop_steps_are_limited():
    with pytest.raises(InvalidRequestError, match="ran over 1,000,000 loop iterations"):
        TemplateRenderer(time_limit=60).render(
            "{% for i in range(100000) %}{% for j in range(10) %}{% endfor %}{% endfor %}"
            "{% for i in range(1000) %}{% endfor %}", CHAT)


LOOP_FORMS = [
    "{% for i in range(N) %}{{ i if i < 3 }}{% endfor %}",
    "{% for i in range(N) %}{{ loop.index if loop.last or loop.first }}{{ loop.length if loop.first }}{% endfor %}",
    "{% for i in range(N) if i is even %}{{ i if i < 5 }}{% endfor %}",
    "{% for i in range(N) if i < 0 %}x{% else %}none{% endfor %}",
    "{% for i in range(N)|list|reverse %}{{ i if i < 2 }}{% endfor %}",
    "{% for i in range(N)|select('odd') %}{{ loop.revindex if loop.last }}{% endfor %}",
    "{% for x in [range(N)] recursive %}{% if x is iterable %}{{ loop(x) }}{% else %}{{ x if x < 3 }}{% endif %}"
    "{% endfor %}",
    "{% macro m() %}{% for i in range(N) %}{{ caller() if i == 1 }}{% endfor %}{% endmacro %}"
    "{% call m() %}called{% endcall %}",
    "{% set ns = namespace(n=0) %}{% for i in range(N) %}{% if i > 3 %}{% break %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}",
    "{% for k, v in {'a': range(N)}.items() %}{% for i in v %}{% continue %}{% endfor %}{{ k }}{% endfor %}",
]


@pytest.mark.parametrize("form", LOOP_FORMS)
def test_every_kind_of_loop_is_counted_and_renders_as_before(form: str):
    """Plain, `loop`, filtered, else, filter-fed, recursive, in a macro, break/continue."""
    renderer = TemplateRenderer(max_loop_steps=1000)
    small = form.replace("N", "50")
    assert renderer.render(small, CHAT) == _reference_env().from_string(small).render(messages=CHAT)
    if "break" not in form:
        with pytest.raises(InvalidRequestError, match="ran over 1,000 loop iterations"):
            renderer.render(form.replace("N", "5000"), CHAT)


def test_a_time_limit_per_renderer():
    with pytest.raises(InvalidRequestError, match="took longer than 0.2 s"):
        TemplateRenderer(time_limit=0.2, max_loop_steps=10**12).render(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", CHAT)


def test_no_budget_leaks_into_the_next_render_or_other_threads():
    from modules.chat.template_sandbox import _BUDGET

    renderer = TemplateRenderer(time_limit=0.5, max_loop_steps=10**12)
    loops = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    normal: list[str] = []
    stop = threading.Event()

    def render_normally() -> None:  # while another thread spends its whole budget
        while not stop.is_set():
            normal.append(renderer.render(CHATML_SOURCE, CHAT))

    worker = threading.Thread(target=render_normally)
    worker.start()
    try:
        for _ in range(2):  # the second failure is its own, not the first one's budget
            _refused(renderer, loops, "took longer than 0.5 s")
    finally:
        stop.set()
        worker.join()
    assert normal and set(normal) == {CHATML_PROMPT}
    assert _BUDGET.get() is None
    assert renderer.render(CHATML_SOURCE, CHAT) == CHATML_PROMPT


@pytest.mark.parametrize(("source", "expected"), [
    ("{{ (('x' * 1000000) ~ 'y')|length }}", "1000001"),
    ("{{ ('ab ' * 90000).split()|length }}", "90000"),
    ("{{ ('a\\nb' * 50000)|indent(2)|length }}", str(3 * 50000 + 2 * 50000)),
    ("{{ ('x' * 1000)|center(1000000)|length }}", "1000000"),
    ("{{ '{:>10}|{:.3f}|{!r}'.format(1, 2.0, [1, 'a']) }}", "         1|2.000|[1, 'a']"),
    ("{{ '%5d|%-4s|%.2f' % (3, 'ab', 0.5) }}", "    3|ab  |0.50"),
    ("{{ '%(a)s-%(a)s'|format(a='x') }}", "x-x"),
    ("{{ (2**4096)|string|length }}", "1234"),
    ("{{ (range(100000)|list)|length }}", "100000"),
    ("{{ range(3)|join(', ') }}", "0, 1, 2"),
    ("{{ [[1, 2], [3]]|sum(start=[]) }}", "[1, 2, 3]"),
    ("{{ {'a': [1, {'b': none}]}|tojson(indent=1) }}", '{\n "a": [\n  1,\n  {\n   "b": null\n  }\n ]\n}'),
    ("{{ 'abc'[::-1] ~ 'abc'[1:] }}", "cbabc"),
    ("{{ lipsum(1, html=false, min=3, max=4)|wordcount }}", "3"),
    ("{% set ns = namespace(l=[1]) %}{% for i in range(10) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}"
     "{{ ns.l|string|length }}", str(len(str(_nested(10))))),
])
def test_legitimate_work_is_not_refused(renderer: TemplateRenderer, source: str, expected: str):
    assert renderer.render(source, CHAT) == expected


# ----------------------------------------------------------------------------- real templates


def _reference_env() -> ImmutableSandboxedEnvironment:
    """A plain Jinja sandbox with the Hugging Face helpers: what the budget must not change."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda value, ensure_ascii=False, indent=None, separators=None, sort_keys=False: (
        json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys))
    env.globals.update(strftime_now=lambda fmt: NOW.strftime(fmt), namespace=jinja2.utils.Namespace)
    return env


TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city, now",
        "parameters": {"type": "object", "required": ["city"], "properties": {
            "city": {"type": "string", "description": "The city's name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
]


def _tool_chat(turns: int) -> list[dict[str, object]]:
    chat: list[dict[str, object]] = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(turns):
        call_id = f"c{i:07d}x"  # nine letters and digits: what Mistral's template demands
        chat += [
            {"role": "user", "content": f"What is the weather in Paris today? ({i}) <é & ü>"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": call_id, "type": "function", "function": {
                "name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
            {"role": "tool", "tool_call_id": call_id, "name": "get_weather", "content": '{"temp": 21}'},
            {"role": "assistant", "content": f"It is 21 °C and clear in Paris.\n\nAnything else? ({i})"},
        ]
    return [*chat, {"role": "user", "content": "And tomorrow?"}]


@pytest.mark.parametrize("name", REAL_TEMPLATES)
def test_real_templates_render_exactly_as_in_a_plain_sandbox(name: str):
    source = (FIXTURES / name).read_text(encoding="utf-8")
    chat = _tool_chat(3)
    variables = {"tools": TOOLS, "bos_token": "<s>", "eos_token": "</s>", "add_generation_prompt": True}
    expected = _reference_env().from_string(source).render(messages=chat, documents=None, **variables)
    rendered = TemplateRenderer(now=lambda: NOW).render(source, chat, **variables)
    assert rendered == expected
    assert "Paris" in rendered


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", REAL_TEMPLATES)
def test_a_long_real_chat_stays_within_the_budget(name: str):
    """200 messages with tool calls: far from the loop and memory limits, well inside the time limit."""
    rendered = TemplateRenderer().render((FIXTURES / name).read_text(encoding="utf-8"), _tool_chat(50), tools=TOOLS)
    assert "(49)" in rendered
