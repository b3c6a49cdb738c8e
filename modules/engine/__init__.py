"""The engine: the App and its parts (model manager, generator, text streaming, presets,
notebook, extensions) and the web guard both faces put in front of themselves. Never imports
gradio or fastapi."""
