"""Listing the models folder, loading, unloading and loading another."""

from __future__ import annotations

import pytest

from modules.core.errors import InvalidRequestError, ModelNotFoundError, UnsafePathError
from tests.traversal_payloads import TRAVERSAL_PAYLOADS


def test_lists_gguf_files_and_model_folders(app):
    models = app.models.models_dir
    (models / "hf_model").mkdir()
    (models / "hf_model" / "config.json").write_text("{}")
    (models / "quants").mkdir()
    for name in ("a.Q4_K_M.gguf", "a.Q8_0.gguf"):
        (models / "quants" / name).write_bytes(b"GGUF")
    (models / "big-00001-of-00002.gguf").write_bytes(b"GGUF")
    (models / "big-00002-of-00002.gguf").write_bytes(b"GGUF")
    (models / "README.md").write_text("x")
    (models / "empty").mkdir()
    assert app.models.list_models() == [
        "big-00001-of-00002.gguf", "fake.gguf", "hf_model", "quants/a.Q4_K_M.gguf", "quants/a.Q8_0.gguf",
    ]


def test_names_outside_the_folder_are_refused(app):
    with pytest.raises(UnsafePathError):
        app.models.load("../../etc/passwd")
    with pytest.raises(ModelNotFoundError):
        app.models.load("missing.gguf")


def test_load_unload_load_another(app, fake):
    assert app.models.name == "fake.gguf"
    assert app.models.report.loader == "fake" and app.models.report.reason == "chosen by the user"
    (app.models.models_dir / "other.gguf").write_bytes(b"GGUF")
    app.models.load("other.gguf", loader="fake", overrides={"ctx_size": 128})
    assert fake.unloaded
    assert app.models.name == "other.gguf"
    assert app.models.current.info.context_length == 128
    app.models.unload()
    assert app.models.current is None and app.models.report is None


def test_unknown_loader_option_is_refused(app):
    from modules.core.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="no option"):
        app.models.load("fake.gguf", loader="fake", overrides={"n_gpu_layers": 3})


def test_loader_statuses_list_options(app):
    statuses = {s.name: s for s in app.models.loader_statuses()}
    assert "ctx_size" in statuses["llama.cpp"].option_names
    assert "dtype" in statuses["transformers"].option_names


@pytest.mark.parametrize("name", TRAVERSAL_PAYLOADS)
def test_every_traversal_payload_is_refused_as_a_model_name(app, name):
    with pytest.raises((UnsafePathError, ModelNotFoundError)):
        app.models.load(name)
    assert app.models.current is None


def test_settings_saved_per_model_apply_to_its_next_load(app):
    (app.models.models_dir / "other.gguf").write_bytes(b"GGUF")
    path = app.models.save_settings("fake.gguf", "fake", {"ctx_size": 96})
    assert path.name == "config-user.yaml"
    assert app.models.saved_settings("fake.gguf") == {"loader": "fake", "ctx_size": 96}
    report = app.models.load("fake.gguf")  # no loader named: the saved one is used
    assert report.loader == "fake" and report.reason == "saved for this model"
    assert app.models.current.info.context_length == 96
    assert app.models.load("fake.gguf", overrides={"ctx_size": 80}).context_length == 80  # explicit wins
    assert app.models.saved_settings("other.gguf") == {}


def test_a_broken_per_model_file_is_a_clear_error(app):
    (app.models.models_dir / "config-user.yaml").write_text("- not a mapping\n")
    with pytest.raises(InvalidRequestError, match="config-user.yaml"):
        app.models.saved_settings("fake.gguf")


def test_concurrent_saves_of_per_model_settings_lose_none(app, monkeypatch):
    """Save settings is a read-modify-write of config-user.yaml: without the lock, saves that
    overlap each write back what they read and all but one are lost."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    names = [f"m{i}.gguf" for i in range(8)]
    for name in names:
        (app.models.models_dir / name).write_bytes(b"GGUF")
    read = app.models._read_per_model

    def slow_read():
        data = read()
        time.sleep(0.02)  # widen the window between reading the file and writing it back
        return data

    monkeypatch.setattr(app.models, "_read_per_model", slow_read)
    start = threading.Barrier(len(names))

    def save(i, name):
        start.wait(10)
        return app.models.save_settings(name, "fake", {"ctx_size": 64 + i})

    with ThreadPoolExecutor(len(names)) as pool:
        futures = [pool.submit(save, i, name) for i, name in enumerate(names)]
        for future in futures:
            future.result(10)  # re-raises what a thread raised
    monkeypatch.undo()
    for i, name in enumerate(names):
        assert app.models.saved_settings(name) == {"loader": "fake", "ctx_size": 64 + i}


@pytest.mark.parametrize(("overrides", "field"), [
    ({"ctx_size": "big"}, "ctx_size"), ({"ctx_size": 10**12}, "ctx_size"), ({"ctx_size": True}, "ctx_size"),
    ({"ctx_size": -1}, "ctx_size"),
])
def test_load_options_from_the_ui_or_api_are_type_checked_and_bounded(app, overrides, field):
    with pytest.raises(InvalidRequestError) as caught:
        app.models.load("fake.gguf", loader="fake", overrides=overrides)
    assert caught.value.param == field and app.models.current is None
    with pytest.raises(InvalidRequestError):
        app.models.save_settings("fake.gguf", "fake", overrides)


def test_remote_code_and_pickles_cannot_be_switched_on_by_a_request_or_a_saved_file(app, caplog):
    from modules.core.settings import check_option

    for name in ("trust_remote_code", "allow_pickle", "listen", "api_cors_origins"):
        with pytest.raises(InvalidRequestError, match="command line") as caught:
            check_option(name, True)
        assert caught.value.param == name
    (app.models.models_dir / "config-user.yaml").write_text(
        "fake.gguf:\n  loader: fake\n  ctx_size: 96\n  trust_remote_code: true\n")
    checked = app.models._checked_saved("fake.gguf", app.models.saved_settings("fake.gguf"),
                                        {"ctx_size", "trust_remote_code"})
    assert checked == {"ctx_size": 96} and "ignoring trust_remote_code" in caplog.text


def test_require_waits_for_a_load_in_progress(app, fake, monkeypatch):
    """A token count during a model switch waits for the new model instead of failing with
    'no model is loaded' (the old one is gone, the new one not there yet)."""
    import threading
    import time

    from tests.fakes import FakeLoader

    (app.models.models_dir / "other.gguf").write_bytes(b"GGUF")
    entered, go = threading.Event(), threading.Event()
    original = FakeLoader.load.__func__

    def slow_load(cls, path, options):
        entered.set()
        go.wait(5)
        return original(cls, path, options)

    monkeypatch.setattr(FakeLoader, "load", classmethod(slow_load))
    loader = threading.Thread(target=app.models.load, args=("other.gguf", "fake"), daemon=True)
    loader.start()
    assert entered.wait(5) and app.models.status().state == "loading"
    got = []
    counter = threading.Thread(target=lambda: got.append(app.models.require()), daemon=True)
    counter.start()
    time.sleep(0.1)
    assert not got  # waiting, not refused
    go.set()
    counter.join(5)
    loader.join(5)
    assert got and got[0].info.name == "other.gguf"


def test_last_loaded_remembers_how(app, fake):
    last = app.models.last_loaded()
    assert last is not None and (last.name, last.loader, last.overrides) == ("fake.gguf", "fake", {})
    app.models.unload()
    assert app.models.last_loaded() == last and app.models.asleep is None
