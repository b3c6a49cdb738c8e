"""Continuous batching for llama.cpp: N slots share one model and one context.

Each slot is a llama.cpp sequence (its own `seq_id` and its own stretch of KV cache). One
engine thread runs the decode loop: every step it puts one token for each generating
request and, in what room the batch has left, the next chunk of each new request's prompt
into ONE `llama_decode` call, then samples each request's token from its own row of
logits with its own sampler chain. Requests join between steps and leave (finished,
cancelled) between steps, so a long generation never holds the others up, and 8 requests
cost far less than 8 times one on a CPU or GPU (the weights are read once per step).

The consumer side (`SlotEngine.generate`) runs in the caller's thread: it hands a request
to the engine and yields the steps (token and, when asked, its log-probabilities) the
engine sends back, so the generator's own loop
(detokenising, stop strings) runs beside the decode loop rather than between its steps.

A new request goes to the free slot whose cache keeps the most of its prompt (its last
request's prompt + reply; see loaders/kv_reuse.py), so a chat's next turn evaluates only
its new tokens, and a chat that outgrew the context has its cache shifted, not rebuilt.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from loaders.base import Step, TokenLogprobs, check_prompt_ids
from loaders.kv_reuse import MIN_SHIFT_TOKENS, ReusePlan, plan_reuse
from loaders.llama_cpp_sampler import LlamaChain
from modules.core.errors import GenerationError, InvalidRequestError, ModelNotLoadedError

log = logging.getLogger(__name__)

_DONE = object()
#: Tokens a request may be ahead of its consumer: one in flight while the consumer handles
#: the last (the two overlap), but no more, so a reply cut by a stop string wastes no steps.
LOOKAHEAD = 2
#: A request whose consumer has not taken a token for this long gives its slot to a waiting
#: one (an abandoned iterator that was never closed must not hold a slot for ever).
STALL_SECONDS = 1.0


@dataclass(eq=False)
class Slot:
    """One llama.cpp sequence and the tokens its KV cache holds, in order from position 0."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    busy: bool = False
    last_used: float = 0.0


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    chain: LlamaChain | None
    stop_event: threading.Event
    max_tokens: int
    want_logprobs: int
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    slot: Slot | None = None
    pending: list[int] = field(default_factory=list)
    """Prompt tokens still to evaluate."""
    next_token: int | None = None
    """Sampled and sent, not yet decoded into the cache."""
    sampled: int = 0
    taken: int = 0
    """Tokens the consumer has received (under the engine's lock)."""
    last_taken: float = 0.0
    last_sent: float = 0.0
    closed: bool = False
    """The consumer has gone (closed its iterator): drop it at the next step."""
    plan: ReusePlan | None = None


@dataclass
class SlotStats:
    """What the last admitted request found in its slot's cache (shown in tests and benches)."""

    seq_id: int = -1
    reused_tokens: int = 0
    shifted_tokens: int = 0
    evaluated_tokens: int = 0


class SlotEngine:
    """The decode loop over `n_slots` sequences of one llama.cpp context.

    `lib` is the llama_cpp module; `ctx` the raw llama_context pointer (from a context
    created with n_seq_max = n_slots); `n_ctx_slot` the tokens one sequence may hold.
    """

    def __init__(self, lib: Any, ctx: Any, *, n_slots: int, n_ctx_slot: int, n_batch: int, n_vocab: int,
                 eog_ids: tuple[int, ...], min_shift: int = MIN_SHIFT_TOKENS, context_shift: bool = True) -> None:
        self._lib = lib
        self._ctx = ctx
        self._memory = lib.llama_get_memory(ctx)
        self._can_shift = context_shift and bool(lib.llama_memory_can_shift(self._memory))
        self.n_slots, self.n_ctx_slot, self.n_batch, self.n_vocab = n_slots, n_ctx_slot, n_batch, n_vocab
        self.min_shift = min_shift
        self._eog = frozenset(eog_ids)
        self.slots = [Slot(i) for i in range(n_slots)]
        self._batch = lib.llama_batch_init(n_batch, 0, 1)
        self._waiting: deque[_Request] = deque()
        self._active: list[_Request] = []
        self._cond = threading.Condition()
        self._closed = False
        self.last = SlotStats()
        self._thread = threading.Thread(target=self._loop, name="llama.cpp-slots", daemon=True)
        self._thread.start()

    # --- the consumer side (caller's thread) ---------------------------------------------
    def generate(self, prompt: list[int], chain: LlamaChain, stop_event: threading.Event, max_tokens: int,
                 want_logprobs: int) -> Iterator[Step]:
        """Yield the request's steps: each sampled token with, when `want_logprobs` > 0, its
        raw log-probability and top `want_logprobs` alternatives.

        The engine owns `chain` from here on and frees it when the request ends: the
        consumer may leave while the engine thread is still sampling with it.
        """
        try:
            self._check_prompt(prompt)
        except Exception:
            chain.free(self._lib)
            raise
        req = _Request(list(prompt), chain, stop_event, max(1, max_tokens), want_logprobs)
        with self._cond:
            if self._closed:
                raise ModelNotLoadedError("the model has been unloaded")
            self._waiting.append(req)
            self._cond.notify_all()
        try:
            while True:
                item = req.out.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                if stop_event.is_set() or self._closed:  # nothing decoded ahead is handed out after a stop
                    return
                with self._cond:
                    req.taken += 1
                    req.last_taken = time.monotonic()
                    self._cond.notify_all()
                yield item
        finally:
            with self._cond:
                req.closed = True
                self._cond.notify_all()

    def _check_prompt(self, prompt: list[int]) -> None:
        check_prompt_ids(prompt, self.n_ctx_slot, self.n_vocab)

    # --- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the loop (waiting for the step in flight) and end every request."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        for req in list(self._waiting) + self._active:
            self._finish(req)
        self._waiting.clear()
        self._active.clear()
        self._lib.llama_batch_free(self._batch)

    @property
    def busy_slots(self) -> int:
        return sum(s.busy for s in self.slots)

    # --- the engine thread ---------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._has_work():
                    # With requests waiting for a slot, wake up to look for a stalled one.
                    self._cond.wait(STALL_SECONDS / 4 if self._waiting else None)
                    self._preempt_stalled()
                if self._closed:
                    return
                self._retire()
                self._admit()
                work = [r for r in self._active if self._ready(r)]
            if work:
                self._step(work)

    @staticmethod
    def _ready(req: _Request) -> bool:
        return bool(req.pending) or (req.next_token is not None and req.sampled - req.taken < LOOKAHEAD)

    def _has_work(self) -> bool:
        if any(r.closed or r.stop_event.is_set() for r in self._active):
            return True
        if self._waiting and any(not s.busy for s in self.slots):
            return True
        return any(self._ready(r) for r in self._active)

    def _preempt_stalled(self) -> None:
        """End the longest-stalled request if others wait for a slot and none is free."""
        if not self._waiting or any(not s.busy for s in self.slots):
            return
        now = time.monotonic()
        stalled = [r for r in self._active
                   if r.sampled - r.taken >= LOOKAHEAD and now - max(r.last_taken, r.last_sent) >= STALL_SECONDS]
        if stalled:
            victim = min(stalled, key=lambda r: r.last_taken)
            log.warning("a generation whose reader stopped reading gave its slot to a waiting request")
            self._active.remove(victim)
            self._finish(victim)

    def _retire(self) -> None:
        """Let go of requests whose consumer left or that were cancelled (under the lock)."""
        keep = []
        for req in self._active:
            if req.closed or req.stop_event.is_set():
                self._finish(req)
            else:
                keep.append(req)
        self._active = keep
        gone = [r for r in self._waiting if r.closed or r.stop_event.is_set()]
        for req in gone:
            self._waiting.remove(req)
            self._finish(req)

    def _finish(self, req: _Request) -> None:
        if req.slot is not None:
            req.slot.busy = False
            req.slot.last_used = time.monotonic()
            req.slot = None
        req.next_token = None
        req.pending = []
        if req.chain is not None:
            req.chain.free(self._lib)
            req.chain = None
        req.out.put(_DONE)

    def _admit(self) -> None:
        """Give waiting requests the free slot whose cache keeps most of their prompt."""
        while self._waiting:
            free = [s for s in self.slots if not s.busy]
            if not free:
                return
            req = self._waiting.popleft()
            plans = [(plan_reuse(s.tokens, req.prompt, can_shift=self._can_shift, min_shift=self.min_shift), s)
                     for s in free]
            plan, slot = max(plans, key=lambda ps: (ps[0].reused, -ps[1].last_used))
            plan = self._apply(slot, plan)
            slot.busy = True
            req.slot, req.plan = slot, plan
            slot.tokens = req.prompt[: plan.reused]
            req.pending = req.prompt[plan.reused :]
            self.last = SlotStats(slot.seq_id, plan.reused, plan.shift_len, len(req.pending))
            self._active.append(req)

    def _apply(self, slot: Slot, plan: ReusePlan) -> ReusePlan:
        """Make the cache of `slot` hold `prompt[:plan.reused]`; the plan that was carried out."""
        lib, mem, seq = self._lib, self._memory, slot.seq_id
        n = len(slot.tokens)
        if plan.shift_len:
            end = plan.shift_from + plan.shift_len
            if (lib.llama_memory_seq_rm(mem, seq, end, -1)
                    and lib.llama_memory_seq_rm(mem, seq, plan.keep, plan.shift_from)):
                lib.llama_memory_seq_add(mem, seq, plan.shift_from, end, plan.keep - plan.shift_from)
                return plan
            plan = ReusePlan(0)
        elif plan.keep >= n or lib.llama_memory_seq_rm(mem, seq, plan.keep, -1):
            return plan
        # A cache that cannot drop a part (recurrent models): start the sequence afresh.
        lib.llama_memory_seq_rm(mem, seq, -1, -1)
        return ReusePlan(0)

    def _step(self, work: list[_Request]) -> None:
        """One llama_decode over every request's next token and the next prompt chunks."""
        lib, batch = self._lib, self._batch
        decoding: list[tuple[_Request, int]] = []  # (request, its batch row)
        prompting: list[tuple[_Request, int, int]] = []  # (request, tokens taken, row of the last)
        i = 0
        for req in work:
            if req.next_token is not None:
                slot = req.slot
                assert slot is not None
                self._put(i, req.next_token, len(slot.tokens), slot.seq_id, True)
                decoding.append((req, i))
                i += 1
        for req in work:
            room = self.n_batch - i
            if not req.pending or room <= 0:
                continue
            slot = req.slot
            assert slot is not None
            # The last prompt token goes in a step of its own, as it does when the rest of
            # the prompt was already cached: a repeated request (a regenerate, a cache hit)
            # then computes its first logits exactly as its first run did.
            chunk = req.pending[: min(room, len(req.pending) - 1) or 1]
            ends = len(chunk) == len(req.pending)
            pos = len(slot.tokens)
            for j, token in enumerate(chunk):
                self._put(i + j, token, pos + j, slot.seq_id, ends and j == len(chunk) - 1)
            i += len(chunk)
            prompting.append((req, len(chunk), i - 1))
        batch.n_tokens = i
        code = lib.llama_decode(self._ctx, batch)
        if code != 0:
            failed = [r for r, _ in decoding] + [r for r, _, _ in prompting]
            self._fail(failed, GenerationError(f"llama.cpp failed to decode (llama_decode returned {code})"))
            return
        for req, row in decoding:
            req.slot.tokens.append(req.next_token)  # type: ignore[union-attr]
            req.next_token = None
            self._sample(req, row)
        for req, count, row in prompting:
            req.slot.tokens.extend(req.pending[:count])  # type: ignore[union-attr]
            req.pending = req.pending[count:]
            if not req.pending:
                self._sample(req, row)

    def _put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch = self._batch
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits

    def _sample(self, req: _Request, index: int) -> None:
        lib = self._lib
        chain = req.chain
        assert chain is not None
        token = lib.llama_sampler_sample(chain.pointer, self._ctx, index)
        if chain.guard is not None and chain.guard.rejected is not None:
            self._fail([req], InvalidRequestError(
                "the sampling settings broke the arithmetic (a temperature, penalty or bias at the edge of "
                "32-bit floats made the logits NaN or infinite), so no token the grammar allows could be "
                "picked; use settings in the usual ranges", "grammar_string"), clear=False)
            return
        numbers = token_logprobs(lib, self._ctx, index, self.n_vocab, token, req.want_logprobs) \
            if req.want_logprobs else None
        req.sampled += 1
        req.last_sent = time.monotonic()
        req.out.put(Step(token, numbers))
        slot = req.slot
        assert slot is not None
        full = len(slot.tokens) >= self.n_ctx_slot
        if token in self._eog or req.sampled >= req.max_tokens or full:
            with self._cond:
                if req in self._active:
                    self._active.remove(req)
                self._finish(req)
        else:
            req.next_token = token

    def _fail(self, failed: list[_Request], exc: Exception, clear: bool = True) -> None:
        """Failed requests get the error. After a failed decode (`clear`) their sequences
        are cleared too, since llama.cpp may have written part of the batch."""
        with self._cond:
            for req in failed:
                slot = req.slot
                if slot is not None and clear:
                    self._lib.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
                    slot.tokens = []
                if req in self._active:
                    self._active.remove(req)
                req.out.put(exc)
                self._finish(req)


def token_logprobs(lib: Any, ctx: Any, index: int, n_vocab: int, token: int, top_n: int) -> TokenLogprobs:
    """The raw next-token distribution's log-probability of `token` and its top `top_n`.

    Reads the logits row of batch entry `index` (the sampler chain works on a copy, so these
    are the model's own numbers, before temperature or truncation).
    """
    import numpy as np

    logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, index), shape=(n_vocab,)).astype(np.float64)
    peak = logits.max()
    logprobs = logits - peak - np.log(np.exp(logits - peak).sum())
    top = np.argpartition(-logprobs, top_n - 1)[:top_n] if top_n < n_vocab else np.arange(n_vocab)
    top = top[np.argsort(-logprobs[top])]
    return TokenLogprobs(float(logprobs[token]), tuple((int(t), float(logprobs[t])) for t in top))


def context_params_for_slots(lib: Any, base: Any, *, n_slots: int, n_ctx_slot: int, n_batch: int,
                             unified: bool = False) -> Any:
    """A copy of llama-cpp-python's context params with room for `n_slots` sequences.

    Without a unified cache each sequence gets its own `n_ctx_slot` cells and attends over
    those only, which is what a slot needs (see docs/PERFORMANCE.md for the measurement).
    """
    params = type(base).from_buffer_copy(base)
    params.n_seq_max = n_slots
    params.n_ctx = n_ctx_slot * n_slots
    params.n_batch = n_batch
    params.n_ubatch = n_batch
    params.kv_unified = unified
    return params

