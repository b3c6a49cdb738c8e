"""OpenAI routes over the fake loader: shapes, streaming, errors."""

from __future__ import annotations

import math

from modules.engine.generation import GenerationChunk
from tests.api.conftest import sse_payloads


def test_models_lists_the_loaded_model_first(client, model, app):
    (app.models.models_dir / "other.gguf").write_bytes(b"GGUF")
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["fake.gguf", "other.gguf"]
    assert client.get("/v1/models/other.gguf").json()["id"] == "other.gguf"
    missing = client.get("/v1/models/nope.gguf")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_completion_returns_text_finish_reason_and_usage(client, model):
    body = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 5, "temperature": 0}).json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "Hello"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


def test_completion_echo_and_list_prompt(client, model):
    body = client.post("/v1/completions", json={"prompt": ["A", "B"], "max_tokens": 2, "echo": True}).json()
    assert [c["text"] for c in body["choices"]] == ["AHe", "BHe"]
    assert [c["index"] for c in body["choices"]] == [0, 1]


def test_completion_stream_is_sse_ending_with_done(client, model):
    with client.stream("POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 64, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(r.read().decode())
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello world"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 11
    assert all("error" not in c for c in chunks)


def test_sillytavern_sampler_shapes_reach_the_engine(client, model):
    body = {"prompt": "Hi", "max_new_tokens": 4, "dry_sequence_breakers": '["\\n", ":"]', "custom_token_bans": "1, 2",
            "sampler_priority": ["min_p", "temperature", "made_up"], "stopping_strings": ["wor"], "seed": -1,
            "logit_bias": {"5": -1.5}, "truncation_length": 100, "ban_eos_token": True, "api_type": "ooba",
            "rep_pen": 1.3, "grammar_string": ""}
    assert client.post("/v1/completions", json=body).status_code == 200
    params = model.seen_params[-1]
    assert params.max_new_tokens == 4 and params.dry_sequence_breakers == ["\n", ":"]
    assert params.custom_token_bans == [1, 2] and params.sampler_priority == ["min_p", "temperature"]
    assert params.stop == ["wor"] and params.logit_bias == {5: -1.5} and params.ban_eos_token
    assert params.truncation_length == 100 and params.repetition_penalty == 1.3


def test_chat_completion_builds_the_prompt_with_the_template(client, model):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    body = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 5}).json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello", "reasoning_content": None,
                                             "tool_calls": None}
    prompt = bytes(t for t in model.seen_prompts[-1] if t < 256).decode()
    assert "<|im_start|>system\nBe brief.<|im_end|>" in prompt  # the client's system replaces the character's
    assert prompt.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")


def test_chat_modes_character_and_user_name(client, model):
    body = {"messages": [{"role": "user", "content": "Hi"}], "mode": "chat", "user_name": "Ann", "max_tokens": 2}
    client.post("/v1/chat/completions", json=body)
    prompt = bytes(t for t in model.seen_prompts[-1] if t < 256).decode()
    assert prompt.endswith("Ann: Hi\nAssistant:")
    assert "\nAnn:" in model.seen_params[-1].stop
    missing = client.post("/v1/chat/completions", json={**body, "character": "Nobody"})
    assert missing.status_code in (400, 404)


def test_chat_stream_with_usage(client, model):
    req = {"messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 100,
           "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=req) as r:
        payloads = sse_payloads(r.read().decode())
    assert payloads[-1] == "[DONE]"
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads[:-2])
    assert text == "Hello world"
    assert payloads[-3]["choices"][0]["finish_reason"] == "stop"
    assert payloads[-2]["choices"] == [] and payloads[-2]["usage"]["completion_tokens"] == 11


def test_continue_extends_the_last_assistant_message(client, model):
    req = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well"}],
           "continue_": True, "max_tokens": 3}
    assert client.post("/v1/chat/completions", json=req).status_code == 200
    prompt = bytes(t for t in model.seen_prompts[-1] if t < 256).decode()
    assert prompt.endswith("assistant\nWell")


def _error(resp, status=400):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_bad_requests_are_400_in_openai_shape(client, model):
    assert _error(client.post("/v1/chat/completions", json={"messages": []}))["param"] == "messages"
    assert _error(client.post("/v1/completions", json={"prompt": "x", "max_tokens": -1}))["param"] == "max_tokens"
    nan = client.post("/v1/completions", content=b'{"prompt": "x", "temperature": NaN}',
                      headers={"content-type": "application/json"})
    assert "temperature" in _error(nan)["message"]
    assert _error(client.post("/v1/completions", json={"prompt": {"a": 1}}))["param"].startswith("prompt")
    bad_json = client.post("/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert "JSON" in _error(bad_json)["message"]
    assert _error(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 10**30}))
    assert _error(client.post("/v1/completions", json={"prompt": "x", "n": 2}))["param"] == "n"
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert _error(client.post("/v1/chat/completions", json=image))["param"] == "messages"
    assert _error(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 5000}))["code"] == \
        "context_length_exceeded"
    assert _error(client.get("/v1/nothing"), 404)["type"] == "not_found_error"


def test_no_model_is_a_clear_400(client):
    err = _error(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}))
    assert err["code"] == "model_not_loaded" and "no model is loaded" in err["message"]


def test_a_failure_mid_stream_is_an_error_chunk_before_done(client, model, monkeypatch):
    from modules.core.errors import GenerationError

    def broken(_chunk):
        raise GenerationError("the backend fell over")

    import modules.api.completions as completions

    monkeypatch.setattr(completions, "usage", broken)
    with client.stream("POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "stream": True}) as r:
        payloads = sse_payloads(r.read().decode())
    assert payloads[-1] == "[DONE]"
    assert payloads[-2]["error"]["message"] == "the backend fell over"


def test_finish_reason_cancelled_maps_to_stop():
    from modules.api.completions import FINISH

    assert FINISH[GenerationChunk("", "", 0, 0, "cancelled").finish_reason] == "stop"
    assert math.isfinite(1.0)
