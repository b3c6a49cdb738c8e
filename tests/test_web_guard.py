"""The web guard's policy (which Host, which Origin) and its ASGI behaviour, face by face."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from modules.core.settings import Settings
from modules.engine.web_guard import MIB, GuardPolicy, WebGuard, log_exposure, policy_for


def _policy(face: str = "api", **flags: Any) -> GuardPolicy:
    return policy_for(dataclasses.replace(Settings(), **flags), face)


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST.", "app.localhost", "127.0.0.1", "127.8.9.1", "::1"])
def test_loopback_hosts_are_always_allowed(host):
    assert _policy().host_allowed(host)


@pytest.mark.parametrize("host", ["evil.example", "localhost.evil.example", "192.168.1.5", "10.0.0.1", "0.0.0.0",
                                  "", "127.0.0.1.nip.io"])
def test_other_hosts_are_refused_on_a_local_server(host):
    assert not _policy().host_allowed(host)


def test_allowed_hosts_and_listen_host_extend_the_list():
    policy = _policy(allowed_hosts="chat.example.com, *.lan", listen_host="192.168.1.5")
    assert policy.host_allowed("chat.example.com") and policy.host_allowed("pc.lan")
    assert policy.host_allowed("192.168.1.5")
    assert not policy.host_allowed("lan") and not policy.host_allowed("example.com")
    assert not policy.host_allowed("192.168.1.6")


def test_listen_without_a_key_answers_ip_literals_only_and_says_so():
    policy = _policy("api", listen=True)
    assert policy.host_allowed("192.168.1.5") and policy.host_allowed("fe80::1")
    assert not policy.host_allowed("evil.example")
    assert any("WITHOUT --api-key" in note for note in policy.notes)


def test_the_exposure_is_said_at_start(caplog):
    log_exposure([_policy("api", listen=True), _policy("ui", listen=True, gradio_auth="u:p")])
    assert "the API is open to your network WITHOUT --api-key" in caplog.text
    assert "the web UI is open to your network and accepts any host name" in caplog.text


def test_listen_with_a_key_or_password_answers_any_host():
    assert _policy("api", listen=True, api_key="k").host_allowed("my-pc.example")
    assert _policy("ui", listen=True, gradio_auth="u:p").host_allowed("my-pc.example")
    # The key protects the API, not the UI (and the other way round).
    assert not _policy("ui", listen=True, api_key="k").host_allowed("my-pc.example")
    assert not _policy("api", listen=True, gradio_auth="u:p").host_allowed("my-pc.example")


def test_an_allowlist_wins_over_listen():
    policy = _policy("api", listen=True, api_key="k", allowed_hosts="chat.example.com")
    assert policy.host_allowed("chat.example.com") and not policy.host_allowed("other.example")
    assert not _policy().notes, "a loopback server has nothing to warn about"


@pytest.mark.parametrize(("origin", "host", "ok"), [
    ("http://127.0.0.1:5000", "127.0.0.1:5000", True),
    ("http://localhost:5000", "localhost:5000", True),
    ("http://localhost:8000", "localhost:5000", False),  # another local page is another site
    ("http://evil.example", "127.0.0.1:5000", False),
    ("null", "127.0.0.1:5000", False),
    ("https://chat.example.com", "chat.example.com", True),  # TLS proxy in front: Host has no port
    ("http://chat.example.com:8080", "chat.example.com", False),
    ("not a url", "127.0.0.1:5000", False),
])
def test_same_origin_rule(origin, host, ok):
    assert _policy().origin_allowed(origin, host, "http") is ok


def test_cors_origins_are_allowed_cross_site_on_the_api_only():
    assert _policy("api", api_cors_origins="http://localhost:8000").origin_allowed(
        "http://localhost:8000", "127.0.0.1:5000", "http")
    assert not _policy("ui", api_cors_origins="http://localhost:8000").origin_allowed(
        "http://localhost:8000", "127.0.0.1:7860", "http")


# --- the middleware itself, driven as an ASGI server would ---------------------------------
class _Recorder:
    """A downstream app that records the body it was given and answers 200."""

    def __init__(self) -> None:
        self.calls = 0
        self.body = b""

    async def __call__(self, scope, receive, send) -> None:
        self.calls += 1
        while True:
            message = await receive()
            self.body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _call(policy: GuardPolicy, headers: dict[str, str], chunks: list[bytes], method: str = "POST"):
    inner = _Recorder()
    guard = WebGuard(inner, policy)
    sent: list[dict] = []
    queue = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": "/x", "scheme": "http",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(guard(scope, receive, send))
    return inner, sent[0]["status"]


def test_chunked_body_over_the_cap_is_counted_and_refused():
    policy = dataclasses.replace(_policy(), max_body=1 * MIB)
    inner, status = _call(policy, {"host": "127.0.0.1:5000", "content-type": "application/json"},
                          [b"x" * (256 * 1024)] * 5)
    assert status == 413 and inner.calls == 0
    inner, status = _call(policy, {"host": "127.0.0.1:5000", "content-type": "application/json"},
                          [b"x" * (256 * 1024)] * 3)
    assert status == 200 and inner.body == b"x" * (768 * 1024)


def test_refusals_happen_before_the_app_runs():
    policy = _policy()
    cases = [
        ({"host": "evil.example"}, 403),
        ({"host": "127.0.0.1:5000", "origin": "http://evil.example"}, 403),
        ({"host": "127.0.0.1:5000", "sec-fetch-site": "cross-site"}, 403),
        ({"host": "127.0.0.1:5000", "content-type": "text/plain"}, 415),
        ({"host": "127.0.0.1:5000", "content-type": "application/x-www-form-urlencoded; charset=utf-8"}, 415),
        ({"host": "127.0.0.1:5000", "content-length": str(9 * MIB)}, 413),
        ({"host": "127.0.0.1:5000", "content-length": "12abc"}, 400),
    ]
    for headers, expected in cases:
        inner, status = _call(policy, headers, [b""])
        assert (status, inner.calls) == (expected, 0), headers
    inner, status = _call(policy, {"host": "127.0.0.1:5000", "content-type": "application/json"}, [b"{}"])
    assert status == 200 and inner.calls == 1


def test_the_ui_takes_same_origin_uploads_but_no_foreign_page():
    policy = _policy("ui")
    form = {"host": "127.0.0.1:7860", "content-type": "multipart/form-data; boundary=x"}
    assert _call(policy, {**form, "origin": "http://127.0.0.1:7860"}, [b"--x--"])[1] == 200
    assert _call(policy, {**form, "origin": "http://evil.example"}, [b"--x--"])[1] == 403
    # A foreign page may not even read (GET) the UI's data.
    assert _call(policy, {"host": "127.0.0.1:7860", "origin": "http://evil.example"}, [b""], "GET")[1] == 403
