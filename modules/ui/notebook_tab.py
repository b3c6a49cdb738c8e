"""Notebook tab: one text that generation extends in place, with Kobold-style Memory and Author's note.

The prompt is assembled by modules/notebook.build_prompt (memory on top, the note a few
lines above the end, old story lines dropped first when it does not fit); sampler
settings come from the session's `params` state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from modules.core.sampling import SamplingParams
from modules.engine.app import App
from modules.engine.notebook import DEFAULT_DEPTH, MAX_DEPTH, build_prompt
from modules.ui.streaming import NO_MODEL_COUNT, SessionStreams, count_tokens, params_or_error, prompt_budget


def create_ui(app: App, params: gr.State) -> None:
    """The Notebook tab's content (caller opens the tab); generation reads `params`."""
    streams = SessionStreams()
    with gr.Row():
        with gr.Column(scale=4):
            text = gr.Textbox(lines=24, max_lines=60, label="Notebook", elem_id="notebook-text",
                              placeholder="Write the start of a story; Generate continues it right here.")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="notebook-generate")
                stop = gr.Button("Stop")
            info = gr.Markdown("")
        with gr.Column(scale=2):
            memory = gr.Textbox(lines=6, label="Memory", elem_id="notebook-memory",
                                info="Always sent first, never cut: the setting, the characters, the style.")
            note = gr.Textbox(lines=3, label="Author's note", elem_id="notebook-note",
                              info="Sent as [Author's note: ...] a few lines above the end, to steer what comes next.")
            depth = gr.Slider(0, MAX_DEPTH, value=DEFAULT_DEPTH, step=1, label="Author's note depth",
                              info="Lines from the end at which the note goes; 0 puts it last (strongest).")
            counter = gr.Markdown(NO_MODEL_COUNT if app.models.current is None else "")

    def on_generate(story: str, mem: str, author: str, at: float, state: dict[str, Any],
                    request: gr.Request) -> Iterator[tuple[str, str, str]]:
        sampling = params_or_error(state)
        prompt, status = _prompt(app, story or "", mem or "", author or "", int(at), sampling)
        if not prompt.strip():
            raise gr.Error("Write something in the notebook (or in Memory) first.")
        for shown, speed in streams.run(app, prompt, sampling, request, prefix=story or ""):
            yield shown, speed, status

    def on_count(story: str, mem: str, author: str, at: float) -> str:
        return _count(app, story or "", mem or "", author or "", int(at))

    inputs = [text, memory, note, depth]
    generate.click(on_generate, inputs + [params], [text, info, counter], concurrency_limit=4,
                   api_name="notebook_generate")
    stop.click(streams.stop, None, None, concurrency_limit=None, queue=False, api_visibility="private")
    for comp in inputs:
        comp.input(on_count, inputs, counter, queue=False, trigger_mode="always_last", api_visibility="private")


def _prompt(app: App, story: str, memory: str, note: str, depth: int,
            params: SamplingParams) -> tuple[str, str]:
    """The assembled prompt and a counter line saying how much of the story was left out."""
    model, budget = app.models.current, prompt_budget(app, params)
    if model is None or budget is None or budget < 1:
        return build_prompt(story, memory, note, depth).prompt, NO_MODEL_COUNT if model is None else ""

    def count(text: str) -> int:
        return len(model.encode(text, add_bos=params.add_bos_token))

    built = build_prompt(story, memory, note, depth, count_tokens=count, budget=budget)
    line = f"prompt: {count(built.prompt)} tokens of {budget}"
    if built.dropped_lines:
        line += f" · the first {built.dropped_lines} story lines were left out to fit"
    return built.prompt, line


def _count(app: App, story: str, memory: str, note: str, depth: int) -> str:
    if app.models.current is None:
        return NO_MODEL_COUNT
    return "prompt: " + count_tokens(app, build_prompt(story, memory, note, depth).prompt)
