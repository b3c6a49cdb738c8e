"""Tool calls, reasoning and structured-output requests on /v1/chat/completions, over the fake model.

The fake model replays a script, so each test decides exactly what "the model" writes and checks
what the API makes of it: real templates from tests/fixtures/chat-templates render the prompt,
and the reply is parsed by the family the template is detected as. Constrained decoding on real
models is tested in tests/api/test_agents_real.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.api.conftest import sse_payloads
from tests.fakes import EOS, script_text

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "tests" / "fixtures" / "chat-templates"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
QWEN25, QWEN3, R1 = "Qwen-Qwen2.5-7B-Instruct", "Qwen-Qwen3-0.6B", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B"


@pytest.fixture
def templates(app):
    folder = app.root / "instruction-templates"
    folder.mkdir(exist_ok=True)
    for name in (QWEN25, QWEN3, R1):
        shutil.copy(TEMPLATES / f"{name}.jinja", folder / f"{name}.jinja")
    shutil.copy(REPO / "instruction-templates" / "ChatML.yaml", folder / "ChatML.yaml")
    return folder


def _say(model, text: str) -> None:
    model.script = script_text(text) + [EOS]


def _prompt(model) -> str:
    return bytes(t for t in model.seen_prompts[-1] if t < 256).decode("utf-8", errors="replace")


def _chat(client, template: str, **body):
    body.setdefault("messages", [{"role": "user", "content": "Weather in Paris?"}])
    return client.post("/v1/chat/completions", json={"instruction_template": template, "max_tokens": 200, **body})


HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_a_hermes_call_becomes_tool_calls(client, model, templates):
    _say(model, HERMES_CALL)
    resp = _chat(client, QWEN25, tools=[WEATHER])
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    prompt = _prompt(model)
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt  # the template rendered the tools


def test_a_streamed_call_never_leaks_markup_and_text_before_it_stays_content(client, model, templates):
    _say(model, "Let me check. " + HERMES_CALL)
    resp = _chat(client, QWEN25, tools=[WEATHER], stream=True)
    chunks = [p for p in sse_payloads(resp.text) if p != "[DONE]"]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    content = "".join(d.get("content") or "" for d in deltas)
    assert content.strip() == "Let me check."
    assert "<tool_call>" not in content
    pieces = [tc for d in deltas for tc in d.get("tool_calls") or []]
    assert pieces[0]["id"] and pieces[0]["function"]["name"] == "get_weather" and pieces[0]["type"] == "function"
    assert all("id" not in p for p in pieces[1:])
    assert json.loads("".join(p["function"].get("arguments") or "" for p in pieces)) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_choice_none_leaves_calls_as_text_and_tools_out_of_the_prompt(client, model, templates):
    _say(model, HERMES_CALL)
    choice = _chat(client, QWEN25, tools=[WEATHER], tool_choice="none").json()["choices"][0]
    assert choice["finish_reason"] == "stop" and not choice["message"]["tool_calls"]
    assert "<tools>" not in _prompt(model)


def test_history_with_a_call_and_its_result_renders_through_the_template(client, model, templates):
    _say(model, "It is sunny.")
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    body = _chat(client, QWEN25, tools=[WEATHER], messages=messages).json()
    assert body["choices"][0]["message"]["content"] == "It is sunny."
    prompt = _prompt(model)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt


def test_thinking_goes_to_reasoning_content(client, model, templates):
    _say(model, "<think>\nThe user greets me.\n</think>\n\nHello!")
    message = _chat(client, QWEN3).json()["choices"][0]["message"]
    assert message == {**message, "content": "Hello!", "reasoning_content": "The user greets me."}


def test_thinking_opened_by_the_generation_prompt_streams_as_reasoning(client, model, templates):
    _say(model, "Hmm, a greeting.\n</think>\n\nHello!")
    resp = _chat(client, R1, stream=True, enable_thinking=True)
    assert _prompt(model).rstrip().endswith("<think>")
    deltas = [p["choices"][0]["delta"] for p in sse_payloads(resp.text) if p != "[DONE]" and p["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas).strip() == "Hmm, a greeting."
    assert "".join(d.get("content") or "" for d in deltas).strip() == "Hello!"


def test_enable_thinking_and_template_kwargs_reach_the_template(client, model, templates):
    _say(model, "Hi")
    _chat(client, QWEN3, enable_thinking=False)
    assert "<think>\n\n</think>" in _prompt(model)  # Qwen3's template closes thinking when it is off
    _chat(client, QWEN3, chat_template_kwargs={"enable_thinking": False})
    assert "<think>\n\n</think>" in _prompt(model)


def test_a_template_without_tools_gets_them_in_the_system_message(client, model, templates):
    _say(model, '{"tool_call": {"name": "get_weather", "arguments": {"city": "Rome"}}}')
    body = _chat(client, "ChatML", tools=[WEATHER]).json()
    (call,) = body["choices"][0]["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Rome"}
    prompt = _prompt(model)
    assert "get_weather" in prompt and prompt.count("<|im_start|>system") == 1


def test_plain_requests_answer_as_before(client, model, templates):
    _say(model, "Hello world")
    message = _chat(client, QWEN25).json()["choices"][0]["message"]
    assert message["content"] == "Hello world" and not message["tool_calls"] and not message["reasoning_content"]


def _error(resp):
    assert resp.status_code == 400, resp.text
    return resp.json()["error"]


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}}}}}]},
     "tools.0.function.parameters"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c9", "content": "r"}]},
     "messages.1.tool_call_id"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
])
def test_bad_agent_requests_are_400_naming_the_field(client, model, templates, body, param):
    err = _error(_chat(client, QWEN25, **body))
    assert err["param"] == param, err


def test_replies_read_for_markup_keep_their_special_tokens(client, model, templates):
    """Call and thinking markup is often special tokens (<|channel|>, [TOOL_CALLS]): a reply that
    is read for it is generated with skip_special_tokens off; a plain ChatML chat keeps the default."""
    _say(model, "Hi")
    _chat(client, QWEN25, tools=[WEATHER])
    assert model.seen_params[-1].skip_special_tokens is False
    _chat(client, "ChatML")
    assert model.seen_params[-1].skip_special_tokens is True
