"""Safe paths for user-given names, and atomic writes for user files.

Every name a user gives (a character, chat, template, preset, persona, model) goes
through `safe_join` before it touches the disk. The rules are strict on purpose and the
same on every OS, so a chat name that is fine on Linux cannot become a traversal or a
device name when the same folder is used from Windows.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from modules.core.errors import UnsafePathError

MAX_NAME_LENGTH = 200
"""Characters in one name; file systems allow 255 bytes, and a suffix may be added."""
# Windows' reserved device names ("Naming Files, Paths, and Namespaces", learn.microsoft.com):
# CON PRN AUX NUL, COM0-9 and LPT0-9 including the superscripts 1-3 (the ANSI code page
# maps them to digits), and the console devices CONIN$ and CONOUT$ that Windows 11 opens
# as devices. CLOCK$ is a DOS-era device NT no longer reserves; refused anyway, it costs nothing.
# Each is a device with any extension too (NUL.txt, NUL.tar.gz) and with spaces before the dot.
_PORT_DIGITS = "0123456789\u00b9\u00b2\u00b3"
_WINDOWS_DEVICES = frozenset({
    "con", "prn", "aux", "nul", "conin$", "conout$", "clock$",
    *(f"com{d}" for d in _PORT_DIGITS), *(f"lpt{d}" for d in _PORT_DIGITS),
})
# Characters Windows refuses anywhere in a name (besides / \\ and the colon, refused with
# their own reasons); on Linux they are legal, so a folder written there would not copy over.
_WINDOWS_FORBIDDEN = frozenset('<>"|?*')
_PERCENT_ESCAPE = re.compile(r"%[0-9a-fA-F]{2}")


def check_name(name: object, what: str = "name") -> str:
    """`name` if it is a plain file name (no folders), else UnsafePathError saying why.

    Refused: empty or over-long names, path separators (/ and \\), `.` and `..`, NUL and
    control characters, drive letters and other colons, percent-escapes (a URL-encoded
    `../` must not turn into one later), names ending in a dot or space, the characters
    Windows refuses (< > " | ? *), and Windows device names with or without an extension
    (CON, nul.txt, COM1, COM\u00b9, CONIN$...).
    """
    if not isinstance(name, str) or not name.strip():
        raise UnsafePathError(f"the {what} must be a non-empty name", what)
    reason = _name_problem(name)
    if reason:
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise UnsafePathError(f"{shown!r} is not a valid {what}: {reason}", what)
    return name


def _name_problem(name: str) -> str | None:
    if len(name) > MAX_NAME_LENGTH:
        return f"longer than {MAX_NAME_LENGTH} characters"
    if "/" in name or "\\" in name:
        return "it contains a path separator"
    if name in (".", ".."):
        return "it names a folder, not a file"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "it contains a control character"
    if ":" in name:
        return "it contains a colon (drive letters and streams are not allowed)"
    if forbidden := sorted(set(name) & _WINDOWS_FORBIDDEN):
        return f"it contains {' '.join(forbidden)} (not allowed in file names on Windows)"
    if _PERCENT_ESCAPE.search(name):
        return "it contains a URL-encoded character"
    if name != name.rstrip(". "):
        return "it ends with a dot or a space"
    if name.split(".")[0].strip().lower() in _WINDOWS_DEVICES:
        return "it is a reserved device name on Windows"
    return None


def safe_join(folder: Path, name: str, *, subfolders: bool = False, what: str = "name") -> Path:
    """`folder/name`, refusing any name that would resolve outside `folder`.

    With `subfolders`, `name` may be `a/b` (each part checked on its own), as model names
    such as `org_repo/model.Q4_K_M.gguf` are. Symlinks that point out of the folder are
    refused too, since the check is made on the resolved path.
    """
    if not isinstance(name, str):
        raise UnsafePathError(f"the {what} must be text", what)
    parts = name.split("/") if subfolders else [name]
    for part in parts:
        check_name(part, what)
    base = folder.resolve()
    target = base.joinpath(*parts).resolve()
    if base not in target.parents:
        raise UnsafePathError(f"{name!r} points outside {folder.name}/", what)
    return target


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that a crash leaves either the old file or the new one."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes, still_wanted: Callable[[], bool] | None = None) -> bool:
    """Write `data` to `path` via a temp file in the same folder, fsync, then rename over it.

    `still_wanted`, when given, is asked after the temp file is on disk and just before the
    rename (a writer checking that nobody changed the file meanwhile); False drops the temp
    file, leaves `path` as it was and returns False. Returns True when written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if still_wanted is not None and not still_wanted():
            Path(tmp).unlink()
            return False
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return True


def fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
