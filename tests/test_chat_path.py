"""One chat path for both faces: the Chat tab and /v1/chat/completions (and the ooba
/v1/internal/chat-prompt route) turn the same messages, character, mode and template into
the same prompt and stop strings, through ChatService.setup and ChatService.prepare.

The Chat tab is driven through the functions its handlers call (chat_tab._setup and
chat_tab._start), the API through a TestClient, both over the scripted fake loader; what
each face sent is read back from the fake's seen_prompts and seen_params.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from modules.chat.types import ASSISTANT, USER, Character, Message, Persona
from modules.core.sampling import SamplingParams
from modules.engine.app import App
from modules.ui import chat_tab
from tests.extension_scripts import write_extension
from tests.fakes import EOS, FakeLoader, script_text

REPO = Path(__file__).resolve().parents[1]
ALICE = Character(name="Alice", greeting="Hello {{user}}!", context="Alice is a librarian; {{user}} visits her.",
                  example_dialogue="{{user}}: Any maps?\n{{char}}: Shelf three.")
SAVED_YOU = Persona(name="You", description="{{user}} likes tea.")
STOP = ["THE END"]
UI_PARAMS = SamplingParams(temperature=0, max_new_tokens=8, stop=STOP)
API_PARAMS: dict[str, Any] = {"temperature": 0, "max_tokens": 8, "stop": STOP}
HISTORY = [Message(USER, "Is the library open?"), Message(ASSISTANT, "Until nine.")]

IS_API_RECORDER = '''
SEEN = []

def state_modifier(state):
    SEEN.append(state["is_api"])
    return state

def input_modifier(string, state, is_chat=False):
    return string + " [in]"
'''


@pytest.fixture
def fake(app: App) -> FakeLoader:
    """The fake model (4096-token context), a Llama-3 template on disk, Alice, and a saved
    default persona with a description, the case where the two faces used to differ."""
    app.models.load("fake.gguf", loader="fake", overrides={"ctx_size": 4096})
    model = app.models.current
    assert isinstance(model, FakeLoader)
    model.script = script_text(" Fine.") + [EOS]
    (app.root / "instruction-templates").mkdir()
    shutil.copy(REPO / "instruction-templates" / "Llama-3.yaml", app.root / "instruction-templates")
    app.characters.save(ALICE)
    app.personas.save(SAVED_YOU)
    return model


@pytest.fixture
def client(app: App) -> Iterator[TestClient]:
    from modules.api import create_app

    with TestClient(create_app(app), base_url="http://127.0.0.1:5000", raise_server_exceptions=False) as c:
        yield c


def seen(model: FakeLoader) -> tuple[str, list[str]]:
    """The last prompt the model got, as text, and the stop strings it was given."""
    return bytes(i for i in model.seen_prompts[-1] if i < 256).decode(), list(model.seen_params[-1].stop)


def through_the_chat_tab(app: App, model: FakeLoader, mode: str, template: str, user_name: str = "You",
                         persona: str = "", text: str = "Do you have atlases?") -> tuple[str, list[str], list[Message]]:
    """Send `text` as the Chat tab does (a new chat with HISTORY); returns what the model got
    and the messages the API must be sent for the same conversation."""
    setup = chat_tab._setup(app, "Alice", mode, template, user_name, persona)
    chat = app.chat.new_chat(setup)
    chat.messages += [Message(m.role, m.content) for m in HISTORY]
    sent = [*chat.messages, Message(USER, text)]  # as typed: input hooks rewrite the chat's copy in place
    chat_tab._start(app, "send", chat, text, "", setup, UI_PARAMS).result()
    prompt, stops = seen(model)
    return prompt, stops, sent


def api_body(messages: list[Message], mode: str, template: str | None, **extra: Any) -> dict[str, Any]:
    body = {"messages": [{"role": m.role, "content": m.content} for m in messages], "character": "Alice",
            "mode": mode, **API_PARAMS, **extra}
    if template is not None:
        body["instruction_template"] = template
    return body


def through_the_api(client: TestClient, model: FakeLoader, body: dict[str, Any]) -> tuple[str, list[str]]:
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return seen(model)


@pytest.mark.parametrize(("mode", "template"), [("chat", "auto"), ("chat-instruct", "auto"), ("instruct", "auto"),
                                                ("chat-instruct", "Llama-3"), ("instruct", "Llama-3")])
def test_the_chat_tab_and_the_api_send_the_same_prompt_and_stop_strings(app, fake, client, mode, template):
    ui_prompt, ui_stops, messages = through_the_chat_tab(app, fake, mode, template)
    api_prompt, api_stops = through_the_api(client, fake, api_body(messages, mode, template))
    assert api_prompt == ui_prompt
    assert api_stops == ui_stops
    assert ui_stops[0] == "THE END"  # the caller's own stop strings first, then the template's
    assert "Do you have atlases?" in ui_prompt and "Until nine." in ui_prompt
    if template == "Llama-3":
        assert "<|start_header_id|>" in ui_prompt
    if mode != "instruct":
        assert "You likes tea." in ui_prompt  # the saved default persona, in both faces
        assert ui_stops == ["THE END", "\nYou:", "\nAlice:"]


def test_auto_and_no_template_mean_the_same_in_the_api(app, fake, client):
    _, _, messages = through_the_chat_tab(app, fake, "instruct", "auto")
    auto = through_the_api(client, fake, api_body(messages, "instruct", "auto"))
    assert through_the_api(client, fake, api_body(messages, "instruct", None)) == auto
    assert through_the_api(client, fake, api_body(messages, "instruct", "")) == auto


def test_the_persona_default_is_the_same_in_both_faces(app, fake, client):
    chat = app.chat
    assert chat.persona() == Persona("You", "{{user}} likes tea.")  # personas/You.yaml is the base
    assert chat.persona("Ann") == Persona("Ann", "{{user}} likes tea.")  # a given name replaces its name
    assert chat.persona("  ", "A pirate.") == Persona("You", "A pirate.")  # given text replaces its description
    assert chat.persona("Ann", "A pirate.") == Persona("Ann", "A pirate.")
    assert chat_tab._setup(app, "Alice", "chat", "auto", "You", "").persona == chat.setup("Alice", "chat", None).persona

    ui_prompt, ui_stops, messages = through_the_chat_tab(app, fake, "chat", "auto", user_name="Ann")
    api = through_the_api(client, fake, api_body(messages, "chat", None, user_name="Ann"))
    assert api == (ui_prompt, ui_stops)
    assert "Ann likes tea." in ui_prompt and ui_prompt.endswith("Ann: Do you have atlases?\nAlice:")

    ui_prompt, ui_stops, messages = through_the_chat_tab(app, fake, "chat", "auto", persona="{{user}} sails.")
    assert "You sails." in ui_prompt and "likes tea" not in ui_prompt


def test_without_a_saved_persona_the_default_is_you(app, fake):
    app.personas.delete("You")
    assert app.chat.persona() == Persona("You", "")
    assert app.chat.setup(None, None, None).persona == Persona("You", "")


def test_setup_resolves_the_template_only_where_the_mode_uses_one(app, fake):
    from modules.core.errors import WorkbenchError

    assert app.chat.setup("Alice", "chat", "No-such-template").template == ""
    assert app.chat.setup("Alice", "instruct", "auto").template == app.chat.choose_template(None).source
    with pytest.raises(WorkbenchError):
        app.chat.setup("Alice", "instruct", "No-such-template")
    with pytest.raises(WorkbenchError, match="mode must be one of"):
        app.chat.setup("Alice", "poetry", None)
    assert app.chat.setup(None, None, None).character.name == "Assistant"


def test_the_chat_prompt_route_shows_what_chat_completions_sends(app, fake, client):
    write_extension(app.root, "is_api", IS_API_RECORDER)
    assert app.set_extensions(["is_api"]) == ["is_api"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "developer", "content": "No lists."},
                {"role": "user", "content": "Maps?"}]
    bodies = [{"messages": messages}, {"messages": messages, "mode": "chat", "character": "Alice"},
              {"messages": messages, "mode": "chat-instruct", "instruction_template": "Llama-3"},
              {"messages": [*messages, {"role": "assistant", "content": "We"}], "continue_": True}]
    shown = []
    for body in bodies:
        response = client.post("/v1/internal/chat-prompt", json={**body, **API_PARAMS})
        assert response.status_code == 200, response.text
        shown.append(response.json()["prompt"])
        assert shown[-1] == through_the_api(client, fake, {**body, **API_PARAMS})[0]
    assert all("Maps? [in]" in prompt for prompt in shown[:3])  # the input hooks ran in both
    assert shown[3].endswith("We") and "[in]" not in shown[3]  # continuing adds no new input


def test_extension_hooks_run_on_both_faces_and_see_which_face_asks(app, fake, client):
    write_extension(app.root, "is_api", IS_API_RECORDER)
    assert app.set_extensions(["is_api"]) == ["is_api"]
    module = app.extensions.enabled[0].module
    ui_prompt, ui_stops, messages = through_the_chat_tab(app, fake, "chat", "auto")
    assert through_the_api(client, fake, api_body(messages, "chat", "auto")) == (ui_prompt, ui_stops)
    assert "Do you have atlases? [in]" in ui_prompt
    assert module.SEEN == [False, True]


def test_the_chat_tab_saves_and_the_api_never_does(app, fake, client):
    saved = app.root / "logs" / "chat" / "Alice"
    _, _, messages = through_the_chat_tab(app, fake, "chat", "auto")
    assert len(list(saved.glob("*.json"))) == 1
    through_the_api(client, fake, api_body(messages, "chat", "auto"))
    assert len(list(saved.glob("*.json"))) == 1

    setup = app.chat.setup("Alice", "chat", None)
    prepared = app.chat.prepare(messages, setup, UI_PARAMS, is_api=False, save=False)
    assert prepared.save is False and prepared.params.stop == ["THE END", "\nYou:", "\nAlice:"]
    chat = app.chat.new_chat(setup)
    app.chat.send(chat, "Unsaved?", setup, UI_PARAMS, save=False).result()
    assert len(list(saved.glob("*.json"))) == 1 and not chat.id
