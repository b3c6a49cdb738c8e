"""server.py end to end: it starts with no model, and with --model it generates over HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp_path: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    (tmp_path / "CMD_FLAGS.txt").write_text("")
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "server.py"), "--listen-port", str(port),
         "--settings", str(tmp_path / "settings.yaml"), *flags],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {(tmp_path / 'server.log').read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail(f"server did not come up: {(tmp_path / 'server.log').read_text()}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_starts_with_no_model_and_says_how_to_get_one(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    proc, url = start_server(tmp_path, "--models-dir", str(models))
    try:
        from gradio_client import Client

        client = Client(url, verbose=False)
        with pytest.raises(Exception, match="no model is loaded"):
            client.predict("Hello", api_name="/generate")
        log = (tmp_path / "server.log").read_text()
        assert "No models in" in log
    finally:
        stop(proc)


def test_generates_with_the_kit_gguf(tmp_path, tiny_kit):
    pytest.importorskip("llama_cpp")
    proc, url = start_server(tmp_path, "--models-dir", str(tiny_kit.gguf_f32.parent),
                             "--model", tiny_kit.gguf_f32.name, "--threads", "1", "--ctx-size", "256")
    try:
        from gradio_client import Client

        client = Client(url, verbose=False)
        # sampler settings live in the session's state, set through the Parameters tab's API
        client.predict('{"max_new_tokens": 16, "temperature": 0, "seed": 1234}', api_name="/set_params")
        text, info = client.predict("Hello", api_name="/generate")
        again, _ = client.predict("Hello", api_name="/generate")
        assert text and text == again  # greedy: same prompt, same reply
        assert "tokens/s" in info
    finally:
        stop(proc)


def test_model_tab_loads_refuses_a_corrupt_file_and_keeps_serving(tmp_path, tiny_kit):
    pytest.importorskip("llama_cpp")
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(tiny_kit.gguf_f32.read_bytes())
    (models / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    proc, url = start_server(tmp_path, "--models-dir", str(models), "--threads", "1", "--ctx-size", "256")
    try:
        from gradio_client import Client

        client = Client(url, verbose=False)
        status = client.predict("broken.gguf", "auto", api_name="/load_model")
        assert "Could not load broken.gguf" in status
        status = client.predict("tiny.gguf", "auto", api_name="/load_model")
        assert status.startswith("Loaded tiny.gguf with llama.cpp")
        client.predict('{"max_new_tokens": 8, "temperature": 0, "seed": 1}', api_name="/set_params")
        text, _ = client.predict("Hello", api_name="/generate")
        assert text
        assert client.predict(api_name="/unload_model") == "No model loaded."
        assert "Saved the settings for tiny.gguf" in client.predict("tiny.gguf", "auto", api_name="/save_settings")
        saved = (models / "config-user.yaml").read_text()
        assert "tiny.gguf:" in saved and "ctx_size: 256" in saved and "threads: 1" in saved
    finally:
        stop(proc)


def _status(port: int, path: str, headers: dict[str, str], method: str = "GET") -> int:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=b"{}" if method == "POST" else None,
                     headers={"Content-Type": "application/json", **headers})
        return conn.getresponse().status
    finally:
        conn.close()


def test_both_faces_refuse_dns_rebinding_and_foreign_pages(tmp_path):
    """The UI (gradio's own app) and the API sit behind the same Host and Origin checks."""
    models = tmp_path / "models"
    models.mkdir()
    api_port = free_port()
    proc, url = start_server(tmp_path, "--models-dir", str(models), "--api", "--api-port", str(api_port),
                             "--allowed-hosts", "chat.example.com")
    ui_port = int(url.rstrip("/").rsplit(":", 1)[1])
    try:
        for port, path in ((ui_port, "/"), (ui_port, "/gradio_api/info"), (api_port, "/v1/models")):
            assert _status(port, path, {"Host": "evil.example"}) == 403, (port, path)
            assert _status(port, path, {"Host": f"evil.example:{port}"}) == 403
            assert _status(port, path, {"Host": f"localhost:{port}"}) == 200
            assert _status(port, path, {"Host": f"127.0.0.1:{port}"}) == 200
            assert _status(port, path, {"Host": "chat.example.com"}) == 200
        # A page elsewhere may not drive the UI's queue, nor read its config.
        assert _status(ui_port, "/gradio_api/queue/join", {"Origin": "http://evil.example"}, "POST") == 403
        assert _status(ui_port, "/config", {"Origin": "http://evil.example"}) == 403
        assert _status(ui_port, "/config", {"Origin": f"http://127.0.0.1:{ui_port}"}) == 200
        assert _status(api_port, "/v1/internal/model/unload", {"Origin": "http://evil.example"}, "POST") == 403
        log = (tmp_path / "server.log").read_text()
        assert "refused" in log and "Traceback" not in log
    finally:
        stop(proc)
