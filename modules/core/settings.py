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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modules.core.errors import InvalidRequestError
from modules.core.safe_yaml import load_yaml_file

log = logging.getLogger(__name__)

GROUPS = ("Model", "llama.cpp", "Transformers", "ExLlamaV2", "GPTQ", "Server", "Other")


def _opt(default: Any, group: str, help: str, **extra: Any) -> Any:
    """A settings field with its flag group and help text."""
    meta = {"group": group, "help": help, **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Settings:
    """Every flag of server.py. Loader option dataclasses reuse these field names."""

    # Model
    model: str | None = _opt(None, "Model", "Model to load at start: a .gguf file or a folder name in the models folder.")
    loader: str | None = _opt(None, "Model", "Loader to use instead of the one inferred from the model's files "
                              "(llama.cpp, transformers, exllamav2, gptq).")
    models_dir: str = _opt("models", "Model", "Folder that holds the models.")
    # llama.cpp
    n_gpu_layers: int = _opt(0, "llama.cpp", "Layers to offload to the GPU; -1 offloads all.", bounds=(-1, 100_000))
    ctx_size: int = _opt(0, "llama.cpp", "Context size in tokens; 0 uses the model's own, capped at 8192.", bounds=(0, 4_194_304))
    threads: int = _opt(0, "llama.cpp", "CPU threads for generation; 0 picks the number of physical cores.", bounds=(0, 1024))
    threads_batch: int = _opt(0, "llama.cpp", "CPU threads for prompt processing; 0 picks automatically.", bounds=(0, 1024))
    batch_size: int = _opt(512, "llama.cpp", "Prompt tokens processed per batch.", bounds=(1, 65_536))
    rope_freq_base: float = _opt(0.0, "llama.cpp", "RoPE base frequency; 0 uses the model's.", bounds=(0.0, 1e9))
    rope_freq_scale: float = _opt(0.0, "llama.cpp", "RoPE frequency scaling factor; 0 uses the model's.", bounds=(0.0, 1000.0))
    flash_attn: bool = _opt(False, "llama.cpp", "Always use flash attention (by default llama.cpp uses it where the "
                            "backend supports it).")
    cache_type: str = _opt("f16", "llama.cpp", "KV cache type; q8_0 and q4_0 halve or quarter its memory.",
                           choices=("f16", "q8_0", "q4_0", "f32"))
    tensor_split: str = _opt("", "llama.cpp", "How to split the model across GPUs, e.g. 3,1.")
    no_mmap: bool = _opt(False, "llama.cpp", "Read the whole file into memory instead of mapping it.")
    mlock: bool = _opt(False, "llama.cpp", "Lock the model in RAM so the OS never swaps it out.")
    no_context_shift: bool = _opt(False, "llama.cpp", "When a chat outgrows the context, process the kept turns again "
                                  "instead of shifting them in the KV cache (slower, exactly a fresh read).")
    parallel: int = _opt(1, "llama.cpp", "Requests served at once (llama.cpp and Transformers: they share the model, "
                         "batched into one decode step); each has its own context, so the KV cache grows N times.", bounds=(1, 256))
    # Transformers
    dtype: str = _opt("auto", "Transformers", "Weight dtype; auto is bfloat16 on a GPU and float32 on a CPU.",
                      choices=("auto", "float32", "float16", "bfloat16"))
    cpu: bool = _opt(False, "Transformers", "Run on the CPU even when a GPU is present.")
    load_in_8bit: bool = _opt(False, "Transformers", "Load weights in 8 bits with bitsandbytes (NVIDIA GPU only).")
    load_in_4bit: bool = _opt(False, "Transformers", "Load weights in 4 bits with bitsandbytes (NVIDIA GPU only).")
    trust_remote_code: bool = _opt(False, "Transformers", "Run Python code shipped with the model. Only for models "
                                   "you trust (command line or CMD_FLAGS.txt only).", cli_only=True)
    allow_pickle: bool = _opt(False, "Transformers", "Allow loading pickled .bin weights (with weights_only=True) "
                              "when a model has no safetensors (command line or CMD_FLAGS.txt only).", cli_only=True)
    # ExLlamaV2
    gpu_split: str = _opt("", "ExLlamaV2", "VRAM in GB per GPU for the weights, comma-separated, e.g. 20,7.5; "
                          "empty puts the model on the first GPU.")
    autosplit: bool = _opt(False, "ExLlamaV2", "Fill the GPUs in turn with the weights and the cache; "
                           "excludes gpu_split.")
    max_seq_len: int = _opt(0, "ExLlamaV2", "Context length in tokens; 0 uses the model's own, capped at 8192.", bounds=(0, 4_194_304))
    exl2_cache: str = _opt("fp16", "ExLlamaV2", "KV cache type: fp16, fp8, q8, q6 or q4 (q4 takes a quarter of "
                           "fp16's memory).", choices=("fp16", "fp8", "q8", "q6", "q4"))
    alpha_value: float = _opt(1.0, "ExLlamaV2", "NTK RoPE alpha: stretches the context without fine-tuning "
                              "(about 2.5 for twice the context); 1 is off.", bounds=(0.01, 1000.0))
    compress_pos_emb: float = _opt(0.0, "ExLlamaV2", "Linear RoPE scaling factor (context / trained context, for "
                                   "models tuned for it); 0 keeps the model's.", bounds=(0.0, 1000.0))
    no_flash_attn: bool = _opt(False, "ExLlamaV2", "Do not use flash attention even where it is available "
                               "(ExLlamaV2, and llama.cpp, where it is on by default where supported).")
    no_xformers: bool = _opt(False, "ExLlamaV2", "Do not use xformers even when it is installed.")
    no_sdpa: bool = _opt(False, "ExLlamaV2", "Do not use PyTorch's scaled-dot-product attention.")
    num_experts_per_token: int = _opt(0, "ExLlamaV2", "Experts per token for mixture-of-experts models; "
                                      "0 uses the model's own.", bounds=(0, 1024))
    enable_tp: bool = _opt(False, "ExLlamaV2", "Tensor parallelism: split every layer across all GPUs.")
    # GPTQ
    gptq_backend: str = _opt("auto", "GPTQ", "GPTQModel kernel for GPTQ models: auto picks one that runs here (torch on a "
                             "CPU; Marlin, ExLlamaV2 or Triton on an NVIDIA GPU).",
                             choices=("auto", "torch", "torch_int8", "triton", "exllama_v2", "marlin"))
    gptq_max_seq_len: int = _opt(0, "GPTQ", "Context length of a GPTQ model in tokens; 0 uses the model's own.", bounds=(0, 4_194_304))
    # Server
    listen: bool = _opt(False, "Server", "Make the UI (and the API) reachable from your local network (binds "
                        "0.0.0.0). Without --gradio-auth / --api-key they then answer requests addressed by IP only.",
                        cli_only=True)
    listen_host: str | None = _opt(None, "Server", "Host name or address to bind; overrides --listen.", cli_only=True)
    allowed_hosts: str | None = _opt(None, "Server", "Host names the UI and API answer to besides localhost and "
                                     "--listen-host, comma-separated (e.g. for a reverse proxy: chat.example.com, "
                                     "*.example.com); '*' turns the Host check off.", cli_only=True)
    listen_port: int = _opt(7860, "Server", "Port of the web UI.", bounds=(1, 65_535))
    api: bool = _opt(False, "Server", "Serve the OpenAI-compatible API as well.")
    api_port: int = _opt(5000, "Server", "Port of the API.", bounds=(1, 65_535))
    api_key: str | None = _opt(None, "Server", "Require this key (Authorization: Bearer KEY) on API calls.",
                               persist=False)
    api_cors_origins: str | None = _opt(None, "Server", "Browser origins allowed to call the API (CORS), comma-separated, "
                                        'e.g. "http://localhost:8000" or "*"; none by default.', cli_only=True)
    api_max_body: int = _opt(8, "Server", "Largest API request body in MiB; bigger ones get 413.", bounds=(1, 1024))
    max_queue: int = _opt(64, "Server", "Generation requests that may wait for a free slot; more get 429 "
                          "(API) or an error (UI).", bounds=(0, 100_000))
    gradio_auth: str | None = _opt(None, "Server", 'Password-protect the UI: "user:password", several separated by commas.',
                                   persist=False)
    # Other
    settings: str = _opt("settings.yaml", "Other", "Settings file to load (and to save from the UI).", persist=False)
    extensions: list[str] = _opt([], "Other", "Extensions to load, by folder name in extensions/.", nargs="+")
    extension_params: dict[str, dict[str, Any]] = _opt(
        {}, "Other", "Saved extension settings: {extension: {param: value}} (settings.yaml only).", cli=False)
    verbose: bool = _opt(False, "Other", "Log more, including the prompts sent to the model.")
    theme: str = _opt("system", "Other", "Colour theme of the web UI: follow the browser (system), light or dark.",
                      choices=("system", "light", "dark"))
    presets_dir: str = _opt("presets", "Other", "Folder that holds the sampler presets (YAML).")

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
        exposure switches (those come from the command line only)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if _from_files(f)}


CLI_ONLY = frozenset(f.name for f in dataclasses.fields(Settings) if f.metadata.get("cli_only"))
"""Settings that widen what the app exposes or runs (network reach, CORS, remote code,
pickles): taken from the command line and CMD_FLAGS.txt only, never from settings.yaml,
models/config-user.yaml, the Model tab or an API request."""
_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_MAX_TEXT_OPTION = 1024
"""Longest text option accepted from a file or a request (a tensor split, a GPU split)."""


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
    for f in dataclasses.fields(Settings):
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
