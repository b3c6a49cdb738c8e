"""API test helpers: a TestClient over the App with the fake loader, and an SSE reader."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from modules.api import create_app
from modules.engine.app import App
from tests.fakes import EOS, FakeLoader, script_text

LOCAL = "http://127.0.0.1:5000"
"""What a local client calls: TestClient's default Host, testserver, is refused by the Host check."""


@pytest.fixture
def client(app: App) -> Iterator[TestClient]:
    with TestClient(create_app(app), base_url=LOCAL, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def model(app: App) -> FakeLoader:
    """The fake model with a 4096-token context, scripted to say "Hello world"."""
    app.models.load("fake.gguf", loader="fake", overrides={"ctx_size": 4096})
    fake = app.models.current
    assert isinstance(fake, FakeLoader)
    fake.script = script_text("Hello world") + [EOS]
    return fake


def sse_payloads(text: str) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded, "[DONE]" kept as a string."""
    out = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out
