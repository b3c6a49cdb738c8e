"""Prompt building: the three modes, stop strings, and fitting to the context."""

from __future__ import annotations

import jinja2
import pytest

from modules.chat.prompt import (
    CHAT,
    CHAT_INSTRUCT,
    CONTINUE,
    IMPERSONATE,
    INSTRUCT,
    PromptOptions,
    build_prompt,
    greeting_message,
)
from modules.chat.types import ASSISTANT, USER, Character, Message, Persona
from modules.core.errors import ContextLengthExceededError, InvalidRequestError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
STRICT = (  # refuses a conversation that does not alternate user/assistant after the system turn
    "{% for m in messages %}{% if m.role != 'system' and (m.role == 'user') != (loop.index0 % 2 == 1) %}"
    "{{ raise_exception('roles must alternate') }}{% endif %}[{{ m.role }}]{{ m.content }}{% endfor %}"
)


class SimpleRenderer:
    """A test double of TemplateRenderer: plain Jinja2 with raise_exception."""

    def __init__(self) -> None:
        def raise_exception(message: str) -> None:
            raise InvalidRequestError(message, "instruction_template")

        self.env = jinja2.Environment()
        self.env.globals["raise_exception"] = raise_exception

    def render(self, source, messages, add_generation_prompt=True, **kw):
        return self.env.from_string(source).render(messages=messages, add_generation_prompt=add_generation_prompt, **kw)

    def render_continuing(self, source, messages, **kw):
        marker = "\x00CUT\x00"
        last = dict(messages[-1], content=messages[-1]["content"] + marker)
        text = self.render(source, [*messages[:-1], last], add_generation_prompt=False, **kw)
        return text[: text.index(marker)]


ALICE = Character(name="Alice", greeting="Hello {{user}}, I am {{char}}.",
                  context="{{char}} is a librarian who helps {{user}}.",
                  example_dialogue="<START>\n{{user}}: Hi\n{{char}}: Welcome!")
BOB = Persona(name="Bob", description="Bob likes maps.")


def chat_messages() -> list[Message]:
    return [greeting_message(ALICE, BOB), Message(USER, "Find me a book."), Message(ASSISTANT, "Which one?"),
            Message(USER, "About ships.")]


def build(messages, mode=CHAT, budget=10_000, action="reply", partial="", template=CHATML, **kw):
    options = PromptOptions(mode=mode, template=template if mode != CHAT else "", **kw)
    return build_prompt(messages, ALICE, BOB, options, SimpleRenderer(), lambda t: len(t.split()), budget,
                        action, partial)


def test_chat_mode_prompt_and_stop_strings():
    built = build(chat_messages())
    assert built.text == (
        "Alice is a librarian who helps Bob.\n\nBob likes maps.\n\nBob: Hi\nAlice: Welcome!\n\n"
        "Alice: Hello Bob, I am Alice.\nBob: Find me a book.\nAlice: Which one?\nBob: About ships.\nAlice:"
    )
    assert built.stop == ["\nBob:", "\nAlice:"]
    assert built.dropped_messages == 0


def test_chat_mode_continue_and_impersonate():
    messages = chat_messages() + [Message(ASSISTANT, "Let me look")]
    assert build(messages, action=CONTINUE).text.endswith("Bob: About ships.\nAlice: Let me look")
    assert build(chat_messages(), action=IMPERSONATE).text.endswith("Alice: Which one?\nBob: About ships.\nBob:")
    assert build(chat_messages(), action=IMPERSONATE, partial="Maybe").text.endswith("\nBob: Maybe")


def test_chat_instruct_wraps_the_transcript_in_the_template():
    built = build(chat_messages(), mode=CHAT_INSTRUCT)
    assert built.text.startswith(
        '<|im_start|>user\nContinue the chat dialogue below. Write a single reply for the character "Alice".\n\n'
        "Alice is a librarian who helps Bob."
    )
    assert built.text.endswith("Bob: About ships.<|im_end|>\n<|im_start|>assistant\nAlice:")
    assert built.stop == ["\nBob:", "\nAlice:"]
    custom = build(chat_messages(), mode=CHAT_INSTRUCT, chat_instruct_command="Reply as <|character|>:\n<|prompt|>")
    assert custom.text.startswith("<|im_start|>user\nReply as Alice:\nAlice is a librarian")


def test_instruct_mode_uses_the_context_as_system_and_leaves_the_greeting_out():
    built = build(chat_messages(), mode=INSTRUCT)
    assert built.text == (
        "<|im_start|>system\nAlice is a librarian who helps Bob.\n\nBob likes maps.\n\nBob: Hi\nAlice: Welcome!"
        "<|im_end|>\n<|im_start|>user\nFind me a book.<|im_end|>\n<|im_start|>assistant\nWhich one?<|im_end|>\n"
        "<|im_start|>user\nAbout ships.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert built.stop == []
    own = build(chat_messages(), mode=INSTRUCT, system_message="Be brief.")
    assert own.text.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_instruct_continue_leaves_the_reply_open():
    messages = chat_messages() + [Message(ASSISTANT, "Let me look")]
    assert build(messages, mode=INSTRUCT, action=CONTINUE).text.endswith("<|im_start|>assistant\nLet me look")


def test_fitting_drops_the_oldest_turns_at_user_boundaries_and_keeps_the_pinned_part():
    messages = [greeting_message(ALICE, BOB)]
    for i in range(200):
        messages += [Message(USER, f"question {i} " + "word " * 5), Message(ASSISTANT, f"answer {i} " + "word " * 5)]
    messages.append(Message(USER, "last question"))
    built = build(messages, budget=120)
    assert built.tokens <= 120
    assert built.text.startswith("Alice is a librarian who helps Bob.")
    assert "Alice: Hello Bob, I am Alice.\nBob: question" in built.text  # greeting kept, then a user turn
    assert built.text.endswith("Bob: last question\nAlice:")
    kept = messages[1 + built.dropped_messages:]
    assert kept[0].role == USER
    assert built.dropped_messages > 300


def test_strict_templates_never_see_a_cut_in_the_middle_of_an_exchange():
    messages = [Message(USER, "u " * 10), Message(ASSISTANT, "a " * 10)] * 20 + [Message(USER, "now")]
    built = build(messages, mode=INSTRUCT, template=STRICT, budget=60)
    assert built.text.startswith("[system]")
    assert "[user]" in built.text.split("[system]", 1)[1][:400]


def test_nothing_fits_is_a_clear_error():
    with pytest.raises(ContextLengthExceededError, match="do not fit"):
        build(chat_messages(), budget=5)


def test_bad_mode_and_missing_template_are_clear_errors():
    with pytest.raises(InvalidRequestError, match="mode"):
        PromptOptions(mode="story")
    with pytest.raises(InvalidRequestError, match="template"):
        PromptOptions(mode=INSTRUCT, template="")
    with pytest.raises(InvalidRequestError, match="continue"):
        build(chat_messages(), action=CONTINUE)
