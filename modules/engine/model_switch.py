"""Models on demand: a request names a model, and it runs on that model.

`ModelSwitcher.acquire(name)` is the one entry point every face calls before it builds a
request (the OpenAI routes today; the Ollama and Anthropic dialects the same way). It
returns a `ModelLease` once the model it names is loaded, and the model stays loaded until
the lease is released (after the request's generation ends):

- a name matching an available model (exactly, then ignoring case or a `.gguf` suffix)
  loads it if another is loaded, with its saved per-model settings; the switch waits for
  the leases on the old model, so a running stream always finishes on it;
- requests wait in arrival order: those behind a switch get the new model, and a request
  for the old model that comes after one for the new waits for its turn rather than cut in
  (no starvation, and two requests naming two models make two loads, never a loop);
- a name matching nothing (clients send "gpt-4o") uses the loaded model, or the one the
  requests ahead will have loaded; with `--strict-model-names` it is a ModelNotFoundError
  (an OpenAI-style 404, code model_not_found);
- with `--no-model-switching` the loaded model answers everything; a model is loaded by
  name only when none is loaded (there is nothing to switch from);
- a model unloaded for idleness is loaded again, the way it was loaded, by the next request.

Waiting requests are bounded by --max-queue (QueueFullError beyond it), like the
generator's own queue. Loading happens in the requesting thread, outside the switcher's
lock, so the model list, token counts and stops keep answering while a model loads.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import deque
from dataclasses import dataclass

from modules.core.errors import ModelNotFoundError, QueueFullError
from modules.engine.model_manager import ModelManager

log = logging.getLogger(__name__)


class ModelNotFoundByNameError(ModelNotFoundError):
    """A request named a model that is not available, under --strict-model-names."""


@dataclass(eq=False)
class _Ticket:
    target: str
    error: BaseException | None = None


class ModelLease:
    """A request's hold on the model it runs on (`name`; None when no model is loaded and
    none was named: the request will be refused as before). Release it when the request's
    generations have ended; releasing twice is harmless, and a lease dropped unreleased (a
    response never sent) releases itself when collected. Usable as a context manager."""

    def __init__(self, name: str | None, switcher: ModelSwitcher | None = None) -> None:
        self.name = name
        self._release = weakref.finalize(self, switcher._release) if switcher is not None else None

    def release(self) -> None:
        if self._release is not None:
            self._release()  # a finalizer runs once, however often it is called

    def __enter__(self) -> ModelLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"ModelLease({self.name!r})"


class ModelSwitcher:
    """Loads the model a request names, in arrival order, never under a running request."""

    def __init__(self, models: ModelManager) -> None:
        self.models = models
        self._cond = threading.Condition()
        self._queue: deque[_Ticket] = deque()
        self._pins = 0
        """Leases held on the loaded model: a switch waits until there are none."""
        self._switching = False

    # --- names ---------------------------------------------------------------------------
    def resolve(self, requested: str | None) -> str | None:
        """The available model `requested` names, or None when it names none (or is empty).

        Matched exactly, then ignoring case, then without a `.gguf` suffix; an ambiguous
        loose match is no match. The loaded model always matches its own name."""
        if not requested:
            return None
        if requested in (self.models.name, self.models.asleep):
            return requested
        names = self.models.list_models()
        if requested in names:
            return requested
        wanted = _loose(requested)
        found = [n for n in names if _loose(n) == wanted]
        return found[0] if len(found) == 1 else None

    def _target(self, requested: str | None) -> str | None:
        """The model a request will run on (None: no model, and none to load)."""
        settings = self.models.settings
        named = self.resolve(requested)
        if requested and named is None and settings.strict_model_names:
            raise ModelNotFoundByNameError(
                f"the model {requested!r} does not exist; available: {', '.join(self.models.list_models()) or 'none'}",
                "model")
        current = self.models.loading or self.models.name or self.models.asleep
        if settings.no_model_switching and current:
            return current
        if named:
            return named
        # Unnamed: whatever the requests ahead will have loaded, else what is loaded now.
        return self._queue[-1].target if self._queue else current

    # --- leases ----------------------------------------------------------------------------
    def acquire(self, requested: str | None) -> ModelLease:
        """Wait until the model `requested` names (see the module doc) is loaded, loading it
        when this request's turn comes; return a lease that keeps it loaded.

        Raises ModelNotFoundError under --strict-model-names, QueueFullError when --max-queue
        requests already wait, and the load's own error when the model fails to load (every
        request waiting for that model gets it)."""
        self.models.touch()
        with self._cond:
            target = self._target(requested)
            if target is None:
                return ModelLease(None)
            limit = self.models.settings.max_queue
            if len(self._queue) >= max(1, limit):
                raise QueueFullError(f"the server is busy: {len(self._queue)} requests already wait for a model "
                                     f"to load (--max-queue {limit}); try again in a few seconds", retry_after=5)
            ticket = _Ticket(target)
            self._queue.append(ticket)
            try:
                self._wait_turn(ticket)
                self._pins += 1
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()
        self.models.touch()
        return ModelLease(target, self)

    def _wait_turn(self, ticket: _Ticket) -> None:
        """Under the lock: return when `ticket`'s model is loaded and its turn has come,
        loading it here if this ticket is first to need it."""
        while True:
            if ticket.error is not None:
                raise ticket.error
            if self._at_front(ticket) and not self._switching:
                if self.models.name == ticket.target:
                    return
                if self._pins == 0:
                    self._switch(ticket)
                    continue
            self._cond.wait()

    def _at_front(self, ticket: _Ticket) -> bool:
        """Every ticket ahead of this one wants the same model (they go together)."""
        for other in self._queue:
            if other is ticket:
                return True
            if other.target != ticket.target:
                return False
        return False

    def _switch(self, ticket: _Ticket) -> None:
        """Load `ticket.target` (the lock is let go meanwhile, `_switching` keeps others out)."""
        target, previous = ticket.target, self.models.name
        last = self.models.last_loaded()
        self._switching = True
        self._cond.release()
        error: BaseException | None = None
        try:
            log.info("switching model: %s -> %s (asked for by a request)", previous or "none", target)
            if last is not None and last.name == target:  # the way it was loaded before (idle reload)
                self.models.load(target, last.loader, last.overrides)
            else:
                self.models.load(target)
        except BaseException as exc:  # noqa: BLE001 - handed to every request waiting for this model
            error = exc
        finally:
            self._cond.acquire()
            self._switching = False
            self._cond.notify_all()
        if error is not None:
            for other in self._queue:
                if other.target == target:
                    other.error = error

    def _release(self) -> None:
        with self._cond:
            self._pins -= 1
            self._cond.notify_all()
        self.models.touch()

    @property
    def busy(self) -> bool:
        """Requests hold or wait for a model (the idle timer must not unload it)."""
        return bool(self._pins or self._queue or self._switching)


def _loose(name: str) -> str:
    name = name.strip().lower()
    return name[: -len(".gguf")] if name.endswith(".gguf") else name
