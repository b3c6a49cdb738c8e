"""User-given names stay inside their folder; user files are replaced atomically."""

from __future__ import annotations

import os

import pytest

from modules.core.errors import UnsafePathError
from modules.core.paths import atomic_write_text, check_name, safe_join
from tests.traversal_payloads import TRAVERSAL_PAYLOADS


def test_there_are_at_least_twenty_payloads():
    assert len(TRAVERSAL_PAYLOADS) >= 20


@pytest.mark.parametrize("name", TRAVERSAL_PAYLOADS)
def test_names_that_escape_are_refused(tmp_path, name):
    with pytest.raises(UnsafePathError):
        safe_join(tmp_path, name)
    with pytest.raises(UnsafePathError):
        check_name(name)


@pytest.mark.parametrize("name", [p for p in TRAVERSAL_PAYLOADS if p != "sub/dir"])
def test_names_with_subfolders_are_still_checked_part_by_part(tmp_path, name):
    with pytest.raises(UnsafePathError):
        safe_join(tmp_path, name, subfolders=True)


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    inside = tmp_path / "models"
    inside.mkdir()
    (inside / "link").symlink_to(tmp_path)
    (inside / "file-link.gguf").symlink_to(tmp_path / "outside.gguf")
    with pytest.raises(UnsafePathError):
        safe_join(inside, "link/secret", subfolders=True)
    with pytest.raises(UnsafePathError):
        safe_join(inside, "file-link.gguf")


def test_plain_and_nested_names_resolve_inside(tmp_path):
    assert safe_join(tmp_path, "model.gguf") == tmp_path.resolve() / "model.gguf"
    assert safe_join(tmp_path, "Élodie & Ünal (v2)") == tmp_path.resolve() / "Élodie & Ünal (v2)"
    assert safe_join(tmp_path, "org_repo/file.gguf", subfolders=True) == tmp_path.resolve() / "org_repo" / "file.gguf"
    with pytest.raises(UnsafePathError, match="path separator"):
        safe_join(tmp_path, "org_repo/file.gguf")


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "settings.yaml"
    atomic_write_text(target, "a: 1\n")
    atomic_write_text(target, "a: 2\n")
    assert target.read_text() == "a: 2\n"
    assert os.listdir(target.parent) == ["settings.yaml"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "chat.json"
    atomic_write_text(target, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["chat.json"]


# Windows' reserved names (learn.microsoft.com, "Naming Files, Paths, and Namespaces"):
# a device stays a device with an extension and with spaces before the dot.
_DEVICES = ["CON", "PRN", "AUX", "NUL", "COM0", "COM9", "LPT0", "LPT9", "COM\u00b9", "COM\u00b2", "COM\u00b3",
            "LPT\u00b9", "LPT\u00b2", "LPT\u00b3", "CONIN$", "CONOUT$", "CLOCK$"]


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("shape", ["{}", "{}.txt", "{} .txt", "{}.tar.gz", "{}  .yaml"])
def test_windows_device_names_are_refused_in_every_case_and_with_an_extension(device, shape):
    for name in {shape.format(device), shape.format(device.lower()), shape.format(device.title())}:
        with pytest.raises(UnsafePathError, match="reserved device name"):
            check_name(name)


@pytest.mark.parametrize("device", ["CON", "COM\u00b9", "CONIN$"])
def test_a_device_name_with_a_trailing_space_or_dot_is_refused(device):
    for name in (device + " ", device + ".", device + " . "):
        with pytest.raises(UnsafePathError):
            check_name(name)


@pytest.mark.parametrize("char", list('<>"|?*'))
def test_characters_windows_refuses_are_refused_anywhere(char):
    for name in (char, f"a{char}b", f"{char}name", f"name{char}", f"name.{char}ext"):
        with pytest.raises(UnsafePathError, match="not allowed in file names on Windows"):
            check_name(name)


@pytest.mark.parametrize("name", ["COM10", "LPT\u2074", "COM\u00b9x", "CONSOLE", "console.txt", "nullable", "Clock",
                                  "AUXILIARY.yaml", "CON$", "CONIN", "x.CON", "_CON", "My CON", "$", "a$b"])
def test_names_that_only_look_like_devices_are_fine(name):
    assert check_name(name) == name


def test_imported_card_names_lose_the_characters_windows_refuses():
    from modules.chat.characters import safe_import_name

    assert safe_import_name('Who? <The "Boss"> | *') == "Who_ _The _Boss__ _ _"
    assert safe_import_name("COM\u00b9") == "_COM\u00b9"
    assert safe_import_name("conin$.txt") == "_conin$.txt"
