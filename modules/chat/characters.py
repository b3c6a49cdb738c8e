"""Characters and personas stored as YAML files, and card import/export.

characters/NAME.yaml holds ooba's keys (`name`, `greeting`, `context`) plus
`example_dialogue`, `alternate_greetings` and `card` (the extra fields of an imported
TavernAI card, kept so an export loses nothing); NAME.png/.jpg/.jpeg/.webp beside it is
the picture. personas/NAME.yaml holds `name` and `description`. The file stem is the
name: it is what chats refer to and what the prompt calls the speaker.

Every name goes through modules.core.paths.safe_join before it touches the disk, and every
write is atomic (temp file, then rename).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from modules.chat import cards
from modules.chat.types import Character, Persona
from modules.core.errors import InvalidRequestError, NotFoundError, UnsafePathError
from modules.core.paths import MAX_NAME_LENGTH, atomic_write_bytes, atomic_write_text, check_name, safe_join
from modules.core.safe_yaml import check_size, load_yaml

YAML_SUFFIXES = (".yaml", ".yml")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_CHARACTER = "Assistant"
DEFAULT_PERSONA = "You"
FALLBACK_IMPORT_NAME = "Imported character"


def default_assistant() -> Character:
    """The built-in Assistant, used when characters/Assistant.yaml is missing."""
    return Character(
        name=DEFAULT_CHARACTER,
        greeting="How can I help you today?",
        context=(
            "The following is a conversation between {{user}} and {{char}}, a helpful AI assistant. "
            "{{char}} answers questions accurately and clearly, explains its reasoning when that helps, "
            "asks when a request is ambiguous, and says so plainly when it does not know something."
        ),
    )


# ---------------------------------------------------------------- YAML helpers


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings as `|` blocks so the files stay easy to edit by hand."""


# PyYAML writes these as is (allow_unicode) in block, plain and single-quoted scalars and
# then reads them back as line breaks; only double quotes escape them.
_ODD_BREAKS = ("\r", "\x85", "\u2028", "\u2029", "\ufeff")


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = None  # PyYAML's own choice, which quotes where a block cannot be used
    if any(mark in value for mark in _ODD_BREAKS):
        style = '"'
    elif "\n" in value:
        style = "|"
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _represent_str)


def dump_yaml(data: dict[str, Any]) -> str:
    """YAML text for `data`: keys in the given order, Unicode as is, block multi-line text."""
    return yaml.dump(data, Dumper=_BlockDumper, sort_keys=False, allow_unicode=True, width=10_000)


def _parse_yaml(text: bytes, shown: str) -> dict[str, Any]:
    """A mapping from YAML bytes; InvalidRequestError naming `shown` when it is not one
    (or when it is too large, nests too deep or uses anchors: see modules.core.safe_yaml)."""
    check_size(len(text), shown, param="file")
    try:
        data = load_yaml(text.decode("utf-8-sig"), shown, param="file")
    except UnicodeDecodeError as error:
        raise InvalidRequestError(f"{shown} is not UTF-8 text: {error}", param="file") from error
    except yaml.YAMLError as error:
        raise InvalidRequestError(f"{shown} is not valid YAML: {error}", param="file") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidRequestError(f"{shown} must hold a mapping of keys, not {type(data).__name__}", param="file")
    return data


def _field_text(data: dict[str, Any], key: str, shown: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        raise InvalidRequestError(f"{shown}: {key!r} must be text", param="file")
    return value if isinstance(value, str) else str(value)


def _legacy_context(data: dict[str, Any], shown: str) -> str:
    """ooba's old Pygmalion-style keys (char_persona, world_scenario) as a context."""
    name = _field_text(data, "char_name", shown) or _field_text(data, "name", shown) or "{{char}}"
    parts = []
    if persona := _field_text(data, "char_persona", shown).strip():
        parts.append(f"{name}'s Persona: {persona}")
    if scenario := _field_text(data, "world_scenario", shown).strip():
        parts.append(f"Scenario: {scenario}")
    return "\n".join(parts)


def character_from_mapping(data: dict[str, Any], name: str, shown: str) -> Character:
    """A Character named `name` (its file stem) from a parsed ooba-style YAML mapping.

    Accepts today's keys and ooba's older ones (char_greeting, char_persona,
    world_scenario). `shown` names the file in errors.
    """
    greeting = _field_text(data, "greeting", shown) or _field_text(data, "char_greeting", shown)
    context = _field_text(data, "context", shown) if "context" in data else _legacy_context(data, shown)
    alternates = data.get("alternate_greetings") or []
    if not isinstance(alternates, list):
        raise InvalidRequestError(f"{shown}: 'alternate_greetings' must be a list", param="file")
    card = data.get("card") or {}
    if not isinstance(card, dict):
        raise InvalidRequestError(f"{shown}: 'card' must be a mapping", param="file")
    return Character(
        name=name,
        greeting=greeting,
        context=context,
        example_dialogue=_field_text(data, "example_dialogue", shown),
        alternate_greetings=[str(item) for item in alternates if item is not None],
        card=card,
    )


def character_to_mapping(character: Character) -> dict[str, Any]:
    """The YAML mapping for `character` (empty optional keys left out)."""
    data: dict[str, Any] = {"name": character.name, "greeting": character.greeting, "context": character.context}
    if character.example_dialogue:
        data["example_dialogue"] = character.example_dialogue
    if character.alternate_greetings:
        data["alternate_greetings"] = list(character.alternate_greetings)
    if character.card:
        data["card"] = character.card
    return data


# ---------------------------------------------------------------- the folder


class _YamlFolder:
    """A folder of NAME.yaml / NAME.yml files, every name checked with safe_join."""

    what = "name"
    """How names are called in UnsafePathError messages."""
    noun = "file"
    """What one entry is called in "not found" messages."""
    default_name = ""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _path(self, name: str, suffix: str) -> Path:
        check_name(name, self.what)
        return safe_join(self.folder, name + suffix, what=self.what)

    def yaml_path(self, name: str) -> Path | None:
        """The existing file for `name` (.yaml before .yml), None when there is none."""
        for suffix in YAML_SUFFIXES:
            path = self._path(name, suffix)
            if path.is_file():
                return path
        return None

    def _target(self, name: str) -> Path:
        """Where `name` is written: its existing file, else NAME.yaml."""
        return self.yaml_path(name) or self._path(name, YAML_SUFFIXES[0])

    def _names_on_disk(self) -> Iterator[str]:
        if not self.folder.is_dir():
            return
        for entry in self.folder.iterdir():
            if entry.suffix not in YAML_SUFFIXES or entry.name.startswith("."):
                continue
            try:  # skip what load() would refuse: odd names, links out of the folder
                self._path(entry.stem, entry.suffix)
            except UnsafePathError:
                continue
            if entry.is_file():
                yield entry.stem

    def list(self) -> list[str]:
        """Names (file stems), sorted case-insensitively; the default is always there.

        Files are not parsed here, so one broken file never hides the others.
        """
        names = set(self._names_on_disk())
        if self.default_name:
            names.add(self.default_name)
        return sorted(names, key=lambda name: (name.casefold(), name))

    def _read(self, name: str) -> tuple[dict[str, Any], str] | None:
        """(parsed mapping, file name shown in errors) for `name`; None when no file exists."""
        path = self.yaml_path(name)
        if path is None:
            return None
        shown = f"{self.folder.name}/{path.name}"
        check_size(path.stat().st_size, shown, param="file")  # before reading it
        return _parse_yaml(path.read_bytes(), shown), shown

    def _missing(self, name: str) -> NotFoundError:
        return NotFoundError(f"there is no {self.noun} named {name!r} in {self.folder.name}/", param="name")

    def _delete(self, name: str, suffixes: tuple[str, ...]) -> bool:
        """Remove NAME+suffix for each suffix; whether any existed.

        Every path is checked before the first is removed, so a refused name (or a link
        out of the folder) leaves all of the entry's files in place.
        """
        existing = [path for path in (self._path(name, suffix) for suffix in suffixes) if path.is_file()]
        for path in existing:
            path.unlink()
        return bool(existing)


class PersonaStore(_YamlFolder):
    """Personas in personas/NAME.yaml (`name`, `description`). "You" always exists."""

    what = "persona name"
    noun = "persona"
    default_name = DEFAULT_PERSONA

    def load(self, name: str) -> Persona:
        """The persona `name`; InvalidRequestError when missing or broken, UnsafePathError for a bad name."""
        found = self._read(name)
        if found is None:
            if name == DEFAULT_PERSONA:
                return Persona(name=DEFAULT_PERSONA)
            raise self._missing(name)
        data, shown = found
        return Persona(name=name, description=_field_text(data, "description", shown))

    def save(self, persona: Persona) -> Path:
        """Write `persona` atomically as personas/NAME.yaml; returns the path."""
        path = self._target(persona.name)
        atomic_write_text(path, dump_yaml({"name": persona.name, "description": persona.description}))
        return path

    def delete(self, name: str) -> None:
        """Remove the persona's file; InvalidRequestError when there is none."""
        if not self._delete(name, YAML_SUFFIXES):
            raise self._missing(name)


class CharacterStore(_YamlFolder):
    """Characters in characters/NAME.yaml with an optional picture beside each.

    "Assistant" always exists: the built-in default is used when its file is missing.
    """

    what = "character name"
    noun = "character"
    default_name = DEFAULT_CHARACTER

    def picture_path(self, name: str) -> Path | None:
        """The character's picture (NAME.png, .jpg, .jpeg, .webp, in that order), or None."""
        for suffix in PICTURE_SUFFIXES:
            path = self._path(name, suffix)
            if path.is_file():
                return path
        return None

    def load(self, name: str) -> Character:
        """The character `name`, with its picture path when one exists.

        InvalidRequestError naming the file when the YAML is broken or missing,
        UnsafePathError for a name that would leave the folder.
        """
        found = self._read(name)
        if found is None:
            if name != DEFAULT_CHARACTER:
                raise self._missing(name)
            character = default_assistant()
        else:
            data, shown = found
            character = character_from_mapping(data, name, shown)
        character.picture = self.picture_path(name)
        return character

    def save(self, character: Character, picture_bytes: bytes | None = None) -> Path:
        """Write `character` as characters/NAME.yaml (atomically); returns its path.

        `picture_bytes` (PNG, or JPEG/WebP/GIF converted to PNG) replaces the picture as
        NAME.png. Without it, a `character.picture` inside this folder under another
        name (a "save as") is copied; the current picture is otherwise kept.
        """
        path = self._target(character.name)
        png = self._picture_to_store(character, picture_bytes)
        atomic_write_text(path, dump_yaml(character_to_mapping(character)))
        if png is not None:
            target = self._path(character.name, ".png")
            atomic_write_bytes(target, png)
            for suffix in PICTURE_SUFFIXES[1:]:
                self._path(character.name, suffix).unlink(missing_ok=True)
        return path

    def _picture_to_store(self, character: Character, picture_bytes: bytes | None) -> bytes | None:
        """The PNG bytes to write as the picture, or None to leave the picture alone."""
        if picture_bytes is not None:
            png = cards.image_to_png(picture_bytes)
            return cards.strip_card_chunks(png)
        source = character.picture
        if source is None:
            return None
        # Only pictures already in this folder are copied: a Path handed in from outside
        # must not become a way to read arbitrary files.
        source = Path(source).resolve()
        if source.parent != self.folder.resolve() or not source.is_file():
            return None
        current = self.picture_path(character.name)
        if current is not None and current == source:
            return None
        return cards.strip_card_chunks(cards.image_to_png(source.read_bytes()))

    def delete(self, name: str) -> None:
        """Remove the character's YAML and picture.

        InvalidRequestError when there is no such character (the built-in Assistant
        cannot be removed; deleting its file restores the default).
        """
        if not self._delete(name, YAML_SUFFIXES + PICTURE_SUFFIXES):
            if name == DEFAULT_CHARACTER:
                raise InvalidRequestError("the built-in Assistant cannot be deleted", param="name")
            raise self._missing(name)

    def import_file(self, filename: str, data: bytes) -> Character:
        """Import a PNG card, a JSON card or one of our YAML files, and save it.

        The format is told from the content, not the file name. The name comes from the
        card (else the file name), made safe (see `safe_import_name`), and gets a
        " (2)", " (3)"... suffix when taken, so nothing is overwritten.
        """
        picture: bytes | None = None
        if data.startswith(cards.PNG_SIGNATURE):
            character = cards.card_to_character(cards.read_card_png(data))
            picture = data
        elif data.startswith(b"PK\x03\x04"):
            raise InvalidRequestError("CharX (.charx) archives are not supported; export the card as PNG or JSON",
                                      param="file")
        elif data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
            parsed = cards.read_card_json(data)
            character = self._from_mapping(parsed, filename)
        else:
            character = self._from_mapping(_parse_yaml(data, f"the file {filename!r}"), filename)
        wanted = character.name or Path(str(filename).replace("\\", "/")).stem
        character.name = self.unused_name(safe_import_name(wanted))
        character.picture = None
        self.save(character, picture)
        return self.load(character.name)

    def _from_mapping(self, data: dict[str, Any], filename: str) -> Character:
        if cards.looks_like_card(data):
            return cards.card_to_character(data)
        raw = data.get("name") or data.get("char_name") or ""
        return character_from_mapping(data, str(raw).strip(), f"the file {filename!r}")

    def unused_name(self, name: str) -> str:
        """`name`, or `name (2)`, `name (3)`... whichever is free (case-insensitively)."""
        taken = {existing.casefold() for existing in self.list()}
        candidate, number = name, 1
        while candidate.casefold() in taken:
            number += 1
            candidate = f"{name} ({number})"
        return candidate

    def export_png(self, name: str) -> bytes:
        """The character as a v2 card PNG, on its picture or a plain placeholder."""
        character = self.load(name)
        image = None
        if character.picture is not None:
            try:
                image = cards.image_to_png(character.picture.read_bytes())
            except InvalidRequestError:
                image = None  # a damaged picture should not block the export
        return cards.write_card_png(cards.character_to_card(character), image)


_UNSAFE_IN_NAME = re.compile(r"[/\\:<>\"|?*\x00-\x1f\x7f]|%(?=[0-9a-fA-F]{2})")


def safe_import_name(name: str) -> str:
    """A name from a card made acceptable to check_name, or FALLBACK_IMPORT_NAME.

    Cards come from anywhere and "AC/DC" is a fair character name, so instead of refusing
    we replace separators, colons, the other characters Windows refuses (< > " | ? *),
    control characters and percent-escapes with "_", drop leading and trailing dots and
    spaces, shorten it, and prefix Windows device names.
    """
    cleaned = " ".join(_UNSAFE_IN_NAME.sub("_", name).split())
    cleaned = cleaned[: MAX_NAME_LENGTH - 20].strip(". ")  # room for " (12)" and ".yaml"
    # What check_name can still refuse now is a device name (CON, nul.txt): "_CON" is fine.
    for candidate in (cleaned, "_" + cleaned) if cleaned else ():
        try:
            return check_name(candidate, "character name")
        except UnsafePathError:
            continue
    return FALLBACK_IMPORT_NAME
