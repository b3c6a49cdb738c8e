"""PresetStore: partial YAML over the SamplingParams defaults; safe names; shipped presets."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from modules.core.errors import InvalidRequestError, UnsafePathError
from modules.core.sampling import SamplingParams
from modules.engine.presets import PRESET_FIELDS, PresetNotFoundError, PresetStore, apply_preset, preset_diff
from modules.ui.common import default_params
from tests.traversal_payloads import TRAVERSAL_PAYLOADS

SHIPPED = Path(__file__).resolve().parent.parent / "presets"


@pytest.fixture
def store(tmp_path: Path) -> PresetStore:
    return PresetStore(tmp_path / "presets")


def test_save_writes_only_what_differs_and_loads_back(store):
    values = default_params() | {"temperature": 0.3, "top_k": 40, "max_new_tokens": 99}
    path = store.save("Mine", values)
    on_disk = yaml.safe_load(path.read_text())
    # max_new_tokens is a session field, never part of a preset; top_p 0.9 differs from 1.0
    assert on_disk == {"temperature": 0.3, "top_k": 40, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.05}
    assert store.load("Mine") == on_disk
    assert store.list() == ["Mine"]


def test_defaults_save_as_an_empty_preset(store):
    store.save("Neutral", {})
    assert store.load("Neutral") == {}


def test_save_is_atomic_and_overwrites(store):
    store.save("p", {"temperature": 0.1})
    store.save("p", {"temperature": 0.2})
    assert store.load("p") == {"temperature": 0.2}
    assert [p.name for p in store.folder.iterdir()] == ["p.yaml"]  # no temp files left


def test_unknown_keys_are_ignored_with_a_warning(store, caplog):
    store.folder.mkdir()
    (store.folder / "odd.yaml").write_text("temperature: 0.5\nmystery_sampler: 3\n")
    with caplog.at_level(logging.WARNING):
        assert store.load("odd") == {"temperature": 0.5}
    assert "mystery_sampler" in caplog.text


@pytest.mark.parametrize("text, field", [("top_p: 2\n", "top_p"), ("temperature: hot\n", "temperature"),
                                         ("mirostat_mode: 7\n", "mirostat_mode")])
def test_bad_values_name_the_field(store, text, field):
    store.folder.mkdir()
    (store.folder / "bad.yaml").write_text(text)
    with pytest.raises(InvalidRequestError, match=field):
        store.load("bad")


@pytest.mark.parametrize("text", ["temperature: [1\n", "- a list\n"])
def test_malformed_yaml_is_a_clear_error(store, text):
    store.folder.mkdir()
    (store.folder / "bad.yaml").write_text(text)
    with pytest.raises(InvalidRequestError, match="preset 'bad'"):
        store.load("bad")


def test_missing_and_delete(store):
    with pytest.raises(PresetNotFoundError):
        store.load("nope")
    store.save("gone", {"temperature": 0.1})
    store.delete("gone")
    assert store.list() == []
    with pytest.raises(PresetNotFoundError):
        store.delete("gone")


def test_save_refuses_invalid_values(store):
    with pytest.raises(InvalidRequestError, match="min_p"):
        store.save("x", {"min_p": 5})
    assert store.list() == []


@pytest.mark.parametrize("name", TRAVERSAL_PAYLOADS)
def test_traversal_names_are_refused_everywhere(store, tmp_path, name):
    for call in (lambda: store.load(name), lambda: store.save(name, {"temperature": 0.1}),
                 lambda: store.delete(name)):
        with pytest.raises(UnsafePathError):
            call()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == []


def test_apply_preset_resets_samplers_and_keeps_session_fields():
    session = default_params() | {"top_k": 50, "stop": ["###"], "max_new_tokens": 77}
    out = apply_preset(session, {"temperature": 0.0})
    assert out["temperature"] == 0.0 and out["top_k"] == 0 and out["top_p"] == 1.0
    assert out["stop"] == ["###"] and out["max_new_tokens"] == 77
    SamplingParams.from_mapping(out)


def test_preset_diff_only_holds_preset_fields():
    diff = preset_diff({"seed": 5, "stop": ["x"], "dry_multiplier": 0.8})
    assert diff == {"dry_multiplier": 0.8}
    assert set(diff) <= set(PRESET_FIELDS)


def test_shipped_presets_load_and_differ():
    store = PresetStore(SHIPPED)
    names = store.list()
    for wanted in ("Default", "Deterministic", "Creative", "Min-p", "Mirostat"):
        assert wanted in names
    loaded = {n: store.load(n) for n in names}
    assert loaded["Default"] == {"temperature": 0.7, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.05}
    assert SamplingParams.from_mapping(loaded["Deterministic"]).greedy
    assert loaded["Creative"]["dry_multiplier"] == 0.8
    assert SamplingParams.from_mapping(loaded["Mirostat"]).mirostat_mode == 2
    assert len({tuple(sorted(v.items())) for v in loaded.values()}) == len(names)
