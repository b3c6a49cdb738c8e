"""The App: the one object that owns the engine's parts, built once in server.py."""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from modules.chat.characters import CharacterStore, PersonaStore
from modules.chat.history import HistoryStore
from modules.chat.service import ChatService
from modules.chat.templates import TemplateRenderer, TemplateStore
from modules.core.errors import InvalidRequestError
from modules.core.paths import atomic_write_text
from modules.core.settings import CLI_ONLY, Settings, resolve_path
from modules.engine.embeddings import Embedder
from modules.engine.extensions import ExtensionRegistry
from modules.engine.generation import Generator
from modules.engine.idle import IdleWatcher
from modules.engine.model_manager import ModelManager
from modules.engine.model_paths import register_cli_model
from modules.engine.model_switch import ModelLease, ModelSwitcher

log = logging.getLogger(__name__)


@dataclass
class App:
    """Settings, the model manager, the generator and the chat parts; passed to the UI and the API.

    User data lives under `root`: characters/, personas/, instruction-templates/,
    logs/chat/ and models/config.yaml (model-name patterns for templates).
    """

    root: Path
    settings: Settings
    models: ModelManager
    generator: Generator
    characters: CharacterStore
    personas: PersonaStore
    templates: TemplateStore
    history: HistoryStore
    chat: ChatService
    extensions: ExtensionRegistry
    switcher: ModelSwitcher
    """Loads the model a request names (models on demand); see `model_for`."""
    idle: IdleWatcher
    """The --idle-timeout thread (running only while the timeout is set)."""
    embedder: Embedder = dataclasses.field(default_factory=Embedder)
    """Sentence embeddings (loaded on first use) for /v1/embeddings and the extensions."""
    restart_requested: threading.Event = dataclasses.field(default_factory=threading.Event)
    """Set by the Session tab's Restart button; server.py rebuilds the UI (the model stays loaded)."""
    _save_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @classmethod
    def create(cls, settings: Settings, root: Path) -> App:
        models = ModelManager(settings, resolve_path(root, settings.models_dir))
        extensions = ExtensionRegistry(root / "extensions", settings.extension_params)
        generator = Generator(models, extensions, max_queue=settings.max_queue)
        renderer = TemplateRenderer()
        templates = TemplateStore(root / "instruction-templates", renderer)
        history = HistoryStore(root / "logs" / "chat")
        characters, personas = CharacterStore(root / "characters"), PersonaStore(root / "personas")
        chat = ChatService(generator, models, renderer, save=history.save, templates=templates,
                           patterns_file=root / "models" / "config.yaml", extensions=extensions,
                           characters=characters, personas=personas)
        switcher = ModelSwitcher(models)
        idle = IdleWatcher(models, lambda: models.settings.idle_timeout,
                           busy=lambda: switcher.busy or generator.waiting > 0)
        app = cls(root=root, settings=settings, models=models, generator=generator,
                  characters=characters, personas=personas,
                  templates=templates, history=history, chat=chat, extensions=extensions,
                  switcher=switcher, idle=idle)
        if settings.idle_timeout > 0:
            idle.start()
        extensions.context = app  # setup(app) may keep it, e.g. to generate through app.generator
        extensions.enable(settings.extensions)  # a broken one is logged and skipped: the app always starts
        return app

    @property
    def settings_path(self) -> Path:
        return resolve_path(self.root, self.settings.settings)

    def update_settings(self, **changes: object) -> Settings:
        """Replace some settings (validated again) for everything that reads them from now on.

        The exposure switches (CLI_ONLY: --listen, CORS, remote code, pickles) cannot be changed
        here: only the command line sets them."""
        for name, value in changes.items():
            if name in CLI_ONLY and value != getattr(self.settings, name):
                raise InvalidRequestError(f"{name} can only be set on the command line or in CMD_FLAGS.txt", name)
        self.settings = dataclasses.replace(self.settings, **changes)  # type: ignore[arg-type]
        self.models.settings = self.settings
        self.generator.max_queue = self.settings.max_queue
        if self.settings.idle_timeout > 0:
            self.idle.start()  # reads the timeout at every tick; a no-op when already running
        return self.settings

    def model_for(self, requested: str | None) -> ModelLease:
        """The one entry point of models on demand, for every API dialect: wait until the model
        `requested` names is loaded (switching, loading or reloading it after an idle unload,
        in arrival order) and hold it; release the lease when the request's generations end.
        See modules/engine/model_switch.py for how names match and what the flags change."""
        return self.switcher.acquire(requested)

    def set_extensions(self, names: list[str]) -> list[str]:
        """Enable `names` (in this order) from now on; returns those that loaded. Their ui() appears
        after a Restart of the UI; their hooks apply to the next generation."""
        loaded = self.extensions.enable(names)
        self.update_settings(extensions=list(names))
        return loaded

    def save_settings(self) -> Path:
        """Write the persisted settings (with the extensions' current params) to the settings file, atomically."""
        import yaml

        with self._save_lock:  # two browser tabs saving at once write one after the other
            self.update_settings(extension_params=self.extensions.params_snapshot())
            path = self.settings_path
            atomic_write_text(path, yaml.safe_dump(self.settings.persisted(), sort_keys=False, allow_unicode=True))
        return path

    def load_startup_model(self) -> str | None:
        """Load `--model` if given; a failure is reported, never fatal. Returns the error text."""
        if not self.settings.model:
            return None
        try:  # the command line may name a path anywhere (trusted: the user's own)
            self.models.load(register_cli_model(self.models, self.settings.model), loader=self.settings.loader)
        except Exception as exc:  # noqa: BLE001 - the app must start whatever the model does
            log.error("could not load %s: %s", self.settings.model, exc)
            return str(exc)
        return None

    def close(self) -> None:
        self.idle.stop()
        self.generator.close()
        self.models.unload()
