"""Chat import/export: ooba's history JSON, SillyTavern JSONL, our own JSON, and bad input."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from modules.chat.chat_formats import (
    detect_format,
    export_native,
    export_ooba,
    export_sillytavern,
    format_ooba_timestamp,
    format_sillytavern_create_date,
    format_sillytavern_date,
    import_any,
    import_ooba,
    import_sillytavern,
    parse_datetime,
    parse_timestamp,
)
from modules.chat.types import Chat, Message
from modules.core.errors import InvalidRequestError

# What text-generation-webui 3.x writes to user_data/logs/chat/Assistant/20250618-14-05-12.json:
# a greeting row, HTML-escaped visible text, per-message timestamps, a regenerated reply.
OOBA_FILE = """{
    "internal": [
        [
            "<|BEGIN-VISIBLE-CHAT|>",
            "How can I help you today?"
        ],
        [
            "What's 2 < 3? Ünïcödé ✓",
            "It's true: 2 < 3."
        ],
        [
            "Tell me a joke",
            "Why did the chicken cross the road?"
        ]
    ],
    "visible": [
        [
            "",
            "How can I help you today?"
        ],
        [
            "What&#x27;s 2 &lt; 3? Ünïcödé ✓",
            "It&#x27;s true: 2 &lt; 3."
        ],
        [
            "Tell me a joke",
            "Why did the chicken cross the road?"
        ]
    ],
    "metadata": {
        "assistant_0": {
            "timestamp": "Jun 18, 2025 14:05"
        },
        "user_1": {
            "timestamp": "Jun 18, 2025 14:06"
        },
        "assistant_1": {
            "timestamp": "Jun 18, 2025 14:06",
            "model_name": "Qwen3-8B-Q4_K_M.gguf"
        },
        "user_2": {
            "timestamp": "Jun 18, 2025 14:07"
        },
        "assistant_2": {
            "timestamp": "Jun 18, 2025 14:08",
            "model_name": "Qwen3-8B-Q4_K_M.gguf",
            "versions": [
                {
                    "content": "Knock knock.",
                    "visible_content": "Knock knock.",
                    "timestamp": "Jun 18, 2025 14:07"
                },
                {
                    "content": "Why did the chicken cross the road?",
                    "visible_content": "Why did the chicken cross the road?",
                    "timestamp": "Jun 18, 2025 14:08"
                }
            ],
            "current_version_index": 1
        }
    }
}"""

# What SillyTavern 1.12/1.13 writes to data/default-user/chats/Seraphina/*.jsonl: a header
# with chat_metadata; a greeting with alternate greetings as swipes (swipe_info []); a user
# line; a generated reply without is_system, with extra, gen times and swipe_info; a hidden
# (/hide) user line; a /sys narrator line.
ST_FILE = "\n".join(
    [
        '{"user_name":"User","character_name":"Seraphina","create_date":"2024-07-12@01h31m37s",'
        '"chat_metadata":{"integrity":"8f7e4c1a-2b3d-4e5f-9a8b-7c6d5e4f3a2b","chat_id_hash":1234567890123456,'
        '"note_prompt":"","note_interval":1,"note_position":1,"note_depth":4,"note_role":0,'
        '"timedWorldInfo":{"sticky":{},"cooldown":{}},"tainted":true,"lastInContextMessageId":4}}',
        '{"name":"Seraphina","is_user":false,"is_system":false,"send_date":"July 12, 2024 1:31am",'
        '"mes":"*Seraphina smiles.* Welcome, traveler.","extra":{},"swipe_id":0,'
        '"swipes":["*Seraphina smiles.* Welcome, traveler.","*She bows.* Greetings."],"swipe_info":[]}',
        '{"name":"User","is_user":true,"is_system":false,"send_date":"July 12, 2024 1:32am",'
        '"mes":"Where am I? Ünïcödé ✓ 日本","extra":{"isSmallSys":false},"force_avatar":"User Avatars/user-default.png"}',
        '{"extra":{"api":"textgenerationwebui","model":"Mistral-Nemo-12B.Q5_K_M.gguf","reasoning":"",'
        '"reasoning_duration":null,"token_count":42},"name":"Seraphina","is_user":false,'
        '"send_date":"July 12, 2024 1:33pm","mes":"In the Glade.","title":"",'
        '"gen_started":"2024-07-12T13:32:58.123Z","gen_finished":"2024-07-12T13:33:04.456Z","swipe_id":1,'
        '"swipes":["In the forest.","In the Glade."],"swipe_info":[{"send_date":"July 12, 2024 1:33pm",'
        '"gen_started":"2024-07-12T13:32:40.000Z","gen_finished":"2024-07-12T13:32:45.000Z",'
        '"extra":{"api":"textgenerationwebui","model":"Mistral-Nemo-12B.Q5_K_M.gguf"}},'
        '{"send_date":"July 12, 2024 1:33pm","gen_started":"2024-07-12T13:32:58.123Z",'
        '"gen_finished":"2024-07-12T13:33:04.456Z","extra":{"api":"textgenerationwebui",'
        '"model":"Mistral-Nemo-12B.Q5_K_M.gguf"}}]}',
        '{"name":"User","is_user":true,"is_system":true,"send_date":"July 12, 2024 1:34pm",'
        '"mes":"(an aside I hid)","extra":{"isSmallSys":false}}',
        '{"name":"System","is_user":false,"is_system":false,"send_date":"July 12, 2024 1:35pm",'
        '"mes":"The sun sets.","extra":{"type":"narrator","translated":"Le soleil se couche."},'
        '"force_avatar":"img/five.png"}',
    ]
)


def our_chat() -> Chat:
    return Chat(
        "Élodie",
        [
            Message("assistant", "Bonjour ! <3 & \"quotes\"", meta={"greeting": True}),
            Message("user", "日本語で話せますか？\nLine two.", meta={"timestamp": "2026-11-22T01:15:00"}),
            Message("user", "Two user turns in a row"),
            Message("system", "A narrator says: it rains."),
            Message("assistant", "B", swipes=["A", "B", "C"], swipe_index=1, visible="B (translated)", meta={"model": "m"}),
            Message("user", "edited", swipes=["first draft", "edited"], swipe_index=1),
        ],
        updated="2026-11-22T01:20:00+00:00",
    )


def essentials(messages: list[Message], drop: tuple[str, ...] = ()) -> list[tuple]:
    return [
        (m.role, m.content, m.swipes, m.swipe_index, m.visible, {k: v for k, v in m.meta.items() if k not in drop})
        for m in messages
    ]


# --- timestamps --------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "iso"),
    [
        ("June 19, 2023 2:20pm", "2023-06-19T14:20:00"),
        ("June 19, 2023 12:05am", "2023-06-19T00:05:00"),
        ("December 1, 2023 12:30pm", "2023-12-01T12:30:00"),
        ("2024-07-12@01h31m37s", "2024-07-12T01:31:37"),
        ("2024-7-12@01h31m37s123ms", "2024-07-12T01:31:37.123"),
        ("2024-6-5 @14h 56m 50s 682ms", "2024-06-05T14:56:50.682"),
        ("Jun 18, 2025 14:05", "2025-06-18T14:05:00"),
        ("2024-07-12T01:32:58.123Z", "2024-07-12T01:32:58.123+00:00"),
        ("2026-11-22T01:15:30+01:00", "2026-11-22T01:15:30+01:00"),
        ("February 31, 2024 1:00pm", None),
        ("Smarch 3, 2024 1:00pm", None),
        ("yesterday", None),
        ("", None),
        (None, None),
        (True, None),
    ],
)
def test_timestamps_from_both_apps_become_iso(text, iso):
    assert parse_timestamp(text) == iso


def test_unix_milliseconds_are_read_as_old_sillytavern_wrote_them():
    assert parse_datetime(1_700_000_000_000) == datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc)
    assert parse_datetime("1700000000000") == parse_datetime(1_700_000_000_000)


@pytest.mark.parametrize(
    ("moment", "st", "ooba"),
    [
        (datetime(2026, 11, 22, 1, 15, 30), "November 22, 2026 1:15am", "Nov 22, 2026 01:15"),
        (datetime(2026, 1, 2, 13, 5), "January 2, 2026 1:05pm", "Jan 02, 2026 13:05"),
        (datetime(2026, 1, 2, 0, 0), "January 2, 2026 12:00am", "Jan 02, 2026 00:00"),
        (datetime(2026, 1, 2, 12, 30), "January 2, 2026 12:30pm", "Jan 02, 2026 12:30"),
    ],
)
def test_dates_are_written_in_each_apps_style(moment, st, ooba):
    assert format_sillytavern_date(moment) == st
    assert format_ooba_timestamp(moment) == ooba
    assert parse_datetime(st) == moment.replace(second=0)
    assert parse_datetime(ooba) == moment.replace(second=0)


def test_create_date_round_trips():
    moment = datetime(2026, 11, 22, 1, 15, 30)
    assert format_sillytavern_create_date(moment) == "2026-11-22@01h15m30s"
    assert parse_datetime("2026-11-22@01h15m30s") == moment


# --- ooba --------------------------------------------------------------------------------------

def test_a_real_ooba_file_imports_with_greeting_swipes_and_times():
    chat = import_ooba(OOBA_FILE.encode("utf-8"), "Assistant")
    assert chat.character == "Assistant" and chat.id == ""
    assert [(m.role, m.content) for m in chat.messages] == [
        ("assistant", "How can I help you today?"),
        ("user", "What's 2 < 3? Ünïcödé ✓"),
        ("assistant", "It's true: 2 < 3."),
        ("user", "Tell me a joke"),
        ("assistant", "Why did the chicken cross the road?"),
    ]
    greeting, _, reply, _, regenerated = chat.messages
    assert greeting.meta == {"greeting": True, "timestamp": "2025-06-18T14:05:00"}
    assert all(m.visible is None for m in chat.messages)  # escaping is not a different display
    assert reply.meta["model"] == "Qwen3-8B-Q4_K_M.gguf"
    assert regenerated.swipes == ["Knock knock.", "Why did the chicken cross the road?"]
    assert regenerated.swipe_index == 1


def test_a_real_ooba_file_exports_back_identical():
    chat = import_ooba(OOBA_FILE, "Assistant")
    assert json.loads(export_ooba(chat)) == json.loads(OOBA_FILE)


def test_ooba_html_from_extensions_attachments_and_extra_columns_survive():
    original = {
        "internal": [["Look", "Here", "tool output"], ["", "and more"]],
        "visible": [["Look", "<img src=\"x.png\">Here", "tool output"], ["", "and more"]],
        "metadata": {
            "user_0": {"timestamp": "Jun 18, 2025 14:06", "attachments": [{"name": "a.txt", "type": "text/plain", "content": "hi"}]},
            "assistant_0": {"timestamp": "Jun 18, 2025 14:06"},
            "assistant_1": {"timestamp": ""},
            "something_else": {"kept": True},
        },
    }
    chat = import_ooba(json.dumps(original), "A")
    assert [m.role for m in chat.messages] == ["user", "assistant", "assistant"]
    assert chat.messages[1].visible == '<img src="x.png">Here'
    assert chat.messages[0].meta["ooba"]["metadata"]["attachments"][0]["name"] == "a.txt"
    assert json.loads(export_ooba(chat)) == original


def test_old_ooba_files_without_metadata_import():
    old = {"data": [["<|BEGIN-VISIBLE-CHAT|>", "Hello"], ["Hi *waves*", "Hey"]],
           "data_visible": [["", "Hello"], ["Hi *waves*", "Hey"]]}
    chat = import_ooba(json.dumps(old), "Bot")
    assert [(m.role, m.content, m.meta) for m in chat.messages] == [
        ("assistant", "Hello", {"greeting": True}), ("user", "Hi *waves*", {}), ("assistant", "Hey", {})
    ]
    assert detect_format(json.dumps(old)) == "ooba"


def test_our_chat_survives_an_ooba_round_trip():
    original = our_chat()
    exported = json.loads(export_ooba(original))
    assert exported["internal"][0] == ["<|BEGIN-VISIBLE-CHAT|>", 'Bonjour ! <3 & "quotes"']
    assert exported["visible"][0][1] == "Bonjour ! &lt;3 &amp; &quot;quotes&quot;"
    assert exported["internal"][1] == ["日本語で話せますか？\nLine two.", ""]  # a user turn with no reply
    assert exported["metadata"]["assistant_2"]["current_version_index"] == 1
    assert exported["metadata"]["user_1"]["timestamp"] == "Nov 22, 2026 01:15"
    back = import_ooba(export_ooba(original), "Élodie")
    assert essentials(back.messages) == essentials(original.messages)


# --- SillyTavern -------------------------------------------------------------------------------

def test_a_sillytavern_file_imports_with_roles_swipes_and_hidden_flags():
    chat = import_sillytavern(ST_FILE.encode("utf-8"))
    assert chat.character == "Seraphina"
    assert chat.created == "2024-07-12T01:31:37"
    assert chat.meta["sillytavern"]["chat_metadata"]["integrity"] == "8f7e4c1a-2b3d-4e5f-9a8b-7c6d5e4f3a2b"
    assert [m.role for m in chat.messages] == ["assistant", "user", "assistant", "user", "system"]
    greeting, user, reply, hidden, narrator = chat.messages
    assert greeting.meta["greeting"] is True and greeting.swipes[1] == "*She bows.* Greetings."
    assert user.content == "Where am I? Ünïcödé ✓ 日本" and user.meta["timestamp"] == "2024-07-12T01:32:00"
    assert (reply.swipes, reply.swipe_index) == (["In the forest.", "In the Glade."], 1)
    assert reply.meta["model"] == "Mistral-Nemo-12B.Q5_K_M.gguf"
    assert hidden.meta["sillytavern"]["is_system"] is True
    assert narrator.content == "The sun sets."


def test_a_sillytavern_file_exports_back_identical():
    chat = import_sillytavern(ST_FILE)
    exported = export_sillytavern(chat, "User", "Seraphina")
    assert [json.loads(line) for line in exported.split("\n")] == [json.loads(line) for line in ST_FILE.split("\n")]
    assert exported.startswith('{"user_name":"User","character_name":"Seraphina","create_date":')  # ST's compact style


def test_our_chat_exports_as_jsonl_that_sillytavern_reads():
    original = our_chat()
    text = export_sillytavern(original, "Me", "Élodie")
    lines = text.split("\n")
    header = json.loads(lines[0])
    assert header["user_name"] == "Me" and header["character_name"] == "Élodie"
    assert header["create_date"] == format_sillytavern_create_date(datetime.fromisoformat(original.updated))
    assert isinstance(header["chat_metadata"], dict)
    records = [json.loads(line) for line in lines[1:]]
    assert len(records) == len(original.messages)
    for record in records:
        assert isinstance(record["mes"], str) and isinstance(record["is_user"], bool)
        assert parse_datetime(record["send_date"]) is not None
        assert record["send_date"][0].isalpha()  # ST's "November 22, 2026 1:15am" style
    assert records[1]["send_date"] == "November 22, 2026 1:15am"
    assert records[0]["name"] == "Élodie" and records[1]["name"] == "Me"
    assert records[3]["extra"]["type"] == "narrator" and records[3]["is_system"] is False
    reply = records[4]
    assert (reply["swipes"], reply["swipe_id"], len(reply["swipe_info"])) == (["A", "B", "C"], 1, 3)
    assert reply["extra"] == {"display_text": "B (translated)", "model": "m"}
    back = import_sillytavern(text)
    assert back.character == "Élodie"
    assert essentials(back.messages, drop=("timestamp", "sillytavern")) == essentials(
        original.messages, drop=("timestamp",)
    )


def test_sillytavern_lines_split_on_newline_only_and_headerless_files_import():
    text = '{"name":"A","is_user":false,"mes":"one\u2028two","send_date":1700000000000}\r\n\n'
    chat = import_sillytavern(text, "A")
    assert [m.content for m in chat.messages] == ["one\u2028two"]
    assert chat.messages[0].meta["timestamp"].startswith("2023-11-1")
    assert detect_format(text) == "sillytavern"


def test_chub_style_swipes_are_flattened():
    text = '{"user_name":"U","character_name":"C"}\n{"name":"C","mes":"b","swipes":[{"message":"a"},{"message":"b"}],"swipe_id":1}'
    assert import_sillytavern(text).messages[0].swipes == ["a", "b"]


# --- detection and our own format ----------------------------------------------------------------

def test_formats_are_detected():
    assert detect_format(OOBA_FILE) == "ooba"
    assert detect_format(ST_FILE.encode("utf-8")) == "sillytavern"
    assert detect_format(ST_FILE.split("\n")[0]) == "sillytavern"  # a header-only (empty) chat
    assert detect_format(json.dumps([json.loads(line) for line in ST_FILE.split("\n")])) == "sillytavern"
    assert detect_format(export_native(our_chat())) == "native"
    assert detect_format("\ufeff" + OOBA_FILE) == "ooba"


def test_import_any_dispatches_and_gives_a_fresh_id():
    saved = our_chat()
    saved.id = "20261122-011530"
    native = import_any(export_native(saved).encode("utf-8"))
    assert native.id == "" and native.messages == saved.messages and native.character == "Élodie"
    assert import_any(export_native(saved), "Other").character == "Other"
    assert import_any(OOBA_FILE, "Assistant").messages[0].content == "How can I help you today?"
    assert import_any(ST_FILE).character == "Seraphina"
    assert import_any(ST_FILE, "Renamed").character == "Renamed"


# --- malformed input -------------------------------------------------------------------------------

BAD_OOBA = [
    b"\xff\xfe\x00not utf-8",
    "not json",
    "[]",
    '{"visible": []}',
    '{"internal": "x"}',
    '{"internal": [["only one"]]}',
    '{"internal": [["a", 5]]}',
    '{"internal": [["a", "b"]], "visible": [null]}',
    '{"internal": [], "metadata": []}',
    '{"internal": [["a", "b"]], "metadata": {"assistant_0": "x"}}',
    '{"internal": [["a", "b"]], "metadata": {"assistant_0": {"versions": [{"content": 1}]}}}',
    '{"internal": [["a", "b"]], "metadata": {"assistant_0": {"versions": "x"}}}',
    '{"internal": [["a", "b"]], "metadata": {"assistant_0": {"versions": [{"content": "b"}], "current_version_index": 3}}}',
    '{"internal": [["a", "b"]], "metadata": {"workbench_system_messages": [{"index": 0, "message": {"role": "x"}}]}}',
    "[" * 100_000,
]

BAD_ST = [
    "",
    "   \n  ",
    "not json",
    '{"user_name":"U","character_name":"C"}\n[1, 2]',
    '{"user_name":"U","character_name":"C"}\n"text"',
    '{"user_name":"U","character_name":"C"}\n{"mes": 5}',
    '{"user_name":"U","character_name":"C"}\n{"mes": "a", "swipes": "ab"}',
    '{"user_name":"U","character_name":"C"}\n{"mes": "a", "swipes": ["a", 3]}',
    '{"user_name":"U","character_name":"C"}\n{"mes": "a", "swipes": ["a"], "swipe_id": 4}',
    '{"user_name":"U","character_name":"C"}\n{"mes": "a", "extra": "x"}',
    '{"user_name":"U"}\n{"mes": "a"}',  # no character anywhere
    '{"user_name":"U","character_name":"C"}\n{"mes": "a"}\n{broken',
    b"\xc3\x28",
]

BAD_ANY = ["", "42", '"text"', '{"foo": 1}', "hello\nworld", "[1, 2]", "[" * 100_000, OOBA_FILE.replace("{", "", 1)]


@pytest.mark.parametrize("data", BAD_OOBA)
def test_malformed_ooba_input_is_refused_clearly(data):
    with pytest.raises(InvalidRequestError):
        import_ooba(data, "A")


@pytest.mark.parametrize("data", BAD_ST)
def test_malformed_sillytavern_input_is_refused_clearly(data):
    with pytest.raises(InvalidRequestError):
        import_sillytavern(data)


@pytest.mark.parametrize("data", BAD_ANY)
def test_unknown_input_is_refused_clearly(data):
    with pytest.raises(InvalidRequestError):
        import_any(data, "A")


def test_an_ooba_file_needs_a_character_and_errors_say_where():
    with pytest.raises(InvalidRequestError, match="character") as caught:
        import_any(OOBA_FILE)
    assert caught.value.param == "character"
    with pytest.raises(InvalidRequestError, match="line 3"):
        import_sillytavern('{"user_name":"U","character_name":"C"}\n{"mes": "a"}\n{broken')
    with pytest.raises(InvalidRequestError, match="swipe_id"):
        import_sillytavern('{"character_name":"C"}\n{"mes": "a", "swipes": ["a"], "swipe_id": 4}')


def test_native_files_keep_thinking_and_tool_turns_apart():
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    chat = Chat("Assistant", [Message("user", "hi"), Message("assistant", "", tool_calls=[call], reasoning="hm"),
                              Message("tool", "42", tool_call_id="call_1", name="f"),
                              Message("assistant", "It is 42.", reasoning="easy")], id="x")
    back = import_any(export_native(chat), "chat.json")
    assert back.messages == chat.messages
