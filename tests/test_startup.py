"""Start-up is fast and imports no backend before a model is loaded."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "llama_cpp")


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_help_is_fast_and_imports_no_backend():
    start = time.perf_counter()
    out = run_python(
        "import runpy, sys\n"
        "sys.argv = ['server.py', '--help']\n"
        "try:\n    runpy.run_path('server.py', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    elapsed = time.perf_counter() - start
    assert "--n-gpu-layers" in out
    assert "HEAVY []" in out
    assert elapsed < 2.0, f"--help took {elapsed:.2f} s"


def test_building_the_app_and_ui_imports_no_backend(tmp_path):
    out = run_python(
        "import sys\nfrom pathlib import Path\n"
        "from modules.app import App\nfrom modules.settings import Settings\nfrom modules.ui import create_ui\n"
        f"app = App.create(Settings(models_dir={str(tmp_path)!r}), Path('.'))\n"
        "create_ui(app)\n"
        f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    assert "HEAVY []" in out
