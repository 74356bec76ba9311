"""Folder profiles (.audiodrop.toml at the root of a drop folder): what they may set, how a broken one is reported
and ignored while the folder keeps working, that a changed one is read again, that the file is never taken as a
recording, and end to end that the daemon runs a profile's prompts with its glossary."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from daemon import profiles
from daemon.config import Settings
from daemon.errors import ConfigError
from daemon.pipeline import intake, lifecycle
from daemon.prompts import queue
from db.models import Prompt, PromptRecording, Recording
from db.session import session_scope
from tests import media
from tests.conftest import T0
from tests.emulator import Emulator
from tests.harness import DaemonProcess, wait_until

GLOSSARY = {"Ana Lima": "head of research", "Kubernetes": "", "Ouagadougou": "a city"}


def profile(folder: Path, text: str) -> Path:
    path = folder / profiles.PROFILE_NAME
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def two_folders(tmp_path: Path, make_settings: Callable[..., Settings]) -> tuple[Settings, Path, Path]:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    settings = make_settings(watch=[{"path": str(first), "prompts": ["brief"]}, {"path": str(second)}],
                             templates={"brief": {"prompt": "Say it briefly."}})
    return settings, first, second


def problems(path: Path, settings: Settings, watch_index: int = 0) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        profiles.load_profile(path, settings.watches[watch_index], settings)
    assert caught.value.path == str(path)
    return caught.value.problems


# -- what a profile may set, and its errors ---------------------------------------------------------------------


def test_every_problem_in_a_profile_is_reported_at_once_with_its_key(two_folders: tuple[Settings, Path, Path]) -> None:
    settings, first, _ = two_folders
    path = profile(first, 'prompts = ["brief", "nope"]\ncolour = "red"\ntrimming = "yes"\nglossary = 3\n'
                          'source_action = "shred"\n[templates.notes]\nmodel = "gemini-2.5-pro"\n')
    assert problems(path, settings) == [
        "prompts[1]: unknown template 'nope' (known: brief, notes, summarize, transcribe)",
        "templates.notes.prompt: missing (the text sent with the audio)",
        'glossary: expected a list of names or a table of name = "short description", got 3',
        "trimming: expected a boolean (true or false), got 'yes'",
        "source_action: expected 'keep', 'move' or 'delete', got 'shred'",
        "colour: unknown key (allowed: prompts, templates, glossary, trimming, source_action, source_when, "
        "move_to)"]


@pytest.mark.parametrize(("text", "problem"), [
    ('prompts = ["brief"\n', "is not valid TOML: "),
    ("glossary = [\"Ana\", 4]\n", "glossary: entry 2 is not a name (a non-empty string): 4"),
    ('glossary = {"Ana" = 4}\n', "glossary: 'Ana': expected a string (a short description), got 4"),
    ('glossary = ["' + "x" * 20_001 + '"]\n', "glossary: 20087 characters, more than 20000"),
    ('source_action = "move"\n', 'source_action: "move" needs move_to, here or in the [[watch]] table of '),
    ('source_when = "later"\n', "source_when: expected 'converted' or 'prompts_done', got 'later'"),
])
def test_a_broken_profile_names_the_cause(two_folders: tuple[Settings, Path, Path], text: str, problem: str) -> None:
    settings, first, _ = two_folders
    [found] = problems(profile(first, text), settings)
    assert found.startswith(problem), found


def test_a_profile_that_is_a_symlink_not_utf8_or_huge_is_refused(two_folders: tuple[Settings, Path, Path],
                                                                  tmp_path: Path) -> None:
    settings, first, _ = two_folders
    elsewhere = tmp_path / "secret.toml"
    elsewhere.write_text('prompts = ["brief"]\n')
    (first / profiles.PROFILE_NAME).symlink_to(elsewhere)
    assert problems(first / profiles.PROFILE_NAME, settings) == [
        "is a symlink, which is not followed; put the file itself there"]
    (first / profiles.PROFILE_NAME).unlink()
    (first / profiles.PROFILE_NAME).write_bytes(b'prompts = ["\xff"]\n')
    assert problems(first / profiles.PROFILE_NAME, settings)[0].startswith("is not UTF-8 text")
    (first / profiles.PROFILE_NAME).write_bytes(b"#" * (profiles.MAX_PROFILE_BYTES + 1))
    assert problems(first / profiles.PROFILE_NAME, settings)[0].startswith("is 262145 bytes, more than")


def test_move_to_inside_a_drop_folder_or_the_daemons_own_folders_is_refused(
        two_folders: tuple[Settings, Path, Path]) -> None:
    settings, first, second = two_folders
    for where, folder in (("done", first), ("../second/done", second), (str(second), second)):
        [found] = problems(profile(first, f'source_action = "move"\nmove_to = "{where}"\n'), settings)
        assert found.startswith(f"move_to: {os.path.normpath(first / where)} is inside the drop folder {folder}, "
                                "where moved sources would be taken again"), found
    [found] = problems(profile(first, f'source_action = "move"\nmove_to = "{settings.state_dir}/x"\n'), settings)
    assert found == f"move_to: {settings.state_dir}/x is inside the daemon's own folder {settings.state_dir}; " \
                    "name another"


def test_every_profile_key_is_described() -> None:
    fields = profiles.Profile.__pydantic_fields__
    assert list(fields) == ["prompts", "templates", "glossary", "trimming", "source_action", "source_when",
                            "move_to"]
    assert all(field.description for field in fields.values())


# -- the folder's rules -------------------------------------------------------------------------------------------


def test_a_broken_profile_is_ignored_and_the_folder_keeps_its_settings(
        two_folders: tuple[Settings, Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    settings, first, _ = two_folders
    path = profile(first, "prompts = [\n")
    rules = profiles.rules_for(settings, str(first))
    assert (rules.state, rules.prompts, rules.source_action) == ("ignored", ("brief",), "keep")
    assert rules.error is not None and rules.error.startswith("is not valid TOML")
    assert f"{path}: folder profile ignored, the settings of {first} from {settings.source} stay in force: is not " \
           "valid TOML" in caplog.text
    caplog.clear()
    assert profiles.rules_for(settings, str(first)) is rules and caplog.text == ""  # said once, not at every look
    assert profiles.statuses(settings) == [{"folder": str(first), "path": str(path), "state": "ignored",
                                            "error": rules.error}]


def test_a_profile_overrides_its_watch_table_and_is_read_again_when_it_changes(
        two_folders: tuple[Settings, Path, Path], tmp_path: Path) -> None:
    settings, first, _ = two_folders
    assert profiles.rules_for(settings, str(first)).state == "none" and profiles.statuses(settings) == []
    path = profile(first, 'prompts = ["summarize", "notes"]\nsource_action = "move"\nmove_to = "../done"\n'
                          'source_when = "prompts_done"\ntrimming = false\n[templates.notes]\nprompt = "Notes."\n')
    rules = profiles.rules_for(settings, str(first))
    assert (rules.state, rules.prompts, rules.source_action, rules.source_when, rules.move_to, rules.trimming) == (
        "loaded", ("summarize", "notes"), "move", "prompts_done", tmp_path / "done", False)
    assert profiles.statuses(settings) == [{"folder": str(first), "path": str(path), "state": "loaded",
                                            "error": None}]

    path.write_text('prompts = []\n', encoding="utf-8")  # an edit: read again at the next look
    rules = profiles.rules_for(settings, str(first))
    assert (rules.prompts, rules.source_action, rules.move_to, rules.trimming) == ((), "keep", None, None)
    path.unlink()
    assert profiles.rules_for(settings, str(first)).prompts == ("brief",)


def test_profile_templates_are_seen_only_by_their_folder_and_a_builtin_keeps_its_prompt(
        two_folders: tuple[Settings, Path, Path]) -> None:
    settings, first, second = two_folders
    profile(first, '[templates.notes]\nprompt = "Notes."\n[templates.summarize]\nmodel = "gemini-2.5-pro"\n')
    mine, theirs = profiles.rules_for(settings, str(first)), profiles.rules_for(settings, str(second))
    assert mine.templates["notes"].prompt == "Notes." and mine.templates["notes"].name == "notes"
    assert mine.templates["summarize"].model == "gemini-2.5-pro"
    assert mine.templates["summarize"].prompt == settings.templates["summarize"].prompt
    assert "notes" not in theirs.templates and "notes" not in settings.templates
    assert theirs.templates["summarize"].model is None
    # A profile in the other folder cannot run this folder's templates.
    [found] = problems(profile(second, 'prompts = ["notes"]\n'), settings, watch_index=1)
    assert found.startswith("prompts[0]: unknown template 'notes'")


def test_trimming_the_profile_decides_then_the_template_then_the_default(
        tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    settings = make_settings(watch=[{"path": str(inbox)}], templates={"raw": {"prompt": "R", "trim": False}})
    recording = Recording(watch_root=str(inbox))
    default = queue.trims(settings, settings.templates["transcribe"], "transcribe")
    assert profiles.trim_for(settings, recording, "transcribe") == default
    assert profiles.trim_for(settings, recording, "raw") is False
    profile(inbox, "trimming = true\n")
    assert profiles.trim_for(settings, recording, "raw") is True
    profile(inbox, "trimming = false\n")
    assert profiles.trim_for(settings, settings.watches[0], "transcribe") is False
    assert profiles.trim_for(settings, None, "raw") is False  # a recording of no configured folder


def test_the_glossary_goes_into_the_system_instruction_of_every_prompt_of_the_folder(
        tmp_path: Path, make_settings: Callable[..., Settings], sessions: sessionmaker[Session]) -> None:
    inbox, other = tmp_path / "inbox", tmp_path / "other"
    inbox.mkdir()
    other.mkdir()
    settings = make_settings(watch=[{"path": str(inbox)}, {"path": str(other), "prompts": ["brief"]}],
                             templates={"brief": {"prompt": "B", "system_instruction": "Be brief."}})
    profile(inbox, 'prompts = ["brief", "notes"]\nglossary = ["Ana Lima", "Kubernetes"]\n'
                   '[templates.notes]\nprompt = "Notes."\n')
    with session_scope(sessions) as session:
        here = lifecycle.discover(session, path=str(inbox / "a.wav"), size=1, mtime_ns=1, watch_root=str(inbox),
                                  closed_after_write=True, now=T0)
        there = lifecycle.discover(session, path=str(other / "b.wav"), size=1, mtime_ns=1, watch_root=str(other),
                                   closed_after_write=True, now=T0)
        for recording in (here, there):
            queue.enqueue_watch_prompts(session, settings, recording, now=T0)
            queue.enqueue_watch_prompts(session, settings, recording, now=T0)  # once per recording
        glossary = queue.glossary_for(settings, here)
        assert glossary == f"{profiles.GLOSSARY_HEADER}\n- Ana Lima\n- Kubernetes"
        assert queue.glossary_for(settings, there) is None
        rows = session.execute(select(PromptRecording.recording_id, Prompt.template, Prompt.system_instruction)
                               .join(Prompt, Prompt.id == PromptRecording.prompt_id).order_by(Prompt.id)).all()
    assert [tuple(r) for r in rows] == [(here.id, "brief", f"Be brief.\n\n{glossary}"), (here.id, "notes", glossary),
                                        (there.id, "brief", "Be brief.")]
    assert queue.with_glossary(f"Be brief.\n\n{glossary}", glossary) == f"Be brief.\n\n{glossary}"  # never twice
    assert queue.with_glossary(None, None) is None


def test_a_glossary_table_keeps_each_names_description(two_folders: tuple[Settings, Path, Path]) -> None:
    settings, first, _ = two_folders
    profile(first, "[glossary]\n" + "".join(f'"{name}" = "{about}"\n' for name, about in GLOSSARY.items()))
    assert profiles.rules_for(settings, str(first)).glossary == "\n".join([
        profiles.GLOSSARY_HEADER, "- Ana Lima: head of research", "- Kubernetes", "- Ouagadougou: a city"])


# -- never a recording --------------------------------------------------------------------------------------------


def test_the_profile_is_never_taken_as_a_recording_at_any_depth(
        tmp_path: Path, settings: Settings, sessions: sessionmaker[Session]) -> None:
    inbox = settings.watches[0].path
    (inbox / "deeper" / "still").mkdir(parents=True)
    paths = [profile(inbox, "prompts = [\n"), profile(inbox / "deeper" / "still", 'prompts = ["summarize"]\n')]
    assert intake.is_ignored_name(profiles.PROFILE_NAME)
    assert [intake.candidate(path, settings) for path in paths] == [None, None]
    for path in paths:
        assert intake.take(sessions, path, settings, now=T0, closed=True, created=True) is None
        assert intake.take(sessions, path, settings, now=T0, moved_from=path.with_name("draft.toml")) is None
    assert intake.scan_and_observe(sessions, settings, now=T0) == 0
    with session_scope(sessions) as session:
        assert session.scalars(select(Recording)).all() == []  # no recording, no rejected row


# -- end to end ---------------------------------------------------------------------------------------------------


def _prompts(daemon: DaemonProcess) -> list[tuple[Any, ...]]:
    uri = f"file:{daemon.folder / 'state' / 'audiodrop.db'}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, timeout=10)) as connection:
        return connection.execute("SELECT template, state FROM prompts ORDER BY id").fetchall()


def _drop(tmp_path: Path, daemon: DaemonProcess, name: str, seconds: float) -> None:
    media.make_tone(tmp_path / name, seconds).rename(daemon.inbox / name)


@pytest.mark.slow
def test_the_daemon_runs_a_profiles_prompts_ignores_a_broken_one_and_reloads_an_edited_one(
        tmp_path: Path, emulator: Emulator) -> None:
    folder = tmp_path / "d"
    daemon = DaemonProcess(folder, base_url=emulator.base_url, watch=[{"path": str(folder / "inbox"),
                                                                       "prompts": ["brief"]}],
                           templates={"brief": {"prompt": "Say it briefly."}})
    path = profile(daemon.inbox, 'prompts = ["brief"\n')  # broken from the start
    daemon.start()
    try:
        [status] = daemon.cli("status", "--json")["profiles"]
        assert (status["path"], status["state"]) == (str(path), "ignored")
        assert status["error"].startswith("is not valid TOML")
        wait_until(lambda: f"{path}: folder profile ignored" in daemon.log(), 10, message="the warning")
        _drop(tmp_path, daemon, "first.wav", 1.0)  # the folder keeps working, with the main config's prompts
        wait_until(lambda: _prompts(daemon) == [("brief", "done")], 60, message="the folder's own prompt")

        profile(daemon.inbox, '# edited while the daemon runs\nprompts = ["notes"]\n'
                              'glossary = {"Ana Lima" = "head of research"}\n'
                              '[templates.notes]\nprompt = "Write notes."\nsystem_instruction = "Be exact."\n')
        wait_until(lambda: f"{path}: folder profile reloaded (prompts notes, a glossary)" in daemon.log(), 10,
                   message="the watcher to see the edit")
        assert daemon.cli("status", "--json")["profiles"][0]["state"] == "loaded"
        _drop(tmp_path, daemon, "second.wav", 1.5)
        wait_until(lambda: _prompts(daemon)[1:] == [("notes", "done")], 60, message="the profile's prompt")
        notes = emulator.generate_requests[-1]
        assert [part.text for part in notes.parts if part.kind == "text"] == ["Write notes."]
        assert notes.system_instruction == "Be exact.\n\n" + "\n".join([
            profiles.GLOSSARY_HEADER, "- Ana Lima: head of research"])

        profile(daemon.inbox, 'prompts = ["notes"]\nwhatever = 1\n')  # an unknown key: ignored again
        wait_until(lambda: "whatever: unknown key" in daemon.log(), 10, message="the warning")
        _drop(tmp_path, daemon, "third.wav", 2.0)
        wait_until(lambda: _prompts(daemon)[2:] == [("brief", "done")], 60, message="the main config's prompt")

        items = daemon.files()
        assert sorted(Path(item["source_path"]).name for item in items) == ["first.wav", "second.wav", "third.wav"]
        assert {item["state"] for item in items} == {"active"}  # the profile was never a recording, nor rejected
    finally:
        daemon.stop()
