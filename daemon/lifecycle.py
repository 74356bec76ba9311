"""A recording's state machine: the only code that changes `Recording.state`, creates or forgets a recording.

Every change is a compare-and-set (it succeeds for exactly one worker, so advancing a row is how work is
claimed) and writes a RecordingEvent that `audiodrop show` lists.

    discovered -> converting -> converted -> uploading -> processing -> active -> expired
        |             |  \\-> rejected          |             |                      |
        |             \\-> failed <-------------+-------------+                      |
        \\--(duplicate content: merged into the original; vanished: forgotten)       |
    expired -> uploading (a prompt needs it again);  failed/rejected -> retried by `audiodrop retry`
"""

from __future__ import annotations

import enum
import os
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from daemon.errors import IllegalTransition
from db.models import Recording, RecordingEvent, SourceAlias


class RecordingState(enum.StrEnum):
    """The public state names (PRODUCT.md); finer distinctions go into the event's reason."""

    DISCOVERED = "discovered"
    """Seen in a drop folder; waiting for the file to be completely written."""
    CONVERTING = "converting"
    """ffmpeg is making the compact mono copy."""
    CONVERTED = "converted"
    """The compact copy is ready and waits to be uploaded (also while offline or without a key)."""
    UPLOADING = "uploading"
    """An upload has started; its intent (display name) is recorded so a crash cannot upload it twice."""
    PROCESSING = "processing"
    """Uploaded; the server has not yet made the file ACTIVE."""
    ACTIVE = "active"
    """Usable in prompts until `remote_expires_at`."""
    EXPIRED = "expired"
    """The remote copy is gone (48 h passed, or evicted for quota); the compact copy is kept for re-upload."""
    FAILED = "failed"
    """A passing problem; retried automatically at `next_attempt_at`."""
    REJECTED = "rejected"
    """The input itself is unusable (not audio, corrupt, empty); not retried until a person asks."""


S = RecordingState

TRANSITIONS: dict[RecordingState, frozenset[RecordingState]] = {
    S.DISCOVERED: frozenset({S.CONVERTING, S.REJECTED}),
    # Back to discovered when the source changed while it was being converted, or after a crash.
    S.CONVERTING: frozenset({S.CONVERTED, S.REJECTED, S.FAILED, S.DISCOVERED}),
    S.CONVERTED: frozenset({S.UPLOADING, S.CONVERTING, S.FAILED}),
    # Back to converted when the upload must wait (offline, no key, quota) or after a crash.
    S.UPLOADING: frozenset({S.PROCESSING, S.ACTIVE, S.FAILED, S.CONVERTED}),
    S.PROCESSING: frozenset({S.ACTIVE, S.FAILED, S.EXPIRED}),
    # Active -> converting: the API refused the format, so the recording is re-encoded to the fallback.
    S.ACTIVE: frozenset({S.EXPIRED, S.CONVERTING}),
    # Expired -> discovered: the API refused the format; converted again from the source, in the fallback.
    S.EXPIRED: frozenset({S.UPLOADING, S.CONVERTING, S.DISCOVERED}),
    S.FAILED: frozenset({S.DISCOVERED, S.CONVERTED, S.CONVERTING, S.EXPIRED}),
    S.REJECTED: frozenset({S.DISCOVERED}),
}


def advance(
    session: Session,
    recording_id: int,
    *,
    expected: RecordingState | str,
    to: RecordingState,
    now: datetime,
    reason: str = "",
    **changes: Any,
) -> bool:
    """Move one recording from `expected` to `to`, setting `changes` in the same statement.

    Returns False if the recording is no longer in `expected` (another worker moved it first).
    """
    expected = RecordingState(expected)
    if to not in TRANSITIONS[expected]:
        raise IllegalTransition(expected.value, to.value)
    result = session.execute(
        update(Recording)
        .where(Recording.id == recording_id, Recording.state == expected.value)
        .values(state=to.value, state_changed_at=now, **changes)
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:
        return False
    session.add(RecordingEvent(recording_id=recording_id, at=now, from_state=expected.value, to_state=to.value,
                               reason=reason))
    session.flush()
    return True


def note(session: Session, recording_id: int, *, now: datetime, reason: str) -> None:
    """Record something that happened to a recording without changing its state."""
    state = session.scalar(select(Recording.state).where(Recording.id == recording_id))
    if state is not None:
        session.add(RecordingEvent(recording_id=recording_id, at=now, from_state=state, to_state=state, reason=reason))


def discover(
    session: Session,
    *,
    path: str,
    size: int,
    mtime_ns: int,
    watch_root: str | None,
    closed_after_write: bool,
    now: datetime,
) -> Recording:
    """A new file appeared in a drop folder: it becomes a recording in `discovered`."""
    recording = Recording(
        state=S.DISCOVERED.value,
        source_path=path,
        source_size=size,
        source_mtime_ns=mtime_ns,
        watch_root=watch_root,
        closed_after_write=closed_after_write,
        last_change_at=now,
        created_at=now,
        state_changed_at=now,
    )
    session.add(recording)
    session.flush()
    session.add(RecordingEvent(recording_id=recording.id, at=now, from_state=None, to_state=S.DISCOVERED.value,
                               reason=f"found {path}"))
    return recording


def merge_duplicate(session: Session, duplicate: Recording, original_id: int, *, now: datetime) -> None:
    """A discovered file has the same content as an existing recording: remember its path on the original,
    so it is processed once and never taken again, and drop the duplicate row."""
    if duplicate.state not in (S.DISCOVERED.value, S.CONVERTING.value):
        raise IllegalTransition(duplicate.state, "merged duplicate")
    session.add(SourceAlias(recording_id=original_id, path=duplicate.source_path, size=duplicate.source_size,
                            mtime_ns=duplicate.source_mtime_ns, seen_at=now))
    note(session, original_id, now=now,
         reason=f"same content dropped again as {duplicate.source_path}; processed once")
    session.execute(delete(Recording).where(Recording.id == duplicate.id))


def forget(session: Session, recording_id: int) -> bool:
    """A discovered file vanished before it was ever complete (a deleted partial copy): nothing to keep.
    A recording that was once converted is never forgotten, only rejected when its source is gone."""
    result = session.execute(
        delete(Recording).where(Recording.id == recording_id, Recording.state == S.DISCOVERED.value,
                                Recording.sha256.is_(None))
    )
    return bool(result.rowcount)


def retry(session: Session, recording: Recording, *, now: datetime, reason: str) -> bool:
    """Send a failed or rejected recording back to where its work resumes: upload if its compact copy
    exists, conversion otherwise."""
    current = RecordingState(recording.state)
    if current not in (S.FAILED, S.REJECTED):
        return False
    has_copy = bool(recording.converted_path) and os.path.exists(recording.converted_path)
    # A copy in a format the API refused is only the input of the next conversion (see target_format).
    wanted_copy = has_copy and recording.target_format in (None, recording.converted_format)
    target = S.CONVERTED if current is S.FAILED and wanted_copy else S.DISCOVERED
    changes: dict[str, Any] = {"error": None, "next_attempt_at": None}
    if target is S.DISCOVERED:
        changes["closed_after_write"] = True
    return advance(session, recording.id, expected=current, to=target, now=now, reason=reason, **changes)
