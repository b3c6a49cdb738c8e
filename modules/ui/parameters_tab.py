"""Parameters tab: every sampler field, presets (load, save, save as, delete), the Character sub-tab.

Each control writes the browser session's `params` gr.State (a dict of SamplingParams
fields) as soon as the user changes it, so Chat, Default and Notebook generate with it.
Controls are built from one table of ranges; their tooltips are the SamplingParams field
docstrings. Presets live in `settings.presets_dir` through modules/presets.PresetStore.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import gradio as gr

from modules.core.errors import InvalidRequestError, WorkbenchError
from modules.core.sampling import SAMPLER_NAMES, parse_stop_strings
from modules.core.settings import resolve_path
from modules.engine.app import App
from modules.engine.presets import PresetStore, apply_preset, check_preset_name, parameter_docs, validate
from modules.ui.common import default_params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Spec:
    """How one SamplingParams field is shown: a slider (low, high, step), number, box, text."""

    kind: str
    low: float = 0.0
    high: float = 1.0
    step: float = 0.01
    lines: int = 1


S = Spec  # the table below reads better short
GENERATION: dict[str, Spec] = {
    "max_new_tokens": S("slider", 1, 8192, 1), "truncation_length": S("number"), "seed": S("number"),
    "stop": S("text"), "custom_token_bans": S("text"), "logit_bias": S("text"),
    "ban_eos_token": S("check"), "add_bos_token": S("check"), "skip_special_tokens": S("check"),
}
SAMPLERS: dict[str, Spec] = {
    "temperature": S("slider", 0, 5), "top_k": S("slider", 0, 200, 1), "top_p": S("slider"),
    "min_p": S("slider"), "typical_p": S("slider"), "top_n_sigma": S("slider", 0, 5),
    "repetition_penalty": S("slider", 1, 2), "repetition_penalty_range": S("slider", 0, 16384, 1),
    "presence_penalty": S("slider", -2, 2, 0.05), "frequency_penalty": S("slider", -2, 2, 0.05),
    "dry_multiplier": S("slider", 0, 5), "dry_base": S("slider", 1, 4), "dry_allowed_length": S("slider", 0, 20, 1),
    "dry_penalty_last_n": S("slider", 0, 16384, 1), "dry_sequence_breakers": S("text"),
    "xtc_threshold": S("slider", 0, 0.5), "xtc_probability": S("slider"),
    "mirostat_mode": S("radio"), "mirostat_tau": S("slider", 0, 10), "mirostat_eta": S("slider"),
    "temperature_last": S("check"),
}
ORDER: dict[str, Spec] = {"sampler_priority": S("text", lines=len(SAMPLER_NAMES)), "grammar_string": S("text", lines=6)}
SPECS: dict[str, Spec] = {**GENERATION, **SAMPLERS, **ORDER}
_HINTS = {
    "truncation_length": " 0 = the loaded model's context length.",
    "seed": " -1 = random.",
    "stop": ' Comma-separated, JSON quoting for escapes: "\\nUser:", "###"',
    "custom_token_bans": " Comma-separated token ids: 1, 2, 3",
    "logit_bias": ' JSON: {"123": -100, "456": 5}',
    "dry_sequence_breakers": ' JSON strings: "\\n", ":", "\\""',
    "sampler_priority": " One name per line: " + ", ".join(SAMPLER_NAMES),
}


def create_ui(app: App, params: gr.State) -> None:
    """The Parameters tab's content (caller opens the tab), writing `params` on every change."""
    store = PresetStore(resolve_path(app.root, app.settings.presets_dir))
    names = store.list()
    with gr.Tab("Generation"):
        with gr.Row():
            preset = gr.Dropdown(names, value="Default" if "Default" in names else None, label="Preset", elem_id="preset-name",
                                 allow_custom_value=True, scale=3)  # another session may add presets
            save = gr.Button("Save", scale=1, elem_id="preset-save")
            delete = gr.Button("Delete", variant="stop", scale=1, elem_id="preset-delete")
            new_name = gr.Textbox(label="Save as", placeholder="new preset name", scale=2, elem_id="preset-new-name")
            save_as = gr.Button("Save as", scale=1, elem_id="preset-save-as")
        status = gr.Markdown("", elem_id="preset-status")
        comps = _build_controls(default_params())
        # For scripts and tests (gradio_client cannot reach a gr.State): /set_params takes a JSON object.
        overrides = gr.Textbox(visible=False)
        set_params = gr.Button(visible=False)
    _character_subtab(app)
    names_in_order = list(comps)
    outputs = [params, status] + [comps[n] for n in names_in_order]

    def on_load(name: str | None, state: dict[str, Any]) -> list[Any]:
        try:
            new = apply_preset(state or default_params(), store.load(check_preset_name(name)))
        except WorkbenchError as exc:
            return [state, _error(exc)] + [gr.update() for _ in names_in_order]
        return [new, f"Loaded preset **{name}**."] + [to_display(n, new[n]) for n in names_in_order]

    def on_save(name: str | None, state: dict[str, Any]) -> str:
        return _save(store, name, state)[1]

    def on_save_as(name: str, state: dict[str, Any]) -> tuple[Any, str]:
        saved, message = _save(store, name, state)
        if saved is None:
            return gr.update(), message
        return gr.update(choices=store.list(), value=saved), message

    def on_delete(name: str | None) -> tuple[Any, str]:
        if not name:
            return gr.update(), "Pick a preset to delete."
        try:
            store.delete(check_preset_name(name))
        except WorkbenchError as exc:
            return gr.update(), _error(exc)
        return gr.update(choices=store.list(), value=None), f"Deleted preset **{name}**."

    def on_set(text: str, state: dict[str, Any]) -> list[Any]:
        try:
            changes = _parse_json_object(text or "", "params")
            new = dict(state or default_params()) | changes
            validate(new)
        except WorkbenchError as exc:
            return [state, _error(exc)] + [gr.update() for _ in names_in_order]
        return [new, "Parameters set."] + [to_display(n, new[n]) for n in names_in_order]

    set_params.click(on_set, [overrides, params], outputs, api_name="set_params")
    preset.focus(lambda: gr.update(choices=store.list()), None, preset, queue=False, api_visibility="private")
    preset.input(on_load, [preset, params], outputs, api_name="load_preset")
    save.click(on_save, [preset, params], status, api_name="save_preset")
    save_as.click(on_save_as, [new_name, params], [preset, status], api_name="save_preset_as")
    new_name.submit(on_save_as, [new_name, params], [preset, status], api_visibility="private")
    delete.click(on_delete, preset, [preset, status], api_name="delete_preset",
                 js="(name) => (name && confirm(`Delete preset ${name}?`)) ? name : null")
    for name, comp in comps.items():
        _wire_field(name, comp, params, status)


def _build_controls(values: dict[str, Any]) -> dict[str, Any]:
    comps: dict[str, Any] = {}
    with gr.Accordion("Generation", open=True):
        _grid(GENERATION, values, comps, per_row=3)
    with gr.Accordion("Samplers", open=True):
        _grid(SAMPLERS, values, comps, per_row=4)
    with gr.Accordion("Sampler order and grammar", open=False), gr.Row():
        for name, spec in ORDER.items():
            comps[name] = _component(name, spec, values[name])
    return comps


def _grid(specs: dict[str, Spec], values: dict[str, Any], comps: dict[str, Any], per_row: int) -> None:
    items = list(specs.items())
    for start in range(0, len(items), per_row):
        with gr.Row():
            for name, spec in items[start : start + per_row]:
                comps[name] = _component(name, spec, values[name])


def _component(name: str, spec: Spec, value: Any) -> Any:
    info = parameter_docs().get(name, "") + _HINTS.get(name, "")
    shown, elem_id = to_display(name, value), f"param-{name}"
    if spec.kind == "slider":
        return gr.Slider(spec.low, spec.high, value=shown, step=spec.step, label=name, info=info,
                         elem_id=elem_id)
    if spec.kind == "number":
        return gr.Number(value=shown, precision=0, label=name, info=info, elem_id=elem_id)
    if spec.kind == "check":
        return gr.Checkbox(value=shown, label=name, info=info, elem_id=elem_id)
    if spec.kind == "radio":
        return gr.Radio([0, 1, 2], value=shown, label=name, info=info, elem_id=elem_id)
    return gr.Textbox(value=shown, label=name, info=info, lines=spec.lines, max_lines=max(spec.lines, 20),
                      elem_id=elem_id)


def _wire_field(name: str, comp: Any, params: gr.State, status: gr.Markdown) -> None:
    """User edits of one control update the session state; a bad value is explained, not raised."""

    def on_input(raw: Any, state: dict[str, Any]) -> tuple[dict[str, Any], str]:
        state = state or default_params()
        try:
            candidate = state | {name: from_display(name, raw)}
            checked = validate(candidate)
        except (WorkbenchError, ValueError, TypeError) as exc:
            return state, _error(exc)
        return candidate | {name: getattr(checked, name)}, ""

    # Text boxes update on blur (and Enter when single-line): a half-typed JSON value must
    # not flash an error on every key press.
    if isinstance(comp, gr.Textbox):
        triggers = [comp.blur] + ([comp.submit] if SPECS[name].lines == 1 else [])
    else:
        triggers = [comp.input]
    for trigger in triggers:
        trigger(on_input, [comp, params], [params, status], api_visibility="private", queue=False)


def to_display(name: str, value: Any) -> Any:
    """A state value as its control shows it (lists and dicts as editable text)."""
    if name == "seed":
        return -1 if value is None else value
    if name in ("stop", "dry_sequence_breakers"):
        return ", ".join(json.dumps(s, ensure_ascii=False) for s in value or [])
    if name == "custom_token_bans":
        return ", ".join(str(i) for i in value or [])
    if name == "logit_bias":
        return json.dumps({str(k): v for k, v in (value or {}).items()}) if value else ""
    if name == "sampler_priority":
        return "\n".join(value or [])
    return value


def from_display(name: str, raw: Any) -> Any:
    """A control's value as a state value; InvalidRequestError naming the field if it cannot be read."""
    spec = SPECS[name]
    if spec.kind in ("slider", "number", "radio"):
        if raw is None or raw == "":
            raise InvalidRequestError(f"{name} needs a number", name)
        number = float(raw)
        return int(number) if spec.step == 1 or spec.kind in ("number", "radio") else number
    if spec.kind == "check":
        return bool(raw)
    text = raw or ""
    if name == "stop":
        return parse_stop_strings(text)
    if name == "logit_bias":
        return _parse_json_object(text, name)
    if name == "sampler_priority":
        return _parse_priority(text)
    return text  # custom_token_bans, dry_sequence_breakers, grammar: SamplingParams parses them


def _parse_json_object(text: str, name: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise InvalidRequestError(f'{name} must be JSON such as {{"123": -100}}, got {text!r}', name) from None
    if not isinstance(value, dict):
        raise InvalidRequestError(f'{name} must be JSON such as {{"123": -100}}', name)
    return value


def _parse_priority(text: str) -> list[str]:
    names = [s.strip() for s in text.replace(",", "\n").splitlines() if s.strip()]
    unknown = [s for s in names if s not in SAMPLER_NAMES]
    if unknown:
        raise InvalidRequestError(
            f"unknown sampler {', '.join(unknown)}; the names are {', '.join(SAMPLER_NAMES)}", "sampler_priority"
        )
    return names


def _save(store: PresetStore, name: str | None, state: dict[str, Any]) -> tuple[str | None, str]:
    """(the saved name or None, a message for the status line)."""
    try:
        clean = check_preset_name(name)
        store.save(clean, state or default_params())
    except WorkbenchError as exc:
        return None, _error(exc)
    except OSError as exc:
        return None, f"**Could not save the preset:** {exc}"
    return clean, f"Saved preset **{clean}**."


def _error(exc: Exception) -> str:
    return f"**{exc}**" if str(exc) else f"**{type(exc).__name__}**"


def _character_subtab(app: App) -> None:
    """The Character sub-tab from modules/ui/character_tab.py, when that module is present."""
    try:
        character_tab = importlib.import_module("modules.ui.character_tab")
    except ModuleNotFoundError as exc:
        if exc.name != "modules.ui.character_tab":
            raise
        log.info("modules/ui/character_tab.py is not there: no Character sub-tab")
        return
    with gr.Tab("Character"):
        character_tab.create_ui(app)
