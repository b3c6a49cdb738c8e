"""Flags, CMD_FLAGS.txt and settings.yaml merge in the documented order."""

from __future__ import annotations

import pytest
import yaml

from modules.core.errors import InvalidRequestError
from modules.core.settings import Settings, build_parser, load_settings, read_cmd_flags
from modules.engine.app import App


def test_every_flag_of_the_issue_is_there():
    help_text = build_parser().format_help()
    for flag in ("--model", "--loader", "--models-dir", "--n-gpu-layers", "--ctx-size", "--threads",
                 "--threads-batch", "--batch-size", "--rope-freq-base", "--rope-freq-scale", "--flash-attn",
                 "--cache-type", "--tensor-split", "--no-mmap", "--mlock", "--dtype", "--cpu", "--load-in-8bit",
                 "--load-in-4bit", "--trust-remote-code", "--listen", "--listen-host", "--listen-port", "--api",
                 "--api-port", "--api-key", "--gradio-auth", "--settings", "--extensions", "--verbose"):
        assert flag in help_text, flag
    for group in ("Model:", "llama.cpp:", "Transformers:", "Server:"):
        assert group in help_text


def test_defaults(tmp_path):
    s = load_settings([], tmp_path)
    assert (s.listen_port, s.api_port, s.host, s.cache_type) == (7860, 5000, "127.0.0.1", "f16")


def test_cmd_flags_are_shell_split_and_comments_ignored(tmp_path):
    path = tmp_path / "CMD_FLAGS.txt"
    path.write_text('# a comment\n--model "my model.gguf"  # trailing comment\n--ctx-size 4096\n')
    assert read_cmd_flags(path) == ["--model", "my model.gguf", "--ctx-size", "4096"]


def test_precedence_defaults_file_cmd_flags_argv(tmp_path):
    (tmp_path / "settings.yaml").write_text(yaml.safe_dump({"ctx_size": 1024, "threads": 3, "batch_size": 64,
                                                            "ui_theme": "dark"}))
    (tmp_path / "CMD_FLAGS.txt").write_text("--ctx-size 2048 --threads 5\n")
    s = load_settings(["--threads", "7", "--flash-attn"], tmp_path)
    assert s.batch_size == 64  # from the file
    assert s.ctx_size == 2048  # CMD_FLAGS beats the file
    assert s.threads == 7  # argv beats CMD_FLAGS
    assert s.flash_attn is True


def test_settings_file_can_be_chosen(tmp_path):
    (tmp_path / "other.yaml").write_text("listen_port: 9000\n")
    assert load_settings(["--settings", "other.yaml"], tmp_path).listen_port == 9000


def test_bad_choice_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(SystemExit):
        load_settings(["--cache-type", "q2"], tmp_path)
    (tmp_path / "settings.yaml").write_text("cache_type: q2\n")
    with pytest.raises(InvalidRequestError, match="cache_type"):
        load_settings([], tmp_path)
    (tmp_path / "settings.yaml").write_text("a: [unclosed\n")
    with pytest.raises(InvalidRequestError, match="not valid YAML"):
        load_settings([], tmp_path)


def test_listen_binds_all_interfaces_unless_a_host_is_given(tmp_path):
    assert load_settings(["--listen"], tmp_path).host == "0.0.0.0"
    assert load_settings(["--listen", "--listen-host", "10.0.0.2"], tmp_path).host == "10.0.0.2"


def test_extensions_take_several_names(tmp_path):
    assert load_settings(["--extensions", "translate", "memory"], tmp_path).extensions == ["translate", "memory"]


def test_save_settings_round_trips_without_secrets(tmp_path):
    settings = Settings(ctx_size=3072, api_key="sk-secret", gradio_auth="me:pw")
    app = App.create(settings, tmp_path)
    path = app.save_settings()
    saved = yaml.safe_load(path.read_text())
    assert saved["ctx_size"] == 3072
    assert "api_key" not in saved and "gradio_auth" not in saved
    assert load_settings([], tmp_path).ctx_size == 3072


def test_exposure_switches_never_come_back_from_saved_settings(tmp_path):
    """Save settings after a start with --listen --trust-remote-code: the next plain start is local."""
    cli = ["--listen", "--trust-remote-code", "--allow-pickle", "--api-cors-origins", "*",
           "--allowed-hosts", "pc.lan", "--listen-host", "0.0.0.0", "--api-key", "k"]
    app = App.create(load_settings(cli, tmp_path), tmp_path)
    assert app.settings.listen and app.settings.trust_remote_code
    saved = yaml.safe_load(app.save_settings().read_text())
    for name in ("listen", "listen_host", "allowed_hosts", "api_cors_origins", "trust_remote_code", "allow_pickle",
                 "api_key"):
        assert name not in saved, name
    again = load_settings([], tmp_path)
    assert (again.listen, again.trust_remote_code, again.allow_pickle, again.api_cors_origins,
            again.host) == (False, False, False, None, "127.0.0.1")


def test_exposure_switches_written_into_settings_yaml_by_hand_are_ignored(tmp_path, caplog):
    (tmp_path / "settings.yaml").write_text(yaml.safe_dump(
        {"listen": True, "listen_host": "0.0.0.0", "trust_remote_code": True, "allow_pickle": True,
         "api_cors_origins": "*", "allowed_hosts": "*", "ctx_size": 2048}))
    s = load_settings([], tmp_path)
    assert (s.listen, s.listen_host, s.trust_remote_code, s.allow_pickle, s.api_cors_origins, s.allowed_hosts) == \
        (False, None, False, False, None, None)
    assert s.ctx_size == 2048 and "ignoring" in caplog.text
    assert load_settings(["--listen"], tmp_path).listen  # the command line still sets them


@pytest.mark.parametrize(("value", "field"), [
    ({"ctx_size": "4096"}, "ctx_size"), ({"ctx_size": 10**9}, "ctx_size"), ({"threads": -5}, "threads"),
    ({"flash_attn": "false"}, "flash_attn"), ({"no_mmap": 1}, "no_mmap"), ({"cache_type": "q2"}, "cache_type"),
    ({"batch_size": 0}, "batch_size"), ({"extensions": "memory"}, "extensions"),
])
def test_settings_file_values_are_type_checked_and_bounded(tmp_path, value, field):
    (tmp_path / "settings.yaml").write_text(yaml.safe_dump(value))
    with pytest.raises(InvalidRequestError) as caught:
        load_settings([], tmp_path)
    assert caught.value.param == field


def test_the_ui_cannot_switch_exposure_on(tmp_path):
    app = App.create(Settings(), tmp_path)
    with pytest.raises(InvalidRequestError, match="command line"):
        app.update_settings(listen=True)
    with pytest.raises(InvalidRequestError, match="command line"):
        app.update_settings(trust_remote_code=True)
    assert app.update_settings(theme="dark").theme == "dark"


def test_a_settings_file_with_yaml_aliases_is_refused(tmp_path):
    (tmp_path / "settings.yaml").write_text("a: &a [1, 2]\nb: *a\n")
    with pytest.raises(InvalidRequestError, match="aliases"):
        load_settings([], tmp_path)
