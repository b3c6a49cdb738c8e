"""What the tabs share: the per-session sampler parameters and error display.

The Parameters tab writes the browser session's sampler settings into one gr.State (a
dict of SamplingParams fields); Chat, Default and Notebook read it as an input of their
generate events. gr.State is per browser session, so two tabs never share settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from modules.core.sampling import SamplingParams
from modules.engine.generation import GenerationChunk

#: The UI's starting point before any preset is applied: a sane chat default.
UI_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 512,
    "temperature": 0.7,
    "top_p": 0.9,
    "min_p": 0.05,
    "repetition_penalty": 1.05,
}


def default_params() -> dict[str, Any]:
    """A fresh dict of every SamplingParams field, with the UI defaults laid over."""
    values = dataclasses.asdict(SamplingParams())
    values.update(UI_DEFAULTS)
    return values


def sampling_from_state(state: dict[str, Any] | None, **overrides: Any) -> SamplingParams:
    """The session's SamplingParams (validated: raises InvalidRequestError on a bad value)."""
    values = dict(state or default_params())
    values.update(overrides)
    return SamplingParams.from_mapping(values)


def speed_text(chunk: GenerationChunk, seconds: float) -> str:
    """'N tokens, R tokens/s' under a reply, then why it ended and any prompt cut."""
    rate = chunk.completion_tokens / seconds if seconds > 0 else 0.0
    text = f"{chunk.completion_tokens} tokens, {rate:.1f} tokens/s"
    if chunk.finish_reason:
        text += f" · {chunk.finish_reason}"
    if chunk.truncated_tokens:
        text += f" · {chunk.truncated_tokens} old prompt tokens left out to fit"
    return text
