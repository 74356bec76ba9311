"""The conversion step: a claimed recording (converting) is hashed, de-duplicated, probed and converted to the
compact mono copy, then becomes converted, rejected or failed. Conversions run in a thread pool."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from daemon import lifecycle, prompts, transcode
from daemon.context import Context
from daemon.policy import backoff
from daemon.errors import PermanentError, RejectedInput, TransientError
from daemon.lifecycle import RecordingState as S
from db.models import Recording
from db.session import session_scope

log = logging.getLogger(__name__)

HASH_BLOCK = 1024 * 1024


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _stat_key(path: Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns


def convert_recording(ctx: Context, recording_id: int) -> None:
    """Run the whole conversion step for one recording already claimed as `converting`."""
    with session_scope(ctx.sessions) as session:
        recording = session.get(Recording, recording_id)
        if recording is None or recording.state != S.CONVERTING.value:
            return
        source = Path(recording.source_path)
        expected_key = (recording.source_size, recording.source_mtime_ns)
        target_format = recording.target_format or ctx.settings.conversion.format
        attempts = recording.attempts
        known_sha256, old_copy = recording.sha256, recording.converted_path
    name = source.name
    # Converting again (the API refused the format) after the original was deleted: the kept compact copy
    # is the only audio left, so it is the input. Lossy to lossy, but nothing is lost that a prompt needs.
    from_copy = bool(known_sha256 and old_copy and not source.exists() and os.path.exists(old_copy))
    try:
        if from_copy:
            source, sha256 = Path(old_copy or ""), known_sha256 or ""
        else:
            if _stat_key(source) != expected_key:
                return _back_to_discovered(ctx, recording_id, "the file changed again; waiting for it to be complete")
            sha256 = file_sha256(source)
            if _stat_key(source) != expected_key:
                return _back_to_discovered(ctx, recording_id, "the file changed while it was read")
            if _merge_if_duplicate(ctx, recording_id, sha256):
                return
        fmt = transcode.FORMATS[target_format]
        destination = ctx.settings.converted_dir / f"{sha256[:24]}{fmt.extension}"
        destination.parent.mkdir(parents=True, exist_ok=True)
        probed = transcode.probe(source, ffprobe=ctx.settings.conversion.ffprobe)
        result = transcode.convert(source, destination, fmt, probe_result=probed,
                                   ffmpeg=ctx.settings.conversion.ffmpeg, ffprobe=ctx.settings.conversion.ffprobe,
                                   timeout=transcode.conversion_timeout(probed.duration_seconds))
        if not from_copy and _stat_key(source) != expected_key:
            destination.unlink(missing_ok=True)
            return _back_to_discovered(ctx, recording_id, "the file changed during conversion; converting it again")
        converted_sha256 = file_sha256(result.path)
    except FileNotFoundError:
        with session_scope(ctx.sessions) as session:
            lifecycle.advance(session, recording_id, expected=S.CONVERTING, to=S.DISCOVERED, now=ctx.now(),
                              reason=f"{name}: the file disappeared during conversion")
        return
    except RejectedInput as err:
        return _finish(ctx, recording_id, S.REJECTED, reason=str(err), error=err.title)
    except TransientError as err:
        when = backoff(ctx.now(), attempts + 1)
        return _finish(ctx, recording_id, S.FAILED, reason=str(err), error=err.title, attempts=attempts + 1,
                       next_attempt_at=when)
    except PermanentError as err:
        return _finish(ctx, recording_id, S.REJECTED, reason=str(err), error=err.title)
    except OSError as err:
        when = backoff(ctx.now(), attempts + 1)
        return _finish(ctx, recording_id, S.FAILED, reason=f"{name}: {err}", error=f"{name}: cannot be read ({err})",
                       attempts=attempts + 1, next_attempt_at=when)
    reason = f"converted to {result.format} ({result.size_bytes} bytes, {result.duration_seconds:.1f} s)"
    if from_copy:
        reason += " from the kept compact copy (the original file is gone)"
    if result.warning:
        reason += f"; warning: {result.warning}"
        log.warning("%s: %s", name, result.warning)
    _finish(ctx, recording_id, S.CONVERTED, reason=reason, error=None, warning=result.warning,
            duration_seconds=result.duration_seconds, converted_path=str(result.path),
            converted_bytes=result.size_bytes, converted_mime=result.mime_type, converted_format=result.format,
            converted_sha256=converted_sha256, attempts=0, next_attempt_at=None)
    log.info("%s: %s", name, reason)
    if old_copy and old_copy != str(result.path):
        Path(old_copy).unlink(missing_ok=True)  # the copy in the format the API refused
    with session_scope(ctx.sessions) as session:
        recording = session.get(Recording, recording_id)
        if recording is not None:
            prompts.enqueue_watch_prompts(session, ctx.settings, recording, now=ctx.now())
    ctx.wake("upload")


def convert_guarded(ctx: Context, recording_id: int) -> None:
    """convert_recording, and a bug in it fails this recording (with its traceback in the log), not the daemon."""
    try:
        convert_recording(ctx, recording_id)
    except Exception:
        log.exception("recording %d: unexpected error during conversion", recording_id)
        with session_scope(ctx.sessions) as session:
            lifecycle.advance(session, recording_id, expected=S.CONVERTING, to=S.FAILED, now=ctx.now(),
                              reason="unexpected error during conversion (its traceback is in the log)",
                              error="unexpected error during conversion; the log has the details")


def _finish(ctx: Context, recording_id: int, to: S, *, reason: str, **changes: object) -> None:
    with session_scope(ctx.sessions) as session:
        lifecycle.advance(session, recording_id, expected=S.CONVERTING, to=to, now=ctx.now(), reason=reason,
                          **changes)
    if to in (S.REJECTED, S.FAILED):
        log.warning("recording %d %s: %s", recording_id, to.value, reason)


def _back_to_discovered(ctx: Context, recording_id: int, reason: str) -> None:
    with session_scope(ctx.sessions) as session:
        recording = session.get(Recording, recording_id)
        if recording is None:
            return
        try:
            size, mtime_ns = _stat_key(Path(recording.source_path))
        except OSError:
            size, mtime_ns = recording.source_size, recording.source_mtime_ns
        lifecycle.advance(session, recording_id, expected=S.CONVERTING, to=S.DISCOVERED, now=ctx.now(),
                          reason=reason, source_size=size, source_mtime_ns=mtime_ns, last_change_at=ctx.now(),
                          closed_after_write=False)
    log.info("recording %d: %s", recording_id, reason)


def _merge_if_duplicate(ctx: Context, recording_id: int, sha256: str) -> bool:
    """Same content as another recording: remember this file on the original and stop. Otherwise claim the hash."""
    try:
        with session_scope(ctx.sessions) as session:
            original = session.scalar(select(Recording.id).where(Recording.sha256 == sha256,
                                                                 Recording.id != recording_id))
            recording = session.get(Recording, recording_id)
            if original is None:
                session.execute(update(Recording).where(Recording.id == recording_id).values(sha256=sha256)
                                .execution_options(synchronize_session=False))
                return False
            lifecycle.merge_duplicate(session, recording, original, now=ctx.now())
            log.info("%s: same content as recording %d; processed once", recording.source_path, original)
            return True
    except IntegrityError:
        # Another worker claimed the same hash a moment earlier: this one is its duplicate.
        return _merge_if_duplicate(ctx, recording_id, sha256)
