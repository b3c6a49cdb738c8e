"""`--nowebui`: the API alone, gradio never imported, ready fast; /health on its port."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from modules.core.settings import load_settings
from tests.test_startup import HEAVY, ROOT, free_port, run_python

PROBE = """
import json, os, sys, threading, time, urllib.error, urllib.request
sys.path.insert(0, {root!r})
sys.argv = ['server.py', *{flags!r}]
t0 = time.perf_counter()
import server

def get(path):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({{}}))
    try:
        with opener.open('http://127.0.0.1:{port}' + path, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()

def probe():
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            status, body = get('/health')
            break
        except OSError:
            time.sleep(0.02)
    else:
        print('NEVER READY', flush=True)
        os._exit(1)
    ready = time.perf_counter() - t0
    models = get('/v1/models')
    lines = ['HEALTH ' + json.dumps([status, json.loads(body)]), 'MODELS ' + json.dumps(models[0]),
             'READY %.2f' % ready,
             'LOADED ' + json.dumps(sorted(m for m in {watch!r} if m in sys.modules))]
    sys.stdout.write('\\n' + '\\n'.join(lines) + '\\n')
    sys.stdout.flush()
    os._exit(0)

threading.Thread(target=probe, daemon=True).start()
server.main()
"""


def _lines(out: str) -> dict[str, str]:
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in out.splitlines() if " " in line}


def test_nowebui_serves_the_api_without_importing_gradio(tmp_path):
    (tmp_path / "models").mkdir()
    port = free_port()
    flags = ["--nowebui", "--models-dir", str(tmp_path / "models"), "--settings", str(tmp_path / "settings.yaml"),
             "--api-port", str(port), "--listen-port", str(free_port())]
    out = _lines(run_python(PROBE.format(root=str(ROOT), flags=flags, port=port,
                                         watch=(*HEAVY, "gradio", "modules.ui")), timeout=90))
    assert json.loads(out["HEALTH"]) == [200, {"status": "ok"}]
    assert json.loads(out["MODELS"]) == 200
    assert json.loads(out["LOADED"]) == []
    assert float(out["READY"]) < 20  # the real goal (1.5 s) is bench/startup.py's; this is a loose guard


def test_nowebui_implies_the_api_and_is_never_saved(tmp_path):
    (tmp_path / "settings.yaml").write_text("nowebui: true\n")
    from_file = load_settings(["--settings", str(tmp_path / "settings.yaml")], tmp_path, tmp_path / "none.txt")
    assert from_file.nowebui is False  # a command-line switch: settings.yaml never turns the UI off
    settings = load_settings(["--nowebui"], tmp_path, tmp_path / "none.txt")
    assert settings.nowebui and "nowebui" not in settings.persisted()


@pytest.mark.parametrize("flag", ["--nowebui"])
def test_help_lists_the_flag(flag):
    done = subprocess.run([sys.executable, "server.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert flag in done.stdout
