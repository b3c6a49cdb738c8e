"""TavernAI / SillyTavern cards: PNG chunks, v1/v2/v3 fields, and the errors for bad files."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import pytest
from PIL import Image, PngImagePlugin

from modules.chat import cards
from modules.chat.types import Character
from modules.core.errors import InvalidRequestError

V2_CARD = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Seraphina",
        "description": "A kind forest guardian who tends the glade.",
        "personality": "gentle, wise, protective",
        "scenario": "{{user}} wakes up in Seraphina's cottage.",
        "first_mes": "*Seraphina smiles.* You're awake, {{user}}.",
        "mes_example": "<START>\n{{user}}: Where am I?\n{{char}}: Somewhere safe.",
        "creator_notes": "Be nice.",
        "system_prompt": "Write in third person.",
        "post_history_instructions": "Stay in character.",
        "alternate_greetings": ["Hello again, {{user}}.", "The rain has stopped."],
        "tags": ["fantasy", "wholesome"],
        "creator": "someone",
        "character_version": "1.2",
        "extensions": {"talkativeness": "0.5", "depth_prompt": {"prompt": "x", "depth": 4}},
    },
}


def b64(card: dict) -> str:
    return base64.b64encode(json.dumps(card).encode("utf-8")).decode("ascii")


def pillow_png(size: tuple[int, int] = (64, 96), info=None, color: str = "teal") -> bytes:
    """A PNG written by Pillow, optionally with text chunks, as other tools write cards."""
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def chunk_keywords(png: bytes) -> list[tuple[bytes, str]]:
    return [(kind, payload.split(b"\0")[0].decode("latin-1"))
            for kind, payload in cards.png_chunks(png) if kind in (b"tEXt", b"zTXt", b"iTXt")]


# ---------------------------------------------------------------- reading PNGs


def test_our_writer_makes_a_card_that_reads_back_and_pillow_sees():
    png = cards.write_card_png(V2_CARD, pillow_png())
    assert cards.read_card_png(png) == V2_CARD
    with Image.open(io.BytesIO(png)) as img:
        img.load()
        assert img.size == (64, 96)
        assert json.loads(base64.b64decode(img.text["chara"])) == V2_CARD
    assert cards.png_chunks(png)[-2][0] == b"tEXt" and cards.png_chunks(png)[-1][0] == b"IEND"


@pytest.mark.parametrize("kind", ["tEXt", "zTXt", "iTXt"])
def test_cards_written_by_pillow_read(kind):
    info = PngImagePlugin.PngInfo()
    if kind == "iTXt":
        info.add_itxt("chara", b64(V2_CARD), zip=True)
    else:
        info.add_text("chara", b64(V2_CARD), zip=kind == "zTXt")
    png = pillow_png(info=info)
    assert (kind.encode(), "chara") in chunk_keywords(png)
    assert cards.read_card_png(png) == V2_CARD


def test_v3_chunk_is_preferred_and_v2_used_when_v3_is_broken():
    v3 = {"spec": "chara_card_v3", "spec_version": "3.0", "data": {**V2_CARD["data"], "name": "Three"}}
    info = PngImagePlugin.PngInfo()
    info.add_text("chara", b64(V2_CARD))
    info.add_text("ccv3", b64(v3))
    assert cards.read_card_png(pillow_png(info=info))["data"]["name"] == "Three"
    broken = PngImagePlugin.PngInfo()
    broken.add_text("chara", b64(V2_CARD))
    broken.add_text("ccv3", "!!!not base64!!!")
    assert cards.read_card_png(pillow_png(info=broken)) == V2_CARD


def test_raw_json_and_unpadded_base64_are_accepted():
    info = PngImagePlugin.PngInfo()
    info.add_text("chara", json.dumps(V2_CARD))
    assert cards.read_card_png(pillow_png(info=info)) == V2_CARD
    info = PngImagePlugin.PngInfo()
    info.add_text("chara", b64(V2_CARD).rstrip("="))
    assert cards.read_card_png(pillow_png(info=info)) == V2_CARD


def _png_with_chara(text: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("chara", text)
    return pillow_png(info=info)


def _bad_png(case: str) -> bytes:
    good = cards.write_card_png(V2_CARD, pillow_png())
    return {
        "gif": b"GIF89a not a png",
        "empty": b"",
        "no-card": pillow_png(),
        "corrupt-base64": _png_with_chara("@@@@ this is not base64 @@@@"),
        "bad-json": _png_with_chara(base64.b64encode(b'{"name": "x",').decode()),
        "json-list": _png_with_chara(base64.b64encode(b'["x"]').decode()),
        "not-utf8": _png_with_chara(base64.b64encode(b'{"name": "\xff"}').decode()),
        "truncated": good[: len(good) // 2],
        "truncated-header": good[:12],
        "no-iend": good[: -12],
    }[case]


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("gif", "not a PNG"),
        ("empty", "not a PNG"),
        ("no-card", "no character card"),
        ("corrupt-base64", "base64"),
        ("bad-json", "not valid JSON"),
        ("json-list", "not an object"),
        ("not-utf8", "UTF-8"),
        ("truncated", "truncated"),
        ("truncated-header", "truncated"),
        ("no-iend", "truncated"),
    ],
)
def test_bad_pngs_give_clear_errors(case, words):
    with pytest.raises(InvalidRequestError, match=words) as caught:
        cards.read_card_png(_bad_png(case))
    assert caught.value.param == "file"


def test_a_compressed_chunk_larger_than_the_cap_is_refused(monkeypatch):
    monkeypatch.setattr(cards, "MAX_CARD_BYTES", 1000)
    info = PngImagePlugin.PngInfo()
    info.add_text("chara", b64({"name": "x" * 5000}), zip=True)
    with pytest.raises(InvalidRequestError, match="damaged"):
        cards.read_card_png(pillow_png(info=info))


def test_read_card_json():
    assert cards.read_card_json(b"\xef\xbb\xbf" + json.dumps(V2_CARD).encode()) == V2_CARD
    for bad in (b"{nope", b"[1, 2]", b"\xff\xfe"):
        with pytest.raises(InvalidRequestError):
            cards.read_card_json(bad)


# ---------------------------------------------------------------- writing PNGs


def test_writing_replaces_existing_card_chunks_of_any_kind():
    info = PngImagePlugin.PngInfo()
    info.add_text("chara", b64({"name": "old"}))
    info.add_text("ccv3", b64({"name": "older"}), zip=True)
    info.add_itxt("chara", b64({"name": "oldest"}))
    info.add_text("Software", "paint")
    png = cards.write_card_png(V2_CARD, pillow_png(info=info))
    assert chunk_keywords(png) == [(b"tEXt", "Software"), (b"tEXt", "chara")]
    assert cards.read_card_png(png) == V2_CARD


@pytest.mark.parametrize("image", [None, b"", b"\xff\xd8\xff not a png", b"\x89PNG\r\n\x1a\n truncated"])
def test_missing_or_unusable_image_gets_a_placeholder(image):
    png = cards.write_card_png({"name": "Ünïcødé ✓"}, image)
    assert cards.read_card_png(png) == {"name": "Ünïcødé ✓"}
    with Image.open(io.BytesIO(png)) as img:
        img.load()
        assert img.size == cards.PLACEHOLDER_SIZE
        assert img.getpixel((10, 10)) == cards.PLACEHOLDER_RGB


def test_placeholder_is_small_and_valid():
    png = cards.placeholder_png()
    assert len(png) < 5000
    width, height = struct.unpack(">II", cards.png_chunks(png)[0][1][:8])
    assert (width, height) == (400, 600)
    assert [kind for kind, _ in cards.png_chunks(png)] == [b"IHDR", b"IDAT", b"IEND"]
    pos = len(cards.PNG_SIGNATURE)
    while pos < len(png):  # every CRC is right (Pillow checks them too, in the test above)
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        body = png[pos + 4 : pos + 8 + length]
        assert struct.unpack(">I", png[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(body)
        pos += 12 + length


def test_image_to_png_converts_and_refuses():
    out = io.BytesIO()
    Image.new("RGB", (20, 30), "red").save(out, format="JPEG")
    png = cards.image_to_png(out.getvalue())
    assert png.startswith(cards.PNG_SIGNATURE)
    with Image.open(io.BytesIO(png)) as img:
        assert img.size == (20, 30)
    with pytest.raises(InvalidRequestError):
        cards.image_to_png(b"plain text, not a picture")
    with pytest.raises(InvalidRequestError):
        cards.image_to_png(pillow_png()[:40])


# ---------------------------------------------------------------- card <-> Character


def test_v2_card_to_character():
    character = cards.card_to_character(V2_CARD)
    assert character.name == "Seraphina"
    assert character.greeting == V2_CARD["data"]["first_mes"]
    assert character.example_dialogue == V2_CARD["data"]["mes_example"]
    assert character.alternate_greetings == V2_CARD["data"]["alternate_greetings"]
    assert character.context == (
        "A kind forest guardian who tends the glade.\n"
        "{{char}}'s personality: gentle, wise, protective\n"
        "Scenario: {{user}} wakes up in Seraphina's cottage."
    )
    for key in ("description", "personality", "scenario", "system_prompt", "post_history_instructions",
                "creator_notes", "tags", "creator", "character_version", "extensions"):
        assert character.card[key] == V2_CARD["data"][key]
    assert "first_mes" not in character.card and "name" not in character.card


def test_v1_card_to_character():
    v1 = {"name": "Old", "description": "desc", "personality": "", "scenario": "sc",
          "first_mes": "hi", "mes_example": "ex", "create_date": "2023-1-1"}
    character = cards.card_to_character(v1)
    assert (character.name, character.greeting, character.example_dialogue) == ("Old", "hi", "ex")
    assert character.context == "desc\nScenario: sc"
    assert character.card["create_date"] == "2023-1-1"


def test_v3_card_keeps_its_extras():
    v3 = {"spec": "chara_card_v3", "spec_version": "3.0",
          "data": {**V2_CARD["data"], "nickname": "Sera", "group_only_greetings": ["Hi all"],
                   "assets": [{"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"}],
                   "creation_date": 1700000000}}
    character = cards.card_to_character(v3)
    assert character.name == "Seraphina"
    assert character.card["nickname"] == "Sera"
    data = cards.character_to_card(character)["data"]
    assert data["nickname"] == "Sera" and data["group_only_greetings"] == ["Hi all"]
    assert data["assets"][0]["uri"] == "ccdefault:" and data["creation_date"] == 1700000000


def test_null_and_odd_values_are_tolerated():
    character = cards.card_to_character({"data": {"name": None, "first_mes": None, "description": 42,
                                                  "alternate_greetings": "only one"}})
    assert (character.name, character.greeting, character.context) == ("", "", "42")
    assert character.alternate_greetings == ["only one"]


def test_character_to_card_round_trips_every_field():
    card = cards.character_to_card(cards.card_to_character(V2_CARD))
    assert card["spec"] == "chara_card_v2" and card["spec_version"] == "2.0"
    assert card["data"] == V2_CARD["data"]
    assert card["name"] == "Seraphina" and card["first_mes"] == V2_CARD["data"]["first_mes"]


def test_an_edited_context_becomes_the_description():
    character = cards.card_to_character(V2_CARD)
    character.context += "\nShe loves tea."
    data = cards.character_to_card(character)["data"]
    assert data["description"] == character.context
    assert data["personality"] == "" and data["scenario"] == ""
    assert cards.card_to_character(cards.character_to_card(character)).context == character.context


def test_a_plain_character_becomes_a_v2_card():
    character = Character(name="Plain", greeting="Hi", context="Ctx", example_dialogue="Ex")
    data = cards.character_to_card(character)["data"]
    assert (data["description"], data["first_mes"], data["mes_example"]) == ("Ctx", "Hi", "Ex")
    assert data["tags"] == [] and data["extensions"] == {} and data["alternate_greetings"] == []
