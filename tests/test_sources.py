"""What becomes of a source file once its recording is done: kept, moved or deleted, as its drop folder says, only
ever the very file that was taken, crash-safe, and never before the result is stored.

In-process tests drive daemon.pipeline.sources on a real migrated database and real files; the end-to-end ones run
`audiodrop run` against the emulator; the crash tests kill a process with SIGKILL between the steps of an action
and let a real daemon finish the work.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from contextlib import closing
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Settings, load_settings
from daemon.context import Context
from daemon.errors import ConfigError
from daemon.pipeline import lifecycle, sources
from db.models import Prompt, Recording, RecordingEvent
from db.session import make_engine, make_sessionmaker, session_scope, upgrade_to_head
from db.states import PromptState as P
from db.states import RecordingState as S
from tests import media
from tests.conftest import T0, write_config
from tests.emulator import Emulator, Fault
from tests.harness import API_KEY, ROOT, DaemonProcess, wait_until

ODD_NAMES = ["memo with spaces.wav", "ünïcødé 会议.wav", "-starts-with-dash.wav", "quote'and\"double.wav",
             "no extension", "new\nline.wav", "a;b&c$(d).wav"]


# -- helpers --------------------------------------------------------------------------------------------------


def taken(sessions: sessionmaker[Session], settings: Settings, path: Path, *, state: S = S.CONVERTED,
          copy: bool = True) -> int:
    """A recording of `path` as the daemon takes and converts one: its identity recorded, a compact copy stored."""
    info = os.stat(path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    converted = settings.converted_dir / f"{sha[:24]}.ogg"
    if copy:
        converted.parent.mkdir(parents=True, exist_ok=True)
        converted.write_bytes(b"OggS compact copy")
    watch = next(w for w in settings.watches if w.path in path.parents)
    with session_scope(sessions) as session:
        recording = lifecycle.discover(session, path=str(path), size=info.st_size, mtime_ns=info.st_mtime_ns,
                                       dev=info.st_dev, ino=info.st_ino, watch_root=str(watch.path),
                                       closed_after_write=True, now=T0, node=settings.service.node_name)
        lifecycle.advance(session, recording.id, expected=S.DISCOVERED, to=S.CONVERTING, now=T0)
        lifecycle.advance(session, recording.id, expected=S.CONVERTING, to=S.CONVERTED, now=T0, sha256=sha,
                          converted_path=str(converted), converted_sha256=sha)
        if state is not S.CONVERTED:
            lifecycle.advance(session, recording.id, expected=S.CONVERTED, to=S.UPLOADING, now=T0)
            lifecycle.advance(session, recording.id, expected=S.UPLOADING, to=state, now=T0)
        return recording.id


def context(settings: Settings, sessions: sessionmaker[Session], **extra: Any) -> Context:
    return Context(settings=settings, sessions=sessions, client=None, node=settings.service.node_name,
                   holder=f"{settings.service.node_name}/test", **extra)


def run_sources(ctx: Context) -> int:
    """One pass of the engine's source work: the sweep, then every claim run. Returns how many were claimed."""
    kind = sources.SourceKind(ctx, lambda now: now + timedelta(seconds=60))
    with session_scope(ctx.sessions) as session:
        kind.mark_kept(session, ctx.now())
        claims = kind.claim(session, ctx.now(), 20)
    for claim in claims:
        kind.run(claim)
    return len(claims)


def row(sessions: sessionmaker[Session], recording_id: int) -> Recording:
    with session_scope(sessions) as session:
        recording = session.get(Recording, recording_id)
        assert recording is not None
        session.expunge(recording)
        return recording


def reasons(sessions: sessionmaker[Session], recording_id: int) -> list[str]:
    with session_scope(sessions) as session:
        return list(session.scalars(select(RecordingEvent.reason).where(RecordingEvent.recording_id == recording_id)
                                    .order_by(RecordingEvent.id)))


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    inbox, done = tmp_path / "inbox", tmp_path / "done"
    inbox.mkdir()
    return inbox, done


def moving(make_settings: Callable[..., Settings], inbox: Path, done: Path, **watch: Any) -> Settings:
    return make_settings(watch=[{"path": str(inbox), "source_action": "move", "move_to": str(done), **watch}])


# -- moving and deleting ----------------------------------------------------------------------------------------


def test_move_keeps_the_place_in_the_folder_and_never_overwrites(
        folders: tuple[Path, Path], make_settings: Callable[..., Settings], sessions: sessionmaker[Session]) -> None:
    inbox, done = folders
    settings = moving(make_settings, inbox, done)
    (inbox / "2026" / "march").mkdir(parents=True)
    first = inbox / "2026" / "march" / "memo.wav"
    first.write_bytes(b"first recording")
    (done / "2026" / "march").mkdir(parents=True)
    (done / "2026" / "march" / "memo.wav").write_bytes(b"somebody else's file")
    (done / "2026" / "march" / "memo.2.wav").write_bytes(b"and another")
    rid = taken(sessions, settings, first)

    assert run_sources(context(settings, sessions)) == 1

    target = done / "2026" / "march" / "memo.3.wav"
    assert not first.exists() and target.read_bytes() == b"first recording"
    assert (done / "2026" / "march" / "memo.wav").read_bytes() == b"somebody else's file"
    recording = row(sessions, rid)
    assert (recording.source_action, recording.source_moved_to) == ("moved", str(target))
    assert recording.source_done_at is not None and recording.state == S.CONVERTED
    assert reasons(sessions, rid)[-2:] == [f"source: moving {first} to {target} (the folder's source_action)",
                                           f"source: moved {first} to {target}"]
    assert run_sources(context(settings, sessions)) == 0  # done once


def test_odd_file_names_are_moved_and_deleted_as_they_are(
        folders: tuple[Path, Path], make_settings: Callable[..., Settings], sessions: sessionmaker[Session]) -> None:
    inbox, done = folders
    other = inbox.parent / "other"
    other.mkdir()
    settings = make_settings(watch=[{"path": str(inbox), "source_action": "move", "move_to": str(done)},
                                    {"path": str(other), "source_action": "delete"}])
    moved = {name: taken(sessions, settings, _write(inbox / name)) for name in ODD_NAMES}
    deleted = {name: taken(sessions, settings, _write(other / name)) for name in ODD_NAMES}

    assert run_sources(context(settings, sessions)) == 2 * len(ODD_NAMES)

    assert sorted(os.listdir(done)) == sorted(ODD_NAMES) and os.listdir(inbox) == []
    assert os.listdir(other) == []
    assert {row(sessions, rid).source_action for rid in [*moved.values(), *deleted.values()]} == {"moved", "deleted"}
    for name, rid in deleted.items():
        assert reasons(sessions, rid)[-1] == f"source: deleted {other / name}"


def _write(path: Path, data: bytes | None = None) -> Path:
    path.write_bytes(data if data is not None else os.fsencode(path))
    return path


def test_a_source_replaced_by_another_file_of_the_same_name_is_left_alone(
        folders: tuple[Path, Path], make_settings: Callable[..., Settings], sessions: sessionmaker[Session]) -> None:
    inbox, done = folders
    settings = moving(make_settings, inbox, done)
    source = _write(inbox / "memo.wav", b"the recording taken")
    rid = taken(sessions, settings, source)
    replacement = _write(inbox / "memo.new", b"the recording taken")  # same size, and the same mtime below
    os.utime(replacement, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns))
    os.replace(replacement, source)

    assert run_sources(context(settings, sessions)) == 1

    assert source.read_bytes() == b"the recording taken" and not done.exists()
    recording = row(sessions, rid)
    assert recording.source_action == "kept" and recording.source_done_at is not None
    assert reasons(sessions, rid)[-1] == (f"source: {source} was replaced by another file of the same name since it "
                                          "was taken; left alone, not moved")


def test_a_source_changed_since_it_was_taken_or_gone_is_left_alone(
        folders: tuple[Path, Path], make_settings: Callable[..., Settings], sessions: sessionmaker[Session]) -> None:
    inbox, _ = folders
    settings = make_settings(watch=[{"path": str(inbox), "source_action": "delete"}])
    grown = _write(inbox / "grown.wav", b"short")
    gone = _write(inbox / "gone.wav", b"bytes")
    linked = _write(inbox / "linked.wav", b"bytes!")
    ids = [taken(sessions, settings, path) for path in (grown, gone, linked)]
    with open(grown, "ab") as stream:
        stream.write(b" and longer")
    gone.unlink()
    linked.unlink()
    linked.symlink_to(grown)

    run_sources(context(settings, sessions))

    assert grown.read_bytes() == b"short and longer" and linked.is_symlink()
    assert [row(sessions, rid).source_action for rid in ids] == ["kept", "deleted", "kept"]
    assert reasons(sessions, ids[0])[-1] == f"source: {grown} changed since it was taken; left alone, not deleted"
    assert reasons(sessions, ids[1])[-1] == f"source: {gone} was already gone"
    assert "not a regular file" in reasons(sessions, ids[2])[-1]


def test_nothing_is_touched_without_a_stored_compact_copy(
        folders: tuple[Path, Path], make_settings: Callable[..., Settings], sessions: sessionmaker[Session]) -> None:
    inbox, _ = folders
    settings = make_settings(watch=[{"path": str(inbox), "source_action": "delete"}])
    source = _write(inbox / "memo.wav")
    rid = taken(sessions, settings, source, copy=False)

    run_sources(context(settings, sessions))

    assert source.exists() and row(sessions, rid).source_action == "kept"
    assert reasons(sessions, rid)[-1] == f"source: {source} is kept: no compact copy of it is stored"


def test_a_move_to_that_cannot_be_made_keeps_the_source_and_says_why(
        folders: tuple[Path, Path], make_settings: Callable[..., Settings], sessions: sessionmaker[Session],
        caplog: pytest.LogCaptureFixture) -> None:
    inbox, _ = folders
    blocker = inbox.parent / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    settings = moving(make_settings, inbox, blocker / "done")
    source = _write(inbox / "memo.wav")
    rid = taken(sessions, settings, source)

    run_sources(context(settings, sessions))

    assert source.read_bytes() == os.fsencode(source)
    assert row(sessions, rid).source_action == "kept"
    message = f"source: {source} could not be moved to {blocker / 'done'} (Not a directory); the source is kept " \
              "where it is"
    assert reasons(sessions, rid)[-1] == message
    assert message in caplog.text  # a warning in the daemon's log too


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_an_unwritable_move_to_keeps_the_source(
        folders: tuple[Path, Path], make_settings: Callable[..., Settings], sessions: sessionmaker[Session]) -> None:
    inbox, done = folders
    done.mkdir()
    done.chmod(0o500)
    settings = moving(make_settings, inbox, done)
    source = _write(inbox / "memo.wav")
    rid = taken(sessions, settings, source)
    try:
        run_sources(context(settings, sessions))
    finally:
        done.chmod(0o700)
    assert source.exists() and "Permission denied" in reasons(sessions, rid)[-1]


def test_across_file_systems_the_copy_is_checked_then_the_original_removed(
        folders: tuple[Path, Path], make_settings: Callable[..., Settings], sessions: sessionmaker[Session],
        monkeypatch: pytest.MonkeyPatch) -> None:
    inbox, done = folders
    settings = moving(make_settings, inbox, done)
    source = _write(inbox / "memo.wav", os.urandom(300_000))
    mtime = source.stat().st_mtime_ns
    rid = taken(sessions, settings, source)
    real = sources.rename_noreplace

    def other_device(old: Path, new: Path) -> None:
        if Path(old).parent != Path(new).parent:  # a rename between the two folders crosses file systems
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        real(old, new)

    monkeypatch.setattr(sources, "rename_noreplace", other_device)
    run_sources(context(settings, sessions))

    assert not source.exists() and (done / "memo.wav").stat().st_mtime_ns == mtime
    assert hashlib.sha256((done / "memo.wav").read_bytes()).hexdigest() == row(sessions, rid).sha256
    assert sorted(os.listdir(done)) == ["memo.wav"] and os.listdir(inbox) == []  # no temporary left
    assert row(sessions, rid).source_action == "moved"


def test_a_folder_that_keeps_its_sources_decides_once_so_a_later_move_spares_the_past(
        folders: tuple[Path, Path], make_settings: Callable[..., Settings], sessions: sessionmaker[Session]) -> None:
    inbox, done = folders
    settings = make_settings(watch=[{"path": str(inbox)}])  # keeps sources, as by default
    old = taken(sessions, settings, _write(inbox / "old.wav"))
    pending = taken(sessions, settings, _write(inbox / "pending.wav"))
    with session_scope(sessions) as session:  # still being converted again: not decided yet
        lifecycle.advance(session, pending, expected=S.CONVERTED, to=S.UPLOADING, now=T0)
    assert run_sources(context(settings, sessions)) == 0
    assert row(sessions, old).source_action == "keep" and row(sessions, pending).source_action is None
    assert not any(r.startswith("source:") for r in reasons(sessions, old))  # keeping is no news

    settings = moving(make_settings, inbox, done)
    with session_scope(sessions) as session:
        lifecycle.advance(session, pending, expected=S.UPLOADING, to=S.ACTIVE, now=T0)
    new = taken(sessions, settings, _write(inbox / "new.wav"))
    assert run_sources(context(settings, sessions)) == 2
    assert (inbox / "old.wav").exists() and sorted(os.listdir(done)) == ["new.wav", "pending.wav"]
    assert row(sessions, new).source_action == "moved"


def test_prompts_done_waits_for_every_answer_and_a_failed_prompt_keeps_the_source(
        folders: tuple[Path, Path], make_settings: Callable[..., Settings], sessions: sessionmaker[Session]) -> None:
    inbox, _ = folders
    settings = make_settings(watch=[{"path": str(inbox), "prompts": ["summarize", "transcribe"],
                                     "source_action": "delete", "source_when": "prompts_done"}])
    answered = _write(inbox / "answered.wav")
    failing = _write(inbox / "failing.wav")
    ids = [taken(sessions, settings, path) for path in (answered, failing)]
    ctx = context(settings, sessions)
    assert run_sources(ctx) == 0  # converted, but its prompts are not even queued yet
    prompts = {rid: [_prompt(sessions, rid, name) for name in ("summarize", "transcribe")] for rid in ids}

    _set_prompt(sessions, prompts[ids[0]][0], P.DONE)
    _set_prompt(sessions, prompts[ids[1]][0], P.DONE)
    _set_prompt(sessions, prompts[ids[1]][1], P.FAILED)
    assert run_sources(ctx) == 0 and answered.exists() and failing.exists()

    _set_prompt(sessions, prompts[ids[0]][1], P.DONE)
    assert run_sources(ctx) == 1
    assert not answered.exists() and failing.exists()
    assert [row(sessions, rid).source_action for rid in ids] == ["deleted", None]  # still waiting, not given up


def _prompt(sessions: sessionmaker[Session], recording_id: int, template: str) -> int:
    from daemon.prompts import queue

    with session_scope(sessions) as session:
        request = queue.Request([recording_id], "text", template, "gemini-2.5-flash", None, "markdown")
        return queue.enqueue(session, request, now=T0).id


def _set_prompt(sessions: sessionmaker[Session], prompt_id: int, state: P) -> None:
    from daemon.prompts import lifecycle as prompt_lifecycle

    with session_scope(sessions) as session:
        prompt = session.get(Prompt, prompt_id)
        assert prompt is not None
        if state is P.DONE:
            prompt_lifecycle.advance(session, prompt_id, expected=P.QUEUED, to=P.RUNNING, now=T0)
            prompt_lifecycle.advance(session, prompt_id, expected=P.RUNNING, to=P.DONE, now=T0, result_text="ok")
        else:
            prompt_lifecycle.advance(session, prompt_id, expected=P.QUEUED, to=P.RUNNING, now=T0)
            prompt_lifecycle.advance(session, prompt_id, expected=P.RUNNING, to=P.FAILED, now=T0, error="refused")


def test_only_the_node_that_owns_the_folder_acts(
        folders: tuple[Path, Path], make_settings: Callable[..., Settings], sessions: sessionmaker[Session]) -> None:
    inbox, _ = folders
    settings = make_settings(watch=[{"path": str(inbox), "source_action": "delete"}],
                             service={"node_name": "room-a"})
    source = _write(inbox / "memo.wav")
    rid = taken(sessions, settings, source)
    elsewhere = make_settings(watch=[{"path": str(inbox), "source_action": "delete"}],
                              service={"node_name": "room-b"})
    assert run_sources(context(elsewhere, sessions, fleet=True)) == 0
    assert source.exists() and row(sessions, rid).source_action is None
    assert run_sources(context(settings, sessions, fleet=True)) == 1 and not source.exists()


# -- the configuration ------------------------------------------------------------------------------------------


def test_move_to_inside_a_drop_folder_or_missing_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[[watch]]\npath = "{tmp_path}/a"\nsource_action = "move"\nmove_to = "{tmp_path}/a/done"\n'
                      f'[[watch]]\npath = "{tmp_path}/b"\nsource_action = "move"\n'
                      f'[[watch]]\npath = "{tmp_path}/c"\nsource_action = "move"\nmove_to = "{tmp_path}/b/x"\n'
                      f'[[watch]]\npath = "{tmp_path}/d"\nsource_action = "shred"\nsource_when = "soon"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert caught.value.path == str(config)
    assert caught.value.problems == [
        f"watch[0].move_to: {tmp_path}/a/done is inside the drop folder {tmp_path}/a, where moved sources would be "
        "taken again; name a folder outside every drop folder",
        'watch[1].move_to: required with source_action = "move" (the folder sources go to)',
        f"watch[2].move_to: {tmp_path}/b/x is inside the drop folder {tmp_path}/b, where moved sources would be "
        "taken again; name a folder outside every drop folder",
        "watch[3].source_action: expected 'keep', 'move' or 'delete', got 'shred'",
        "watch[3].source_when: expected 'converted' or 'prompts_done', got 'soon'"]


def test_move_to_through_a_symlink_into_a_drop_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()
    (tmp_path / "sneaky").symlink_to(tmp_path / "inbox")
    config = tmp_path / "c.toml"
    config.write_text(f'[[watch]]\npath = "{tmp_path}/inbox"\nsource_action = "move"\n'
                      f'move_to = "{tmp_path}/sneaky/done"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert "is inside the drop folder" in caught.value.problems[0]


# -- crashes ----------------------------------------------------------------------------------------------------

VICTIM = textwrap.dedent("""
    import os, signal, sys
    from datetime import timedelta
    from daemon.config import load_settings
    from daemon.context import Context
    from daemon.pipeline import sources
    from db.session import make_engine, make_sessionmaker, session_scope

    settings = load_settings(sys.argv[1])
    node = settings.service.node_name
    ctx = Context(settings=settings, sessions=make_sessionmaker(make_engine(settings.database_path)), client=None,
                  node=node, holder=f"{node}/victim")
    real = sources.rename_noreplace
    if sys.argv[2] == "before-act":
        sources._move = sources._delete = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
    else:  # the file is renamed (moved, or put aside to be deleted); the outcome is not committed
        def rename_then_die(old, new):
            real(old, new)
            os.kill(os.getpid(), signal.SIGKILL)
        sources.rename_noreplace = rename_then_die
    kind = sources.SourceKind(ctx, lambda now: now + timedelta(hours=1))
    with session_scope(ctx.sessions) as session:
        [claim] = kind.claim(session, ctx.now(), 1)
    kind.run(claim)
    sys.exit("not killed")
""")


def _kill_during_the_action(tmp_path: Path, action: str, moment: str, request: pytest.FixtureRequest
                            ) -> tuple[Path, dict[str, Any], Settings, sessionmaker[Session], int]:
    """A recording due for `action`, and a process that claims it and is killed (SIGKILL) at `moment`."""
    folder = tmp_path / "d"
    inbox, done = folder / "inbox", tmp_path / "done"
    inbox.mkdir(parents=True)
    watch = {"path": str(inbox), "source_action": action, **({"move_to": str(done)} if action == "move" else {})}
    config = write_config(folder, watch=[watch])
    settings = load_settings(config)
    settings.state_dir.mkdir(parents=True)
    upgrade_to_head(settings.database_path)
    engine = make_engine(settings.database_path)
    request.addfinalizer(engine.dispose)
    sessions = make_sessionmaker(engine)
    rid = taken(sessions, settings, _write(inbox / "memo.wav", b"the only copy of this memo"))
    victim = subprocess.run([sys.executable, "-c", VICTIM, str(config), moment], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert victim.returncode == -signal.SIGKILL, victim.stderr
    assert row(sessions, rid).source_action == action  # the intent, committed before anything was touched
    return folder, watch, settings, sessions, rid


def _finished_once(tmp_path: Path, sessions: sessionmaker[Session], rid: int, action: str) -> None:
    inbox, done = tmp_path / "d" / "inbox", tmp_path / "done"
    assert row(sessions, rid).source_action == ("moved" if action == "move" else "deleted")
    assert os.listdir(inbox) == []  # no temporary name left behind either
    if action == "move":
        assert [p.name for p in done.iterdir()] == ["memo.wav"]
        assert (done / "memo.wav").read_bytes() == b"the only copy of this memo"
    history = reasons(sessions, rid)
    assert len([r for r in history if r.startswith(f"source: {'moving' if action == 'move' else 'deleting'}")]) == 1
    assert len([r for r in history if r.startswith("source: moved" if action == "move" else "source: deleted")]) == 1


@pytest.mark.parametrize(("action", "moment"), [("move", "before-act"), ("delete", "before-act"),
                                                ("delete", "after-rename")])
def test_a_kill_during_the_action_loses_nothing_and_the_next_run_finishes_it_once(
        tmp_path: Path, action: str, moment: str, request: pytest.FixtureRequest) -> None:
    _, _, settings, sessions, rid = _kill_during_the_action(tmp_path, action, moment, request)
    restarted = context(settings, sessions)
    with session_scope(sessions) as session:  # as the engine does at start: every other run's claim is dead
        lifecycle.take_back(session, restarted.now(), lambda table: table.claimed_by != restarted.holder)
    assert run_sources(restarted) == 1
    _finished_once(tmp_path, sessions, rid, action)


def test_a_kill_between_the_move_and_its_commit_is_finished_by_the_restarted_daemon(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    folder, watch, _, sessions, rid = _kill_during_the_action(tmp_path, "move", "after-rename", request)
    assert (tmp_path / "done" / "memo.wav").exists() and row(sessions, rid).source_done_at is None
    daemon = DaemonProcess(folder, base_url=None, api_key=None, watch=[watch])
    daemon.start()
    try:
        wait_until(lambda: row(sessions, rid).source_action != "move", 30,
                   message="the restarted daemon to finish the move")
    finally:
        daemon.stop()
    _finished_once(tmp_path, sessions, rid, "move")
    assert f"recording {rid}: source: moved" in daemon.log()


# -- end to end -------------------------------------------------------------------------------------------------


def query(daemon: DaemonProcess, statement: str) -> list[tuple[Any, ...]]:
    """Rows from the daemon's database, read-only: for waits (the assertions themselves go through the CLI)."""
    uri = f"file:{daemon.folder / 'state' / 'audiodrop.db'}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, timeout=10)) as connection:
        return connection.execute(statement).fetchall()


def test_the_daemon_moves_sources_once_converted_and_show_says_where(tmp_path: Path) -> None:
    folder, done = tmp_path / "d", tmp_path / "done"
    inbox, phone = folder / "inbox", folder / "phone"
    phone.mkdir(parents=True)
    profile = phone / ".audiodrop.toml"
    profile.write_text('source_action = "delete"\n')  # the folder's profile wins over its [[watch]] table
    daemon = DaemonProcess(folder, base_url=None, api_key=None,
                           watch=[{"path": str(inbox), "source_action": "move", "move_to": str(done)},
                                  {"path": str(phone), "source_action": "keep"}])
    daemon.start()
    try:
        (inbox / "calls").mkdir()
        media.make_tone(tmp_path / "a.wav", 1.0).rename(inbox / "calls" / "Call – 2026·11·30 (1).wav")
        media.make_tone(tmp_path / "b.wav", 1.5).rename(inbox / "memo.wav")
        media.make_tone(tmp_path / "c.wav", 2.0).rename(phone / "voice note.wav")
        wait_until(lambda: sorted(query(daemon, "SELECT coalesce(source_action, '') FROM recordings")) == [
            ("deleted",), ("moved",), ("moved",)], 30, message="the sources to be moved and deleted")
        assert os.listdir(phone) == [".audiodrop.toml"] and profile.read_text() == 'source_action = "delete"\n'
        [(rid,)] = query(daemon, "SELECT id FROM recordings WHERE source_path LIKE '%memo.wav'")
        shown = daemon.cli("show", str(rid), "--json")
        assert shown["state"] == "converted"  # no key: converted, waiting to upload; the source is not needed
        assert shown["source"]["action"] == "moved" and shown["source"]["moved_to"] == str(done / "memo.wav")
        assert shown["source_path"] == str(inbox / "memo.wav")  # where it was taken from
        assert shown["history"][-1]["reason"] == f"source: moved {inbox / 'memo.wav'} to {done / 'memo.wav'}"
        assert (done / "calls" / "Call – 2026·11·30 (1).wav").exists() and (done / "memo.wav").exists()
        assert "source: moved" in daemon.cli("show", str(rid)).stdout
        assert sorted(p.name for p in inbox.rglob("*")) == ["calls"]
        assert daemon.states() == ["converted"] * 3  # nothing was taken again
    finally:
        daemon.stop()


@pytest.mark.slow
def test_delete_after_prompts_done_and_never_after_a_failed_prompt(tmp_path: Path, emulator: Emulator) -> None:
    folder = tmp_path / "d"
    inbox = folder / "inbox"
    daemon = DaemonProcess(folder, base_url=emulator.base_url,
                           watch=[{"path": str(inbox), "prompts": ["notes"], "source_action": "delete",
                                   "source_when": "prompts_done"}],
                           templates={"notes": {"prompt": "Write notes."}}, prompts={"workers": 1})
    refused = emulator.add_fault(Fault(route="generate", kind="status", status=400, times=1,
                                       message="Request contains an invalid argument."))
    daemon.start()
    try:
        media.make_tone(tmp_path / "a.wav", 1.0).rename(inbox / "refused.wav")
        wait_until(lambda: query(daemon, "SELECT state FROM prompts") == [("failed",)], 60,
                   message="the prompt to fail")
        assert refused.injected == 1
        held = emulator.add_fault(Fault(route="generate", kind="hold", times=1, timeout=60))
        media.make_tone(tmp_path / "b.wav", 1.5).rename(inbox / "answered.wav")
        wait_until(lambda: emulator.held_requests == 1, 60, message="the second prompt to be asked")
        assert (inbox / "answered.wav").exists()  # no answer stored yet: the source stays
        emulator.release_holds()
        wait_until(lambda: not (inbox / "answered.wav").exists(), 60, message="the answered source to be deleted")
        assert held.injected == 1
        assert (inbox / "refused.wav").exists()  # its prompt failed: not done, the source is kept
        ids = dict(query(daemon, "SELECT source_path, id FROM recordings"))
        assert daemon.cli("show", str(ids[str(inbox / "refused.wav")]), "--json")["source"] is None
        shown = daemon.cli("show", str(ids[str(inbox / "answered.wav")]), "--json")
        assert shown["source"]["action"] == "deleted"
        assert shown["history"][-1]["reason"] == f"source: deleted {inbox / 'answered.wav'}"
    finally:
        daemon.stop()


def test_a_daemon_refuses_a_move_to_inside_its_drop_folder(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    config = write_config(folder, watch=[{"path": str(folder / "inbox"), "source_action": "move",
                                          "move_to": str(folder / "inbox" / "done")}])
    result = subprocess.run([sys.executable, "-m", "daemon", "run", "--config", str(config)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if k != "GEMINI_API_KEY"} | {
                                "GEMINI_API_KEY": API_KEY})
    assert result.returncode != 0
    assert str(config) in result.stderr and "watch[0].move_to:" in result.stderr
    assert "is inside the drop folder" in result.stderr
