"""A recording's state machine: the only code that changes `Recording.state`, creates or forgets a recording.

Every change is a compare-and-set (it succeeds for exactly one worker) and writes a RecordingEvent that
`audiodrop show` lists. Work is claimed by advancing a row with a lease (`claim`), and the claim's final write
names its fencing token, so a worker that lost its claim writes nothing.

    discovered -> converting -> converted -> uploading -> processing -> active -> expired
        |             |  \\-> rejected          |             |           |          |
        |             \\-> failed <-------------+-------------+           |          |
        \\--(duplicate content: merged into the original; vanished: forgotten)       |
    expired -> uploading (a prompt needs it again); active/expired -> discovered (re-encoded to the fallback);
    failed/rejected -> discovered or converted (retried), or replaced by the same audio dropped again
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, func, select, update
from sqlalchemy.orm import Session

from daemon.errors import IllegalTransition
from db.models import AudioCopy, Recording, RecordingEvent, SourceAlias
from db.session import rowcount
from db.states import RecordingState

S = RecordingState

TRANSITIONS: dict[RecordingState, frozenset[RecordingState]] = {
    S.DISCOVERED: frozenset({S.CONVERTING, S.REJECTED}),
    # Back to discovered when the source changed while it was converted, or the conversion was interrupted.
    S.CONVERTING: frozenset({S.CONVERTED, S.REJECTED, S.FAILED, S.DISCOVERED}),
    # -> failed: the compact copy is over the Files API's 2 GB per file. -> rejected (from here, active, expired
    # and failed): replaced by a longer recording of the same file (it grew after its first part was taken).
    S.CONVERTED: frozenset({S.UPLOADING, S.FAILED, S.REJECTED}),
    # Back to converted when the upload must wait (offline, no key, quota).
    S.UPLOADING: frozenset({S.PROCESSING, S.ACTIVE, S.FAILED, S.CONVERTED}),
    S.PROCESSING: frozenset({S.ACTIVE, S.FAILED, S.EXPIRED}),
    # Active -> discovered: the API refused the format, so the recording is converted again to the fallback.
    S.ACTIVE: frozenset({S.EXPIRED, S.DISCOVERED, S.REJECTED}),
    S.EXPIRED: frozenset({S.UPLOADING, S.DISCOVERED, S.REJECTED}),
    S.FAILED: frozenset({S.DISCOVERED, S.CONVERTED, S.UPLOADING, S.REJECTED}),
    S.REJECTED: frozenset({S.DISCOVERED}),
}

# States in which the same content dropped again takes the recording's place (see `revive`).
REVIVABLE = frozenset({S.FAILED, S.REJECTED})


def _check(expected: RecordingState, to: RecordingState) -> None:
    if to not in TRANSITIONS[expected]:
        raise IllegalTransition(expected.value, to.value)


def advance(session: Session, recording_id: int, *, expected: RecordingState | str, to: RecordingState,
            now: datetime, reason: str = "", token: int | None = None, release: bool = False,
            **changes: Any) -> bool:
    """Move one recording from `expected` to `to`, setting `changes` in the same statement.

    `token`: the fencing token of the claim this write finishes; nothing is written if the claim was lost.
    `release`: clear the claim. Returns False when the row is no longer in `expected` (or no longer ours).
    """
    expected = RecordingState(expected)
    _check(expected, to)
    conditions = [Recording.id == recording_id, Recording.state == expected]
    if token is not None:
        conditions.append(Recording.claim_token == token)
    if release:
        changes.update(claimed_by=None, claimed_until=None)
    result = session.execute(update(Recording).where(*conditions)
                             .values(state=to, state_changed_at=now, **changes)
                             .execution_options(synchronize_session=False))
    if not rowcount(result):
        return False
    session.add(RecordingEvent(recording_id=recording_id, at=now, from_state=expected.value, to_state=to.value,
                               reason=reason))
    session.flush()
    return True


def claim(session: Session, recording_id: int, *, expected: RecordingState, to: RecordingState | None = None,
          now: datetime, holder: str, until: datetime, reason: str = "", **changes: Any) -> int | None:
    """Claim one recording for a worker: compare-and-set on its state (and on its claim being free or dead),
    optionally moving it to `to`. Returns the claim's fencing token, or None if another worker has it."""
    if to is not None:
        _check(expected, to)
    free = (Recording.claimed_until.is_(None)) | (Recording.claimed_until < now)
    values: dict[str, Any] = dict(claimed_by=holder, claimed_until=until, claim_token=Recording.claim_token + 1,
                                  **changes)
    if to is not None:
        values.update(state=to, state_changed_at=now)
    result = session.execute(update(Recording).where(Recording.id == recording_id, Recording.state == expected, free)
                             .values(**values).execution_options(synchronize_session=False))
    if not rowcount(result):
        return None
    if to is not None:
        session.add(RecordingEvent(recording_id=recording_id, at=now, from_state=expected.value,
                                   to_state=to.value, reason=reason))
    session.flush()
    return session.scalar(select(Recording.claim_token).where(Recording.id == recording_id))


def update_claimed(session: Session, recording_id: int, token: int, *, release: bool = False,
                   **changes: Any) -> bool:
    """Change plain fields of a claimed recording (no state change), fenced by the claim's token."""
    if release:
        changes.update(claimed_by=None, claimed_until=None)
    result = session.execute(update(Recording).where(Recording.id == recording_id, Recording.claim_token == token)
                             .values(**changes).execution_options(synchronize_session=False))
    return bool(rowcount(result))


def take_back(session: Session, now: datetime, dead: Callable[[Any], ColumnElement[bool]]) -> int:
    """Recordings held by dead claims: an interrupted conversion starts again (from discovered); an interrupted
    upload stays `uploading` and is resumed (looked up on the server first); any other claim is just freed."""
    # A conversion with no holder at all was left by a version without claims: it is dead too.
    ownerless = (Recording.state == S.CONVERTING) & Recording.claimed_by.is_(None)
    stale = session.execute(select(Recording.id, Recording.state, Recording.claimed_by)
                            .where((Recording.claimed_by.is_not(None) & dead(Recording)) | ownerless)).all()
    for recording_id, state, holder in stale:
        if state == S.CONVERTING:
            advance(session, recording_id, expected=S.CONVERTING, to=S.DISCOVERED, now=now, release=True,
                    reason=f"the conversion was interrupted ({holder} stopped or lost its lease); converting again",
                    closed_after_write=True, next_attempt_at=None)
        elif holder is not None:
            session.execute(update(Recording).where(Recording.id == recording_id, Recording.claimed_by == holder)
                            .values(claimed_by=None, claimed_until=None)
                            .execution_options(synchronize_session=False))
            if state == S.UPLOADING:
                note(session, recording_id, now=now, reason=f"the upload was interrupted ({holder} stopped or lost "
                                                            "its lease); resuming it")
    return len(stale)


def note(session: Session, recording_id: int, *, now: datetime, reason: str) -> None:
    """Record something that happened to a recording without changing its state."""
    state = session.scalar(select(Recording.state).where(Recording.id == recording_id))
    if state is not None:
        session.add(RecordingEvent(recording_id=recording_id, at=now, from_state=state, to_state=state, reason=reason))


def discover(session: Session, *, path: str, size: int, mtime_ns: int, dev: int | None = None,
             ino: int | None = None, watch_root: str | None, closed_after_write: bool, now: datetime,
             last_change_at: datetime | None = None, supersedes_id: int | None = None,
             state: RecordingState = S.DISCOVERED, error: str | None = None, reason: str | None = None,
             node: str | None = None) -> Recording:
    """A new file appeared in a drop folder: it becomes a recording in `discovered` (or, for a name that cannot
    be taken at all, straight in `rejected` with the reason). `last_change_at` defaults to now."""
    recording = Recording(
        state=state, source_path=path, source_size=size, source_mtime_ns=mtime_ns, source_dev=dev, source_ino=ino,
        watch_root=watch_root, closed_after_write=closed_after_write, last_change_at=last_change_at or now,
        created_at=now,
        state_changed_at=now, supersedes_id=supersedes_id, error=error, node=node,
    )
    session.add(recording)
    session.flush()
    session.add(RecordingEvent(recording_id=recording.id, at=now, from_state=None, to_state=state.value,
                               reason=reason or f"found {path}"))
    return recording


def follow_move(session: Session, recording_id: int, *, path: str, watch_root: str | None, size: int,
                mtime_ns: int, now: datetime) -> None:
    """The recording's source file was renamed or moved (within or between drop folders): follow it."""
    old = session.scalar(select(Recording.source_path).where(Recording.id == recording_id))
    session.execute(update(Recording).where(Recording.id == recording_id)
                    .values(source_path=path, watch_root=watch_root, source_size=size, source_mtime_ns=mtime_ns)
                    .execution_options(synchronize_session=False))
    note(session, recording_id, now=now, reason=f"the file was moved from {old} to {path}; following it")


def merge_duplicate(session: Session, duplicate: Recording, original_id: int, *, now: datetime) -> None:
    """A freshly discovered file has the same content as an existing recording: remember its path on the
    original, so it is processed once and never taken again, and drop the duplicate row.

    Only a row that never got further than its first conversion (no content of its own yet, no prompt) is
    ever dropped: a merge must not take a recording's history or its compact copy with it."""
    if duplicate.state not in (S.DISCOVERED, S.CONVERTING) or duplicate.sha256 is not None \
            or duplicate.converted_path is not None:
        raise IllegalTransition(duplicate.state, "merged duplicate")
    session.add(SourceAlias(recording_id=original_id, path=duplicate.source_path, size=duplicate.source_size,
                            mtime_ns=duplicate.source_mtime_ns, seen_at=now))
    note(session, original_id, now=now,
         reason=f"same content dropped again as {duplicate.source_path}; processed once")
    session.execute(delete(Recording).where(Recording.id == duplicate.id))


def revive(session: Session, original: Recording, duplicate: Recording, *, now: datetime) -> bool:
    """The same audio as a failed or rejected recording was dropped again: the new file becomes that recording's
    source and it is converted again (a failed or rejected row never swallows a new copy)."""
    current = RecordingState(original.state)
    if current not in REVIVABLE:
        return False
    moved = advance(session, original.id, expected=current, to=S.DISCOVERED, now=now,
                    reason=f"the same audio arrived again as {duplicate.source_path}; converting it from there",
                    source_path=duplicate.source_path, source_size=duplicate.source_size,
                    source_mtime_ns=duplicate.source_mtime_ns, source_dev=duplicate.source_dev,
                    source_ino=duplicate.source_ino, watch_root=duplicate.watch_root, node=duplicate.node,
                    closed_after_write=True,
                    last_change_at=now, error=None, next_attempt_at=None, attempts=0)
    if moved:
        session.execute(delete(Recording).where(Recording.id == duplicate.id))
    return moved


def forget(session: Session, recording_id: int) -> bool:
    """A discovered file vanished before it was ever complete (a deleted partial copy): nothing to keep.
    A recording that was once converted is never forgotten."""
    result = session.execute(
        delete(Recording).where(Recording.id == recording_id, Recording.state == S.DISCOVERED,
                                Recording.sha256.is_(None), Recording.converted_path.is_(None))
    )
    return bool(rowcount(result))


def retry(session: Session, recording: Recording, *, now: datetime, reason: str) -> bool:
    """Send a failed or rejected recording back to where its work resumes: upload if its compact copy exists,
    conversion otherwise."""
    current = RecordingState(recording.state)
    if current not in (S.FAILED, S.REJECTED):
        return False
    has_copy = bool(recording.converted_path) and os.path.exists(recording.converted_path or "") or bool(
        recording.converted_sha256 and session.scalar(select(AudioCopy.piece).where(
            AudioCopy.sha256 == recording.converted_sha256).limit(1)) is not None)
    # A copy in a format the API refused is only the input of the next conversion (see target_format).
    wanted_copy = has_copy and recording.target_format in (None, recording.converted_format)
    target = S.CONVERTED if current is S.FAILED and wanted_copy else S.DISCOVERED
    changes: dict[str, Any] = {"error": None, "next_attempt_at": None, "claimed_by": None, "claimed_until": None}
    if target is S.DISCOVERED:
        changes.update(closed_after_write=True, last_change_at=now)
    return advance(session, recording.id, expected=current, to=target, now=now, reason=reason, **changes)


def on_node(node: str, *, fleet: bool) -> ColumnElement[bool]:
    """Recordings whose files this node holds: its own; on a single node also those from before nodes had names."""
    mine = Recording.node == node
    return mine if fleet else mine | Recording.node.is_(None)


def is_free(now: datetime) -> ColumnElement[bool]:
    """A recording nobody holds (or whose holder's lease has passed)."""
    return (Recording.claimed_until.is_(None)) | (Recording.claimed_until < now)


def settled(now: datetime, close_quiet_seconds: float, settle_seconds: float) -> ColumnElement[bool]:
    """A discovered file quiet long enough: `close_quiet_seconds` after a close-after-write (or a move in with
    no writer), `settle_seconds` otherwise; and not held back by a `next_attempt_at` in the future."""
    quiet = now - timedelta(seconds=close_quiet_seconds)
    settle = now - timedelta(seconds=settle_seconds)
    return and_(((Recording.closed_after_write.is_(True)) & (Recording.last_change_at <= quiet))
                | (Recording.last_change_at <= settle),
                (Recording.next_attempt_at.is_(None)) | (Recording.next_attempt_at <= now))


def retry_due(session: Session, now: datetime) -> int:
    """Failed recordings whose retry time has come go back to where their work resumes."""
    due = session.scalars(select(Recording).where(Recording.state == S.FAILED, Recording.next_attempt_at.is_not(None),
                                                  Recording.next_attempt_at <= now, is_free(now))).all()
    for recording in due:
        retry(session, recording, now=now, reason=f"automatic retry (attempt {recording.attempts + 1})")
    return len(due)


def next_retry(session: Session, now: datetime) -> datetime | None:
    return session.scalar(select(func.min(Recording.next_attempt_at)).where(Recording.state == S.FAILED))
