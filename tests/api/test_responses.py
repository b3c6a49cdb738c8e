"""Typed responses: /openapi.json names a response model for every route, real answers (JSON and
every SSE chunk) conform to the schema it documents, and unknown request fields are logged."""

from __future__ import annotations

import logging
import os
from typing import Any

import pytest

from modules.api.responses import (
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    ErrorResponse,
    UsageInfo,
)
from modules.api.schemas import ChatCompletionRequest
from modules.api.unknown_fields import unknown_fields
from tests.api.conftest import sse_payloads

jsonschema_rs = pytest.importorskip("jsonschema_rs")

CHAT = [{"role": "user", "content": "Hi"}]
JSON_MODELS = {
    ("get", "/health"): "HealthResponse",
    ("get", "/v1/models"): "ModelList",
    ("get", "/v1/models/{name}"): "ModelCard",
    ("post", "/v1/completions"): "CompletionResponse",
    ("post", "/v1/chat/completions"): "ChatCompletionResponse",
    ("post", "/v1/embeddings"): "EmbeddingResponse",
    ("get", "/v1/internal/model/info"): "ModelInfoResponse",
    ("get", "/v1/internal/model/list"): "ModelListResponse",
    ("post", "/v1/internal/model/load"): "LoadModelResponse",
    ("post", "/v1/internal/model/unload"): "StatusResponse",
    ("post", "/v1/internal/encode"): "EncodeResponse",
    ("post", "/v1/internal/decode"): "DecodeResponse",
    ("post", "/v1/internal/token-count"): "TokenCountResponse",
    ("post", "/v1/internal/logits"): "LogitsResponse",
    ("post", "/v1/internal/chat-prompt"): "ChatPromptResponse",
    ("post", "/v1/internal/stop-generation"): "StopGenerationResponse",
    ("get", "/api/v1/model"): "KoboldResult",
    ("get", "/api/v1/info/version"): "KoboldResult",
    ("get", "/api/extra/version"): "KoboldCppVersion",
    ("get", "/api/v1/config/max_context_length"): "KoboldValue",
    ("get", "/api/v1/config/max_length"): "KoboldValue",
    ("post", "/api/v1/generate"): "KoboldGenerateResponse",
    ("post", "/api/extra/tokencount"): "KoboldTokenCount",
    ("post", "/api/extra/abort"): "KoboldAbortResponse",
    ("get", "/api/extra/perf"): "KoboldPerf",
    ("get", "/props"): "LlamaCppProps",
}
SSE_MODELS = {
    ("post", "/v1/completions"): "CompletionStreamResponse",
    ("post", "/v1/chat/completions"): "ChatCompletionStreamResponse",
    ("post", "/api/extra/generate/stream"): "KoboldStreamToken",
}


@pytest.fixture
def doc(client) -> dict[str, Any]:
    resp = client.get("/openapi.json")
    assert resp.status_code == 200
    return resp.json()


def conforms(doc: dict[str, Any], schema: dict[str, Any], payload: Any) -> None:
    """Assert `payload` is valid under `schema`, a schema of `doc` (its $refs resolved in `doc`)."""
    validator = jsonschema_rs.validator_for({**schema, "components": doc["components"]})
    errors = [f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in validator.iter_errors(payload)]
    assert not errors, (errors, payload)


def json_schema(doc: dict[str, Any], method: str, path: str, status: str = "200") -> dict[str, Any]:
    return doc["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]


def sse_schema(doc: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    """The schema of one SSE event's JSON `data` (its contentSchema: the chunk or an ErrorResponse)."""
    event = doc["paths"][path][method]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    data = event["properties"]["data"]
    payload = next(d for d in data.get("anyOf", [data]) if "contentSchema" in d)
    assert payload["type"] == "string" and payload["contentMediaType"] == "application/json"
    return payload["contentSchema"]


# --------------------------------------------------------------------------- the document
def test_docs_page_and_document_are_served(client, doc):
    page = client.get("/docs")
    assert page.status_code == 200 and "swagger" in page.text.lower()
    assert doc["openapi"].startswith("3.")
    responses = [r for ops in doc["paths"].values() for op in ops.values() for r in op["responses"].values()]
    for response in responses:
        for content in response.get("content", {}).values():
            # Every schema the document gives compiles, its $refs resolved.
            jsonschema_rs.validator_for({**content["schema"], "components": doc["components"]})


def test_every_route_names_its_response_model(doc):
    operations = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert operations == set(JSON_MODELS) | set(SSE_MODELS), "a route without a response model, or a stale table"
    for (method, path), name in JSON_MODELS.items():
        assert json_schema(doc, method, path) == {"$ref": f"#/components/schemas/{name}"}, (method, path)
    for (method, path), name in SSE_MODELS.items():
        chunk, error = sse_schema(doc, method, path)["anyOf"]
        assert chunk["title"] == name and "$ref" not in str(chunk), "inlined: chunk models are not in #/components"
        assert error == {"$ref": "#/components/schemas/ErrorResponse"}
    # The Kobold stream answers only SSE; the OpenAI ones JSON or SSE (by `stream`).
    kobold_stream = doc["paths"]["/api/extra/generate/stream"]["post"]["responses"]["200"]["content"]
    assert set(kobold_stream) == {"text/event-stream"}
    assert kobold_stream["text/event-stream"]["schema"]["properties"]["event"] == {"const": "message"}
    openai_data = doc["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    assert {"const": "[DONE]"} in openai_data["schema"]["properties"]["data"]["anyOf"]


OPEN_ROUTES = {"/health"}
"""Routes that ask no key (so document no 401)."""


def test_errors_are_documented_in_their_one_shape_and_no_422(doc):
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)  # validation errors are 400s
            keyed = path not in OPEN_ROUTES
            for status in ("400", "401", "403", "4XX") if keyed else ("400", "403", "4XX"):
                assert json_schema(doc, method, path, status) == {"$ref": "#/components/schemas/ErrorResponse"}
    generate = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"413", "415", "429", "500"} <= set(generate)
    assert "404" in doc["paths"]["/v1/models/{name}"]["get"]["responses"]


# --------------------------------------------------------------------------- real answers conform
def test_completions_conform_json_and_every_chunk(client, model, doc):
    model.report_logprobs()
    path = "/v1/completions"
    body = {"prompt": ["A", "B"], "max_tokens": 4, "echo": True, "logprobs": 2}
    resp = client.post(path, json=body)
    conforms(doc, json_schema(doc, "post", path), resp.json())
    CompletionResponse.model_validate(resp.json())
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", path, json=stream) as r:
        chunks = sse_payloads(r.read().decode())[:-1]
    assert len(chunks) > 5
    for chunk in chunks:
        conforms(doc, sse_schema(doc, "post", path), chunk)
        CompletionStreamResponse.model_validate(chunk)
    assert chunks[-1]["choices"] == [] and UsageInfo.model_validate(chunks[-1]["usage"])


def test_chat_completions_conform_json_and_every_chunk(client, model, doc):
    model.report_logprobs()
    path = "/v1/chat/completions"
    body = {"messages": CHAT, "max_tokens": 6, "logprobs": True, "top_logprobs": 2}
    resp = client.post(path, json=body)
    conforms(doc, json_schema(doc, "post", path), resp.json())
    ChatCompletionResponse.model_validate(resp.json())
    for options in ({}, {"stream_options": {"include_usage": True}}):
        with client.stream("POST", path, json={**body, "stream": True, **options}) as r:
            chunks = sse_payloads(r.read().decode())[:-1]
        for chunk in chunks:
            conforms(doc, sse_schema(doc, "post", path), chunk)
            ChatCompletionStreamResponse.model_validate(chunk)
            # The usage key is there (null until the last) only when include_usage asked for it.
            assert ("usage" in chunk) == bool(options)


def test_internal_and_kobold_answers_conform(client, model, doc):
    calls = [
        ("get", "/v1/models", None), ("get", "/v1/models/fake.gguf", None),
        ("get", "/v1/internal/model/info", None), ("get", "/v1/internal/model/list", None),
        ("post", "/v1/internal/encode", {"text": "Hi"}), ("post", "/v1/internal/decode", {"tokens": [72, 105]}),
        ("post", "/v1/internal/token-count", {"text": "Hi"}), ("post", "/v1/internal/chat-prompt", {"messages": CHAT}),
        ("post", "/v1/internal/stop-generation", None),
        ("get", "/api/v1/model", None), ("get", "/api/v1/info/version", None), ("get", "/api/extra/version", None),
        ("get", "/api/v1/config/max_context_length", None), ("get", "/api/v1/config/max_length", None),
        ("post", "/api/v1/generate", {"prompt": "Hi", "max_length": 3}),
        ("post", "/api/extra/tokencount", {"prompt": "Hi"}), ("post", "/api/extra/abort", {"genkey": "k"}),
        ("get", "/api/extra/perf", None), ("get", "/props", None),
        ("post", "/v1/internal/model/unload", None),
    ]
    for method, path, body in calls:
        resp = client.request(method.upper(), path, json=body)
        assert resp.status_code == 200, (path, resp.text)
        template = path if path != "/v1/models/fake.gguf" else "/v1/models/{name}"
        conforms(doc, json_schema(doc, method, template), resp.json())


def test_logits_answer_conforms(client, model, doc):
    model.report_logprobs()
    resp = client.post("/v1/internal/logits", json={"prompt": "Hi", "top_logits": 3})
    assert resp.status_code == 200, resp.text
    conforms(doc, json_schema(doc, "post", "/v1/internal/logits"), resp.json())


def test_kobold_stream_tokens_conform(client, model, doc):
    path = "/api/extra/generate/stream"
    with client.stream("POST", path, json={"prompt": "Hi", "max_length": 50}) as r:
        tokens = sse_payloads(r.read().decode())
    for token in tokens:
        conforms(doc, sse_schema(doc, "post", path), token)
    assert "finish_reason" not in tokens[0] and tokens[-1]["finish_reason"] == "stop"


def test_errors_conform_whatever_raised_them(client, model, doc):
    answers = [client.post("/v1/chat/completions", json={"messages": []}),  # validation
               client.get("/v1/models/nope.gguf"),  # engine error
               client.post("/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"})]
    for resp in answers:
        assert 400 <= resp.status_code < 500
        conforms(doc, json_schema(doc, "post", "/v1/completions", "400"), resp.json())
        ErrorResponse.model_validate(resp.json())


def test_a_model_file_name_that_is_not_utf8_is_listed(client, model, app):
    # A file name read with surrogateescape holds a lone surrogate: the response models keep it
    # and SafeJSONResponse writes U+FFFD (pydantic's own JSON encoder would fail on it).
    odd = os.fsencode(app.models.models_dir) + b"/odd\xff.gguf"
    try:
        open(odd, "wb").close()
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    resp = client.get("/v1/models")
    assert resp.status_code == 200
    assert "odd\ufffd.gguf" in [card["id"] for card in resp.json()["data"]]


# --------------------------------------------------------------------------- the models themselves
def test_chunks_send_only_the_keys_their_builder_set():
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    first = ChatCompletionStreamResponse(**head, choices=[{"index": 0, "delta": DeltaMessage(role="assistant", content=""),
                                                           "logprobs": None, "finish_reason": None}])
    assert first.model_dump(exclude_unset=True)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "usage" not in first.model_dump(exclude_unset=True)
    last = ChatCompletionStreamResponse(**head, choices=[{"index": 0, "delta": DeltaMessage(), "logprobs": None,
                                                          "finish_reason": "stop"}], usage=None)
    assert last.model_dump(exclude_unset=True)["choices"][0]["delta"] == {}
    assert last.model_dump(exclude_unset=True)["usage"] is None


def test_a_misspelt_or_missing_field_fails_where_it_is_built():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        UsageInfo(prompt_tokens=1, completion_tokens=2, total_tokens=3, cached_tokens=0)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        CompletionStreamResponse(id="x", object="text_completion", created=0, model="m", choices=[])  # type: ignore[call-arg]


# --------------------------------------------------------------------------- unknown request fields
def test_unknown_fields_are_named_by_their_dotted_path():
    req = ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a", "cache": 1}], "refusal": "t"}],
        "api_type": "ooba", "stream_options": {"include_usage": True, "chunked": 1}})
    assert unknown_fields(req) == ["api_type", "messages.0.refusal", "messages.0.content.0.cache",
                                   "stream_options.chunked"]


def test_unknown_fields_are_logged_at_debug_once_per_request(client, model, caplog):
    caplog.set_level(logging.DEBUG, logger="modules.api.unknown_fields")
    body = {"prompt": "Hi", "max_tokens": 2, "api_type": "ooba", "skew": 0, "rep_pen": 1.1}
    assert client.post("/v1/completions", json=body).status_code == 200
    lines = [r for r in caplog.records if r.name == "modules.api.unknown_fields"]
    assert len(lines) == 1 and lines[0].levelno == logging.DEBUG
    assert lines[0].getMessage() == "POST /v1/completions: unknown fields: api_type, skew"
    caplog.clear()
    client.post("/v1/internal/chat-prompt", json={"messages": [{"role": "user", "content": "Hi", "x": 1}]})
    client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})  # nothing unknown: no line
    assert [r.getMessage() for r in caplog.records if r.name == "modules.api.unknown_fields"] == [
        "POST /v1/internal/chat-prompt: unknown fields: messages.0.x"]


def test_unknown_fields_cost_nothing_without_debug(client, model, caplog, monkeypatch):
    import modules.api.unknown_fields as module

    caplog.set_level(logging.INFO, logger="modules.api.unknown_fields")
    walked: list[Any] = []
    monkeypatch.setattr(module, "unknown_fields", lambda *args: walked.append(args) or [])
    assert client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "api_type": "x"}).status_code == 200
    assert walked == [] and not [r for r in caplog.records if r.name == module.log.name]
