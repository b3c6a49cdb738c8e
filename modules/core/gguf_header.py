"""The key/value header of a GGUF file, read within fixed budgets.

GGUF (ggml's docs/gguf.md; value types as in the `gguf` package's GGUFValueType): the
magic b"GGUF", a u32 version (2 and 3 are read: u64 counts), a u64 tensor count, a u64
key/value count, then each pair as a string key (u64 length + UTF-8 bytes), a u32 value
type and the value. Scalars have fixed sizes; an array is a u32 item type, a u64 count and
the items, which may themselves be arrays. Everything is little-endian.

A model file is untrusted input: every count and length is checked against the bytes that
remain before anything is read or skipped, arrays may nest only MAX_ARRAY_DEPTH deep, and
the whole header costs at most MAX_STEPS loop turns, so a hostile file (a count of 2**63,
arrays nested 10,000 deep, a string "longer" than the file) is refused in milliseconds with
bounded memory. Tensors are never touched: the file is memory-mapped and only the header
pages are read.

Two entry points, one parser:
  * `read_header(path)`: strict, for a file about to be loaded. Scalars and strings are
    kept, arrays skipped; any problem is a ModelLoadError saying what is wrong.
  * `read_header_prefix(data)`: tolerant, for the first bytes of a remote file fetched with
    a Range request. Returns what was read before the data ended or went wrong (never
    raises), plus `_vocab_count`, the length of the `tokenizer.ggml.tokens` array, when the
    whole array was inside `data`.

Layer 0: stdlib and modules.core.errors only (loaders import it).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modules.core.errors import ModelLoadError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
#: Key/value pairs in one header (real files hold 20 to 60).
MAX_KEYS = 65_536
#: Bytes in one key (the spec's own limit).
MAX_KEY_BYTES = 65_535
#: Levels of arrays: an array is level 1, an array inside it level 2... (llama.cpp writes none nested).
MAX_ARRAY_DEPTH = 4
#: Loop turns for the whole header: one per key, per string in an array and per nested array,
#: charged before the loop starts. The largest real headers take under 1M (a 200k vocabulary
#: and its 450k merges); 3M turns of the string loop take under a second.
MAX_STEPS = 3_000_000
#: A string value longer than this is skipped like an array, not kept (the longest value a caller
#: reads is a chat template of a few KB; old files carry a tokenizer.huggingface.json of MBs).
MAX_KEPT_STRING_BYTES = 4 * 2**20
#: All kept string values together; further strings are skipped.
MAX_KEPT_BYTES = 32 * 2**20

VOCAB_KEY = "tokenizer.ggml.tokens"
VOCAB_COUNT = "_vocab_count"

_STRING, _ARRAY = 8, 9
#: Fixed-size value types: type -> (struct format, size).
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
#: The fewest bytes one value of each type takes (an empty string, an empty array).
_MIN_BYTES = {**{kind: size for kind, (_fmt, size) in _SCALARS.items()}, _STRING: 8, _ARRAY: 12}
_MIN_PAIR_BYTES = 8 + 4 + 1  # empty key, value type, a one-byte value
_U64 = struct.Struct("<Q")


class _Damaged(Exception):
    """The header cannot be read further; the message says why (for ModelLoadError)."""


class _NotGguf(_Damaged):
    """Not a GGUF this reader knows (magic, version): said as is, not as damage."""


@dataclass(frozen=True)
class _Array:
    """A skipped array: only its length is kept."""

    count: int


class _Reader:
    """A cursor over the header bytes that checks every length before it moves."""

    def __init__(self, data: bytes | mmap.mmap) -> None:
        self.data = data
        self.end = len(data)
        self.pos = 0
        self.steps = 0
        self.kept = 0

    def spend(self, steps: int) -> None:
        """Charge `steps` loop turns up front, so an over-budget count is refused before any turn."""
        self.steps += steps
        if self.steps > MAX_STEPS:
            raise _Damaged(f"reading it would take more than {MAX_STEPS:,} steps")

    def need(self, size: int, what: str) -> None:
        if size > self.end - self.pos:
            raise _Damaged(f"{what} at byte {self.pos} runs past the end ({size:,} bytes needed, "
                           f"{self.end - self.pos:,} left)")

    def scalar(self, kind: int) -> Any:
        fmt, size = _SCALARS[kind]
        self.need(size, "a value")
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += size
        return value

    def u32(self) -> int:
        return int(self.scalar(4))

    def u64(self) -> int:
        return int(self.scalar(10))

    def string(self, limit: int | None) -> str | None:
        """The next string, or None (skipped) when it is longer than `limit`."""
        length = self.u64()
        self.need(length, f"a string of {length:,} bytes")
        start, self.pos = self.pos, self.pos + length
        if limit is None or length > limit:
            return None
        return bytes(self.data[start:self.pos]).decode("utf-8", errors="replace")

    def key(self) -> str:
        length_at = self.pos
        key = self.string(MAX_KEY_BYTES)
        if key is None:
            raise _Damaged(f"the key at byte {length_at} is longer than {MAX_KEY_BYTES:,} bytes")
        return key

    def value(self, kind: int) -> Any:
        """The next value: a scalar, a str, None for a string too long to keep, or an _Array."""
        if kind in _SCALARS:
            return self.scalar(kind)
        if kind == _STRING:
            text = self.string(min(MAX_KEPT_STRING_BYTES, MAX_KEPT_BYTES - self.kept))
            self.kept += len(text) if text else 0
            return text
        if kind == _ARRAY:
            return _Array(self.skip_array(1))
        raise _Damaged(f"unknown value type {kind} before byte {self.pos}")

    def skip_array(self, depth: int) -> int:
        """Move past the array that starts here (`depth` levels down); returns its item count."""
        if depth > MAX_ARRAY_DEPTH:
            raise _Damaged(f"arrays are nested more than {MAX_ARRAY_DEPTH} deep at byte {self.pos}")
        item_kind, count = self.u32(), self.u64()
        if item_kind not in _MIN_BYTES:
            raise _Damaged(f"unknown array item type {item_kind} before byte {self.pos}")
        self.need(count * _MIN_BYTES[item_kind], f"an array of {count:,} items")
        if item_kind in _SCALARS:
            self.pos += count * _SCALARS[item_kind][1]
            return count
        self.spend(count)
        if item_kind == _STRING:
            self.skip_strings(count)
        else:
            for _ in range(count):
                self.skip_array(depth + 1)
        return count

    def skip_strings(self, count: int) -> None:
        """Move past `count` strings (a vocabulary: hundreds of thousands, so a tight loop)."""
        data, pos, end, unpack = self.data, self.pos, self.end, _U64.unpack_from
        for _ in range(count):
            if end - pos < 8 or (length := unpack(data, pos)[0]) > end - pos - 8:
                raise _Damaged(f"a string in an array at byte {pos} runs past the end")
            pos += 8 + length
        self.pos = pos


def _read_pairs(reader: _Reader, out: dict[str, Any], whole_file: bool) -> None:
    """Read the header into `out` pair by pair (so a tolerant caller keeps what came first)."""
    reader.need(4, "the magic bytes")
    if bytes(reader.data[:4]) != MAGIC:
        raise _NotGguf("it does not start with the GGUF magic bytes")
    reader.pos = 4
    version = reader.u32()
    if version not in SUPPORTED_VERSIONS:
        raise _NotGguf(f"GGUF version {version} is not supported")
    _n_tensors, n_kv = reader.u64(), reader.u64()
    if n_kv > MAX_KEYS:
        raise _Damaged(f"it claims {n_kv:,} metadata keys, more than the {MAX_KEYS:,} accepted")
    if whole_file:  # a prefix may end early: there, the pairs run out where the data does
        reader.need(n_kv * _MIN_PAIR_BYTES, f"{n_kv:,} metadata keys")
    reader.spend(n_kv)
    for _ in range(n_kv):
        key = reader.key()
        value = reader.value(reader.u32())
        if value is not None:
            out[key] = value


def read_header(path: Path) -> dict[str, Any]:
    """The key/value header of the GGUF file at `path`: scalars and strings (arrays skipped).

    Strict: a file that cannot be read, does not start with b"GGUF", has another version
    than 2 or 3, or whose header is damaged, cut short or over a budget raises
    ModelLoadError naming the file and the problem, never any other exception.
    """
    invalid = f"{path.name} is not a valid GGUF file"
    out: dict[str, Any] = {}
    try:
        with path.open("rb") as f:
            if f.read(4) != MAGIC:  # an empty file cannot be mapped: check the magic first
                raise ModelLoadError(f"{invalid} (it does not start with the GGUF magic bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                _read_pairs(_Reader(mm), out, whole_file=True)
    except (OSError, ValueError) as exc:  # ValueError: mmap of something that is not a file
        raise ModelLoadError(f"{path.name} cannot be read: {exc}") from exc
    except _NotGguf as exc:
        raise ModelLoadError(f"{invalid} ({exc})") from None
    except (_Damaged, struct.error) as exc:  # struct.error: never expected, every read is checked first
        raise ModelLoadError(f"{invalid} (its header is damaged or cut short: {exc})") from None
    return {key: value for key, value in out.items() if not isinstance(value, _Array)}


def read_header_prefix(data: bytes) -> dict[str, Any]:
    """The key/values readable from the first bytes of a GGUF (arrays skipped).

    Tolerant: returns whatever pairs were whole before the data ended or went wrong, and
    never raises; not a GGUF, an empty dict. `_vocab_count` holds the length of the
    tokenizer.ggml.tokens array when that array was read to its end.
    """
    out: dict[str, Any] = {}
    try:
        _read_pairs(_Reader(data), out, whole_file=False)
    except (_Damaged, struct.error, ValueError, TypeError):
        pass  # keep what came before
    result = {key: value for key, value in out.items() if not isinstance(value, _Array)}
    tokens = out.get(VOCAB_KEY)
    if isinstance(tokens, _Array):
        result[VOCAB_COUNT] = tokens.count
    return result
