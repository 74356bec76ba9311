"""The upload step: converted (or expired and needed again) -> uploading -> processing -> active.

The intent (a display name unique to this installation and recording) is recorded before each upload, and an
upload that may have reached the server before an interruption is looked up by that name before it is sent
again, so a crash or a lost reply never leaves a second copy on the server. Room is made under the storage
limit before an upload starts."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon import lifecycle, policy, prompts, quota, remote
from daemon.context import Context
from daemon.errors import PermanentError
from daemon.gemini import RemoteFile, display_name_for
from daemon.lifecycle import RecordingState as S
from daemon.policy import Action
from db.models import Recording
from db.session import session_scope

log = logging.getLogger(__name__)


class Uploader:
    """Claims recordings that need uploading and uploads them on a small pool of threads."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.pool = ThreadPoolExecutor(max_workers=ctx.settings.gemini.upload_workers, thread_name_prefix="upload")
        self.in_flight: set[int] = set()
        self.lock = threading.Lock()

    def busy(self) -> set[int]:
        with self.lock:
            return set(self.in_flight)

    def dispatch(self) -> None:
        """Start uploads for waiting recordings, up to the number of workers (one tick of the upload job)."""
        ctx = self.ctx
        if ctx.client is None or ctx.waiting.paused(ctx.now()):
            return
        busy = self.busy()
        free = ctx.settings.gemini.upload_workers - len(busy)
        if free <= 0:
            return
        claimed: list[tuple[int, bool]] = []
        with session_scope(ctx.sessions) as session:
            # Uploads a previous run left in `uploading` are resumed first: they may have reached the server.
            stale = session.scalars(select(Recording.id).where(Recording.state == S.UPLOADING.value,
                                                               Recording.id.not_in(busy)).limit(free)).all()
            claimed += [(recording_id, True) for recording_id in stale]
            for recording, evict in self._candidates(session, free):
                if len(claimed) >= free:
                    break
                size = recording.converted_bytes or 0
                if size > quota.MAX_FILE_BYTES:
                    lifecycle.advance(session, recording.id, expected=S(recording.state), to=S.CONVERTING,
                                      now=ctx.now(), reason="too large for the Files API; converting again")
                    continue
                if not remote.make_room(ctx, session, size, evict=evict):
                    break
                name = display_name_for(ctx.instance_id, recording.id, recording.converted_sha256 or "")
                if lifecycle.advance(session, recording.id, expected=S(recording.state), to=S.UPLOADING,
                                     now=ctx.now(), upload_display_name=name,
                                     reason="uploading again" if recording.state == S.EXPIRED.value
                                     else "upload started"):
                    claimed.append((recording.id, False))
        for recording_id, resuming in claimed:
            with self.lock:
                self.in_flight.add(recording_id)
            self.pool.submit(self._run, recording_id, resuming)

    def _candidates(self, session: Session, limit: int) -> list[tuple[Recording, bool]]:
        """What to upload, in order, and whether it may evict: expired recordings a prompt needs, new ones,
        then (keep_resident) the rest of the expired ones, which never evict anything. Only as many rows as
        one tick can start are read: the history of expired recordings grows without end."""
        pinned = prompts.needs_remote_copies(session, self.ctx.settings)
        by_state = lambda state: select(Recording).where(Recording.state == state).order_by(Recording.id)  # noqa: E731
        needed = session.scalars(by_state(S.EXPIRED.value).where(Recording.id.in_(pinned)).limit(limit)).all()
        converted = session.scalars(by_state(S.CONVERTED.value).limit(limit)).all()
        resident: list[Recording] = []
        if self.ctx.settings.gemini.keep_resident:
            resident = list(session.scalars(by_state(S.EXPIRED.value).where(Recording.id.not_in(pinned))
                                            .limit(limit)).all())
        return [(r, True) for r in needed] + [(r, True) for r in converted] + [(r, False) for r in resident]

    def _run(self, recording_id: int, resuming: bool) -> None:
        try:
            upload_recording(self.ctx, recording_id, resuming=resuming)
        except Exception:
            log.exception("recording %d: unexpected error during upload", recording_id)
        finally:
            with self.lock:
                self.in_flight.discard(recording_id)
            self.ctx.wake("upload")

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def find_existing(ctx: Context, display_name: str) -> RemoteFile | None:
    """A live remote file that an earlier attempt for this recording left on the server."""
    assert ctx.client is not None
    for candidate in ctx.client.list_files():
        if candidate.display_name == display_name and candidate.state in ("ACTIVE", "PROCESSING"):
            return candidate
    return None


def upload_recording(ctx: Context, recording_id: int, *, resuming: bool = False) -> None:
    assert ctx.client is not None
    with session_scope(ctx.sessions) as session:
        recording = session.get(Recording, recording_id)
        if recording is None or recording.state != S.UPLOADING.value:
            return
        display_name = recording.upload_display_name or display_name_for(ctx.instance_id, recording.id,
                                                                          recording.converted_sha256 or "")
        path = Path(recording.converted_path or "")
        mime_type = recording.converted_mime or "audio/ogg"
        attempts = recording.attempts
    try:
        found = find_existing(ctx, display_name) if (resuming or attempts) else None
        if found is not None:
            log.info("recording %d: adopting %s, uploaded before an interruption", recording_id, found.name)
            uploaded = found
        elif not path.is_file():
            raise PermanentError(f"the compact copy {path.name} is missing", "it is converted again")
        else:
            uploaded = ctx.client.upload(path, mime_type=mime_type, display_name=display_name)
    except Exception as err:  # every error goes through the one policy
        handle_failure(ctx, recording_id, S.UPLOADING, err, attempts + 1, missing_copy=not path.is_file())
        return
    ctx.waiting.clear_network_problems()
    record_remote(ctx, recording_id, S.UPLOADING, uploaded)


def record_remote(ctx: Context, recording_id: int, current: S, uploaded: RemoteFile) -> None:
    fields = dict(remote_name=uploaded.name, remote_uri=uploaded.uri, remote_bytes=uploaded.size_bytes,
                  remote_expires_at=uploaded.expires_at)
    now = ctx.now()
    with session_scope(ctx.sessions) as session:
        if uploaded.state == "ACTIVE":
            expires = uploaded.expires_at.isoformat(timespec="seconds") if uploaded.expires_at else "unknown"
            extra = {"uploaded_at": now} if current is S.UPLOADING else {}
            lifecycle.advance(session, recording_id, expected=current, to=S.ACTIVE, now=now,
                              reason=f"{uploaded.name} is ACTIVE, expires {expires}", error=None, attempts=0,
                              next_attempt_at=None, **extra, **fields)
            log.info("recording %d: %s ACTIVE", recording_id, uploaded.name)
        elif uploaded.state == "FAILED":
            message = uploaded.error or "the server could not process the file"
            lifecycle.advance(session, recording_id, expected=current, to=S.FAILED, now=now,
                              reason=f"{uploaded.name} FAILED: {message}",
                              error=f"server processing failed: {message}",
                              next_attempt_at=policy.backoff(now, 1), **fields)
        elif current is S.UPLOADING:
            lifecycle.advance(session, recording_id, expected=current, to=S.PROCESSING, now=now,
                              reason=f"{uploaded.name} uploaded, waiting for ACTIVE", uploaded_at=now, **fields)


def poll_processing(ctx: Context) -> None:
    """Ask the server about uploads that are not ACTIVE yet (the SDK never waits for ACTIVE)."""
    if ctx.client is None or ctx.waiting.paused(ctx.now()):
        return
    with session_scope(ctx.sessions) as session:
        waiting = session.scalars(select(Recording).where(Recording.state == S.PROCESSING.value)).all()
    timeout = timedelta(seconds=ctx.settings.gemini.processing_timeout_seconds)
    for recording in waiting:
        try:
            current = ctx.client.get(recording.remote_name or "")
        except Exception as err:
            handle_failure(ctx, recording.id, S.PROCESSING, err, recording.attempts + 1)
            continue
        if current.state == "PROCESSING" and recording.uploaded_at and ctx.now() - recording.uploaded_at > timeout:
            handle_failure(ctx, recording.id, S.PROCESSING,
                           PermanentError(f"{current.name} stayed PROCESSING for more than {timeout}"),
                           recording.attempts + 1)
            continue
        record_remote(ctx, recording.id, S.PROCESSING, current)


def handle_failure(ctx: Context, recording_id: int, current: S, err: BaseException, attempts: int, *,
                   missing_copy: bool = False) -> None:
    """Apply the error policy to one recording whose upload (or processing) step failed."""
    now = ctx.now()
    decision = policy.decide(err, attempts=attempts, now=now)
    if decision.action in (Action.WAIT_OFFLINE, Action.WAIT_AUTH, Action.MAKE_ROOM):
        # Not this recording's fault: it waits in `converted` while the whole upload queue pauses.
        ctx.waiting.note(decision, now)
        if decision.action is Action.MAKE_ROOM and ctx.client is not None:
            ctx.wake("reconcile")  # learn what else occupies the project's storage
        if current is S.UPLOADING:
            with session_scope(ctx.sessions) as session:
                lifecycle.advance(session, recording_id, expected=current, to=S.CONVERTED, now=now,
                                  reason=f"upload waits: {decision.error}")
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
        lifecycle.advance(session, recording_id, expected=current, to=S.FAILED, now=now,
                          reason=f"{decision.error}; {hint}", error=decision.error, attempts=attempts,
                          next_attempt_at=None if give_up else decision.retry_at, **changes)
    log.warning("recording %d failed: %s; %s", recording_id, decision.error, hint)
