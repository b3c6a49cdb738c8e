"""The HTTP API: OpenAI-compatible, ooba's internal routes and KoboldAI, over the one App.

`create_app(app)` builds the FastAPI application; `serve_in_thread(app)` runs it with
uvicorn beside the UI in the same process, so both faces share the engine and its queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio.to_thread
from fastapi import Depends, FastAPI

from modules.api import health, internal_routes, kobold_routes, openai_routes
from modules.api.auth import require_key
from modules.api.errors import AnswerUnexpectedErrors, SafeJSONResponse, install_error_handlers
from modules.api.state import ApiState, get_state
from modules.engine.web_guard import WebGuard, policy_for

if TYPE_CHECKING:
    import uvicorn

    from modules.engine.app import App

__all__ = ["ApiState", "create_app", "get_state", "serve_in_thread"]
log = logging.getLogger(__name__)

CONTROL_THREADS = 40
"""Threadpool room kept for quick calls (token counts, stop, model info) beyond the generations."""


def create_app(app: App) -> FastAPI:
    """The FastAPI application over `app`; /docs shows the OpenAPI page."""

    @asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        # Every generation waiting in the queue holds a threadpool thread (its stream blocks in
        # one); room for all of them plus the token counts, stops and model info that must
        # still answer at once (anyio's default of 40 was exhausted by 40 waiting streams).
        settings = app.settings
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, settings.max_queue + 2 * settings.parallel + CONTROL_THREADS)
        yield
        # Shutting down: stop what the API started; the App itself belongs to server.py.
        api.state.api.active.cancel_all()

    api = FastAPI(title="LLM workbench API", version="1.0", lifespan=lifespan, default_response_class=SafeJSONResponse,
                  description="OpenAI-compatible, ooba internal and KoboldAI routes over the workbench engine.")
    api.state.api = ApiState(app)
    install_error_handlers(api)
    auth = [Depends(require_key)]
    api.include_router(health.router)  # no key: it says only ready or loading
    for router in (openai_routes.router, internal_routes.router, kobold_routes.router):
        api.include_router(router, dependencies=auth)
    origins = [o.strip() for o in (app.settings.api_cors_origins or "").split(",") if o.strip()]
    if origins:
        from fastapi.middleware.cors import CORSMiddleware

        # Preflight (OPTIONS) is answered by the middleware before auth runs, as browsers need.
        api.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"],
                           allow_credentials=origins != ["*"])
    # Added last, so it runs first: Host, Origin and body size are checked before CORS, routing,
    # body parsing and the key.
    api.add_middleware(WebGuard, policy=policy_for(app.settings, "api"))
    # Outermost: an unexpected error anywhere below (the guard and CORS too) is answered
    # without dropping the kept-alive connection.
    api.add_middleware(AnswerUnexpectedErrors)
    return api


def serve_in_thread(app: App, host: str, port: int, timeout: float = 30.0) -> uvicorn.Server:
    """Start uvicorn serving `create_app(app)` on host:port in a daemon thread.

    Returns once it accepts connections; set `.should_exit = True` on the result to stop it.
    Raises OSError when it could not start (the port is taken, say).
    """
    import uvicorn

    config = uvicorn.Config(create_app(app), host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="api", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise OSError(f"the API could not start on {host}:{port} (is the port in use?)")
        time.sleep(0.05)
    log.info("API serving on http://%s:%d (OpenAI base_url http://%s:%d/v1, docs at /docs)",
             host, port, host, port)
    return server
