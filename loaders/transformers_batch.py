"""Continuous batching for the Transformers loader: many generate() calls, one forward per step.

Why our own scheduler rather than transformers' continuous batching (`generate_batch`,
`init_continuous_batching`, ContinuousBatchingManager over a paged cache): in 5.23 it runs
on CPU and its greedy tokens are right, but its sampling is one configuration for the whole
batch. Per request it carries only temperature, top_k and top_p; `do_sample` and the seed
are global (one `torch.multinomial` over all rows); a logits processor sees only each row's
last token, not its history, so repetition/presence/frequency penalties, DRY, XTC,
mirostat, logit bias, token bans, per-request seeds and top-N logprobs cannot be carried.
It also took 10-25 s of set-up for 3 x 16 tokens of the tiny kit model on 2 cores. Our
samplers (loaders/torch_samplers.py) need each request's own history and generator, so
this module batches the forward pass only and samples every row with its own chain.

One scheduler thread per loaded model. Each step it:
1. drops the rows whose stop event is set or whose consumer closed its iterator;
2. evaluates one prompt chunk of one waiting request, alone (round robin over the waiting
   ones): a long prompt holds the running rows up by one chunk per step, never for its
   whole length. When its prompt is done its first token is sampled and its cache joins
   the batch, the shorter side left-padded to the common length;
3. runs one batched decode forward for every running row (the padding masked out, each row
   with its own position ids) and samples each row's next token with its own SamplerChain.
Each step (token and, when asked for, its logprobs) goes to its request's queue; `stream()`
yields it in the consuming thread. A
failing forward is raised in every consumer whose row it held; the others carry on.

torch is imported inside functions only.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loaders.base import Step
from loaders.torch_samplers import SamplerChain, raw_logprobs, token_logprobs
from modules.core.errors import GenerationError, ModelNotLoadedError

if TYPE_CHECKING:
    import torch

    from loaders.grammar_mask import ConstrainedChain

log = logging.getLogger(__name__)

#: Prompt tokens per forward while other rows are decoding: they wait for one chunk per step.
SHARED_PREFILL_CHUNK = 128
#: How often a waiting consumer checks that the scheduler thread is still alive (seconds).
_POLL_SECONDS = 0.5
_END = object()

Forward = Callable[..., "tuple[torch.Tensor, Any]"]
"""forward(ids [B, T], cache, mask [B, past + T] | None, positions [B, T] | None) ->
(float32 logits of each row's last position [B, V], the grown cache)."""


@dataclass(eq=False)
class BatchRequest:
    """One generate() call: its prompt, samplers and the queue its tokens go to."""

    history: torch.Tensor
    """Context-sized 1-D long tensor: prompt, then the sampled tokens."""
    count: int
    """Tokens in `history` so far (the prompt length until the first token)."""
    chain: SamplerChain | ConstrainedChain
    """Its own samplers (and grammar): one per request, each row sampled with its own."""
    stop_event: threading.Event
    logprobs: int = 0
    """Top-N log-probabilities wanted with each token (0: none)."""
    prompt_length: int = 0
    done: int = 0
    """Prompt tokens evaluated so far."""
    cache: Any = None
    """Its own KV cache while its prompt is evaluated; then it lives in the batch."""
    out: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    closed: bool = False
    """Set by the consumer when it stops reading (iterator closed)."""

    def __post_init__(self) -> None:
        self.prompt_length = self.count


class BatchScheduler:
    """Serves concurrent generations of one model with batched decode steps (see module doc).

    `forward` runs the model (see `Forward`); `valid_vocab` is how many logits are real
    tokens; `context` the context length; `max_rows` how many requests are evaluated at
    once (more wait, in arrival order, for a row to free). `stream` serves one request;
    `close` ends the thread, and every request still open gets ModelNotLoadedError.
    """

    def __init__(self, forward: Forward, *, context: int, valid_vocab: int, prefill_chunk: int,
                 max_rows: int, name: str = "model") -> None:
        self._forward = forward
        self._max_rows = max_rows
        self._context = context
        self._valid_vocab = valid_vocab
        self._prefill_chunk = prefill_chunk
        self._name = name
        self._cond = threading.Condition()
        self._incoming: list[BatchRequest] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self.peak_rows = 0
        """The most rows one decode step has held (a figure for tests and benchmarks)."""
        # Owned by the scheduler thread only:
        self._waiting: list[BatchRequest] = []
        self._rows: list[BatchRequest] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None

    # --- the consumer's side -------------------------------------------------------------
    def stream(self, request: BatchRequest) -> Iterator[Step]:
        """Queue `request` and yield its steps (token, logprobs when asked) as the scheduler samples them.

        Returns when the request ends (full context) or as soon as its stop event is set,
        even with tokens the scheduler sampled ahead still queued; raises what failed its
        row. Closing the iterator drops the row at the next step.
        """
        self._submit(request)
        try:
            while not request.stop_event.is_set():
                try:
                    item = request.out.get(timeout=_POLL_SECONDS)
                except queue.Empty:
                    if not self._alive():
                        raise GenerationError("the batch scheduler stopped unexpectedly") from None
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.closed = True

    def _submit(self, request: BatchRequest) -> None:
        with self._cond:
            if self._closing:
                raise ModelNotLoadedError(f"{self._name} has been unloaded")
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=f"batch-{self._name}", daemon=True)
                self._thread.start()
            self._incoming.append(request)
            self._cond.notify()

    def _alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread after its current step; open requests get ModelNotLoadedError."""
        with self._cond:
            self._closing = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # --- the scheduler thread ------------------------------------------------------------
    def _serve(self) -> None:
        import torch

        while True:
            with self._cond:
                while not (self._incoming or self._waiting or self._rows or self._closing):
                    self._cond.wait()
                if self._closing:
                    break
                room = max(0, self._max_rows - len(self._waiting) - len(self._rows))
                self._waiting.extend(self._incoming[:room])
                del self._incoming[:room]
            try:
                with torch.inference_mode():
                    self._step()
            except BaseException as exc:  # noqa: BLE001 - a bug here must reach every consumer
                log.exception("the batch scheduler failed")
                self._fail(self._waiting + self._rows, exc)
                self._waiting, self._rows, self._cache, self._mask = [], [], None, None
        with self._cond:
            everyone = self._incoming + self._waiting + self._rows
            self._incoming.clear()
        self._fail(everyone, ModelNotLoadedError(f"{self._name} has been unloaded"))
        self._waiting, self._rows, self._cache, self._mask = [], [], None, None

    def _step(self) -> None:
        self._drop_stopped()
        if self._waiting:
            self._prefill_next()
        if self._rows:
            self._decode()

    def _drop_stopped(self) -> None:
        for request in [r for r in self._waiting if r.closed or r.stop_event.is_set()]:
            self._waiting.remove(request)
            request.out.put(_END)
        stopped = [i for i, r in enumerate(self._rows) if r.closed or r.stop_event.is_set()]
        for i in stopped:
            self._rows[i].out.put(_END)
        self._remove_rows(stopped)

    def _prefill_next(self) -> None:
        """One prompt chunk of the first waiting request, which then goes to the back."""
        request = self._waiting.pop(0)
        chunk = SHARED_PREFILL_CHUNK if self._rows else self._prefill_chunk
        end = min(request.done + chunk, request.prompt_length)
        try:
            logits, request.cache = self._forward(request.history[request.done : end].unsqueeze(0),
                                                  request.cache, None, None)
        except Exception as exc:  # noqa: BLE001 - raised in this request's consumer
            self._fail([request], exc)
            return
        request.done = end
        if end < request.prompt_length:
            self._waiting.append(request)
            return
        if self._sample(request, logits[0]) and request.count < self._context:
            self._join(request)
        elif request.count >= self._context:
            request.out.put(_END)

    def _decode(self) -> None:
        """One batched forward over every running row; each samples its next token."""
        import torch

        rows = self._rows
        assert self._mask is not None
        self.peak_rows = max(self.peak_rows, len(rows))
        ids = torch.stack([r.history[r.count - 1 : r.count] for r in rows])
        positions = torch.tensor([[r.count - 1] for r in rows], device=ids.device)
        mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        try:
            logits, self._cache = self._forward(ids, self._cache, mask, positions)
        except Exception as exc:  # noqa: BLE001 - raised in every consumer of the batch
            self._fail(rows, exc)
            self._rows, self._cache, self._mask = [], None, None
            return
        self._mask = mask
        finished = []
        for i, request in enumerate(rows):
            if not self._sample(request, logits[i]):
                finished.append(i)
            elif request.count >= self._context:
                request.out.put(_END)
                finished.append(i)
        self._remove_rows(finished)

    def _sample(self, request: BatchRequest, logits: torch.Tensor) -> bool:
        """Sample `request`'s next token from its row's logits and hand it over; False if it
        failed or its grammar ended the reply (the row is then done)."""
        try:
            want = request.logprobs
            raw = raw_logprobs(logits, self._valid_vocab) if want else None
            token = request.chain.sample(logits, request.history[: request.count])
            numbers = token_logprobs(raw, token, want) if raw is not None else None
        except Exception as exc:  # noqa: BLE001 - raised in this request's consumer
            self._fail([request], exc)
            return False
        request.history[request.count] = token
        request.count += 1
        request.out.put(Step(token, numbers))
        if request.chain.done:
            request.out.put(_END)
            return False
        return True

    # --- the batched cache ---------------------------------------------------------------
    def _join(self, request: BatchRequest) -> None:
        """Add `request`'s cache as a row of the batch, left-padding the shorter side."""
        import torch
        from torch.nn.functional import pad

        length = request.prompt_length
        own_mask = request.history.new_ones(1, length)
        cache, request.cache = request.cache, None
        if not self._rows:
            self._rows, self._cache, self._mask = [request], cache, own_mask
            return
        assert self._mask is not None
        width = max(self._mask.shape[1], length)
        grow_batch, grow_row = width - self._mask.shape[1], width - length
        for batch_layer, row_layer in zip(self._cache.layers, cache.layers, strict=True):
            if not getattr(batch_layer, "is_initialized", True):
                continue
            for name in ("keys", "values"):
                both = [pad(getattr(batch_layer, name), (0, 0, grow_batch, 0)),
                        pad(getattr(row_layer, name), (0, 0, grow_row, 0))]
                setattr(batch_layer, name, torch.cat(both, dim=0))
        self._mask = torch.cat([pad(self._mask, (grow_batch, 0)), pad(own_mask, (grow_row, 0))], dim=0)
        self._rows.append(request)

    def _remove_rows(self, indices: list[int]) -> None:
        """Drop these rows, then the leading columns that are padding in every row left."""
        import torch

        if not indices:
            return
        gone = set(indices)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        assert self._mask is not None
        index = torch.tensor(keep, device=self._mask.device)
        self._rows = [self._rows[i] for i in keep]
        self._mask = self._mask.index_select(0, index)
        start = int(self._mask.any(dim=0).nonzero()[0])
        self._mask = self._mask[:, start:]
        for layer in self._cache.layers:
            if getattr(layer, "is_initialized", True):
                layer.keys = layer.keys.index_select(0, index)[:, :, start:]
                layer.values = layer.values.index_select(0, index)[:, :, start:]

    @staticmethod
    def _fail(requests: list[BatchRequest], exc: BaseException) -> None:
        """Raise `exc` in each consumer (a copy each: one object raised in several threads
        would pile their tracebacks onto each other)."""
        for request in requests:
            try:
                mine = copy.copy(exc)
                mine.__cause__ = exc.__cause__
            except Exception:  # noqa: BLE001 - an exception that cannot be copied is shared
                mine = exc
            request.out.put(mine)
