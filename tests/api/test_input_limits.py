"""Input limits and bad text: each cap on a request is a 400 naming the field, SillyTavern's real
bodies stay inside them, text that is not Unicode is a 400 (never a 500), no error costs a
client its kept-alive connection, and every JSON encoder of the API survives any text."""

from __future__ import annotations

import http.client
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from modules.api import schemas, serve_in_thread
from modules.api.errors import json_text
from modules.api.schemas import (
    MAX_BANNED_TOKENS,
    MAX_CHOICES,
    MAX_CONTENT_PARTS,
    MAX_DECODE_TOKENS,
    MAX_EMBEDDING_INPUTS,
    MAX_GRAMMAR_CHARS,
    MAX_JSON_DEPTH,
    MAX_LIST_ITEMS,
    MAX_LOGIT_BIAS,
    MAX_MESSAGES,
    MAX_OPTIONS,
    MAX_PROMPT_TOKENS,
    MAX_PROMPTS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOKEN_WINDOW,
    MAX_TOP_LOGPROBS,
)
from modules.api.streaming import sse_data
from modules.core.errors import InvalidRequestError
from modules.core.sampling import SamplingParams
from tests.api.api_server import ApiServer
from tests.test_server import free_port

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sillytavern"
CHAT = "/v1/chat/completions"
USER = {"role": "user", "content": "Hi"}


def nest(levels: int) -> Any:
    """`levels` arrays, one inside the other."""
    value: Any = "x"
    for _ in range(levels):
        value = [value]
    return value


def _error(resp: Any) -> dict[str, Any]:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


# (route, body over one cap, the param the 400 names)
OVER = {
    "json depth": ("/v1/completions", {"prompt": "Hi", "x": nest(MAX_JSON_DEPTH)}, "x" + ".0" * (MAX_JSON_DEPTH - 1)),
    "prompt list": ("/v1/completions", {"prompt": ["a"] * (MAX_PROMPTS + 1)}, "prompt"),
    "prompt token ids": ("/v1/completions", {"prompt": [1] * (MAX_PROMPT_TOKENS + 1)}, "prompt"),
    "stop count": ("/v1/completions", {"prompt": "x", "stop": ["a"] * (MAX_STOP_STRINGS + 1)}, "stop"),
    "stop length": ("/v1/completions", {"prompt": "x", "stop": ["a" * (MAX_STOP_CHARS + 1)]}, "stop.0"),
    "stop string": ("/v1/completions", {"prompt": "x", "stop": "a" * (MAX_STOP_CHARS + 1)}, "stop"),
    "stopping_strings": ("/v1/completions", {"prompt": "x", "stopping_strings": ["a"] * (MAX_STOP_STRINGS + 1)},
                         "stopping_strings"),
    "stop_sequence": ("/api/v1/generate", {"prompt": "x", "stop_sequence": ["a" * (MAX_STOP_CHARS + 1)]},
                      "stop_sequence.0"),
    "grammar_string": ("/v1/completions", {"prompt": "x", "grammar_string": "a" * (MAX_GRAMMAR_CHARS + 1)},
                       "grammar_string"),
    "grammar": ("/api/v1/generate", {"prompt": "x", "grammar": "a" * (MAX_GRAMMAR_CHARS + 1)}, "grammar"),
    "logit_bias": ("/v1/completions", {"prompt": "x", "logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}},
                   "logit_bias"),
    "banned token list": ("/v1/completions", {"prompt": "x", "custom_token_bans": [1] * (MAX_BANNED_TOKENS + 1)},
                          "custom_token_bans"),
    "banned token text": ("/v1/completions", {"prompt": "x", "custom_token_bans": "1," * MAX_BANNED_TOKENS + "1"},
                          "custom_token_bans"),
    "dry breakers": ("/v1/completions", {"prompt": "x", "dry_sequence_breakers": ["a"] * (MAX_LIST_ITEMS + 1)},
                     "dry_sequence_breakers"),
    "sampler_priority": ("/v1/completions", {"prompt": "x", "sampler_priority": ["top_k"] * (MAX_LIST_ITEMS + 1)},
                         "sampler_priority"),
    "penalty window": ("/v1/completions", {"prompt": "x", "repetition_penalty_range": MAX_TOKEN_WINDOW + 1},
                       "repetition_penalty_range"),
    "kobold penalty window": ("/api/v1/generate", {"prompt": "x", "rep_pen_range": MAX_TOKEN_WINDOW + 1},
                              "rep_pen_range"),
    "dry window": ("/v1/completions", {"prompt": "x", "dry_penalty_last_n": 2**31 - 1}, "dry_penalty_last_n"),
    "n": ("/v1/completions", {"prompt": "x", "n": MAX_CHOICES + 1}, "n"),
    "best_of cap": ("/v1/completions", {"prompt": "x", "best_of": MAX_CHOICES + 1}, "best_of"),
    "best_of": ("/v1/completions", {"prompt": "x", "best_of": 2}, "best_of"),
    "logprobs": ("/v1/completions", {"prompt": "x", "logprobs": MAX_TOP_LOGPROBS + 1}, "logprobs"),
    "top_logprobs": (CHAT, {"messages": [USER], "logprobs": True, "top_logprobs": MAX_TOP_LOGPROBS + 1},
                     "top_logprobs"),
    "messages": (CHAT, {"messages": [USER] * (MAX_MESSAGES + 1)}, "messages"),
    "content parts": (CHAT, {"messages": [{"role": "user", "content": [{"text": "a"}] * (MAX_CONTENT_PARTS + 1)}]},
                      "messages.0.content"),
    "decode tokens": ("/v1/internal/decode", {"tokens": [1] * (MAX_DECODE_TOKENS + 1)}, "tokens"),
    "embedding inputs": ("/v1/embeddings", {"input": ["a"] * (MAX_EMBEDDING_INPUTS + 1)}, "input"),
    "load options": ("/v1/internal/model/load", {"model_name": "fake.gguf",
                                                 "args": {f"o{i}": 1 for i in range(MAX_OPTIONS + 1)}}, "args"),
}


@pytest.mark.parametrize("name", sorted(OVER))
def test_over_a_cap_is_a_400_naming_the_field(client, model, name):
    route, body, param = OVER[name]
    err = _error(client.post(route, json=body))
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error"


AT = {
    "json depth": ("/v1/completions", {"prompt": "Hi", "x": nest(MAX_JSON_DEPTH - 1)}),
    "prompt list": ("/v1/completions", {"prompt": ["a"] * MAX_PROMPTS}),
    "stop": ("/v1/completions", {"prompt": "x", "stop": ["\n" + "a" * (MAX_STOP_CHARS - 1)] * MAX_STOP_STRINGS}),
    "logit_bias": ("/v1/completions", {"prompt": "x", "logit_bias": {str(i): -1 for i in range(MAX_LOGIT_BIAS)}}),
    "banned tokens": ("/v1/completions", {"prompt": "x", "custom_token_bans": ",".join(["7"] * MAX_BANNED_TOKENS)}),
    "penalty window": ("/v1/completions", {"prompt": "x", "repetition_penalty_range": MAX_TOKEN_WINDOW}),
    "content parts": (CHAT, {"messages": [{"role": "user", "content": [{"text": "a"}] * MAX_CONTENT_PARTS}]}),
}


@pytest.mark.parametrize("name", sorted(AT))
def test_at_a_cap_is_accepted(client, model, name):
    route, body = AT[name]
    resp = client.post(route, json={**body, "max_tokens": 2})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.json")))
def test_sillytavern_bodies_are_within_every_cap(name):
    body = json.loads((FIXTURES / name).read_text())
    if "tokencount" in name:
        model: type[schemas.Body] = schemas.KoboldTokenCountRequest
    elif name.startswith("koboldai_"):
        model = schemas.KoboldGenerateRequest
    else:
        model = schemas.CompletionRequest
    model.model_validate(body)  # a ValidationError names the cap it broke


def test_every_documented_range_is_the_one_sampling_params_enforces():
    """The schema shows SamplingParams' ranges (for the OpenAPI page and the fuzzer): same numbers."""
    properties = {**schemas.KoboldGenerateRequest.model_json_schema()["properties"],
                  **schemas.CompletionRequest.model_json_schema()["properties"]}
    aliases = {alias: ours for ours, names in schemas._ALIASES.items() for alias in names}
    checked = 0
    for field, prop in properties.items():
        number = next((p for p in prop.get("anyOf", [prop]) if p.get("type") in ("number", "integer")), None)
        name = aliases.get(field, field)
        if number is None or name not in SamplingParams.field_names():
            continue
        if "enum" in number:
            for value in number["enum"]:
                SamplingParams(**{name: value})
            with pytest.raises(InvalidRequestError, match=name):
                SamplingParams(**{name: max(number["enum"]) + 1})
            checked += 1
        elif "exclusiveMinimum" in number:
            with pytest.raises(InvalidRequestError, match=name):
                SamplingParams(**{name: number["exclusiveMinimum"]})
            checked += 1
        elif number.get("minimum", -(2**31)) > -(2**31):  # Int32's bound is ours, not a range
            SamplingParams(**{name: number["minimum"]})
            with pytest.raises(InvalidRequestError, match=name):
                SamplingParams(**{name: number["minimum"] - 1})
            checked += 1
        if number["type"] == "number" and "maximum" in number:  # integer maxima are our caps
            SamplingParams(**{name: number["maximum"]})
            with pytest.raises(InvalidRequestError, match=name):
                SamplingParams(**{name: number["maximum"] + 0.5})
            checked += 1
    assert checked >= 30, checked


# ----------------------------------------------------------------------------- text that is not Unicode
SURROGATES = [
    ("/v1/completions", r'{"prompt": "a\ud800b"}', "prompt"),
    ("/v1/completions", r'{"prompt": ["ok", "\udfff"]}', "prompt.1"),
    ("/v1/completions", r'{"prompt": "x", "stop": ["\n", "\ud83d"]}', "stop.1"),
    ("/v1/completions", r'{"prompt": "x", "api_type": "\ud800"}', "api_type"),
    ("/v1/completions", r'{"prompt": "x", "nested": {"deep": [{"x": "\ud800"}]}}', "nested.deep.0.x"),
    ("/v1/completions", r'{"prompt": "x", "logit_bias": {"\ud800": 1}}', "logit_bias"),
    (CHAT, r'{"messages": [{"role": "user", "content": "\ud83d"}]}', "messages.0.content"),
    (CHAT, r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\ude00"}]}]}',
     "messages.0.content.0.text"),
    (CHAT, r'{"messages": [{"role": "user", "content": "hi"}], "character": "\ud800"}', "character"),
    ("/v1/internal/encode", r'{"text": "\ud800"}', "text"),
    ("/v1/internal/logits", r'{"prompt": "\ud800"}', "prompt"),
    ("/api/v1/generate", r'{"prompt": "\ud800"}', "prompt"),
    ("/api/extra/tokencount", r'{"prompt": "\ud800"}', "prompt"),
    ("/v1/embeddings", r'{"input": ["\ud800"]}', "input.0"),
    ("/v1/internal/model/load", r'{"model_name": "\ud800.gguf"}', "model_name"),
]


@pytest.mark.parametrize("route,raw,param", SURROGATES)
def test_a_lone_surrogate_is_a_400_naming_the_field(client, model, route, raw, param):
    resp = client.post(route, content=raw.encode(), headers={"content-type": "application/json"})
    err = _error(resp)
    assert err["param"] == param and "surrogate" in err["message"], err


def test_a_paired_surrogate_is_an_emoji_and_nul_is_text(client, model):
    ok = client.post("/v1/completions", content=rb'{"prompt": "\ud83d\ude00 a\u0000b", "max_tokens": 2}',
                     headers={"content-type": "application/json"})
    assert ok.status_code == 200, ok.text
    assert bytes(t for t in model.seen_prompts[-1] if t < 256).decode().endswith("\U0001f600 a\x00b")


def test_json_nested_beyond_the_parser_is_a_400(client, model):
    deep = b'{"prompt": "x", "a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    err = _error(client.post("/v1/completions", content=deep, headers={"content-type": "application/json"}))
    assert f"deeper than {MAX_JSON_DEPTH} levels" in err["message"]


def test_a_body_json_cannot_read_is_a_400_that_says_why(client, model):
    for raw, why in ((b'{"prompt": "\xff\xfe"}', "not UTF-8"), (b'{"prompt": "x", "n": ' + b"9" * 5000 + b"}", "digits")):
        err = _error(client.post("/v1/completions", content=raw, headers={"content-type": "application/json"}))
        assert why in err["message"], err


def test_a_body_that_is_not_an_object_is_a_400(client, model):
    for raw in (b"[]", b'"x"', b"1", b"null", b"[" * 40 + b"]" * 40):
        assert _error(client.post("/v1/completions", content=raw, headers={"content-type": "application/json"}))


def test_many_bad_items_cost_one_error_not_a_million(client, model):
    body = json.dumps({"tokens": ["a"] * MAX_DECODE_TOKENS}).encode()
    start = time.perf_counter()
    err = _error(client.post("/v1/internal/decode", content=body, headers={"content-type": "application/json"}))
    assert err["param"] == "tokens.0"
    assert time.perf_counter() - start < 5  # 20 s when pydantic listed every bad item


# ----------------------------------------------------------------------------- encoders
def test_json_text_replaces_lone_surrogates_and_non_finite_numbers():
    text = json_text({"a": "x\ud800y", "b": [math.nan, -math.inf, 1.5], "c": "\U0001f600"})
    assert json.loads(text.encode("utf-8")) == {"a": "x\ufffdy", "b": [None, None, 1.5], "c": "\U0001f600"}
    chunk = sse_data({"choices": [{"text": "\udcff"}], "logprob": -math.inf})
    assert chunk.encode("utf-8").startswith(b"data: ") and "\ufffd" in chunk and "Infinity" not in chunk


@pytest.mark.skipif(os.name != "posix", reason="file names that are not UTF-8 need a POSIX file system")
def test_a_model_file_name_that_is_not_utf8_is_listed_not_a_500(client, model, app):
    with open(os.path.join(os.fsencode(app.models.models_dir), b"caf\xe9.gguf"), "wb") as f:
        f.write(b"GGUF")
    for route in ("/v1/models", "/v1/internal/model/list"):
        resp = client.get(route)
        assert resp.status_code == 200, resp.text
        assert "caf\ufffd.gguf" in resp.text.encode("utf-8").decode("utf-8")


# ----------------------------------------------------------------------------- kept-alive connections
class KeptAlive:
    """One HTTP/1.1 connection; each request must be answered on it, never on a new one."""

    def __init__(self, port: int, headers: dict[str, str] | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.conn.connect()
        self.sock = self.conn.sock
        self.headers = {"Content-Type": "application/json", **(headers or {})}

    def post(self, path: str, raw: bytes) -> tuple[int, bytes]:
        self.conn.request("POST", path, body=raw, headers=self.headers)
        resp = self.conn.getresponse()
        body = resp.read()
        assert resp.getheader("connection", "").lower() != "close", (resp.status, body)
        assert self.conn.sock is self.sock, "the server closed the connection"
        return resp.status, body

    def close(self) -> None:
        self.conn.close()


def test_an_unexpected_error_is_a_500_that_keeps_the_connection(app, model, monkeypatch):
    import modules.api.completions as completions

    def broken(self):
        raise RuntimeError("a bug")

    monkeypatch.setattr(completions.CompletionJob, "response", broken)
    port = free_port()
    server = serve_in_thread(app, "127.0.0.1", port)
    conn = KeptAlive(port)
    try:
        status, body = conn.post("/v1/completions", b'{"prompt": "Hi", "max_tokens": 2}')
        assert status == 500 and json.loads(body)["error"]["code"] == "internal_error"
        status, body = conn.post("/v1/internal/encode", b'{"text": "Hi"}')
        assert status == 200, body
    finally:
        conn.close()
        server.should_exit = True
        _wait_stopped(server)


def _wait_stopped(server: Any) -> None:
    deadline = time.monotonic() + 10
    while any(t.name == "api" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)


KEY = "limits-key"


@pytest.fixture(scope="module")
def real_api(tmp_path_factory: pytest.TempPathFactory, tiny_kit):
    pytest.importorskip("llama_cpp")
    server = ApiServer(tmp_path_factory.mktemp("limits_server"), free_port(), "--models-dir", str(tiny_kit.root),
                       "--model", tiny_kit.gguf_f32.name, "--threads", "1", "--ctx-size", "256", "--api-key", KEY)
    try:
        server.wait_ready()
        yield server
    finally:
        log = server.stop()
        assert "Traceback" not in log and "Exception in ASGI application" not in log, log


BAD_TEXT_ON_A_REAL_SERVER = [
    ("/v1/completions", rb'{"prompt": "\ud800", "max_tokens": 2}'),
    ("/v1/completions", rb'{"prompt": "Hi", "max_tokens": 2, "stream": true, "stop": ["\udfff"]}'),
    (CHAT, rb'{"messages": [{"role": "user", "content": "\ud83d"}], "max_tokens": 2}'),
    (CHAT, rb'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": true, "x": "\ud800"}'),
    ("/v1/internal/encode", rb'{"text": "\ud800"}'),
    ("/api/extra/generate/stream", rb'{"prompt": "\ud800", "max_length": 2}'),
]


def test_a_lone_surrogate_on_a_real_server_is_a_400_and_the_connection_stays(real_api):
    conn = KeptAlive(real_api.port, {"Authorization": f"Bearer {KEY}"})
    try:
        for route, raw in BAD_TEXT_ON_A_REAL_SERVER:
            status, body = conn.post(route, raw)
            assert status == 400 and b"surrogate" in body, (route, status, body)
            status, body = conn.post("/v1/completions", b'{"prompt": "Hi", "max_tokens": 2}')
            assert status == 200, body
        status, body = conn.post("/v1/completions", b'{"prompt": "a\\u0000b", "max_tokens": 2}')
        assert status == 200, body  # NUL is text: llama.cpp's tokenizer takes it
    finally:
        conn.close()
