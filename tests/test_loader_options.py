"""Each loader option is described once (modules/core/loader_options.py), and every reader reads it:
the loaders' options classes, Settings, the flags, check_option and the Model tab's controls."""

from __future__ import annotations

import dataclasses

import pytest

from loaders import get_loader, loader_names
from modules.core import loader_options
from modules.core.errors import InvalidRequestError
from modules.core.loader_options import LOADER_OPTIONS
from modules.core.settings import CLI_ONLY, Settings, build_parser, check_option, flag_name

SETTINGS_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
OPTION_FIELDS = [(cls, f) for cls in LOADER_OPTIONS for f in dataclasses.fields(cls)]


def _ids(pair: tuple[type, dataclasses.Field]) -> str:
    return f"{pair[0].__name__}.{pair[1].name}"


def test_every_loader_takes_its_options_class_from_the_core() -> None:
    for name in loader_names():
        cls = get_loader(name).options_class
        if cls.__module__.startswith("tests."):
            continue  # the fake loader of the tests
        assert cls in LOADER_OPTIONS, name
        assert cls.__module__ == loader_options.__name__, name


@pytest.mark.parametrize("pair", OPTION_FIELDS, ids=[_ids(p) for p in OPTION_FIELDS])
def test_settings_field_is_the_option_declaration(pair: tuple[type, dataclasses.Field]) -> None:
    """Settings inherits the option: same type, default and metadata, never a second copy."""
    cls, option = pair
    setting = SETTINGS_FIELDS[option.name]
    assert setting.type == option.type
    assert setting.default == option.default
    assert dict(setting.metadata) == dict(option.metadata)
    assert {"group", "help"} <= set(option.metadata)


def test_an_option_several_loaders_take_is_declared_once() -> None:
    """parallel, cpu, trust_remote_code, no_flash_attn: the classes share one metadata mapping."""
    by_name: dict[str, list[dataclasses.Field]] = {}
    for _, f in OPTION_FIELDS:
        by_name.setdefault(f.name, []).append(f)
    shared = {name: fields for name, fields in by_name.items() if len(fields) > 1}
    assert {"parallel", "cpu", "trust_remote_code", "no_flash_attn"} <= set(shared)
    for name, fields in shared.items():
        first = fields[0]
        for other in fields[1:]:
            assert other.metadata == first.metadata and other.default == first.default, name
            assert other.type == first.type, name


def test_no_settings_field_outside_the_loader_options_belongs_to_a_loader_group() -> None:
    option_names = {f.name for _, f in OPTION_FIELDS}
    loader_groups = {f.metadata["group"] for _, f in OPTION_FIELDS}
    for name, f in SETTINGS_FIELDS.items():
        assert (f.metadata["group"] in loader_groups) == (name in option_names), name


def test_the_loaders_own_tables_match_the_declared_choices() -> None:
    from loaders.exllamav2 import CACHE_CLASSES
    from loaders.gptq import BACKENDS
    from loaders.llama_cpp import CACHE_TYPES
    from loaders.transformers import DTYPES

    assert set(SETTINGS_FIELDS["cache_type"].metadata["choices"]) == set(CACHE_TYPES)
    assert set(SETTINGS_FIELDS["exl2_cache"].metadata["choices"]) == set(CACHE_CLASSES)
    assert SETTINGS_FIELDS["gptq_backend"].metadata["choices"] == BACKENDS
    assert SETTINGS_FIELDS["dtype"].metadata["choices"] == DTYPES


@pytest.mark.parametrize("pair", OPTION_FIELDS, ids=[_ids(p) for p in OPTION_FIELDS])
def test_flag_reads_the_declaration(pair: tuple[type, dataclasses.Field]) -> None:
    _, option = pair
    actions = {a.dest: a for a in build_parser()._actions}
    action = actions[option.name]
    assert action.option_strings == [flag_name(option.name)]
    assert action.help.startswith(option.metadata["help"])
    assert tuple(action.choices or ()) == tuple(option.metadata.get("choices", ()))


@pytest.mark.parametrize("pair", [p for p in OPTION_FIELDS if "bounds" in p[1].metadata],
                         ids=[_ids(p) for p in OPTION_FIELDS if "bounds" in p[1].metadata])
def test_check_option_enforces_the_declared_bounds(pair: tuple[type, dataclasses.Field]) -> None:
    _, option = pair
    low, high = option.metadata["bounds"]
    assert check_option(option.name, low) == low and check_option(option.name, high) == high
    step = 1 if option.type == "int" else 0.5
    for bad in (low - step, high + step):
        with pytest.raises(InvalidRequestError) as err:
            check_option(option.name, bad)
        assert err.value.param == option.name


@pytest.mark.parametrize("pair", OPTION_FIELDS, ids=[_ids(p) for p in OPTION_FIELDS])
def test_model_tab_control_reads_the_declaration(pair: tuple[type, dataclasses.Field]) -> None:
    import gradio as gr

    from modules.ui.components import setting_component

    _, option = pair
    if option.name in CLI_ONLY:
        return  # shown as a note, never as a control
    with gr.Blocks():
        comp = setting_component(option.name, option.default)
    assert comp.info == option.metadata["help"]
    if "choices" in option.metadata:
        assert isinstance(comp, gr.Dropdown)
        assert [c[1] for c in comp.choices] == list(option.metadata["choices"])
    elif option.type == "bool":
        assert isinstance(comp, gr.Checkbox)
    elif option.type in ("int", "float"):
        assert isinstance(comp, gr.Number)
        assert (comp.minimum, comp.maximum) == option.metadata.get("bounds", (None, None))
    else:
        assert isinstance(comp, gr.Textbox)
