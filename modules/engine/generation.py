"""The generator: prompt + sampler parameters in, a stream of text deltas out.

Every request goes through one queue owned by the generator and is served by its worker
threads, so callers (UI, API) only ever see `submit()` and a `Stream`. As many requests
run at once as the loaded model has slots (`parallel`, see loaders/base.py); the loader
batches them into shared decode steps, the rest wait their turn in arrival order. The
non-streaming call drains the same stream.

The token loop lives in `_run`: it drops token ids the model does not have from the bias
and bans (`within_vocabulary`, the one policy), truncates the prompt to fit, asks the
loader for steps (token id and, when asked, its log-probabilities), turns them into text with IncrementalDetokenizer (never half a character),
cuts at stop strings with StopMatcher (never leaked), and honours cancel, EOS,
max_new_tokens and the context window.

Extension hooks (modules/engine/extensions.py) wrap that loop, never enter it: with no extension
enabled a job carries no hooks and runs exactly as before. With some, `submit` runs
state_modifier and input_modifier (plain completions; chat ran them already), the
worker runs custom_generate_reply and tokenizer_modifier, and the consumer's thread runs
output_modifier on the final chunk, so a hook may itself call the generator (a
translation through the model) from input_modifier or output_modifier without a deadlock.
"""

from __future__ import annotations

import logging
import queue
import random
import re
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from loaders.base import LoadedModel, Step, concurrency_of, within_vocabulary
from modules.core.errors import (
    ContextLengthExceededError,
    GenerationError,
    InvalidRequestError,
    ModelNotLoadedError,
    QueueFullError,
)
from modules.core.sampling import SamplingParams
from modules.engine.extensions import ExtensionRegistry, make_state
from modules.engine.model_manager import ModelManager
from modules.engine.text_stream import IncrementalDetokenizer, StopMatcher

log = logging.getLogger(__name__)

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's text and log-probability, with the most likely alternatives."""

    text: str
    logprob: float
    top: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class GenerationChunk:
    """One step of a stream. The last chunk carries `finish_reason`."""

    delta: str
    text: str
    """All text so far."""
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    """None while streaming; then "stop" (EOS or a stop string), "length" or "cancelled"."""
    seed: int | None = None
    truncated_tokens: int = 0
    """Prompt tokens dropped from the start to make room for the reply."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """With `SamplingParams.logprobs`: the tokens generated since the previous chunk."""
    original: str | None = None
    """On the last chunk, when an output_modifier changed `text`: the text before it did."""


@dataclass
class _Hooks:
    """What an extension-enabled job needs: the registry, the hooks' `state`, chat or not."""

    registry: ExtensionRegistry
    state: dict[str, Any]
    is_chat: bool
    original_prompt: str | list[int]


@dataclass(eq=False)  # compared and hashed by identity: jobs live in a set
class _Job:
    prompt: str | list[int]
    params: SamplingParams
    cancel: threading.Event = field(default_factory=threading.Event)
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    hooks: _Hooks | None = None
    owner: str | None = None
    """Who asked (an API caller, a browser session): `cancel_owned` stops only theirs."""
    waiting: bool = True
    """Counted in the wait queue until a slot takes it (or it ends without one)."""


class Reservation:
    """A place in the wait queue taken before the request is ready to submit (an HTTP request
    must know it will be served before it answers 200). Pass it to `submit`, or `release()` it."""

    def __init__(self, generator: Generator) -> None:
        self._generator: Generator | None = generator
        self._lock = threading.Lock()  # take() and release() may race (a cancel from another thread)

    def _claim(self) -> Generator | None:
        with self._lock:
            generator, self._generator = self._generator, None
        return generator

    def take(self) -> bool:
        """Consume the place (for `submit`); False when it was already used or released."""
        return self._claim() is not None

    def release(self) -> None:
        generator = self._claim()
        if generator is not None:
            generator._unreserve()


_END = object()


class Stream:
    """Iterate for chunks; `cancel()` stops the generation within one token.

    Leaving a `with` block or closing the stream cancels it too, so an abandoned
    consumer (a closed browser tab, a dropped HTTP client) never keeps the model busy.
    """

    def __init__(self, job: _Job) -> None:
        self._job = job

    def __iter__(self) -> Iterator[GenerationChunk]:
        try:
            while True:
                item = self._job.out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                if self._job.hooks is not None and item.finish_reason:
                    item = _modify_output(self._job.hooks, item)
                yield item
        finally:
            self._job.cancel.set()

    def cancel(self) -> None:
        self._job.cancel.set()

    close = cancel

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def result(self) -> GenerationChunk:
        """Drain the stream and return its last chunk (the whole text is in `.text`)."""
        chunks = deque(self, maxlen=1)
        assert chunks, "a generation always ends with a final chunk or raises"
        return chunks[0]


class Generator:
    """Owns the request queue and the worker that runs generations on the loaded model."""

    def __init__(self, models: ModelManager, extensions: ExtensionRegistry | None = None,
                 max_queue: int | None = None) -> None:
        self.models = models
        self.extensions = extensions
        self.max_queue = max_queue
        """Requests that may wait for a slot beyond those running; None = no limit."""
        self._waiting = 0
        """Submitted jobs not yet running, plus reservations (under _pending_lock)."""
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._start_lock = threading.Lock()
        self._pending: set[_Job] = set()
        self._pending_lock = threading.Lock()
        # Admission: at most as many jobs run as the loaded model has slots.
        self._admission = threading.Condition()
        self._running = 0

    def submit(self, prompt: str | list[int], params: SamplingParams, *,
               state: dict[str, Any] | None = None, is_chat: bool = False, raw: bool = False,
               owner: str | None = None, reservation: Reservation | None = None) -> Stream:
        """Queue a generation; iterate the returned stream for its chunks.

        `state` is the extensions' state dict: for chat, the one ChatService built and
        modified (`is_chat=True`: state_modifier and input_modifier already ran); for
        plain completions, extra keys such as `is_api` (the hooks run here). `raw` skips
        every hook: an extension generating for itself (a translation) must not recurse,
        and is never refused for a full queue (its caller already holds a place).
        `owner` tags the job for `cancel_owned`. Raises QueueFullError when `max_queue`
        requests already wait and no `reservation` was taken earlier.
        """
        if not isinstance(prompt, str) and not (
            isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            if reservation is not None:
                reservation.release()
            raise InvalidRequestError("prompt must be text or a list of token ids", "prompt")
        if isinstance(prompt, str) and _LONE_SURROGATE.search(prompt):
            # Not UTF-8 encodable: every tokenizer would fail on it, whichever face sent it.
            if reservation is not None:
                reservation.release()
            raise InvalidRequestError("the prompt holds a lone surrogate (half of a UTF-16 pair): not valid text",
                                      "prompt")
        reserved = reservation is not None and reservation.take()
        if not reserved:
            self._take_place(limited=not raw)
        job = _Job(prompt, params, owner=owner)
        try:
            if not raw and self.extensions is not None and self.extensions.active:
                job.hooks = _input_hooks(self.extensions, job, state, is_chat)
        except BaseException:
            self._unreserve()
            raise
        with self._pending_lock:
            self._pending.add(job)
        self._ensure_worker()
        self._queue.put(job)
        return Stream(job)

    def reserve(self) -> Reservation:
        """A place in the wait queue now, for a `submit` a little later; QueueFullError if none."""
        self._take_place(limited=True)
        return Reservation(self)

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot (and places reserved for requests about to submit)."""
        return self._waiting

    def _take_place(self, limited: bool) -> None:
        with self._pending_lock:
            if limited and self.max_queue is not None and self._waiting >= self.max_queue + self._free_slots():
                raise QueueFullError(
                    f"the server is busy: {self._waiting} requests are already waiting for the model "
                    f"(--max-queue {self.max_queue}); try again in a few seconds", retry_after=self._retry_after())
            self._waiting += 1

    def _unreserve(self) -> None:
        with self._pending_lock:
            self._waiting -= 1

    def _free_slots(self) -> int:
        """Slots no job holds or is about to take: requests that will start at once are not waiting."""
        return max(0, self._slots() - self._running)

    def _retry_after(self) -> int:
        """Seconds to suggest to a refused client: a rough turn of the queue, at least 1."""
        return max(1, min(60, self._waiting // max(1, self._slots())))

    def cancel_all(self) -> int:
        """Stop every queued and running generation, whoever started it (a "stop everything")."""
        return self.cancel_owned(None)

    def cancel_owned(self, owner: str | None) -> int:
        """Stop the queued and running generations submitted with `owner` (None: all of them)."""
        with self._pending_lock:
            jobs = [job for job in self._pending if owner is None or job.owner == owner]
        for job in jobs:
            job.cancel.set()
        return len(jobs)

    def generate(self, prompt: str | list[int], params: SamplingParams, *, raw: bool = False) -> GenerationChunk:
        """Blocking form of submit(): the final chunk, whose `.text` is the whole reply."""
        return self.submit(prompt, params, raw=raw).result()

    def close(self) -> None:
        with self._start_lock:
            workers, self._workers = self._workers, []
        for _ in workers:
            self._queue.put(None)
        for worker in workers:
            worker.join(timeout=5)

    @property
    def running(self) -> int:
        """Generations running now (the rest of the pending ones wait for a slot)."""
        return self._running

    def _slots(self) -> int:
        return concurrency_of(self.models.current)

    def _ensure_worker(self) -> None:
        with self._start_lock:
            self._workers = [w for w in self._workers if w.is_alive()]
            while len(self._workers) < self._slots():
                worker = threading.Thread(target=self._serve, name=f"generator-{len(self._workers)}", daemon=True)
                worker.start()
                self._workers.append(worker)

    def _serve(self) -> None:
        while (job := self._queue.get()) is not None:
            admitted = False
            try:
                admitted = self._admit(job)
                self._stop_waiting(job)
                if not admitted:
                    job.out.put(GenerationChunk("", "", 0, 0, FINISH_CANCELLED))
                    continue
                with self.models.using() as model:
                    run = self._run if job.hooks is None else self._run_hooked
                    for chunk in run(model, job):
                        job.out.put(chunk)
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, who re-raises it
                if isinstance(exc, ModelNotLoadedError):
                    log.info("generation refused: %s", exc)  # the user's to fix, not a failure
                elif not isinstance(exc, InvalidRequestError):
                    log.exception("generation failed")
                job.out.put(exc)
            finally:
                if admitted:
                    with self._admission:
                        self._running -= 1
                        self._admission.notify_all()
                self._stop_waiting(job)
                with self._pending_lock:
                    self._pending.discard(job)
                job.out.put(_END)

    def _stop_waiting(self, job: _Job) -> None:
        with self._pending_lock:
            if job.waiting:
                job.waiting = False
                self._waiting -= 1

    def _admit(self, job: _Job) -> bool:
        """Wait for a free slot (the model may have been reloaded with fewer); False if the
        job was cancelled while it waited."""
        with self._admission:
            while self._running >= self._slots() and not job.cancel.is_set():
                self._admission.wait(0.25)
            if job.cancel.is_set():
                return False
            self._running += 1
            return True

    def _run(self, model: LoadedModel, job: _Job) -> Iterator[GenerationChunk]:
        params = job.params
        if params.seed is None:
            params = params.replace(seed=random.randrange(2**31))
        _check_capabilities(model, params)
        params = within_vocabulary(params, model.info.vocab_size)
        ids, dropped = fit_prompt(model, job.prompt, params)
        if log.isEnabledFor(logging.DEBUG):  # --verbose: show exactly what the model sees
            log.debug("prompt (%d tokens, %d cut):\n%s", len(ids), dropped, model.decode(ids, skip_special=False))
        eos = frozenset(model.info.eos_token_ids) if not params.ban_eos_token else frozenset()
        detok = IncrementalDetokenizer(
            lambda t: model.decode(t, skip_special=params.skip_special_tokens), ids
        )
        stopper = StopMatcher(params.stop)
        text, count, finish = "", 0, None
        pending: list[TokenLogprob] = []
        steps = model.generate(ids, params, job.cancel)
        try:
            for step in steps:
                if step.token in eos:
                    finish = FINISH_STOP
                    break
                count += 1
                if params.logprobs:
                    pending.append(_describe(model, step))
                delta, hit = stopper.feed(detok.add(step.token))
                if delta:
                    text += delta
                    yield GenerationChunk(delta, text, len(ids), count, None, params.seed, dropped, tuple(pending))
                    pending = []
                if hit:
                    finish = FINISH_STOP
                elif count >= params.max_new_tokens:
                    finish = FINISH_LENGTH
                elif job.cancel.is_set():
                    finish = FINISH_CANCELLED
                if finish:
                    break
        finally:
            steps.close()  # type: ignore[attr-defined]
        if finish is None:  # the loader returned: cancelled, or the context window is full
            finish = FINISH_CANCELLED if job.cancel.is_set() else FINISH_LENGTH
        tail = "" if stopper.matched else _release(detok, stopper)
        text += tail
        yield GenerationChunk(tail, text, len(ids), count, finish, params.seed, dropped, tuple(pending))


    def _run_hooked(self, model: LoadedModel, job: _Job) -> Iterator[GenerationChunk]:
        """custom_generate_reply (the first that answers replaces the model), else
        tokenizer_modifier on the prompt ids and the ordinary token loop."""
        hooks = job.hooks
        assert hooks is not None
        registry, prompt = hooks.registry, job.prompt
        if registry.has("custom_generate_reply"):
            ext, replies = registry.first("custom_generate_reply", prompt, hooks.original_prompt, hooks.state,
                                          list(job.params.stop), hooks.is_chat)
            if ext is not None:
                yielded = False
                for chunk in _custom_chunks(model, job, registry.iterate(ext, "custom_generate_reply", replies)):
                    yielded = True
                    yield chunk
                if yielded:
                    return
        if registry.has("tokenizer_modifier") and isinstance(prompt, str):
            job.prompt = _modify_tokens(registry, model, hooks.state, prompt, job.params)
        yield from self._run(model, job)


def _input_hooks(registry: ExtensionRegistry, job: _Job, state: dict[str, Any] | None,
                 is_chat: bool) -> _Hooks:
    """The job's hooks; for a plain completion, state_modifier and input_modifier run now."""
    if is_chat:
        return _Hooks(registry, state if state is not None else make_state(job.params, is_chat=True), True, job.prompt)
    state = make_state(job.params, **(state or {}))
    state = registry.chain("state_modifier", state, check=lambda v: isinstance(v, dict))
    original = job.prompt
    if isinstance(job.prompt, str):
        job.prompt = registry.chain("input_modifier", job.prompt, state, False, check=lambda v: isinstance(v, str))
    return _Hooks(registry, state, False, original)


def _modify_tokens(registry: ExtensionRegistry, model: LoadedModel, state: dict[str, Any], prompt: str,
                   params: SamplingParams) -> list[int]:
    """tokenizer_modifier(state, prompt, input_ids, input_embeds) over the encoded prompt.

    Each hook returns (prompt, input_ids, input_embeds); the loaders take ids only, so
    embeddings an extension returns are ignored (logged).
    """
    ids, embeds = model.encode(prompt, add_bos=params.add_bos_token), None
    for ext in registry.enabled:
        if "tokenizer_modifier" not in ext.hooks:
            continue
        ok, result = registry.call(ext, "tokenizer_modifier", state, prompt, ids, embeds)
        if ok and isinstance(result, tuple) and len(result) == 3 and isinstance(result[1], list):
            prompt, ids, embeds = result[0], [int(t) for t in result[1]], result[2]
        elif ok:
            log.error("extension %s: tokenizer_modifier must return (prompt, input_ids, input_embeds)", ext.name)
    if embeds is not None:
        log.warning("input_embeds from tokenizer_modifier are ignored: the loaders take token ids only")
    return ids


def _custom_chunks(model: LoadedModel, job: _Job, replies: Iterator[Any]) -> Iterator[GenerationChunk]:
    """Chunks from a custom_generate_reply generator, which yields the whole text so far (ooba's way)."""
    prompt_tokens = len(job.prompt) if isinstance(job.prompt, list) else len(model.encode(job.prompt))
    text, count = "", 0
    for reply in replies:
        if not isinstance(reply, str):
            continue
        count += 1
        delta = reply[len(text):] if reply.startswith(text) else reply
        text = reply
        yield GenerationChunk(delta, text, prompt_tokens, count, None, job.params.seed)
        if job.cancel.is_set():
            break
    if count:
        finish = FINISH_CANCELLED if job.cancel.is_set() else FINISH_STOP
        yield GenerationChunk("", text, prompt_tokens, count, finish, job.params.seed)


def _modify_output(hooks: _Hooks, chunk: GenerationChunk) -> GenerationChunk:
    """The last chunk with output_modifier applied to its whole text.

    `delta` stays consistent for streaming readers when the modified text extends what was
    streamed; a rewrite (a translation) is in `text` only, the raw text in `original`. A chat
    reply is given without its surrounding whitespace (as ooba does), kept around the result.
    """
    if not hooks.registry.has("output_modifier"):
        return chunk
    body = chunk.text.strip() if hooks.is_chat else chunk.text
    new = hooks.registry.chain("output_modifier", body, hooks.state, hooks.is_chat,
                               check=lambda v: isinstance(v, str))
    if new == body:
        return chunk
    lead = chunk.text[: len(chunk.text) - len(chunk.text.lstrip())] if hooks.is_chat else ""
    text = lead + new
    streamed = chunk.text[: len(chunk.text) - len(chunk.delta)]
    delta = text[len(streamed):] if text.startswith(streamed) else chunk.delta
    return replace(chunk, delta=delta, text=text, original=chunk.text)


def _describe(model: LoadedModel, step: Step) -> TokenLogprob:
    """The step's numbers, with token ids turned into text."""
    numbers = step.logprobs
    if numbers is None:  # a loader declaring the capability broke its contract
        raise GenerationError(f"the {model.info.loader} loader yielded a token without the logprobs it was asked for")
    text = model.decode([step.token], skip_special=False)
    top = tuple((model.decode([t], skip_special=False), lp) for t, lp in numbers.top)
    return TokenLogprob(text, numbers.logprob, top)


def _release(detok: IncrementalDetokenizer, stopper: StopMatcher) -> str:
    """Text held back at the end of a generation that did not hit a stop string."""
    delta, hit = stopper.feed(detok.flush())
    return delta if hit else delta + stopper.flush()


def fit_prompt(model: LoadedModel, prompt: str | list[int], params: SamplingParams) -> tuple[list[int], int]:
    """Prompt ids cut from the left to `truncation_length - max_new_tokens`; and how many were cut.

    A leading BOS survives the cut, since models expect it first.
    """
    ids = model.encode(prompt, add_bos=params.add_bos_token) if isinstance(prompt, str) else list(prompt)
    window = model.info.context_length
    budget = min(params.truncation_length or window, window)
    keep = budget - params.max_new_tokens
    if keep < 1:
        raise ContextLengthExceededError(
            f"max_new_tokens ({params.max_new_tokens}) leaves no room for the prompt in a "
            f"{budget}-token context; lower max_new_tokens or raise truncation_length",
            "max_new_tokens",
        )
    if not ids:
        raise InvalidRequestError("the prompt is empty", "prompt")
    if len(ids) <= keep:
        return ids, 0
    bos = model.info.bos_token_id
    if bos is not None and ids[0] == bos and keep > 1:
        return [bos] + ids[len(ids) - keep + 1 :], len(ids) - keep
    return ids[len(ids) - keep :], len(ids) - keep


def _check_capabilities(model: LoadedModel, params: SamplingParams) -> None:
    """Refuse, by name, what the model's declared capabilities exclude; warn about ignored samplers."""
    caps = model.capabilities
    if params.grammar_string and not caps.grammar:
        raise InvalidRequestError(
            f"the {model.info.loader} loader does not support grammars; use llama.cpp (GGUF), Transformers, "
            "GPTQ or ExLlamaV2",
            "grammar_string",
        )
    if params.logprobs and not caps.logprobs:
        raise InvalidRequestError(f"the {model.info.loader} loader cannot report token probabilities", "logprobs")
    unsupported = [s for s in params.active_samplers() if s not in caps.samplers]
    if unsupported:
        log.warning("%s ignores these samplers: %s", model.info.loader, ", ".join(unsupported))
