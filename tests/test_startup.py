"""Start-up is fast and imports nothing heavy before it is needed.

The lists below are the regression guard for issue 9's start-up goal: building the App and
the UI with no model, and starting server.py itself, must not import a backend, the API
when --api is not given, or an extension nobody enabled. Timing belongs in
bench/startup.py; the only bound here (--help) is generous.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "llama_cpp", "accelerate", "safetensors", "tokenizers", "gguf", "exllamav2",
         "gptqmodel", "bitsandbytes", "optimum", "sentence_transformers", "usearch")
"""Backends and their libraries: imported only inside a loader's load() (or an extension that needs them)."""
NOT_WITHOUT_API = ("modules.api", "sse_starlette")
"""The API's modules: imported only when --api is given."""


def run_python(code: str, timeout: float = 120) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_help_is_fast_and_imports_no_backend():
    start = time.perf_counter()
    out = run_python(
        "import runpy, sys\n"
        "sys.argv = ['server.py', '--help']\n"
        "try:\n    runpy.run_path('server.py', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        f"print('HEAVY', [m for m in {(*HEAVY, 'gradio', 'fastapi')!r} if m in sys.modules])\n"
    )
    elapsed = time.perf_counter() - start
    assert "--n-gpu-layers" in out
    assert "HEAVY []" in out
    assert elapsed < 2.0, f"--help took {elapsed:.2f} s"


def test_building_the_app_imports_neither_gradio_nor_a_backend(tmp_path):
    out = run_python(
        "import sys\nfrom pathlib import Path\n"
        "from modules.engine.app import App\nfrom modules.core.settings import Settings\n"
        f"App.create(Settings(models_dir={str(tmp_path)!r}), Path('.'))\n"
        f"print('LOADED', [m for m in {(*HEAVY, *NOT_WITHOUT_API, 'gradio', 'fastapi')!r} if m in sys.modules])\n"
    )
    assert "LOADED []" in out


def test_building_the_app_and_ui_imports_no_backend(tmp_path):
    out = run_python(
        "import sys\nfrom pathlib import Path\n"
        "from modules.engine.app import App\nfrom modules.core.settings import Settings\nfrom modules.ui.blocks import create_ui\n"
        f"app = App.create(Settings(models_dir={str(tmp_path)!r}), Path('.'))\n"
        "create_ui(app)\n"
        f"print('HEAVY', [m for m in {(*HEAVY, *NOT_WITHOUT_API)!r} if m in sys.modules])\n"
        "print('EXTENSIONS', [m for m in sys.modules if m.startswith('workbench_extensions')])\n"
    )
    assert "HEAVY []" in out
    assert "EXTENSIONS []" in out


def test_gradio_imports_without_rewriting_its_stubs():
    out = run_python(
        "import sys\nfrom modules.ui.gradio_import import skip_pyi_regeneration, _SkipPyiFinder\n"
        "print('FIRST', skip_pyi_regeneration(), 'AGAIN', skip_pyi_regeneration())\n"
        "import gradio as gr\nimport gradio.blocks_events, gradio.component_meta\n"
        "print('STUBS', gradio.component_meta.create_or_modify_pyi.__name__,"
        " gradio.blocks_events.create_or_modify_pyi.__name__)\n"
        "print('HOOK LEFT', any(isinstance(f, _SkipPyiFinder) for f in sys.meta_path))\n"
        "print('AFTER IMPORT', skip_pyi_regeneration())\n"
        "with gr.Blocks() as demo:\n    box = gr.Textbox(label='x')\n    box.change(lambda s: s, box, box)\n"
        "print('BUILT', type(box).__name__, len(demo.fns))\n"
    )
    assert "FIRST True AGAIN False" in out
    assert "STUBS _no_pyi _no_pyi" in out
    assert "HOOK LEFT False" in out
    assert "AFTER IMPORT False" in out
    assert "BUILT Textbox 1" in out


PROBE = """
import os, sys, threading, time, urllib.request
sys.path.insert(0, {root!r})
sys.argv = ['server.py', *{flags!r}]
import server

def probe():
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({{}}))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with opener.open('http://127.0.0.1:{port}/', timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.1)
    else:
        print('NEVER READY', flush=True)
        os._exit(1)
    meta = sys.modules['gradio.component_meta']
    with opener.open('http://127.0.0.1:{port}/health', timeout=2) as response:
        health = response.read().decode()
    # One write per line: Gradio's launch() prints from the main thread meanwhile, and print()'s
    # separate writes of each argument would interleave with it.
    lines = ['STUBS ' + meta.create_or_modify_pyi.__name__, 'HEALTH ' + health,
             'LOADED ' + repr(sorted(m for m in {watch!r} if m in sys.modules)),
             'EXTENSIONS ' + repr([m for m in sys.modules if m.startswith('workbench_extensions')])]
    sys.stdout.write('\\n' + '\\n'.join(lines) + '\\n')
    sys.stdout.flush()
    os._exit(0)

threading.Thread(target=probe, daemon=True).start()
server.main()
"""


@pytest.mark.parametrize("api", [False, True], ids=["ui", "ui+api"])
def test_server_starts_with_no_model_and_imports_nothing_heavy(tmp_path, api):
    """server.main() itself, up to a UI that answers: no backend, no API unless asked, no extension."""
    (tmp_path / "models").mkdir()
    port = free_port()
    flags = ["--models-dir", str(tmp_path / "models"), "--settings", str(tmp_path / "settings.yaml"),
             "--listen-port", str(port)]
    if api:
        flags += ["--api", "--api-port", str(free_port())]
    watch = HEAVY if api else (*HEAVY, *NOT_WITHOUT_API)
    out = run_python(PROBE.format(root=str(ROOT), flags=flags, port=port, watch=watch), timeout=150)
    assert "STUBS _no_pyi" in out  # server.py installed the hook before gradio's first import
    assert 'HEALTH {"status": "ok"}' in out  # /health on the UI port too
    assert "LOADED []" in out
    assert "EXTENSIONS []" in out
