"""`/health` with llama.cpp server's semantics, for every port (API and UI).

200 `{"status": "ok"}` when the app answers requests, 503 `{"status": "loading model"}` while a
model loads (load balancers and scripts wait on it). It says nothing else (no model name, no
path, no version), so it needs no key; it still sits behind the Host check of its port.

`HealthEndpoint` is a plain ASGI middleware (the engine imports no web framework): the UI puts
it inside gradio's app, after the web guard; the API has a documented route over `health()`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

READY = "ok"
LOADING = "loading model"
PATH = "/health"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _Models(Protocol):
    loading: str | None


class _HasModels(Protocol):
    models: _Models


def health(app: _HasModels) -> tuple[int, dict[str, str]]:
    """(HTTP status, body) of /health for `app` right now."""
    if app.models.loading is not None:
        return 503, {"status": LOADING}
    return 200, {"status": READY}


class HealthEndpoint:
    """Answers GET and HEAD `/health` from `health(app)`; passes every other request on."""

    def __init__(self, asgi: ASGIApp, app: _HasModels) -> None:
        self.asgi = asgi
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or scope.get("path") != PATH or scope.get("method") not in ("GET", "HEAD"):
            await self.asgi(scope, receive, send)
            return
        status, body = health(self.app)
        payload = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"cache-control", b"no-store"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else payload})
