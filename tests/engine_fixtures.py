"""An App over a temporary models folder with the fake loader loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from modules.core.settings import Settings
from modules.engine.app import App
from tests.fakes import FakeLoader


@pytest.fixture
def app(tmp_path: Path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "fake.gguf").write_bytes(b"GGUF")
    application = App.create(Settings(models_dir=str(models), settings=str(tmp_path / "settings.yaml")), tmp_path)
    yield application
    application.close()


@pytest.fixture
def fake(app: App) -> FakeLoader:
    app.models.load("fake.gguf", loader="fake")
    model = app.models.current
    assert isinstance(model, FakeLoader)
    return model
