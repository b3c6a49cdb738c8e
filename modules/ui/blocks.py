"""The whole web UI: the Blocks of every tab, and the options gradio 6 takes in launch().

Handlers only wire components to engine calls; no generation logic lives here. The
sampler settings of a browser session live in one gr.State made here and written by the
Parameters tab (see modules/ui/common.py).
"""

from __future__ import annotations

from typing import Any

import gradio as gr
from starlette.middleware import Middleware

from modules.engine.app import App
from modules.engine.health import HealthEndpoint
from modules.engine.web_guard import UI_MAX_UPLOAD_MIB, WebGuard, policy_for
from modules.ui import (
    chat_tab,
    default_tab,
    extensions_ui,
    model_tab,
    notebook_tab,
    parameters_tab,
    session_tab,
)
from modules.ui.common import default_params

TITLE = "LLM Workbench"


def create_ui(app: App) -> gr.Blocks:
    """Build the Blocks app over `app`; the caller launches it."""
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        params = gr.State(default_params())
        model_tab.status_badge(app)  # "unloaded while idle" / "loading X" above every tab, the Chat's too
        with gr.Tab("Chat") as chat_page:
            chat = chat_tab.create_ui(app, params, demo)
        chat_tab.refresh_on_show(app, chat, chat_page)
        with gr.Tab("Default"):
            default_tab.create_ui(app, params)
        with gr.Tab("Notebook"):
            notebook_tab.create_ui(app, params)
        with gr.Tab("Parameters"):
            parameters_tab.create_ui(app, params)
        with gr.Tab("Model"):
            model_tab.create_ui(app)
        with gr.Tab("Session"):
            session_tab.create_ui(app, demo)
        extensions_ui.create_ui(app)
    return demo


def launch_options(app: App | None = None) -> dict[str, Any]:
    """Options that gradio 6 takes in launch() rather than Blocks(): theme, the upload cap,
    and with an App the web guard and the enabled extensions' custom_css / custom_js."""
    options: dict[str, Any] = {"theme": gr.themes.Soft(), "show_error": True,
                               "max_file_size": f"{UI_MAX_UPLOAD_MIB}mb"}
    if app is not None:
        # The same guard as the API's (Host allowlist, no cross-site requests, body cap),
        # inside gradio's own app so it runs before any of its routes.
        guard = Middleware(WebGuard, policy=policy_for(app.settings, "ui"))
        # /health on the UI port too (llama.cpp's readiness answer), behind the guard.
        options["app_kwargs"] = {"middleware": [guard, Middleware(HealthEndpoint, app=app)]}
        if css := extensions_ui.css(app):
            options["css"] = css
        if js := extensions_ui.js(app):
            options["js"] = js
    return options
