"""A real API server for tests: uvicorn on a loopback port serving `create_app` over an App
with a model from the test kit, in a child process, as server.py serves it (without the UI).

The child is `python -m tests.api.api_server PORT [server.py flags...]`; `ApiServer` starts
it, waits until it answers, and on `stop()` reads its log, where an unexpected exception
would show as a traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class ApiServer:
    """The child API server on 127.0.0.1:`port`; `log` is its combined output."""

    def __init__(self, tmp: Path, port: int, *flags: str) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = tmp / "api_server.log"
        (tmp / "CMD_FLAGS.txt").write_text("")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.api.api_server", str(port), "--settings", str(tmp / "settings.yaml"),
                 *flags], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Return once the server has loaded its model and answers; raise with its log if not."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the API server exited:\n{self.log}")
            if "API_SERVER_READY" in self.log:
                with httpx.Client(base_url=self.base, timeout=10) as client:
                    if client.get("/openapi.json").status_code == 200:  # needs no key
                        return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the API server did not come up:\n{self.log}")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> str:
        """Stop the child (SIGTERM, then kill) and return its log."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.log


def main(argv: list[str]) -> int:
    """Serve the API until SIGTERM: argv is the port, then server.py's flags."""
    import logging

    from modules.api import serve_in_thread
    from modules.core.settings import load_settings
    from modules.engine.app import App

    port, *flags = argv
    settings = load_settings(flags, ROOT, cmd_flags_path=Path(os.devnull))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = App.create(settings, ROOT)
    error = app.load_startup_model()
    if error:
        print(f"could not load the model: {error}", flush=True)
        return 1
    server = serve_in_thread(app, "127.0.0.1", int(port))
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    print("API_SERVER_READY", flush=True)
    stopped.wait()
    server.should_exit = True
    time.sleep(0.3)
    app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
