"""Character and persona stores: YAML files, pictures, card import/export, and unsafe names."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image, PngImagePlugin

from modules.chat import cards
from modules.chat.characters import (
    DEFAULT_CHARACTER,
    FALLBACK_IMPORT_NAME,
    CharacterStore,
    PersonaStore,
    default_assistant,
    safe_import_name,
)
from modules.chat.types import Character, Persona
from modules.core.errors import InvalidRequestError, UnsafePathError
from modules.core.paths import check_name
from tests.traversal_payloads import TRAVERSAL_PAYLOADS

REPO = Path(__file__).resolve().parent.parent
CARD = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Seraphina",
        "description": "A kind forest guardian.",
        "personality": "gentle",
        "scenario": "A quiet glade.",
        "first_mes": "*smiles* Welcome, {{user}}.",
        "mes_example": "<START>\n{{user}}: Hi\n{{char}}: Hello!",
        "alternate_greetings": ["Back again?"],
        "tags": ["fantasy"],
        "creator": "me",
        "extensions": {"world": "glade"},
    },
}


@pytest.fixture
def store(tmp_path: Path) -> CharacterStore:
    return CharacterStore(tmp_path / "root" / "characters")


@pytest.fixture
def personas(tmp_path: Path) -> PersonaStore:
    return PersonaStore(tmp_path / "root" / "personas")


def image_bytes(size=(32, 48), fmt="PNG", color="navy") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=fmt)
    return out.getvalue()


def pillow_card(card: dict, size=(32, 48)) -> bytes:
    """A card PNG made the way other tools do it: Pillow's PngInfo with a tEXt `chara` chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text("chara", base64.b64encode(json.dumps(card).encode()).decode())
    out = io.BytesIO()
    Image.new("RGB", size, "olive").save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*")}


# ---------------------------------------------------------------- YAML files


def test_save_and_load_round_trip_with_block_style(store):
    character = Character(name="Nova", greeting="Hi {{user}}!\nWelcome aboard.", context="Line one.\nLine two.",
                          example_dialogue="<START>\n{{user}}: a\n{{char}}: b", alternate_greetings=["Yo"],
                          card={"tags": ["x"], "extensions": {"a": 1}})
    path = store.save(character)
    assert path == store.folder.resolve() / "Nova.yaml"
    text = path.read_text(encoding="utf-8")
    assert "context: |-\n  Line one.\n  Line two." in text
    assert yaml.safe_load(text)["name"] == "Nova"
    loaded = store.load("Nova")
    assert loaded == character
    assert store.list() == ["Assistant", "Nova"]
    assert [p.name for p in store.folder.iterdir()] == ["Nova.yaml"]  # no temp files left


@pytest.mark.parametrize("text", ["trailing space \nx", "  indented first\nx", "x\r\ny", "x\x85y\nz",
                                  "\u2028sep\nx", "\n\nblank lines\n\n", "- a\n- b", "yes", "", "emoji 😀\nü"])
def test_awkward_text_round_trips(store, text):
    character = Character(name="Odd", greeting=text, context=text, alternate_greetings=[text], card={"k": text})
    store.save(character)
    assert store.load("Odd") == character


def test_a_hand_edited_date_in_the_card_still_exports(store):
    store.folder.mkdir(parents=True)
    (store.folder / "Dated.yaml").write_text("name: Dated\ncard:\n  creation_date: 2024-01-31\n")
    assert cards.read_card_png(store.export_png("Dated"))["data"]["creation_date"] == "2024-01-31"


def test_list_sorts_case_insensitively_and_skips_other_files(store):
    store.folder.mkdir(parents=True)
    for name in ("zed.yaml", "Alpha.yml", "beta.yaml", "notes.txt", "pic.png", ".hidden.yaml"):
        (store.folder / name).write_text("name: x\n")
    (store.folder / "sub.yaml").mkdir()
    assert store.list() == ["Alpha", "Assistant", "beta", "zed"]
    assert store.load("Alpha").name == "Alpha"


def test_missing_folder_still_lists_and_loads_the_assistant(store):
    assert store.list() == ["Assistant"]
    assert store.load("Assistant") == default_assistant()
    with pytest.raises(InvalidRequestError, match="no character named 'Nobody'"):
        store.load("Nobody")


def test_ooba_older_keys_are_read(store):
    store.folder.mkdir(parents=True)
    (store.folder / "Old.yaml").write_text(
        "char_name: Olde\nchar_greeting: Greetings!\nchar_persona: Wise and old.\n"
        "world_scenario: A tavern.\nexample_dialogue: 'You: hi'\n"
    )
    character = store.load("Old")
    assert character.greeting == "Greetings!"
    assert character.context == "Olde's Persona: Wise and old.\nScenario: A tavern."
    assert character.example_dialogue == "You: hi"


def test_broken_yaml_still_lists_and_gives_a_clear_error(store):
    store.folder.mkdir(parents=True)
    (store.folder / "Good.yaml").write_text("name: Good\ngreeting: hi\n")
    (store.folder / "Broken.yaml").write_text("name: [unclosed\ncontext: : :\n")
    (store.folder / "List.yaml").write_text("- just\n- a list\n")
    (store.folder / "Typed.yaml").write_text("name: T\ncontext: {a: 1}\n")
    (store.folder / "Binary.yaml").write_bytes(b"\xff\xfe\x00junk")
    assert store.list() == ["Assistant", "Binary", "Broken", "Good", "List", "Typed"]
    assert store.load("Good").greeting == "hi"
    for name, words in (("Broken", "not valid YAML"), ("List", "mapping"), ("Typed", "'context' must be text"),
                        ("Binary", "not UTF-8")):
        with pytest.raises(InvalidRequestError, match=words) as caught:
            store.load(name)
        assert f"characters/{name}.yaml" in str(caught.value)
        assert not isinstance(caught.value, UnsafePathError)


def test_assistant_exists_even_when_its_file_is_deleted(store):
    store.save(Character(name="Assistant", greeting="custom"))
    assert store.load("Assistant").greeting == "custom"
    store.delete("Assistant")
    assert store.load("Assistant") == default_assistant()
    assert "Assistant" in store.list()
    with pytest.raises(InvalidRequestError, match="built-in"):
        store.delete("Assistant")


def test_saving_keeps_an_existing_yml_file(store):
    store.folder.mkdir(parents=True)
    (store.folder / "Y.yml").write_text("name: Y\n")
    store.save(Character(name="Y", greeting="new"))
    assert sorted(p.name for p in store.folder.iterdir()) == ["Y.yml"]
    assert store.load("Y").greeting == "new"


# ---------------------------------------------------------------- pictures


def test_picture_is_saved_as_png_and_found(store):
    store.save(Character(name="Pic"), image_bytes())
    character = store.load("Pic")
    assert character.picture == store.folder.resolve() / "Pic.png"
    with Image.open(character.picture) as img:
        assert img.size == (32, 48)


def test_jpeg_picture_is_found_and_replaced_by_a_converted_png(store):
    store.save(Character(name="J"))
    (store.folder / "J.jpg").write_bytes(image_bytes(fmt="JPEG"))
    assert store.load("J").picture.name == "J.jpg"
    store.save(store.load("J"), image_bytes(fmt="JPEG", color="red"))
    assert sorted(p.name for p in store.folder.iterdir()) == ["J.png", "J.yaml"]
    assert store.load("J").picture.read_bytes().startswith(cards.PNG_SIGNATURE)


def test_saving_with_bytes_that_are_not_an_image_writes_nothing(store):
    with pytest.raises(InvalidRequestError, match="not an image"):
        store.save(Character(name="Bad"), b"hello")
    assert not store.folder.exists() or not any(store.folder.iterdir())


def test_save_as_copies_the_picture_but_never_from_outside(store, tmp_path):
    store.save(Character(name="First"), image_bytes())
    copy = store.load("First")
    copy.name = "Second"
    store.save(copy)
    assert store.load("Second").picture.name == "Second.png"
    outside = tmp_path / "secret.png"
    outside.write_bytes(image_bytes())
    store.save(Character(name="Third", picture=outside))
    assert store.load("Third").picture is None


def test_delete_removes_yaml_and_picture(store):
    store.save(Character(name="Gone"), image_bytes())
    store.delete("Gone")
    assert store.list() == ["Assistant"]
    assert not any(store.folder.iterdir())
    with pytest.raises(InvalidRequestError):
        store.delete("Gone")


# ---------------------------------------------------------------- import / export


@pytest.mark.parametrize("maker", ["ours", "pillow"])
def test_png_card_imports_with_its_fields(store, maker):
    png = cards.write_card_png(CARD, image_bytes()) if maker == "ours" else pillow_card(CARD)
    character = store.import_file("seraphina.png", png)
    assert character.name == "Seraphina"
    assert character.greeting == CARD["data"]["first_mes"]
    assert character.card["description"] == "A kind forest guardian."
    assert character.context.startswith("A kind forest guardian.\n{{char}}'s personality: gentle")
    picture = store.folder / "Seraphina.png"
    assert character.picture == picture.resolve()
    assert cards.png_chunks(picture.read_bytes())  # a valid PNG...
    with pytest.raises(InvalidRequestError, match="no character card"):
        cards.read_card_png(picture.read_bytes())  # ...without the card in it
    assert store.load("Seraphina") == character


def test_export_then_import_round_trips(store):
    store.import_file("card.png", pillow_card(CARD, size=(50, 70)))
    exported = store.export_png("Seraphina")
    with Image.open(io.BytesIO(exported)) as img:
        assert img.size == (50, 70)  # the character's own picture, not the placeholder
    again = store.import_file("card.png", exported)
    assert again.name == "Seraphina (2)"
    data = cards.read_card_png(exported)["data"]
    for key in ("description", "personality", "scenario", "first_mes", "mes_example", "alternate_greetings",
                "tags", "creator", "extensions"):
        assert data[key] == CARD["data"][key], key
    first, second = store.load("Seraphina"), store.load("Seraphina (2)")
    assert (second.greeting, second.context, second.example_dialogue) == (first.greeting, first.context,
                                                                         first.example_dialogue)
    assert second.alternate_greetings == ["Back again?"] and second.card["tags"] == ["fantasy"]


def test_export_without_picture_uses_the_placeholder(store):
    exported = store.export_png("Assistant")
    card = cards.read_card_png(exported)
    assert card["data"]["name"] == "Assistant" and card["data"]["first_mes"] == default_assistant().greeting
    with Image.open(io.BytesIO(exported)) as img:
        assert img.size == cards.PLACEHOLDER_SIZE


def test_export_converts_a_jpeg_picture(store):
    store.save(Character(name="J"))
    (store.folder / "J.jpeg").write_bytes(image_bytes(size=(30, 40), fmt="JPEG"))
    with Image.open(io.BytesIO(store.export_png("J"))) as img:
        assert img.size == (30, 40)


def test_v1_and_v3_and_json_cards_import(store):
    v1 = {"name": "Vee", "description": "d", "personality": "p", "scenario": "s", "first_mes": "hi",
          "mes_example": "ex"}
    assert store.import_file("v1.png", pillow_card(v1)).greeting == "hi"
    v3 = {"spec": "chara_card_v3", "spec_version": "3.0", "data": {**CARD["data"], "name": "Three",
                                                                   "nickname": "Tri"}}
    three = store.import_file("three.png", cards.write_card_png(v3, None))
    assert three.name == "Three" and three.card["nickname"] == "Tri"
    from_json = store.import_file("sera.json", b"\xef\xbb\xbf" + json.dumps(CARD).encode())
    assert from_json.name == "Seraphina" and from_json.picture is None
    assert store.list() == ["Assistant", "Seraphina", "Three", "Vee"]


def test_yaml_and_ooba_json_import(store):
    ours = store.import_file("nova.yaml", b"name: Nova\ngreeting: hi\ncontext: c\n")
    assert (ours.name, ours.greeting, ours.context) == ("Nova", "hi", "c")
    nameless = store.import_file("Fallback Name.yml", b"greeting: hey\n")
    assert nameless.name == "Fallback Name"
    pyg = store.import_file("p.json", json.dumps({"char_name": "Pyg", "char_greeting": "yo",
                                                  "char_persona": "calm"}).encode())
    assert (pyg.name, pyg.greeting, pyg.context) == ("Pyg", "yo", "Pyg's Persona: calm")


def test_name_collisions_get_a_numbered_suffix(store):
    store.save(Character(name="seraphina", greeting="mine"))
    names = [store.import_file("x.png", pillow_card(CARD)).name for _ in range(3)]
    assert names == ["Seraphina (2)", "Seraphina (3)", "Seraphina (4)"]
    assert store.load("seraphina").greeting == "mine"
    assert store.import_file("a.json", json.dumps({**CARD, "data": {**CARD["data"], "name": "Assistant"}})
                             .encode()).name == "Assistant (2)"


@pytest.mark.parametrize("case", ["not a card png", "garbage", "charx", "bad json"])
def test_bad_imports_give_clear_errors_and_write_nothing(store, case):
    data = {"not a card png": image_bytes(), "garbage": b"\x00\x01\x02: [", "charx": b"PK\x03\x04rest",
            "bad json": b'{"name": '}[case]
    with pytest.raises(InvalidRequestError):
        store.import_file("upload", data)
    assert store.list() == ["Assistant"]


@pytest.mark.parametrize("payload", TRAVERSAL_PAYLOADS)
def test_unsafe_card_names_import_under_a_safe_name(store, tmp_path, payload):
    card = {**CARD, "data": {**CARD["data"], "name": payload}}
    character = store.import_file("evil.png", cards.write_card_png(card, None))
    check_name(character.name)
    assert (store.folder / f"{character.name}.yaml").is_file()
    outside = files_under(tmp_path) - files_under(store.folder)
    assert outside == {tmp_path / "root", store.folder}


def test_safe_import_name_examples():
    assert safe_import_name("AC/DC") == "AC_DC"
    assert safe_import_name("../../x") == "_.._x"
    assert safe_import_name("CON") == "_CON"
    assert safe_import_name(" . ") == FALLBACK_IMPORT_NAME
    assert safe_import_name("Dr. Who?") == "Dr. Who_"  # ? < > " | * are refused on Windows
    assert safe_import_name("a\nb\tc") == "a_b_c"


# ---------------------------------------------------------------- unsafe names everywhere


def _character_calls(store: CharacterStore, name: str):
    return {
        "load": lambda: store.load(name),
        "save": lambda: store.save(Character(name=name, greeting="x"), cards.placeholder_png()),
        "delete": lambda: store.delete(name),
        "export_png": lambda: store.export_png(name),
        "picture_path": lambda: store.picture_path(name),
        "yaml_path": lambda: store.yaml_path(name),
    }


def _persona_calls(personas: PersonaStore, name: str):
    return {
        "persona load": lambda: personas.load(name),
        "persona save": lambda: personas.save(Persona(name=name, description="x")),
        "persona delete": lambda: personas.delete(name),
    }


@pytest.mark.parametrize("payload", TRAVERSAL_PAYLOADS)
def test_every_name_taking_call_refuses_every_payload(store, personas, tmp_path, payload):
    store.save(Character(name="Keep"), image_bytes())
    personas.save(Persona(name="Keep"))
    before = files_under(tmp_path)
    calls = {**_character_calls(store, payload), **_persona_calls(personas, payload)}
    for label, call in calls.items():
        with pytest.raises(UnsafePathError):
            call()
            pytest.fail(f"{label} accepted {payload!r}")
    assert files_under(tmp_path) == before


def test_symlinks_out_of_the_folder_are_refused(store, personas, tmp_path):
    secret = tmp_path / "secret.yaml"
    secret.write_text("name: Secret\ngreeting: leaked\n")
    store.folder.mkdir(parents=True)
    (store.folder / "Link.yaml").symlink_to(secret)
    (store.folder / "Pic.yaml").write_text("name: Pic\n")
    (store.folder / "Pic.png").symlink_to(tmp_path / "outside.png")
    (tmp_path / "outside.png").write_bytes(image_bytes())
    assert store.list() == ["Assistant", "Pic"]
    for call in (lambda: store.load("Link"), lambda: store.delete("Link"), lambda: store.export_png("Link"),
                 lambda: store.save(Character(name="Link")), lambda: store.load("Pic"),
                 lambda: store.export_png("Pic"), lambda: store.delete("Pic")):
        with pytest.raises(UnsafePathError):
            call()
    assert secret.read_text() == "name: Secret\ngreeting: leaked\n"
    assert (tmp_path / "outside.png").is_file() and (store.folder / "Pic.yaml").is_file()
    personas.folder.mkdir(parents=True)
    (personas.folder / "P.yaml").symlink_to(secret)
    assert personas.list() == ["You"]
    with pytest.raises(UnsafePathError):
        personas.load("P")


def test_a_symlink_inside_the_folder_is_fine(store):
    store.save(Character(name="Real", greeting="hi"))
    (store.folder / "Alias.yaml").symlink_to(store.folder / "Real.yaml")
    assert store.load("Alias").greeting == "hi"


# ---------------------------------------------------------------- personas


def test_persona_store(personas):
    assert personas.list() == ["You"]
    assert personas.load("You") == Persona()
    path = personas.save(Persona(name="Sam", description="A curious student.\nLikes maps."))
    assert "description: |-" in path.read_text()
    assert personas.load("Sam") == Persona(name="Sam", description="A curious student.\nLikes maps.")
    assert personas.list() == ["Sam", "You"]
    personas.delete("Sam")
    with pytest.raises(InvalidRequestError, match="no persona named"):
        personas.load("Sam")
    with pytest.raises(InvalidRequestError):
        personas.delete("Sam")


def test_broken_persona_gives_a_clear_error(personas):
    personas.folder.mkdir(parents=True)
    (personas.folder / "Bad.yaml").write_text("description: [\n")
    assert personas.list() == ["Bad", "You"]
    with pytest.raises(InvalidRequestError, match="personas/Bad.yaml"):
        personas.load("Bad")


# ---------------------------------------------------------------- shipped files (read-only)


def test_shipped_characters_load():
    shipped = CharacterStore(REPO / "characters")
    names = shipped.list()
    assert DEFAULT_CHARACTER in names and len(names) >= 3
    for name in names:
        character = shipped.load(name)
        assert character.name == name and character.greeting.strip() and character.context.strip()
    assert shipped.load(DEFAULT_CHARACTER) == default_assistant()  # the file and the fallback agree
    for name in set(names) - {DEFAULT_CHARACTER}:
        example = shipped.load(name).example_dialogue
        assert "<START>" in example and "{{user}}:" in example and "{{char}}:" in example


def test_shipped_persona_loads():
    assert PersonaStore(REPO / "personas").load("You") == Persona(name="You", description="")
