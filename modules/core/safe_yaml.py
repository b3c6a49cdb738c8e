"""YAML from user files, parsed within a memory budget.

`yaml.safe_load` builds no Python objects it should not, but it follows anchors and
aliases: a 1 KB "billion laughs" file (`&a [*b, *b, ...]` nested ten deep) loads as a small
graph of shared lists that expands to billions of items as soon as anything walks it
(str(), a JSON or YAML dump, a copy). Hand-written characters, presets and settings never
need anchors, so `load_yaml` refuses every anchor and alias, and caps the input size, the
nesting depth (PyYAML composes nodes recursively: `[[[[...` 10,000 deep is a
RecursionError) and the number of values, which with the size bounds the parsing time
(a few seconds at worst: PyYAML's pure-Python loader is the one that can be extended).

Layer 0: stdlib, yaml and modules.core.errors only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from modules.core.errors import InvalidRequestError

#: Largest YAML text accepted (bytes for bytes and files, characters for str). Characters,
#: presets and settings are a few KB; an imported card with a long lore is a few hundred.
MAX_YAML_BYTES = 4 * 2**20
#: Deepest nesting of mappings and sequences accepted (a character card uses 3 or 4); PyYAML
#: composes nodes recursively, two frames a level.
MAX_YAML_DEPTH = 64

#: Most values (scalars, lists, mappings) in one file. Pure-Python PyYAML spends ~25 us a value,
#: so a 4 MiB "[1,1,1,...]" would take a minute; 100,000 values take about 2 s. An imported
#: card keeps its lorebook in the character file: ~40 values an entry, so 2,000 entries fit.
MAX_YAML_NODES = 100_000

ANCHOR_MESSAGE = "YAML anchors and aliases (&name / *name) are not allowed"


class _Refused(Exception):
    """Raised inside the loader; `load_yaml` turns it into an InvalidRequestError."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases, nesting deeper than MAX_YAML_DEPTH and
    more than MAX_YAML_NODES values."""

    def __init__(self, stream: str | bytes) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        # Checked before PyYAML's own compose_node, which resolves an alias to the shared
        # node (the start of the blow-up) and records anchors.
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(ANCHOR_MESSAGE)
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise _Refused(f"YAML with more than {MAX_YAML_NODES:,} values is not allowed")
        if not isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _Refused(f"YAML nested deeper than {MAX_YAML_DEPTH} levels is not allowed")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def check_size(size: int, shown: str, param: str = "file") -> None:
    """InvalidRequestError naming `shown` when `size` is over MAX_YAML_BYTES (check before reading)."""
    if size > MAX_YAML_BYTES:
        raise InvalidRequestError(f"{shown} is too large for a YAML file ({size:,} > {MAX_YAML_BYTES:,} bytes)", param)


def load_yaml(text: str | bytes, shown: str, param: str = "file") -> Any:
    """The single YAML document in `text`, like `yaml.safe_load`, within the budget.

    Raises InvalidRequestError(param=`param`) naming `shown` when the text is larger than
    MAX_YAML_BYTES, holds an anchor or alias, nests deeper than MAX_YAML_DEPTH or holds
    more than MAX_YAML_NODES values.
    Malformed YAML raises yaml.YAMLError as safe_load does, so each caller keeps its own
    message for that. Bytes are decoded by PyYAML (UTF-8, or UTF-16 with a BOM).
    """
    check_size(len(text), shown, param)
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except _Refused as refused:
        raise InvalidRequestError(f"{shown}: {refused}", param) from None
    finally:
        loader.dispose()


def load_yaml_file(path: Path, shown: str, param: str = "file") -> Any:
    """`load_yaml` of a UTF-8 file, its size checked before it is read.

    OSError and UnicodeDecodeError propagate as from `path.read_text(encoding="utf-8")`.
    """
    check_size(path.stat().st_size, shown, param)
    return load_yaml(path.read_text(encoding="utf-8"), shown, param)
