"""The model manager: what is in the models folder, which loader fits, load and unload.

It owns the one loaded model. Generations share it (several at once when the model has
slots); a load or unload waits until none is running and lets no new one start meanwhile,
so it never pulls the weights from under a generation.
A failed load leaves no model loaded and the app serving, with the reason reported.

It also remembers how the last model was loaded: `sleep_if_idle` unloads it when nothing
has used it for a while (--idle-timeout, see modules/engine/idle.py) and the next `require`
or `using` loads it again with the same loader and options (`wake`), so a caller never sees
the difference but the wait.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import loaders
from loaders.base import LoadedModel
from modules.core.errors import (
    BackendMissingError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotLoadedError,
)
from modules.core.paths import atomic_write_text, safe_join
from modules.core.safe_yaml import load_yaml_file
from modules.core.settings import CLI_ONLY, Settings, check_option

log = logging.getLogger(__name__)

_SPLIT_SHARD = "-of-0"  # "model-00002-of-00003.gguf": only the first shard is listed
PER_MODEL_FILE = "config-user.yaml"
"""Loader and options saved per model (the Model tab's Save settings), beside the models."""


@dataclass(frozen=True)
class LoadArgs:
    """How a model was loaded, to load it again the same way (after an idle unload)."""

    name: str
    loader: str | None
    overrides: dict[str, Any]


@dataclass(frozen=True)
class ModelStatus:
    """What the UI shows about the model: one of "loaded", "loading", "idle" (unloaded for
    idleness: the next request reloads it) or "none"; with the model's name where there is one."""

    state: str
    name: str | None

    def text(self) -> str:
        if self.state == "loading":
            return f"Loading {self.name}... (requests wait for it)"
        if self.state == "idle":
            return f"{self.name} was unloaded after --idle-timeout; the next request reloads it."
        if self.state == "loaded":
            return f"{self.name} is loaded."
        return "No model loaded."


@dataclass(frozen=True)
class LoaderStatus:
    name: str
    available: bool
    reason: str | None
    option_names: tuple[str, ...]


@dataclass(frozen=True)
class LoadReport:
    """What the Model tab's status line shows after a load."""

    name: str
    loader: str
    reason: str
    seconds: float
    context_length: int
    ram_bytes: int
    gpu_bytes: int
    chat_template: bool = False

    def summary(self) -> str:
        mem = f"{self.ram_bytes / 2**30:.2f} GiB RAM"
        if self.gpu_bytes:
            mem += f", {self.gpu_bytes / 2**30:.2f} GiB VRAM"
        template = "its own chat template" if self.chat_template else "no chat template of its own"
        return (f"Loaded {self.name} with {self.loader} in {self.seconds:.1f} s; "
                f"context {self.context_length} tokens; {mem}; {template}.")


class ModelManager:
    """Lists, loads and unloads models from one folder; holds the loaded model."""

    def __init__(self, settings: Settings, models_dir: Path) -> None:
        self.settings = settings
        self.models_dir = models_dir
        self._lock = threading.RLock()
        # Generations hold the model shared (`using`); load and unload hold it alone.
        self._idle = threading.Condition(self._lock)
        self._users = 0
        self._exclusive_waiting = 0
        self._model: LoadedModel | None = None
        self._name: str | None = None
        self.report: LoadReport | None = None
        self.loading: str | None = None
        """The model being loaded right now (what /health answers 503 for), else None."""
        self.external: dict[str, Path] = {}
        """Models outside the folder, by name: paths given on the command line (trusted as the
        user's own; see modules/engine/model_paths.py). Never filled from a request."""
        self.clock: Callable[[], float] = time.monotonic
        """The idle timer's clock (tests put a fake one here)."""
        self.last_active = self.clock()
        """When a generation last started or ended, or a request last asked for the model."""
        self._last_load: LoadArgs | None = None
        self._asleep = False
        """The last model was unloaded for idleness: the next `require` loads it again."""
        # Serialises the read-modify-write of config-user.yaml: two saves at once (two
        # browser tabs, the UI and the API) would otherwise each write back what they read
        # and one of them would be lost.
        self._settings_lock = threading.Lock()

    # --- discovery -------------------------------------------------------------------
    def list_models(self) -> list[str]:
        """Model names: .gguf files, and folders holding weights, relative to the folder."""
        names: list[str] = list(self.external)
        if not self.models_dir.is_dir():
            return names
        for entry in sorted(self.models_dir.iterdir(), key=lambda p: p.name.lower()):
            if entry.name.startswith("."):
                continue
            if entry.is_file() and entry.suffix.lower() == ".gguf" and not _is_later_shard(entry.name):
                names.append(entry.name)
            elif entry.is_dir():
                names.extend(self._folder_models(entry))
        return names

    def _folder_models(self, folder: Path) -> list[str]:
        files = [p for p in folder.iterdir() if p.is_file()]
        if (folder / "config.json").is_file():
            return [folder.name]
        ggufs = sorted(p.name for p in files if p.suffix.lower() == ".gguf" and not _is_later_shard(p.name))
        if len(ggufs) == 1:
            return [folder.name]
        return [f"{folder.name}/{g}" for g in ggufs]

    def path_of(self, name: str) -> Path:
        if name in self.external:
            return self.external[name]
        path = safe_join(self.models_dir, name, subfolders=True, what="model")
        if not path.exists():
            raise ModelNotFoundError(f"no model named {name!r} in {self.models_dir}", "model")
        return path

    def infer(self, name: str) -> loaders.LoaderChoice:
        return loaders.infer_loader(self.path_of(name), installed=self._installed)

    def loader_statuses(self) -> list[LoaderStatus]:
        out = []
        for lname in loaders.loader_names():
            cls = loaders.get_loader(lname)
            reason = cls.unavailable_reason()
            fields = tuple(f.name for f in dataclasses.fields(cls.options_class))
            out.append(LoaderStatus(lname, reason is None, reason, fields))
        return out

    @staticmethod
    def _installed(name: str) -> bool:
        try:
            return loaders.get_loader(name).unavailable_reason() is None
        except ModelLoadError:
            return False

    # --- per-model settings -------------------------------------------------------------
    def saved_settings(self, name: str) -> dict[str, Any]:
        """What Save settings stored for `name`: {"loader": ..., option: value, ...}, or {}."""
        self.path_of(name)
        return dict(self._read_per_model().get(name) or {})

    def save_settings(self, name: str, loader: str | None, options: dict[str, Any]) -> Path:
        """Remember `loader` (None = automatic) and `options` for `name`, atomically."""
        import yaml

        self.path_of(name)
        if loader is not None:
            loaders.get_loader(loader)
        path = self.models_dir / PER_MODEL_FILE
        with self._settings_lock:
            data = self._read_per_model()
            data[name] = {**({"loader": loader} if loader else {}), **_checked(options)}
            atomic_write_text(path, yaml.safe_dump(data, sort_keys=True, allow_unicode=True))
        return path

    def _read_per_model(self) -> dict[str, Any]:
        import yaml

        path = self.models_dir / PER_MODEL_FILE
        if not path.is_file():
            return {}
        try:
            data = load_yaml_file(path, PER_MODEL_FILE, "model") or {}
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidRequestError(f"{PER_MODEL_FILE} cannot be read: {exc}", "model") from None
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise InvalidRequestError(f"{PER_MODEL_FILE} must map model names to their settings", "model")
        return data

    # --- load / unload ---------------------------------------------------------------
    def load(self, name: str, loader: str | None = None, overrides: dict[str, Any] | None = None) -> LoadReport:
        """Unload the current model, then load `name`.

        The loader is `loader`, else the one saved for this model, else the inferred one.
        Options are the settings, then what was saved for this model, then `overrides`.
        """
        path = self.path_of(name)
        saved = self.saved_settings(name)
        explicit = loader is not None
        loader = loader or saved.pop("loader", None)
        saved.pop("loader", None)
        choice = loaders.infer_loader(path, installed=self._installed) if loader is None else None
        lname = loader or choice.loader  # type: ignore[union-attr]
        reason = choice.reason if choice else ("chosen by the user" if explicit else "saved for this model")
        cls = loaders.get_loader(lname)
        missing = cls.unavailable_reason()
        if missing:
            raise BackendMissingError(missing)
        known = {f.name for f in dataclasses.fields(cls.options_class)}
        options = self._options_for(cls, {**self._checked_saved(name, saved, known), **_checked(overrides or {})})
        with self._exclusive():
            self.unload()
            ram0, gpu0 = _ram_bytes(), _gpu_bytes()
            start = time.perf_counter()
            self.loading = name
            try:
                model = cls.load(path, options)
            finally:
                self.loading = None
            seconds = time.perf_counter() - start
            self._model, self._name = model, name
            self._last_load = LoadArgs(name, None if not explicit else lname, dict(overrides or {}))
            self.last_active = self.clock()
            self.report = LoadReport(
                name=name, loader=lname, reason=reason, seconds=seconds,
                context_length=model.info.context_length,
                ram_bytes=max(0, _ram_bytes() - ram0), gpu_bytes=max(0, _gpu_bytes() - gpu0),
                chat_template=bool(model.info.chat_template),
            )
        log.info(self.report.summary())
        return self.report

    @staticmethod
    def _checked_saved(name: str, saved: dict[str, Any], known: set[str]) -> dict[str, Any]:
        """The saved options this loader takes, each checked; exposure switches found in the
        file are ignored (with a warning), never applied."""
        out = {}
        for key, value in saved.items():
            if key not in known:
                continue
            if key in CLI_ONLY:
                if value:  # older versions saved the switch off with every model: nothing to say then
                    log.warning("%s: ignoring %s saved for %s (command line or CMD_FLAGS.txt only)",
                                PER_MODEL_FILE, key, name)
                continue
            out[key] = check_option(key, value)
        return out

    def _options_for(self, cls: type, overrides: dict[str, Any]) -> Any:
        names = {f.name for f in dataclasses.fields(cls.options_class)}
        unknown = set(overrides) - names
        if unknown:
            raise InvalidRequestError(
                f"{cls.name} has no option {', '.join(sorted(unknown))}; its options: {', '.join(sorted(names))}",
                "options",
            )
        values = {n: getattr(self.settings, n) for n in names if hasattr(self.settings, n)}
        values.update(overrides)
        return cls.options_class(**values)

    def unload(self) -> None:
        """Unload the model (waiting for running generations); it stays unloaded."""
        with self._exclusive():
            self._asleep = False
            self._drop()

    def _drop(self) -> None:
        model, self._model, self._name, self.report = self._model, None, None, None
        if model is not None:
            model.unload()

    # --- idle unload ------------------------------------------------------------------
    def touch(self) -> None:
        """Count as activity now (a request asked for the model): restarts the idle timer."""
        self.last_active = self.clock()

    def sleep_if_idle(self, idle_s: float, busy: Callable[[], bool] = lambda: False) -> bool:
        """Unload the model if nothing used it for `idle_s` seconds and nothing runs or waits
        (`busy`: requests queued elsewhere); the next `require` reloads it. True if it did.

        Checked under the lock with no generation running, so none can start meanwhile: a
        stream in progress is never cut."""
        with self._lock:
            if (self._model is None or self._users or self._exclusive_waiting or busy()
                    or self.clock() - self.last_active < idle_s):
                return False
            name = self._name
            self._drop()
            self._asleep = self._last_load is not None
        log.info("unloaded %s after %.1f minutes without requests (the next request reloads it)", name, idle_s / 60)
        return True

    @property
    def asleep(self) -> str | None:
        """The model unloaded for idleness, which the next request reloads; else None."""
        last = self._last_load
        return last.name if self._asleep and last is not None else None

    def wake(self) -> LoadedModel | None:
        """Reload the model unloaded for idleness, with the loader and options it had; the
        loaded model when there is one; None when there is nothing to reload."""
        with self._lock:
            last = self._last_load
            if self._model is None and self._asleep and last is not None:
                log.info("reloading %s (unloaded while idle)", last.name)
                self.load(last.name, last.loader, last.overrides)
            return self._model

    def last_loaded(self) -> LoadArgs | None:
        """How the last model was loaded (None before any load)."""
        return self._last_load

    def status(self) -> ModelStatus:
        loading, name, asleep = self.loading, self._name, self.asleep
        if loading:
            return ModelStatus("loading", loading)
        if name:
            return ModelStatus("loaded", name)
        if asleep:
            return ModelStatus("idle", asleep)
        return ModelStatus("none", None)

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the model alone: wait for running generations, keep new ones out."""
        with self._lock:
            self._exclusive_waiting += 1
            try:
                while self._users:
                    self._idle.wait()
            finally:
                self._exclusive_waiting -= 1
            try:
                yield
            finally:
                self._idle.notify_all()

    # --- the loaded model --------------------------------------------------------------
    @property
    def name(self) -> str | None:
        return self._name

    @property
    def current(self) -> LoadedModel | None:
        return self._model

    @property
    def users(self) -> int:
        """Generations running on the model now."""
        return self._users

    def require(self) -> LoadedModel:
        """The loaded model; one being loaded is waited for, one unloaded for idleness is
        loaded again (`wake`). Raises ModelNotLoadedError when there is none."""
        model = self._model
        if model is None and (self.loading or self._asleep):
            with self._lock:  # a load holds the lock: this waits for it to end
                model = self._model or self.wake()
        if model is None:
            raise ModelNotLoadedError("no model is loaded: pick one in the Model tab or start with --model NAME")
        return model

    @contextmanager
    def using(self) -> Iterator[LoadedModel]:
        """Hold the loaded model for a generation (shared with other generations); loads
        and unloads wait meanwhile."""
        with self._lock:
            while self._exclusive_waiting:
                self._idle.wait()
            model = self.require()
            self._users += 1
            self.last_active = self.clock()
        try:
            yield model
        finally:
            with self._lock:
                self._users -= 1
                self.last_active = self.clock()
                self._idle.notify_all()


def _checked(overrides: dict[str, Any]) -> dict[str, Any]:
    """Options from the Model tab or an API request, each type- and bounds-checked (4xx naming
    the field); the exposure switches are refused."""
    return {key: check_option(key, value) for key, value in overrides.items()}


def _is_later_shard(name: str) -> bool:
    return _SPLIT_SHARD in name and "-00001-of-" not in name


def _ram_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - psutil is in requirements.txt
        return 0


def _gpu_bytes() -> int:
    torch = sys.modules.get("torch")  # never import torch just to ask
    if torch is not None and torch.cuda.is_available():
        return int(torch.cuda.memory_allocated())
    return 0
