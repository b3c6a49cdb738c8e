"""The Model tab's download panel: table rows, chooser, the worker-thread download, the note by Load."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from modules.engine.app import App
from modules.hub import downloader, memory_fit
from tests.hub_server import HubServer, kit_repo_files
from tests.kit import TinyKit


@pytest.fixture(scope="module")
def hub(tiny_kit: TinyKit) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo("kit/tiny-llama", kit_repo_files(tiny_kit.root))
        yield server


def test_panel_builds_inside_the_model_tab(app: App) -> None:
    import gradio as gr

    from modules.ui import model_tab

    with gr.Blocks() as demo:
        model_tab.create_ui(app)
    labels = {getattr(b, "label", None) for b in demo.blocks.values()}
    assert {"Hugging Face link or org/repo", "What to download", "Download a model"} <= labels


def test_rows_chooser_and_worker_download(app: App, hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from modules.ui import download_panel

    listing = downloader.list_repo("kit/tiny-llama", endpoint=hub.url, n_ctx=2048,
                                   free=memory_fit.FreeMemory(ram=2**40))
    rows = {r[0]: r for r in download_panel.file_rows(listing)}
    assert rows["tiny-llama-Q8_0.gguf"][2].startswith("GGUF Q8_0") and rows["tiny-llama-Q8_0.gguf"][4] == "yes"
    update = download_panel.choice_update(listing)
    assert update["value"] == "tiny-llama-f32.gguf" and download_panel.FOLDER_CHOICE in update["choices"]

    seen: list[float] = []
    plan = listing.plan(gguf="tiny-llama-Q8_0.gguf")
    original = downloader.download

    def via_endpoint(*args: object, **kwargs: object) -> object:
        return original(*args, endpoint=hub.url, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(downloader, "download", via_endpoint)
    paths = download_panel._run_in_worker(listing, plan, app, lambda frac, desc="": seen.append(frac))
    assert paths == [app.models.models_dir / "tiny-llama-Q8_0.gguf"]
    assert "tiny-llama-Q8_0.gguf" in app.models.list_models()


def test_memory_note_next_to_load(app: App, tiny_kit: TinyKit) -> None:
    from modules.ui import download_panel

    shutil.copy(tiny_kit.gguf_q8_0, app.models.models_dir / "tiny.gguf")
    note = download_panel.memory_note(app, "tiny.gguf")
    assert note.startswith("Memory: ~") and "KV cache" in note
    assert download_panel.memory_note(app, None) == "" and download_panel.memory_note(app, "missing.gguf") == ""
