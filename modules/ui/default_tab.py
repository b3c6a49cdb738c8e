"""Default tab: a prompt in, the model's text streamed out; Stop, and Continue from where it ended.

Sampler settings come from the session's `params` state (the Parameters tab writes it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from modules.engine.app import App
from modules.ui.streaming import NO_MODEL_COUNT, SessionStreams, count_tokens, params_or_error


def create_ui(app: App, params: gr.State) -> None:
    """The Default tab's content (caller opens the tab); generation reads `params`."""
    streams = SessionStreams()
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(lines=14, label="Prompt", placeholder="Once upon a time")
            counter = gr.Markdown(count_tokens(app, "") if app.models.current else NO_MODEL_COUNT)
            with gr.Row():
                generate = gr.Button("Generate", variant="primary")
                stop = gr.Button("Stop")
                cont = gr.Button("Continue")
        with gr.Column(scale=3):
            output = gr.Textbox(lines=14, label="Output", buttons=["copy"])
            info = gr.Markdown("")
    gr.Markdown("Sampler settings are in the **Parameters** tab.")

    def on_generate(text: str, state: dict[str, Any], request: gr.Request) -> Iterator[tuple[str, str]]:
        yield from streams.run(app, text or "", params_or_error(state), request)

    def on_continue(text: str, done: str, state: dict[str, Any],
                    request: gr.Request) -> Iterator[tuple[str, str]]:
        # The model sees prompt + output as one text and its new words are appended to the output.
        yield from streams.run(app, (text or "") + (done or ""), params_or_error(state), request, prefix=done or "")

    generate.click(on_generate, [prompt, params], [output, info], concurrency_limit=4, api_name="generate")
    prompt.submit(on_generate, [prompt, params], [output, info], concurrency_limit=4, api_visibility="private")
    cont.click(on_continue, [prompt, output, params], [output, info], concurrency_limit=4, api_name="continue")
    stop.click(streams.stop, None, None, concurrency_limit=None, queue=False, api_visibility="private")
    prompt.input(lambda text: count_tokens(app, text), prompt, counter, queue=False, trigger_mode="always_last",
                 api_visibility="private")
    for event in (generate.click, cont.click):
        event(lambda text: count_tokens(app, text), prompt, counter, queue=False, api_visibility="private")
