"""The upload step, as engine work: converted (or expired and needed again) -> uploading -> processing -> active.

The claim reserves the upload's bytes in the storage ledger in the same transaction that checks the room (an
`uploading` row counts), and records the intent: a display name unique to this installation and recording. An
upload that may have reached the server before an interruption is looked up by that name before it is sent again,
so a crash or a lost reply never leaves a second copy on the server. Files the server still processes are
looked at again every `processing_poll_seconds` by the processing-check work."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from daemon import policy
from daemon.context import Context, ContextKind
from daemon.engine import Claim
from daemon.errors import PermanentError
from daemon.gemini import RemoteFile, display_name_for
from daemon.pipeline import copies, lifecycle, quota, remote
from daemon.pipeline.progress import ProgressWriter
from daemon.policy import Action
from daemon.prompts import queue as prompt_queue
from db.models import Recording
from db.session import advisory_lock, session_scope
from db.states import RecordingState as S

log = logging.getLogger(__name__)

STORAGE_RECHECK_SECONDS = 30.0


class UploadKind(ContextKind):
    """Engine work: claim what needs uploading (within the storage limit) and upload it."""

    name = "upload"

    def __init__(self, ctx: Context, lease: Callable[[datetime], datetime], only: set[int] | None = None) -> None:
        super().__init__(ctx, lease)
        self.only = only

    def workers(self) -> int:
        return self.ctx.settings.gemini.upload_workers

    def _query(self, state: S, now: datetime) -> Any:
        query = (select(Recording).where(Recording.state == state, lifecycle.is_free(now)).order_by(Recording.id)
                 .with_for_update(skip_locked=True))
        return query.where(Recording.id.in_(self.only)) if self.only is not None else query

    def claim(self, session: Session, now: datetime, limit: int) -> list[Claim]:
        ctx = self.ctx
        if ctx.client is None or ctx.pauses.paused(now, upload=True):
            return []
        # The room check and the claims that reserve the bytes are one step for the whole fleet.
        advisory_lock(session, "storage-ledger")
        claims: list[Claim] = []
        # Uploads interrupted earlier come first: they may have reached the server (their bytes are reserved).
        for recording in session.scalars(self._query(S.UPLOADING, now).limit(limit)).all():
            token = lifecycle.claim(session, recording.id, expected=S.UPLOADING, now=now, holder=ctx.holder,
                                    until=self.lease(now), progress_bytes=None)
            if token is not None:
                claims.append(Claim(self.name, Recording, recording.id, token, {"resuming": True}))
        for recording, evict in self._candidates(session, now, limit - len(claims)):
            if len(claims) >= limit:
                break
            size = recording.converted_bytes or 0
            if size > quota.MAX_FILE_BYTES:
                lifecycle.advance(session, recording.id, expected=recording.state, to=S.FAILED, now=now,
                                  error=f"the compact copy is {size / 1e9:.1f} GB, over the Files API's 2 GB per file;"
                                        " prompts over it are sent in pieces", reason="too large to upload")
                continue
            if not remote.make_room(ctx, session, size, now=now, evict=evict):
                break
            reason = "uploading again" if recording.state == S.EXPIRED else "upload started"
            token = lifecycle.claim(session, recording.id, expected=recording.state, to=S.UPLOADING, now=now,
                                    holder=ctx.holder, until=self.lease(now), reason=reason, progress_bytes=None,
                                    upload_display_name=display_name_for(ctx.instance_id, recording.id,
                                                                         recording.converted_sha256 or ""))
            if token is not None:
                claims.append(Claim(self.name, Recording, recording.id, token, {"resuming": False}))
        return claims

    def _candidates(self, session: Session, now: datetime, limit: int) -> list[tuple[Recording, bool]]:
        """What to upload, in order, and whether it may evict: expired recordings a prompt needs, new ones,
        then (keep_resident) the rest of the expired ones, which never evict anything. Only as many rows as
        one claim can start are read: the history of expired recordings grows without end."""
        if limit <= 0:
            return []
        pinned = prompt_queue.needs_remote_copies(session, self.ctx.settings)
        needed = session.scalars(self._query(S.EXPIRED, now).where(Recording.id.in_(pinned)).limit(limit)).all()
        converted = session.scalars(self._query(S.CONVERTED, now).limit(limit)).all()
        resident: list[Recording] = []
        if self.ctx.settings.gemini.keep_resident:
            resident = list(session.scalars(self._query(S.EXPIRED, now).where(Recording.id.not_in(pinned))
                                            .limit(limit)).all())
        return [(r, True) for r in needed] + [(r, True) for r in converted] + [(r, False) for r in resident]

    def next_due(self, session: Session, now: datetime) -> datetime | None:
        if self.ctx.client is None:
            return None
        if self.ctx.pauses.paused(now, upload=True):
            return self.ctx.pauses.resume_at(upload=True)
        if self.ctx.pauses.storage_note:  # waiting for room: events bring it, this only bounds a lost one
            return now + timedelta(seconds=STORAGE_RECHECK_SECONDS)
        return None  # new uploads appear through events: a conversion, a retry, a prompt, freed room

    def run(self, claim: Claim) -> None:
        try:
            upload_recording(self.ctx, claim.key, claim.token, resuming=claim.data["resuming"])
        finally:
            self.ctx.wake("poll", "prompt")


def find_existing(ctx: Context, display_name: str) -> RemoteFile | None:
    """A live remote file that an earlier attempt for this recording left on the server."""
    assert ctx.client is not None
    for candidate in ctx.client.list_files():
        if candidate.display_name == display_name and candidate.state in ("ACTIVE", "PROCESSING"):
            return candidate
    return None


def upload_recording(ctx: Context, recording_id: int, token: int, *, resuming: bool = False) -> None:
    assert ctx.client is not None
    with session_scope(ctx.sessions) as session:
        recording = session.get(Recording, recording_id)
        if recording is None or recording.state != S.UPLOADING or recording.claim_token != token:
            return
        display_name = recording.upload_display_name or display_name_for(ctx.instance_id, recording.id,
                                                                          recording.converted_sha256 or "")
        mime_type = recording.converted_mime or "audio/ogg"
        attempts, size = recording.attempts, recording.converted_bytes or 0
        session.expunge(recording)
    # This node's file, or (a fleet) the copy kept in the database: outside the transaction, it may be fetched.
    path = copies.local(ctx, recording) or Path(recording.converted_path or "")
    try:
        found = find_existing(ctx, display_name) if resuming else None
        if found is not None:
            log.info("recording %d: adopting %s, uploaded before an interruption", recording_id, found.name)
            uploaded = found
        elif not path.is_file():
            raise PermanentError(f"the compact copy {path.name} is missing", "it is converted again")
        else:
            uploaded = ctx.client.upload(path, mime_type=mime_type, display_name=display_name,
                                         progress=ProgressWriter(ctx, recording_id, token, "progress_bytes"))
    except Exception as err:  # every error goes through the one policy
        handle_failure(ctx, recording_id, token, S.UPLOADING, err, attempts + 1, missing_copy=not path.is_file(),
                       size=size)
        return
    ctx.pauses.clear_network_problems()
    ctx.pauses.upload_succeeded()
    record_remote(ctx, recording_id, token, S.UPLOADING, uploaded)


def record_remote(ctx: Context, recording_id: int, token: int, current: S, uploaded: RemoteFile) -> None:
    """The server's answer about an upload: ACTIVE, FAILED, or still PROCESSING (looked at again later)."""
    fields: dict[str, Any] = {"remote_name": uploaded.name, "remote_uri": uploaded.uri,
                                  "remote_bytes": uploaded.size_bytes, "remote_expires_at": uploaded.expires_at}
    now = ctx.now()
    poll = timedelta(seconds=ctx.settings.gemini.processing_poll_seconds)
    with session_scope(ctx.sessions) as session:
        if uploaded.state == "ACTIVE":
            expires = uploaded.expires_at.isoformat(timespec="seconds") if uploaded.expires_at else "unknown"
            extra = {"uploaded_at": now} if current is S.UPLOADING else {}
            if lifecycle.advance(session, recording_id, expected=current, to=S.ACTIVE, now=now, token=token,
                                 release=True, reason=f"{uploaded.name} is ACTIVE, expires {expires}", error=None,
                                 attempts=0, next_attempt_at=None, **extra, **fields):
                prompt_queue.recording_ready(session, recording_id)
                log.info("recording %d: %s ACTIVE", recording_id, uploaded.name)
        elif uploaded.state == "FAILED":
            message = uploaded.error or "the server could not process the file"
            lifecycle.advance(session, recording_id, expected=current, to=S.FAILED, now=now, token=token,
                              release=True, reason=f"{uploaded.name} FAILED: {message}",
                              error=f"server processing failed: {message}",
                              next_attempt_at=policy.backoff(now, 1), **fields)
        elif current is S.UPLOADING:
            lifecycle.advance(session, recording_id, expected=current, to=S.PROCESSING, now=now, token=token,
                              release=True, reason=f"{uploaded.name} uploaded, waiting for ACTIVE", uploaded_at=now,
                              next_attempt_at=now + poll, **fields)
        else:
            lifecycle.update_claimed(session, recording_id, token, release=True, next_attempt_at=now + poll)
    ctx.wake("poll", at=now + poll)


class ProcessingKind(ContextKind):
    """Engine work: ask the server about uploads that are not ACTIVE yet (the SDK never waits for ACTIVE)."""

    name = "poll"

    def claim(self, session: Session, now: datetime, limit: int) -> list[Claim]:
        if self.api_unusable(now):
            return []
        due = session.scalars(select(Recording).where(
            Recording.state == S.PROCESSING, lifecycle.is_free(now),
            (Recording.next_attempt_at.is_(None)) | (Recording.next_attempt_at <= now))
            .order_by(Recording.next_attempt_at).limit(limit).with_for_update(skip_locked=True)).all()
        claims = []
        for recording in due:
            token = lifecycle.claim(session, recording.id, expected=S.PROCESSING, now=now, holder=self.ctx.holder,
                                    until=self.lease(now))
            if token is not None:
                claims.append(Claim(self.name, Recording, recording.id, token))
        return claims

    def next_due(self, session: Session, now: datetime) -> datetime | None:
        if self.ctx.client is None:
            return None
        if self.ctx.pauses.paused(now):
            return self.ctx.pauses.resume_at()
        return session.scalar(select(func.min(Recording.next_attempt_at)).where(Recording.state == S.PROCESSING))

    def run(self, claim: Claim) -> None:
        ctx = self.ctx
        assert ctx.client is not None
        with session_scope(ctx.sessions) as session:
            recording = session.get(Recording, claim.key)
            if recording is None or recording.claim_token != claim.token:
                return
            name, uploaded_at, attempts = recording.remote_name or "", recording.uploaded_at, recording.attempts
        timeout = timedelta(seconds=ctx.settings.gemini.processing_timeout_seconds)
        try:
            current = ctx.client.get(name)
        except Exception as err:
            self._check_failed(claim, err, attempts + 1)
            return
        ctx.pauses.clear_network_problems()
        if current.state == "PROCESSING" and uploaded_at and ctx.now() - uploaded_at > timeout:
            self._stuck(claim, current, attempts + 1, timeout)
            return
        record_remote(ctx, claim.key, claim.token, S.PROCESSING, current)
        ctx.wake("prompt", "upload")  # an ACTIVE copy may be what a waiting upload can evict

    def _stuck(self, claim: Claim, current: RemoteFile, attempts: int, timeout: timedelta) -> None:
        """A file that stays PROCESSING too long: deleted, and the recording uploaded again later."""
        now = self.ctx.now()
        error = f"{current.name} stayed PROCESSING for more than {timeout}"
        when = policy.backoff(now, attempts)
        with session_scope(self.ctx.sessions) as session:
            if lifecycle.advance(session, claim.key, expected=S.PROCESSING, to=S.FAILED, now=now, token=claim.token,
                                 release=True, reason=f"{error}; uploading it again at "
                                                      f"{when.isoformat(timespec='seconds')}",
                                 error=error, attempts=attempts, next_attempt_at=when):
                remote.queue_remote_deletion(session, current.name, current.size_bytes, now=now,
                                             reason="stayed PROCESSING too long", recording_id=claim.key)
        self.ctx.wake("delete")

    def _check_failed(self, claim: Claim, err: Exception, attempts: int) -> None:
        """A files.get that failed says nothing about the upload itself: look again later; only a file the
        server no longer has (403) is gone, and is uploaded again."""
        ctx, now = self.ctx, self.ctx.now()
        decision = policy.decide(err, attempts=attempts, now=now)
        if decision.action in (Action.WAIT_OFFLINE, Action.WAIT_AUTH):
            ctx.pauses.pause_for(decision, now)
        with session_scope(ctx.sessions) as session:
            if decision.action is Action.REUPLOAD:
                lifecycle.advance(session, claim.key, expected=S.PROCESSING, to=S.EXPIRED, now=now,
                                  token=claim.token, release=True, reason=f"{decision.error}; uploading it again")
            elif decision.action is Action.GIVE_UP:
                lifecycle.advance(session, claim.key, expected=S.PROCESSING, to=S.FAILED, now=now,
                                  token=claim.token, release=True, reason=decision.error, error=decision.error,
                                  attempts=attempts)
            else:
                lifecycle.update_claimed(session, claim.key, claim.token, release=True, attempts=attempts,
                                         next_attempt_at=decision.retry_at or policy.backoff(now, attempts))
        log.warning("recording %s: checking its upload failed: %s", claim.key, decision.error)


def handle_failure(ctx: Context, recording_id: int, token: int, current: S, err: BaseException, attempts: int, *,
                   missing_copy: bool = False, size: int = 0) -> None:
    """Apply the error policy to one recording whose upload (or processing check) failed."""
    now = ctx.now()
    decision = policy.decide(err, attempts=attempts, now=now)
    if decision.action in (Action.WAIT_OFFLINE, Action.WAIT_AUTH, Action.MAKE_ROOM):
        # Not this recording's fault: it waits while the whole upload queue pauses.
        ctx.pauses.pause_for(decision, now, refused_bytes=size, quota_pause=ctx.settings.gemini.storage_retry_seconds)
        if decision.action is Action.MAKE_ROOM:
            ctx.wake("reconcile")  # learn what else occupies the project's storage
        with session_scope(ctx.sessions) as session:
            if current is S.UPLOADING:
                lifecycle.advance(session, recording_id, expected=current, to=S.CONVERTED, now=now, token=token,
                                  release=True, reason=f"upload waits: {decision.error}")
            else:
                lifecycle.update_claimed(session, recording_id, token, release=True,
                                         next_attempt_at=ctx.pauses.resume_at())
        log.warning("uploads wait: %s", decision.error)
        return
    changes: dict[str, object] = {}
    if decision.action is Action.REENCODE:
        # Converted again in the fallback format (from the source, or from this copy if the source is gone),
        # and then uploaded on its own.
        changes = {"target_format": ctx.settings.conversion.fallback_format}
    if missing_copy or decision.action in (Action.REENCODE, Action.REUPLOAD):
        decision = policy.Decision(decision.action, decision.error, now)
    give_up = decision.action is Action.GIVE_UP
    hint = f"retry at {decision.retry_at.isoformat(timespec='seconds')}" if decision.retry_at and not give_up \
        else "run `audiodrop retry ID` once fixed"
    with session_scope(ctx.sessions) as session:
        lifecycle.advance(session, recording_id, expected=current, to=S.FAILED, now=now, token=token, release=True,
                          reason=f"{decision.error}; {hint}", error=decision.error, attempts=attempts,
                          next_attempt_at=None if give_up else decision.retry_at, **changes)
    log.warning("recording %d failed: %s; %s", recording_id, decision.error, hint)
