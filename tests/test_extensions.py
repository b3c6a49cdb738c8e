"""Extension hooks on the engine path (ChatService, Generator), isolation, loading and params."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import yaml

from modules.chat.service import ChatSetup
from modules.chat.types import Character, Persona
from modules.core.errors import UnsafePathError
from modules.core.sampling import SamplingParams
from modules.core.settings import Settings, load_settings
from modules.engine.app import App
from modules.engine.extensions import GENERATION_ORDER, HookSpec, check_hook, load_script
from tests.extension_scripts import BROKEN, CUSTOM, FLAKY_OUTPUT, RECORDER, write_extension
from tests.fakes import EOS, script_text

ALICE = Character(name="Alice", greeting="Hello!", context="Alice is a librarian.")
SETUP = ChatSetup(character=ALICE, persona=Persona(name="Bob"))
PARAMS = SamplingParams(temperature=0, max_new_tokens=40)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake(app):
    app.models.load("fake.gguf", loader="fake", overrides={"ctx_size": 512})
    return app.models.current


def enable(app: App, name: str, source: str):
    write_extension(app.root, name, source)
    assert app.set_extensions([name]) == [name]
    return app.extensions.enabled[0].module


def seen(fake) -> str:
    return bytes(i for i in fake.seen_prompts[-1] if i < 256).decode()


def test_chat_send_calls_every_hook_once_in_order(app, fake):
    module = enable(app, "recorder", RECORDER)
    assert module.CALLS == ["setup"]
    module.CALLS.clear()
    chat = app.chat.new_chat(SETUP)
    fake.script = script_text(" Hi Bob.") + [EOS]
    app.chat.send(chat, "Hello Alice", SETUP, PARAMS).result()
    assert module.CALLS == list(GENERATION_ORDER)
    user, reply = chat.messages[-2:]
    assert (user.content, user.visible) == ("Hello Alice [in]", "Hello Alice")
    assert (reply.content, reply.visible) == ("Hi Bob.", "HI BOB.")  # the model's words kept for the prompt
    assert "Bob: Hello Alice [in]\nAlice:" in seen(fake)
    assert app.extensions.drain_errors() == []


def test_regenerate_skips_the_input_hooks(app, fake):
    module = enable(app, "recorder", RECORDER)
    chat = app.chat.new_chat(SETUP)
    fake.script = script_text(" one") + [EOS]
    app.chat.send(chat, "Hi", SETUP, PARAMS).result()
    module.CALLS.clear()
    app.chat.regenerate(chat, SETUP, PARAMS).result()
    assert module.CALLS == [h for h in GENERATION_ORDER if h not in ("chat_input_modifier", "input_modifier")]


def test_plain_generation_runs_the_completion_hooks(app, fake):
    module = enable(app, "recorder", RECORDER)
    module.CALLS.clear()
    fake.script = script_text("abc") + [EOS]
    last = app.generator.generate("Say", PARAMS)
    assert module.CALLS == ["state_modifier", "input_modifier", "custom_generate_reply", "tokenizer_modifier",
                            "output_modifier"]
    assert (last.text, last.original) == ("ABC", "abc")
    assert seen(fake) == "Say [in]"


def test_no_extension_means_no_hooks_on_the_job(app, fake):
    stream = app.generator.submit("x", PARAMS)
    assert stream._job.hooks is None
    stream.cancel()


def test_a_failing_output_modifier_is_reported_once_and_the_reply_arrives(app, fake):
    module = enable(app, "flaky", FLAKY_OUTPUT)
    chat = app.chat.new_chat(SETUP)
    fake.script = script_text(" first") + [EOS]
    app.chat.send(chat, "Hi", SETUP, PARAMS).result()
    assert chat.messages[-1].shown == "first"
    errors = app.extensions.drain_errors()
    assert len(errors) == 1 and "flaky" in errors[0] and "output_modifier" in errors[0] and "boom" in errors[0]
    fake.script = script_text(" second") + [EOS]
    app.chat.send(chat, "Again", SETUP, PARAMS).result()
    assert chat.messages[-1].shown == "second!" and chat.messages[-1].content == "second"
    assert app.extensions.drain_errors() == [] and len(module.CALLS) == 2


def test_custom_prompt_and_custom_reply_replace_the_builder_and_the_model(app, fake):
    enable(app, "custom", CUSTOM)
    chat = app.chat.new_chat(SETUP)
    stream = app.chat.send(chat, "Hi", SETUP, PARAMS)
    stream.result()
    assert stream.prompt.text == "CUSTOM PROMPT Hi"
    assert chat.messages[-1].content == "made up"
    assert fake.seen_prompts == []  # the model never ran


def test_character_bias_goes_where_the_reply_starts(app, fake):
    shutil.copytree(REPO / "extensions" / "character_bias", app.root / "extensions" / "character_bias")
    assert app.set_extensions(["character_bias"]) == ["character_bias"]
    chat = app.chat.new_chat(SETUP)
    fake.script = script_text(" and I smile.") + [EOS]
    app.chat.send(chat, "Hi", SETUP, PARAMS).result()
    assert seen(fake).endswith("Bob: Hi\nAlice: *I am so happy*")
    assert chat.messages[-1].content == "and I smile."
    app.extensions.set_param("character_bias", "activate", False)
    app.chat.regenerate(chat, SETUP, PARAMS).result()
    assert seen(fake).endswith("Bob: Hi\nAlice:")


def test_broken_scripts_and_bad_signatures_never_stop_the_app(tmp_path):
    for name, source in BROKEN.items():
        write_extension(tmp_path, name, source)
    app = App.create(Settings(extensions=[*BROKEN, "missing"], settings=str(tmp_path / "s.yaml")), tmp_path)
    try:
        assert app.extensions.names() == ["badsig"]
        ext = app.extensions.enabled[0]
        assert "input_modifier" in ext.disabled and "output_modifier" in ext.hooks
        errors = "\n".join(app.extensions.drain_errors())
        for name in ("syntax", "importer", "badsetup", "missing"):
            assert f"Extension {name}" in errors
    finally:
        app.close()


@pytest.mark.parametrize("name", ["../evil", "..", "a/b", "evil\\x", "C:evil", "%2e%2e"])
def test_traversal_names_are_refused(tmp_path, name):
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "script.py").write_text("open(__file__ + '.ran', 'w').close()\n")
    with pytest.raises(UnsafePathError):
        load_script(tmp_path / "extensions", name)
    app = App.create(Settings(extensions=[name], settings=str(tmp_path / "s.yaml")), tmp_path)
    app.close()
    assert app.extensions.names() == []
    assert not (tmp_path / "evil" / "script.py.ran").exists()


def test_check_hook_accepts_old_short_signatures_and_refuses_misfits():
    spec = HookSpec(("text", "state", "is_chat"), "chain", 1)
    assert check_hook(lambda string: string, spec) == (1, None)
    assert check_hook(lambda string, state, is_chat=False: string, spec) == (3, None)
    assert check_hook(lambda a, b, c, d: a, spec)[0] == 0
    kw = HookSpec(("user_input", "state"), "first", 2, keywords=True)
    assert check_hook(lambda user_input, state: None, kw)[0] == 0
    assert check_hook(lambda user_input, state, **kwargs: None, kw) == (2, None)


def test_params_are_saved_in_settings_yaml_and_applied_at_load(app):
    enable(app, "recorder", RECORDER)
    app.extensions.set_param("recorder", "greeting", "hello there")
    path = app.save_settings()
    saved = yaml.safe_load(path.read_text())
    assert saved["extensions"] == ["recorder"]
    assert saved["extension_params"] == {"recorder": {"greeting": "hello there", "count": 1}}
    settings = load_settings(["--settings", str(path)], app.root)
    again = App.create(settings, app.root)
    try:
        assert again.extensions.enabled[0].params["greeting"] == "hello there"
    finally:
        again.close()


def test_css_and_js_are_collected_in_order(app):
    enable(app, "recorder", RECORDER)
    assert app.extensions.collect("custom_css") == [".recorder { color: red; }"]
    assert app.extensions.collect("custom_js") == ["console.log('recorder');"]


class _Tagger:
    """A deterministic translator: '[source>target] text'."""

    def translate(self, text: str, source: str, target: str) -> str:
        return f"[{source}>{target}] {text}"


def _translate_ext(app: App):
    shutil.copytree(REPO / "extensions" / "translate", app.root / "extensions" / "translate")
    assert app.set_extensions(["translate"]) == ["translate"]
    module = app.extensions.enabled[0].module
    module.ENGINES["fake"] = _Tagger
    app.extensions.set_param("translate", "engine", "fake")
    return module


def test_translate_keeps_both_texts_in_the_chat(app, fake):
    _translate_ext(app)
    chat = app.chat.new_chat(SETUP)
    fake.script = script_text(" Hello Bob.") + [EOS]
    app.chat.send(chat, "Bonjour", SETUP, PARAMS).result()
    user, reply = chat.messages[-2:]
    assert (user.content, user.shown) == ("[fr>en] Bonjour", "Bonjour")
    assert (reply.content, reply.shown) == ("Hello Bob.", "[en>fr] Hello Bob.")
    assert "Bob: [fr>en] Bonjour\nAlice:" in seen(fake)


def test_translate_through_the_model_itself(app, fake):
    module = _translate_ext(app)
    app.extensions.set_param("translate", "engine", "model")
    fake.script = script_text(" Good day") + [EOS]
    assert module.input_modifier("Bonjour", {}, True) == "Good day"
    assert "from French to English" in seen(fake) and "Text: Bonjour" in seen(fake)
    assert app.extensions.drain_errors() == []


class _Unreachable:
    calls = 0

    def translate(self, text: str, source: str, target: str) -> str:
        type(self).calls += 1
        raise ConnectionError("translate.google.com unreachable")


def test_translate_falls_back_to_the_model_offline_and_says_so(app, fake, caplog):
    module = _translate_ext(app)
    module.ENGINES["google"] = _Unreachable
    _Unreachable.calls = 0
    app.extensions.set_param("translate", "engine", "google")
    fake.script = script_text(" Good day") + [EOS]
    with caplog.at_level(logging.INFO):
        assert module.input_modifier("Bonjour", {}, True) == "Good day"
        assert module.input_modifier("Bonjour", {}, True) == "Good day"
    assert module.last_engine() == "model"
    assert _Unreachable.calls == 1  # not retried at every message
    said = [r.getMessage() for r in caplog.records if "translate: using" in r.getMessage()]
    assert len(said) == 1 and "offline fallback" in said[0] and "unreachable" in said[0]
    assert "from French to English" in seen(fake)
    assert app.extensions.drain_errors() == []


def test_translate_without_online_engine_nor_model_is_reported_not_fatal(app):
    module = _translate_ext(app)
    module.ENGINES["google"] = _Unreachable
    app.extensions.set_param("translate", "engine", "google")
    assert app.extensions.chain("input_modifier", "Salut", {}, True) == "Salut"
    errors = app.extensions.drain_errors()
    assert len(errors) == 1 and "no model is loaded" in errors[0]


def _bag_of_words(text: str) -> list[float]:
    """A deterministic unit vector: word counts hashed into 64 buckets."""
    import math
    import zlib

    vector = [0.0] * 64
    for word in text.lower().replace(":", " ").split():
        vector[zlib.crc32(word.strip(".,!?").encode()) % 64] += 1.0
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def test_memory_brings_back_a_relevant_exchange_from_an_earlier_chat(app, fake):
    shutil.copytree(REPO / "extensions" / "memory", app.root / "extensions" / "memory")
    assert app.set_extensions(["memory"]) == ["memory"]
    module = app.extensions.enabled[0].module
    module.EMBEDDER.append(_bag_of_words)
    app.extensions.set_param("memory", "min_score", 0.2)
    first = app.chat.new_chat(SETUP)
    fake.script = script_text(" Your cat is called Whiskers.") + [EOS]
    app.chat.send(first, "My cat is called Whiskers", SETUP, PARAMS).result()
    assert (app.root / "logs" / "memory" / "memory.sqlite3").is_file()
    assert list((app.root / "logs" / "memory").glob("*.usearch"))  # the HNSW index file
    second = app.chat.new_chat(SETUP)
    fake.script = script_text(" Whiskers!") + [EOS]
    app.chat.send(second, "What is my cat called?", SETUP, PARAMS).result()
    assert "Things remembered from earlier conversations:\n- Bob: My cat is called Whiskers" in seen(fake)
    assert [m.role for m in second.messages] == ["assistant", "user", "assistant"]  # the chat itself is unchanged
    assert app.extensions.drain_errors() == []
