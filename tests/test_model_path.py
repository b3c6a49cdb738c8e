"""`--model` takes a name in the models folder or a path anywhere (command line only)."""

from __future__ import annotations

import dataclasses

import pytest
from fastapi.testclient import TestClient

from modules.api import create_app
from modules.core.errors import ModelNotFoundError
from modules.engine.model_paths import register_cli_model, resolve_cli_model
from tests.api.conftest import LOCAL


def _start_with(app, model: str) -> str | None:
    app.settings = dataclasses.replace(app.settings, model=model, loader="fake")
    return app.load_startup_model()


def test_a_gguf_path_outside_the_folder_loads_under_its_file_name(app, tmp_path):
    elsewhere = tmp_path / "Downloads"
    elsewhere.mkdir()
    (elsewhere / "x.Q4_K_M.gguf").write_bytes(b"GGUF")
    assert _start_with(app, str(elsewhere / "x.Q4_K_M.gguf")) is None
    assert app.models.name == "x.Q4_K_M.gguf"
    assert app.models.current.info.path == elsewhere / "x.Q4_K_M.gguf"
    assert "x.Q4_K_M.gguf" in app.models.list_models()


def test_a_model_folder_path_and_a_relative_path(app, tmp_path):
    folder = tmp_path / "hf" / "tiny"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert register_cli_model(app.models, "hf/tiny", cwd=tmp_path) == "tiny"
    assert app.models.path_of("tiny") == folder.resolve()


def test_a_name_in_the_folder_still_works_and_wins(app, tmp_path):
    assert resolve_cli_model("fake.gguf", app.models.models_dir, cwd=tmp_path) == ("fake.gguf", None)
    # A path into the models folder is its ordinary name, not an external model.
    inside = app.models.models_dir / "fake.gguf"
    assert resolve_cli_model(str(inside), app.models.models_dir) == ("fake.gguf", None)


def test_a_path_whose_file_name_is_taken_in_the_folder_is_named_by_its_path(app, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "fake.gguf").write_bytes(b"GGUF")
    name = register_cli_model(app.models, str(other / "fake.gguf"))
    assert name == str((other / "fake.gguf").resolve())
    assert app.models.path_of("fake.gguf") == (app.models.models_dir / "fake.gguf").resolve()


def test_a_wrong_path_says_what_was_looked_for(app, tmp_path):
    missing = tmp_path / "nowhere" / "m.gguf"
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_cli_model(str(missing), app.models.models_dir)
    assert str(missing) in str(caught.value) and "models folder" in str(caught.value)
    error = _start_with(app, str(missing))
    assert error is not None and str(missing) in error
    assert app.models.current is None


def test_a_file_that_is_not_a_model_is_named(app, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelNotFoundError, match="expected a .gguf file or a model folder"):
        resolve_cli_model(str(tmp_path / "notes.txt"), app.models.models_dir)


def test_the_api_never_loads_a_path(app, tmp_path):
    (tmp_path / "y.gguf").write_bytes(b"GGUF")
    with TestClient(create_app(app), base_url=LOCAL, raise_server_exceptions=False) as client:
        for value in (str(tmp_path / "y.gguf"), "../y.gguf"):
            response = client.post("/v1/internal/model/load", json={"model_name": value, "loader": "fake"})
            assert response.status_code in (400, 404), response.text
    assert app.models.current is None
    assert "y.gguf" not in app.models.list_models()
