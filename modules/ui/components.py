"""Builders for components generated from the typed settings."""

from __future__ import annotations

import dataclasses
from typing import Any

import gradio as gr

from modules.core.settings import Settings

_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def setting_component(name: str, value: Any) -> gr.components.Component:
    """An input for the setting `name` (a loader option's is declared in modules/core/loader_options.py):
    a Dropdown of its choices, a Checkbox, a Number within its bounds or a Textbox, its help as the info line."""
    f = _FIELDS[name]
    label = name.replace("_", " ")
    info = f.metadata.get("help")
    if "choices" in f.metadata:
        return gr.Dropdown(list(f.metadata["choices"]), value=value, label=label, info=info)
    if f.type == "bool":
        return gr.Checkbox(value=bool(value), label=label, info=info)
    if f.type in ("int", "float"):
        low, high = f.metadata.get("bounds", (None, None))
        return gr.Number(value=value, label=label, info=info, precision=0 if f.type == "int" else None,
                         minimum=low, maximum=high)
    return gr.Textbox(value=value or "", label=label, info=info)
