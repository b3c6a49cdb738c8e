"""Install the packages of extensions (their requirements.txt, and requirements-nodeps.txt with --no-deps).

    python scripts/install_extensions.py NAME...           # these extensions
    python scripts/install_extensions.py --enabled [FLAGS] # those settings.yaml / CMD_FLAGS.txt / FLAGS enable

Run with the environment's Python (installer_files/env); scripts/install.sh --extensions and
the start scripts call it. Constrained by the root requirements.txt, so an extension never
moves a pinned package. A stamp per extension (the hash of its files) makes a second run a
no-op. Only the standard library is imported, except by --enabled (which reads the settings).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ("requirements.txt", "requirements-nodeps.txt")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def enabled_extensions(flags: list[str]) -> list[str]:
    """The extensions server.py would enable with these flags (nothing if they do not parse)."""
    sys.path.insert(0, str(ROOT))
    from modules.core.settings import load_settings

    try:  # --help or a bad flag: server.py itself will say so
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return list(load_settings(flags, ROOT).extensions)
    except (SystemExit, Exception):  # noqa: BLE001
        return []


def install(name: str, env_dir: Path) -> bool:
    """Install extension `name`'s packages unless its stamp says they are; False when there is no such extension."""
    folder = ROOT / "extensions" / name
    if not _NAME.match(name) or not (folder / "script.py").is_file():
        print(f"no extension named {name!r} in extensions/", file=sys.stderr)
        return False
    files = [folder / f for f in FILES if (folder / f).is_file()]
    if not files:
        return True
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
    stamp = env_dir / f".installed-extension-{name}"
    if stamp.is_file() and stamp.read_text().strip() == digest:
        return True
    print(f"Installing the packages of extension {name} (once)", flush=True)
    constraints = ["-c", str(ROOT / "requirements.txt")] if (ROOT / "requirements.txt").is_file() else []
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
    for file in files:
        nodeps = ["--no-deps"] if file.name == "requirements-nodeps.txt" else []
        subprocess.run([*pip, *nodeps, *constraints, "-r", str(file)], check=True)
    stamp.write_text(digest + "\n")
    return True


def main(argv: list[str]) -> int:
    enabled = argv[:1] == ["--enabled"]
    names = enabled_extensions(argv[1:]) if enabled else argv
    env_dir = Path(sys.prefix)
    try:
        ok = all([install(name, env_dir) for name in dict.fromkeys(names)])
    except subprocess.CalledProcessError as exc:
        print(f"pip failed ({exc.returncode}); the extension stays disabled until its packages install",
              file=sys.stderr)
        return 1
    return 0 if ok or enabled else 1  # with --enabled, server.py reports an unknown name itself


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
