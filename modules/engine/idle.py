"""The idle timer (--idle-timeout MIN): unload the model when nothing has used it for a while.

One thread, owned by the App, started with it and stopped by `App.close()`. Each tick asks
the model manager to unload if idle (`ModelManager.sleep_if_idle`), which decides under its
own lock: a generation running, a request holding or waiting for a model, or one queued in
the generator all count as activity, so a stream in progress is never cut. The next request
reloads the model with the same loader and options (`ModelManager.wake`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from modules.engine.model_manager import ModelManager

log = logging.getLogger(__name__)

MIN_TICK_S, MAX_TICK_S = 0.05, 5.0
"""How often the timer looks: a tenth of the timeout, within these bounds (an unload is at
most a tick late; a long timeout costs one wake-up every few seconds)."""


class IdleWatcher:
    """Unloads `models`' model after `timeout_min()` minutes without activity (0: never).

    `timeout_min` is read at every tick, so a changed setting applies at once; `busy` says
    whether requests wait elsewhere (the generator's queue, the model switcher)."""

    def __init__(self, models: ModelManager, timeout_min: Callable[[], float],
                 busy: Callable[[], bool] = lambda: False) -> None:
        self.models = models
        self.timeout_min = timeout_min
        self.busy = busy
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """One tick: unload if idle long enough. True when it unloaded the model."""
        minutes = self.timeout_min()
        if minutes <= 0:
            return False
        return self.models.sleep_if_idle(minutes * 60, self.busy)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="idle-timer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        self._stop.set()
        if thread is not None:
            thread.join(timeout=5)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _tick_s(self) -> float:
        minutes = self.timeout_min()
        return MAX_TICK_S if minutes <= 0 else min(MAX_TICK_S, max(MIN_TICK_S, minutes * 60 / 10))

    def _watch(self) -> None:
        while not self._stop.wait(self._tick_s()):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - an unload that failed must not stop the timer
                log.exception("the idle unload failed")
