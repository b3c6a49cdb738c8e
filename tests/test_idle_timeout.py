"""--idle-timeout: the model unloads when nothing uses it and the next request reloads it.

The rules run on a fake clock (IdleWatcher.check, one tick); the thread itself runs with a
timeout of a fraction of a second; the reload is checked through the API and on a real tiny
GGUF (same loader options after the reload, the same greedy answer).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from modules.api import create_app
from modules.core.errors import ModelNotLoadedError
from modules.core.sampling import SamplingParams
from modules.core.settings import Settings
from modules.engine.app import App
from modules.engine.idle import IdleWatcher
from tests.fakes import EOS, FakeLoader, script_text

LOCAL = "http://127.0.0.1:5000"
MINUTE = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _app(tmp_path: Path, **settings: object) -> App:
    models = tmp_path / "models"
    models.mkdir()
    (models / "fake.gguf").write_bytes(b"GGUF")  # not a real GGUF: only the fake loader opens it
    return App.create(Settings(models_dir=str(models), settings=str(tmp_path / "settings.yaml"), **settings),
                      tmp_path)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    application = _app(tmp_path)
    yield application
    application.close()


@pytest.fixture
def clock(app: App) -> Clock:
    clock = Clock()
    app.models.clock = clock
    # Loaded as the Model tab would: a loader chosen by hand and an option typed in. Neither is
    # saved for the model, so only a reload that remembers them can load it again.
    app.models.load("fake.gguf", loader="fake", overrides={"ctx_size": 300})
    return clock


def _watcher(app: App, minutes: float = 1.0) -> IdleWatcher:
    return IdleWatcher(app.models, lambda: minutes, busy=lambda: app.switcher.busy or app.generator.waiting > 0)


def test_unloads_after_the_timeout_and_reloads_the_same_way(app: App, clock: Clock) -> None:
    watcher, first = _watcher(app), app.models.current
    clock.now += MINUTE - 1
    assert not watcher.check() and app.models.name == "fake.gguf"
    clock.now += 2
    assert watcher.check()
    assert app.models.current is None and isinstance(first, FakeLoader) and first.unloaded
    assert app.models.status().state == "idle" and app.models.asleep == "fake.gguf"
    model = app.models.require()  # the next request
    assert model is not first and model.info.loader == "fake" and model.info.context_length == 300
    assert app.models.status().state == "loaded"


def test_fractions_of_a_minute(app: App, clock: Clock) -> None:
    watcher = _watcher(app, 0.05)
    clock.now += 2.9
    assert not watcher.check()
    clock.now += 0.2
    assert watcher.check()


def test_generating_is_activity(app: App, clock: Clock) -> None:
    watcher = _watcher(app)
    fake = app.models.current
    assert isinstance(fake, FakeLoader)
    fake.script, fake.step_delay = script_text("a long answer") + [EOS], 0.02
    stream = app.generator.submit("hi", SamplingParams(max_new_tokens=50))
    while fake.steps == 0:
        time.sleep(0.005)
    clock.now += 10 * MINUTE
    assert not watcher.check()  # a stream in progress is never cut
    assert stream.result().text == "a long answer"
    assert not watcher.check()  # the generation's end restarted the timer
    clock.now += MINUTE + 1
    assert watcher.check()


def test_a_held_or_awaited_model_is_activity(app: App, clock: Clock) -> None:
    watcher = _watcher(app)
    lease = app.model_for("fake.gguf")
    clock.now += 10 * MINUTE
    assert not watcher.check()
    lease.release()
    clock.now += MINUTE + 1
    reservation = app.generator.reserve()  # a request about to submit
    assert not watcher.check()
    reservation.release()
    assert watcher.check()


def test_an_unload_by_hand_is_not_undone(app: App, clock: Clock) -> None:
    app.models.unload()
    assert app.models.status().state == "none"
    with pytest.raises(ModelNotLoadedError):
        app.models.require()


def test_a_named_request_reloads_it_too(app: App, clock: Clock) -> None:
    _watcher(app).check()
    clock.now += MINUTE + 1
    assert _watcher(app).check()
    with app.model_for("fake.gguf") as lease:
        assert lease.name == "fake.gguf" and app.models.require().info.context_length == 300


def test_the_thread_unloads_and_stops_with_the_app(tmp_path: Path) -> None:
    app = _app(tmp_path, idle_timeout=0.002)  # 0.12 s
    try:
        assert app.idle.running
        app.models.load("fake.gguf", loader="fake")
        deadline = time.monotonic() + 5
        while app.models.current is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert app.models.status().state == "idle"
    finally:
        app.close()
    assert not app.idle.running


def test_no_timeout_no_thread(app: App) -> None:
    assert not app.idle.running
    app.update_settings(idle_timeout=0.5)
    assert app.idle.running


def test_the_api_reloads_transparently(app: App, clock: Clock) -> None:
    with TestClient(create_app(app), base_url=LOCAL) as client:
        clock.now += MINUTE + 1
        assert _watcher(app).check()
        assert client.get("/v1/models").json()["data"][0]["id"] == "fake.gguf"
        assert client.get("/v1/internal/model/info").json()["model_name"] == "fake.gguf"
        answer = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5, "model": "gpt-4o"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "fake.gguf"
        assert app.models.require().info.context_length == 300
        clock.now += MINUTE + 1
        assert _watcher(app).check()
        assert client.post("/v1/internal/token-count", json={"text": "abc"}).json()["length"] == 4


def test_the_model_tab_says_so(app: App, clock: Clock) -> None:
    from modules.ui import model_tab

    assert "Loaded fake.gguf" in model_tab._status(app) and model_tab._badge(app) == ""
    clock.now += MINUTE + 1
    _watcher(app).check()
    assert "unloaded" in model_tab._status(app) and "reloads" in model_tab._badge(app)


def test_a_real_model_reloads_with_its_options(tiny_kit, tmp_path: Path) -> None:  # noqa: ANN001
    app = App.create(Settings(models_dir=str(tiny_kit.root), settings=str(tmp_path / "s.yaml"),
                              idle_timeout=0.002), tmp_path)
    try:
        name = tiny_kit.gguf_q8_0.name
        app.models.load(name, overrides={"ctx_size": 256})
        before = app.generator.generate("Once", SamplingParams(max_new_tokens=8, temperature=0)).text
        deadline = time.monotonic() + 5
        while app.models.current is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert app.models.asleep == name
        after = app.generator.generate("Once", SamplingParams(max_new_tokens=8, temperature=0)).text
        assert after == before  # the same model, greedy: the same answer
        model = app.models.current
        assert model is not None and model.info.context_length == 256 and model.info.loader == "llama.cpp"
    finally:
        app.close()
