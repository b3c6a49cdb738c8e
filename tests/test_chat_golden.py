"""Golden prompts: each mode over a fixed short chat, through the shipped templates.

The expected texts are committed in tests/golden/chat/. To add one after a deliberate
change, run `UPDATE_GOLDEN=1 python -m pytest tests/test_chat_golden.py` and READ the
new files before committing them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modules.chat.prompt import CHAT, CHAT_INSTRUCT, INSTRUCT, PromptOptions, build_prompt, greeting_message
from modules.chat.templates import TemplateRenderer, TemplateStore
from modules.chat.types import ASSISTANT, USER, Character, Message, Persona

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden" / "chat"
TEMPLATES = ["ChatML", "Llama-3", "Mistral", "Gemma", "Phi-3", "Alpaca"]

AGNES = Character(name="Agnes", greeting="Good morning, {{user}}. Looking for something to read?",
                  context="{{char}} runs the library of a small seaside town.",
                  example_dialogue="<START>\n{{user}}: Do you have maps?\n{{char}}: Third shelf, by the window.")
SAM = Persona(name="Sam", description="Sam is a fisherman.")


def fixed_chat() -> list[Message]:
    return [greeting_message(AGNES, SAM), Message(USER, "Yes, something about the sea."),
            Message(ASSISTANT, "Try 'The Old Man and the Sea'."), Message(USER, "Is it long?")]


def cases() -> list[tuple[str, str | None]]:
    return [(CHAT, None)] + [(mode, t) for mode in (CHAT_INSTRUCT, INSTRUCT) for t in TEMPLATES]


@pytest.mark.parametrize(("mode", "template"), cases(), ids=lambda v: str(v))
def test_golden_prompt(mode, template):
    renderer = TemplateRenderer()
    source = TemplateStore(ROOT / "instruction-templates", renderer).load(template) if template else ""
    options = PromptOptions(mode=mode, template=source, bos_token="<s>", eos_token="</s>")
    built = build_prompt(fixed_chat(), AGNES, SAM, options, renderer, lambda t: len(t), 100_000)
    path = GOLDEN / f"{mode}{'-' + template if template else ''}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(built.text, encoding="utf-8")
    assert built.text == path.read_text(encoding="utf-8")
