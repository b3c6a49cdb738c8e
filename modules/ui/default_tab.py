"""Default tab: a prompt in, the model's text streamed out, Stop at any time."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import gradio as gr

from modules.app import App
from modules.errors import WorkbenchError
from modules.generation import Stream
from modules.sampling import SamplingParams, parse_stop_strings


def create_ui(app: App, params_state: gr.State | None = None) -> None:
    # One running stream per browser session, so Stop in one tab never stops another's.
    running: dict[str, Stream] = {}
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(lines=14, label="Prompt", placeholder="Once upon a time")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary")
                stop = gr.Button("Stop")
        with gr.Column(scale=3):
            output = gr.Textbox(lines=14, label="Output", buttons=["copy"])
            info = gr.Markdown("")
    with gr.Accordion("Parameters", open=False):
        with gr.Row():
            max_new = gr.Slider(1, 4096, value=512, step=1, label="max_new_tokens")
            temperature = gr.Slider(0, 5, value=1.0, step=0.01, label="temperature", info="0 = greedy")
            top_p = gr.Slider(0, 1, value=1.0, step=0.01, label="top_p")
            top_k = gr.Slider(0, 200, value=0, step=1, label="top_k", info="0 = off")
        with gr.Row():
            min_p = gr.Slider(0, 1, value=0.05, step=0.01, label="min_p")
            rep_pen = gr.Slider(1, 1.5, value=1.0, step=0.01, label="repetition_penalty")
            seed = gr.Number(value=-1, precision=0, label="seed", info="-1 = random")
            stops = gr.Textbox(label="Stop strings", placeholder='"\\nUser:", "###"')
    params_in = [max_new, temperature, top_p, top_k, min_p, rep_pen, seed, stops]

    def on_generate(text: str, max_new: float, temperature: float, top_p: float, top_k: float, min_p: float,
                    rep_pen: float, seed: float | None, stop_text: str,
                    request: gr.Request) -> Iterator[tuple[str, str]]:
        try:
            params = _params(max_new, temperature, top_p, top_k, min_p, rep_pen, seed, stop_text)
            stream = app.generator.submit(text, params)
        except WorkbenchError as exc:
            raise gr.Error(str(exc)) from None
        running[request.session_hash] = stream
        start, out = time.perf_counter(), ""
        try:
            for chunk in stream:
                out = chunk.text
                yield out, _speed(chunk, time.perf_counter() - start)
        except WorkbenchError as exc:
            raise gr.Error(str(exc)) from None
        finally:
            stream.cancel()
            running.pop(request.session_hash, None)

    def on_stop(request: gr.Request) -> None:
        stream = running.get(request.session_hash)
        if stream is not None:
            stream.cancel()

    generate.click(on_generate, [prompt] + params_in, [output, info], concurrency_limit=4, api_name="generate")
    prompt.submit(on_generate, [prompt] + params_in, [output, info], concurrency_limit=4, api_visibility="private")
    stop.click(on_stop, None, None, concurrency_limit=None, api_visibility="private")


def _params(max_new: float, temperature: float, top_p: float, top_k: float, min_p: float,
            rep_pen: float, seed: float | None, stops: str) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=int(max_new), temperature=float(temperature), top_p=float(top_p),
        top_k=int(top_k), min_p=float(min_p), repetition_penalty=float(rep_pen),
        seed=None if seed is None else int(seed), stop=parse_stop_strings(stops or ""),
    )


def _speed(chunk: Any, seconds: float) -> str:
    rate = chunk.completion_tokens / seconds if seconds > 0 else 0.0
    text = f"{chunk.completion_tokens} tokens, {rate:.1f} tokens/s"
    if chunk.finish_reason:
        text += f" · finished: {chunk.finish_reason}"
    if chunk.truncated_tokens:
        text += f" · {chunk.truncated_tokens} prompt tokens cut to fit"
    return text
