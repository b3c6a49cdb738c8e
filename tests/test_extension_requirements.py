"""Extensions install what they need: requirements.txt per extension, installed by
scripts/install.sh --extensions NAME (tested offline on a fresh venv with a wheel built here),
and an extension whose packages are missing is not enabled, with one log line."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from modules.engine.extensions import REQUIREMENT_FILES, missing_packages
from tests.extension_scripts import write_extension

ROOT = Path(__file__).resolve().parents[1]
HOOKED = "def output_modifier(text, state=None, is_chat=False):\n    return text + '!'\n"


def make_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A pure-Python wheel of package `name` (module `name`), built by hand: no build tools, no network."""
    dist = f"{name}-{version}"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                      + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{dist}.dist-info/RECORD,,\n"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in files.items():
            wheel.writestr(member, text)
    return path


def test_every_bundled_extension_pins_its_packages():
    for folder in sorted(p for p in (ROOT / "extensions").iterdir() if (p / "script.py").is_file()):
        for file in REQUIREMENT_FILES:
            path = folder / file
            if not path.is_file():
                continue
            for line in path.read_text().splitlines():
                line = line.partition("#")[0].strip()
                assert not line or "==" in line, f"{path}: {line!r} is not pinned"
    assert (ROOT / "extensions" / "memory" / "requirements.txt").is_file()
    assert (ROOT / "extensions" / "translate" / "requirements.txt").is_file()


def test_missing_packages_mean_not_enabled_with_one_line(app, caplog):
    folder = write_extension(app.root, "needy", HOOKED)
    (folder / "requirements.txt").write_text("wb-s1-not-installed==0.1\nPyYAML==6.0.3\n"
                                            "wb-s1-nice-to-have==1.0  # optional\n")
    with caplog.at_level(logging.INFO):
        assert app.set_extensions(["needy"]) == []
    lines = [r for r in caplog.records if "needy" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.ERROR and lines[0].exc_info is None
    message = lines[0].getMessage()
    assert "wb-s1-not-installed" in message and "scripts/install.sh --extensions needy" in message
    assert "PyYAML" not in message and "nice-to-have" not in message  # installed / optional
    assert "workbench_extensions.needy" not in sys.modules  # its script never ran
    assert len(app.extensions.drain_errors()) == 1  # and the UI shows it once


def test_installed_packages_enable_it(app):
    folder = write_extension(app.root, "content", HOOKED)
    (folder / "requirements.txt").write_text("# comment\nPyYAML==6.0.3\n\n--prefer-binary\n")
    (folder / "requirements-nodeps.txt").write_text("Jinja2==3.1.6\nwb-s1-windows-only==1 ; sys_platform == 'nt'\n")
    assert missing_packages(app.root / "extensions", "content") == []
    assert app.set_extensions(["content"]) == ["content"]


@pytest.fixture(scope="module")
def fake_checkout(tmp_path_factory) -> Path:
    """A copy of the scripts beside one extension, `fakeext`, needing two local wheels; and a fresh venv."""
    root = tmp_path_factory.mktemp("checkout")
    (root / "scripts").mkdir()
    for script in ("install.sh", "install_extensions.py"):
        shutil.copy(ROOT / "scripts" / script, root / "scripts" / script)
    (root / "requirements.txt").write_text("wb-s1-pinned==1.0\n")  # a constraint only: never installed by it
    wheels = root / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "wb_s1_plain", "1.0")
    # Its dependency exists nowhere: only --no-deps installs it.
    make_wheel(wheels, "wb_s1_weights", "0.1", requires=("wb-s1-unavailable>=9",))
    ext = root / "extensions" / "fakeext"
    ext.mkdir(parents=True)
    (ext / "script.py").write_text(HOOKED)
    (ext / "requirements.txt").write_text("wb_s1_plain==1.0\n")
    (ext / "requirements-nodeps.txt").write_text("wb_s1_weights==0.1\n")
    venv.create(root / "installer_files" / "env", with_pip=True)
    return root


def _install(root: Path, *names: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(root / "wheels"),
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run(["bash", str(root / "scripts" / "install.sh"), "--extensions", *names], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_install_sh_installs_an_extensions_packages_into_a_fresh_venv(fake_checkout):
    python = fake_checkout / "installer_files" / "env" / "bin" / "python"
    run = _install(fake_checkout, "fakeext")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Installing the packages of extension fakeext" in run.stdout
    probe = subprocess.run([str(python), "-c", "import wb_s1_plain, wb_s1_weights; print(wb_s1_plain.VERSION)"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "1.0", probe.stderr
    again = _install(fake_checkout, "fakeext")  # the stamp: nothing to do
    assert again.returncode == 0 and "Installing" not in again.stdout


def test_install_sh_refuses_an_unknown_extension(fake_checkout):
    run = _install(fake_checkout, "../etc")
    assert run.returncode == 1 and "no extension named" in run.stderr


def test_the_start_scripts_find_the_enabled_extensions(tmp_path):
    import runpy

    script = runpy.run_path(str(ROOT / "scripts" / "install_extensions.py"))
    (tmp_path / "s.yaml").write_text("extensions: [memory]\n")
    flags = ["--settings", str(tmp_path / "s.yaml")]
    assert script["enabled_extensions"](flags) == ["memory"]
    assert script["enabled_extensions"]([*flags, "--extensions", "translate"]) == ["translate"]
    assert script["enabled_extensions"](["--help"]) == []  # server.py answers that, not the installer
