"""One typed settings object: the command-line flags, `CMD_FLAGS.txt` and `settings.yaml`.

The argparse parser is generated from the dataclass fields (their metadata holds the
flag group and help), so a flag, its default and its persisted value cannot drift apart.
Precedence, lowest first: defaults < settings.yaml < CMD_FLAGS.txt < the command line.
Nothing here parses arguments at import time.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from modules.core.errors import InvalidRequestError
from modules.core.loader_options import (
    ExLlamaV2Options,
    GPTQOptions,
    LlamaCppOptions,
    TransformersOptions,
    opt,
)
from modules.core.safe_yaml import load_yaml_file

log = logging.getLogger(__name__)

GROUPS = ("Model", "llama.cpp", "Transformers", "ExLlamaV2", "GPTQ", "Server", "Other")


@dataclass
class ModelChoice:
    """Which model to load at start, and with which loader (the Model flag group)."""

    model: str | None = opt(None, "Model", "Model to load at start: a name in the models folder, or the path of a "
                            ".gguf file or a model folder anywhere.")
    loader: str | None = opt(None, "Model", "Loader to use instead of the one inferred from the model's files "
                             "(llama.cpp, transformers, exllamav2, gptq).")
    models_dir: str = opt("models", "Model", "Folder that holds the models.")


# The bases' order sets the fields' order (the last base's come first): flags keep their order
# within each --help group, and no_flash_attn, which llama.cpp takes too, stays with ExLlamaV2's.
@dataclass
class Settings(GPTQOptions, TransformersOptions, LlamaCppOptions, ExLlamaV2Options, ModelChoice):
    """Every flag of server.py: the model choice, every loader's options (declared once, in
    modules/core/loader_options.py), then the server and the rest."""

    # Server
    listen: bool = opt(False, "Server", "Make the UI (and the API) reachable from your local network (binds "
                       "0.0.0.0). Without --gradio-auth / --api-key they then answer requests addressed by IP only.",
                       cli_only=True)
    listen_host: str | None = opt(None, "Server", "Host name or address to bind; overrides --listen.", cli_only=True)
    allowed_hosts: str | None = opt(None, "Server", "Host names the UI and API answer to besides localhost and "
                                    "--listen-host, comma-separated (e.g. for a reverse proxy: chat.example.com, "
                                    "*.example.com); '*' turns the Host check off.", cli_only=True)
    listen_port: int = opt(7860, "Server", "Port of the web UI.", bounds=(1, 65_535))
    api: bool = opt(False, "Server", "Serve the OpenAI-compatible API as well.")
    nowebui: bool = opt(False, "Server", "Serve the API only, without the web UI (implies --api; starts faster, "
                        "uses less memory).", persist=False)
    api_port: int = opt(5000, "Server", "Port of the API.", bounds=(1, 65_535))
    api_key: str | None = opt(None, "Server", "Require this key (Authorization: Bearer KEY) on API calls.",
                              persist=False)
    api_cors_origins: str | None = opt(None, "Server", "Browser origins allowed to call the API (CORS), comma-separated, "
                                       'e.g. "http://localhost:8000" or "*"; none by default.', cli_only=True)
    api_max_body: int = opt(8, "Server", "Largest API request body in MiB; bigger ones get 413.", bounds=(1, 1024))
    max_queue: int = opt(64, "Server", "Generation requests that may wait for a free slot; more get 429 "
                         "(API) or an error (UI).", bounds=(0, 100_000))
    gradio_auth: str | None = opt(None, "Server", 'Password-protect the UI: "user:password", several separated by commas.',
                                  persist=False)
    idle_timeout: float = opt(0.0, "Server", "Unload the model after this many minutes without requests (fractions "
                              "allowed) to free RAM/VRAM; the next request reloads it with the same settings. "
                              "0 keeps it loaded.", bounds=(0, 1_000_000))
    strict_model_names: bool = opt(False, "Server", "Answer 404 (model_not_found) to an API request whose `model` "
                                   "names no model in the models folder, instead of using the loaded model.")
    no_model_switching: bool = opt(False, "Server", "Never switch models for an API request's `model` field: the "
                                   "loaded model answers every request.")
    # Other
    settings: str = opt("settings.yaml", "Other", "Settings file to load (and to save from the UI).", persist=False)
    extensions: list[str] = opt([], "Other", "Extensions to load, by folder name in extensions/.", nargs="+")
    extension_params: dict[str, dict[str, Any]] = opt(
        {}, "Other", "Saved extension settings: {extension: {param: value}} (settings.yaml only).", cli=False)
    verbose: bool = opt(False, "Other", "Log more, including the prompts sent to the model.")
    theme: str = opt("system", "Other", "Colour theme of the web UI: follow the browser (system), light or dark.",
                     choices=("system", "light", "dark"))
    presets_dir: str = opt("presets", "Other", "Folder that holds the sampler presets (YAML).")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise InvalidRequestError(
                    f"{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}", f.name
                )
            bounds = f.metadata.get("bounds")
            value = getattr(self, f.name)
            if bounds and isinstance(value, (int, float)) and not bounds[0] <= value <= bounds[1]:
                raise InvalidRequestError(f"{f.name} must be between {bounds[0]} and {bounds[1]}, got {value}", f.name)

    @property
    def host(self) -> str:
        """The address the servers bind to."""
        return self.listen_host or ("0.0.0.0" if self.listen else "127.0.0.1")

    def persisted(self) -> dict[str, Any]:
        """What Save settings writes: every field except secrets, the file's own path and the
        exposure switches (those come from the command line only), group by group."""
        return {f.name: getattr(self, f.name) for f in _in_group_order() if _from_files(f)}


CLI_ONLY = frozenset(f.name for f in dataclasses.fields(Settings) if f.metadata.get("cli_only"))
"""Settings that widen what the app exposes or runs (network reach, CORS, remote code,
pickles): taken from the command line and CMD_FLAGS.txt only, never from settings.yaml,
models/config-user.yaml, the Model tab or an API request."""
_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_MAX_TEXT_OPTION = 1024
"""Longest text option accepted from a file or a request (a tensor split, a GPU split)."""


def _in_group_order() -> list[dataclasses.Field]:
    """The Settings fields group by group (in GROUPS order), each group's in declaration order."""
    return sorted(dataclasses.fields(Settings), key=lambda f: GROUPS.index(f.metadata["group"]))


def _from_files(f: dataclasses.Field) -> bool:
    return f.metadata.get("persist", True) and not f.metadata.get("cli_only", False)


def check_option(name: str, value: Any, kind: Any = None) -> Any:
    """`value` for the setting or loader option `name` as given by a file, the UI or a request:
    the right type (a bool is a bool, an int an int; a whole float is taken as an int) and within
    the field's bounds and choices. Raises InvalidRequestError naming the field; never widens
    exposure (CLI_ONLY names are refused)."""
    if name in CLI_ONLY:
        raise InvalidRequestError(f"{name} can only be set on the command line or in CMD_FLAGS.txt", name)
    f = _FIELDS.get(name)
    kind = str(f.type) if f is not None else (kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind)))
    value = _typed(name, value, kind)
    if f is not None:
        choices, bounds = f.metadata.get("choices"), f.metadata.get("bounds")
        if choices and value not in choices:
            raise InvalidRequestError(f"{name} must be one of {', '.join(choices)}, got {value!r}", name)
        if bounds and isinstance(value, (int, float)) and not bounds[0] <= value <= bounds[1]:
            raise InvalidRequestError(f"{name} must be between {bounds[0]} and {bounds[1]}, got {value!r}", name)
    return value


def _typed(name: str, value: Any, kind: str) -> Any:
    base = kind.replace(" | None", "").replace("None | ", "").strip()
    if value is None and "None" in kind:
        return None
    if base == "bool":
        if not isinstance(value, bool):
            raise InvalidRequestError(f"{name} must be true or false, got {value!r}", name)
        return value
    if base == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidRequestError(f"{name} must be a whole number, got {value!r}", name)
        return value
    if base == "float":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            raise InvalidRequestError(f"{name} must be a number, got {value!r}", name)
        return float(value)
    if base.startswith("list["):
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise InvalidRequestError(f"{name} must be a list of names, got {value!r}", name)
        return value
    if base.startswith("dict["):
        if not isinstance(value, dict):
            raise InvalidRequestError(f"{name} must be a mapping, got {type(value).__name__}", name)
        return value
    if base == "str":
        if not isinstance(value, str) or len(value) > _MAX_TEXT_OPTION:
            raise InvalidRequestError(f"{name} must be text of at most {_MAX_TEXT_OPTION} characters", name)
        return value
    return value


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser for server.py, generated from the Settings fields.

    Defaults are suppressed so the parsed namespace holds only the flags actually given;
    that is what lets the command line override settings.yaml field by field.
    """
    parser = argparse.ArgumentParser(
        prog="server.py",
        description="A local LLM workbench: web UI on 127.0.0.1:7860, OpenAI-compatible API with --api.",
        argument_default=argparse.SUPPRESS,
        epilog="Flags in CMD_FLAGS.txt are read first; flags on the command line win.",
    )
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    defaults = Settings()
    for f in _in_group_order():  # the usage line lists the flags group by group too
        if not f.metadata.get("cli", True):
            continue  # a structured value: settings.yaml only
        group = groups[f.metadata["group"]]
        default = getattr(defaults, f.name)
        help_text = f.metadata["help"]
        if f.type in ("bool", bool):
            group.add_argument(flag_name(f.name), action="store_true", help=help_text)
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        kwargs: dict[str, Any] = {"type": kind, "help": f"{help_text} (default: {default})" if default else help_text}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if "nargs" in f.metadata:
            kwargs["nargs"] = f.metadata["nargs"]
        group.add_argument(flag_name(f.name), metavar=f.name.upper().replace("_", "-"), **kwargs)
    return parser


def read_cmd_flags(path: Path) -> list[str]:
    """The flags written in CMD_FLAGS.txt, shell-split, `#` comments ignored."""
    if not path.is_file():
        return []
    return shlex.split(path.read_text(encoding="utf-8"), comments=True)


def read_settings_file(path: Path) -> dict[str, Any]:
    """Known keys of a settings YAML file; unknown keys are kept for other parts (the UI)."""
    if not path.is_file():
        return {}
    try:
        data = load_yaml_file(path, path.name, "settings") or {}
    except yaml.YAMLError as exc:
        raise InvalidRequestError(f"{path.name} is not valid YAML: {exc}", "settings") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"{path.name} cannot be read: {exc}", "settings") from None
    if not isinstance(data, dict):
        raise InvalidRequestError(f"{path.name} must hold a mapping of setting: value", "settings")
    return data


def load_settings(argv: list[str], root: Path, cmd_flags_path: Path | None = None) -> Settings:
    """Merge defaults, the settings file, CMD_FLAGS.txt and argv into one Settings.

    Exits through argparse on `--help` or a malformed flag, as a command line should.
    """
    flags = read_cmd_flags(cmd_flags_path if cmd_flags_path is not None else root / "CMD_FLAGS.txt")
    given = vars(build_parser().parse_args(flags + list(argv)))
    settings_path = resolve_path(root, given.get("settings", "settings.yaml"))
    from_file = read_settings_file(settings_path)
    known = {f.name for f in dataclasses.fields(Settings) if _from_files(f)}
    ignored = sorted(k for k in from_file if k in CLI_ONLY)
    if ignored:
        log.warning("%s: ignoring %s (they widen what the app exposes; give them on the command line or in "
                    "CMD_FLAGS.txt)", settings_path.name, ", ".join(ignored))
    merged: dict[str, Any] = {}
    for key, value in from_file.items():
        if key in known:
            merged[key] = check_option(key, value)
    merged.update(given)
    try:
        return Settings(**merged)
    except TypeError as exc:
        raise InvalidRequestError(f"{settings_path.name}: {exc}", "settings") from None


def resolve_path(root: Path, value: str) -> Path:
    """A path from a setting: relative paths are taken from the project root."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path
