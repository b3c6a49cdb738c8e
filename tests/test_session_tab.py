"""Session tab helpers: the flags view hides secrets; extensions are found by folder; theme is a setting."""

from __future__ import annotations

import pytest
import yaml

from modules.core.errors import InvalidRequestError
from modules.core.settings import Settings, build_parser
from modules.ui.session_tab import THEMES, flags_yaml, list_extensions


def test_flags_view_hides_secrets_and_shows_the_rest():
    shown = yaml.safe_load(flags_yaml(Settings(api_key="sk-secret", gradio_auth="me:pw", threads=3)))
    assert shown["api_key"] == "(hidden)" and shown["gradio_auth"] == "(hidden)"
    assert shown["threads"] == 3 and shown["theme"] == "system"
    assert "sk-secret" not in flags_yaml(Settings(api_key="sk-secret"))
    assert yaml.safe_load(flags_yaml(Settings()))["api_key"] is None


def test_extensions_are_folders_with_a_script(tmp_path):
    assert list_extensions(tmp_path / "absent") == []
    (tmp_path / "b_ext").mkdir()
    (tmp_path / "b_ext" / "script.py").write_text("")
    (tmp_path / "a_ext").mkdir()
    (tmp_path / "a_ext" / "script.py").write_text("")
    (tmp_path / "not_one").mkdir()
    assert list_extensions(tmp_path) == ["a_ext", "b_ext"]


def test_theme_is_a_validated_persisted_flag():
    assert THEMES == ("system", "light", "dark")
    assert Settings(theme="dark").persisted()["theme"] == "dark"
    with pytest.raises(InvalidRequestError, match="theme"):
        Settings(theme="purple")
    assert vars(build_parser().parse_args(["--theme", "light"]))["theme"] == "light"

