"""Parameters, Default, Notebook and Session tabs through gradio_client against a real server.py.

One server per module (the kit's f32 GGUF, --threads 1, presets in a temporary folder);
each gradio_client Client is one browser session, so its `params` state is its own.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.test_server import ROOT, start_server, stop


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_kit) -> Iterator[tuple[str, Path]]:  # noqa: ANN001
    pytest.importorskip("llama_cpp")
    tmp = tmp_path_factory.mktemp("params_server")
    presets = tmp / "presets"
    shutil.copytree(ROOT / "presets", presets)
    proc, url = start_server(tmp, "--models-dir", str(tiny_kit.gguf_f32.parent), "--model", tiny_kit.gguf_f32.name,
                             "--threads", "1", "--ctx-size", "512", "--presets-dir", str(presets))
    yield url, presets
    stop(proc)


def client(url: str):  # noqa: ANN201 - gradio_client's Client
    from gradio_client import Client

    return Client(url, verbose=False)


def test_save_a_preset_and_load_it_in_a_new_session(served):
    url, presets = served
    first = client(url)
    status = first.predict("Deterministic", api_name="/load_preset")[0]
    assert "Loaded preset **Deterministic**" in status
    first.predict(json.dumps({"top_k": 7, "max_new_tokens": 33}), api_name="/set_params")
    chosen, status = first.predict("Mine", api_name="/save_preset_as")
    assert chosen["value"] == "Mine" and "Mine" in str(chosen["choices"]) and "Saved preset **Mine**" in status
    # temperature 0 and top_k 7 differ from the defaults; max_new_tokens is a session field
    assert yaml.safe_load((presets / "Mine.yaml").read_text()) == {"temperature": 0.0, "top_k": 7}

    second = client(url)
    values = second.predict("Mine", api_name="/load_preset")
    assert "Loaded preset **Mine**" in values[0]
    assert 7 in values and 0.0 in values

    assert "Deleted" in second.predict("Mine", api_name="/delete_preset")[1]
    assert not (presets / "Mine.yaml").exists()


@pytest.mark.parametrize("name", ["../evil", "..\\evil", "CON", "%2e%2e%2fx", ""])
def test_bad_preset_names_are_a_message_not_a_file(served, name):
    url, presets = served
    before = sorted(p.name for p in presets.parent.rglob("*"))
    _, status = client(url).predict(name, api_name="/save_preset_as")
    assert status.startswith("**") and "preset name" in status and "Traceback" not in status
    assert sorted(p.name for p in presets.parent.rglob("*")) == before


def test_a_bad_value_is_explained_and_the_state_kept(served):
    url, _ = served
    session = client(url)
    status = session.predict(json.dumps({"top_p": 3}), api_name="/set_params")[0]
    assert "top_p" in status
    status = session.predict("not json", api_name="/set_params")[0]
    assert "must be JSON" in status


def test_default_generate_then_continue_appends(served):
    url, _ = served
    session = client(url)
    session.predict(json.dumps({"temperature": 0, "max_new_tokens": 8, "seed": 1}), api_name="/set_params")
    text, info = session.predict("Once upon a time", api_name="/generate")
    assert text and "tokens/s" in info
    more, info = session.predict("Once upon a time", text, api_name="/continue")
    assert more.startswith(text) and len(more) > len(text)
    again, _ = session.predict("Once upon a time", api_name="/generate")
    assert again == text  # greedy, same prompt: same reply


def test_notebook_generates_in_place_with_memory_and_note(served):
    url, _ = served
    session = client(url)
    session.predict(json.dumps({"temperature": 0, "max_new_tokens": 8, "seed": 1}), api_name="/set_params")
    story = "The ship sailed north.\nThe crew was tired.\nThen"
    plain, info, plain_count = session.predict(story, "", "", 3, api_name="/notebook_generate")
    text, info, count = session.predict(story, "A tale of the sea, told by the cook.", "storm coming", 2,
                                        api_name="/notebook_generate")
    assert text.startswith(story) and len(text) > len(story) and "tokens/s" in info
    tokens = int(count.split()[1])
    assert count.startswith("prompt: ") and tokens > int(plain_count.split()[1])  # memory and note were sent
    assert plain.startswith(story)


def test_session_theme_is_saved_to_settings_yaml(served):
    url, presets = served
    session = client(url)
    status, flags = session.predict("dark", api_name="/set_theme")
    assert "theme = dark" in status and "theme: dark" in flags
    status, _ = session.predict(api_name="/save_session_settings")
    assert "Saved" in status
    saved = yaml.safe_load((presets.parent / "settings.yaml").read_text())
    assert saved["theme"] == "dark" and "api_key" not in saved


def test_restart_rebuilds_the_ui_and_keeps_the_model(served):
    """Last in the module: the UI goes away and comes back on the same port."""
    url, _ = served
    assert "reload this page" in client(url).predict(api_name="/restart_ui")
    time.sleep(1.5)  # the handler sets the restart event after 1 s
    deadline, text = time.time() + 30, None
    while text is None and time.time() < deadline:
        try:
            session = client(url)
            session.predict(json.dumps({"temperature": 0, "max_new_tokens": 4}), api_name="/set_params")
            text, _ = session.predict("Hello", api_name="/generate")
        except Exception:  # noqa: BLE001 - the old UI is closing, the new one not up yet
            time.sleep(0.5)
    assert text, "the UI did not come back with the model loaded after Restart"
