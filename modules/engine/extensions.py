"""Extensions: `extensions/NAME/script.py` files that hook into every generation.

A script defines any of the hooks below by ooba's names (so text-generation-webui
extensions port with few changes). The registry loads each enabled script by file path,
checks its hooks' signatures once at load (a mismatch disables that hook, with the
reason logged), and calls them in enable order. Every call is isolated: an exception is
logged with the extension and hook name, put once on `errors` for the UI to show, and
the generation goes on as if that hook were absent. See docs/EXTENSIONS.md.

Hook semantics (`kind`):
- chain: each extension gets the previous one's result; the last result is used.
- first: extensions are asked in order; the first non-None result wins, the rest are skipped.
- collect: every extension's (non-empty) result is kept, in order.
- once: called once, at load (`setup`) or when the UI is built (`ui`).

Nothing here imports gradio: `ui()` is called by modules/ui inside its own Blocks.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import inspect
import logging
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules.core.errors import WorkbenchError
from modules.core.paths import check_name
from modules.core.sampling import SamplingParams

log = logging.getLogger(__name__)

CHAIN, FIRST, COLLECT, ONCE = "chain", "first", "collect", "once"


@dataclass(frozen=True)
class HookSpec:
    """A hook's documented parameters (positional, in order), how many a script may take, and its kind."""

    params: tuple[str, ...]
    kind: str
    min_args: int = 0
    """Old ooba scripts take fewer arguments (input_modifier(string)); they get the first ones."""
    keywords: bool = False
    """Extra keyword arguments are passed to a hook that takes **kwargs."""


HOOKS: dict[str, HookSpec] = {
    "setup": HookSpec(("app",), ONCE, 0),
    "ui": HookSpec((), ONCE),
    "state_modifier": HookSpec(("state",), CHAIN, 1),
    "chat_input_modifier": HookSpec(("text", "visible_text", "state"), CHAIN, 3),
    "input_modifier": HookSpec(("text", "state", "is_chat"), CHAIN, 1),
    "history_modifier": HookSpec(("history",), CHAIN, 1),
    "custom_generate_chat_prompt": HookSpec(("user_input", "state"), FIRST, 2, keywords=True),
    "bot_prefix_modifier": HookSpec(("prefix", "state"), CHAIN, 1),
    "custom_generate_reply": HookSpec(("question", "original_question", "state", "stopping_strings", "is_chat"),
                                      FIRST, 3),
    "tokenizer_modifier": HookSpec(("state", "prompt", "input_ids", "input_embeds"), CHAIN, 4),
    "output_modifier": HookSpec(("text", "state", "is_chat"), CHAIN, 1),
    "custom_css": HookSpec((), COLLECT),
    "custom_js": HookSpec((), COLLECT),
}
"""Every hook, in the order a chat generation calls them (setup/ui aside)."""

GENERATION_ORDER = ("state_modifier", "chat_input_modifier", "input_modifier", "history_modifier",
                    "custom_generate_chat_prompt", "bot_prefix_modifier", "custom_generate_reply",
                    "tokenizer_modifier", "output_modifier")
REQUIREMENT_FILES = ("requirements.txt", "requirements-nodeps.txt")
"""An extension's packages (pinned), installed by scripts/install.sh --extensions NAME; the second
file with --no-deps (a package whose declared dependencies we do not want). A line ending in
`# optional` is installed but not needed to enable the extension."""
_UI_KEYS = ("display_name", "is_tab")
"""`params` keys that describe the extension rather than being settings."""


@dataclass
class Extension:
    """One loaded script: its module, its `params` dict and the hooks that passed the check."""

    name: str
    module: Any
    hooks: dict[str, Callable[..., Any]] = field(default_factory=dict)
    arity: dict[str, int] = field(default_factory=dict)
    """How many of the documented positional arguments each hook takes."""
    disabled: dict[str, str] = field(default_factory=dict)
    """Hooks refused at load, with the reason."""

    @property
    def params(self) -> dict[str, Any]:
        value = getattr(self.module, "params", None)
        return value if isinstance(value, dict) else {}

    @property
    def display_name(self) -> str:
        return str(self.params.get("display_name") or self.name)

    def settings(self) -> dict[str, Any]:
        """The params worth saving: plain values, without display_name / is_tab."""
        return {k: v for k, v in self.params.items()
                if k not in _UI_KEYS and isinstance(v, (str, int, float, bool, list, type(None)))}


def check_hook(fn: object, spec: HookSpec) -> tuple[int, str | None]:
    """(how many documented arguments to pass, None) or (0, why `fn` cannot be this hook).

    Like pluggy's _verify_hook: decided once at load, so a call never guesses.
    """
    if not callable(fn):
        return 0, "it is not a function"
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return len(spec.params), None  # a builtin: trust it with the full list
    extra = {"x_extension_probe": None} if spec.keywords else {}
    for count in range(len(spec.params), spec.min_args - 1, -1):
        try:
            sig.bind(*spec.params[:count])
        except TypeError:
            continue
        if extra and not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return 0, f"it must accept **kwargs, like ({', '.join(spec.params)}, **kwargs)"
        return count, None
    wanted = ", ".join(spec.params) + (", **kwargs" if spec.keywords else "")
    return 0, f"its parameters ({', '.join(sig.parameters)}) do not fit ({wanted})"


def missing_packages(folder: Path, name: str) -> list[str]:
    """The packages `folder/NAME`'s requirement files name (not `# optional`) that are not installed."""
    from packaging.requirements import InvalidRequirement, Requirement

    missing = []
    for path in (folder / name / file for file in REQUIREMENT_FILES):
        if not path.is_file():
            continue
        for raw in path.read_text(encoding="utf-8").splitlines():
            line, _, comment = raw.partition("#")
            line = line.strip()
            if not line or line.startswith("-") or comment.strip() == "optional":
                continue
            try:
                req = Requirement(line)
            except InvalidRequirement:
                log.warning("extensions/%s/%s: cannot read %r", name, path.name, line)
                continue
            if req.marker is not None and not req.marker.evaluate():
                continue
            try:
                importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                missing.append(req.name)
    return missing


def install_command(name: str) -> str:
    """What to run to install extension `name`'s packages (any platform's start script runs it too)."""
    return (f"scripts/install.sh --extensions {name} (Windows: installer_files\\env\\Scripts\\python "
            f"scripts\\install_extensions.py {name})")


def load_script(folder: Path, name: str) -> Extension:
    """Import `folder/NAME/script.py` under a private module name and check its hooks.

    Raises WorkbenchError for a bad name or a missing script; anything the script itself
    raises (syntax error, failed import) propagates for the registry to log.
    """
    check_name(name, "extension name")
    path = folder / name / "script.py"
    if not path.is_file():
        raise WorkbenchError(f"there is no extensions/{name}/script.py")
    missing = missing_packages(folder, name)
    if missing:  # refused before its import: never a traceback at every message
        raise WorkbenchError(f"it needs {', '.join(missing)} (not installed); install with: {install_command(name)}")
    module_name = f"workbench_extensions.{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    ext = Extension(name, module)
    for hook, hook_spec in HOOKS.items():
        fn = getattr(module, hook, None)
        if fn is None:
            continue
        count, problem = check_hook(fn, hook_spec)
        if problem:
            ext.disabled[hook] = problem
            log.error("extension %s: hook %s disabled: %s", name, hook, problem)
        else:
            ext.hooks[hook], ext.arity[hook] = fn, count
    return ext


class ExtensionRegistry:
    """The enabled extensions, in order, and the one place their hooks are called.

    Built by App.create from `settings.extensions`; `enable()` changes the list at
    runtime (Session tab). `active` is False when nothing is enabled, so the engine can
    skip every hook at no cost. Saved params (`settings.extension_params`) are applied
    over a script's own `params` when it loads.
    """

    def __init__(self, folder: Path, saved_params: dict[str, dict[str, Any]] | None = None) -> None:
        self.folder = folder
        # A hand-edited settings.yaml may hold anything: keep only {name: {param: value}}.
        self.saved_params = {str(k): dict(v) for k, v in (saved_params or {}).items() if isinstance(v, dict)}
        self._loaded: dict[str, Extension] = {}
        self._enabled: list[Extension] = []
        self._lock = threading.Lock()
        self.errors: queue.SimpleQueue[str] = queue.SimpleQueue()
        """Messages for the UI (one per distinct failure); `drain_errors()` empties it."""
        self._reported: set[tuple[str, str, str]] = set()
        self.context: Any = None
        """Given to `setup(app)` for scripts that take it (App.create sets it to the App)."""

    # --- loading ---------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return bool(self._enabled)

    @property
    def enabled(self) -> list[Extension]:
        return list(self._enabled)

    def names(self) -> list[str]:
        return [e.name for e in self._enabled]

    def enable(self, names: Sequence[str]) -> list[str]:
        """Make `names` (in this order) the enabled extensions; returns the ones that loaded.

        A name that is unsafe, missing or whose script fails to import or set up is logged
        with its reason and skipped: the app always starts.
        """
        chosen: list[Extension] = []
        for name in dict.fromkeys(names):
            ext = self._loaded.get(name) or self._load(name)
            if ext is not None:
                chosen.append(ext)
        with self._lock:
            self._enabled = chosen
        return [e.name for e in chosen]

    def _load(self, name: str) -> Extension | None:
        try:
            ext = load_script(self.folder, name)
        except WorkbenchError as exc:
            log.error("extension %r not loaded: %s", name, exc)
            self._report(str(name), "load", exc)
            return None
        except BaseException as exc:  # noqa: BLE001 - SyntaxError, ImportError, SystemExit: never fatal
            log.error("extension %s not loaded: its script failed: %s: %s", name, type(exc).__name__, exc,
                      exc_info=not isinstance(exc, SyntaxError))
            self._report(name, "load", exc)
            return None
        ext.params.update(self.saved_params.get(name, {}))
        if "setup" in ext.hooks:
            try:
                ext.hooks["setup"](*[self.context][: ext.arity["setup"]])
            except Exception as exc:  # noqa: BLE001 - a failed setup skips the extension
                log.exception("extension %s not loaded: setup() failed", name)
                self._report(name, "setup", exc)
                return None
        self._loaded[name] = ext
        log.info("extension %s loaded (%s)", name, ", ".join(ext.hooks) or "no hooks")
        return ext

    def params_snapshot(self) -> dict[str, dict[str, Any]]:
        """Saved params merged with the loaded extensions' current ones (for settings.yaml)."""
        out = {k: dict(v) for k, v in self.saved_params.items()}
        for ext in self._loaded.values():
            out[ext.name] = ext.settings()
        return {k: v for k, v in out.items() if v}

    def set_param(self, name: str, key: str, value: Any) -> None:
        """Change one param of a loaded extension (what its ui() controls do)."""
        ext = self._loaded.get(name)
        if ext is None:
            raise WorkbenchError(f"extension {name!r} is not loaded")
        ext.params[key] = value

    # --- calling ---------------------------------------------------------------------
    def has(self, hook: str) -> bool:
        return any(hook in e.hooks for e in self._enabled)

    def call(self, ext: Extension, hook: str, *args: Any, **kwargs: Any) -> tuple[bool, Any]:
        """(True, result) or (False, None) when the hook raised (logged and reported)."""
        count = ext.arity.get(hook, len(args))
        try:
            return True, ext.hooks[hook](*args[:count], **kwargs)
        except Exception as exc:  # noqa: BLE001 - one broken hook never stops a generation
            log.exception("extension %s: %s failed", ext.name, hook)
            self._report(ext.name, hook, exc)
            return False, None

    def chain(self, hook: str, value: Any, *rest: Any, check: Callable[[Any], bool] | None = None) -> Any:
        """`value` passed through every enabled extension's `hook(value, *rest)`, in order.

        A hook that raises or returns something `check` refuses is skipped (its input goes on).
        """
        for ext in self.enabled:
            if hook not in ext.hooks:
                continue
            ok, result = self.call(ext, hook, value, *rest)
            if ok and check is not None and not check(result):
                self._report(ext.name, hook, TypeError(f"returned {type(result).__name__}, which does not fit"))
                continue
            if ok:
                value = result
        return value

    def first(self, hook: str, *args: Any, **kwargs: Any) -> tuple[Extension | None, Any]:
        """(extension, result) of the first enabled extension whose `hook` returns non-None."""
        for ext in self.enabled:
            if hook in ext.hooks:
                ok, result = self.call(ext, hook, *args, **kwargs)
                if ok and result is not None:
                    return ext, result
        return None, None

    def collect(self, hook: str) -> list[Any]:
        """Every enabled extension's non-empty `hook()` result, in order."""
        out = []
        for ext in self.enabled:
            if hook in ext.hooks:
                ok, result = self.call(ext, hook)
                if ok and result:
                    out.append(result)
        return out

    def iterate(self, ext: Extension, hook: str, items: Iterable[Any]) -> Iterable[Any]:
        """`items` (what a generator hook returned) with an exception while iterating reported and ending it."""
        try:
            yield from items
        except Exception as exc:  # noqa: BLE001 - a broken generator hook ends, the caller goes on
            log.exception("extension %s: %s failed", ext.name, hook)
            self._report(ext.name, hook, exc)

    # --- errors ------------------------------------------------------------------------
    def _report(self, name: str, hook: str, exc: BaseException) -> None:
        # Once per distinct failure: a hook failing on every chunk must not flood the UI.
        key = (name, hook, f"{type(exc).__name__}: {exc}")
        with self._lock:
            if key in self._reported:
                return
            self._reported.add(key)
        self.errors.put(f"Extension {name}: {hook} failed: {key[2]}")

    def drain_errors(self) -> list[str]:
        """The messages reported since the last drain (the UI shows each as a warning)."""
        out = []
        while True:
            try:
                out.append(self.errors.get_nowait())
            except queue.Empty:
                return out


def make_state(params: SamplingParams, **extra: Any) -> dict[str, Any]:
    """The `state` dict hooks get: the sampler params by name, then `extra`.

    Chat adds mode, name1 (user) / name2 (character), character_name, user_name, context;
    every caller sets is_api and is_chat.
    """
    state: dict[str, Any] = dataclasses.asdict(params)
    state.update({"is_api": False, "is_chat": False})
    state.update(extra)
    return state
