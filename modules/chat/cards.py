"""TavernAI / SillyTavern character cards: PNG and JSON, spec v1, v2 and v3.

A card is JSON. In a PNG it sits, base64-encoded, in a text chunk whose keyword is `chara`
(v1/v2, what TavernAI and SillyTavern write) or `ccv3` (v3, written beside `chara` by
newer tools). The PNG chunks are read and written here with struct and zlib: the card
lives in the chunk list, so the image data is never decoded and an exported picture is
byte-for-byte the user's. Pillow is used only to turn a JPEG/WebP picture into a PNG.

Every function is pure (bytes and dicts in, bytes and dicts out); the character store
does the file work.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import struct
import zlib
from typing import Any

from modules.chat.types import Character
from modules.core.errors import InvalidRequestError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CARD_KEYWORDS = ("ccv3", "chara")
"""Text-chunk keywords that hold a card, most preferred first."""
MAX_CARD_BYTES = 32 * 1024 * 1024
"""Largest card text accepted after decompression: big lorebooks fit, a zip bomb does not."""
PLACEHOLDER_SIZE = (400, 600)
PLACEHOLDER_RGB = (0x4A, 0x55, 0x68)
"""A quiet slate grey, for characters that have no picture."""

# Card fields that become Character fields; every other field is kept in Character.card.
_MAPPED_FIELDS = ("name", "first_mes", "mes_example", "alternate_greetings")
# The v2 spec's optional fields and their empty values, written on every export.
_V2_DEFAULTS: dict[str, Any] = {
    "creator_notes": "",
    "system_prompt": "",
    "post_history_instructions": "",
    "tags": [],
    "creator": "",
    "character_version": "",
    "extensions": {},
}
_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")


def _bad_file(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param="file")


# ---------------------------------------------------------------- PNG chunks


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The (type, payload) chunks of a PNG, up to and including IEND.

    InvalidRequestError when `data` is not a PNG or is truncated. CRCs are not checked:
    a damaged card shows up as bad base64 or JSON, with a clearer message.
    """
    if not data.startswith(PNG_SIGNATURE):
        raise _bad_file("the file is not a PNG image")
    chunks: list[tuple[bytes, bytes]] = []
    pos = len(PNG_SIGNATURE)
    while True:
        if pos + 8 > len(data):
            raise _bad_file("the PNG is truncated (it ends before its IEND chunk)")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 8 + length + 4
        if end > len(data):
            raise _bad_file(f"the PNG is truncated (in a {kind.decode('latin-1')!r} chunk)")
        chunks.append((kind, data[pos + 8 : pos + 8 + length]))
        pos = end
        if kind == b"IEND":
            return chunks


def build_png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG file from (type, payload) chunks, with lengths and CRCs computed."""
    out = [PNG_SIGNATURE]
    for kind, payload in chunks:
        out.append(struct.pack(">I", len(payload)) + kind + payload)
        out.append(struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))
    return b"".join(out)


def _text_chunk(kind: bytes, payload: bytes) -> tuple[str, bytes | None]:
    """(keyword, raw text bytes) of a tEXt/zTXt/iTXt chunk; text None if unreadable."""
    keyword, sep, rest = payload.partition(b"\0")
    name = keyword.decode("latin-1")
    if not sep:
        return name, None
    if kind == b"tEXt":
        return name, rest
    if kind == b"zTXt":
        return name, _inflate(rest[1:])
    # iTXt: compression flag, method, language tag\0, translated keyword\0, text.
    if len(rest) < 2:
        return name, None
    compressed, body = rest[0], rest[2:]
    parts = body.split(b"\0", 2)
    if len(parts) < 3:
        return name, None
    return name, _inflate(parts[2]) if compressed else parts[2]


def _inflate(data: bytes) -> bytes | None:
    """zlib-decompress with a size cap, so a hostile chunk cannot exhaust memory."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_CARD_BYTES + 1)
    except zlib.error:
        return None
    return None if len(out) > MAX_CARD_BYTES else out


def _is_card_chunk(kind: bytes, payload: bytes) -> bool:
    return kind in _TEXT_CHUNKS and payload.partition(b"\0")[0].decode("latin-1") in CARD_KEYWORDS


def strip_card_chunks(png: bytes) -> bytes:
    """The PNG without its card chunks (a picture kept beside a YAML needs no stale card)."""
    return build_png([(kind, payload) for kind, payload in png_chunks(png) if not _is_card_chunk(kind, payload)])


# ---------------------------------------------------------------- reading


def read_card_png(data: bytes) -> dict[str, Any]:
    """The card JSON held in a PNG's `ccv3` (preferred) or `chara` text chunk.

    Accepts tEXt, zTXt and iTXt chunks, as real tools write all three. When the v3 chunk
    cannot be decoded the v2 one is tried before giving up. InvalidRequestError for a file
    that is not a PNG, a truncated PNG, a PNG without a card, or a card that is not
    base64-encoded JSON.
    """
    found: dict[str, bytes | None] = {}
    for kind, payload in png_chunks(data):
        if kind in _TEXT_CHUNKS:
            keyword, text = _text_chunk(kind, payload)
            if keyword in CARD_KEYWORDS and keyword not in found:
                found[keyword] = text
    if not found:
        raise _bad_file("the PNG holds no character card (no 'chara' or 'ccv3' text chunk)")
    first_error: InvalidRequestError | None = None
    for keyword in CARD_KEYWORDS:
        if keyword not in found:
            continue
        try:
            return _decode_card_text(found[keyword], keyword)
        except InvalidRequestError as error:
            first_error = first_error or error
    assert first_error is not None
    raise first_error


def _decode_card_text(text: bytes | None, keyword: str) -> dict[str, Any]:
    if text is None:
        raise _bad_file(f"the PNG's {keyword!r} chunk is damaged and cannot be read")
    stripped = text.strip()
    # A few tools store the JSON itself rather than base64; accept it as SillyTavern does.
    if not stripped.startswith(b"{"):
        compact = b"".join(stripped.split())
        try:
            stripped = base64.b64decode(compact + b"=" * (-len(compact) % 4), validate=True)
        except (binascii.Error, ValueError) as error:
            raise _bad_file(f"the PNG's {keyword!r} card is not valid base64: {error}") from error
    return read_card_json(stripped, where=f"the PNG's {keyword!r} card")


def read_card_json(data: bytes, where: str = "the card") -> dict[str, Any]:
    """A card from JSON bytes (UTF-8, with or without a BOM): a dict, else InvalidRequestError."""
    try:
        card = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise _bad_file(f"{where} is not UTF-8 text: {error}") from error
    except json.JSONDecodeError as error:
        raise _bad_file(f"{where} is not valid JSON: {error}") from error
    if not isinstance(card, dict):
        raise _bad_file(f"{where} is JSON but not an object (got {type(card).__name__})")
    return card


def looks_like_card(data: dict[str, Any]) -> bool:
    """Whether a JSON/YAML mapping is a Tavern card rather than an ooba-style character."""
    return isinstance(data.get("data"), dict) or "first_mes" in data or "mes_example" in data


# ---------------------------------------------------------------- card <-> Character


def _text(value: object) -> str:
    """Card text fields are strings by spec; be lenient with null and numbers."""
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _text_list(value: object) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list):
        return [_text(item) for item in value if item is not None]
    return []


def card_fields(card: dict[str, Any]) -> dict[str, Any]:
    """The card's field mapping: `data` for v2/v3 (and later), the card itself for v1."""
    data = card.get("data")
    return data if isinstance(data, dict) else card


def build_context(description: str, personality: str, scenario: str) -> str:
    """The character context from card fields, laid out as ooba and SillyTavern do."""
    parts = []
    if description.strip():
        parts.append(description.strip())
    if personality.strip():
        parts.append(f"{{{{char}}}}'s personality: {personality.strip()}")
    if scenario.strip():
        parts.append(f"Scenario: {scenario.strip()}")
    return "\n".join(parts)


def card_to_character(card: dict[str, Any]) -> Character:
    """A Character from a v1, v2 or v3 card.

    context = description + "{{char}}'s personality: ..." + "Scenario: ...";
    greeting = first_mes; example_dialogue = mes_example. Every other field (description,
    personality and scenario included, v3 extras too) is kept in `card` so that
    `character_to_card` loses nothing. The name is returned as the card has it, stripped
    and possibly empty: the store decides the file name.
    """
    fields = card_fields(card)
    is_v1 = fields is card
    extras = {key: value for key, value in fields.items() if key not in _MAPPED_FIELDS}
    if is_v1:
        # A v1 card has no wrapper; drop only the keys that belong to a newer wrapper.
        extras.pop("spec", None)
        extras.pop("spec_version", None)
    return Character(
        name=_text(fields.get("name")).strip(),
        greeting=_text(fields.get("first_mes")),
        context=build_context(
            _text(fields.get("description")), _text(fields.get("personality")), _text(fields.get("scenario"))
        ),
        example_dialogue=_text(fields.get("mes_example")),
        alternate_greetings=_text_list(fields.get("alternate_greetings")),
        card=extras,
    )


def character_to_card(character: Character) -> dict[str, Any]:
    """A chara_card_v2 dict for `character` (with v1 fields on top for old readers).

    When the character came from a card and its context is still what that card's
    description/personality/scenario make, those three are written back unchanged;
    after an edit the whole context becomes the description.
    """
    extras = dict(character.card)
    original = tuple(_text(extras.get(key)) for key in ("description", "personality", "scenario"))
    if any(original) and build_context(*original).strip() == character.context.strip():
        description, personality, scenario = original
    else:
        description, personality, scenario = character.context, "", ""
    data: dict[str, Any] = {
        "name": character.name,
        "description": description,
        "personality": personality,
        "scenario": scenario,
        "first_mes": character.greeting,
        "mes_example": character.example_dialogue,
        "alternate_greetings": list(character.alternate_greetings),
    }
    for key, empty in _V2_DEFAULTS.items():
        value = extras.get(key, empty)
        data[key] = value if isinstance(value, type(empty)) else empty
    for key, value in extras.items():
        data.setdefault(key, value)
    v1 = {key: data[key] for key in ("name", "description", "personality", "scenario", "first_mes", "mes_example")}
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": data, **v1}


# ---------------------------------------------------------------- writing


def write_card_png(card: dict[str, Any], image: bytes | None) -> bytes:
    """`image` with `card` in a `chara` tEXt chunk (base64 of UTF-8 JSON) before IEND.

    Any card chunk already there (chara or ccv3, in any text-chunk kind) is removed, so
    readers cannot pick up a stale one. When `image` is None or not a readable PNG, a
    plain placeholder picture is used instead.
    """
    chunks = None
    if image is not None:
        try:
            chunks = png_chunks(image)
        except InvalidRequestError:
            chunks = None
    if chunks is None:
        chunks = png_chunks(placeholder_png())
    kept = [(kind, payload) for kind, payload in chunks if not _is_card_chunk(kind, payload)]
    # default=str: a hand-edited YAML can turn a card value into a date, which JSON lacks.
    encoded = base64.b64encode(json.dumps(card, ensure_ascii=False, default=str).encode("utf-8"))
    kept.insert(len(kept) - 1, (b"tEXt", b"chara\0" + encoded))
    return build_png(kept)


def placeholder_png(size: tuple[int, int] = PLACEHOLDER_SIZE, rgb: tuple[int, int, int] = PLACEHOLDER_RGB) -> bytes:
    """A solid-colour 8-bit RGB PNG (a few hundred bytes once compressed)."""
    width, height = size
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\0" + bytes(rgb) * width  # filter type 0 (None) before each scanline
    pixels = zlib.compress(row * height, 9)
    return build_png([(b"IHDR", header), (b"IDAT", pixels), (b"IEND", b"")])


def image_to_png(data: bytes) -> bytes:
    """`data` as PNG bytes: a PNG is returned as is, other formats are converted.

    InvalidRequestError when the bytes are not an image Pillow can read. Pillow is
    imported here because only a JPEG/WebP/GIF picture needs it.
    """
    if data.startswith(PNG_SIGNATURE):
        png_chunks(data)  # refuse a truncated PNG now rather than store it
        return data
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            converted = img if img.mode in ("RGB", "RGBA", "L", "LA", "P") else img.convert("RGBA")
            out = io.BytesIO()
            converted.save(out, format="PNG")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise InvalidRequestError(f"the picture is not an image that can be read: {error}", param="picture") from error
    return out.getvalue()
