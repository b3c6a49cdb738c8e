"""Request fields no schema declares, logged at DEBUG level instead of dropped silently.

The request models accept unknown keys (`extra="allow"`: SillyTavern alone sends dozens that
are not ours) and nothing reads them. A user wondering why a setting had no effect can run
with DEBUG logging and see, one line per request, which keys the API did not know, nested
ones by their dotted path (messages.0.tool_call_id).

`LoggingRoute` is the route class of the API's routers: it wraps each endpoint so that the
request models it receives are checked before it runs; the check costs nothing unless DEBUG
is on for this logger.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any

from fastapi.routing import APIRoute
from pydantic import BaseModel

log = logging.getLogger(__name__)

_WRAPPED = "_logs_unknown_fields"


def unknown_fields(model: BaseModel, prefix: str = "") -> list[str]:
    """Dotted paths of the keys in `model`, and in the models inside it, that no field declares."""
    found = [f"{prefix}{key}" for key in model.model_extra or {}]
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            found += unknown_fields(value, f"{prefix}{name}.")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                if isinstance(item, BaseModel):
                    found += unknown_fields(item, f"{prefix}{name}.{index}.")
    return found


def log_unknown_fields(route: str, arguments: Iterable[Any]) -> None:
    """One DEBUG line naming the unknown keys of the request models among `arguments`, if any."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    keys = [key for value in arguments if isinstance(value, BaseModel) for key in unknown_fields(value)]
    if keys:
        log.debug("%s: unknown fields: %s", route, ", ".join(keys))


def logging_unknown_fields(endpoint: Callable[..., Any], route: str) -> Callable[..., Any]:
    """`endpoint` (sync or async, as it was) logging its request models' unknown fields first.

    FastAPI reads the signature, annotations and coroutine-ness through `__wrapped__`, and calls
    endpoints with keyword arguments only.
    """
    if getattr(endpoint, _WRAPPED, False):
        return endpoint
    if inspect.iscoroutinefunction(endpoint):
        @functools.wraps(endpoint)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            log_unknown_fields(route, kwargs.values())
            return await endpoint(*args, **kwargs)
    else:
        @functools.wraps(endpoint)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            log_unknown_fields(route, kwargs.values())
            return endpoint(*args, **kwargs)
    setattr(wrapper, _WRAPPED, True)
    return wrapper


class LoggingRoute(APIRoute):
    """An APIRoute whose endpoint logs the unknown fields of its request body (DEBUG level)."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        methods = ",".join(sorted(kwargs.get("methods") or ["GET"]))
        super().__init__(path, logging_unknown_fields(endpoint, f"{methods} {path}"), **kwargs)
