"""Notebook and presets in a real browser: generate with Memory set; save a preset and load it back.

Uses the browser harness in tests/browser/conftest.py; this module's server also gets a
presets folder of its own and starts with the kit's GGUF loaded.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.browser.conftest import REPO, Server, screenshot, start_server, stop_server, wait_until

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, server_env: dict[str, str]) -> Iterator[Server]:
    pytest.importorskip("llama_cpp")
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(REPO / "presets", root / "presets")
    running = start_server(root, models_dir, "--threads", "1", "--ctx-size", "1024", "--model", "tiny-f32.gguf",
                           env=server_env | {"WORKBENCH_TEST_TOKEN_DELAY": "0"})
    yield running
    stop_server(running)


def open_tab(page, name: str) -> None:  # noqa: ANN001 - Playwright's Page
    page.get_by_role("tab", name=name, exact=True).click()


def test_notebook_generates_in_place_with_memory(page, server: Server) -> None:  # noqa: ANN001
    open_tab(page, "Notebook")
    story = "The lighthouse keeper climbed the stairs.\nThe lamp was dark.\n"
    page.fill("#notebook-memory textarea", "A quiet story set on a northern island.")
    page.fill("#notebook-note textarea", "melancholy")
    page.fill("#notebook-text textarea", story)
    page.click("#notebook-generate")
    text = page.locator("#notebook-text textarea")
    wait_until(lambda: len(text.input_value()) > len(story)
               and re.search(r"tokens/s · (stop|length)", page.inner_text("body")) is not None,
               timeout=60, what="the notebook to grow")
    value = text.input_value()
    assert value.startswith(story)
    assert "A quiet story" not in value and "Author's note" not in value  # sent, never written into the text
    assert "prompt:" in page.inner_text("body")
    screenshot(page, "notebook-tab")


def test_save_a_preset_and_load_it_back(page, server: Server) -> None:  # noqa: ANN001
    open_tab(page, "Parameters")
    top_k = page.locator("#param-top_k input[type='number']")
    top_k.fill("17")
    top_k.press("Enter")
    page.locator("#param-temperature input[type='number']").fill("0.42")
    page.locator("#param-temperature input[type='number']").press("Enter")
    time.sleep(0.5)  # let the input events reach the session state
    page.locator("#preset-new-name").locator("input, textarea").first.fill("Browser made")
    page.click("#preset-save-as")
    page.locator("#preset-status").get_by_text("Saved preset").wait_for()
    saved = yaml.safe_load((server.root / "presets" / "Browser made.yaml").read_text())
    assert saved["top_k"] == 17 and saved["temperature"] == 0.42

    page.reload()
    page.wait_for_selector("#chat-log", timeout=60_000)
    open_tab(page, "Parameters")
    assert page.locator("#param-top_k input[type='number']").input_value() == "0"
    page.locator("#preset-name input").click()
    page.get_by_role("option", name="Browser made", exact=True).click()
    page.locator("#preset-status").get_by_text("Loaded preset").wait_for()
    wait_until(lambda: page.locator("#param-top_k input[type='number']").input_value() == "17",
               what="the preset's top_k")
    assert page.locator("#param-temperature input[type='number']").input_value() == "0.42"
    screenshot(page, "parameters-tab")
