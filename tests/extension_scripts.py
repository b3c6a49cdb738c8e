"""Extension scripts for the hook tests, written into a temporary extensions/ folder."""

from __future__ import annotations

from pathlib import Path

RECORDER = '''
params = {"display_name": "Recorder", "greeting": "hi", "count": 1}
CALLS = []

def setup():
    CALLS.append("setup")

def state_modifier(state):
    CALLS.append("state_modifier")
    state["recorded"] = True
    return state

def chat_input_modifier(text, visible_text, state):
    CALLS.append("chat_input_modifier")
    return text, visible_text

def input_modifier(string, state, is_chat=False):
    CALLS.append("input_modifier")
    return string + " [in]"

def history_modifier(history):
    CALLS.append("history_modifier")
    return history

def custom_generate_chat_prompt(user_input, state, **kwargs):
    CALLS.append("custom_generate_chat_prompt")
    return None

def bot_prefix_modifier(string, state):
    CALLS.append("bot_prefix_modifier")
    return string

def custom_generate_reply(question, original_question, state, stopping_strings=None, is_chat=False):
    CALLS.append("custom_generate_reply")
    return None

def tokenizer_modifier(state, prompt, input_ids, input_embeds):
    CALLS.append("tokenizer_modifier")
    assert state["recorded"]
    return prompt, input_ids, input_embeds

def output_modifier(string, state, is_chat=False):
    CALLS.append("output_modifier")
    return string.upper()

def custom_css():
    return ".recorder { color: red; }"

def custom_js():
    return "console.log('recorder');"

def ui():
    CALLS.append("ui")
'''

FLAKY_OUTPUT = '''
CALLS = []

def output_modifier(string, state, is_chat=False):
    CALLS.append(string)
    if len(CALLS) == 1:
        raise RuntimeError("boom")
    return string + "!"
'''

CUSTOM = '''
def custom_generate_chat_prompt(user_input, state, **kwargs):
    return "CUSTOM PROMPT " + user_input

def custom_generate_reply(question, original_question, state, stopping_strings=None, is_chat=False):
    def replies():
        yield "made"
        yield "made up"
    return replies()
'''

BROKEN = {
    "syntax": "def broken(:\n",
    "importer": "import module_that_does_not_exist_anywhere\n",
    "badsetup": "def setup():\n    raise RuntimeError('no setup')\n",
    "badsig": ("def input_modifier(a, b, c, d, e):\n    return a\n\n"
               "def output_modifier(string, state, is_chat=False):\n    return string + '?'\n"),
}


def write_extension(root: Path, name: str, source: str) -> Path:
    folder = root / "extensions" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "script.py").write_text(source, encoding="utf-8")
    return folder
