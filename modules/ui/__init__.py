"""The Gradio face of the engine: one module per tab, each with `create_ui(app, ...)`; the
whole UI is built by `modules.ui.blocks.create_ui`.

Handlers only wire components to engine calls; no generation logic lives here. This package
imports nothing itself, so `modules.ui.gradio_import` can run before gradio's first import.
"""
