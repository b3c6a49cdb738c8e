"""Model tab: pick a model, see which loader fits and why, set its options, load, unload."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import gradio as gr

from modules.core.errors import WorkbenchError
from modules.core.settings import CLI_ONLY
from modules.engine.app import App
from modules.ui import download_panel
from modules.ui.components import setting_component

log = logging.getLogger(__name__)
AUTO = "auto"
MEMORY_OPTIONS = frozenset({"ctx_size", "cache_type", "dtype", "parallel"})
STATUS_POLL_S = 2.0
"""How often the model status line looks for a change made elsewhere (an API request
switching models, the idle timer unloading one)."""
NO_MODELS = ("No models yet. Put a `.gguf` file (or a Hugging Face model folder) in `{dir}`, "
             "then press Refresh.")


def create_ui(app: App) -> None:
    statuses = app.models.loader_statuses()
    with gr.Row():
        model = gr.Dropdown(app.models.list_models(), value=app.models.name, label="Model", scale=4)
        refresh = gr.Button("Refresh", scale=1)
        loader = gr.Dropdown([AUTO] + [s.name for s in statuses], value=AUTO, label="Loader", scale=2)
    choice = gr.Markdown(_describe(app, app.models.name, AUTO))
    groups, inputs, names_by_loader = {}, [], {}
    initial = _chosen_loader(app, app.models.name, AUTO)
    for status in statuses:
        # The exposure switches (remote code, pickles) are command-line only: shown, not editable.
        editable = tuple(n for n in status.option_names if n not in CLI_ONLY)
        with gr.Group(visible=status.name == initial) as group:
            if not status.available:
                gr.Markdown(f"**Unavailable:** {status.reason}")
            inputs.extend(_option_grid(app, editable))
            fixed = [n for n in status.option_names if n in CLI_ONLY]
            if fixed:
                gr.Markdown(_cli_only_note(app, fixed))
        groups[status.name] = group
        names_by_loader[status.name] = editable
    with gr.Row():
        load = gr.Button("Load", variant="primary")
        unload = gr.Button("Unload")
        save = gr.Button("Save settings for this model")
    memory_line = gr.Markdown(download_panel.memory_note(app, app.models.name))
    status_line = gr.Markdown(_status(app))
    _follow_status(app, status_line, _status)
    with gr.Accordion("Download a model", open=False):
        downloaded = download_panel.create_ui(app)

    option_names = [n for names in names_by_loader.values() for n in names]
    group_list = list(groups.values())

    def on_pick(name: str | None, loader_name: str) -> list[Any]:
        chosen = _chosen_loader(app, name, loader_name)
        saved = _saved(app, name)
        values = [gr.update(value=saved.get(n, getattr(app.settings, n))) for n in option_names]
        return [_describe(app, name, loader_name)] + [gr.update(visible=k == chosen) for k in groups] + values

    def on_refresh() -> Any:
        names = app.models.list_models()
        return gr.update(choices=names, value=app.models.name)

    def chosen_options(name: str, loader_name: str, values: tuple[Any, ...]) -> dict[str, Any]:
        """The option inputs of the loader that will load `name`, by option name."""
        wanted = set(names_by_loader.get(_chosen_loader(app, name, loader_name) or "", ()))
        return {n: _clean(v) for n, v in zip(option_names, values, strict=True) if n in wanted}

    def on_load(name: str | None, loader_name: str, *values: Any) -> str:
        if not name:
            return "Pick a model first."
        overrides = chosen_options(name, loader_name, values)
        try:
            app.models.load(name, loader=None if loader_name == AUTO else loader_name, overrides=overrides)
        except WorkbenchError as exc:
            return f"**Could not load {name}:** {exc}"
        except Exception as exc:  # noqa: BLE001 - a backend crash must not take the UI down
            log.exception("loading %s failed", name)
            return f"**Could not load {name}:** {type(exc).__name__}: {exc}"
        return _status(app)

    def on_save(name: str | None, loader_name: str, *values: Any) -> str:
        if not name:
            return "Pick a model first."
        options = chosen_options(name, loader_name, values)
        try:
            path = app.models.save_settings(name, None if loader_name == AUTO else loader_name, options)
        except (WorkbenchError, OSError) as exc:
            return f"**Could not save the settings:** {exc}"
        return f"Saved the settings for {name} in {path.parent.name}/{path.name}; its next load uses them."

    def on_unload() -> str:
        app.models.unload()
        return _status(app)

    for trigger in (model.change, loader.change):
        trigger(on_pick, [model, loader], [choice] + group_list + inputs)
    refresh.click(on_refresh, None, model)
    def on_memory(name: str | None, loader_name: str, *values: Any) -> str:
        return download_panel.memory_note(app, name, chosen_options(name, loader_name, values) if name else None)

    model.change(on_memory, [model, loader] + inputs, memory_line)
    for option_name, component in zip(option_names, inputs, strict=True):
        if option_name in MEMORY_OPTIONS:  # the estimate follows the context, cache and slots typed in
            component.change(on_memory, [model, loader] + inputs, memory_line)
    downloaded.then(on_refresh, None, model)
    load.click(on_load, [model, loader] + inputs, status_line, api_name="load_model")
    unload.click(on_unload, None, status_line, api_name="unload_model")
    save.click(on_save, [model, loader] + inputs, status_line, api_name="save_settings")


def _option_grid(app: App, names: tuple[str, ...], per_row: int = 4) -> list[Any]:
    """Option inputs laid out in rows (fields first, then the check boxes), in `names` order."""
    fields = [n for n in names if not isinstance(getattr(app.settings, n), bool)]
    boxes = [n for n in names if isinstance(getattr(app.settings, n), bool)]
    built: dict[str, Any] = {}
    for start in range(0, len(fields), per_row):
        with gr.Row():
            for name in fields[start : start + per_row]:
                built[name] = setting_component(name, getattr(app.settings, name))
    if boxes:
        with gr.Row():
            for name in boxes:
                built[name] = setting_component(name, getattr(app.settings, name))
    return [built[n] for n in names]


def _cli_only_note(app: App, names: list[str]) -> str:
    shown = ", ".join(f"`--{n.replace('_', '-')}` {'on' if getattr(app.settings, n) else 'off'}" for n in names)
    return f"{shown} (set on the command line or in CMD_FLAGS.txt only)"


def _saved(app: App, name: str | None) -> dict[str, Any]:
    """The options saved for `name`; {} when none (or the file cannot be read)."""
    if not name:
        return {}
    try:
        return app.models.saved_settings(name)
    except WorkbenchError:
        return {}


def _chosen_loader(app: App, name: str | None, loader_name: str) -> str | None:
    if loader_name != AUTO:
        return loader_name
    if not name:
        return None
    saved = _saved(app, name).get("loader")
    if saved:
        return str(saved)
    try:
        return app.models.infer(name).loader
    except WorkbenchError:
        return None


def _describe(app: App, name: str | None, loader_name: str) -> str:
    if not app.models.list_models():
        return NO_MODELS.format(dir=app.models.models_dir)
    if not name:
        return "Pick a model."
    if loader_name != AUTO:
        return f"Loader **{loader_name}**, chosen by you."
    saved = _saved(app, name).get("loader")
    if saved:
        return f"Loader **{saved}**, saved for this model (pick another to override)."
    try:
        choice = app.models.infer(name)
    except WorkbenchError as exc:
        return f"**Cannot load {name}:** {exc}"
    return f"Loader **{choice.loader}**, because {choice.reason}."


def _status(app: App) -> str:
    """The status line: the load report, or what the model is doing (loading, unloaded while idle)."""
    status = app.models.status()
    report = app.models.report
    if status.state == "loaded" and report is not None:
        return report.summary()
    return status.text()


def status_badge(app: App) -> Any:
    """A line that appears (on every tab) while the model is loading or was unloaded while idle,
    and says so: API requests switch models and the idle timer unloads them behind the UI's back."""
    badge = gr.Markdown(_badge(app), visible=bool(_badge(app)))
    _follow_status(app, badge, _badge, hide_empty=True)
    return badge


def _badge(app: App) -> str:
    status = app.models.status()
    return f"*{status.text()}*" if status.state in ("loading", "idle") else ""


def _follow_status(app: App, line: Any, render: Callable[[App], str], hide_empty: bool = False) -> None:
    """Re-render `line` every STATUS_POLL_S seconds, only when the model's status changed (so a
    message a button left there stays until the model itself changes)."""
    seen = gr.State(app.models.status())
    timer = gr.Timer(STATUS_POLL_S)

    def on_tick(last: Any) -> tuple[Any, Any]:
        now = app.models.status()
        if now == last:
            return gr.skip(), gr.skip()
        text = render(app)
        return (gr.update(value=text, visible=bool(text)) if hide_empty else text), now

    timer.tick(on_tick, seen, [line, seen], show_progress="hidden", queue=False)


def _clean(value: Any) -> Any:
    """Gradio gives floats for integer Numbers in some versions; options want ints there."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
