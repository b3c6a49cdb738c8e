"""The sync-to-async bridge: engine streams (blocking iterators) served to HTTP clients.

The engine's Stream blocks while it waits for the next token, so it is iterated in the
threadpool (`iterate_in_threadpool`), never on the event loop. Whatever way a response
ends (done, error, or the client gone), `cancel` runs in `finally`: a dropped client
stops its generation within one token and the queue moves on. A non-streaming request
watches for the disconnect while the generation runs, for the same reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from modules.api.errors import SPACED, error_body, json_text

log = logging.getLogger(__name__)
T = TypeVar("T")

DONE = "data: [DONE]\n\n"
_POLL_S = 0.05
"""How often a non-streaming request checks whether its client is still there."""


def sse_data(payload: dict[str, Any]) -> str:
    """One SSE event; `json_text` keeps it encodable (a failed chunk would cut the stream)."""
    return f"data: {json_text(payload, SPACED)}\n\n"


def kobold_event(payload: dict[str, Any]) -> str:
    return f"event: message\n{sse_data(payload)}"


async def _events(request: Request, events: Iterator[dict[str, Any]], cancel: Callable[[], None],
                  encode: Callable[[dict[str, Any]], str], done: str | None) -> AsyncIterator[str]:
    try:
        try:
            async for event in iterate_in_threadpool(events):
                if await request.is_disconnected():
                    return
                yield encode(event)
        except Exception as exc:  # noqa: BLE001 - a failure mid-stream becomes an error chunk (vLLM)
            _, body = error_body(exc)
            yield encode(body)
        if done:
            yield done
    finally:
        cancel()


def sse_response(request: Request, events: Iterator[dict[str, Any]], cancel: Callable[[], None],
                 encode: Callable[[dict[str, Any]], str] = sse_data, done: str | None = DONE) -> StreamingResponse:
    """Serve `events` (a blocking iterator of JSON payloads) as Server-Sent Events.

    `cancel` stops the generation behind `events`; it runs when the response ends for any
    reason. An exception from `events` is sent as an error payload, then `done`.
    """
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(_events(request, events, cancel, encode, done),
                             media_type="text/event-stream", headers=headers)


async def drain(request: Request, run: Callable[[], T], cancel: Callable[[], None]) -> T:
    """Run the blocking `run()` in the threadpool; cancel it if the client goes away.

    Returns what `run()` returns (after a cancel, the partial result: nobody reads it).
    """
    task = asyncio.ensure_future(run_in_threadpool(run))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                log.info("client went away: cancelling its generation")
                cancel()
                return await task
    finally:
        cancel()
