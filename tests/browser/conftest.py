"""Browser-test fixtures: one real server per test module, one headless Chromium page.

The server is server.py started as a user would (a subprocess on a free port) through
tests/browser/serve.py, which only moves its user data into a temporary folder. The
browser is Debian's /usr/bin/chromium driven by Playwright (never `playwright install`).
Screenshots go under test-artifacts/ (git-ignored). Any Traceback in the server log fails
the test that produced it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path(os.environ.get("WORKBENCH_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@dataclass
class Server:
    """A running server.py: its URL, process, log file and temporary root folder."""

    url: str
    proc: subprocess.Popen
    log: Path
    root: Path
    models: Path
    checked: int = field(default=0)
    """Log offset already checked for tracebacks (each test checks only its own part)."""

    def new_log(self) -> str:
        text = self.log.read_text(errors="replace")
        fresh, self.checked = text[self.checked:], len(text)
        return fresh


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, models: Path, *flags: str, env: dict[str, str] | None = None) -> Server:
    """server.py on a free port with user data under `root`; waits until it answers HTTP."""
    for folder in ("instruction-templates", "characters"):
        if not (root / folder).exists() and (REPO / folder).is_dir():
            shutil.copytree(REPO / folder, root / folder)
    (root / "CMD_FLAGS.txt").write_text("")
    port = free_port()
    log = root / "server.log"
    environment = {**os.environ, "WORKBENCH_TEST_ROOT": str(root), **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("serve.py")), "--listen-port", str(port),
         "--settings", str(root / "settings.yaml"), "--models-dir", str(models), *flags],
        cwd=root, stdout=log.open("w"), stderr=subprocess.STDOUT, env=environment,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return Server(url, proc, log, root, models)
        except OSError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail(f"server did not come up:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(5)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, tiny_kit) -> Path:  # noqa: ANN001 - the kit fixture
    """A models folder with the kit's f32 GGUF (tiny-f32.gguf) and its Transformers folder (tiny-hf)."""
    models = tmp_path_factory.mktemp("models")
    shutil.copy(tiny_kit.gguf_f32, models / "tiny-f32.gguf")
    shutil.copytree(tiny_kit.hf_dir, models / "tiny-hf")
    return models


@pytest.fixture(scope="module")
def server_env() -> dict[str, str]:
    """Environment for the module's server; override in a test module to change UI defaults."""
    return {"WORKBENCH_TEST_UI_DEFAULTS": json.dumps({"max_new_tokens": 200, "seed": 1234}),
            "WORKBENCH_TEST_TOKEN_DELAY": "0.03"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, server_env: dict[str, str]) -> Iterator[Server]:
    """One server per test module: --threads 1 (tiny models hate spin-waiting), ctx 1024."""
    root = tmp_path_factory.mktemp("root")
    running = start_server(root, models_dir, "--threads", "1", "--ctx-size", "1024", env=server_env)
    yield running
    stop_server(running)


@pytest.fixture(autouse=True)
def no_server_traceback(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a browser test when the server logged a Traceback while it ran."""
    if "server" not in request.fixturenames:
        yield
        return
    running: Server = request.getfixturevalue("server")
    running.new_log()
    yield
    fresh = running.new_log()
    if "Traceback" in fresh:
        pytest.fail(f"the server logged a traceback:\n{fresh[-6000:]}")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def page(browser, server: Server) -> Iterator[object]:  # noqa: ANN001 - Playwright's Browser
    """One page on the module's server, reused by its tests (a page load costs seconds)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    opened = context.new_page()
    opened.set_default_timeout(30_000)
    opened.goto(server.url)
    opened.wait_for_selector("#chat-log", timeout=60_000)
    yield opened
    context.close()


def screenshot(page, name: str) -> Path:  # noqa: ANN001 - Playwright's Page
    """Save a full-page screenshot as test-artifacts/NAME.png and return its path."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def wait_until(condition, timeout: float = 30.0, what: str = "condition") -> None:  # noqa: ANN001
    """Poll `condition` every 0.1 s until it holds; fail the test naming `what` after `timeout`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")
