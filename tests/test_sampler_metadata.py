"""Each sampler field is described once, in its SamplingParams metadata (help, bounds, choices,
slider range), and every reader reads it: validation, the Parameters tab, the API schema, the
preset docs. A second description (a docstring under a field, a range typed in the UI or the
schema) fails here."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap

import pytest

from modules.api import schemas
from modules.core import loader_options, settings
from modules.core.errors import InvalidRequestError
from modules.core.sampling import PARAM_FIELDS, SamplingParams
from modules.engine.presets import parameter_docs

BOUNDED = [f for f in PARAM_FIELDS.values() if "bounds" in f.metadata]
_ALIAS_OF = {alias: ours for ours, names in schemas._ALIASES.items() for alias in names}
_ALIAS_OF.update({name: "stop" for name in schemas._STOP_FIELDS})


def _field_docstrings(cls: type) -> list[str]:
    """Names of the fields of `cls` written with a docstring under them."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    return [node.target.id for node, after in zip(body, body[1:], strict=False)
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)]


@pytest.mark.parametrize("cls", [SamplingParams, settings.ModelChoice, settings.Settings, *loader_options.LOADER_OPTIONS])
def test_no_field_carries_a_second_description(cls: type) -> None:
    assert _field_docstrings(cls) == []
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f.name


def test_the_preset_docs_are_the_metadata() -> None:
    assert parameter_docs() == {name: f.metadata["help"] for name, f in PARAM_FIELDS.items()}


@pytest.mark.parametrize("f", BOUNDED, ids=[f.name for f in BOUNDED])
def test_validation_enforces_the_declared_bounds(f: dataclasses.Field) -> None:
    low, high = f.metadata["bounds"]
    low_open = f.metadata.get("low_open", False)
    step = 1 if f.type == "int" else 0.5
    if high is not None:
        SamplingParams(**{f.name: high})
        with pytest.raises(InvalidRequestError) as err:
            SamplingParams(**{f.name: high + step})
        assert err.value.param == f.name
    if not low_open:
        SamplingParams(**{f.name: low})
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**{f.name: low if low_open else low - step})
    assert err.value.param == f.name


def test_validation_enforces_the_declared_choices() -> None:
    for f in PARAM_FIELDS.values():
        for choice in f.metadata.get("choices", ()):
            SamplingParams(**{f.name: choice})
        if "choices" in f.metadata:
            with pytest.raises(InvalidRequestError, match=f.name):
                SamplingParams(**{f.name: max(f.metadata["choices"]) + 1})


def test_every_slider_range_is_the_declared_one_within_the_bounds() -> None:
    import gradio as gr

    from modules.ui import parameters_tab
    from modules.ui.common import default_params

    with gr.Blocks():
        comps = parameters_tab._build_controls(default_params())
    sliders = {name: c for name, c in comps.items() if isinstance(c, gr.Slider)}
    assert set(sliders) == {name for name, f in PARAM_FIELDS.items() if "slider" in f.metadata}
    for name, slider in sliders.items():
        meta = PARAM_FIELDS[name].metadata
        assert (slider.minimum, slider.maximum, slider.step) == meta["slider"], name
        assert slider.info.startswith(meta["help"]), name
        low, high = meta.get("bounds", (-math.inf, math.inf))
        assert slider.minimum >= low and (high is None or slider.maximum <= high), name
    for name, comp in comps.items():
        assert comp.info.startswith(PARAM_FIELDS[name].metadata["help"]), name
        if isinstance(comp, gr.Radio):
            assert [c[1] for c in comp.choices] == list(PARAM_FIELDS[name].metadata["choices"])


@pytest.mark.parametrize("model", [schemas.CompletionRequest, schemas.ChatCompletionRequest,
                                   schemas.KoboldGenerateRequest, schemas.LogitsRequest])
def test_every_api_sampler_field_shows_the_declared_help_and_range(model: type) -> None:
    properties = model.model_json_schema()["properties"]
    checked = set()
    for name in schemas.SamplerFields.model_fields:
        ours = _ALIAS_OF.get(name, name)
        assert ours in PARAM_FIELDS, name
        meta, prop = PARAM_FIELDS[ours].metadata, properties[name]
        assert prop["description"] == meta["help"], name
        numbers = [arm for arm in prop.get("anyOf", [prop]) if arm.get("type") in ("number", "integer")]
        low, high = meta.get("bounds", (None, None))
        for arm in numbers:
            if low is not None:
                assert arm["exclusiveMinimum" if meta.get("low_open") else "minimum"] == low, name
            if high is not None:
                assert arm["maximum"] == high, name
            if "choices" in meta:
                assert arm["enum"] == list(meta["choices"]), name
        if low is not None or "choices" in meta:
            assert numbers, name
        checked.add(ours)
    internal = {name for name, f in PARAM_FIELDS.items() if f.metadata.get("internal")}
    assert internal == {"grammar_triggers"}
    assert checked == set(PARAM_FIELDS) - {"logprobs"} - internal  # logprobs: each dialect's own field and cap
