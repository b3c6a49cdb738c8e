"""`--model` as llama.cpp and koboldcpp users write it: a name in the models folder, or a path.

A path given on the command line (a `.gguf` file or a model folder anywhere) is trusted as
the user's own and registered with the model manager under a short name; a request never
reaches this module, so the API only ever loads models by name from the folder (or the
paths registered here).
"""

from __future__ import annotations

from pathlib import Path

from modules.core.errors import ModelNotFoundError, WorkbenchError
from modules.core.paths import safe_join
from modules.engine.model_manager import ModelManager


def resolve_cli_model(value: str, models_dir: Path, cwd: Path | None = None) -> tuple[str, Path | None]:
    """(name, None) for a model of `models_dir`, or (name, path) for a model elsewhere.

    A name in the folder wins over a path of the same spelling; a relative path is taken
    from `cwd` (the current directory by default). Raises ModelNotFoundError saying where
    it looked, or naming what a path holds when it is not a model.
    """
    if not value or not value.strip():
        raise ModelNotFoundError("--model is empty: give a model name in the models folder or a path", "model")
    try:
        in_folder = safe_join(models_dir, value.rstrip("/"), subfolders=True, what="model")
    except WorkbenchError:
        in_folder = None  # "../x.gguf" or an absolute path: not a name, maybe a path
    if in_folder is not None and in_folder.exists():
        return value.rstrip("/"), None
    path = Path(value).expanduser()
    path = (path if path.is_absolute() else (cwd or Path.cwd()) / path).resolve()
    if not path.exists():
        looked = f"{models_dir / value} (a name in the models folder) nor {path} (a path)"
        raise ModelNotFoundError(f"no model {value!r}: found neither {looked}", "model")
    if path.is_file() and path.suffix.lower() != ".gguf":
        raise ModelNotFoundError(f"{path} is not a model: expected a .gguf file or a model folder", "model")
    base = models_dir.resolve()
    if base in path.parents:  # a path into the models folder: its ordinary name
        return path.relative_to(base).as_posix(), None
    return path.name, path


def register_cli_model(models: ModelManager, value: str, cwd: Path | None = None) -> str:
    """The name to load `value` (a `--model` argument) by, registering a path outside the folder.

    The short name (the file or folder name) is used unless a model of the folder has it;
    then the full path is the name, so neither hides the other.
    """
    name, path = resolve_cli_model(value, models.models_dir, cwd)
    if path is None:
        return name
    if name in models.list_models() and models.external.get(name) != path:
        name = str(path)
    models.external[name] = path
    return name
