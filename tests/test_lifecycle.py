from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from daemon.errors import IllegalTransition
from daemon.pipeline import lifecycle
from daemon.pipeline.lifecycle import TRANSITIONS
from daemon.pipeline.lifecycle import RecordingState as S
from db.models import Recording, SourceAlias
from tests.conftest import T0

FINAL_RESTING = {S.ACTIVE}


def test_every_state_is_reachable_from_discovered() -> None:
    seen, frontier = {S.DISCOVERED}, [S.DISCOVERED]
    while frontier:
        for target in TRANSITIONS[frontier.pop()]:
            if target not in seen:
                seen.add(target)
                frontier.append(target)
    assert seen == set(S)


def test_every_state_has_a_way_out() -> None:
    for state in S:
        assert TRANSITIONS[state], f"{state} is a dead end"


def _new(session: Session, path: str = "/in/a.wav") -> Recording:
    return lifecycle.discover(session, path=path, size=10, mtime_ns=1, watch_root="/in", closed_after_write=True,
                              now=T0)


def test_advance_is_a_compare_and_set_that_records_an_event(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        recording = _new(session)
        assert lifecycle.advance(session, recording.id, expected=S.DISCOVERED, to=S.CONVERTING, now=T0,
                                 reason="complete")
        # A second worker trying the same claim loses.
        assert not lifecycle.advance(session, recording.id, expected=S.DISCOVERED, to=S.CONVERTING, now=T0)
        session.commit()
        session.refresh(recording)
        assert recording.state == "converting"
        assert [(e.from_state, e.to_state, e.reason) for e in recording.events] == [
            (None, "discovered", "found /in/a.wav"), ("discovered", "converting", "complete")]


def test_illegal_transition_is_refused(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        recording = _new(session)
        with pytest.raises(IllegalTransition):
            lifecycle.advance(session, recording.id, expected=S.DISCOVERED, to=S.ACTIVE, now=T0)


def test_duplicate_is_merged_into_the_original(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        original = _new(session, "/in/first.wav")
        copy = _new(session, "/in/copy of first.wav")
        lifecycle.merge_duplicate(session, copy, original.id, now=T0)
        session.commit()
        assert session.get(Recording, copy.id) is None
        aliases = session.query(SourceAlias).all()
        assert [(a.recording_id, a.path) for a in aliases] == [(original.id, "/in/copy of first.wav")]
        session.refresh(original)
        assert "same content dropped again as /in/copy of first.wav" in original.events[-1].reason


def test_retry_resumes_upload_when_the_compact_copy_exists(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    copy = tmp_path / "c.ogg"
    copy.write_bytes(b"x")
    with sessions() as session:
        recording = _new(session)
        lifecycle.advance(session, recording.id, expected=S.DISCOVERED, to=S.CONVERTING, now=T0)
        lifecycle.advance(session, recording.id, expected=S.CONVERTING, to=S.FAILED, now=T0,
                          converted_path=str(copy), error="boom")
        session.refresh(recording)
        assert lifecycle.retry(session, recording, now=T0, reason="asked")
        session.refresh(recording)
        assert (recording.state, recording.error) == ("converted", None)


def test_only_lifecycle_assigns_a_recording_state() -> None:
    root = Path(__file__).resolve().parent.parent
    offenders = []
    for path in list((root / "daemon").glob("*.py")) + list((root / "db").glob("*.py")):
        if path.name in ("lifecycle.py", "prompt_lifecycle.py"):  # the one place each kind of state changes
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\.state\s*=[^=]|values\([^)]*\bstate=", line):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []
