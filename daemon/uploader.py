"""The upload step: converted -> uploading -> processing -> active, with the intent recorded before each
upload so that a crash or a lost reply never leaves a second copy on the server."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from daemon import lifecycle
from daemon.context import Context, next_attempt
from daemon.errors import (
    AuthError,
    OfflineError,
    PermanentError,
    RemoteFileGone,
    StorageQuotaFull,
    TransientError,
)
from daemon.gemini import RemoteFile, display_name_for
from daemon.lifecycle import RecordingState as S
from db.models import Recording
from db.session import session_scope

log = logging.getLogger(__name__)

# How long uploads pause after the API was unreachable or refused the key, before trying again.
OFFLINE_PAUSE_SECONDS = 5.0
AUTH_PAUSE_SECONDS = 300.0


class Uploader:
    """Claims converted recordings and uploads them on a small pool of threads."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.pool = ThreadPoolExecutor(max_workers=ctx.settings.gemini.upload_workers, thread_name_prefix="upload")
        self.in_flight: set[int] = set()
        self.lock = threading.Lock()

    def dispatch(self) -> None:
        """Start uploads for waiting recordings, up to the number of workers (one tick of the upload job)."""
        ctx = self.ctx
        if ctx.client is None or ctx.waiting.paused(ctx.now()):
            return
        with self.lock:
            free = ctx.settings.gemini.upload_workers - len(self.in_flight)
            busy = set(self.in_flight)
        if free <= 0:
            return
        with session_scope(ctx.sessions) as session:
            # Uploads left in `uploading` by a previous run are resumed first: they may have reached the server.
            stale = session.scalars(select(Recording.id).where(Recording.state == S.UPLOADING.value,
                                                               Recording.id.not_in(busy)).limit(free)).all()
            claimed = [(rid, True) for rid in stale]
            candidates = session.scalars(select(Recording).where(Recording.state == S.CONVERTED.value)
                                         .order_by(Recording.id).limit(free - len(claimed))).all()
            for recording in candidates:
                name = display_name_for(recording.id, recording.converted_sha256 or recording.sha256 or "")
                if lifecycle.advance(session, recording.id, expected=S.CONVERTED, to=S.UPLOADING, now=ctx.now(),
                                     reason="upload started", upload_display_name=name):
                    claimed.append((recording.id, False))
        for recording_id, resuming in claimed:
            with self.lock:
                self.in_flight.add(recording_id)
            self.pool.submit(self._run, recording_id, resuming)

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
    for remote in ctx.client.list_files():
        if remote.display_name == display_name and remote.state in ("ACTIVE", "PROCESSING"):
            return remote
    return None


def upload_recording(ctx: Context, recording_id: int, *, resuming: bool = False) -> None:
    assert ctx.client is not None
    with session_scope(ctx.sessions) as session:
        recording = session.get(Recording, recording_id)
        if recording is None or recording.state != S.UPLOADING.value:
            return
        display_name = recording.upload_display_name or display_name_for(recording.id, recording.sha256 or "")
        path = Path(recording.converted_path or "")
        mime_type = recording.converted_mime or "audio/ogg"
        attempts = recording.attempts
    try:
        remote = find_existing(ctx, display_name) if (resuming or attempts) else None
        if remote is not None:
            log.info("recording %d: adopting %s, uploaded before the last interruption", recording_id, remote.name)
        else:
            remote = ctx.client.upload(path, mime_type=mime_type, display_name=display_name)
    except (OfflineError, AuthError, StorageQuotaFull) as err:
        _wait_globally(ctx, err)
        with session_scope(ctx.sessions) as session:
            lifecycle.advance(session, recording_id, expected=S.UPLOADING, to=S.CONVERTED, now=ctx.now(),
                              reason=f"upload waits: {err.title}")
        return
    except FileNotFoundError:
        _fail(ctx, recording_id, f"the compact copy {path} is missing; it will be converted again", attempts, 0.0)
        return
    except TransientError as err:
        _fail(ctx, recording_id, err.title, attempts + 1, err.retry_after)
        return
    except PermanentError as err:
        _fail(ctx, recording_id, err.title, attempts + 1, None, give_up=True)
        return
    ctx.waiting.offline_since = None
    ctx.waiting.auth_problem = None
    _record_remote(ctx, recording_id, S.UPLOADING, remote)


def _record_remote(ctx: Context, recording_id: int, current: S, remote: RemoteFile) -> None:
    fields = dict(remote_name=remote.name, remote_uri=remote.uri, remote_bytes=remote.size_bytes,
                  remote_expires_at=remote.expires_at)
    now = ctx.now()
    with session_scope(ctx.sessions) as session:
        if remote.state == "ACTIVE":
            expires = remote.expires_at.isoformat(timespec="seconds") if remote.expires_at else "unknown"
            lifecycle.advance(session, recording_id, expected=current, to=S.ACTIVE, now=now,
                              reason=f"{remote.name} is ACTIVE, expires {expires}", error=None, attempts=0,
                              next_attempt_at=None, uploaded_at=now if current is S.UPLOADING else None, **fields)
            log.info("recording %d: %s ACTIVE", recording_id, remote.name)
        elif remote.state == "FAILED":
            message = remote.error or "the server could not process the file"
            lifecycle.advance(session, recording_id, expected=current, to=S.FAILED, now=now,
                              reason=f"{remote.name} FAILED: {message}", error=f"server processing failed: {message}",
                              next_attempt_at=next_attempt(now, 1), **fields)
        elif current is S.UPLOADING:
            lifecycle.advance(session, recording_id, expected=current, to=S.PROCESSING, now=now,
                              reason=f"{remote.name} uploaded, waiting for ACTIVE", uploaded_at=now, **fields)


def poll_processing(ctx: Context) -> None:
    """Ask the server about uploads that are not ACTIVE yet (the SDK never waits for ACTIVE)."""
    if ctx.client is None:
        return
    with session_scope(ctx.sessions) as session:
        waiting = session.scalars(select(Recording).where(Recording.state == S.PROCESSING.value)).all()
    timeout = timedelta(seconds=ctx.settings.gemini.processing_timeout_seconds)
    for recording in waiting:
        try:
            remote = ctx.client.get(recording.remote_name or "")
        except RemoteFileGone as err:
            _fail(ctx, recording.id, err.title, recording.attempts + 1, 0.0, current=S.PROCESSING)
            continue
        except (OfflineError, TransientError, AuthError):
            return
        if remote.state == "PROCESSING" and recording.uploaded_at and ctx.now() - recording.uploaded_at > timeout:
            _fail(ctx, recording.id, f"{remote.name} stayed PROCESSING for more than {timeout}", recording.attempts + 1,
                  None, current=S.PROCESSING)
            continue
        _record_remote(ctx, recording.id, S.PROCESSING, remote)


def _fail(ctx: Context, recording_id: int, error: str, attempts: int, retry_after: float | None, *,
          give_up: bool = False, current: S = S.UPLOADING) -> None:
    now = ctx.now()
    when = None if give_up else next_attempt(now, max(attempts, 1), retry_after)
    hint = f"retry at {when.isoformat(timespec='seconds')}" if when else "run `audiodrop retry ID` once fixed"
    with session_scope(ctx.sessions) as session:
        lifecycle.advance(session, recording_id, expected=current, to=S.FAILED, now=now, reason=f"{error}; {hint}",
                          error=error, attempts=attempts, next_attempt_at=when)
    log.warning("recording %d failed: %s; %s", recording_id, error, hint)


def _wait_globally(ctx: Context, err: Exception) -> None:
    now = ctx.now()
    waiting = ctx.waiting
    if isinstance(err, OfflineError):
        waiting.offline_since = waiting.offline_since or now
        waiting.retry_at = now + timedelta(seconds=OFFLINE_PAUSE_SECONDS)
    elif isinstance(err, AuthError):
        waiting.auth_problem = str(err)
        waiting.retry_at = now + timedelta(seconds=AUTH_PAUSE_SECONDS)
    elif isinstance(err, StorageQuotaFull):
        waiting.quota_problem = str(err)
        waiting.retry_at = now + timedelta(seconds=60)
    log.warning("uploads wait: %s", err)
