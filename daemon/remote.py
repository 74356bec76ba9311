"""The remote lifecycle: the storage ledger and eviction, the expiry sweep, and reconciliation of the database
with the server's `files.list`. Only files whose display name carries this installation's prefix are ever
adopted or deleted; everything else in the project is someone else's and only counted."""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from daemon import lifecycle, prompts, quota
from daemon.context import Context
from daemon.errors import DaemonError, RemoteFileGone
from daemon.gemini import RemoteFile, display_prefix
from daemon.lifecycle import RecordingState as S
from db.models import DaemonState, Recording
from db.session import session_scope

log = logging.getLogger(__name__)


def ours_bytes(session: Session) -> int:
    live = session.scalar(select(func.coalesce(func.sum(Recording.remote_bytes), 0))
                          .where(Recording.state.in_((S.PROCESSING.value, S.ACTIVE.value))))
    in_flight = session.scalar(select(func.coalesce(func.sum(Recording.converted_bytes), 0))
                               .where(Recording.state == S.UPLOADING.value))
    return int(live or 0) + int(in_flight or 0)


def ledger(ctx: Context, session: Session) -> quota.Ledger:
    state = session.get(DaemonState, 1)
    gemini = ctx.settings.gemini
    return quota.Ledger(limit_bytes=gemini.storage_limit_bytes, headroom_bytes=gemini.storage_headroom_bytes,
                        ours_bytes=ours_bytes(session), foreign_bytes=(state.foreign_bytes or 0) if state else 0)


def make_room(ctx: Context, session: Session, size: int, *, evict: bool = True) -> bool:
    """True when `size` more bytes fit under the limit, after evicting our least recently needed copies that
    no prompt needs (only if `evict`). False, with the reason in ctx.waiting, when nothing can make it fit."""
    current = ledger(ctx, session)
    if current.fits(size):
        ctx.waiting.quota_problem = None
        return True
    if not evict:
        return False
    pinned = prompts.needs_remote_copies(session, ctx.settings)
    active = session.scalars(select(Recording).where(Recording.state == S.ACTIVE.value)).all()
    residents = [quota.Resident(r.id, r.remote_bytes or 0, r.last_needed_at, r.uploaded_at, r.id in pinned)
                 for r in active]
    chosen = quota.choose_evictions(residents, needed_bytes=size, free_bytes=current.free_bytes)
    if chosen is None:
        ctx.waiting.quota_problem = (f"waiting for storage: {size / 1e6:.1f} MB to upload, "
                                     f"{max(current.free_bytes, 0) / 1e6:.1f} MB free of "
                                     f"{ctx.settings.gemini.storage_limit_bytes / 1e6:.1f} MB, and every upload "
                                     "of ours is needed by a prompt")
        return False
    for recording_id in chosen:
        if not evict_one(ctx, session, recording_id):
            return False
    ctx.waiting.quota_problem = None
    return ledger(ctx, session).fits(size)


def evict_one(ctx: Context, session: Session, recording_id: int) -> bool:
    recording = session.get(Recording, recording_id)
    if recording is None or recording.state != S.ACTIVE.value:
        return False
    assert ctx.client is not None
    try:
        ctx.client.delete(recording.remote_name or "")
    except RemoteFileGone:
        pass  # already gone: the space is free either way
    except DaemonError as err:
        log.warning("recording %d: could not delete %s to make room: %s", recording_id, recording.remote_name, err)
        return False
    lifecycle.advance(session, recording_id, expected=S.ACTIVE, to=S.EXPIRED, now=ctx.now(),
                      reason=f"evicted for quota (deleted {recording.remote_name})")
    session.flush()
    log.info("recording %d: evicted %s for quota", recording_id, recording.remote_name)
    return True


def sweep_expired(ctx: Context) -> int:
    """Active recordings past the server's expiration_time become expired (the compact copy stays)."""
    now = ctx.now()
    with session_scope(ctx.sessions) as session:
        due = session.scalars(select(Recording).where(Recording.state == S.ACTIVE.value,
                                                      Recording.remote_expires_at <= now)).all()
        for recording in due:
            lifecycle.advance(session, recording.id, expected=S.ACTIVE, to=S.EXPIRED, now=now,
                              reason=f"{recording.remote_name} expired at "
                                     f"{recording.remote_expires_at.isoformat(timespec='seconds')}")
    return len(due)


def reconcile(ctx: Context, *, in_flight: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    """Compare the server's file list with the database and correct the database (and the server's orphans)."""
    assert ctx.client is not None
    remote_files = ctx.client.list_files()
    prefix = display_prefix(ctx.instance_id)
    by_name = {f.name: f for f in remote_files}
    now = ctx.now()
    with session_scope(ctx.sessions) as session:
        alive = session.scalars(select(Recording).where(Recording.state.in_((S.PROCESSING.value, S.ACTIVE.value)))).all()
        for recording in alive:
            remote = by_name.get(recording.remote_name or "")
            if remote is None:
                lifecycle.advance(session, recording.id, expected=S(recording.state), to=S.EXPIRED, now=now,
                                  reason=f"{recording.remote_name} is gone from the server")
            elif remote.expires_at and remote.expires_at != recording.remote_expires_at:
                recording.remote_expires_at = remote.expires_at
        known = {r.remote_name for r in alive}
        for remote in remote_files:
            if remote.display_name and remote.display_name.startswith(prefix) and remote.name not in known:
                _adopt_or_delete(ctx, session, remote, prefix, in_flight, now)
        foreign = sum(f.size_bytes for f in remote_files if not (f.display_name or "").startswith(prefix))
        state = session.get(DaemonState, 1)
        if state is not None:
            state.foreign_bytes = foreign
            state.remote_used_bytes = sum(f.size_bytes for f in remote_files)
            state.reconciled_at = now


def _adopt_or_delete(ctx: Context, session: Session, remote: RemoteFile, prefix: str, in_flight: set[int],
                     now: datetime) -> None:
    """One of our files the database does not know: an upload finished just before a crash (adopt it by
    its content hash), or a leftover copy nothing claims (delete it)."""
    try:
        recording_id = int((remote.display_name or "")[len(prefix):].split("-")[0])
    except ValueError:
        recording_id = -1
    recording = session.get(Recording, recording_id)
    if recording is not None and (recording.id in in_flight or recording.state == S.UPLOADING.value):
        return  # the uploader owns it right now
    claimable = recording is not None and recording.state in (S.CONVERTED.value, S.FAILED.value, S.EXPIRED.value)
    if claimable and remote.sha256_hex == recording.converted_sha256 and remote.state in ("ACTIVE", "PROCESSING"):
        assert recording is not None
        if recording.state == S.FAILED.value:
            lifecycle.advance(session, recording.id, expected=S.FAILED, to=S.CONVERTED, now=now, reason="adopting")
        expected = S.EXPIRED if recording.state == S.EXPIRED.value else S.CONVERTED
        lifecycle.advance(session, recording.id, expected=expected, to=S.UPLOADING, now=now,
                          reason=f"found {remote.name} on the server, uploaded before an interruption")
        to = S.ACTIVE if remote.state == "ACTIVE" else S.PROCESSING
        lifecycle.advance(session, recording.id, expected=S.UPLOADING, to=to, now=now,
                          reason=f"adopted {remote.name} (same content)", remote_name=remote.name,
                          remote_uri=remote.uri, remote_bytes=remote.size_bytes, remote_expires_at=remote.expires_at,
                          uploaded_at=now, error=None, next_attempt_at=None)
        log.info("recording %d: adopted %s", recording.id, remote.name)
        return
    assert ctx.client is not None
    try:
        ctx.client.delete(remote.name)
    except RemoteFileGone:
        return
    log.info("deleted %s (%s): an upload of ours that no recording claims", remote.name, remote.display_name)
