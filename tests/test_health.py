"""/health: 200 ready, 503 while a model loads, on the API and the UI port, behind the Host check, no key."""

from __future__ import annotations

import dataclasses
import threading

import pytest
from fastapi.testclient import TestClient

from modules.api import create_app
from modules.core.errors import ModelLoadError
from modules.engine.health import HealthEndpoint
from modules.engine.web_guard import WebGuard, policy_for
from tests.api.conftest import LOCAL
from tests.fakes import FakeLoader


@pytest.fixture
def keyed_client(app):
    app.update_settings(api_key="s3cret")
    with TestClient(create_app(app), base_url=LOCAL, raise_server_exceptions=False) as client:
        yield client


def test_ready_without_a_key(keyed_client):
    response = keyed_client.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert keyed_client.get("/v1/models").status_code == 401  # everything else still wants the key


def test_503_while_a_model_loads(app, keyed_client, monkeypatch):
    started, release = threading.Event(), threading.Event()
    original = FakeLoader.load.__func__

    def slow_load(cls, path, options):
        started.set()
        release.wait(10)
        return original(cls, path, options)

    monkeypatch.setattr(FakeLoader, "load", classmethod(slow_load))
    loading = threading.Thread(target=app.models.load, args=("fake.gguf", "fake"))
    loading.start()
    try:
        assert started.wait(10)
        response = keyed_client.get("/health")
        assert response.status_code == 503 and response.json() == {"status": "loading model"}
    finally:
        release.set()
        loading.join(10)
    assert keyed_client.get("/health").json() == {"status": "ok"}
    assert app.models.name == "fake.gguf"


def test_a_failed_load_leaves_it_ready(app, keyed_client, monkeypatch):
    def broken(cls, path, options):
        raise ModelLoadError("the weights are corrupt")

    monkeypatch.setattr(FakeLoader, "load", classmethod(broken))
    with pytest.raises(ModelLoadError):
        app.models.load("fake.gguf", "fake")
    assert keyed_client.get("/health").status_code == 200


def test_a_foreign_host_is_refused(keyed_client):
    assert keyed_client.get("/health", headers={"Host": "evil.example"}).status_code == 403


def test_the_ui_port_answers_it_inside_its_guard(app):
    """The UI's middleware stack as launch_options builds it (guard, then health), over a stand-in app."""
    from starlette.applications import Starlette

    from modules.ui.blocks import launch_options

    middleware = launch_options(app)["app_kwargs"]["middleware"]
    assert [m.cls for m in middleware] == [WebGuard, HealthEndpoint]
    ui = Starlette(middleware=middleware)
    with TestClient(ui, base_url="http://127.0.0.1:7860") as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.head("/health").status_code == 200
        assert client.get("/health", headers={"Host": "evil.example"}).status_code == 403
        app.models.loading = "x.gguf"
        assert client.get("/health").status_code == 503
        app.models.loading = None
        assert client.post("/health").status_code == 404  # only GET and HEAD: the rest goes on to the app


def test_policy_is_the_ui_one(app):
    app.settings = dataclasses.replace(app.settings, allowed_hosts="chat.example.com")
    from modules.ui.blocks import launch_options

    guard = launch_options(app)["app_kwargs"]["middleware"][0]
    assert guard.kwargs["policy"] == policy_for(app.settings, "ui")
