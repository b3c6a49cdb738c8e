"""What the API keeps beside the App: live generations, KoboldCpp's perf numbers, and a
`Run` per request that puts its generations through the engine's one queue.

Everything generates through `app.generator` (and chat prompts through `app.chat`), the
same path the UI takes, so a later hook registry in the engine applies to both faces.
"""

from __future__ import annotations

import hashlib
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from modules.api.errors import ApiError
from modules.api.responses import UsageInfo
from modules.core.sampling import SamplingParams
from modules.engine.generation import GenerationChunk, Reservation, Stream
from modules.engine.model_switch import ModelLease, ModelNotFoundByNameError

if TYPE_CHECKING:
    from modules.engine.app import App



class Cancellable(Protocol):
    def cancel(self) -> None: ...


J = TypeVar("J", bound=Cancellable)
DEFAULT_MAX_TOKENS = 512
"""max_new_tokens when a request names none (ooba's default), capped to half the context."""


@dataclass(frozen=True)
class Caller:
    """Who sent a request, for stopping only what they started: the key they presented (hashed:
    the key itself is never kept) and KoboldCpp's `genkey` when the request named one."""

    key_id: str
    genkey: str | None = None


class ActiveStreams:
    """The generations the API started and that are still running, with who started them;
    stop-generation and Kobold's abort cancel the caller's own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[Stream, Caller | None] = {}

    def add(self, stream: Stream, caller: Caller | None = None) -> None:
        with self._lock:
            self._streams[stream] = caller

    def discard(self, stream: Stream) -> None:
        with self._lock:
            self._streams.pop(stream, None)

    def cancel_all(self) -> int:
        """Every API generation (shutdown, model unload)."""
        return self._cancel(lambda caller: True)

    def cancel_caller(self, key_id: str, genkey: str | None = None) -> int:
        """The generations of the caller with this key; with `genkey`, only that one request."""
        return self._cancel(lambda c: c is not None and c.key_id == key_id and (genkey is None or c.genkey == genkey))

    def _cancel(self, match: Callable[[Caller | None], bool]) -> int:
        with self._lock:
            streams = [stream for stream, caller in self._streams.items() if match(caller)]
        for stream in streams:
            stream.cancel()
        return len(streams)

    def __len__(self) -> int:
        return len(self._streams)


@dataclass
class Perf:
    """KoboldCpp's /api/extra/perf numbers for the last generation."""

    last_process: float = 0.0
    last_eval: float = 0.0
    last_token_count: int = 0
    last_input_count: int = 0
    total_gens: int = 0
    stop_reason: int = -1

    def record(self, started: float, first_token_at: float | None, chunk: GenerationChunk) -> None:
        end = time.perf_counter()
        first = first_token_at or end
        self.last_process, self.last_eval = first - started, end - first
        self.last_token_count, self.last_input_count = chunk.completion_tokens, chunk.prompt_tokens
        self.total_gens += 1
        # KoboldCpp's codes: 0 out of tokens (length), 1 EOS or stop string, 2 aborted.
        self.stop_reason = {"length": 0, "stop": 1}.get(chunk.finish_reason or "", 2)


@dataclass
class ApiState:
    """The App and the API's own bookkeeping; one per FastAPI app, in `app.state.api`."""

    app: App
    active: ActiveStreams = field(default_factory=ActiveStreams)
    perf: Perf = field(default_factory=Perf)

    def default_params(self, explicit_max_tokens: bool) -> SamplingParams:
        """The neutral sampler defaults; without a max_tokens, ooba's 512 capped to half the context."""
        if explicit_max_tokens:
            return SamplingParams()
        window = self.app.models.require().info.context_length
        return SamplingParams(max_new_tokens=max(1, min(DEFAULT_MAX_TOKENS, window // 2)))

    def run(self, params: SamplingParams, caller: Caller | None = None) -> Run:
        """A Run holding a place in the engine's wait queue (QueueFullError when there is none)."""
        return Run(self, params, caller)


def get_state(request: Request) -> ApiState:
    """The ApiState of the FastAPI app serving `request`."""
    return request.app.state.api


async def hold_model(request: Request, requested: str | None) -> ModelLease:
    """The model a request's `model` field names, loaded and held (models on demand:
    `App.model_for`), waited for off the event loop so other calls keep answering. Under
    --strict-model-names an unknown name is OpenAI's 404, code model_not_found."""
    try:
        return await run_in_threadpool(get_state(request).app.model_for, requested)
    except ModelNotFoundByNameError as exc:
        raise ApiError(str(exc), 404, "invalid_request_error", "model", "model_not_found") from None


async def on_model(request: Request, requested: str | None, build: Callable[[], J]) -> tuple[J, Callable[[], None]]:
    """`build()` (a job: prompt, params, queue place) run on the model `requested` names, in the
    threadpool; and the callback that ends it: `job.cancel()`, then the model released. Give
    the callback where the response ends (`sse_response` and `drain` call it in `finally`)."""
    lease = await hold_model(request, requested)
    try:
        job = await run_in_threadpool(build)
    except BaseException:
        lease.release()
        raise
    def end() -> None:
        try:
            job.cancel()
        finally:
            lease.release()

    return job, end


def caller_of(request: Request, genkey: str | None = None) -> Caller:
    """The caller of `request`: the key it presented, hashed (every caller when no key is set
    shares one id: with no key there is no telling callers apart)."""
    presented = presented_key(request)
    key_id = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).hexdigest()[:16] if presented else "anonymous"
    return Caller(key_id, genkey)


def presented_key(request: Request) -> str:
    """The API key a request carries: `Authorization: Bearer KEY`, else `x-api-key`."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        given = request.headers.get("x-api-key", "")
    return given.strip()


class Run:
    """One request's generations, one after another through the engine queue; `cancel()` stops them.

    `cancel()` may come from the event loop while `chunks()` runs in a threadpool thread:
    the flag covers a cancel that lands before the stream exists.
    """

    def __init__(self, state: ApiState, params: SamplingParams, caller: Caller | None = None) -> None:
        self.state = state
        self.params = params
        self.caller = caller
        self._current: Stream | None = None
        self._live: Iterator[GenerationChunk] | None = None
        self._cancelled = threading.Event()
        # The place in the queue is taken now, so a full queue is a 429 before any byte is sent;
        # a Run dropped unused gives it back.
        self._reservation: Reservation | None = state.app.generator.reserve()
        weakref.finalize(self, self._reservation.release)

    def chunks(self, prompt: str | list[int], params: SamplingParams | None = None,
               hook_state: dict[str, Any] | None = None) -> Iterator[GenerationChunk]:
        """Chunks of one generation of `prompt`; the last carries finish_reason.

        `hook_state` is a chat prompt's extension state (BuiltPrompt.state); without one the
        generator runs the plain-completion hooks itself.
        """
        self._live = self._chunks(prompt, params, hook_state)
        return self._live

    def _chunks(self, prompt: str | list[int], params: SamplingParams | None,
                hook_state: dict[str, Any] | None) -> Iterator[GenerationChunk]:
        started, first = time.perf_counter(), None
        chat = hook_state is not None
        reservation, self._reservation = self._reservation, None
        stream = self.state.app.generator.submit(prompt, params or self.params,
                                                 state=hook_state if chat else {"is_api": True}, is_chat=chat,
                                                 owner=f"api:{self.caller.key_id}" if self.caller else "api",
                                                 reservation=reservation)
        self._current = stream
        self.state.active.add(stream, self.caller)
        if self._cancelled.is_set():
            stream.cancel()
        try:
            for chunk in stream:
                first = first or time.perf_counter()
                if chunk.finish_reason:
                    self.state.perf.record(started, first, chunk)
                yield chunk
        finally:
            self.state.active.discard(stream)
            stream.cancel()

    def result(self, prompt: str | list[int], params: SamplingParams | None = None) -> GenerationChunk:
        """The final chunk of one whole generation (`.text` holds all of it)."""
        last: GenerationChunk | None = None
        for last in self.chunks(prompt, params):  # noqa: B007 - only the last one matters
            pass
        assert last is not None
        return last

    def cancel(self) -> None:
        """Stop the generation (within one token) and let its last chunk be read and recorded."""
        self._cancelled.set()
        if self._reservation is not None:
            self._reservation.release()
        if self._current is not None:
            self._current.cancel()
        if self._live is not None:
            # A client that went away reads no more: someone must take the final chunk off
            # the stream so its numbers are recorded (and the stream ends) right now.
            threading.Thread(target=_finish, args=(self._live,), name="api-finish", daemon=True).start()


def _finish(chunks: Iterator[GenerationChunk]) -> None:
    try:
        for _ in chunks:
            pass
    except ValueError:  # "generator already executing": its reader gets the final chunk itself
        pass
    except Exception:  # noqa: BLE001 - the request is gone; the engine logged the failure
        pass


def usage(chunk: GenerationChunk | None) -> UsageInfo:
    """The token counts of a generation's last chunk (zeros without one)."""
    prompt = chunk.prompt_tokens if chunk else 0
    completion = chunk.completion_tokens if chunk else 0
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
