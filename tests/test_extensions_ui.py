"""The bundled extensions' controls in the web UI, their CSS/JS in launch(), errors as warnings."""

from __future__ import annotations

import shutil
from pathlib import Path

from modules.core.settings import Settings
from modules.engine.app import App
from modules.ui.blocks import create_ui, launch_options
from tests.extension_scripts import RECORDER, write_extension

REPO = Path(__file__).resolve().parent.parent


def test_enabled_extensions_get_their_controls_css_and_js(tmp_path):
    shutil.copytree(REPO / "extensions", tmp_path / "extensions")
    write_extension(tmp_path, "recorder", RECORDER)
    names = ["character_bias", "translate", "memory", "recorder"]
    app = App.create(Settings(extensions=names, settings=str(tmp_path / "s.yaml")), tmp_path)
    try:
        assert app.extensions.names() == names
        demo = create_ui(app)
        labels = {getattr(b, "label", None) for b in demo.blocks.values()}
        assert {"Activate character bias", "Your language", "Use long-term memory"} <= labels
        options = launch_options(app)
        assert ".recorder" in options["css"] and "console.log('recorder')" in options["js"]
        assert app.extensions.enabled[3].module.CALLS == ["setup", "ui"]
        assert "css" not in launch_options()
        assert launch_options()["max_file_size"] == "64mb"  # UI uploads are capped
    finally:
        app.close()
