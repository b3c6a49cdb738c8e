"""The event chain the text tabs share: start a stream, show it growing, stop it, count tokens.

Default and Notebook differ only in how they build the prompt and where the text goes;
everything from "submit to the generator" to "tokens/s" is here, once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import gradio as gr

from modules.core.errors import WorkbenchError
from modules.core.sampling import SamplingParams
from modules.engine.app import App
from modules.engine.generation import Stream
from modules.ui import extensions_ui
from modules.ui.common import sampling_from_state, speed_text

NO_MODEL_COUNT = "load a model to count tokens"


class SessionStreams:
    """The running stream of each browser session, so Stop in one tab never stops another's."""

    def __init__(self) -> None:
        self._running: dict[str, Stream] = {}

    def stop(self, request: gr.Request) -> None:
        stream = self._running.get(request.session_hash or "")
        if stream is not None:
            stream.cancel()

    def run(self, app: App, prompt: str, params: SamplingParams, request: gr.Request,
            prefix: str = "") -> Iterator[tuple[str, str]]:
        """Yield (prefix + text so far, speed line); engine errors become a gr.Error message."""
        key = request.session_hash or ""
        try:
            stream = app.generator.submit(prompt, params)
        except WorkbenchError as exc:
            raise gr.Error(str(exc)) from None
        self._running[key] = stream
        start = time.perf_counter()
        yield prefix, "generating..."
        try:
            for chunk in stream:
                yield prefix + chunk.text, speed_line(chunk, time.perf_counter() - start)
        except WorkbenchError as exc:
            raise gr.Error(str(exc)) from None
        finally:
            stream.cancel()
            extensions_ui.show_errors(app)
            if self._running.get(key) is stream:
                del self._running[key]


def params_or_error(state: dict[str, Any] | None) -> SamplingParams:
    """The session's SamplingParams; a bad value is a gr.Error naming it, not a stack trace."""
    try:
        return sampling_from_state(state)
    except WorkbenchError as exc:
        raise gr.Error(f"Parameters tab: {exc}") from None


def count_tokens(app: App, text: str) -> str:
    """'N tokens' for `text` with the loaded model's tokenizer, or why it cannot be counted."""
    model = app.models.current
    if model is None:
        return NO_MODEL_COUNT
    try:
        n = len(model.encode(text or "", add_bos=True))
    except Exception as exc:  # noqa: BLE001 - a tokenizer hiccup must not break typing
        return f"could not count tokens: {exc}"
    return f"{n} tokens"


def prompt_budget(app: App, params: SamplingParams) -> int | None:
    """Tokens the prompt may use (context or truncation_length, less max_new_tokens); None without a model."""
    model = app.models.current
    if model is None:
        return None
    window = model.info.context_length
    return min(params.truncation_length or window, window) - params.max_new_tokens


speed_line = speed_text
