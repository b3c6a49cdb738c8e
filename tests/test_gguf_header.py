"""The one GGUF header reader: hostile headers are refused (strict) or cut short (tolerant),
quickly and in little memory; real files read exactly as the `gguf` package reads them."""

from __future__ import annotations

import random
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from modules.core import gguf_header
from modules.core.errors import ModelLoadError
from modules.core.gguf_header import MAX_ARRAY_DEPTH, MAX_KEYS, MAX_STEPS, read_header, read_header_prefix
from modules.hub import memory_fit
from tests.kit import TinyKit

U8, U32, F32, BOOL, STRING, ARRAY, U64 = 0, 4, 6, 7, 8, 9, 10


# ---------------------------------------------------------------- hand-made GGUF bytes
def gstr(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def pair(key: str, kind: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", kind) + payload


def header(*pairs: bytes, n_kv: int | None = None, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, 0, len(pairs) if n_kv is None else n_kv) + b"".join(pairs)


ARCH = pair("general.architecture", STRING, gstr("llama"))
LAYERS = pair("llama.block_count", U32, struct.pack("<I", 2))
GOOD = {"general.architecture": "llama", "llama.block_count": 2}


def nested_arrays(depth: int) -> bytes:
    """An array value whose only item is an array... `depth` levels, the innermost empty."""
    return struct.pack("<IQ", ARRAY, 1) * (depth - 1) + struct.pack("<IQ", U32, 0)


def _strict(tmp_path: Path, data: bytes) -> dict[str, Any]:
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    return read_header(path)


def _quick(call: Callable[[], Any]) -> Any:
    """`call()` must finish in well under 2 s without allocating more than a few MiB."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        return call()
    finally:
        seconds = time.perf_counter() - start
        _size, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert seconds < 1.0 and peak < 8 * 2**20, (seconds, peak)


HOSTILE = {
    "arrays nested 10,000 deep": (pair("deep", ARRAY, nested_arrays(10_000)), "nested more than"),
    "an array of 2**63 bytes": (pair("big", ARRAY, struct.pack("<IQ", U8, 2**63)), "array of"),
    "an array of 2**63 strings": (pair("big", ARRAY, struct.pack("<IQ", STRING, 2**63)), "array of"),
    "an array of 2**63 arrays": (pair("big", ARRAY, struct.pack("<IQ", ARRAY, 2**63)), "array of"),
    "an array of 2**64-1 u64": (pair("big", ARRAY, struct.pack("<IQ", U64, 2**64 - 1)), "array of"),
    "a string past the end": (pair("s", STRING, struct.pack("<Q", 100) + b"short"), "string of 100 bytes"),
    "a string of 2**63 bytes": (pair("s", STRING, struct.pack("<Q", 2**63)), "string of"),
    "a key past the end": (struct.pack("<Q", 2**63) + b"key", "string of"),
    "a key longer than the spec allows": (pair("k" * 70_000, U32, b"\0" * 4), "key at byte"),
    "a string inside an array past the end": (
        pair("tokens", ARRAY, struct.pack("<IQ", STRING, 2) + gstr("a") + struct.pack("<Q", 50) + b"b"),
        "string in an array"),
    "an unknown value type": (pair("odd", 13, b"\0" * 8), "unknown value type 13"),
    "an unknown array item type": (pair("odd", ARRAY, struct.pack("<IQ", 99, 1)), "unknown array item type 99"),
    "a value cut short": (pair("n", U64, b"\1\2\3"), "runs past the end"),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_headers_are_a_model_load_error_when_strict(tmp_path: Path, case: str):
    bad, reason = HOSTILE[case]
    with pytest.raises(ModelLoadError, match="not a valid GGUF file") as caught:
        _quick(lambda: _strict(tmp_path, header(ARCH, LAYERS, bad)))
    assert reason in str(caught.value) and "damaged or cut short" in str(caught.value)


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_headers_give_what_came_before_when_tolerant(case: str):
    bad, _reason = HOSTILE[case]
    assert _quick(lambda: read_header_prefix(header(ARCH, LAYERS, bad))) == GOOD


def test_arrays_nested_up_to_the_limit_are_skipped(tmp_path: Path):
    data = header(ARCH, pair("nested", ARRAY, nested_arrays(MAX_ARRAY_DEPTH)), LAYERS)
    assert _strict(tmp_path, data) == GOOD == read_header_prefix(data)
    with pytest.raises(ModelLoadError, match=f"nested more than {MAX_ARRAY_DEPTH} deep"):
        _strict(tmp_path, header(ARCH, pair("nested", ARRAY, nested_arrays(MAX_ARRAY_DEPTH + 1))))


@pytest.mark.parametrize("n_kv", [MAX_KEYS + 1, 2**63, 2**64 - 1])
def test_too_many_keys(tmp_path: Path, n_kv: int):
    data = header(ARCH, LAYERS, n_kv=n_kv)
    with pytest.raises(ModelLoadError, match="metadata keys"):
        _quick(lambda: _strict(tmp_path, data))
    assert _quick(lambda: read_header_prefix(data)) == {}


def test_more_keys_claimed_than_the_file_holds(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="1,000 metadata keys"):
        _strict(tmp_path, header(ARCH, LAYERS, n_kv=1000))
    assert read_header_prefix(header(ARCH, LAYERS, n_kv=1000)) == GOOD  # a prefix: the rest was cut off


def test_the_step_budget_refuses_before_looping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    many = pair("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, 5000) + gstr("") * 5000)
    assert read_header_prefix(header(ARCH, many))["_vocab_count"] == 5000
    monkeypatch.setattr(gguf_header, "MAX_STEPS", 4000)
    with pytest.raises(ModelLoadError, match="more than 4,000 steps"):
        _strict(tmp_path, header(ARCH, many))
    assert read_header_prefix(header(ARCH, LAYERS, many)) == GOOD


def test_a_full_step_budget_of_empty_strings_is_still_quick():
    count = MAX_STEPS - 10
    data = header(ARCH, pair("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, count) + gstr("") * count))
    start = time.perf_counter()
    assert read_header_prefix(data) == {"general.architecture": "llama", "_vocab_count": count}
    assert time.perf_counter() - start < 2.0


def test_long_strings_are_skipped_not_kept(tmp_path: Path):
    big = "x" * (gguf_header.MAX_KEPT_STRING_BYTES + 1)
    data = header(ARCH, pair("tokenizer.huggingface.json", STRING, gstr(big)), LAYERS)
    assert _strict(tmp_path, data) == GOOD == read_header_prefix(data)


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "magic"), (b"GGU", "magic"), (b"GGML" + b"\0" * 40, "magic"),
    (header(ARCH, version=1), "version 1 is not supported"), (header(ARCH, version=4), "version 4"),
    (b"GGUF", "damaged or cut short"), (b"GGUF" + struct.pack("<I", 3), "damaged or cut short"),
])
def test_not_a_gguf(tmp_path: Path, data: bytes, reason: str):
    with pytest.raises(ModelLoadError, match="not a valid GGUF file") as caught:
        _strict(tmp_path, data)
    assert reason in str(caught.value)
    assert read_header_prefix(data) == {}


def test_a_missing_or_unreadable_file_is_a_model_load_error(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="cannot be read"):
        read_header(tmp_path / "absent.gguf")
    with pytest.raises(ModelLoadError, match="cannot be read"):
        read_header(tmp_path)  # a folder


def test_tensors_are_never_read(tmp_path: Path):
    """The file is mapped: a header followed by 64 GiB (sparse) of "tensors" reads in no time."""
    path = tmp_path / "huge.gguf"
    with path.open("wb") as f:
        f.write(header(ARCH, LAYERS))
        f.truncate(64 * 2**30)
    assert _quick(lambda: read_header(path)) == GOOD


# ---------------------------------------------------------------- random bytes
def _mutations(seed: int, base: bytes, count: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        data = bytearray(base)
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(len(data))
            data[at : at + rng.randint(1, 8)] = rng.randbytes(rng.randint(1, 8))
        out.append(bytes(data[: rng.randint(0, len(data))] if rng.random() < 0.3 else data))
    return out


def _check_both(tmp_path: Path, data: bytes) -> None:
    start = time.perf_counter()
    try:
        strict = _strict(tmp_path, data)
    except ModelLoadError:
        strict = None
    tolerant = read_header_prefix(data)
    assert isinstance(tolerant, dict)
    if strict is not None:  # what strict reads, tolerant reads too
        assert {k: v for k, v in tolerant.items() if k != "_vocab_count"} == strict
    assert time.perf_counter() - start < 2.0


def test_random_bytes_never_escape_the_reader(tmp_path: Path):
    rng = random.Random(20240601)
    for _ in range(300):
        body = rng.randbytes(rng.randint(0, 400))
        for data in (body, b"GGUF" + body, b"GGUF" + struct.pack("<I", 3) + body,
                     header(ARCH, n_kv=rng.choice([1, 2, 3, 2**63])) + body):
            _check_both(tmp_path, data)


def test_mutated_real_headers_never_escape_the_reader(tmp_path: Path, tiny_kit: TinyKit):
    base = tiny_kit.gguf_f32.read_bytes()[: _header_end(tiny_kit.gguf_f32) + 64]
    for data in _mutations(7, base, 300):
        _check_both(tmp_path, data)


# ---------------------------------------------------------------- real files
def _expected(path: Path) -> tuple[dict[str, Any], int]:
    """Scalars and strings as the `gguf` package reads them, and the vocabulary length."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    fields = {name: f for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    values = {name: f.contents() for name, f in fields.items() if f.types[0] != GGUFValueType.ARRAY}
    return values, len(fields["tokenizer.ggml.tokens"].data)


def _header_end(path: Path) -> int:
    from gguf import GGUFReader

    last = list(GGUFReader(path).fields.values())[-1]
    return int(last.offset) + sum(part.nbytes for part in last.parts)


@pytest.mark.parametrize("which", ["gguf_f32", "gguf_q8_0"])
def test_the_kit_reads_exactly_as_the_gguf_package_reads_it(tiny_kit: TinyKit, which: str):
    path = getattr(tiny_kit, which)
    values, vocab = _expected(path)
    assert read_header(path) == values and len(values) > 20
    assert values["tokenizer.chat_template"] and values["tokenizer.ggml.add_bos_token"] is True
    assert read_header_prefix(path.read_bytes()) == {**values, "_vocab_count": vocab}
    assert memory_fit.parse_gguf_prefix(path.read_bytes()[: 2 * 2**20]) == {**values, "_vocab_count": vocab}


def test_the_loader_reads_through_the_same_reader(tiny_kit: TinyKit):
    from loaders.llama_cpp import read_gguf_metadata

    assert read_gguf_metadata(tiny_kit.gguf_q8_0) == read_header(tiny_kit.gguf_q8_0)


def test_every_cut_of_a_real_header(tmp_path: Path, tiny_kit: TinyKit):
    """Cut anywhere inside the header: strict refuses, tolerant keeps a growing subset."""
    data = tiny_kit.gguf_f32.read_bytes()
    end = _header_end(tiny_kit.gguf_f32)
    full, vocab = _expected(tiny_kit.gguf_f32)
    previous: dict[str, Any] = {}
    for cut in [*range(0, 600), *range(600, end, 97), end - 1]:
        with pytest.raises(ModelLoadError, match="not a valid GGUF file"):
            _strict(tmp_path, data[:cut])
        got = read_header_prefix(data[:cut])
        assert set(previous) <= set(got) and all(full.get(k) == v for k, v in got.items() if k != "_vocab_count")
        previous = got
    assert read_header_prefix(data[:end]) == {**full, "_vocab_count": vocab} == {
        **_strict(tmp_path, data[:end]), "_vocab_count": vocab}
