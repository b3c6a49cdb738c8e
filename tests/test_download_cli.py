"""download-model.py in a subprocess, with HF_ENDPOINT pointing the real client at the local hub."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hub_server import HubServer, kit_repo_files
from tests.kit import TinyKit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hub(tiny_kit: TinyKit) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo("kit/tiny-llama", kit_repo_files(tiny_kit.root))
        yield server


def _cli(hub: HubServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, "download-model.py", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def test_cli_downloads_one_gguf_with_a_progress_bar(hub: HubServer, tiny_kit: TinyKit, tmp_path: Path) -> None:
    link = "https://huggingface.co/kit/tiny-llama/blob/main/tiny-llama-Q8_0.gguf"
    run = _cli(hub, link, "--models-dir", str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "tiny-llama-Q8_0.gguf").read_bytes() == tiny_kit.gguf_q8_0.read_bytes()
    assert "100%" in run.stderr and "tiny-llama-Q8_0.gguf" in run.stderr  # tqdm's bar
    assert "GGUF Q8_0" in run.stdout and "verified" in run.stdout


def test_cli_fails_clearly_on_a_bad_link_and_a_missing_repo(hub: HubServer, tmp_path: Path) -> None:
    bad = _cli(hub, "https://example.com/not/a-model", "--models-dir", str(tmp_path))
    assert bad.returncode == 1 and "error:" in bad.stderr and "not a Hugging Face link" in bad.stderr
    missing = _cli(hub, "kit/does-not-exist", "--models-dir", str(tmp_path))
    assert missing.returncode == 1 and "kit/does-not-exist not found" in missing.stderr
    assert "Traceback" not in bad.stderr + missing.stderr


def test_output_is_an_alias_of_models_dir(hub: HubServer, tiny_kit: TinyKit, tmp_path: Path) -> None:
    link = "https://huggingface.co/kit/tiny-llama/blob/main/tiny-llama-Q8_0.gguf"
    run = _cli(hub, link, "--output", str(tmp_path / "elsewhere"))
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "elsewhere" / "tiny-llama-Q8_0.gguf").read_bytes() == tiny_kit.gguf_q8_0.read_bytes()
