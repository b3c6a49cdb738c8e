"""Extensions in the web UI: each enabled extension's ui(), its CSS/JS, and its errors as warnings.

The engine owns the registry (modules/engine/extensions.py); this module only places an
extension's controls (its own tab with `params["is_tab"]`, else an accordion in the
Extensions tab) and turns the registry's error queue into gr.Warning toasts.
"""

from __future__ import annotations

import logging

import gradio as gr

from modules.engine.app import App

log = logging.getLogger(__name__)


def create_ui(app: App) -> None:
    """The enabled extensions' controls; call inside the Blocks, after the other tabs."""
    registry = app.extensions
    with_ui = [e for e in registry.enabled if "ui" in e.hooks]
    if not with_ui:
        return
    boxed = [e for e in with_ui if not e.params.get("is_tab")]
    for ext in with_ui:
        if ext.params.get("is_tab"):
            with gr.Tab(ext.display_name):
                registry.call(ext, "ui")
    if boxed:
        with gr.Tab("Extensions"):
            for ext in boxed:
                with gr.Accordion(ext.display_name, open=True):
                    registry.call(ext, "ui")


def css(app: App) -> str:
    """Every enabled extension's custom_css(), joined."""
    return "\n".join(str(c) for c in app.extensions.collect("custom_css"))


def js(app: App) -> str:
    """Every enabled extension's custom_js(), joined (gradio runs it once on page load)."""
    parts = [str(j) for j in app.extensions.collect("custom_js")]
    return "() => {\n" + "\n".join(parts) + "\n}" if parts else ""


def show_errors(app: App) -> None:
    """Show each extension failure reported since the last call as a warning toast (once)."""
    for message in app.extensions.drain_errors():
        gr.Warning(message)
