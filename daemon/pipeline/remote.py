"""The remote lifecycle: the storage ledger and eviction, the queue of remote copies to delete, the expiry sweep,
and reconciliation of the database with the server's `files.list`. Only files whose display name carries this
installation's prefix are ever adopted or deleted; everything else in the project is someone else's and only
counted. Decisions are made in short transactions; every network call (files.delete, files.list) happens outside
them, and its outcome is written in a new one."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from daemon import notify, policy
from daemon.context import Context, ContextKind
from daemon.engine import Claim
from daemon.errors import RemoteFileGone
from daemon.gemini import RemoteFile, display_prefix
from daemon.pipeline import lifecycle, quota
from daemon.policy import Action
from daemon.prompts import queue as prompt_queue
from db import queries
from db.models import DaemonState, PeriodicJob, Recording, RemoteDeletion
from db.session import rowcount, session_scope
from db.states import RecordingState as S

log = logging.getLogger(__name__)

ALIVE = (S.PROCESSING, S.ACTIVE)


# -- the ledger ---------------------------------------------------------------------------------------------

def ledger(ctx: Context, session: Session) -> quota.Ledger:
    state = session.get(DaemonState, 1)
    gemini = ctx.settings.gemini
    return quota.Ledger(limit_bytes=gemini.storage_limit_bytes, headroom_bytes=gemini.storage_headroom_bytes,
                        ours_bytes=queries.ours_bytes(session),
                        foreign_bytes=(state.foreign_bytes or 0) if state else 0)


def make_room(ctx: Context, session: Session, size: int, *, now: datetime, evict: bool = True) -> bool:
    """True when `size` more bytes fit under the limit now. Otherwise, if `evict`, our least recently needed
    copies that no prompt needs are chosen, marked expired and queued for deletion (in this transaction; the
    deletions run afterwards), and the upload waits for them. False, with the reason in `ctx.pauses`."""
    current = ledger(ctx, session)
    if current.fits(size):
        ctx.pauses.storage_note = None
        return True
    if not evict:
        return False
    pinned = prompt_queue.needs_remote_copies(session, ctx.settings)
    active = session.scalars(select(Recording).where(Recording.state == S.ACTIVE, lifecycle.is_free(now))).all()
    residents = [quota.Resident(r.id, r.remote_bytes or 0, r.last_needed_at, r.uploaded_at, r.id in pinned)
                 for r in active]
    chosen = quota.choose_evictions(residents, needed_bytes=size, free_bytes=current.free_bytes)
    if chosen is None:
        ctx.pauses.storage_note = (f"waiting for storage: {size / 1e6:.1f} MB to upload, "
                                    f"{max(current.free_bytes, 0) / 1e6:.1f} MB free of "
                                    f"{ctx.settings.gemini.storage_limit_bytes / 1e6:.1f} MB, and every upload of "
                                    "ours is needed by a prompt")
        notify.quota_full(session, ctx, used_bytes=current.ours_bytes + current.foreign_bytes,
                          limit_bytes=current.limit_bytes, needed_bytes=size, detail=ctx.pauses.storage_note,
                          now=now)
        return False
    for recording in (session.get(Recording, rid) for rid in chosen):
        if recording is not None and lifecycle.advance(session, recording.id, expected=S.ACTIVE, to=S.EXPIRED,
                                                       now=now, reason=f"evicted for quota ({recording.remote_name} "
                                                                       "is deleted to make room)"):
            queue_deletion(session, recording, reason="evicted for quota", now=now)
            log.info("recording %d: evicting %s for quota", recording.id, recording.remote_name)
    ctx.pauses.storage_note = None
    ctx.wake("delete")  # runs once this transaction is committed: the claims come first in the dispatcher
    return False


def queue_deletion(session: Session, recording: Recording, *, reason: str, now: datetime) -> None:
    """Queue our remote copy of `recording` for deletion (its bytes stay in the ledger until the server confirms)."""
    if recording.remote_name:
        queue_remote_deletion(session, recording.remote_name, recording.remote_bytes or 0, reason=reason, now=now,
                              recording_id=recording.id)


def queue_remote_deletion(session: Session, name: str, size: int, *, reason: str, now: datetime,
                          recording_id: int | None = None) -> None:
    if session.scalar(select(RemoteDeletion.id).where(RemoteDeletion.remote_name == name)) is None:
        session.add(RemoteDeletion(remote_name=name, remote_bytes=size, recording_id=recording_id, reason=reason,
                                   created_at=now, attempts=0))
        session.flush()


# -- deleting remote copies ------------------------------------------------------------------------------------

class DeleteKind(ContextKind):
    """Engine work: delete the queued remote copies, one request each, outside any transaction."""

    name = "delete"

    def workers(self) -> int:
        return 2

    def claim(self, session: Session, now: datetime, limit: int) -> list[Claim]:
        if self.api_unusable(now):
            return []
        due = session.scalars(select(RemoteDeletion).where(
            or_(RemoteDeletion.next_attempt_at.is_(None), RemoteDeletion.next_attempt_at <= now),
            or_(RemoteDeletion.claimed_until.is_(None), RemoteDeletion.claimed_until < now))
            .order_by(RemoteDeletion.id).limit(limit).with_for_update(skip_locked=True)).all()
        claims = []
        for row in due:
            result = session.execute(update(RemoteDeletion).where(RemoteDeletion.id == row.id,
                                                                  RemoteDeletion.claim_token == row.claim_token)
                                     .values(claimed_by=self.ctx.holder, claimed_until=self.lease(now),
                                             claim_token=row.claim_token + 1)
                                     .execution_options(synchronize_session=False))
            if rowcount(result):
                claims.append(Claim(self.name, RemoteDeletion, row.id, row.claim_token + 1,
                                    {"name": row.remote_name, "attempts": row.attempts}))
        return claims

    def next_due(self, session: Session, now: datetime) -> datetime | None:
        if self.ctx.client is None:
            return None
        if self.ctx.pauses.paused(now):
            return self.ctx.pauses.resume_at()
        return session.scalar(select(func.min(RemoteDeletion.next_attempt_at))
                              .where(RemoteDeletion.next_attempt_at > now))

    def run(self, claim: Claim) -> None:
        assert self.ctx.client is not None
        name = claim.data["name"]
        try:
            self.ctx.client.delete(name)
        except RemoteFileGone:
            pass  # already gone: the space is free either way
        except Exception as err:
            self._failed(claim, err)
            return
        self.ctx.pauses.clear_network_problems()
        with session_scope(self.ctx.sessions) as session:
            session.execute(delete(RemoteDeletion).where(RemoteDeletion.id == claim.key,
                                                         RemoteDeletion.claim_token == claim.token))
        log.info("deleted %s", name)
        self.ctx.wake("upload")

    def _failed(self, claim: Claim, err: Exception) -> None:
        now = self.ctx.now()
        attempts = claim.data["attempts"] + 1
        decision = policy.decide(err, attempts=attempts, now=now)
        if decision.action in (Action.WAIT_OFFLINE, Action.WAIT_AUTH):
            self.ctx.pauses.pause_for(decision, now)
        when = decision.retry_at or policy.backoff(now, attempts)
        with session_scope(self.ctx.sessions) as session:
            session.execute(update(RemoteDeletion).where(RemoteDeletion.id == claim.key,
                                                         RemoteDeletion.claim_token == claim.token)
                            .values(attempts=attempts, next_attempt_at=when, claimed_by=None, claimed_until=None)
                            .execution_options(synchronize_session=False))
        log.warning("could not delete %s (%s); retrying at %s", claim.data["name"], decision.error,
                    when.isoformat(timespec="seconds"))


class DeletionSweeper:
    """Frees dead claims on queued deletions and periodic jobs (neither has a state to go back to)."""

    def take_back(self, session: Session, now: datetime, dead: Any) -> int:
        taken = 0
        for table in (RemoteDeletion, PeriodicJob):
            result = session.execute(update(table).where(table.claimed_by.is_not(None), dead(table))
                                     .values(claimed_by=None, claimed_until=None)
                                     .execution_options(synchronize_session=False))
            taken += rowcount(result)
        return taken


# -- expiry -----------------------------------------------------------------------------------------------------

def expire_due(session: Session, now: datetime) -> int:
    """Active recordings past the server's expiration_time become expired (the compact copy stays)."""
    due = session.scalars(select(Recording).where(Recording.state == S.ACTIVE, Recording.remote_expires_at <= now,
                                                  lifecycle.is_free(now))).all()
    for recording in due:
        expires = recording.remote_expires_at.isoformat(timespec="seconds") if recording.remote_expires_at else ""
        lifecycle.advance(session, recording.id, expected=S.ACTIVE, to=S.EXPIRED, now=now,
                          reason=f"{recording.remote_name} expired at {expires}")
    return len(due)


def next_expiry(session: Session, now: datetime) -> datetime | None:
    return session.scalar(select(func.min(Recording.remote_expires_at)).where(Recording.state == S.ACTIVE))


# -- reconciliation ------------------------------------------------------------------------------------------

def worth_reconciling(session: Session) -> bool:
    """Whether the server's list can tell anything now: copies of ours that should be there, uploads that may
    have reached it, deletions pending, or uploads about to need the ledger. A daemon whose recordings have all
    expired has nothing to compare, and does not load the SDK just to list nothing."""
    busy = session.scalar(select(Recording.id).where(Recording.state.in_(
        (S.CONVERTED, S.UPLOADING, S.PROCESSING, S.ACTIVE))).limit(1))
    return busy is not None or session.scalar(select(RemoteDeletion.id).limit(1)) is not None


def reconcile(ctx: Context) -> None:
    """Compare the server's file list with the database and correct the database. The database is read first
    and the list after, so an upload that finishes in between is never mistaken for a file gone from the server."""
    assert ctx.client is not None
    started = ctx.now()
    with session_scope(ctx.sessions) as session:
        snapshot = {row.id: (row.remote_name, row.state_changed_at) for row in session.execute(
            select(Recording.id, Recording.remote_name, Recording.state_changed_at)
            .where(Recording.state.in_(ALIVE)))}
    remote_files = ctx.client.list_files()
    prefix = display_prefix(ctx.instance_id)
    by_name = {f.name: f for f in remote_files}
    now = ctx.now()
    with session_scope(ctx.sessions) as session:
        for recording_id, (name, changed_at) in snapshot.items():
            remote = by_name.get(name or "")
            current = session.get(Recording, recording_id)
            if current is None or current.state not in ALIVE or current.state_changed_at != changed_at:
                continue  # it moved on while the list was read
            if remote is None:
                lifecycle.advance(session, recording_id, expected=current.state, to=S.EXPIRED, now=now,
                                  reason=f"{name} is gone from the server")
            elif remote.expires_at and remote.expires_at != current.remote_expires_at:
                current.remote_expires_at = remote.expires_at
        known = set(session.scalars(select(Recording.remote_name).where(Recording.state.in_(ALIVE))).all())
        leaving = set(session.scalars(select(RemoteDeletion.remote_name)).all())
        for remote in remote_files:
            ours = (remote.display_name or "").startswith(prefix)
            if ours and remote.name not in known and remote.name not in leaving:
                _adopt_or_delete(session, remote, prefix, now, started)
        foreign = sum(f.size_bytes for f in remote_files if not (f.display_name or "").startswith(prefix))
        state = session.get(DaemonState, 1)
        if state is not None:
            state.foreign_bytes = foreign
            state.remote_used_bytes = sum(f.size_bytes for f in remote_files)
            state.reconciled_at = now
        fits = ledger(ctx, session).fits(ctx.pauses.refused_bytes)
    ctx.pauses.clear_network_problems()
    ctx.pauses.storage_reconciled(fits)
    ctx.wake("upload", "delete")


def _adopt_or_delete(session: Session, remote: RemoteFile, prefix: str, now: datetime, started: datetime) -> None:
    """One of our files the database does not know: an upload that finished just before a crash (adopted by its
    content hash), or a leftover copy nothing claims (queued for deletion)."""
    try:
        recording_id = int((remote.display_name or "")[len(prefix):].split("-")[0])
    except ValueError:
        recording_id = -1
    recording = session.get(Recording, recording_id)
    if recording is not None and recording.state == S.UPLOADING:
        return  # an upload in flight (or about to be resumed) owns it: it looks its file up by name itself
    if recording is not None and recording.uploaded_at is not None and recording.uploaded_at >= started:
        return  # uploaded after the list was asked for
    claimable = recording is not None and recording.state in (S.CONVERTED, S.FAILED, S.EXPIRED)
    if claimable and recording is not None and remote.sha256_hex == recording.converted_sha256 \
            and remote.state in ("ACTIVE", "PROCESSING"):
        lifecycle.advance(session, recording.id, expected=recording.state, to=S.UPLOADING, now=now,
                          reason=f"found {remote.name} on the server, uploaded before an interruption")
        to = S.ACTIVE if remote.state == "ACTIVE" else S.PROCESSING
        lifecycle.advance(session, recording.id, expected=S.UPLOADING, to=to, now=now,
                          reason=f"adopted {remote.name} (same content)", remote_name=remote.name,
                          remote_uri=remote.uri, remote_bytes=remote.size_bytes, remote_expires_at=remote.expires_at,
                          uploaded_at=now, error=None, next_attempt_at=None, claimed_by=None, claimed_until=None)
        log.info("recording %d: adopted %s", recording.id, remote.name)
        return
    queue_remote_deletion(session, remote.name, remote.size_bytes, now=now,
                          reason=f"an upload of ours ({remote.display_name}) that no recording claims")
    log.info("deleting %s (%s): an upload of ours that no recording claims", remote.name, remote.display_name)
