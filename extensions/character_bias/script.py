"""Character bias: a fixed string placed where the character's reply starts, every time.

The string goes into the prompt through bot_prefix_modifier, so the model writes its reply
as a continuation of it (say, "*I am so happy*" to keep the character cheerful); like in
text-generation-webui, it is not part of the saved reply.
"""

from __future__ import annotations

from typing import Any

params: dict[str, Any] = {
    "display_name": "Character bias",
    "is_tab": False,
    "activate": True,
    "bias_string": "*I am so happy*",
}


def bot_prefix_modifier(prefix: str, state: dict[str, Any]) -> str:
    """`prefix` (the open reply line, e.g. "Alice:") followed by the bias string when active."""
    bias = str(params.get("bias_string") or "").strip()
    if not params.get("activate") or not bias:
        return prefix
    return f"{prefix} {bias}" if prefix else bias


def ui() -> None:
    """A switch and the bias text; changes apply to the next reply (Save settings keeps them)."""
    import gradio as gr  # only when the web UI is built

    activate = gr.Checkbox(value=bool(params["activate"]), label="Activate character bias")
    text = gr.Textbox(value=str(params["bias_string"]), label="Bias string",
                      info="Placed where every reply starts, e.g. *I am so happy*.")
    activate.change(lambda value: params.update(activate=bool(value)), activate, None, api_visibility="private")
    text.change(lambda value: params.update(bias_string=str(value)), text, None, api_visibility="private")
