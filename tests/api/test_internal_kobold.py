"""ooba internal routes, KoboldAI routes, SillyTavern's real bodies, auth and CORS (fake loader)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from modules.api import create_app
from tests.api.conftest import LOCAL, sse_payloads

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sillytavern"
"""Bodies captured from SillyTavern (copied from the team's shared fixtures: the repo is self-contained)."""
ROUTES = {
    "ooba_v1_completions.json": "/v1/completions",
    "ooba_v1_completions_stream.json": "/v1/completions",
    "koboldcpp_v1_completions.json": "/v1/completions",
    "koboldcpp_v1_completions_stream.json": "/v1/completions",
    "koboldai_api_v1_generate.json": "/api/v1/generate",
    "koboldai_api_extra_generate_stream.json": "/api/extra/generate/stream",
    "koboldcpp_api_extra_tokencount.json": "/api/extra/tokencount",
}


def check_fixture_response(name: str, resp) -> None:
    """The shape SillyTavern reads from each route (CLIENT_CONTRACTS.md)."""
    assert resp.status_code == 200, resp.text
    body = json.loads((FIXTURES / name).read_text())
    if name.endswith("tokencount.json"):
        assert resp.json()["value"] == len(resp.json()["ids"]) > 0
    elif name.startswith("koboldai_api_extra"):
        events = [b for b in resp.text.split("\n\n") if b]
        assert all(b.startswith("event: message\ndata: ") for b in events)
        assert "".join(p["token"] for p in sse_payloads(resp.text))
    elif body.get("stream"):
        payloads = sse_payloads(resp.text)
        assert payloads[-1] == "[DONE]" and payloads[-2]["choices"][0]["finish_reason"]
        assert all(isinstance(p["choices"][0]["text"], str) for p in payloads[:-1])
    elif name.startswith("koboldai"):
        assert isinstance(resp.json()["results"][0]["text"], str)
    else:
        assert isinstance(resp.json()["choices"][0]["text"], str)


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_sillytavern_fixture_is_accepted_unchanged(client, model, name):
    body = json.loads((FIXTURES / name).read_text())
    check_fixture_response(name, client.post(ROUTES[name], json=body))
    if "prompt" in body and "tokencount" not in name:
        assert model.seen_params[-1].stop == ["\nUser:", "\n***"]


def test_tokens_and_model_info(client, model, app):
    assert client.get("/v1/internal/model/info").json() == {"model_name": "fake.gguf", "lora_names": [],
                                                            "loader": "fake"}
    assert client.get("/v1/internal/model/list").json() == {"model_names": ["fake.gguf"]}
    enc = client.post("/v1/internal/encode", json={"text": "hé"}).json()
    assert enc == {"tokens": [256, 104, 195, 169], "length": 4}
    assert client.post("/v1/internal/decode", json={"tokens": enc["tokens"]}).json() == {"text": "hé"}
    assert client.post("/v1/internal/token-count", json={"text": "abc"}).json() == {"length": 4}
    prompt = client.post("/v1/internal/chat-prompt", json={"messages": [{"role": "user", "content": "Yo"}]}).json()
    assert prompt["prompt"].endswith("<|im_start|>user\nYo<|im_end|>\n<|im_start|>assistant\n")
    assert client.post("/v1/internal/stop-generation").json()["status"] == "OK"
    assert client.post("/v1/internal/logits", json={"prompt": "x"}).status_code == 400  # the fake reports none


def test_load_and_unload(client, app):
    assert client.post("/v1/internal/model/load", json={"model_name": "fake.gguf", "args": {"loader": "fake"}}
                       ).json()["status"] == "OK"
    assert app.models.name == "fake.gguf"
    assert client.post("/v1/internal/model/unload").json() == {"status": "OK"}
    assert app.models.name is None
    assert client.get("/v1/internal/model/info").json()["model_name"] == "None"
    assert client.post("/v1/internal/encode", json={"text": "x"}).status_code == 400
    for name, status in (("../../etc/passwd", 400), ("/etc/passwd", 400), ("missing.gguf", 404)):
        resp = client.post("/v1/internal/model/load", json={"model_name": name})
        assert resp.status_code == status, (name, resp.text)
    bad_option = client.post("/v1/internal/model/load", json={"model_name": "fake.gguf",
                                                              "args": {"loader": "fake", "bogus": 1}})
    assert bad_option.status_code == 400 and "bogus" in bad_option.json()["error"]["message"]


def test_kobold_info_routes(client, model):
    assert client.get("/api/v1/model").json() == {"result": "fake.gguf"}
    assert client.get("/api/v1/info/version").json() == {"result": "1.2.5"}
    assert client.get("/api/extra/version").json()["result"] == "KoboldCpp"
    assert client.get("/api/v1/config/max_context_length").json() == {"value": 4096}
    assert client.get("/api/v1/config/max_length").json() == {"value": 512}
    assert client.post("/api/extra/abort").json()["success"] is True
    client.post("/api/v1/generate", json={"prompt": "Hi", "max_length": 5})
    perf = client.get("/api/extra/perf").json()
    assert perf["last_token_count"] == 5 and perf["stop_reason"] == 0 and perf["idle"] == 1
    assert client.get("/props").json()["default_generation_settings"]["n_ctx"] == 4096


def test_api_key_is_required_and_cors_preflight_passes(app, model):
    # Flags as given on the command line (update_settings refuses the exposure switches).
    app.settings = dataclasses.replace(app.settings, api_key="sekrit", api_cors_origins="http://localhost:8000")
    with TestClient(create_app(app), base_url=LOCAL) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).json()["error"]["type"] == \
            "authentication_error"
        assert client.get("/v1/models", headers={"Authorization": "Bearer sekrit"}).status_code == 200
        assert client.get("/v1/models", headers={"x-api-key": "sekrit"}).status_code == 200
        pre = client.options("/v1/completions", headers={"Origin": "http://localhost:8000",
                                                         "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "http://localhost:8000"
        assert client.get("/openapi.json").status_code == 200 and client.get("/docs").status_code == 200


def test_embeddings_without_the_package_say_how_to_install(client, monkeypatch):
    import modules.engine.embeddings as embeddings

    monkeypatch.setattr(embeddings, "PACKAGE", "no_such_package_here")
    resp = client.post("/v1/embeddings", json={"input": "hello"})
    assert resp.status_code == 400 and "pip install" in resp.json()["error"]["message"]
