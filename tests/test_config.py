from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import find_api_key, load_settings
from daemon.errors import ConfigError


def test_defaults_follow_xdg_when_no_config_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUDIODROP_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    settings = load_settings()
    assert settings.state_dir == tmp_path / "state" / "audiodrop"
    assert settings.watches[0].path == tmp_path / "home" / "AudioDrop" / "inbox"
    assert settings.gemini.storage_limit_bytes == 21474836480
    assert set(settings.templates) == {"transcribe", "summarize"}


def test_lookup_order_is_flag_then_environment_then_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    xdg = tmp_path / "xdg" / "audiodrop"
    xdg.mkdir(parents=True)
    (xdg / "config.toml").write_text('state_dir = "/from/xdg"\n')
    (tmp_path / "env.toml").write_text('state_dir = "/from/env"\n')
    (tmp_path / "flag.toml").write_text('state_dir = "/from/flag"\n')
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("AUDIODROP_CONFIG", raising=False)
    assert load_settings().state_dir == Path("/from/xdg")
    monkeypatch.setenv("AUDIODROP_CONFIG", str(tmp_path / "env.toml"))
    assert load_settings().state_dir == Path("/from/env")
    assert load_settings(tmp_path / "flag.toml").state_dir == Path("/from/flag")


def test_every_problem_is_reported_at_once_with_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        'state_dr = "/typo"\n'
        "[gemini]\nstorage_limit_bytes = \"lots\"\nexpiry_margin = 5\n"
        "[[watch]]\nrecursive = true\n"
        '[[watch]]\npath = "/x"\nprompts = ["nonexistent"]\n'
        '[conversion]\nformat = "wav"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert str(path) in message
    for expected in ("state_dr: unknown key", "gemini.storage_limit_bytes: expected an integer, got 'lots'",
                     "gemini.expiry_margin: unknown key", "watch[0].path: missing (the folder to watch)",
                     "watch[1].prompts[0]: unknown template 'nonexistent'",
                     "conversion.format: expected one of opus, vorbis, mp3, got 'wav'"):
        assert expected in message
    assert len(caught.value.problems) == 6


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("state_dir = \n")
    with pytest.raises(ConfigError, match="(?s)broken.toml.*not valid TOML: Invalid value"):
        load_settings(path)


def test_missing_config_file_named_by_flag_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_user_templates_extend_the_builtin_ones(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[templates.minutes]\nprompt = "Write minutes."\nmodel = "gemini-2.5-pro"\n'
                    '[templates.summarize]\nprompt = "Three bullets."\n'
                    '[[watch]]\npath = "/in"\nprompts = ["minutes", "transcribe"]\n')
    settings = load_settings(path)
    assert settings.templates["minutes"].model == "gemini-2.5-pro"
    assert settings.templates["summarize"].prompt == "Three bullets."
    assert settings.watches[0].prompts == ("minutes", "transcribe")


def test_api_key_sources_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(variable, raising=False)
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    config = tmp_path / "c.toml"
    config.write_text(f'[gemini]\napi_key_file = "{key_file}"\n')
    settings = load_settings(config)
    assert find_api_key(settings) == ("from-file", f"gemini.api_key_file ({key_file})")
    monkeypatch.setenv("GOOGLE_API_KEY", "from-google")
    assert find_api_key(settings)[0] == "from-google"
    monkeypatch.setenv("GEMINI_API_KEY", "from-gemini")
    assert find_api_key(settings) == ("from-gemini", "$GEMINI_API_KEY")


def test_systemd_credential_is_a_key_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("GEMINI_API_KEY", "GOOGLE_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    (tmp_path / "gemini-api-key").write_text("from-credential")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    config = tmp_path / "c.toml"
    config.write_text("")
    assert find_api_key(load_settings(config)) == ("from-credential", "systemd credential gemini-api-key")


def test_the_readme_configuration_reference_is_a_valid_file_with_every_setting(tmp_path: Path) -> None:
    """The README's reference block is what newcomers copy: it must load, and name every key the schema has, each
    in its own table (`python -m daemon.config` prints the block as the schema renders it)."""
    from daemon.config import schema_keys

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Configuration", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "config.toml").write_text(block, encoding="utf-8")
    settings = load_settings(tmp_path / "config.toml")
    assert settings.prompts.thinking_budget == 1024 and "minutes" in settings.templates
    for header, keys in schema_keys().items():
        assert not header or header in block, f"README's reference has no {header} table"
        section = (block.split(header, 1)[1] if header else block).split("\n[", 1)[0]
        missing = [key for key in keys if f"{key} =" not in section]
        assert not missing, f"README's {header or 'top level'} does not mention {missing}"
