"""The loader registry and the pure rule that picks a loader from a model's files.

Loader modules register themselves with `@register_loader`; importing this package
imports them, which is cheap: none of them imports its backend library before `load()`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from modules.core.errors import ModelLoadError, UnknownLoaderError

_REGISTRY: dict[str, type] = {}
L = TypeVar("L", bound=type)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def register_loader(cls: L) -> L:
    """Class decorator: add a loader under its `name`; a duplicate name is a bug."""
    name = cls.name  # type: ignore[attr-defined]
    if name in _REGISTRY:
        raise ValueError(f"loader {name!r} is registered twice")
    _REGISTRY[name] = cls
    return cls


def get_loader(name: str) -> type:
    """The loader class registered as `name`, or an error listing the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        valid = ", ".join(sorted(_REGISTRY))
        raise UnknownLoaderError(f"no loader named {name!r}; available loaders: {valid}") from None


def loader_names() -> list[str]:
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class LoaderChoice:
    """Which loader a model needs, and the reason shown to the user."""

    loader: str
    reason: str
    pickled_weights: bool = False
    """The only weights are pickles: loading them needs an explicit opt-in."""


def infer_loader(path: Path, installed: Callable[[str], bool] = lambda name: False) -> LoaderChoice:
    """Pick the loader for a model file or folder from its files alone.

    `.gguf` -> llama.cpp; `quantization_config.quant_method` exl2 -> ExLlamaV2, gptq ->
    ExLlamaV2 when `installed("exllamav2")`, else GPTQ; safetensors -> Transformers; pickled
    weights -> Transformers behind an opt-in. Raises ModelLoadError saying what is missing.
    """
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return LoaderChoice("llama.cpp", "it is a GGUF file")
        raise ModelLoadError(f"{path.name} is not a model: expected a .gguf file or a model folder")
    if not path.is_dir():
        raise ModelLoadError(f"{path} does not exist")

    files = [p for p in path.iterdir() if p.is_file()]
    names = {p.name for p in files}
    ggufs = sorted(p for p in files if p.suffix.lower() == ".gguf")
    has_safetensors = any(p.suffix == ".safetensors" for p in files)
    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES and p.name != "training_args.bin"]

    if "config.json" in names and (has_safetensors or pickles):
        method, bits = _quant_method(path / "config.json")
        if method == "exl2":
            return LoaderChoice("exllamav2", "config.json says quant_method exl2 (an EXL2 quant)")
        if method == "gptq":
            if bits in (None, 4) and installed("exllamav2"):
                return LoaderChoice("exllamav2", "config.json says quant_method gptq and ExLlamaV2 is installed")
            if bits not in (None, 4):  # ExLlamaV2's GPTQ kernels are 4-bit only
                return LoaderChoice("gptq", f"config.json says quant_method gptq with {bits}-bit weights")
            return LoaderChoice("gptq", "config.json says quant_method gptq (a GPTQ quant)")
    if ggufs:
        return LoaderChoice("llama.cpp", f"the folder holds a GGUF file ({ggufs[0].name})")
    if has_safetensors:
        if "config.json" not in names:
            raise ModelLoadError(f"{path.name} has safetensors weights but no config.json")
        return LoaderChoice("transformers", "safetensors weights with a config.json")
    if pickles:
        if "config.json" not in names:
            raise ModelLoadError(f"{path.name} has pickled weights but no config.json")
        return LoaderChoice(
            "transformers",
            "only pickled .bin weights (no safetensors); loading them needs --allow-pickle",
            pickled_weights=True,
        )
    if not files:
        raise ModelLoadError(f"{path.name} is empty: no model files in it")
    raise ModelLoadError(
        f"{path.name} holds no weights this app can load (.gguf, .safetensors or, with --allow-pickle, .bin)"
    )


def gguf_main_file(path: Path) -> Path:
    """The GGUF file to open for a model path (the first shard of a split model)."""
    if path.is_file():
        return path
    ggufs = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf")
    if not ggufs:
        raise ModelLoadError(f"{path.name} holds no .gguf file")
    return ggufs[0]


def _quant_method(config_path: Path) -> tuple[str | None, int | None]:
    """`quantization_config`'s quant_method (lower case) and bits, when config.json has them."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config_path.parent.name}/config.json cannot be read: {exc}") from None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(quant, dict):
        method = quant.get("quant_method")
        bits = quant.get("bits")
        return (str(method).lower() if method else None,
                int(bits) if isinstance(bits, (int, float)) and not isinstance(bits, bool) else None)
    return None, None


# Registering the loaders: their modules import no backend library at import time.
from loaders import exllamav2 as _exllamav2  # noqa: E402,F401
from loaders import gptq as _gptq  # noqa: E402,F401
from loaders import llama_cpp as _llama_cpp  # noqa: E402,F401
from loaders import transformers as _transformers  # noqa: E402,F401
