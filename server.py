"""Start the workbench: parse flags (CMD_FLAGS.txt + argv), build the App, serve the UI and/or the API.

Only settings parsing happens before `--help` answers; gradio, torch and the backends are
imported later (the UI, never with --nowebui) or at model load (the backends), so `--help` is
instant and `--nowebui` serves the API within a second or so.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from modules.core.settings import load_settings

if TYPE_CHECKING:
    from modules.engine.app import App

ROOT = Path(__file__).resolve().parent
log = logging.getLogger("server")


def parse_auth(value: str | None) -> list[tuple[str, str]] | None:
    """`user:pass,user2:pass2` -> Gradio's list of credentials."""
    if not value:
        return None
    pairs = []
    for item in value.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user:
            raise SystemExit("--gradio-auth must look like user:password (several separated by commas)")
        pairs.append((user, password))
    return pairs


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(sys.argv[1:] if argv is None else argv, ROOT)
    logging.basicConfig(
        level=logging.DEBUG if settings.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from modules.engine.app import App

    app = App.create(settings, ROOT)
    api_server = None
    serve_api = settings.api or settings.nowebui
    from modules.engine.web_guard import log_exposure, policy_for

    faces = ("api",) if settings.nowebui else ("api", "ui") if settings.api else ("ui",)
    log_exposure([policy_for(settings, face) for face in faces])
    missing = [name for name in settings.extensions if name not in app.extensions.names()]
    if missing:
        log.warning("extensions not loaded (see the errors above): %s", ", ".join(missing))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if serve_api:
            from modules.api import serve_in_thread

            # /health answers 503 from the first request until the start-up model is in.
            app.models.loading = settings.model or None
            api_server = serve_in_thread(app, settings.host, settings.api_port)
        try:
            app.load_startup_model()
        finally:
            app.models.loading = None
        if not app.models.list_models():
            where = "" if settings.nowebui else ", then press Refresh in the Model tab"
            log.info("No models in %s yet: put a .gguf file (or a model folder) there%s.", app.models.models_dir,
                     where)
        if settings.nowebui:
            log.info("API only (--nowebui): Ctrl+C stops it")
            threading.Event().wait()  # the API serves from its thread until a signal ends the process
        else:
            serve_ui(app)
    finally:
        if api_server is not None:
            api_server.should_exit = True
        app.close()
    return 0


def serve_ui(app: App) -> None:
    """Serve the web UI until the process is stopped, rebuilding it when the Session tab asks."""
    from modules.ui.gradio_import import skip_pyi_regeneration

    skip_pyi_regeneration()  # before gradio's first import: saves seconds of start-up (see the module)
    from modules.ui.blocks import create_ui, launch_options

    while True:
        settings = app.settings
        demo = create_ui(app)
        demo.queue(default_concurrency_limit=8).launch(
            server_name=settings.host, server_port=settings.listen_port,
            auth=parse_auth(settings.gradio_auth), prevent_thread_lock=True, **launch_options(app),
        )
        app.restart_requested.wait()  # until the Session tab asks for a fresh UI
        app.restart_requested.clear()
        log.info("restarting the UI")
        demo.close()


if __name__ == "__main__":
    sys.exit(main())
