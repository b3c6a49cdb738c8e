"""schemathesis over every operation of the API's own OpenAPI schema, against a real server.

The server is uvicorn in a child process (tests/api/api_server.py) with the kit's f32 GGUF on
one thread and a 512-token context. The schema is made by `create_app` at collection, since
pytest must know the operations before the server starts (schemathesis.pytest.from_fixture
would read it from the server, but it sets `Function._nodeid`, which pytest 9.2 no longer
has); the first test checks it is the one the server serves at /openapi.json.

schemathesis draws bodies and path values from that schema: every field at its bounds and
just past them (its coverage phase), then random valid and invalid ones (wrong types,
out-of-range numbers, missing fields). Each must get an answer below 500 with the connection
intact, with a status, content type and body the schema documents for it (every SSE event
too): a transport error fails the case, and so does a traceback, an ERROR line or
"Exception in ASGI application" (what uvicorn writes when it drops a connection) in the
server's log.

Bounded for CI (about 35 s on 2 cores): 20 random examples per operation, every generation cut
to MAX_TOKENS, the model unload route left to the last test. FUZZ_SEED=n draws other examples,
FUZZ_EXAMPLES=n more of them; run with -s for a summary of requests and statuses per operation.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from modules.api import create_app
from modules.core.settings import Settings
from modules.engine.app import App
from tests.api.api_server import ROOT, ApiServer
from tests.test_server import free_port

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("llama_cpp")

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SEED = int(os.environ.get("FUZZ_SEED", "20240611"))
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))
MAX_TOKENS = 2
"""Every generation a fuzzed request asks for is cut to this many tokens (the fuzzing is
about the input; the context size already bounds a generation, this keeps each one short)."""
MAX_ITEMS = 3
"""Lists that each cost a generation or a forward pass (prompts, embedding inputs) are cut to
this many items; the caps on their length are tested in test_input_limits.py."""
_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_new_tokens", "max_length")
_COSTLY_LISTS = {"POST /v1/completions": "prompt", "POST /v1/embeddings": "input"}
_LOG_PROBLEMS = ("Traceback", "Exception in ASGI application", "ERROR ")

pytestmark = pytest.mark.timeout(600)


class FuzzedServer(ApiServer):
    """The child server, a requests session kept alive across cases, and a log watch."""

    def __init__(self, tmp: Path, port: int, *flags: str) -> None:
        super().__init__(tmp, port, *flags)
        self.calls = 0
        self.started = time.monotonic()
        self.per_operation: dict[str, list[float]] = {}
        self.statuses: dict[str, Counter[int]] = {}
        self._seen = 0
        import requests

        self.session = requests.Session()

    def new_log(self) -> str:
        """What the server logged since the last call."""
        with open(self.log_path, "rb") as log:
            log.seek(self._seen)
            new = log.read()
        self._seen += len(new)
        return new.decode(errors="replace")


@pytest.fixture(scope="module")
def fuzz_api(tmp_path_factory: pytest.TempPathFactory, tiny_kit) -> FuzzedServer:
    tmp = tmp_path_factory.mktemp("fuzz_server")
    server = FuzzedServer(tmp, free_port(), "--models-dir", str(tiny_kit.root), "--model", tiny_kit.gguf_f32.name,
                          "--threads", "1", "--ctx-size", "512", "--api-key", KEY)
    try:
        server.wait_ready()
        server.new_log()
        yield server
    finally:
        server.session.close()
        log = server.stop()
        elapsed = time.monotonic() - server.started
        print(f"\nfuzz: {server.calls} requests in {elapsed:.1f} s (seed {SEED}, {EXAMPLES} examples per operation)")
        for label, times in sorted(server.per_operation.items(), key=lambda item: -sum(item[1])):
            statuses = ", ".join(f"{n} x {s}" for s, n in sorted(server.statuses.get(label, Counter()).items()))
            print(f"  {label}: {len(times)} requests in {sum(times):.1f} s ({statuses})")
        assert "Exception in ASGI application" not in log, log


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document `create_app` serves, over an App with an empty models folder."""
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp, "models")
        models.mkdir()
        app = App.create(Settings(models_dir=str(models), settings=str(Path(tmp, "settings.yaml"))), ROOT)
        try:
            return create_app(app).openapi()
        finally:
            app.close()


DOCUMENT = openapi_document()
CONFIG = schemathesis.Config.from_dict({
    "seed": SEED,
    "suppress-health-check": ["all"],
    "generation": {"mode": "all", "max-examples": EXAMPLES, "database": "none", "no-shrink": True},
    "phases": {"stateful": {"enabled": False}},
    # Same body schema as /v1/chat/completions and /api/v1/generate: their deterministic
    # coverage cases (every field at its bounds and past them) would be the same again.
    "operations": [{"include-path": ["/v1/internal/chat-prompt", "/api/extra/generate/stream"],
                    "phases": {"coverage": {"enabled": False}}}],
})
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG).exclude(path="/v1/internal/model/unload")


def test_the_fuzzed_schema_is_the_served_one(fuzz_api: FuzzedServer) -> None:
    import httpx

    assert httpx.get(f"{fuzz_api.base}/openapi.json", timeout=30).json() == DOCUMENT


def _shorten(case: Any) -> None:
    """Cut the work a fuzzed body asks for: MAX_TOKENS per generation, MAX_ITEMS generations."""
    if isinstance(case.body, dict):
        costly = case.body.get(_COSTLY_LISTS.get(case.operation.label, ""))
        if isinstance(costly, list) and len(costly) > MAX_ITEMS and all(isinstance(p, str) for p in costly):
            del costly[MAX_ITEMS:]
        for name in _TOKEN_FIELDS:
            value = case.body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
                case.body[name] = MAX_TOKENS
        if case.operation.method.upper() == "POST" and not any(name in case.body for name in _TOKEN_FIELDS):
            case.body["max_tokens"] = MAX_TOKENS


@schema.parametrize()
def test_no_input_gets_a_5xx_or_drops_the_connection(case: Any, fuzz_api: FuzzedServer) -> None:
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    _shorten(case)
    fuzz_api.calls += 1
    start = time.monotonic()
    try:
        response = case.call_and_validate(base_url=fuzz_api.base, session=fuzz_api.session, headers=AUTH,
                                          checks=[not_a_server_error, status_code_conformance,
                                                  content_type_conformance, response_schema_conformance],
                                          timeout=60)
        fuzz_api.statuses.setdefault(case.operation.label, Counter())[response.status_code] += 1
    finally:
        fuzz_api.per_operation.setdefault(case.operation.label, []).append(time.monotonic() - start)
        logged = fuzz_api.new_log()
        # A problem logged now may come from this case or, if uvicorn wrote it late, the one before.
        assert not any(p in logged for p in _LOG_PROBLEMS), f"seed {SEED}: the server logged\n{logged}"


def test_the_server_still_answers_after_the_fuzzing(fuzz_api: FuzzedServer) -> None:
    import httpx

    with httpx.Client(base_url=fuzz_api.base, headers=AUTH, timeout=60) as client:
        for _ in range(3):  # on one kept-alive connection
            body = client.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 4}).json()
            assert body["choices"][0]["finish_reason"] in ("stop", "length"), body
        assert client.get("/v1/internal/model/info").json()["model_name"] == "tiny-llama-f32.gguf"


def test_unload_and_load_come_last(fuzz_api: FuzzedServer, tiny_kit) -> None:
    import httpx

    with httpx.Client(base_url=fuzz_api.base, headers=AUTH, timeout=60) as client:
        for _ in range(2):
            assert client.post("/v1/internal/model/unload").json() == {"status": "OK"}
        gone = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert gone.status_code == 400 and gone.json()["error"]["code"] == "model_not_loaded"
        junk = {"model_name": tiny_kit.gguf_f32.name, "args": {"ctx_size": "lots", "bogus": [1]}}
        assert 400 <= client.post("/v1/internal/model/load", json=junk).status_code < 500
        loaded = client.post("/v1/internal/model/load", json={"model_name": tiny_kit.gguf_f32.name,
                                                              "args": {"ctx_size": 256, "threads": 1}})
        assert loaded.json()["status"] == "OK", loaded.text
        assert client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
