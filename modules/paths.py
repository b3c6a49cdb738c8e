"""Safe paths for user-given names, and atomic writes for user files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from modules.errors import UnsafePathError


def safe_join(folder: Path, name: str) -> Path:
    """`folder/name`, refusing any name that would resolve outside `folder`.

    Absolute paths, `..` segments and symlinks pointing out are all refused: a user-given
    name (a model, a character, a preset) must stay inside its folder.
    """
    if not name or "\x00" in name or Path(name).is_absolute() or name.startswith(("/", "\\")):
        raise UnsafePathError(f"{name!r} is not a valid name here", "name")
    base = folder.resolve()
    target = (base / name).resolve()
    if target != base and base not in target.parents:
        raise UnsafePathError(f"{name!r} points outside {folder.name}/", "name")
    if target == base:
        raise UnsafePathError(f"{name!r} is not a valid name here", "name")
    return target


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that a crash leaves either the old file or the new one.

    Temp file in the same folder, fsync, then rename over the target.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
