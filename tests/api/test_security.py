"""The API's guards over real HTTP (uvicorn in this process, the scripted fake model): Host
allowlist, cross-site refusal, body cap before auth, the bounded queue, per-caller stop."""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from modules.api import serve_in_thread
from modules.core.sampling import SamplingParams
from modules.engine.app import App
from tests.fakes import FakeLoader, script_text

pytestmark = pytest.mark.timeout(120)
LONG = script_text("word " * 4000)
"""A reply that lasts as long as a test needs it to (stopped by cancel)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, port: int, key: str | None = None) -> None:
        self.port = port
        self.key = key

    def request(self, method: str, path: str, body: object = None, headers: dict[str, str] | None = None,
                raw: bytes | None = None, timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        sent = {"Content-Type": "application/json"}
        if self.key:
            sent["Authorization"] = f"Bearer {self.key}"
        sent.update(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        try:
            conn.request(method, path, body=data, headers=sent)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def stream(self, path: str, body: dict) -> Iterator[bytes]:
        """Lines of an SSE response as they arrive (the connection closes when the caller stops)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.key}"} if self.key else {})}
        conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
        resp = conn.getresponse()
        try:
            if resp.status != 200:
                yield f"status {resp.status}".encode()
                return
            while line := resp.readline():
                yield line
        finally:
            conn.close()


@pytest.fixture
def served(app: App) -> Iterator[tuple[App, FakeLoader, int]]:
    app.models.load("fake.gguf", loader="fake", overrides={"ctx_size": 65536})
    fake = app.models.current
    assert isinstance(fake, FakeLoader)
    fake.script = LONG
    fake.step_delay = 0.01
    port = _free_port()
    server = serve_in_thread(app, "127.0.0.1", port)
    try:
        yield app, fake, port
    finally:
        app.generator.cancel_all()
        server.should_exit = True


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_dns_rebinding_host_is_refused_and_the_model_stays(served):
    app, _, port = served
    client = Client(port)
    status, _, body = client.request("POST", "/v1/internal/model/unload",
                                     headers={"Host": "evil.example", "Origin": "http://evil.example"})
    assert status == 403 and json.loads(body)["error"]["code"] == "host_not_allowed"
    assert client.request("GET", "/v1/models", headers={"Host": "evil.example:5000"})[0] == 403
    assert app.models.current is not None
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert client.request("GET", "/v1/models", headers={"Host": host})[0] == 200, host


def test_allowed_hosts_admit_a_reverse_proxy_name(app):
    app.settings = dataclasses.replace(app.settings, allowed_hosts="chat.example.com")
    port = _free_port()
    server = serve_in_thread(app, "127.0.0.1", port)
    try:
        client = Client(port)
        assert client.request("GET", "/v1/models", headers={"Host": "chat.example.com"})[0] == 200
        assert client.request("GET", "/v1/models", headers={"Host": "other.example.com"})[0] == 403
    finally:
        server.should_exit = True


def test_cross_site_writes_are_refused_and_the_model_stays_loaded(served):
    app, _, port = served
    client = Client(port)
    # A page on another site posting a form (no preflight needed) or a fetch with its Origin.
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                    {"Content-Type": "application/x-www-form-urlencoded"}, {"Content-Type": "text/plain"},
                    {"Sec-Fetch-Site": "cross-site"}):
        status, _, _ = client.request("POST", "/v1/internal/model/unload", headers=headers)
        assert status in (403, 415), headers
        assert client.request("POST", "/v1/internal/stop-generation", headers=headers)[0] in (403, 415)
    assert app.models.current is not None
    # The API's own /docs page (same origin) may call it.
    assert client.request("POST", "/v1/internal/encode", {"text": "hi"},
                          headers={"Origin": f"http://127.0.0.1:{port}"})[0] == 200


def test_a_20_mb_body_is_refused_before_the_key_is_checked(app):
    app.settings = dataclasses.replace(app.settings, api_key="sekrit")
    port = _free_port()
    server = serve_in_thread(app, "127.0.0.1", port)
    try:
        client = Client(port)  # no key
        big = b'{"prompt": "' + b"x" * (20 * 1024 * 1024) + b'"}'
        status, headers, body = client.request("POST", "/v1/completions", raw=big)
        assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
        assert headers.get("connection") == "close"
        # Without Content-Length (chunked), counted as it arrives.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/completions", body=iter([b"x" * (1024 * 1024)] * 20),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        assert conn.getresponse().status == 413
        conn.close()
        assert client.request("GET", "/v1/models")[0] == 401  # the key is still required
    finally:
        server.should_exit = True


def test_full_queue_answers_429_while_control_routes_stay_quick(served):
    app, fake, port = served
    client = Client(port)
    body = {"prompt": "hi", "max_tokens": 4000, "stream": True}
    first = client.stream("/v1/completions", body)
    next(first)  # the one slot is busy now
    _wait_for(lambda: app.generator.running == 1)

    def one(_: int) -> int:
        for line in client.stream("/v1/completions", body):
            text = line.decode()
            return 429 if text == "status 429" else 200 if text.startswith("data:") else -1
        return -2

    with ThreadPoolExecutor(100) as pool:
        futures = [pool.submit(one, i) for i in range(100)]
        _wait_for(lambda: sum(f.done() for f in futures) >= 36, timeout=30)
        statuses = [f.result() for f in futures if f.done()]
        assert statuses.count(429) == 36 and app.generator.waiting == 64
        for method, path, payload in (("POST", "/v1/internal/token-count", {"text": "hello"}),
                                      ("GET", "/v1/internal/model/info", None),
                                      ("POST", "/api/extra/tokencount", {"prompt": "hello"})):
            started = time.perf_counter()
            assert client.request(method, path, payload, timeout=5)[0] == 200
            assert time.perf_counter() - started < 1.0, path
        status, headers, _ = client.request("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 4})
        assert status == 429 and int(headers["retry-after"]) >= 1
        started = time.perf_counter()
        stopped = json.loads(client.request("POST", "/v1/internal/stop-generation", timeout=5)[2])["stopped"]
        assert time.perf_counter() - started < 1.0 and stopped == 65
        assert sorted(set(f.result() for f in futures)) == [200, 429]
    first.close()
    _wait_for(lambda: app.generator.waiting == 0 and app.generator.running == 0)


def _kobold_stream(client: Client, genkey: str) -> Iterator[bytes]:
    return client.stream("/api/extra/generate/stream", {"prompt": "hi", "max_length": 4000, "genkey": genkey})


def test_kobold_abort_with_a_genkey_stops_only_that_stream(served):
    app, fake, port = served
    fake.parallel = 2
    client = Client(port)
    a, b = _kobold_stream(client, "KCPP1111"), _kobold_stream(client, "KCPP2222")
    next(a), next(b)
    status, _, body = client.request("POST", "/api/extra/abort", {"genkey": "KCPP1111"})
    assert status == 200 and json.loads(body)["success"] is True
    assert any(b"finish_reason" in line for line in a)  # a ends
    before = fake.steps
    assert next(b) and fake.steps > before or next(b)  # b still streams
    _wait_for(lambda: fake.steps > before + 3)
    b.close()


def test_api_stop_generation_leaves_a_ui_generation_running(served):
    app, fake, port = served
    fake.parallel = 2
    ui_stream = app.generator.submit("hi", SamplingParams(max_new_tokens=4000), owner="ui:session-1")
    chunks = iter(ui_stream)
    next(chunks)
    api = Client(port).stream("/v1/completions", {"prompt": "hi", "max_tokens": 4000, "stream": True})
    next(api)
    assert json.loads(Client(port).request("POST", "/v1/internal/stop-generation")[2])["stopped"] == 1
    api_lines = list(api)
    assert any(b"[DONE]" in line for line in api_lines)
    before = fake.steps
    _wait_for(lambda: fake.steps > before + 3)
    assert next(chunks).finish_reason is None  # the UI's generation goes on
    ui_stream.cancel()


def test_a_ui_stop_leaves_api_streams_running(served):
    from modules.ui.streaming import SessionStreams  # the Default and Notebook tabs' Stop

    app, fake, port = served
    fake.parallel = 2
    sessions, browser = SessionStreams(), SimpleNamespace(session_hash="tab-1")
    shown = sessions.run(app, "hi", SamplingParams(max_new_tokens=4000), browser)
    next(shown), next(shown)
    api = Client(port).stream("/v1/completions", {"prompt": "hi", "max_tokens": 4000, "stream": True})
    next(api)
    sessions.stop(browser)  # the Stop button of that browser tab
    list(shown)
    got = [next(api) for _ in range(6)]
    assert all(b'"finish_reason": null' in line or not line.strip() for line in got), got
    assert app.generator.running == 1
    api.close()


def test_disconnecting_client_stops_only_its_own_request(served):
    app, fake, port = served
    fake.parallel = 2
    client = Client(port)
    a = client.stream("/v1/completions", {"prompt": "a", "max_tokens": 4000, "stream": True})
    b = client.stream("/v1/completions", {"prompt": "b", "max_tokens": 4000, "stream": True})
    next(a), next(b)
    a.close()  # the client goes away
    _wait_for(lambda: app.generator.running == 1)
    before = fake.steps
    _wait_for(lambda: fake.steps > before + 3)
    assert next(b)
    b.close()
    _wait_for(lambda: app.generator.running == 0)
    threading.Event().wait(0.05)


@pytest.mark.parametrize(("args", "param"), [
    ({"trust_remote_code": True}, "trust_remote_code"), ({"allow_pickle": "false"}, "allow_pickle"),
    ({"ctx_size": "4096"}, "ctx_size"), ({"ctx_size": 10**10}, "ctx_size"),
])
def test_model_load_args_cannot_widen_exposure_and_are_checked(client, args, param):
    resp = client.post("/v1/internal/model/load", json={"model_name": "fake.gguf", "args": {"loader": "fake", **args}})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param


# --- hostile files: each fails its own request quickly; the server keeps generating ----------
TEMPLATE_BOMB = ("{% set ns = namespace(s='x') %}{% for i in range(100000) %}{% set ns.s = ns.s ~ ns.s %}"
                 "{% endfor %}{{ ns.s }}")
SPIN_BOMB = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
YAML_BOMB = "\n".join(["a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]"]
                      + [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
                         f"*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]"
                         for i in range(8)] + ["name: Bomb", "context: *i"])


def _deep_gguf(depth: int) -> bytes:
    """A GGUF header whose one value is an array of arrays `depth` deep."""
    import struct

    value = b""
    for _ in range(depth):
        value = struct.pack("<IQ", 9, 1) + value  # array of 1 array ...
    value += struct.pack("<IQ", 4, 0)  # ... of 0 uint32
    key = b"evil.nested"
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<I", 9) + value


def _still_generates(client: Client) -> None:
    status, _, body = client.request("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 3}, timeout=10)
    assert status == 200 and json.loads(body)["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("template", [TEMPLATE_BOMB, SPIN_BOMB])
def test_a_template_bomb_in_the_model_fails_its_request_fast(served, template):
    app, fake, port = served
    fake.script = script_text("ok ok ok ok")
    fake.info = dataclasses.replace(fake.info, chat_template=template)
    client = Client(port)
    started = time.perf_counter()
    status, _, body = client.request("POST", "/v1/chat/completions",
                                     {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert time.perf_counter() - started < 2.0
    assert status == 400 and json.loads(body)["error"]["param"] == "instruction_template"
    _still_generates(client)


def test_a_yaml_alias_bomb_character_fails_its_request_fast(served):
    app, fake, port = served
    fake.script = script_text("ok ok ok ok")
    (app.root / "characters").mkdir(exist_ok=True)
    (app.root / "characters" / "Bomb.yaml").write_text(YAML_BOMB)
    client = Client(port)
    started = time.perf_counter()
    status, _, body = client.request("POST", "/v1/chat/completions",
                                     {"messages": [{"role": "user", "content": "hi"}], "character": "Bomb",
                                      "mode": "chat", "max_tokens": 3})
    assert time.perf_counter() - started < 2.0 and status == 400, body
    assert "alias" in json.loads(body)["error"]["message"]
    _still_generates(client)


def test_a_gguf_with_deeply_nested_arrays_is_a_clear_load_error(served, tmp_path):
    pytest.importorskip("llama_cpp")
    app, fake, port = served
    fake.script = script_text("ok ok ok ok")
    (app.models.models_dir / "deep.gguf").write_bytes(_deep_gguf(10_000))
    client = Client(port)
    started = time.perf_counter()
    status, _, body = client.request("POST", "/v1/internal/model/load", {"model_name": "deep.gguf"})
    assert time.perf_counter() - started < 2.0 and status == 400, body
    assert "GGUF" in json.loads(body)["error"]["message"]
    app.models.load("fake.gguf", loader="fake", overrides={"ctx_size": 4096})  # the failed load unloaded it
    app.models.current.script = script_text("ok ok ok ok")
    _still_generates(client)
