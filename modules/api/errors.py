"""The one table from typed errors to HTTP statuses, the OpenAI error shape, and JSON that
always reaches the client.

Every error leaves the API as `{"error": {"message", "type", "param", "code"}}` with a
4xx status (5xx only for a backend failing mid-generation), whether it came from the
engine (modules.core.errors), from request validation, from routing or from auth. The table is
looked up along the exception's class hierarchy, so a subclass inherits its parent's row
unless it has its own; nobody matches on message text.

No error path may cost the client its connection. uvicorn closes a kept-alive connection
whenever the application raises, even after a complete response, and Starlette re-raises
every unexpected exception after answering it: so an unexpected error is answered here and
not raised further, and every JSON body (responses, errors, stream chunks) is written by
`json_text`, which cannot fail on text that does not encode to UTF-8.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modules.api.schemas import MAX_JSON_DEPTH, validation_param
from modules.core import errors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErrorRow:
    status: int
    type: str
    code: str | None = None


class ApiError(Exception):
    """An error raised by the API layer itself (auth, a refused option); carries its row."""

    def __init__(self, message: str, status: int, type: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.row = ErrorRow(status, type, code)
        self.param = param


# ModelNotLoadedError is a 400, not a 503: the OpenAI SDKs retry 5xx with backoff, so a
# 503 would make a user wait through retries for something only they can fix (load a model).
ERROR_TABLE: dict[type[Exception], ErrorRow] = {
    errors.ContextLengthExceededError: ErrorRow(400, "invalid_request_error", "context_length_exceeded"),
    errors.UnsafePathError: ErrorRow(400, "invalid_request_error", "unsafe_path"),
    errors.NotFoundError: ErrorRow(404, "not_found_error", "not_found"),
    errors.InvalidRequestError: ErrorRow(400, "invalid_request_error"),
    errors.ModelNotLoadedError: ErrorRow(400, "invalid_request_error", "model_not_loaded"),
    errors.QueueFullError: ErrorRow(429, "rate_limit_error", "queue_full"),
    errors.BackendMissingError: ErrorRow(400, "invalid_request_error", "backend_missing"),
    errors.UnsupportedOptionError: ErrorRow(400, "invalid_request_error", "unsupported_option"),
    errors.ModelLoadError: ErrorRow(400, "invalid_request_error", "model_load_failed"),
    errors.GenerationError: ErrorRow(500, "server_error", "generation_failed"),
}
_HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}
_INTERNAL = ErrorRow(500, "server_error", "internal_error")


def row_for(exc: BaseException) -> ErrorRow:
    """The table row of `exc`'s nearest class that has one."""
    if isinstance(exc, ApiError):
        return exc.row
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return _INTERNAL


def error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(status, OpenAI error body) for any exception; unexpected ones are logged, not echoed."""
    row = row_for(exc)
    if row is _INTERNAL:
        log.exception("unexpected error in the API", exc_info=exc)
        message = f"internal error ({type(exc).__name__}); see the server log"
    else:
        message = str(exc)
    param = getattr(exc, "param", None)
    return row.status, {"error": {"message": message, "type": row.type, "param": param, "code": row.code}}


# --------------------------------------------------------------------------- JSON on the wire
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


COMPACT = (",", ":")
SPACED = (", ", ": ")
"""json.dumps' own separators: what the stream chunks have always used, so clients see no change."""


def json_text(payload: Any, separators: tuple[str, str] = COMPACT) -> str:
    """`payload` as JSON text that always encodes to UTF-8 and that every JSON parser reads.

    A lone surrogate (a file name read with surrogateescape, say) becomes U+FFFD instead of
    failing the whole answer; NaN and infinities become null, as pydantic writes them
    (JavaScript's JSON.parse, which SillyTavern uses, refuses `NaN`).
    """
    try:
        text = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=separators)
    except ValueError:  # a NaN or an infinity somewhere: rare, so only then is the payload copied
        text = json.dumps(_finite(payload), ensure_ascii=False, allow_nan=False, separators=separators)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = _LONE_SURROGATE.sub("\ufffd", text)
    return text


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class SafeJSONResponse(JSONResponse):
    """The API's JSON response class: rendered by `json_text`, so it never fails to encode."""

    def render(self, content: Any) -> bytes:
        return json_text(content).encode("utf-8")


class AnswerUnexpectedErrors:
    """ASGI middleware: an unexpected exception becomes the OpenAI-shaped 500 right here.

    Without it Starlette's ServerErrorMiddleware answers the 500 and then re-raises, and
    uvicorn closes the connection of any request that raised: a client that keeps its
    connection alive (httpx, the OpenAI SDK) then has its next request reset. A failure after
    the response started cannot be answered any more; that one still closes the connection,
    which is the only way left to tell the client its response is incomplete.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if started:
                raise
            status, body = error_body(exc)
            await SafeJSONResponse(body, status_code=status)(scope, receive, send)


def _validation_body(exc: RequestValidationError) -> dict[str, Any]:
    problems = exc.errors()
    # A value that fails every member of a union gets one error per member: the one that is
    # not a plain type mismatch ("too long", "too deep") says what is really wrong.
    first = next((e for e in problems if not str(e.get("type", "")).endswith("_type")), problems[0] if problems else {})
    param = validation_param(first)
    if first.get("type") == "json_invalid":
        param = None
        message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
    else:
        message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": "invalid_value"}}


def _http_body(exc: StarletteHTTPException) -> dict[str, Any]:
    # FastAPI answers "There was an error parsing the body" for whatever json.loads raised but
    # a JSONDecodeError; the cause says which, and a client can act on that.
    message, cause = str(exc.detail), exc.__cause__
    if isinstance(cause, RecursionError):  # json.loads on a body nested thousands deep
        message = f"the request body nests deeper than {MAX_JSON_DEPTH} levels of objects and arrays"
    elif isinstance(cause, UnicodeDecodeError):
        message = f"the request body is not UTF-8 text (byte {cause.start}); JSON must be"
    elif isinstance(cause, ValueError):  # an integer of more than 4300 digits, say
        message = f"the request body could not be read as JSON: {cause}"
    return {"error": {"message": message, "type": _HTTP_TYPES.get(exc.status_code, "invalid_request_error"),
                      "param": None, "code": None}}


def install_error_handlers(api: FastAPI) -> None:
    """Route every error through the table above, in the OpenAI shape, without dropping the
    connection; make SafeJSONResponse the response class of the routes included after this."""

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        status, body = error_body(exc)
        # A full queue says when to come back (the OpenAI SDKs honour Retry-After on a 429).
        retry = getattr(exc, "retry_after", None) if isinstance(exc, errors.QueueFullError) else None
        return SafeJSONResponse(body, status_code=status, headers={"Retry-After": str(retry)} if retry else None)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return SafeJSONResponse(_validation_body(exc), status_code=400)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return SafeJSONResponse(_http_body(exc), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    # FastAPI's own encoder (pydantic's dump_json) fails on a lone surrogate: a 500, then a reset.
    api.router.default_response_class = SafeJSONResponse
    api.add_exception_handler(RequestValidationError, on_validation)
    api.add_exception_handler(StarletteHTTPException, on_http)
    api.add_exception_handler(errors.WorkbenchError, on_error)
    api.add_exception_handler(ApiError, on_error)
    api.add_exception_handler(Exception, on_error)
