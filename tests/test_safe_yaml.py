"""Hostile YAML in user files: anchors and aliases, deep nesting and huge files are refused.

`yaml.safe_load` keeps an alias as a shared reference, so a billion-laughs file loads fast
and small; it blows up later, when anything walks the result (str(), a dump, a copy). The
bombs here therefore sit under keys the stores ignore: without the guard each load
succeeds quietly and the test fails on "did not raise"; with it each is refused at once.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from modules.chat.characters import CharacterStore, PersonaStore
from modules.core import safe_yaml
from modules.core.errors import InvalidRequestError
from modules.core.safe_yaml import MAX_YAML_BYTES, MAX_YAML_DEPTH, load_yaml
from modules.core.settings import Settings
from modules.engine.model_manager import ModelManager
from modules.engine.presets import PresetStore

ANCHORS = "YAML anchors and aliases"


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    """Top-level keys lol0..lolN, each a list of `width` aliases of the one before: width**levels laughs."""
    lines = ['lol0: &lol0 "lol"']
    for level in range(1, levels + 1):
        lines.append(f"lol{level}: &lol{level} [{', '.join([f'*lol{level - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


BOMB = billion_laughs()


def test_the_bomb_is_small_and_would_expand_to_a_billion_laughs():
    assert len(BOMB.encode()) < 1024
    graph = yaml.safe_load(BOMB)  # what the stores got before the guard: a shared-reference graph

    def laughs(node: Any) -> int:
        return 1 if isinstance(node, str) else len(node) * laughs(node[0])

    assert laughs(graph["lol9"]) == 9**9


def _refused_quickly(call: Callable[[], Any], param: str) -> InvalidRequestError:
    """Run `call`; it must raise the anchors InvalidRequestError in well under 2 s, in little memory."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(InvalidRequestError, match=ANCHORS) as caught:
            call()
        seconds = time.perf_counter() - start
        _size, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seconds < 0.5 and peak < 4 * 2**20, (seconds, peak)
    assert caught.value.param == param
    assert not isinstance(caught.value, yaml.YAMLError)
    return caught.value


def test_a_billion_laughs_character_file_is_refused(tmp_path: Path):
    store = CharacterStore(tmp_path / "characters")
    store.folder.mkdir()
    (store.folder / "Bomb.yaml").write_text(BOMB + "name: Bomb\ngreeting: hi\ncontext: c\n", encoding="utf-8")
    error = _refused_quickly(lambda: store.load("Bomb"), "file")
    assert "characters/Bomb.yaml" in str(error)


def test_a_billion_laughs_character_import_is_refused(tmp_path: Path):
    store = CharacterStore(tmp_path / "characters")
    data = (BOMB + "name: Bomb\ngreeting: hi\n").encode()
    _refused_quickly(lambda: store.import_file("bomb.yaml", data), "file")
    assert not store.folder.exists() or not any(store.folder.iterdir())


def test_a_billion_laughs_persona_is_refused(tmp_path: Path):
    store = PersonaStore(tmp_path / "personas")
    store.folder.mkdir()
    (store.folder / "Bomb.yml").write_text(BOMB + "name: Bomb\ndescription: d\n", encoding="utf-8")
    _refused_quickly(lambda: store.load("Bomb"), "file")


def test_a_billion_laughs_preset_is_refused(tmp_path: Path):
    store = PresetStore(tmp_path / "presets")
    store.folder.mkdir()
    (store.folder / "bomb.yaml").write_text(BOMB + "temperature: 0.5\n", encoding="utf-8")
    error = _refused_quickly(lambda: store.load("bomb"), "preset")
    assert "preset 'bomb'" in str(error)


def test_a_billion_laughs_config_user_yaml_is_refused(tmp_path: Path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "fake.gguf").write_bytes(b"GGUF")
    text = BOMB.replace("\n", "\n  ").rstrip() + "\n"  # the laughs nested inside the model's settings
    (models / "config-user.yaml").write_text(f"fake.gguf:\n  ctx_size: 96\n  {text}", encoding="utf-8")
    manager = ModelManager(Settings(models_dir=str(models)), models)
    error = _refused_quickly(lambda: manager.saved_settings("fake.gguf"), "model")
    assert "config-user.yaml" in str(error)


@pytest.mark.parametrize("text", [
    "a: &x 1\nb: 2\n",  # an anchor alone
    "a: *x\n",  # an alias to nothing
    "base: &b {t: 1}\nuse:\n  <<: *b\n",  # a merge key
    "- &a [1, 2]\n- *a\n",
    "? &k key\n: value\n",  # an anchored key
])
def test_every_anchor_and_alias_is_refused(text: str):
    with pytest.raises(InvalidRequestError, match=ANCHORS) as caught:
        load_yaml(text, "x.yaml", "thing")
    assert caught.value.param == "thing" and str(caught.value).startswith("x.yaml: ")


def test_an_ampersand_or_asterisk_inside_text_is_not_an_anchor():
    text = 'a: "&not an anchor"\nb: R&D *and* more\nc: |\n  *still text* &here\n'
    assert load_yaml(text, "x.yaml") == yaml.safe_load(text)


@pytest.mark.parametrize("text", [
    "[" * 10_000 + "]" * 10_000,
    "{a: " * 10_000 + "1" + "}" * 10_000,
    # Block styles grow with the square of the depth: 1,000 levels are 1 MB (and already
    # a RecursionError for PyYAML's recursive composer).
    "".join(f"{'  ' * i}k:\n" for i in range(1_000)) + "  " * 1_000 + "v\n",
    "".join(f"{' ' * i}-\n" for i in range(1_000)) + " " * 1_000 + "v\n",
], ids=["flow-lists", "flow-maps", "block-maps", "block-lists"])
def test_deep_nesting_is_refused_without_a_recursion_error(text: str):
    start = time.perf_counter()
    with pytest.raises(InvalidRequestError, match="nested deeper"):
        load_yaml(text, "deep.yaml")
    assert time.perf_counter() - start < 1.0


def test_nesting_up_to_the_limit_loads(tmp_path: Path):
    text = "[" * MAX_YAML_DEPTH + "1" + "]" * MAX_YAML_DEPTH
    value = load_yaml(text, "x.yaml")
    for _ in range(MAX_YAML_DEPTH):
        value = value[0]
    assert value == 1
    with pytest.raises(InvalidRequestError, match="nested deeper"):
        load_yaml("[" + text + "]", "x.yaml")


def test_a_deep_preset_is_refused_as_a_client_error(tmp_path: Path):
    store = PresetStore(tmp_path / "presets")
    store.folder.mkdir()
    (store.folder / "deep.yaml").write_text("temperature: " + "[" * 10_000 + "]" * 10_000 + "\n")
    with pytest.raises(InvalidRequestError, match="nested deeper") as caught:
        store.load("deep")
    assert caught.value.param == "preset"


def test_a_file_over_the_size_cap_is_refused_before_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store = CharacterStore(tmp_path / "characters")
    store.folder.mkdir()
    big = store.folder / "Big.yaml"
    big.write_text("name: Big\ncontext: " + "x" * MAX_YAML_BYTES + "\n", encoding="utf-8")
    presets = PresetStore(tmp_path / "presets")
    presets.folder.mkdir()
    (presets.folder / "big.yaml").write_text("temperature: 1\n#" + "x" * MAX_YAML_BYTES + "\n")
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self} was read"))
    monkeypatch.setattr(Path, "read_text", lambda self, **kw: pytest.fail(f"{self} was read"))
    with pytest.raises(InvalidRequestError, match="too large") as caught:
        store.load("Big")
    assert caught.value.param == "file"
    with pytest.raises(InvalidRequestError, match="too large"):
        presets.load("big")
    with pytest.raises(InvalidRequestError, match="too large"):
        load_yaml(b"#" * (MAX_YAML_BYTES + 1), "x.yaml")


# ---------------------------------------------------------------- ordinary files are unchanged

ORDINARY = [
    "name: Ann\ngreeting: Hello!\ncontext: |\n  Line one.\n  Line two: with a colon.\n",
    "temperature: 0.7\ntop_p: 0.9\nsampler_priority: [temperature, top_k]\nstop:\n- '###'\n",
    "fake.gguf:\n  loader: llama.cpp\n  ctx_size: 4096\nother/model.gguf: {n_gpu_layers: -1}\n",
    "\ufeffname: Zoë\ndescription: \"Unicode \\u00e9 and emoji \U0001F600\"\ndate: 2024-01-02\nflag: yes\n",
    "card:\n  data:\n    extensions: {depth_prompt: {prompt: x, depth: 4}}\n    tags: [a, b]\n",
    "",
    "# only a comment\n",
    "- a\n- b\n",
]


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_yaml_loads_exactly_as_safe_load(text: str):
    assert load_yaml(text, "x.yaml") == yaml.safe_load(text)
    assert load_yaml(text.encode("utf-8"), "x.yaml") == yaml.safe_load(text.encode("utf-8"))


def test_malformed_yaml_still_raises_yaml_error_for_each_site_to_word():
    with pytest.raises(yaml.YAMLError):
        load_yaml("a: [1, 2\n", "x.yaml")
    with pytest.raises(yaml.YAMLError):
        load_yaml("a: 1\n---\nb: 2\n", "x.yaml")  # one document only, like safe_load


def test_ordinary_user_files_still_load(tmp_path: Path):
    characters = CharacterStore(tmp_path / "characters")
    characters.folder.mkdir()
    (characters.folder / "Ann.yaml").write_text(ORDINARY[0], encoding="utf-8")
    ann = characters.load("Ann")
    assert ann.greeting == "Hello!" and ann.context == "Line one.\nLine two: with a colon.\n"
    personas = PersonaStore(tmp_path / "personas")
    personas.folder.mkdir()
    (personas.folder / "Zoe.yaml").write_text(ORDINARY[3], encoding="utf-8")
    assert personas.load("Zoe").description == "Unicode é and emoji \U0001F600"
    presets = PresetStore(tmp_path / "presets")
    presets.folder.mkdir()
    (presets.folder / "p.yaml").write_text("temperature: 0.7\ntop_p: 0.9\n", encoding="utf-8")
    assert presets.load("p") == {"temperature": 0.7, "top_p": 0.9}
    models = tmp_path / "models"
    models.mkdir()
    (models / "fake.gguf").write_bytes(b"GGUF")
    (models / "config-user.yaml").write_text("fake.gguf:\n  ctx_size: 96\n", encoding="utf-8")
    assert ModelManager(Settings(models_dir=str(models)), models).saved_settings("fake.gguf") == {"ctx_size": 96}


def test_the_limits_are_named_constants():
    assert safe_yaml.MAX_YAML_BYTES == 4 * 2**20 and safe_yaml.MAX_YAML_DEPTH == 64


def test_too_many_values_are_refused(monkeypatch: pytest.MonkeyPatch):
    """The value cap bounds the parsing time (a 4 MiB "[1, 1, ...]" takes a minute unbounded)."""
    assert safe_yaml.MAX_YAML_NODES == 100_000
    monkeypatch.setattr(safe_yaml, "MAX_YAML_NODES", 1000)
    with pytest.raises(InvalidRequestError, match="more than 1,000 values") as caught:
        load_yaml("[" + "1, " * 1000 + "1]", "many.yaml", "preset")
    assert caught.value.param == "preset"
    assert len(load_yaml("[" + "1, " * 998 + "1]", "ok.yaml")) == 999  # the list itself is a value too
    with pytest.raises(InvalidRequestError, match="more than 1,000 values"):
        load_yaml("".join(f"k{i}: v\n" for i in range(501)), "many.yaml")  # keys count too
