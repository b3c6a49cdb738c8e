"""Models on demand (modules/engine/model_switch.py): a request's `model` loads that model.

The fake-loader tests pin the rules (names, arrival order, strict names, no switching, a
failed load, the bound); the tiny-kit tests switch real llama.cpp models under load through
the live API: a running stream finishes on the old model, the queued requests get the new.
"""

from __future__ import annotations

import gc
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from modules.core.errors import ModelLoadError, ModelNotFoundError, QueueFullError
from modules.core.sampling import SamplingParams
from modules.core.settings import Settings
from modules.engine.app import App
from modules.engine.model_switch import ModelLease
from tests.fakes import EOS, FakeLoader, script_text

NAMES = ("alpha.gguf", "Beta.gguf", "gamma.gguf")


def _app(tmp_path: Path, **settings: object) -> App:
    models = tmp_path / "models"
    models.mkdir()
    for name in NAMES:
        (models / name).write_bytes(b"GGUF")
    # Per-model settings, as the Model tab saves them: each is a fake, each with its own context.
    saved = {name: {"loader": "fake", "ctx_size": 100 + i} for i, name in enumerate(NAMES)}
    (models / "config-user.yaml").write_text(yaml.safe_dump(saved))
    return App.create(Settings(models_dir=str(models), settings=str(tmp_path / "settings.yaml"), **settings),
                      tmp_path)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    application = _app(tmp_path)
    yield application
    application.close()


def _in_thread(fn, *args) -> tuple[threading.Thread, dict]:  # noqa: ANN001 - a test helper
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _settle() -> None:
    time.sleep(0.15)  # long enough for a waiting thread to have queued


# --- names ----------------------------------------------------------------------------
def test_names_match_exactly_then_loosely(app: App) -> None:
    resolve = app.switcher.resolve
    assert resolve("gamma.gguf") == "gamma.gguf"
    assert resolve("beta.gguf") == "Beta.gguf"  # case
    assert resolve("GAMMA") == "gamma.gguf"  # without .gguf
    assert resolve("gpt-4o") is None
    assert resolve("") is None and resolve(None) is None


def test_an_ambiguous_loose_name_matches_nothing(app: App) -> None:
    (app.models.models_dir / "ALPHA.gguf").write_bytes(b"GGUF")
    assert app.switcher.resolve("alpha") is None
    assert app.switcher.resolve("alpha.gguf") == "alpha.gguf"  # exact still wins


# --- switching ----------------------------------------------------------------------------
def test_a_named_model_is_loaded_with_its_saved_settings(app: App) -> None:
    with app.model_for("beta") as lease:
        assert lease.name == "Beta.gguf" == app.models.name
        assert app.models.require().info.context_length == 101  # config-user.yaml's ctx_size
    with app.model_for("gamma.gguf"):
        assert app.models.name == "gamma.gguf"


def test_nothing_loaded_and_a_name_loads_it(app: App) -> None:
    assert app.models.name is None
    with app.model_for("alpha.gguf"):
        assert app.models.name == "alpha.gguf"


def test_an_unknown_name_uses_the_loaded_model(app: App) -> None:
    app.models.load("alpha.gguf")
    with app.model_for("gpt-4o") as lease:
        assert lease.name == "alpha.gguf" == app.models.name
    with app.model_for(None) as lease:
        assert lease.name == "alpha.gguf"


def test_no_model_and_no_name_is_an_empty_lease(app: App) -> None:
    lease = app.model_for("gpt-4o")
    assert lease.name is None
    lease.release()


def test_strict_names_refuse_an_unknown_name(tmp_path: Path) -> None:
    app = _app(tmp_path, strict_model_names=True)
    try:
        app.models.load("alpha.gguf")
        with pytest.raises(ModelNotFoundError, match="gpt-4o"):
            app.model_for("gpt-4o")
        with app.model_for(None) as lease:  # no name at all: the loaded model, as ever
            assert lease.name == "alpha.gguf"
    finally:
        app.close()


def test_no_switching_keeps_the_loaded_model(tmp_path: Path) -> None:
    app = _app(tmp_path, no_model_switching=True)
    try:
        with app.model_for("gamma.gguf"):  # nothing loaded: nothing to switch from, so it loads
            assert app.models.name == "gamma.gguf"
        with app.model_for("alpha.gguf") as lease:
            assert lease.name == "gamma.gguf" == app.models.name
    finally:
        app.close()


def test_a_switch_waits_for_the_lease_on_the_old_model(app: App) -> None:
    first = app.model_for("alpha.gguf")
    thread, out = _in_thread(app.model_for, "gamma.gguf")
    _settle()
    assert "value" not in out and app.models.name == "alpha.gguf"  # alpha still serves its request
    first.release()
    thread.join(5)
    assert out["value"].name == "gamma.gguf" == app.models.name
    out["value"].release()


def test_requests_wait_in_arrival_order_without_thrashing(app: App) -> None:
    """alpha is held; a request for gamma waits; one for alpha comes after it and must not cut
    in (gamma would starve); one naming nothing joins the model ahead of it. Two loads, no more."""
    loads: list[str] = []
    original = app.models.load

    def counting_load(name: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        loads.append(name)
        return original(name, *args, **kwargs)

    app.models.load = counting_load  # type: ignore[method-assign]
    held = app.model_for("alpha.gguf")
    t_gamma, gamma = _in_thread(app.model_for, "gamma.gguf")
    _settle()
    t_any, anything = _in_thread(app.model_for, "gpt-4o")
    _settle()
    t_alpha, alpha = _in_thread(app.model_for, "alpha.gguf")
    _settle()
    assert not gamma and not anything and not alpha  # all wait behind the held alpha lease
    held.release()
    t_gamma.join(5)
    t_any.join(5)
    assert gamma["value"].name == anything["value"].name == "gamma.gguf"
    _settle()
    assert not alpha  # waits for both gamma leases
    gamma["value"].release()
    anything["value"].release()
    t_alpha.join(5)
    assert alpha["value"].name == "alpha.gguf" == app.models.name
    alpha["value"].release()
    assert loads == ["alpha.gguf", "gamma.gguf", "alpha.gguf"]


def test_two_requests_for_two_models_at_once_do_not_deadlock(app: App) -> None:
    def use(name: str) -> str | None:
        with app.model_for(name) as lease:
            time.sleep(0.05)
            return app.models.name if lease.name == app.models.name else "wrong"

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(use, ["alpha.gguf", "gamma.gguf"] * 4))
    assert results == ["alpha.gguf", "gamma.gguf"] * 4
    assert app.switcher.busy is False


def test_a_failed_load_reaches_every_request_waiting_for_it(app: App) -> None:
    (app.models.models_dir / "config-user.yaml").write_text(yaml.safe_dump({
        **{n: {"loader": "fake"} for n in NAMES}, "Beta.gguf": {"loader": "no-such-loader"}}))
    held = app.model_for("alpha.gguf")
    threads = [_in_thread(app.model_for, "Beta.gguf") for _ in range(2)]
    _settle()
    held.release()
    for thread, out in threads:
        thread.join(5)
        assert isinstance(out["error"], ModelLoadError)
    with app.model_for("gamma.gguf"):  # the switcher goes on
        assert app.models.name == "gamma.gguf"


def test_waiting_requests_are_bounded_by_max_queue(tmp_path: Path) -> None:
    app = _app(tmp_path, max_queue=1)
    try:
        held = app.model_for("alpha.gguf")
        thread, out = _in_thread(app.model_for, "gamma.gguf")
        _settle()
        with pytest.raises(QueueFullError):
            app.model_for("Beta.gguf")
        held.release()
        thread.join(5)
        out["value"].release()
    finally:
        app.close()


def test_a_dropped_lease_releases_itself(app: App) -> None:
    lease: ModelLease | None = app.model_for("alpha.gguf")
    assert app.switcher.busy
    del lease
    gc.collect()
    assert not app.switcher.busy
    with app.model_for("gamma.gguf"):
        assert app.models.name == "gamma.gguf"


def test_a_running_generation_finishes_on_the_old_model(app: App) -> None:
    """Engine level: a lease released while its generation still runs (a client gone) does not
    cut it: the load waits for the generation as well."""
    lease = app.model_for("alpha.gguf")
    old = app.models.current
    assert isinstance(old, FakeLoader)
    old.script, old.step_delay = script_text("slow and steady") + [EOS], 0.02
    stream = app.generator.submit("hi", SamplingParams(max_new_tokens=50))
    while old.steps == 0:
        time.sleep(0.005)
    thread, out = _in_thread(app.model_for, "gamma.gguf")
    lease.release()
    assert stream.result().text == "slow and steady"
    thread.join(5)
    assert out["value"].name == "gamma.gguf" and old.unloaded
    out["value"].release()


# --- under load, real models, through the live API ------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _slowed(model, delay: float) -> list[int]:  # noqa: ANN001 - any LoadedModel
    """Make a real model's steps slow enough to overlap requests (the weights are real); the
    list returned gets the prompt length of each generation it serves."""
    original, served = model.generate, []

    def generate(ids, params, stop):  # noqa: ANN001, ANN202
        served.append(len(ids))
        for step in original(ids, params, stop):
            time.sleep(delay)
            yield step

    model.generate = generate
    return served


@pytest.fixture
def live(tiny_kit, tmp_path: Path) -> Iterator[tuple[App, str]]:
    from modules.api import serve_in_thread

    app = App.create(Settings(models_dir=str(tiny_kit.root), settings=str(tmp_path / "settings.yaml")), tmp_path)
    port = _free_port()
    server = serve_in_thread(app, "127.0.0.1", port)
    yield app, f"http://127.0.0.1:{port}"
    server.should_exit = True
    app.close()


def test_switching_by_name_under_load(live, tiny_kit) -> None:  # noqa: ANN001
    import httpx

    app, base = live
    f32, q8 = tiny_kit.gguf_f32.name, tiny_kit.gguf_q8_0.name
    app.models.load(f32, overrides={"ctx_size": 512})
    served = _slowed(app.models.current, 0.03)
    body = {"prompt": "Once upon a time", "max_tokens": 60, "temperature": 0, "ban_eos_token": True}
    with httpx.Client(base_url=base, timeout=60) as client, ThreadPoolExecutor(3) as pool:
        with client.stream("POST", "/v1/completions", json={**body, "model": f32, "stream": True}) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            # The stream runs on f32 (one slot); another f32 request queues behind it, then a
            # request names q8, and one a model nobody has.
            queued = pool.submit(client.post, "/v1/completions",
                                 json={**body, "model": f32, "max_tokens": 4, "prompt": "x" * 40})
            time.sleep(0.2)
            switched = pool.submit(client.post, "/v1/completions", json={**body, "model": q8, "max_tokens": 4})
            time.sleep(0.3)
            behind = pool.submit(client.post, "/v1/completions", json={**body, "model": "gpt-4o", "max_tokens": 4})
            time.sleep(0.2)
            assert app.models.name == f32 and not switched.done()
            # Token counts and the model list answer while the switch waits.
            assert client.get("/v1/models").status_code == 200
            assert client.post("/v1/internal/token-count", json={"text": "hi"}).status_code == 200
            chunks = [json.loads(first[6:])] + [json.loads(ln[6:]) for ln in lines
                                                 if ln.startswith("data: ") and ln != "data: [DONE]"]
        assert {c["model"] for c in chunks} == {f32}
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # not cut by the switch
        assert sum(1 for c in chunks if c["choices"][0]["text"]) > 30
        assert queued.result(timeout=60).json()["model"] == f32
        for future in (switched, behind):
            answer = future.result(timeout=60)
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == q8
    assert app.models.name == q8
    assert len(served) == 2 and served[1] > served[0]  # the queued request ran on f32 too, not on q8


def test_strict_names_answer_openai_404(live, tiny_kit) -> None:  # noqa: ANN001
    import httpx

    app, base = live
    app.update_settings(strict_model_names=True)
    with httpx.Client(base_url=base, timeout=60) as client:
        answer = client.post("/v1/chat/completions",
                             json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 404
        error = answer.json()["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert error["type"] == "invalid_request_error"
        ok = client.post("/v1/chat/completions", json={"model": tiny_kit.gguf_q8_0.name, "max_tokens": 3,
                                                       "messages": [{"role": "user", "content": "hi"}]})
        assert ok.status_code == 200 and ok.json()["model"] == tiny_kit.gguf_q8_0.name


def test_models_list_names_every_model(live, tiny_kit) -> None:  # noqa: ANN001
    import httpx

    app, base = live
    with httpx.Client(base_url=base, timeout=60) as client:
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert set(ids) == {tiny_kit.hf_dir.name, tiny_kit.gguf_f32.name, tiny_kit.gguf_q8_0.name}
        assert client.get("/v1/internal/model/list").json()["model_names"] == app.models.list_models()
        client.post("/v1/completions", json={"model": tiny_kit.gguf_q8_0.name, "prompt": "a", "max_tokens": 2})
        assert client.get("/v1/models").json()["data"][0]["id"] == tiny_kit.gguf_q8_0.name
        assert client.get("/api/v1/model").json()["result"] == tiny_kit.gguf_q8_0.name
