"""Session tab: extensions on/off, light/dark theme, the current flags, Save settings, Restart the UI.

Changes here go to `app.settings` at once and to settings.yaml on Save settings (with the
extensions' params). Extension hooks apply from the next generation; an extension's own
controls (its ui()) appear after Restart. Secrets are never shown.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any

import gradio as gr
import yaml

from modules.core.errors import WorkbenchError
from modules.core.settings import Settings
from modules.engine.app import App

log = logging.getLogger(__name__)

#: Settings never shown, even though they are flags.
SECRETS = ("api_key", "gradio_auth")
THEMES: tuple[str, ...] = next(f for f in dataclasses.fields(Settings) if f.name == "theme").metadata["choices"]
#: Sets or clears gradio's `dark` class on <body>; "system" follows the browser's preference.
APPLY_THEME_JS = """(theme) => {
  const dark = theme === 'dark' || (theme === 'system' && window.matchMedia('(prefers-color-scheme: dark)').matches);
  document.body.classList.toggle('dark', dark);
  return theme;
}"""
RESTART_DELAY_S = 1.0
RESTARTING = "Restarting the UI... **reload this page** in a few seconds. The loaded model stays loaded."


def create_ui(app: App, demo: gr.Blocks) -> None:
    """The Session tab's content (caller opens the tab); `demo` is used to apply the theme on page load."""
    found = list_extensions(app.root / "extensions")
    with gr.Row():
        with gr.Column():
            theme = gr.Radio(list(THEMES), value=app.settings.theme, label="Theme", elem_id="session-theme",
                             info="system follows your browser; Save settings to keep it for the next start.")
            if found:
                extensions = gr.CheckboxGroup(found, value=[e for e in app.settings.extensions if e in found],
                                              label="Extensions",
                                              info="Hooks apply at once; their controls appear after Restart.")
            else:
                gr.Markdown("**Extensions:** none installed. Put one in `extensions/NAME/script.py`.")
                extensions = None
            with gr.Row():
                save = gr.Button("Save settings", variant="primary")
                restart = gr.Button("Restart the UI", variant="stop")
            status = gr.Markdown("")
        with gr.Column():
            flags = gr.Code(flags_yaml(app.settings), language="yaml", interactive=False, label="Current flags")

    def on_theme(value: str) -> tuple[str, str]:
        return _update(app, theme=value), flags_yaml(app.settings)

    def on_extensions(value: list[str]) -> tuple[str, str]:
        names = list(value or [])
        loaded = app.set_extensions(names)
        failed = [n for n in names if n not in loaded]
        message = f"Extensions on: {', '.join(loaded) or 'none'}; press **Save settings** to keep this."
        if failed:
            message += f" **Could not load:** {', '.join(failed)} (see the log)."
        return message, flags_yaml(app.settings)

    def on_save() -> tuple[str, str]:
        try:
            path = app.save_settings()
        except (WorkbenchError, OSError) as exc:
            return f"**Could not save the settings:** {exc}", flags_yaml(app.settings)
        return f"Saved the settings to `{path.name}`.", flags_yaml(app.settings)

    def on_restart() -> str:
        # Set the event a moment later: server.py closes this UI as soon as it is set, and
        # the browser should still get this message before the connection goes away.
        threading.Timer(RESTART_DELAY_S, app.restart_requested.set).start()
        return RESTARTING

    theme.input(on_theme, theme, [status, flags], api_name="set_theme", queue=False).then(
        None, theme, None, js=APPLY_THEME_JS)
    if extensions is not None:
        extensions.input(on_extensions, extensions, [status, flags], api_name="set_extensions", queue=False)
    save.click(on_save, None, [status, flags], api_name="save_session_settings")
    restart.click(on_restart, None, status, api_name="restart_ui")
    demo.load(lambda: (app.settings.theme, flags_yaml(app.settings)), None, [theme, flags], queue=False).then(
        None, theme, None, js=APPLY_THEME_JS)


def list_extensions(folder: Path) -> list[str]:
    """Folder names in extensions/ that hold a script.py, sorted."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / "script.py").is_file())


def flags_yaml(settings: Settings) -> str:
    """Every setting as YAML, secrets replaced by '(hidden)' (or null when unset)."""
    values: dict[str, Any] = dataclasses.asdict(settings)
    for name in SECRETS:
        if values.get(name):
            values[name] = "(hidden)"
    return yaml.safe_dump(values, sort_keys=False, allow_unicode=True)


def _update(app: App, **changes: Any) -> str:
    try:
        app.update_settings(**changes)
    except WorkbenchError as exc:
        return f"**{exc}**"
    except TypeError as exc:
        log.warning("bad setting change %s: %s", changes, exc)
        return f"**Could not change the setting:** {exc}"
    shown = ", ".join(f"{k} = {v}" for k, v in changes.items())
    return f"Set {shown}; press **Save settings** to keep it for the next start."
