"""The guard in front of both web faces (UI and API): Host allowlist, cross-site refusal, body cap.

A server on 127.0.0.1 is reachable by every web page the user visits: a page can send
requests to it directly (a form post needs no CORS preflight), and through DNS rebinding
(evil.example re-pointed at 127.0.0.1) it can even read the answers. So, before any
routing, parsing or auth:

1. The Host header must name this machine as the user reaches it: loopback names and
   addresses, the `--listen-host` value, the `--allowed-hosts` list (reverse proxies). With
   `--listen` and no list, a face protected by a key/password accepts any Host; an open one
   accepts IP literals only (a rebinding attack needs a name). Anything else: 403.
2. A browser request carrying a foreign Origin (not this Host, not in `--api-cors-origins`)
   is refused with 403, whatever its method; so is a browser request that says it comes
   from another site (`Sec-Fetch-Site`) without an Origin. Non-browser clients send neither.
3. Bodies a browser can send cross-site without a preflight (form and text/plain) are
   refused on API writes (415): the API speaks JSON only.
4. Request bodies are capped: Content-Length is checked before the app sees anything, and
   a body without one is counted while it arrives; too big is 413.

Pure ASGI (stdlib only), so the engine layer's "no web framework" rule holds and both
FastAPI and Gradio's app take it as a middleware.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from modules.core.settings import Settings

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MIB = 1024 * 1024
UI_MAX_UPLOAD_MIB = 64
"""Largest file the UI accepts (character cards, chat imports, documents for extensions)."""
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SIMPLE_BODY_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"})
"""Content types a web page may send to any site without a CORS preflight."""
_WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})
DISCARD_LIMIT = 256 * MIB
DISCARD_SECONDS = 30.0
"""A refused request's body is read and dropped up to these bounds, then the connection closes."""


@dataclass(frozen=True)
class GuardPolicy:
    """What one face accepts. Build it with `policy_for(settings, face)`."""

    face: str
    """"api" or "ui": chooses the error shape."""
    hosts: frozenset[str] = frozenset()
    """Exact host names (lower case, no port) accepted besides loopback."""
    host_suffixes: tuple[str, ...] = ()
    """`*.example.com` entries of --allowed-hosts, kept as ".example.com"."""
    any_host: bool = False
    ip_literals: bool = False
    """Accept any IP address as Host (--listen without a key: rebinding needs a name)."""
    cors_origins: frozenset[str] = frozenset()
    """Origins that may call cross-site ("*" for any), from --api-cors-origins."""
    max_body: int = 8 * MIB
    json_only_writes: bool = False
    """Refuse form and text/plain bodies on non-GET requests (the API)."""
    notes: tuple[str, ...] = field(default=(), compare=False)
    """What this policy exposes, in words, for the start-up log."""

    def host_allowed(self, host: str) -> bool:
        if self.any_host:
            return True
        name = host.lower().rstrip(".")
        if not name:
            return False
        if name == "localhost" or name.endswith(".localhost") or name in self.hosts:
            return True
        if any(name.endswith(suffix) for suffix in self.host_suffixes):
            return True
        address = _ip(name)
        if address is None:
            return False
        return address.is_loopback or self.ip_literals

    def origin_allowed(self, origin: str, host_header: str, scheme: str) -> bool:
        if "*" in self.cors_origins or origin in self.cors_origins:
            return True
        if origin == "null":
            return False
        return _same_origin(origin, host_header, scheme)


def policy_for(settings: Settings, face: str) -> GuardPolicy:
    """The guard policy of `face` ("api" or "ui") for these settings."""
    protected = bool(settings.api_key if face == "api" else settings.gradio_auth)
    hosts: set[str] = set()
    suffixes: list[str] = []
    listed = [h.strip().lower().rstrip(".") for h in (settings.allowed_hosts or "").split(",") if h.strip()]
    for entry in listed:
        if entry.startswith("*.") and len(entry) > 2:
            suffixes.append(entry[1:])
        elif entry != "*":
            hosts.add(_strip_brackets(entry))
    bind = (settings.listen_host or "").strip().lower()
    if bind and bind not in _WILDCARD_BINDS:
        hosts.add(_strip_brackets(bind))
    # Bound to every interface: reachable by name from the network, so Host is all we have.
    wildcard = (settings.listen and not bind) or bind in _WILDCARD_BINDS - {""}
    any_host = "*" in listed or (wildcard and not listed and protected)
    ip_literals = wildcard and not listed and not protected
    notes = _describe(face, wildcard or bool(bind and not _is_loopback(bind)), protected, any_host, ip_literals,
                      listed)
    origins = frozenset(o.strip().rstrip("/") for o in (settings.api_cors_origins or "").split(",") if o.strip())
    max_body = settings.api_max_body * MIB if face == "api" else (UI_MAX_UPLOAD_MIB + 1) * MIB
    return GuardPolicy(face=face, hosts=frozenset(hosts), host_suffixes=tuple(suffixes), any_host=any_host,
                       ip_literals=ip_literals, cors_origins=origins if face == "api" else frozenset(),
                       max_body=max_body, json_only_writes=face == "api", notes=notes)


def _describe(face: str, exposed: bool, protected: bool, any_host: bool, ip_literals: bool,
              listed: list[str]) -> tuple[str, ...]:
    what = "the API" if face == "api" else "the web UI"
    secret = "--api-key" if face == "api" else "--gradio-auth"
    if any_host and "*" in listed:
        return (f"{what} accepts requests for any host name (--allowed-hosts '*'): DNS rebinding is not blocked",)
    if not exposed:
        return ()
    if any_host:
        return (f"{what} is open to your network and accepts any host name: every request needs {secret}",)
    if ip_literals:
        return (f"{what} is open to your network WITHOUT {secret}: anyone who can reach this machine can use it; "
                f"it answers only when addressed by IP (http://<address>:port), not by host name, "
                f"unless you list names with --allowed-hosts",)
    return (f"{what} is open to your network for the host names {', '.join(listed)}",)


class WebGuard:
    """ASGI middleware enforcing a GuardPolicy before the wrapped app sees a request."""

    def __init__(self, app: ASGIApp, policy: GuardPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            status, code, message = refusal
            log.warning("refused %s %s (Host %r, Origin %r): %s", scope.get("method", "WS"), scope.get("path"),
                        headers.get("host"), headers.get("origin"), message)
            if kind == "http" and "100-continue" not in headers.get("expect", "").lower():
                await _discard_body(receive)
            await self._refuse(scope, send, status, code, message)
            return
        if kind == "websocket" or scope.get("method") in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        await self._with_capped_body(scope, receive, send, headers)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str, str] | None:
        host_header = headers.get("host", "")
        if not self.policy.host_allowed(_host_name(host_header)):
            return 403, "host_not_allowed", (
                f"the Host {host_header!r} is not allowed: this server answers to localhost and the names in "
                "--allowed-hosts (this protects it from web pages using DNS rebinding)")
        origin = headers.get("origin")
        scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
        if origin is not None and not self.policy.origin_allowed(origin.rstrip("/"), host_header, scheme):
            return 403, "cross_site_refused", (
                f"requests from the web page at {origin!r} are refused (only this server's own pages"
                + (" and the origins in --api-cors-origins" if self.policy.face == "api" else "") + " may call it)")
        if origin is None and headers.get("sec-fetch-site") in ("cross-site", "same-site"):
            return 403, "cross_site_refused", "requests from other web sites are refused"
        method = scope.get("method", "GET")
        if self.policy.json_only_writes and method not in SAFE_METHODS:
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype in SIMPLE_BODY_TYPES:
                return 415, "unsupported_media_type", (
                    f"the API takes JSON bodies (Content-Type: application/json), not {ctype}")
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return 400, "invalid_content_length", "the Content-Length header is not a number"
            if int(length) > self.policy.max_body:
                return 413, "body_too_large", self._too_large()
        return None

    def _too_large(self) -> str:
        limit = self.policy.max_body // MIB
        flag = " (raise it with --api-max-body MIB)" if self.policy.face == "api" else ""
        return f"the request body is larger than {limit} MiB{flag}"

    async def _with_capped_body(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        if "content-length" in headers:  # declared and checked: the server stops reading at that length
            await self.app(scope, receive, send)
            return
        # No declared length (chunked): read it all here, counting, then hand it on.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.policy.max_body:
                if message.get("more_body", False):
                    await _discard_body(receive)
                await self._refuse(scope, send, 413, "body_too_large", self._too_large())
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send, status: int, code: str, message: str) -> None:
        if scope.get("type") == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
            return
        if self.policy.face == "api":
            kind = {413: "invalid_request_error", 415: "invalid_request_error", 400: "invalid_request_error"}.get(
                status, "permission_error")
            body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
            ctype = b"application/json"
        else:
            body, ctype = message.encode("utf-8"), b"text/plain; charset=utf-8"
        # Closing the connection: a refused body may still be on the wire, and a kept-alive
        # connection would read it as the next request.
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


async def _discard_body(receive: Receive) -> None:
    """Read and drop what the client is still sending (bounded), so it gets to read our refusal:
    closing on unread data makes the kernel reset the connection, and the client sees an error
    instead of the 413/403."""
    dropped = 0
    deadline = time.monotonic() + DISCARD_SECONDS
    while dropped < DISCARD_LIMIT and time.monotonic() < deadline:
        message = await receive()
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def log_exposure(policies: list[GuardPolicy]) -> None:
    """Say at start what each face exposes beyond this machine."""
    for policy in policies:
        for note in policy.notes:
            log.warning(note)


def _headers(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", ()):
        name = raw_name.decode("latin-1").lower()
        if name not in out:  # the first of a repeated header, as servers read Host
            out[name] = raw_value.decode("latin-1")
    return out


def _host_name(host_header: str) -> str:
    """`example.com:5000` -> `example.com`; `[::1]:5000` -> `::1`."""
    host = host_header.strip()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else ""
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host


def _strip_brackets(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _is_loopback(name: str) -> bool:
    address = _ip(_strip_brackets(name))
    return name == "localhost" or (address is not None and address.is_loopback)


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _same_origin(origin: str, host_header: str, scheme: str) -> bool:
    """True when the Origin names this very server as the request reached it."""
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    default = {"http": 80, "https": 443}
    origin_port = port or default[parts.scheme]
    if parts.hostname.lower() != _host_name(host_header).lower():
        return False
    host_port_text = host_header.rsplit(":", 1)[1] if host_header.count(":") == 1 or "]:" in host_header else ""
    if host_port_text.isdigit():
        return origin_port == int(host_port_text)
    # No port in Host: the default port of the scheme the client used, which a TLS reverse
    # proxy in front of us may have changed (https outside, http here).
    return origin_port in (default[scheme], *default.values()) and port in (None, *default.values())
