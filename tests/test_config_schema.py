"""The settings schema itself: bounds, allowed values, the keys the issues add, and the rendered reference."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from daemon.config import (
    ConversionSettings,
    GeminiSettings,
    IntakeSettings,
    PromptSettings,
    Settings,
    Watch,
    load_settings,
    reference_markdown,
    schema_keys,
)
from daemon.errors import ConfigError
from daemon.pipeline.transcode import FORMATS


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert caught.value.path == str(path)
    return caught.value.problems


def load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    return load_settings(path)


@pytest.fixture(autouse=True)
def _no_database_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUDIODROP_DATABASE_URL", raising=False)


def test_bounds_and_types_are_each_reported_with_the_key(tmp_path: Path) -> None:
    found = problems(tmp_path, "[gemini]\nstorage_limit_bytes = -1\nupload_workers = true\n"
                               "request_timeout_seconds = \"60\"\n[[watch]]\npath = \"/in\"\npoll = \"yes\"\n"
                               "[prompts]\nthinking_budget = -2\n")
    assert found == ["watch[0].poll: expected a boolean (true or false), got 'yes'",
                     "gemini.storage_limit_bytes: must be greater than 0, got -1",
                     "gemini.request_timeout_seconds: expected a number, got '60'",
                     "gemini.upload_workers: expected an integer, got True",
                     "prompts.thinking_budget: must be at least -1, got -2"]


def test_toml_integers_are_accepted_where_a_float_is_expected(tmp_path: Path) -> None:
    settings = load(tmp_path, "[intake]\nsettle_seconds = 3\n[gemini]\nrequest_timeout_seconds = 30\n")
    assert settings.intake.settle_seconds == 3.0 and isinstance(settings.intake.settle_seconds, float)
    assert settings.gemini.request_timeout_seconds == 30.0


def test_conversion_formats_are_the_transcode_modules(tmp_path: Path) -> None:
    for name in FORMATS:
        settings = load(tmp_path, f'[conversion]\nformat = "{name}"\nfallback_format = "{name}"\n')
        assert settings.conversion.format == settings.conversion.fallback_format == name
    assert problems(tmp_path, '[conversion]\nfallback_format = "flac"\n') == [
        f"conversion.fallback_format: expected one of {', '.join(FORMATS)}, got 'flac'"]


def test_generate_timeout_defaults_to_ten_minutes_and_must_be_positive(tmp_path: Path) -> None:
    assert load(tmp_path, "").prompts.generate_timeout_seconds == 600.0
    assert load(tmp_path, "[prompts]\ngenerate_timeout_seconds = 1800\n").prompts.generate_timeout_seconds == 1800.0
    assert problems(tmp_path, "[prompts]\ngenerate_timeout_seconds = 0\n") == [
        "prompts.generate_timeout_seconds: must be greater than 0, got 0"]


def test_database_url_is_absent_sqlite_or_postgresql_through_psycopg(tmp_path: Path) -> None:
    assert load(tmp_path, "").database_url is None
    url = "postgresql+psycopg://audiodrop@db.example:5432/audiodrop"
    assert load(tmp_path, f'database_url = "{url}"\n').database_url == url
    assert load(tmp_path, 'database_url = "sqlite:////var/lib/x.db"\n').database_url == "sqlite:////var/lib/x.db"
    for wrong in ("postgresql://me:hunter2@db/audiodrop", "mysql://me:hunter2@db/x", "me:hunter2@db/x",
                  "postgresql+psycopg://me:hunter2@/"):
        [problem] = problems(tmp_path, f'database_url = "{wrong}"\n')
        assert problem.startswith("database_url: ") and "use postgresql+psycopg://USER@HOST:PORT/DB" in problem
        assert "hunter2" not in problem


def test_the_database_url_variable_overrides_the_file_and_is_named_in_problems(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDIODROP_DATABASE_URL", "postgresql+psycopg://fleet@db:5432/audiodrop")
    assert load(tmp_path, 'database_url = "sqlite:////x.db"\n').database_url.startswith("postgresql+psycopg://fleet")
    monkeypatch.setenv("AUDIODROP_DATABASE_URL", "postgres://fleet@db/audiodrop")
    [problem] = problems(tmp_path, "")
    assert problem.startswith("$AUDIODROP_DATABASE_URL: the scheme 'postgres' is not supported")


def test_paths_expand_home_and_variables_and_drop_folders_are_absolute(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SPOOL", str(tmp_path / "spool"))
    monkeypatch.chdir(tmp_path)
    settings = load(tmp_path, 'state_dir = "~/state"\n[gemini]\napi_key_file = "$SPOOL/key"\n'
                              '[[watch]]\npath = "relative/inbox"\n')
    assert settings.state_dir == tmp_path / "home" / "state"
    assert settings.results_dir == tmp_path / "home" / "state" / "results"
    assert settings.gemini.api_key_file == tmp_path / "spool" / "key"
    assert settings.watches[0].path == tmp_path / "relative" / "inbox"


def test_the_file_cannot_set_what_is_not_a_key(tmp_path: Path) -> None:
    found = problems(tmp_path, 'source = "/elsewhere"\nwatches = []\n[templates.minutes]\nprompt = "x"\nname = "y"\n'
                               '[gemini]\napi_key = "secret"\n')
    assert [problem.split(" (")[0] for problem in found] == [
        "gemini.api_key: unknown key", "templates.minutes.name: unknown key", "source: unknown key",
        "watches: unknown key"]


def test_templates_are_named_after_their_table_and_redefining_a_builtin_keeps_its_prompt(tmp_path: Path) -> None:
    settings = load(tmp_path, '[templates.summarize]\nmodel = "gemini-2.5-pro"\n[templates.minutes]\nprompt = "M"\n')
    assert settings.templates["summarize"].name == "summarize"
    assert settings.templates["summarize"].prompt.startswith("Summarize this recording")
    assert settings.templates["minutes"].name == "minutes"
    assert problems(tmp_path, '[templates.minutes]\nprompt = ""\n[templates.notes]\nmodel = "m"\n') == [
        "templates.minutes.prompt: must not be empty",
        "templates.notes.prompt: missing (the text sent with the audio)"]


def test_settings_are_frozen_and_replace_keeps_the_rest(tmp_path: Path) -> None:
    """service.reload() keeps the old state and results folders with dataclasses.replace."""
    settings = load(tmp_path, '[[watch]]\npath = "/in"\nprompts = ["summarize"]\n')
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.state_dir = tmp_path  # type: ignore[misc]
    moved = dataclasses.replace(settings, state_dir=tmp_path / "old", results_dir=tmp_path / "old-results")
    assert moved.state_dir == tmp_path / "old" and moved.database_path == tmp_path / "old" / "audiodrop.db"
    assert (moved.source, moved.watches, moved.templates) == (settings.source, settings.watches, settings.templates)
    assert dataclasses.replace(settings.gemini, base_url="http://x").base_url == "http://x"


def test_every_key_has_a_description() -> None:
    for cls in (Settings, Watch, GeminiSettings, ConversionSettings, IntakeSettings, PromptSettings):
        undocumented = [name for name, field in cls.__pydantic_fields__.items()
                        if not field.exclude and not field.description]
        assert not undocumented, f"{cls.__name__}: {undocumented}"


def test_the_rendered_reference_loads_to_the_defaults_it_shows(tmp_path: Path) -> None:
    text = reference_markdown()
    assert text.startswith("```toml\n") and text.endswith("```\n")
    body = text.removeprefix("```toml\n").removesuffix("```\n")
    data = tomllib.loads(body)
    assert set(data["gemini"]) < set(schema_keys()["[gemini]"])  # the commented-out keys are not set
    (tmp_path / "empty.toml").write_text("")
    defaults = load_settings(tmp_path / "empty.toml")
    settings = load(tmp_path, body)
    for table in ("gemini", "intake", "prompts"):
        assert getattr(settings, table) == getattr(defaults, table)
    for key in schema_keys()["[prompts]"]:
        assert f"\n{key} = " in text
