"""Extension hooks reach API generations through the same engine calls as the UI."""

from __future__ import annotations

from modules.engine.extensions import GENERATION_ORDER
from tests.api.conftest import sse_payloads
from tests.extension_scripts import FLAKY_OUTPUT, RECORDER, write_extension


def _enable(app, name: str, source: str):
    write_extension(app.root, name, source)
    assert app.set_extensions([name]) == [name]
    module = app.extensions.enabled[0].module
    module.CALLS.clear()
    return module


def test_chat_completions_call_every_hook_once_in_order(app, client, model):
    module = _enable(app, "recorder", RECORDER)
    body = {"messages": [{"role": "user", "content": "Hi there"}], "mode": "chat", "max_tokens": 20}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "HELLO WORLD"
    assert module.CALLS == list(GENERATION_ORDER)
    assert "Hi there [in]" in bytes(i for i in model.seen_prompts[-1] if i < 256).decode()


def test_streamed_chat_completions_call_every_hook_once(app, client, model):
    module = _enable(app, "recorder", RECORDER)
    body = {"messages": [{"role": "user", "content": "Hi"}], "mode": "chat", "max_tokens": 20, "stream": True}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert sse_payloads(response.text)[-1] == "[DONE]"
    assert module.CALLS == list(GENERATION_ORDER)


def test_completions_call_the_plain_hooks(app, client, model):
    module = _enable(app, "recorder", RECORDER)
    response = client.post("/v1/completions", json={"prompt": "Say", "max_tokens": 20})
    assert response.json()["choices"][0]["text"] == "HELLO WORLD"
    assert module.CALLS == ["state_modifier", "input_modifier", "custom_generate_reply", "tokenizer_modifier",
                            "output_modifier"]


def test_a_failing_output_modifier_never_breaks_the_api(app, client, model):
    _enable(app, "flaky", FLAKY_OUTPUT)
    body = {"messages": [{"role": "user", "content": "Hi"}], "mode": "chat", "max_tokens": 20}
    first = client.post("/v1/chat/completions", json=body)
    assert first.json()["choices"][0]["message"]["content"] == "Hello world"
    assert len(app.extensions.drain_errors()) == 1
    second = client.post("/v1/chat/completions", json=body)
    assert second.json()["choices"][0]["message"]["content"] == "Hello world!"
    assert app.extensions.drain_errors() == []
