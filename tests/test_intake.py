from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import IntakeSettings, Settings
from daemon.pipeline import intake
from db.models import Recording
from tests.conftest import T0


@pytest.mark.parametrize("name", [".hidden.wav", "talk.wav.part", "talk.wav.crdownload", "~$talk.wav",
                                  ".syncthing.talk.wav.tmp", "talk.tmp", ".talk.partial-ab12.ogg"])
def test_partial_and_hidden_names_are_ignored(name: str) -> None:
    assert intake.is_ignored_name(name)


@pytest.mark.parametrize("name", ["talk.wav", "Interview 2026-11-25.m4a", "-dash.mp3", "ünïcödé 日本語.flac"])
def test_ordinary_names_are_taken(name: str) -> None:
    assert not intake.is_ignored_name(name)


def test_settle_needs_quiet_after_close_or_a_longer_quiet_without() -> None:
    rules = IntakeSettings(close_quiet_seconds=1.0, settle_seconds=5.0)
    after = lambda seconds: T0 + timedelta(seconds=seconds)  # noqa: E731
    assert not intake.is_settled(closed_after_write=True, last_change_at=T0, now=after(0.5), intake=rules)
    assert intake.is_settled(closed_after_write=True, last_change_at=T0, now=after(1.0), intake=rules)
    assert not intake.is_settled(closed_after_write=False, last_change_at=T0, now=after(4.9), intake=rules)
    assert intake.is_settled(closed_after_write=False, last_change_at=T0, now=after(5.0), intake=rules)


def test_filters_include_exclude_and_own_output(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    inbox = tmp_path / "inbox"
    settings = make_settings(watch=[{"path": str(inbox), "exclude": ["*.txt", "private/*"]}],
                             state_dir=str(inbox / "state"), results_dir=str(inbox / "results"))
    for relative in ("a.wav", "notes.txt", "private/b.wav", "sub/c.mp3", "state/converted/x.ogg",
                     "results/x.md", ".git/d.wav"):
        (inbox / relative).parent.mkdir(parents=True, exist_ok=True)
        (inbox / relative).write_bytes(b"data")
    found = sorted(str(c.path.relative_to(inbox)) for c in intake.scan(settings))
    assert found == ["a.wav", "sub/c.mp3"]


def test_non_recursive_watch_ignores_subfolders(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    inbox = tmp_path / "inbox"
    settings = make_settings(watch=[{"path": str(inbox), "recursive": False}])
    (inbox / "sub").mkdir(parents=True)
    (inbox / "top.wav").write_bytes(b"1")
    (inbox / "sub" / "deep.wav").write_bytes(b"2")
    assert [c.path.name for c in intake.scan(settings)] == ["top.wav"]


def test_symlink_out_of_the_folder_is_not_followed(tmp_path: Path, settings: Settings) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    secret = tmp_path / "secret.wav"
    secret.write_bytes(b"secret")
    (inbox / "escape.wav").symlink_to(secret)
    (inbox / "real.wav").write_bytes(b"ok")
    (inbox / "inside.wav").symlink_to(inbox / "real.wav")
    assert sorted(c.path.name for c in intake.scan(settings)) == ["inside.wav", "real.wav"]


def test_fifo_and_devices_are_not_candidates(tmp_path: Path, settings: Settings) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    os.mkfifo(inbox / "pipe.wav")
    assert intake.scan(settings) == []


def test_observe_tracks_growth_and_close(tmp_path: Path, settings: Settings, sessions: sessionmaker[Session]) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    path = inbox / "growing.wav"
    path.write_bytes(b"a" * 10)
    with sessions() as session:
        intake.observe(session, intake.candidate(path, settings), closed=False, now=T0, settings=settings)
        with open(path, "ab") as stream:
            stream.write(b"b" * 10)
        later = T0 + timedelta(seconds=3)
        intake.observe(session, intake.candidate(path, settings), closed=True, now=later, settings=settings)
        session.commit()
        rows = session.scalars(select(Recording)).all()
        assert len(rows) == 1
        assert (rows[0].source_size, rows[0].closed_after_write, rows[0].last_change_at) == (20, True, later)


def test_known_file_is_not_taken_again_but_a_reused_name_is(tmp_path: Path, settings: Settings,
                                                            sessions: sessionmaker[Session]) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    path = inbox / "Recording.m4a"
    path.write_bytes(b"first")
    with sessions() as session:
        intake.observe(session, intake.candidate(path, settings), closed=True, now=T0, settings=settings)
        session.execute(Recording.__table__.update().values(state="active"))
        intake.observe(session, intake.candidate(path, settings), closed=False, now=T0, settings=settings)
        assert len(session.scalars(select(Recording)).all()) == 1
        first_mtime = path.stat().st_mtime_ns
        path.write_bytes(b"a new recording, same name")
        os.utime(path, ns=(first_mtime + 1_000_000_000, first_mtime + 1_000_000_000))  # written a second later
        intake.observe(session, intake.candidate(path, settings), closed=True, now=T0, settings=settings)
        assert len(session.scalars(select(Recording)).all()) == 2


def test_open_for_writing_sees_a_writer_holding_the_file(tmp_path: Path) -> None:
    path = tmp_path / "held.wav"
    path.write_bytes(b"")
    # The writer says when it holds the file open, then waits for its standard input to close.
    writer = subprocess.Popen([sys.executable, "-c", f"import sys; f = open({str(path)!r}, 'ab'); print('open', "
                               "flush=True); sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "open\n"
        assert intake.open_for_writing(path)
    finally:
        writer.communicate(timeout=30)  # closes its standard input: it exits, closing the file
    assert not intake.open_for_writing(path)


def test_a_folder_replaced_by_a_symlink_out_of_the_drop_folder_is_not_followed(
        tmp_path: Path, settings: Settings, sessions: sessionmaker[Session]) -> None:
    inbox, outside = tmp_path / "inbox", tmp_path / "elsewhere"
    (inbox / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "private.wav").write_bytes(b"audio the daemon may read but must not upload")
    (inbox / "sub").rmdir()
    (inbox / "sub").symlink_to(outside, target_is_directory=True)

    assert intake.scan_folder(inbox / "sub", settings) == [], "the rescan a new folder triggers"
    assert intake.candidate(inbox / "sub" / "private.wav", settings) is None, "an event for a file in it"
    assert intake.scan_and_observe(sessions, settings, now=T0) == 0
    with sessions() as session:
        assert session.scalars(select(Recording)).all() == []


def test_one_name_that_is_not_utf8_fails_alone_and_the_rest_is_taken(
        tmp_path: Path, settings: Settings, sessions: sessionmaker[Session]) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "good.wav").write_bytes(b"fine")
    bad = Path(os.fsdecode(os.fsencode(inbox) + b"/caf\xe9.wav"))
    bad.write_bytes(b"latin-1 named")
    for path in (bad, inbox / "good.wav"):
        intake.take(sessions, path, settings, now=T0, closed=True)
    intake.scan_and_observe(sessions, settings, now=T0)
    with sessions() as session:
        rows = {row.source_path: row for row in session.scalars(select(Recording))}
    assert set(rows) == {str(inbox / "good.wav"), f"{inbox}/caf\\xe9.wav"}
    assert rows[str(inbox / "good.wav")].state == "discovered"
    refused = rows[f"{inbox}/caf\\xe9.wav"]
    assert refused.state == "rejected" and "not valid UTF-8" in (refused.error or "")


def test_a_merge_never_drops_a_recording_that_has_its_own_content(sessions: sessionmaker[Session]) -> None:
    from daemon.errors import IllegalTransition
    from daemon.pipeline import lifecycle

    with sessions() as session:
        original = lifecycle.discover(session, path="/in/a.wav", size=1, mtime_ns=1, watch_root="/in",
                                      closed_after_write=True, now=T0)
        converted = lifecycle.discover(session, path="/in/b.wav", size=1, mtime_ns=2, watch_root="/in",
                                       closed_after_write=True, now=T0)
        converted.sha256, converted.converted_path = "f" * 64, "/state/converted/x.ogg"
        session.flush()
        with pytest.raises(IllegalTransition):
            lifecycle.merge_duplicate(session, converted, original.id, now=T0)
