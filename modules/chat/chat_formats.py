"""Chat files in and out: our native JSON, ooba's history JSON and SillyTavern's JSONL.

Pure functions over text and `Chat`; nothing here touches the disk (history.py does).
Malformed input always raises InvalidRequestError saying where and what, never a crash.

Fields a format has and we do not model are kept in `meta` under the format's name, so
that importing a file and exporting it again in the same format loses nothing:

- `Message.meta["timestamp"]`: when the message was written, as ISO 8601 (no offset means
  local time) when the source date could be read, else the source's own text.
- `Message.meta["model"]`: the model that wrote the reply (ooba `model_name`, ST `extra.model`).
- `Message.meta["greeting"]`: the character's greeting (ooba's `<|BEGIN-VISIBLE-CHAT|>` row,
  SillyTavern's first character message), the key the prompt builder pins.
- `Message.meta["ooba"]`: `metadata` (the entry's other fields, e.g. attachments), `versions`
  (per-swipe extras: timestamp, visible_content when an extension changed it),
  `visible_html` (ooba's visible text when it is not plain escaped text), `row_extra`.
- `Message.meta["sillytavern"]`: the ST message's other fields (name, is_system, extra,
  swipe_info, gen_started...). ST's `extra.display_text` becomes `Message.visible`.
- `Chat.meta["sillytavern"]`: the JSONL header (user_name, character_name, chat_metadata).
- `Chat.meta["ooba"]`: ooba metadata keys that belong to no message.
"""

from __future__ import annotations

import copy
import html
import json
import re
from datetime import datetime, timezone
from typing import Any

from modules.chat.prompt import GREETING_META
from modules.chat.types import ASSISTANT, ROLES, SYSTEM, USER, Chat, Message
from modules.core.errors import InvalidRequestError

NATIVE_VERSION = 1
OOBA_GREETING_MARKER = "<|BEGIN-VISIBLE-CHAT|>"
OOBA_SYSTEM_KEY = "workbench_system_messages"
"""ooba has no system turns; ours ride in its metadata under this key (ooba ignores it)."""
FORMATS = ("ooba", "sillytavern", "native")

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")
_MONTH_NUMBER = {name[:3].lower(): number for number, name in enumerate(_MONTHS, start=1)}
# "June 19, 2023 2:20pm": SillyTavern's send_date (getMessageTimeStamp).
_ST_MERIDIEM = re.compile(r"([A-Za-z]+)\.?\s+(\d{1,2}),\s*(\d{4})\s+(\d{1,2}):(\d{2})\s*([ap]m)", re.I)
# "Jun 18, 2025 14:05": ooba's metadata timestamp (get_current_timestamp).
_OOBA_DATE = re.compile(r"([A-Za-z]+)\.?\s+(\d{1,2}),\s*(\d{4})\s+(\d{1,2}):(\d{2})")
# "2024-07-12@01h31m37s", "2024-7-12@01h31m37s123ms", "2024-6-5 @14h 56m 50s 682ms": ST create_date.
_ST_HUMANIZED = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})\s*@(\d{1,2})h\s*(\d{1,2})m\s*(\d{1,2})s(?:\s*(\d{1,3})ms)?")
_OOBA_ROLE_KEY = re.compile(r"(user|assistant)_(\d+)")


# --- shared helpers ----------------------------------------------------------------------

def _bad(where: str, problem: str) -> InvalidRequestError:
    return InvalidRequestError(f"{where}: {problem}", "chat")


def _decode(data: bytes | str, where: str) -> str:
    """Text of an upload; a UTF-8 BOM (Windows editors add one) is dropped."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _bad(where, f"the file is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not isinstance(data, str):
        raise _bad(where, "expected text or bytes")
    return data.removeprefix("\ufeff")


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise _bad(where, f"not valid JSON ({exc})") from None
    except RecursionError:
        raise _bad(where, "the JSON is nested too deeply") from None


def _dumps(obj: Any, **kw: Any) -> str:
    """JSON text that keeps Unicode readable, escaping only when the text could not be saved.

    A lone surrogate ("\\ud800" in some uploaded file) is valid in a JSON string but cannot
    be encoded as UTF-8; escaping it keeps the save working instead of crashing.
    """
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False, **kw)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"the chat holds a value JSON cannot store: {exc}", "chat") from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, ensure_ascii=True, allow_nan=False, **kw)
    return text


def _dict_field(obj: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(where, f"{key!r} must be an object, not {type(value).__name__}")
    return value


# --- timestamps ----------------------------------------------------------------------------

def parse_datetime(value: object) -> datetime | None:
    """A date in any form ooba or SillyTavern writes (or ISO 8601), else None.

    Numbers are Unix milliseconds (old SillyTavern); the result is aware only when the
    source said which zone it was in.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)) or (isinstance(value, str) and value.strip().isdigit()):
        try:
            return datetime.fromtimestamp(float(value) / 1000, tz=timezone.utc).astimezone()
        except (OverflowError, OSError, ValueError):
            return None
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    try:
        return datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        pass
    return _parse_app_date(text)


def _parse_app_date(text: str) -> datetime | None:
    try:
        if m := _ST_HUMANIZED.fullmatch(text):
            year, month, day, hour, minute, second, ms = m.groups()
            return datetime(int(year), int(month), int(day), int(hour), int(minute), int(second),
                            int((ms or "0").ljust(3, "0")) * 1000)
        if m := _ST_MERIDIEM.fullmatch(text):
            name, day, year, hour, minute, meridiem = m.groups()
            hour24 = int(hour) % 12 + (12 if meridiem.lower() == "pm" else 0)
            return datetime(int(year), _MONTH_NUMBER[name[:3].lower()], int(day), hour24, int(minute))
        if m := _OOBA_DATE.fullmatch(text):
            name, day, year, hour, minute = m.groups()
            return datetime(int(year), _MONTH_NUMBER[name[:3].lower()], int(day), int(hour), int(minute))
    except (KeyError, ValueError):  # an unknown month name, or a 31st of February
        return None
    return None


def parse_timestamp(value: object) -> str | None:
    """`value` as ISO 8601 text (see parse_datetime), or None when it is not a date."""
    moment = parse_datetime(value)
    if moment is None:
        return None
    return moment.isoformat(timespec="milliseconds" if moment.microsecond else "seconds")


def _local(moment: datetime) -> datetime:
    """Apps show local wall-clock time; naive values already are."""
    return moment.astimezone() if moment.tzinfo else moment


def format_sillytavern_date(moment: datetime) -> str:
    """SillyTavern's send_date style: "November 22, 2026 1:15am"."""
    moment = _local(moment)
    hour = moment.hour % 12 or 12
    meridiem = "pm" if moment.hour >= 12 else "am"
    return f"{_MONTHS[moment.month - 1]} {moment.day}, {moment.year} {hour}:{moment.minute:02d}{meridiem}"


def format_sillytavern_create_date(moment: datetime) -> str:
    """SillyTavern's create_date style (humanizedDateTime): "2026-11-22@01h15m30s"."""
    return _local(moment).strftime("%Y-%m-%d@%Hh%Mm%Ss")


def format_ooba_timestamp(moment: datetime) -> str:
    """ooba's metadata style: "Nov 22, 2026 01:15" (English month whatever the locale)."""
    moment = _local(moment)
    return f"{_MONTHS[moment.month - 1][:3]} {moment.day:02d}, {moment.year} {moment.hour:02d}:{moment.minute:02d}"


def _timestamp_meta(value: object) -> str | None:
    """What goes in meta["timestamp"]: ISO when readable, the source text otherwise."""
    if isinstance(value, str) and not value.strip():
        return None
    parsed = parse_timestamp(value)
    if parsed is not None:
        return parsed
    return value if isinstance(value, str) else None


# --- native ----------------------------------------------------------------------------------

def message_to_native(message: Message) -> dict[str, Any]:
    """One message in our file layout (visible and meta only when set, to keep files small)."""
    out: dict[str, Any] = {
        "role": message.role,
        "content": message.content,
        "swipes": list(message.swipes),
        "swipe_index": message.swipe_index,
    }
    if message.visible is not None:
        out["visible"] = message.visible
    if message.meta:
        out["meta"] = message.meta
    if message.reasoning:
        out["reasoning"] = message.reasoning
    if message.tool_calls:
        out["tool_calls"] = message.tool_calls
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.name:
        out["name"] = message.name
    return out


def chat_to_native(chat: Chat) -> dict[str, Any]:
    """The chat as our JSON layout (version 1)."""
    return {
        "version": NATIVE_VERSION,
        "character": chat.character,
        "id": chat.id,
        "title": chat.title,
        "created": chat.created,
        "updated": chat.updated,
        "messages": [message_to_native(m) for m in chat.messages],
        "meta": chat.meta,
    }


def dump_native(chat: Chat) -> str:
    """Our JSON text for `chat`, after checking it the way loading would (InvalidRequestError)."""
    data = chat_to_native(chat)
    text = _dumps(data, indent=2) + "\n"
    chat_from_native(json.loads(text), "the chat to save")
    return text


def message_from_native(obj: object, where: str) -> Message:
    """A Message from our layout, checked: role, strings, swipes and swipe_index in range."""
    if not isinstance(obj, dict):
        raise _bad(where, "a message must be an object")
    role, content = obj.get("role"), obj.get("content")
    if role not in ROLES:
        raise _bad(where, f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if not isinstance(content, str):
        raise _bad(where, "content must be text")
    swipes = obj.get("swipes", [])
    if not isinstance(swipes, list) or not all(isinstance(s, str) for s in swipes):
        raise _bad(where, "swipes must be a list of texts")
    index = obj.get("swipe_index", 0)
    if isinstance(index, bool) or not isinstance(index, int):
        raise _bad(where, "swipe_index must be a whole number")
    if not (0 <= index < len(swipes) if swipes else index == 0):
        raise _bad(where, f"swipe_index {index} is out of range for {len(swipes)} swipes")
    visible = obj.get("visible")
    if visible is not None and not isinstance(visible, str):
        raise _bad(where, "visible must be text or null")
    meta = _dict_field(obj, "meta", where)
    texts = {}
    for key in ("reasoning", "tool_call_id", "name"):
        value = obj.get(key, "")
        if not isinstance(value, str):
            raise _bad(where, f"{key} must be text")
        texts[key] = value
    calls = obj.get("tool_calls", [])
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise _bad(where, "tool_calls must be a list of objects")
    return Message(role, content, swipes=list(swipes), swipe_index=index, visible=visible, meta=meta,
                   tool_calls=list(calls), **texts)


def chat_from_native(obj: object, where: str) -> Chat:
    """A Chat from our layout; InvalidRequestError naming `where` and the field on bad data."""
    if not isinstance(obj, dict):
        raise _bad(where, "not a saved chat (expected a JSON object)")
    version = obj.get("version")
    if version != NATIVE_VERSION:
        if isinstance(version, int) and not isinstance(version, bool) and version > NATIVE_VERSION:
            raise _bad(where, f"written by a newer version of the app (format {version})")
        raise _bad(where, f"not a saved chat (version {version!r}, expected {NATIVE_VERSION})")
    texts = {}
    for key in ("character", "id", "title", "created", "updated"):
        value = obj.get(key, "")
        if not isinstance(value, str):
            raise _bad(where, f"{key} must be text")
        texts[key] = value
    messages = obj.get("messages")
    if not isinstance(messages, list):
        raise _bad(where, "messages must be a list")
    parsed = [message_from_native(m, f"{where}: messages[{i}]") for i, m in enumerate(messages)]
    return Chat(messages=parsed, meta=_dict_field(obj, "meta", where), **texts)


def import_native(data: bytes | str, character: str | None = None) -> Chat:
    """A chat exported from this app; a fresh id (empty) so importing never overwrites one."""
    chat = chat_from_native(_parse_json(_decode(data, "chat"), "chat"), "chat")
    chat.id = ""
    if character:
        chat.character = character
    return chat


def export_native(chat: Chat) -> str:
    """Our JSON layout, as history.py writes it."""
    return dump_native(chat)


# --- ooba --------------------------------------------------------------------------------------

def looks_like_ooba(obj: object) -> bool:
    """ooba's history: {"internal", "visible", "metadata"}, or the older {"data", "data_visible"}."""
    return isinstance(obj, dict) and ("internal" in obj or isinstance(obj.get("data"), list))


def import_ooba(data: bytes | str, character: str) -> Chat:
    """A chat from ooba's history JSON (any version: with or without metadata and swipes)."""
    obj = _parse_json(_decode(data, "ooba chat"), "ooba chat")
    return ooba_to_chat(obj, character)


def _ooba_rows(obj: object, where: str) -> tuple[list[list[str]], list[list[str]]]:
    if not looks_like_ooba(obj):
        raise _bad(where, 'not an ooba chat (expected an object with "internal" and "visible")')
    assert isinstance(obj, dict)
    internal = obj.get("internal", obj.get("data"))
    visible = obj.get("visible", obj.get("data_visible"))
    rows: list[list[list[str]]] = []
    for name, table in (("internal", internal), ("visible", visible if visible is not None else [])):
        if not isinstance(table, list):
            raise _bad(where, f"{name} must be a list of [user, reply] pairs")
        for n, row in enumerate(table):
            if not isinstance(row, list) or len(row) < 2 or not all(isinstance(cell, str) for cell in row):
                raise _bad(where, f"{name}[{n}] must be a list of at least two texts")
        rows.append(table)
    return rows[0], rows[1]


def ooba_to_chat(obj: object, character: str, where: str = "ooba chat") -> Chat:
    """A Chat from an already parsed ooba history (history.py reads ooba files in logs/ too)."""
    internal, visible = _ooba_rows(obj, where)
    assert isinstance(obj, dict)
    metadata = dict(_dict_field(obj, "metadata", where))
    for key, entry in metadata.items():
        if _OOBA_ROLE_KEY.fullmatch(key) and not isinstance(entry, dict):
            raise _bad(where, f"metadata[{key!r}] must be an object")
    systems = metadata.pop(OOBA_SYSTEM_KEY, [])
    messages: list[Message] = []
    for n, row in enumerate(internal):
        vrow = visible[n] if n < len(visible) else None
        made: list[Message] = []
        user_entry = metadata.pop(f"user_{n}", None)
        bot_entry = metadata.pop(f"assistant_{n}", None)
        greeting = n == 0 and row[0] == OOBA_GREETING_MARKER
        if (row[0] and not greeting) or (user_entry or {}).get("attachments"):
            made.append(_ooba_message(USER, row[0], vrow[0] if vrow else None, user_entry, f"{where}: user_{n}"))
        if row[1] or (bot_entry or {}).get("versions"):
            reply = _ooba_message(ASSISTANT, row[1], vrow[1] if vrow else None, bot_entry, f"{where}: assistant_{n}")
            if greeting:
                reply.meta[GREETING_META] = True
            made.append(reply)
        if made and (len(row) > 2 or (vrow and len(vrow) > 2)):
            made[-1].meta.setdefault("ooba", {})["row_extra"] = {"internal": row[2:], "visible": (vrow or [])[2:]}
        messages.extend(made)
    _insert_ooba_systems(messages, systems, where)
    meta = {"ooba": {"metadata": metadata}} if metadata else {}
    return Chat(character=character, messages=messages, meta=meta)


def _insert_ooba_systems(messages: list[Message], systems: object, where: str) -> None:
    """Put our system turns back where they were (ooba's rows cannot hold them)."""
    if not isinstance(systems, list):
        raise _bad(where, f"metadata[{OOBA_SYSTEM_KEY!r}] must be a list")
    for item in sorted((s for s in systems if isinstance(s, dict)), key=lambda s: s.get("index", 0)):
        index = item.get("index")
        if isinstance(index, bool) or not isinstance(index, int):
            raise _bad(where, f"metadata[{OOBA_SYSTEM_KEY!r}] entries need a whole-number index")
        message = message_from_native(item.get("message"), f"{where}: {OOBA_SYSTEM_KEY}")
        messages.insert(max(0, min(index, len(messages))), message)


def _ooba_message(role: str, text: str, vtext: str | None, entry: object, where: str) -> Message:
    entry = dict(entry) if isinstance(entry, dict) else {}
    versions = entry.pop("versions", None)
    current = entry.pop("current_version_index", None)
    meta: dict[str, Any] = {}
    stamp = _timestamp_meta(entry.pop("timestamp", None))
    if stamp:
        meta["timestamp"] = stamp
    model = entry.pop("model_name", None)
    if isinstance(model, str) and model:
        meta["model"] = model
    ooba: dict[str, Any] = {}
    if entry:
        ooba["metadata"] = entry
    visible = None
    if vtext:  # an empty visible cell beside a real text is an old file's gap, not a blank display
        plain = html.unescape(vtext)
        visible = None if plain == text else plain
        if vtext != html.escape(plain):  # HTML from an extension, or an old unescaped file
            ooba["visible_html"] = vtext
    swipes: list[str] = []
    index = 0
    if versions:
        swipes, index, infos = _ooba_versions(versions, current, where)
        swipes[index] = text  # the row is what ooba shows and sends
        if vtext is not None and infos[index].get("visible_content") == vtext:
            del infos[index]["visible_content"]  # the export writes the row's visible text there
        if any(infos):
            ooba["versions"] = infos
    if ooba:
        meta["ooba"] = ooba
    return Message(role, text, swipes=swipes, swipe_index=index, visible=visible, meta=meta)


def _ooba_versions(versions: object, current: object, where: str) -> tuple[list[str], int, list[dict[str, Any]]]:
    if not isinstance(versions, list) or not all(
        isinstance(v, dict) and isinstance(v.get("content"), str) for v in versions
    ):
        raise _bad(where, "versions must be a list of objects with a text content")
    if current is None:
        current = len(versions) - 1
    if isinstance(current, bool) or not isinstance(current, int) or not 0 <= current < len(versions):
        raise _bad(where, f"current_version_index {current!r} is out of range for {len(versions)} versions")
    infos = []
    for version in versions:
        info = {k: v for k, v in version.items() if k != "content"}
        if info.get("visible_content") == html.escape(version["content"]):
            del info["visible_content"]  # derivable: keep files small
        if info.get("timestamp") == "":
            del info["timestamp"]  # the export writes "" when there is none
        infos.append(info)
    return [v["content"] for v in versions], current, infos


def export_ooba(chat: Chat) -> str:
    """ooba's history JSON for `chat` (as ooba writes it: indent 4, Unicode kept)."""
    return _dumps(chat_to_ooba(chat), indent=4)


def chat_to_ooba(chat: Chat) -> dict[str, Any]:
    """{"internal", "visible", "metadata"}: user/reply rows, swipes as metadata versions."""
    internal: list[list[str]] = []
    visible: list[list[str]] = []
    metadata: dict[str, Any] = copy.deepcopy(_ooba_meta(chat.meta).get("metadata", {}))
    systems = []
    open_row = False  # the last row has a user message still waiting for its reply
    for i, message in enumerate(chat.messages):
        if message.role == SYSTEM:
            systems.append({"index": i, "message": message_to_native(message)})
            continue
        shown = _ooba_visible(message)
        if message.role == USER:
            internal.append([message.content, ""])
            visible.append([shown, ""])
            open_row = True
            key = f"user_{len(internal) - 1}"
        else:
            if not open_row:
                internal.append([OOBA_GREETING_MARKER if not internal else "", ""])
                visible.append(["", ""])
            internal[-1][1], visible[-1][1] = message.content, shown
            open_row = False
            key = f"assistant_{len(internal) - 1}"
        metadata[key] = _ooba_entry(message, shown)
        extra = _ooba_meta(message.meta).get("row_extra")
        if isinstance(extra, dict) and len(internal[-1]) == 2:
            internal[-1].extend(s for s in extra.get("internal", []) if isinstance(s, str))
            visible[-1].extend(s for s in extra.get("visible", []) if isinstance(s, str))
    if systems:
        metadata[OOBA_SYSTEM_KEY] = systems
    return {"internal": internal, "visible": visible, "metadata": metadata}


def _ooba_meta(meta: dict[str, Any]) -> dict[str, Any]:
    value = meta.get("ooba")
    return value if isinstance(value, dict) else {}


def _ooba_visible(message: Message) -> str:
    """ooba's visible text: HTML-escaped, or the original HTML if the text did not change."""
    raw = _ooba_meta(message.meta).get("visible_html")
    if isinstance(raw, str) and html.unescape(raw) == message.shown:
        return raw
    return html.escape(message.shown)


def _ooba_entry(message: Message, shown: str) -> dict[str, Any]:
    ooba = _ooba_meta(message.meta)
    entry: dict[str, Any] = copy.deepcopy(ooba.get("metadata", {})) if isinstance(ooba.get("metadata"), dict) else {}
    stamp = message.meta.get("timestamp")
    moment = parse_datetime(stamp)
    entry["timestamp"] = format_ooba_timestamp(moment) if moment else (stamp if isinstance(stamp, str) else "")
    if isinstance(message.meta.get("model"), str):
        entry["model_name"] = message.meta["model"]
    if message.swipes:
        infos = ooba.get("versions") if isinstance(ooba.get("versions"), list) else []
        versions = []
        for k, text in enumerate(message.swipes):
            info = dict(infos[k]) if k < len(infos) and isinstance(infos[k], dict) else {}
            seen = info.pop("visible_content", None)
            if k == message.swipe_index or not isinstance(seen, str):
                seen = shown if k == message.swipe_index else html.escape(text)
            versions.append({"content": text, "visible_content": seen, "timestamp": info.pop("timestamp", ""), **info})
        entry["versions"] = versions
        entry["current_version_index"] = message.swipe_index
    return entry


# --- SillyTavern --------------------------------------------------------------------------------

_ST_MAPPED = ("is_user", "send_date", "mes", "swipes", "swipe_id")
_ST_HEADER_KEYS = ("user_name", "character_name", "create_date", "chat_metadata")


def _is_st_header(record: dict[str, Any]) -> bool:
    return "mes" not in record and any(key in record for key in _ST_HEADER_KEYS)


def _looks_like_st(record: object) -> bool:
    return isinstance(record, dict) and ("mes" in record or _is_st_header(record))


def _st_records(text: str, where: str) -> list[dict[str, Any]]:
    """The JSONL objects in order. Lines split on \\n only, as ST does: a U+2028 inside a
    message is text, not a line break (str.splitlines would cut it)."""
    stripped = text.strip()
    if stripped.startswith("["):  # the same records as one JSON array (ST's /api/chats/get)
        records = _parse_json(stripped, where)
        if not isinstance(records, list):
            raise _bad(where, "expected a list of messages")
        numbered = [(f"item {n + 1}", record) for n, record in enumerate(records)]
    else:
        numbered = [
            (f"line {n + 1}", _parse_json(line, f"{where}, line {n + 1}"))
            for n, line in enumerate(text.split("\n"))
            if line.strip()
        ]
    for label, record in numbered:
        if not isinstance(record, dict):
            raise _bad(where, f"{label} is not a JSON object")
    if not numbered:
        raise _bad(where, "the file is empty")
    return [record for _, record in numbered]


def import_sillytavern(data: bytes | str, character: str | None = None) -> Chat:
    """A chat from SillyTavern's JSONL (header line, then one message per line).

    The character is the one given, else the header's character_name. is_user -> user;
    is_system or a narrator message -> system; anything else -> assistant. Swipes and
    swipe_id are kept; a hidden message (is_system on a user turn) stays a user turn with
    its flag kept in meta so an export hides it again.
    """
    where = "SillyTavern chat"
    records = _st_records(_decode(data, where), where)
    header = records.pop(0) if _is_st_header(records[0]) else {}
    name = character or header.get("character_name")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"{where}: the file names no character; choose one", "character")
    messages = [_st_message(record, f"{where}, message {n + 1}") for n, record in enumerate(records)]
    if messages and messages[0].role == ASSISTANT:
        messages[0].meta[GREETING_META] = True  # ST's first character message is first_mes
    kept = {k: copy.deepcopy(v) for k, v in header.items() if k != "create_date"}
    created = parse_timestamp(header.get("create_date")) or ""
    if not created and header.get("create_date") is not None:
        kept["create_date"] = header["create_date"]
    return Chat(character=name, messages=messages, created=created, meta={"sillytavern": kept} if kept else {})


def _st_message(record: dict[str, Any], where: str) -> Message:
    text = record.get("mes", "")
    if not isinstance(text, str):
        raise _bad(where, "mes must be text")
    extra = copy.deepcopy(_dict_field(record, "extra", where))
    if record.get("is_user"):
        role = USER
    elif record.get("is_system") or extra.get("type") == "narrator":
        role = SYSTEM
    else:
        role = ASSISTANT
    swipes, index = _st_swipes(record, text, where)
    meta: dict[str, Any] = {}
    stamp = _timestamp_meta(record.get("send_date"))
    if stamp:
        meta["timestamp"] = stamp
    if isinstance(extra.get("model"), str):
        meta["model"] = extra.pop("model")
    shown = extra.pop("display_text", None)
    kept = {k: copy.deepcopy(v) for k, v in record.items() if k not in _ST_MAPPED and k != "extra"}
    if extra or "extra" in record:
        kept["extra"] = extra
    meta["sillytavern"] = kept
    visible = shown if isinstance(shown, str) and shown != text else None
    return Message(role, text, swipes=swipes, swipe_index=index, visible=visible, meta=meta)


def _st_swipes(record: dict[str, Any], text: str, where: str) -> tuple[list[str], int]:
    raw = record.get("swipes")
    if raw is None:
        return [], 0
    if not isinstance(raw, list):
        raise _bad(where, "swipes must be a list")
    # Chub exports swipes as {"message": text}; ST flattens them on import, so do we.
    swipes = [s.get("message") if isinstance(s, dict) else s for s in raw]
    if not all(isinstance(s, str) for s in swipes):
        raise _bad(where, "swipes must be texts")
    if not swipes:
        return [], 0
    index = record.get("swipe_id", 0)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(swipes):
        raise _bad(where, f"swipe_id {index!r} is out of range for {len(swipes)} swipes")
    swipes[index] = text  # mes is what ST shows and sends
    return swipes, index


def export_sillytavern(
    chat: Chat, user_name: str = "User", character_name: str | None = None, *, now: datetime | None = None
) -> str:
    """SillyTavern JSONL: a header line, then a message per line, as ST itself writes it.

    Dates use ST's own styles (send_date "November 22, 2026 1:15am", create_date
    "2026-11-22@01h15m30s"), both of which ST parses. A message without a timestamp gets
    the chat's last update time (or `now`). Our system turns become narrator messages.
    """
    character_name = character_name or chat.character
    fallback = parse_datetime(chat.updated) or parse_datetime(chat.created) or now or datetime.now().astimezone()
    kept = chat.meta.get("sillytavern")
    kept = copy.deepcopy(kept) if isinstance(kept, dict) else {}
    header = {
        "user_name": user_name,
        "character_name": character_name,
        "create_date": format_sillytavern_create_date(parse_datetime(chat.created) or fallback),
        "chat_metadata": kept.pop("chat_metadata", {}),
    }
    header.update({k: v for k, v in kept.items() if k not in header})
    lines = [header] + [_st_record(m, user_name, character_name, fallback) for m in chat.messages]
    # Compact separators and no trailing newline, as ST's own save writes (JSON.stringify, join).
    return "\n".join(_dumps(line, separators=(",", ":")) for line in lines)


def _st_record(message: Message, user_name: str, character_name: str, fallback: datetime) -> dict[str, Any]:
    kept = message.meta.get("sillytavern")
    kept = copy.deepcopy(kept) if isinstance(kept, dict) else {}
    from_st = bool(kept)
    had_extra = "extra" in kept
    extra = kept.pop("extra", {})
    extra = extra if isinstance(extra, dict) else {}
    if message.visible is not None:
        extra["display_text"] = message.visible
    if isinstance(message.meta.get("model"), str):
        extra["model"] = message.meta["model"]
    if message.role == SYSTEM and not from_st:
        extra.setdefault("type", "narrator")  # in the prompt, unlike is_system (hidden) messages
    names = {USER: user_name, ASSISTANT: character_name}
    name = names.get(message.role) or kept.get("name") or "System"
    send_date = format_sillytavern_date(parse_datetime(message.meta.get("timestamp")) or fallback)
    record: dict[str, Any] = {"name": name, "is_user": message.role == USER}
    # ST leaves is_system and extra off some lines; write them back only as they were.
    if "is_system" in kept or not from_st:
        record["is_system"] = bool(kept.pop("is_system", False))
    record["send_date"] = send_date
    record["mes"] = message.content
    if extra or had_extra or not from_st:
        record["extra"] = extra
    kept.pop("name", None)
    if message.swipes:
        infos = kept.pop("swipe_info", None)
        record["swipe_id"] = message.swipe_index
        record["swipes"] = list(message.swipes)
        # ST itself writes fewer infos than swipes (a greeting's is []), so a kept list
        # goes back as it was (cut to the swipes); one is made only when there was none.
        record["swipe_info"] = (
            infos[: len(message.swipes)]
            if isinstance(infos, list)
            else [{"send_date": send_date, "extra": {}} for _ in message.swipes]
        )
    record.update({k: v for k, v in kept.items() if k not in record})
    return record


# --- any ----------------------------------------------------------------------------------------

def detect_format(data: bytes | str) -> str:
    """Which format an uploaded chat is in: "ooba", "sillytavern" or "native".

    InvalidRequestError when it is none of them (or not text, or not JSON).
    """
    text = _decode(data, "chat")
    if not text.strip():
        raise _bad("chat", "the file is empty")
    try:
        obj = json.loads(text)
    except RecursionError:
        raise _bad("chat", "the JSON is nested too deeply") from None
    except ValueError:
        first = next(line for line in text.split("\n") if line.strip())
        if _looks_like_st(_parse_json(first, "chat, line 1")):
            return "sillytavern"
        raise _bad("chat", "not a chat file: the first line is not a SillyTavern header or message") from None
    if looks_like_ooba(obj):
        return "ooba"
    if isinstance(obj, dict) and "version" in obj and "messages" in obj:
        return "native"
    if _looks_like_st(obj) or (isinstance(obj, list) and obj and _looks_like_st(obj[0])):
        return "sillytavern"
    raise _bad("chat", "not a chat format we know (ooba JSON, SillyTavern JSONL or this app's JSON)")


def import_any(data: bytes | str, character: str | None = None) -> Chat:
    """Detect the format and import. ooba files do not name their character: give one."""
    kind = detect_format(data)
    if kind == "sillytavern":
        return import_sillytavern(data, character)
    if kind == "ooba":
        if not character:
            raise InvalidRequestError("an ooba chat does not say whose it is: choose a character", "character")
        return import_ooba(data, character)
    return import_native(data, character)
