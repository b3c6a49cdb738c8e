"""Chat actions over the generator, on the scripted fake loader."""

from __future__ import annotations

import pytest

from modules.chat.prompt import GREETING_META
from modules.chat.service import ChatService, ChatSetup
from modules.chat.types import ASSISTANT, USER, Character, Message, Persona
from modules.core.errors import ContextLengthExceededError, InvalidRequestError
from modules.core.sampling import SamplingParams
from tests.fakes import EOS, script_text
from tests.test_chat_prompt import SimpleRenderer

ALICE = Character(name="Alice", greeting="Hello!", context="Alice is a librarian.")
SETUP = ChatSetup(character=ALICE, persona=Persona(name="Bob"))
PARAMS = SamplingParams(temperature=0, max_new_tokens=40)
ALICE_GREETING = Message(ASSISTANT, "Hello!", meta={GREETING_META: True})
HI = Message(USER, "Hi")


@pytest.fixture
def fake(app):
    app.models.load("fake.gguf", loader="fake", overrides={"ctx_size": 512})
    return app.models.current


@pytest.fixture
def service(app, fake):
    saved = []
    svc = ChatService(app.generator, app.models, SimpleRenderer(), save=lambda chat: saved.append(
        [m.content for m in chat.messages]))
    svc.saved = saved
    return svc


def prompt_seen(fake) -> str:
    return bytes(i for i in fake.seen_prompts[-1] if i < 256).decode()


def test_send_streams_the_reply_into_the_chat_and_saves_it(service, fake):
    chat = service.new_chat(SETUP)
    assert [m.content for m in chat.messages] == ["Hello!"]
    fake.script = script_text(" Hi Bob.\nBob: stolen turn")
    stream = service.send(chat, "Hello Alice", SETUP, PARAMS)
    texts = [chat.messages[-1].content for _ in stream]
    assert chat.messages[-1].content == "Hi Bob."
    assert texts[-1] == "Hi Bob."
    assert [m.role for m in chat.messages] == [ASSISTANT, USER, ASSISTANT]
    assert prompt_seen(fake).endswith("Alice: Hello!\nBob: Hello Alice\nAlice:")
    assert service.saved[-1] == ["Hello!", "Hello Alice", "Hi Bob."]


def test_regenerate_keeps_alternatives_as_swipes(service, fake):
    chat = service.new_chat(SETUP)
    fake.script = script_text(" first") + [EOS]
    service.send(chat, "Hi", SETUP, PARAMS).result()
    fake.script = script_text(" second") + [EOS]
    service.regenerate(chat, SETUP, PARAMS).result()
    last = chat.messages[-1]
    assert last.swipes == ["first", "second"] and last.content == "second" and last.swipe_index == 1
    assert prompt_seen(fake).endswith("Bob: Hi\nAlice:")  # the old reply is not in the prompt
    ChatService.swipe(chat, 0)
    assert last.content == "first"
    with pytest.raises(InvalidRequestError):
        ChatService.swipe(chat, 5)


def test_continue_extends_the_last_reply(service, fake):
    chat = service.new_chat(SETUP)
    fake.script = script_text(" Once") + [EOS]
    service.send(chat, "Tell a story", SETUP, PARAMS).result()
    fake.script = script_text(" upon a time") + [EOS]
    service.continue_(chat, SETUP, PARAMS).result()
    assert chat.messages[-1].content == "Once upon a time"
    assert prompt_seen(fake).endswith("Alice: Once")


def test_start_reply_with(service, fake):
    chat = service.new_chat(SETUP)
    fake.script = script_text(" sure thing") + [EOS]
    service.send(chat, "Help?", SETUP, PARAMS, start_reply_with="Of course,").result()
    assert chat.messages[-1].content == "Of course, sure thing"
    assert prompt_seen(fake).endswith("Bob: Help?\nAlice: Of course,")


def test_impersonate_writes_the_users_turn_without_touching_the_chat(service, fake):
    chat = service.new_chat(SETUP)
    fake.script = script_text(" I would like a map.\nAlice: no") + [EOS]
    text = service.impersonate(chat, SETUP, PARAMS).result()
    assert text == "I would like a map."
    assert len(chat.messages) == 1
    assert prompt_seen(fake).endswith("Alice: Hello!\nBob:")


def test_stop_keeps_the_partial_reply_and_saves_it(service, fake):
    chat = service.new_chat(SETUP)
    fake.script = script_text(" " + "word " * 30)
    fake.step_delay = 0.002
    stream = service.send(chat, "Talk", SETUP, PARAMS)
    for chunk in stream:
        if chunk.completion_tokens > 10:
            stream.cancel()
    assert chat.messages[-1].content.startswith("word")
    assert service.saved[-1][-1] == chat.messages[-1].content


def test_edit_and_remove_last(service, fake):
    chat = service.new_chat(SETUP)
    fake.script = script_text(" reply") + [EOS]
    service.send(chat, "question", SETUP, PARAMS).result()
    ChatService.edit(chat, -1, "edited reply")
    assert chat.messages[-1].content == "edited reply"
    assert ChatService.remove_last(chat) == "question"
    assert [m.content for m in chat.messages] == ["Hello!"]
    with pytest.raises(InvalidRequestError):
        ChatService.remove_last(chat)
    with pytest.raises(InvalidRequestError):
        service.regenerate(chat, SETUP, PARAMS)  # the greeting is not regenerated


def test_a_refused_send_leaves_the_chat_unchanged(service, fake):
    chat = service.new_chat(SETUP)
    with pytest.raises(ContextLengthExceededError):
        service.send(chat, "x " * 300, SETUP, PARAMS.replace(max_new_tokens=60))
    assert len(chat.messages) == 1


def test_two_sessions_sending_to_one_saved_chat_lose_no_message(app, fake, tmp_path):
    """Two browser tabs with the same chat open: the second save becomes a conflict copy,
    and that session's next message continues in the copy."""
    from modules.chat.history import HistoryStore
    from modules.chat.types import SAVED_AS_COPY

    store = HistoryStore(tmp_path / "logs" / "chat")
    service = ChatService(app.generator, app.models, SimpleRenderer(), save=store.save)
    fake.script = script_text(" first reply") + [EOS]
    opened = service.new_chat(SETUP)
    service.send(opened, "Hi", SETUP, PARAMS).result()
    tab_a, tab_b = store.load("Alice", opened.id), store.load("Alice", opened.id)

    fake.script = script_text(" to A") + [EOS]
    service.send(tab_a, "from A", SETUP, PARAMS).result()
    fake.script = script_text(" to B") + [EOS]
    service.send(tab_b, "from B", SETUP, PARAMS).result()
    assert tab_a.id == opened.id and tab_a.notice is None
    assert tab_b.id != opened.id and tab_b.notice is not None and tab_b.notice.kind == SAVED_AS_COPY

    fake.script = script_text(" again") + [EOS]
    service.send(tab_b, "B again", SETUP, PARAMS).result()
    assert tab_b.notice is None  # no second conflict: B now owns its copy
    contents = {s.id: [m.content for m in store.load("Alice", s.id).messages] for s in store.list("Alice")}
    assert contents == {
        opened.id: ["Hello!", "Hi", "first reply", "from A", "to A"],
        tab_b.id: ["Hello!", "Hi", "first reply", "from B", "to B", "B again", "again"],
    }


def test_prepare_gives_the_prompt_and_the_params_with_its_stop_strings(service, fake):
    prepared = service.prepare([ALICE_GREETING, HI], SETUP, PARAMS.replace(stop=["END", "\nBob:"]), is_api=True,
                               save=False)
    assert prepared.prompt.text.endswith("Alice: Hello!\nBob: Hi\nAlice:")
    assert prepared.params.stop == ["END", "\nBob:", "\nAlice:"]  # the caller's first, no duplicates
    assert prepared.params.max_new_tokens == PARAMS.max_new_tokens and prepared.save is False


def test_an_action_told_not_to_save_leaves_the_store_alone(service, fake):
    chat = service.new_chat(SETUP)
    fake.script = script_text(" unsaved") + [EOS]
    service.send(chat, "Hi", SETUP, PARAMS, save=False).result()
    assert chat.messages[-1].content == "unsaved" and service.saved == []
    service.regenerate(chat, SETUP, PARAMS).result()  # the UI's default: saved
    assert len(service.saved) == 1


def test_setup_without_stores_says_what_is_missing(service):
    with pytest.raises(InvalidRequestError, match="no characters"):
        service.setup("Alice", "chat", None)
    assert service.persona("Ann", "A pirate.") == Persona("Ann", "A pirate.")
    assert service.persona() == Persona("You")  # no persona store: the built-in default


def test_thinking_is_kept_apart_from_the_reply_per_swipe(service, fake):
    chat = service.new_chat(SETUP)
    fake.script = script_text(" <think>Bob greets me.</think> Hi Bob.") + [EOS]
    seen = [(chat.messages[-1].reasoning, chat.messages[-1].content)
            for _ in service.send(chat, "Hello Alice", SETUP, PARAMS)]
    last = chat.messages[-1]
    assert (last.reasoning, last.content) == ("Bob greets me.", "Hi Bob.")
    assert ("Bob greets me.", "") in seen  # the thinking streamed before the reply began
    fake.script = script_text(" <think>Again.</think> Hello.") + [EOS]
    service.regenerate(chat, SETUP, PARAMS).result()
    assert (last.reasoning, last.content) == ("Again.", "Hello.")
    service.swipe(chat, 0)
    assert (last.reasoning, last.content) == ("Bob greets me.", "Hi Bob.")
    assert "Bob greets me." not in prompt_seen(fake)  # past thinking is not sent back in chat mode
