"""The acceptance list against server.py started as a user would: --api on a free loopback
port, --api-key, the kit's f32 GGUF on 1 thread. One server for the whole module."""

from __future__ import annotations

import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.api.test_internal_kobold import FIXTURES, ROUTES
from tests.test_server import free_port, start_server, stop

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


class Api:
    def __init__(self, port: int) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"

    def request(self, method: str, path: str, body: object = None, raw: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers=headers or AUTH)
        resp = conn.getresponse()
        out = resp.status, resp.read()
        conn.close()
        return out

    def json(self, method: str, path: str, body: object = None) -> dict:
        status, data = self.request(method, path, body)
        assert status == 200, data
        return json.loads(data)

    def perf(self) -> dict:
        return self.json("GET", "/api/extra/perf")


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_kit):
    pytest.importorskip("llama_cpp")
    tmp = tmp_path_factory.mktemp("api_server")
    port = free_port()
    proc, _ = start_server(tmp, "--models-dir", str(tiny_kit.gguf_f32.parent), "--model", tiny_kit.gguf_f32.name,
                           "--threads", "1", "--ctx-size", "2048", "--api", "--api-port", str(port),
                           "--api-key", KEY)
    try:
        client = Api(port)
        assert client.json("GET", "/v1/internal/model/info")["model_name"] == tiny_kit.gguf_f32.name
        yield client
    finally:
        stop(proc)
        log = (tmp / "server.log").read_text()
        assert "Traceback" not in log, log


def test_openai_sdk(api):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{api.base}/v1", api_key=KEY, max_retries=0)
    assert client.models.list().data[0].id.endswith(".gguf")
    done = client.completions.create(model="x", prompt="Hello", max_tokens=8, temperature=0)
    assert done.choices[0].finish_reason in ("stop", "length") and done.usage.completion_tokens <= 8
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="x", prompt="Hello", max_tokens=8, temperature=0, stream=True))
    assert streamed == done.choices[0].text
    chat = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=8, temperature=0)
    assert isinstance(chat.choices[0].message.content, str)
    chunks = list(client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="x", prompt="Hello", max_tokens=-5)
    wrong = openai.OpenAI(base_url=f"{api.base}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_sillytavern_fixtures(api, name):
    from tests.api.test_internal_kobold import check_fixture_response

    status, data = api.request("POST", ROUTES[name], json.loads((FIXTURES / name).read_text()))

    class Resp:
        status_code = status
        text = data.decode()

        def json(self):
            return json.loads(data)

    check_fixture_response(name, Resp())


def _open_stream(api: Api, body: dict) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", api.port), timeout=60)
    payload = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n")
    sock.sendall(head.encode() + payload)
    return sock


LONG = {"prompt": "Once upon a time", "max_tokens": 1900, "ban_eos_token": True, "temperature": 0}


def test_disconnect_cancels_the_generation(api):
    gens = api.perf()["total_gens"]
    sock = _open_stream(api, {**LONG, "stream": True})
    seen = b""
    while seen.count(b"data: ") < 3:
        seen += sock.recv(4096)
    sock.close()
    deadline = time.time() + 10
    while api.perf()["total_gens"] == gens and time.time() < deadline:
        time.sleep(0.05)
    perf = api.perf()
    assert perf["stop_reason"] == 2 and perf["last_token_count"] < LONG["max_tokens"], perf
    # not streaming: the client sends its request and goes away
    sock = _open_stream(api, LONG)
    time.sleep(0.3)
    sock.close()
    deadline = time.time() + 10
    while api.perf()["total_gens"] == gens + 1 and time.time() < deadline:
        time.sleep(0.05)
    perf = api.perf()
    assert perf["stop_reason"] == 2 and perf["last_token_count"] < LONG["max_tokens"], perf
    assert api.json("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 4})["choices"][0]["text"] is not None


def test_token_counts_answer_during_a_long_generation(api):
    sock = _open_stream(api, {**LONG, "stream": True})
    try:
        while b"data: " not in sock.recv(4096):
            pass
        start = time.perf_counter()
        for _ in range(12):  # what SillyTavern sends before a generation
            api.json("POST", "/v1/internal/encode", {"text": "Seraphina smiles."})
        api.json("GET", "/v1/internal/model/info")
        assert time.perf_counter() - start < 2.0
    finally:
        sock.close()


def test_sixteen_concurrent_mixed_requests(api):
    prompts = ["Hello", "The cat", "Once", "A B C", "In the", "Why"]
    greedy = [{"prompt": p, "max_tokens": 24, "temperature": 0} for p in prompts]
    alone = [api.json("POST", "/v1/completions", b)["choices"][0]["text"] for b in greedy]
    jobs = [("POST", "/v1/completions", b) for b in greedy] * 2
    jobs += [("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}),
             ("POST", "/v1/internal/encode", {"text": "hello"}), ("GET", "/v1/internal/model/info", None),
             ("GET", "/v1/models", None)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda j: api.request(*j), jobs))
    assert all(status == 200 for status, _ in results), results
    texts = [json.loads(data)["choices"][0]["text"] for _, data in results[:12]]
    assert texts == alone * 2


BAD = [
    ("POST", "/v1/completions", b'{"prompt": '),
    ("POST", "/v1/completions", b"[]"),
    ("POST", "/v1/completions", b'{"prompt": 12}'),
    ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 99999999999999999999999}'),
    ("POST", "/v1/completions", b'{"prompt": "x", "temperature": "hot"}'),
    ("POST", "/v1/completions", b'{"prompt": "x", "temperature": 1e400}'),
    ("POST", "/v1/completions", b'{"prompt": "x", "top_k": 1e30}'),
    ("POST", "/v1/completions", b'{"prompt": [999999999], "max_tokens": 2}'),
    ("POST", "/v1/completions", b'{"prompt": "x", "logit_bias": {"abc": 1}}'),
    ("POST", "/v1/completions", b'{"prompt": "x", "custom_token_bans": "a,b"}'),
    ("POST", "/v1/completions", b'{"prompt": "x", "dry_sequence_breakers": "[1,"}'),
    ("POST", "/v1/completions", b'{"prompt": "x", "grammar_string": "root ::= ("}'),
    ("POST", "/v1/chat/completions", b'{"messages": []}'),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}'),
    ("POST", "/v1/chat/completions", b'{"messages": "hi"}'),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "mode": "poem"}'),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "instruction_template": "../x"}'),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "character": "../../etc"}'),
    ("POST", "/v1/internal/model/load", b'{"model_name": "../../../etc/passwd"}'),
    ("POST", "/v1/internal/model/load", b'{"model_name": "nope.gguf"}'),
    ("POST", "/v1/internal/decode", b'{"tokens": [-1]}'),
    ("POST", "/v1/internal/decode", b'{"tokens": [99999999]}'),
    ("POST", "/v1/internal/encode", b'{"text": null}'),
    ("POST", "/api/v1/generate", b'{"prompt": "x", "max_length": -3}'),
    ("POST", "/api/extra/tokencount", b"{}"),
    ("GET", "/v1/models/../../etc/passwd", None),
]


@pytest.mark.parametrize("method,path,raw", BAD)
def test_bad_input_is_4xx(api, method, path, raw):
    status, data = api.request(method, path, raw=raw)
    assert 400 <= status < 500, (status, data)
    assert set(json.loads(data)["error"]) == {"message", "type", "param", "code"}


def test_the_server_still_serves_after_the_sweep(api):
    assert api.json("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 4})["choices"]


def test_listen_bound_to_loopback_exposes_nothing_and_says_nothing(tmp_path: Path, tiny_kit):
    """--listen-host wins over --listen; bound to loopback there is nothing to warn about (the
    warning for a real --listen is checked in tests/test_web_guard.py: tests never bind 0.0.0.0)."""
    proc, _ = start_server(tmp_path, "--models-dir", str(tmp_path), "--api", "--api-port", str(free_port()),
                           "--listen-host", "127.0.0.1", "--listen")
    stop(proc)
    log = (tmp_path / "server.log").read_text()
    assert "API serving on http://127.0.0.1" in log and "open to your network" not in log


def test_logprobs_on_completions_chat_and_internal_logits(api):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{api.base}/v1", api_key=KEY, max_retries=0)
    done = client.completions.create(model="x", prompt="The sea", max_tokens=6, temperature=0, logprobs=3)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == done.usage.completion_tokens == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert all(len(top) == 3 and max(top.values()) >= got - 1e-9 for top, got in zip(lp.top_logprobs,
                                                                                     lp.token_logprobs, strict=True))
    assert lp.text_offset[0] == 0
    # SillyTavern's streaming read: choices[0].logprobs.top_logprobs[0] as {token: logprob}
    stream = list(client.completions.create(model="x", prompt="The sea", max_tokens=6, temperature=0,
                                            logprobs=3, stream=True))
    streamed = [t for c in stream if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == lp.tokens
    assert isinstance(stream[0].choices[0].logprobs.top_logprobs[0], dict)
    chat = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    probs = api.json("POST", "/v1/internal/logits", {"prompt": "The sea", "top_logits": 5})
    assert len(probs) == 5 and 0 < sum(probs.values()) <= 1.0 + 1e-6
    # the most likely next token is the greedy choice
    assert max(probs, key=probs.get) == lp.tokens[0]
