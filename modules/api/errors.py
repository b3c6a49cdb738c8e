"""The one table from typed errors to HTTP statuses, and the OpenAI error shape.

Every error leaves the API as `{"error": {"message", "type", "param", "code"}}` with a
4xx status (5xx only for a backend failing mid-generation), whether it came from the
engine (modules.errors), from request validation, from routing or from auth. The table is
looked up along the exception's class hierarchy, so a subclass inherits its parent's row
unless it has its own; nobody matches on message text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from modules import errors

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
    errors.BackendMissingError: ErrorRow(400, "invalid_request_error", "backend_missing"),
    errors.UnsupportedOptionError: ErrorRow(400, "invalid_request_error", "unsupported_option"),
    errors.ModelLoadError: ErrorRow(400, "invalid_request_error", "model_load_failed"),
    errors.GenerationError: ErrorRow(500, "server_error", "generation_failed"),
}
_HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               405: "invalid_request_error", 429: "rate_limit_error"}
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


def _validation_body(exc: RequestValidationError) -> dict[str, Any]:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
    else:
        message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": "invalid_value"}}


def install_error_handlers(api: FastAPI) -> None:
    """Route every error through the table above, in the OpenAI shape."""

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        status, body = error_body(exc)
        return JSONResponse(body, status_code=status)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse(_validation_body(exc), status_code=400)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        body = {"error": {"message": str(exc.detail), "type": _HTTP_TYPES.get(exc.status_code, "invalid_request_error"),
                          "param": None, "code": None}}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    api.add_exception_handler(RequestValidationError, on_validation)
    api.add_exception_handler(StarletteHTTPException, on_http)
    api.add_exception_handler(errors.WorkbenchError, on_error)
    api.add_exception_handler(ApiError, on_error)
    api.add_exception_handler(Exception, on_error)
