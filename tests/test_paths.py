"""User-given names stay inside their folder; user files are replaced atomically."""

from __future__ import annotations

import os

import pytest

from modules.errors import UnsafePathError
from modules.paths import atomic_write_text, check_name, safe_join
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
