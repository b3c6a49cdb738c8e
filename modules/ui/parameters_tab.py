"""Parameters tab: every sampler field, presets (load, save, save as, delete), the Character sub-tab.

Each control writes the browser session's `params` gr.State (a dict of SamplingParams
fields) as soon as the user changes it, so Chat, Default and Notebook generate with it.
Each control is built from its SamplingParams field's metadata: the slider range and step,
the choices, the help as its tooltip. Presets live in `settings.presets_dir` through modules/presets.PresetStore.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import gradio as gr

from modules.core.errors import InvalidRequestError, WorkbenchError
from modules.core.sampling import PARAM_FIELDS, SAMPLER_NAMES, parse_stop_strings
from modules.core.settings import resolve_path
from modules.engine.app import App
from modules.engine.presets import PresetStore, apply_preset, check_preset_name, parameter_docs, validate
from modules.ui.common import default_params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Spec:
    """How one SamplingParams field is shown: a slider (low, high, step), number, box, radio, text."""

    kind: str
    low: float = 0.0
    high: float = 1.0
    step: float = 0.01
    lines: int = 1


#: The controls in the order they are laid out; how each is shown comes from its field (`_spec`).
GENERATION: tuple[str, ...] = ("max_new_tokens", "truncation_length", "seed", "stop", "custom_token_bans",
                               "logit_bias", "ban_eos_token", "add_bos_token", "skip_special_tokens")
SAMPLERS: tuple[str, ...] = (
    "temperature", "top_k", "top_p", "min_p", "typical_p", "top_n_sigma", "repetition_penalty",
    "repetition_penalty_range", "presence_penalty", "frequency_penalty", "dry_multiplier", "dry_base",
    "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers", "xtc_threshold", "xtc_probability",
    "mirostat_mode", "mirostat_tau", "mirostat_eta", "temperature_last",
)
ORDER: tuple[str, ...] = ("sampler_priority", "grammar_string")
_TEXT_LINES = {"sampler_priority": len(SAMPLER_NAMES), "grammar_string": 6}


def _spec(name: str) -> Spec:
    """The control for a field: a slider over its `slider` range, a radio of its choices, a check box
    for a bool, a number box for a whole number without a slider, text for the rest."""
    f = PARAM_FIELDS[name]
    if "slider" in f.metadata:
        low, high, step = f.metadata["slider"]
        return Spec("slider", low, high, step)
    if "choices" in f.metadata:
        return Spec("radio")
    if f.type == "bool":
        return Spec("check")
    if f.type in ("int", "int | None"):
        return Spec("number")
    return Spec("text", lines=_TEXT_LINES.get(name, 1))


SPECS: dict[str, Spec] = {name: _spec(name) for name in GENERATION + SAMPLERS + ORDER}
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
        for name in ORDER:
            comps[name] = _component(name, values[name])
    return comps


def _grid(names: tuple[str, ...], values: dict[str, Any], comps: dict[str, Any], per_row: int) -> None:
    for start in range(0, len(names), per_row):
        with gr.Row():
            for name in names[start : start + per_row]:
                comps[name] = _component(name, values[name])


def _component(name: str, value: Any) -> Any:
    spec = SPECS[name]
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
        return gr.Radio(list(PARAM_FIELDS[name].metadata["choices"]), value=shown, label=name, info=info, elem_id=elem_id)
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
