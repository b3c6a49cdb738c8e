"""Chat prompts fitted in real tokens of a loaded model (the kit's GGUF, 256-token context)."""

from __future__ import annotations

import shutil

import pytest

from modules.chat.prompt import GREETING_META
from modules.chat.service import ChatSetup
from modules.chat.types import ASSISTANT, USER, Character, Message, Persona
from modules.core.sampling import SamplingParams
from modules.core.settings import Settings
from modules.engine.app import App

pytest.importorskip("llama_cpp")

ALICE = Character(name="Alice", greeting="Welcome to the library, {{user}}.",
                  context="Alice is the librarian of a small seaside town. She is calm and precise.")
SETUP = ChatSetup(character=ALICE, persona=Persona(name="Bob", description="Bob is a sailor."))


@pytest.fixture(scope="module")
def app(tiny_kit, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_real")
    (root / "models").mkdir()
    shutil.copy(tiny_kit.gguf_f32, root / "models" / "tiny.gguf")
    application = App.create(Settings(threads=1, threads_batch=1, ctx_size=256), root)
    application.models.load("tiny.gguf")
    yield application
    application.close()


def long_chat(service) -> list[Message]:
    chat = service.new_chat(SETUP)
    for i in range(100):
        chat.messages.append(Message(USER, f"Question number {i}: where is the book about ships?"))
        chat.messages.append(Message(ASSISTANT, f"Answer {i}: on the third shelf, near the window."))
    return chat.messages


@pytest.mark.parametrize("mode", ["chat", "chat-instruct", "instruct"])
def test_a_200_turn_chat_fits_a_256_token_context(app, mode):
    choice = app.chat.choose_template()
    assert choice.origin == "model"  # the kit's GGUF carries its own template, which wins
    setup = ChatSetup(ALICE, SETUP.persona, mode=mode, template=choice.source)
    messages = long_chat(app.chat)
    messages.append(Message(USER, "And the atlas?"))
    params = SamplingParams(temperature=0, max_new_tokens=32)
    built = app.chat.build(messages, setup, params)
    model = app.models.current
    assert len(model.encode(built.text)) == built.tokens <= 256 - 32
    assert "Alice is the librarian of a small seaside town." in built.text
    if mode != "instruct":
        assert "Welcome to the library, Bob." in built.text  # the greeting is pinned
    kept = messages[len(messages) - _kept_count(messages, built):]
    assert kept[0].role == USER  # the cut is at a turn boundary
    assert "And the atlas?" in built.text
    assert built.dropped_messages > 150
    # the whole thing generates without the generator having to cut anything itself
    last = app.generator.generate(built.text, params)
    assert last.truncated_tokens == 0


def _kept_count(messages: list[Message], built) -> int:
    pinned = sum(1 for m in messages if m.meta.get(GREETING_META))
    return len(messages) - pinned - built.dropped_messages
