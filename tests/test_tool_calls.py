"""Tool calls per family over the real chat templates: render, detect, parse (streamed and not), grammar.

Each family: a conversation with tools, an assistant call and its result is rendered
through the model maker's template (template_messages shapes it) and must show the call
and the result in the family's syntax; the family's output is parsed whole and streamed in
random splits, with and without text before the call, with two calls; the call grammar is
valid GBNF (llguidance's parser, over a byte-level vocabulary) that accepts a correct call
and refuses a wrong one.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modules.chat.templates import TemplateRenderer
from modules.chat.tool_calls import (
    TOOL_FAMILIES,
    ParsedReply,
    ReplyDelta,
    ReplyStream,
    call_grammar,
    detect_family,
    generic_tool_prompt,
    new_call_id,
    parse_reply,
    template_messages,
    template_supports_tools,
)
from modules.chat.tool_json import scan_json
from modules.core.errors import InvalidRequestError

TEMPLATES = Path(__file__).parent / "fixtures" / "chat-templates"
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Now", "parameters": {"type": "object", "properties": {}}}},
]
CALL_ID = "call_0123456789abcdef01234567"
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": CALL_ID, "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
    {"role": "tool", "tool_call_id": CALL_ID, "name": "get_weather", "content": "sunny, 21 C"},
]

# template file -> (family, what the rendered call looks like, what the rendered result looks like)
RENDERED = {
    "Qwen-Qwen2.5-7B-Instruct.jinja": (
        "hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
        "<tool_response>\nsunny, 21 C\n</tool_response>"),
    "Qwen-Qwen3-0.6B.jinja": (
        "hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
        "<tool_response>\nsunny, 21 C\n</tool_response>"),
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja": (
        "hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
        "<tool_response>\nsunny, 21 C\n</tool_response>"),
    "meta-llama-Llama-3.1-8B-Instruct.jinja": (
        "llama3", '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}<|eot_id|>',
        "<|start_header_id|>ipython<|end_header_id|>\n\n"),
    "meta-llama-Llama-3.2-3B-Instruct.jinja": (
        "llama3", '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}<|eot_id|>',
        "<|start_header_id|>ipython<|end_header_id|>\n\n"),
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": (
        "mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}, "id": "',
        '[TOOL_RESULTS]{"content": sunny, 21 C, "call_id": "'),
    "Mistral-Small-3.2-24B-Instruct-2506.jinja": (
        "mistral_args", '[TOOL_CALLS]get_weather[CALL_ID]', '[TOOL_CONTENT]sunny, 21 C[/TOOL_RESULTS]'),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja": (
        "deepseek", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
                    '{"city": "Paris", "days": 2}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
        "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny, 21 C<｜tool▁output▁end｜>"),
    "deepseek-ai-DeepSeek-V3.1.jinja": (
        "deepseek_v3_1", '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris", '
                         '"days": 2}<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
        "<｜tool▁output▁begin｜>sunny, 21 C<｜tool▁output▁end｜>"),
    "openai-gpt-oss-120b.jinja": (
        "harmony", '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>'
                   '{"city": "Paris", "days": 2}<|call|>',
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"sunny, 21 C"<|end|>'),
    "google-gemma-4-31B-it.jinja": (
        "gemma4", "<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>,days:2}<tool_call|>",
        "<|tool_response>response:get_weather{value:<|\"|>sunny, 21 C<|\"|>}<tool_response|>"),
}

# family -> (one call, two calls) as the model writes them: get_weather(Paris, 2) [, get_time()]
OUTPUTS = {
    "hermes": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
               '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'),
    "llama3": ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}',
               '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}; '
               '{"name": "get_time", "parameters": {}}'),
    "mistral": ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]',
                '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}, '
                '{"name": "get_time", "arguments": {}}]'),
    "mistral_args": ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 2}',
                     '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 2}[TOOL_CALLS]get_time[ARGS]{}'),
    "deepseek": ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
                 '{"city": "Paris", "days": 2}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
                 "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
                 '{"city": "Paris", "days": 2}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>'
                 "get_time\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
    "deepseek_v3_1": ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris", '
                      '"days": 2}<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
                      '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris", '
                      '"days": 2}<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{}<｜tool▁call▁end｜>'
                      '<｜tool▁calls▁end｜>'),
    "harmony": ('<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
                '{"city": "Paris", "days": 2}<|call|>',
                '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
                '{"city": "Paris", "days": 2}<|call|><|start|>assistant<|channel|>commentary to=functions.get_time '
                '<|constrain|>json<|message|>{}<|call|>'),
    "gemma4": ("<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>,days:2}<tool_call|>",
               "<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>,days:2}<tool_call|>"
               "<|tool_call>call:get_time{}<tool_call|>"),
    "generic": ('{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}',
                '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}, '
                '{"name": "get_time", "arguments": {}}]}'),
}
PREFIX = {"harmony": "<|channel|>commentary<|message|>Let me look that up.<|end|><|start|>assistant"}
WEATHER = ("get_weather", '{"city":"Paris","days":2}')
TIME = ("get_time", "{}")


def render(name: str, chat: list[dict[str, Any]], **extra: Any) -> str:
    source = (TEMPLATES / name).read_text(encoding="utf-8")
    family = detect_family(source)
    return TemplateRenderer().render(source, template_messages(chat, family), add_generation_prompt=True,
                                     bos_token="<s>", eos_token="</s>", tools=TOOLS, **extra)


def streamed(text: str, family_name: str, seed: int, *, tools: bool = True, thinking: bool = False
             ) -> tuple[ParsedReply, ParsedReply, list[ReplyDelta]]:
    """(what the deltas add up to, stream.result(), the deltas) for `text` fed in random pieces."""
    stream = ReplyStream(TOOL_FAMILIES[family_name], tools=tools, thinking=thinking)
    rng = random.Random(seed)
    deltas: list[ReplyDelta] = []
    i = 0
    while i < len(text):
        j = i + rng.randint(1, 8)
        deltas += stream.feed(text[i:j])
        i = j
    deltas += stream.finish()
    return assemble(deltas), stream.result(), deltas


def assemble(deltas: list[ReplyDelta]) -> ParsedReply:
    content = "".join(d.text for d in deltas if d.kind == "content")
    reasoning = "".join(d.text for d in deltas if d.kind == "reasoning")
    calls: dict[int, list[str]] = {}
    from modules.chat.tool_calls import ToolCall
    for d in deltas:
        if d.kind == "tool_call":
            if d.index not in calls:
                assert d.id and d.name, "the first delta of a call names it"
                calls[d.index] = [d.id, d.name, ""]
            else:
                assert d.id is None and d.name is None, "id and name are sent once"
            calls[d.index][2] += d.text
    return ParsedReply(content, reasoning, [ToolCall(*calls[i]) for i in sorted(calls)])


def summary(reply: ParsedReply) -> tuple[str, str, list[tuple[str, str]]]:
    return reply.content, reply.reasoning, [(c.name, c.arguments) for c in reply.tool_calls]


# ----------------------------------------------------------------------------- templates


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_each_template_is_detected_as_its_family(name: str) -> None:
    assert detect_family((TEMPLATES / name).read_text(encoding="utf-8")).name == RENDERED[name][0]


def test_templates_without_tool_syntax_are_generic() -> None:
    assert detect_family(None).name == "generic"
    assert detect_family("{% for m in messages %}{{ m.content }}{% endfor %}").name == "generic"


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_a_call_and_its_result_render_in_the_familys_syntax(name: str) -> None:
    prompt = render(name, CHAT)
    _, call, result = RENDERED[name]
    assert call in prompt
    assert result in prompt
    if template_supports_tools((TEMPLATES / name).read_text(encoding="utf-8")):
        assert "get_weather" in prompt.split(call)[0]  # the tool is declared before the call


def test_mistral_ids_become_the_nine_characters_its_template_demands() -> None:
    prompt = render("mistralai-Mistral-Nemo-Instruct-2407.jinja", CHAT)
    call_id = prompt.split('"id": "')[1][:9]
    assert call_id.isalnum() and f'"call_id": "{call_id}"' in prompt
    assert len(new_call_id(TOOL_FAMILIES["mistral"])) == 9
    assert new_call_id().startswith("call_") and len(new_call_id()) == 29


def test_past_reasoning_reaches_templates_that_keep_it_and_not_those_that_drop_it() -> None:
    chat = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello", "reasoning_content": "SECRET-THOUGHT"},
            {"role": "user", "content": "again"}]
    assert "SECRET-THOUGHT" not in render("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja", chat)
    assert "SECRET-THOUGHT" not in render("openai-gpt-oss-120b.jinja", chat)
    shaped = template_messages(chat)
    assert shaped[1]["reasoning_content"] == "SECRET-THOUGHT" and shaped[1]["thinking"] == "SECRET-THOUGHT"
    assert "reasoning_content" not in chat[1] or chat[1]["reasoning_content"] == "SECRET-THOUGHT"  # not modified


def test_template_messages_shapes_without_touching_the_input() -> None:
    original = json.loads(json.dumps(CHAT))
    shaped = template_messages(CHAT)
    assert CHAT == original
    assert shaped[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "days": 2}
    assert shaped[2]["content"] == "" and shaped[3]["tool_call_id"] == CALL_ID
    assert "tool_calls" not in template_messages([{"role": "assistant", "content": "x", "tool_calls": []}])[0]


def test_template_supports_tools_renders_a_probe_tool() -> None:
    assert template_supports_tools((TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text(encoding="utf-8"))
    assert not template_supports_tools(
        (TEMPLATES / "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja").read_text(encoding="utf-8"))
    assert not template_supports_tools("{{ messages[0].content }}")
    assert not template_supports_tools(None)


def test_generic_templates_get_tools_in_text_and_calls_as_json_turns() -> None:
    text = generic_tool_prompt(TOOLS, "required")
    assert "get_weather" in text and '"tool_call"' in text and "must call" in text
    shaped = template_messages(CHAT, TOOL_FAMILIES["generic"])
    assert json.loads(shaped[2]["content"]) == {"tool_call": {"name": "get_weather", "id": CALL_ID,
                                                              "arguments": {"city": "Paris", "days": 2}}}
    assert shaped[3]["role"] == "user" and "tool_response" in shaped[3]["content"]
    prompt = TemplateRenderer().render("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}", shaped)
    assert "tool_response" in prompt


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("family", sorted(OUTPUTS))
@pytest.mark.parametrize("two", [False, True])
def test_each_familys_calls_parse_whole_and_streamed(family: str, two: bool) -> None:
    text = OUTPUTS[family][1 if two else 0]
    want = ("", "", [WEATHER, TIME] if two else [WEATHER])
    reply = parse_reply(text, TOOL_FAMILIES[family], tools=True, thinking=False)
    assert summary(reply) == want
    assert all(c.id for c in reply.tool_calls)
    for seed in range(12):
        added, result, _ = streamed(text, family, seed)
        assert summary(added) == want
        assert added == result


@pytest.mark.parametrize("family", sorted(set(OUTPUTS) - {"generic"}))
def test_text_before_a_call_stays_content(family: str) -> None:
    before = PREFIX.get(family, "Let me look that up.\n")
    text = before + OUTPUTS[family][0]
    want = ("Let me look that up.", "", [WEATHER])
    assert summary(parse_reply(text, TOOL_FAMILIES[family], tools=True, thinking=False)) == want
    for seed in range(8):
        added, result, deltas = streamed(text, family, seed)
        assert summary(added) == want and added == result
        shown = "".join(d.text for d in deltas if d.kind == "content")
        assert "<" not in shown and "[" not in shown  # no markup ever reached content


def test_llama3_bare_json_is_a_call_only_as_the_whole_reply() -> None:
    family = TOOL_FAMILIES["llama3"]
    text = '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}'
    assert summary(parse_reply(text, family, tools=True, thinking=False)) == ("", "", [WEATHER])
    answer = '{"name": "Bob", "age": 3}'
    assert summary(parse_reply(answer, family, tools=True, thinking=False)) == (answer, "", [])
    assert summary(parse_reply("Here: " + text, family, tools=True, thinking=False))[2] == []


def test_builtin_python_tag_calls_parse() -> None:
    reply = parse_reply('<|python_tag|>brave_search.call(query="weather in SF")', TOOL_FAMILIES["llama3"],
                        tools=True, thinking=False)
    assert summary(reply) == ("", "", [("brave_search", '{"query":"weather in SF"}')])


def test_without_tools_nothing_is_parsed_as_a_call() -> None:
    text = OUTPUTS["hermes"][0]
    reply = parse_reply(text, TOOL_FAMILIES["hermes"], tools=False, thinking=False)
    assert reply.tool_calls == [] and reply.content == text


def test_model_given_ids_are_kept() -> None:
    text = '[TOOL_CALLS][{"name": "get_time", "arguments": {}, "id": "abcDEF123"}]'
    assert parse_reply(text, TOOL_FAMILIES["mistral"], tools=True, thinking=False).tool_calls[0].id == "abcDEF123"


@pytest.mark.parametrize("text", [
    "<tool_call>not json</tool_call> after",
    "<tool_call>\n{\"arguments\": {}}\n</tool_call>",
    "<tool_call>\n{\"name\": 3}\n</tool_call>",
    "<tool_call>",
])
def test_markup_that_never_becomes_a_call_stays_content(text: str) -> None:
    reply = parse_reply(text, TOOL_FAMILIES["hermes"], tools=True, thinking=False)
    assert reply.tool_calls == [] and reply.content == text.strip()
    for seed in range(5):
        added, result, _ = streamed(text, "hermes", seed)
        assert added == result


def test_a_cut_off_call_keeps_its_valid_arguments_as_openai_does_on_length() -> None:
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    reply = parse_reply(text, TOOL_FAMILIES["hermes"], tools=True, thinking=False)
    assert summary(reply) == ("", "", [("get_weather", '{"city":"Par')])


def test_arguments_stream_in_pieces() -> None:
    _, _, deltas = streamed(OUTPUTS["hermes"][0], "hermes", 0)
    pieces = [d for d in deltas if d.kind == "tool_call"]
    assert len(pieces) > 2 and pieces[0].name == "get_weather"


def test_arguments_are_compact_json_dumps_of_what_the_model_wrote() -> None:
    args = {"q": "caf\u00e9 \"x\"\n", "n": [1, 2.5, -0.001, 1e21], "deep": {"t": True, "z": None}}
    text = '<tool_call>\n{"name": "f", "arguments": ' + json.dumps(args, indent=3) + "}\n</tool_call>"
    reply = parse_reply(text, TOOL_FAMILIES["hermes"], tools=True, thinking=False)
    assert reply.tool_calls[0].arguments == json.dumps(args, ensure_ascii=False, separators=(",", ":"))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(value=json_values, indent=st.sampled_from([None, 0, 2]), ascii_=st.booleans())
def test_compact_json_equals_json_dumps(value: object, indent: int | None, ascii_: bool) -> None:
    raw = json.dumps(value, indent=indent, ensure_ascii=ascii_)
    want = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    assert scan_json(raw).compact.encode("utf-8", "backslashreplace") == want.encode("utf-8", "backslashreplace")
    for cut in range(0, len(raw), max(1, len(raw) // 7)):
        assert want.startswith(scan_json(raw[:cut], final=False).compact)


MARKUP = ["<tool_call>", "</tool_call>", "<think>", "</think>", '{"name": "f", "arguments": ', '{"a": 1}', "}",
          "[TOOL_CALLS]", "[ARGS]", "<|channel|>", "analysis", "final", "commentary to=functions.f", "<|message|>",
          "<|end|>", "<|call|>", "<|start|>assistant", "<|tool_call>call:f{", "<|\"|>", "<tool_call|>",
          "<|channel>thought", "<channel|>", "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>",
          "function", "\n```json\n", "<|python_tag|>", " ", "\n", '"', ",", "x", "é"]


@settings(max_examples=300, deadline=None)
@given(family=st.sampled_from(sorted(TOOL_FAMILIES)),
       parts=st.lists(st.sampled_from(MARKUP) | st.text(max_size=5), max_size=14),
       cuts=st.lists(st.integers(1, 9), min_size=1, max_size=30), tools=st.booleans(), thinking=st.booleans())
def test_streamed_pieces_always_add_up_to_the_whole_parse(family: str, parts: list[str], cuts: list[int],
                                                          tools: bool, thinking: bool) -> None:
    text = "".join(parts)
    stream = ReplyStream(TOOL_FAMILIES[family], tools=tools, thinking=thinking)
    deltas: list[ReplyDelta] = []
    i = 0
    for k in range(len(text)):
        step = cuts[k % len(cuts)]
        if i >= len(text):
            break
        deltas += stream.feed(text[i:i + step])
        i += step
    deltas += stream.finish()
    whole = parse_reply(text, TOOL_FAMILIES[family], tools=tools, thinking=thinking)
    assert summary(assemble(deltas)) == summary(whole)
    assert summary(stream.result()) == summary(whole)


# ----------------------------------------------------------------------------- grammars


class _ByteVocab:
    """A vocabulary of the 256 bytes and an end token: checks a grammar on exact text."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"<eos>"]

    def __call__(self, text: str | bytes) -> list[int]:
        return list(text if isinstance(text, bytes) else text.encode("utf-8"))


def grammar_accepts(gbnf: str, text: str) -> bool:
    llguidance = pytest.importorskip("llguidance")
    from llguidance.gbnf_to_lark import gbnf_to_lark

    # The Transformers-family loaders read GBNF this way: llama.cpp-only character ranges
    # (surrogates, past U+10FFFF) dropped, then llguidance's GBNF import.
    from loaders.grammar_mask import _UNREPRESENTABLE

    tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteVocab()))
    lark = gbnf_to_lark(_UNREPRESENTABLE.sub("", gbnf))
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(lark, tokenizer)
    assert not is_error, messages
    matcher = llguidance.LLMatcher(tokenizer, lark, log_level=0)
    for byte in text.encode("utf-8"):
        if not matcher.consume_token(byte):
            return False
    return matcher.is_accepting()


def compact_args(text: str) -> str:
    """The grammars write the arguments as compact JSON (the schema rules have no optional space)."""
    return text.replace('{"city": "Paris", "days": 2}', '{"city":"Paris","days":2}')


GRAMMAR_OUTPUTS = {name: compact_args(text) for name, text in {
    **{name: pair[0] for name, pair in OUTPUTS.items()},
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}',
    "harmony": '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris", "days": 2}',
    "generic": '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]}'}.items()}


@pytest.mark.parametrize("family", sorted(GRAMMAR_OUTPUTS))
def test_each_call_grammar_accepts_a_valid_call_and_refuses_a_wrong_one(family: str) -> None:
    grammar = call_grammar(TOOL_FAMILIES[family], TOOLS)
    good = GRAMMAR_OUTPUTS[family]
    assert grammar_accepts(grammar.gbnf, good)
    assert not grammar_accepts(grammar.gbnf, good.replace("get_weather", "get_wether"))
    if family != "gemma4":  # Gemma's arguments are checked for shape only
        assert not grammar_accepts(grammar.gbnf, good.replace('"Paris"', "7"))
        assert parse_reply(good, TOOL_FAMILIES[family], tools=True, thinking=False).tool_calls[0].name == "get_weather"
    # A lazy grammar starts at the trigger's first group: right where the call opens.
    text = good if family in ("llama3", "generic") else "Sure. " + good
    starts = [m.start(1) for trigger in grammar.triggers if (m := re.search(trigger, text))]
    assert text.index(good) in starts


def test_a_named_tool_choice_allows_only_that_function() -> None:
    grammar = call_grammar(TOOL_FAMILIES["hermes"], TOOLS, name="get_time")
    assert grammar_accepts(grammar.gbnf, '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    assert not grammar_accepts(grammar.gbnf, compact_args(OUTPUTS["hermes"][0]))


def test_parallel_false_allows_one_call() -> None:
    two = compact_args(OUTPUTS["hermes"][1])
    assert grammar_accepts(call_grammar(TOOL_FAMILIES["hermes"], TOOLS).gbnf, two)
    assert not grammar_accepts(call_grammar(TOOL_FAMILIES["hermes"], TOOLS, parallel=False).gbnf, two)


@pytest.mark.parametrize(("tools", "name", "param"), [
    ([{"type": "function", "function": {"parameters": {}}}], None, "tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": "no"}}], None, "tools"),
    (TOOLS, "missing", "tool_choice"),
    ([], None, "tools"),
])
def test_bad_tools_are_request_errors_naming_the_field(tools: list[dict[str, Any]], name: str | None,
                                                       param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        call_grammar(TOOL_FAMILIES["hermes"], tools, name=name)
    assert info.value.param == param


@pytest.mark.parametrize("family", sorted(TOOL_FAMILIES))
def test_triggers_are_in_the_regex_dialect_llama_cpp_and_python_read_alike(family: str) -> None:
    from loaders.llama_cpp_sampler import check_trigger_pattern

    for trigger in call_grammar(TOOL_FAMILIES[family], TOOLS).triggers:
        assert check_trigger_pattern(trigger) == trigger
