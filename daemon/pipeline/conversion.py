"""The conversion step, as a kind of engine work: a settled discovered recording is claimed (discovered ->
converting), its file is opened once and everything reads that descriptor (so a rename or move while it
converts changes nothing), it is hashed and de-duplicated, probed and converted to the compact mono copy, and
becomes converted, rejected or failed. The claim's final write names its fencing token.

Identity is the content: the same audio dropped again under any name is processed once; the same audio as a
failed or rejected recording brings that recording back; a recording converted again (the API refused its
format) never takes whatever else now sits at its old path; a file that grew with the same beginning replaces
the shorter recording it was taken from."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from daemon.context import Context, ContextKind
from daemon.engine import Claim
from daemon.errors import PermanentError, RejectedInput, TransientError
from daemon.pipeline import copies, intake, lifecycle, remote, transcode
from daemon.pipeline.progress import ProgressWriter
from daemon.policy import backoff
from daemon.prompts import queue as prompt_queue
from db.models import Prompt, PromptRecording, Recording
from db.session import session_scope
from db.states import PromptState as P
from db.states import RecordingState as S

log = logging.getLogger(__name__)

HASH_BLOCK = 1024 * 1024


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def fd_digests(fd: int, prefix_bytes: int | None = None) -> tuple[str, str | None]:
    """The SHA-256 of everything an open file holds, and of its first `prefix_bytes` (None if shorter), read once."""
    digest, prefix = hashlib.sha256(), None
    offset = 0
    while True:
        block = os.pread(fd, HASH_BLOCK, offset)
        if not block:
            break
        if prefix_bytes is not None and offset < prefix_bytes <= offset + len(block):
            partial = digest.copy()
            partial.update(block[: prefix_bytes - offset])
            prefix = partial.hexdigest()
        digest.update(block)
        offset += len(block)
    return digest.hexdigest(), prefix


@dataclass(frozen=True)
class Job:
    """What one conversion needs, read from its recording at the start."""

    recording_id: int
    token: int
    source: Path
    size: int
    mtime_ns: int
    target_format: str
    attempts: int
    known_sha256: str | None  # set when the recording is converted again
    old_copy: str | None
    supersedes: tuple[int, int, str] | None  # (recording id, its size, its sha256): this file may have grown from it


class ConvertKind(ContextKind):
    """Engine work: discovered -> converting -> converted | rejected | failed."""

    name = "convert"
    restartable = True  # at a stop it is abandoned at once: converting again costs only time

    def __init__(self, ctx: Context, lease: Callable[[datetime], datetime], only: set[int] | None = None) -> None:
        super().__init__(ctx, lease)
        self.only = only  # `audiodrop process`: only these recordings

    def workers(self) -> int:
        return self.ctx.settings.conversion.workers

    def claim(self, session: Session, now: datetime, limit: int) -> list[Claim]:
        rules = self.ctx.settings.intake
        # Only this node's files (a fleet's other nodes cannot read them); SKIP LOCKED: rows another node is
        # claiming right now are passed over, not waited for (a no-op on SQLite).
        query = (select(Recording).where(Recording.state == S.DISCOVERED, lifecycle.is_free(now),
                                         lifecycle.settled(now, rules.close_quiet_seconds, rules.settle_seconds),
                                         lifecycle.on_node(self.ctx.node, fleet=self.ctx.fleet))
                 .order_by(Recording.id).limit(limit * 4).with_for_update(skip_locked=True))
        if self.only is not None:
            query = query.where(Recording.id.in_(self.only))
        candidates = session.scalars(query).all()
        ready = [recording for recording in candidates if self._file_ready(session, recording, now)]
        claims: list[Claim] = []
        for recording in ready[:limit]:
            token = lifecycle.claim(session, recording.id, expected=S.DISCOVERED, to=S.CONVERTING, now=now,
                                    holder=self.ctx.holder, until=self.lease(now),
                                    reason="the file is complete; converting", progress_seconds=None)
            if token is not None:
                claims.append(Claim(self.name, Recording, recording.id, token))
        return claims

    def _file_ready(self, session: Session, recording: Recording, now: datetime) -> bool:
        """Look at the file before claiming it: vanished, changed, or still held open for writing."""
        path = Path(recording.source_path)
        try:
            info = os.stat(path)
        except OSError:
            return self._vanished(session, recording, now)
        if (info.st_size, info.st_mtime_ns) != (recording.source_size, recording.source_mtime_ns):
            session.execute(update(Recording).where(Recording.id == recording.id)
                            .values(source_size=info.st_size, source_mtime_ns=info.st_mtime_ns, last_change_at=now,
                                    closed_after_write=False).execution_options(synchronize_session=False))
            return False
        if intake.open_for_writing(path):
            # Still being written: it counts as changing until the writer lets go (its close wakes us earlier).
            session.execute(update(Recording).where(Recording.id == recording.id)
                            .values(last_change_at=now, closed_after_write=False)
                            .execution_options(synchronize_session=False))
            return False
        return True

    def _vanished(self, session: Session, recording: Recording, now: datetime) -> bool:
        """The file is gone before its conversion started. Never hashed: forgotten (a deleted or moved partial
        copy; a moved file is found again where it went). Converted before (now re-encoded): from the kept copy."""
        if recording.converted_path and os.path.exists(recording.converted_path):
            return True
        if lifecycle.forget(session, recording.id):
            log.info("%s: gone before it was complete; forgotten", recording.source_path)
            return False
        lifecycle.advance(session, recording.id, expected=S.DISCOVERED, to=S.REJECTED, now=now,
                          reason="the source file is gone and no compact copy is left",
                          error=f"{Path(recording.source_path).name}: the source file is gone and no compact copy "
                                "is left; drop the recording again to convert it")
        return False

    def next_due(self, session: Session, now: datetime) -> datetime | None:
        rules = self.ctx.settings.intake
        due: list[datetime] = []
        for closed, quiet in ((True, rules.close_quiet_seconds), (False, rules.settle_seconds)):
            oldest = session.scalar(select(Recording.last_change_at).where(
                Recording.state == S.DISCOVERED, Recording.closed_after_write.is_(closed))
                .order_by(Recording.last_change_at).limit(1))
            if oldest is not None:
                due.append(oldest + timedelta(seconds=quiet))
        held = session.scalar(select(Recording.next_attempt_at).where(
            Recording.state == S.DISCOVERED, Recording.next_attempt_at > now).order_by(Recording.next_attempt_at)
            .limit(1))
        if held is not None:
            due.append(held)
        return max(min(due), now + timedelta(milliseconds=20)) if due else None

    def run(self, claim: Claim) -> None:
        try:
            convert(self.ctx, claim.key, claim.token)
        except Exception:
            log.exception("recording %s: unexpected error during conversion", claim.key)
            with session_scope(self.ctx.sessions) as session:
                lifecycle.advance(session, claim.key, expected=S.CONVERTING, to=S.FAILED, now=self.ctx.now(),
                                  token=claim.token, release=True,
                                  reason="unexpected error during conversion (its traceback is in the log)",
                                  error="unexpected error during conversion; the log has the details",
                                  next_attempt_at=backoff(self.ctx.now(), 3))
        finally:
            self.ctx.wake("upload", "prompt", "convert")


def _job(ctx: Context, recording_id: int, token: int) -> Job | None:
    with session_scope(ctx.sessions) as session:
        recording = session.get(Recording, recording_id)
        if recording is None or recording.state != S.CONVERTING or recording.claim_token != token:
            return None
        supersedes = None
        if recording.supersedes_id is not None:
            older = session.get(Recording, recording.supersedes_id)
            if older is not None and older.sha256 and older.source_size < recording.source_size:
                supersedes = (older.id, older.source_size, older.sha256)
        return Job(recording_id, token, Path(recording.source_path), recording.source_size,
                   recording.source_mtime_ns, recording.target_format or ctx.settings.conversion.format,
                   recording.attempts, recording.sha256, recording.converted_path, supersedes)


def convert(ctx: Context, recording_id: int, token: int) -> None:
    """The whole conversion step for one recording already claimed as `converting` with `token`."""
    job = _job(ctx, recording_id, token)
    if job is None:
        return
    name = job.source.name
    try:
        descriptor = os.open(job.source, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        descriptor = -1
    except OSError as err:
        return _failed(ctx, job, f"{name}: cannot be read ({err.strerror})", permanent=False)
    try:
        _convert_open(ctx, job, descriptor)
    finally:
        if descriptor >= 0:
            os.close(descriptor)


def _convert_open(ctx: Context, job: Job, descriptor: int) -> None:
    name = job.source.name
    copy_left = bool(job.old_copy and os.path.exists(job.old_copy))
    source, from_copy, why_copy = transcode.opened(descriptor), False, ""
    growth: int | None = None
    try:
        if descriptor < 0:
            if not (job.known_sha256 and copy_left):
                return _back(ctx, job, f"{name}: the file disappeared before it was read")
            source, from_copy, why_copy = Path(job.old_copy or ""), True, "the original file is gone"
        else:
            info = os.fstat(descriptor)
            if (info.st_size, info.st_mtime_ns) != (job.size, job.mtime_ns):
                return _back(ctx, job, "the file changed again; waiting for it to be complete")
            sha256, prefix = fd_digests(descriptor, job.supersedes[1] if job.supersedes else None)
            if (os.fstat(descriptor).st_size, os.fstat(descriptor).st_mtime_ns) != (job.size, job.mtime_ns):
                return _back(ctx, job, "the file changed while it was read")
            if job.known_sha256 is not None and sha256 != job.known_sha256:
                # Converting again, but the path now holds other audio (a new recording reusing the name, which
                # intake takes on its own): the recording's own audio is its kept compact copy, or it is lost.
                if not copy_left:
                    return _failed(ctx, job, f"{name}: the file now holds different audio and no compact copy of "
                                             "this recording is left; drop the original recording again",
                                   permanent=True)
                source, from_copy, why_copy = Path(job.old_copy or ""), True, "the original file now holds other audio"
            elif job.known_sha256 is None:
                if _take_identity(ctx, job, sha256):
                    return
                if job.supersedes and prefix == job.supersedes[2]:
                    growth = job.supersedes[0]
        fmt = transcode.FORMATS[job.target_format]
        identity = job.known_sha256 or _sha_of(ctx, job.recording_id)
        destination = ctx.settings.converted_dir / f"{identity[:24]}{fmt.extension}"
        if from_copy and Path(job.old_copy or "") == destination:
            destination = destination.with_name(f"{identity[:24]}-{fmt.name}{fmt.extension}")
        settings = ctx.settings.conversion
        probed = transcode.probe(source, ffprobe=settings.ffprobe, label=name)
        result = transcode.convert(source, destination, fmt, probe_result=probed, ffmpeg=settings.ffmpeg,
                                   ffprobe=settings.ffprobe, label=name,
                                   timeout=transcode.conversion_timeout(probed.duration_seconds),
                                   progress=ProgressWriter(ctx, job.recording_id, job.token, "progress_seconds"))
        if not from_copy and (os.fstat(descriptor).st_size, os.fstat(descriptor).st_mtime_ns) != (job.size,
                                                                                                  job.mtime_ns):
            destination.unlink(missing_ok=True)
            return _back(ctx, job, "the file changed during conversion; converting it again")
        converted_sha256 = file_sha256(result.path)
        if ctx.fleet:  # every node can reach it, also while this one sleeps
            with session_scope(ctx.sessions) as session:
                copies.store(session, converted_sha256, result.path)
    except FileNotFoundError:
        return _back(ctx, job, f"{name}: the file disappeared during conversion")
    except RejectedInput as err:
        _finish(ctx, job, S.REJECTED, reason=str(err), error=err.title)
        return
    except TransientError as err:
        return _failed(ctx, job, err.title, permanent=False, reason=str(err))
    except PermanentError as err:
        _finish(ctx, job, S.REJECTED, reason=str(err), error=err.title)
        return
    except OSError as err:
        return _failed(ctx, job, f"{name}: cannot be read ({err})", permanent=False)
    reason = f"converted to {result.format} ({result.size_bytes} bytes, {result.duration_seconds:.1f} s)"
    if from_copy:
        reason += f" from the kept compact copy ({why_copy})"
    if result.warning:
        reason += f"; warning: {result.warning}"
        log.warning("%s: %s", name, result.warning)
    done = _finish(ctx, job, S.CONVERTED, reason=reason, error=None, warning=result.warning,
                   duration_seconds=result.duration_seconds, converted_path=str(result.path),
                   converted_bytes=result.size_bytes, converted_mime=result.mime_type, converted_format=result.format,
                   converted_sha256=converted_sha256, attempts=0, next_attempt_at=None)
    if not done:
        if str(result.path) != job.old_copy:
            result.path.unlink(missing_ok=True)
        return
    log.info("%s: %s", name, reason)
    if job.old_copy and job.old_copy != str(result.path):
        Path(job.old_copy).unlink(missing_ok=True)  # the copy in the format the API refused
    with session_scope(ctx.sessions) as session:
        recording = session.get(Recording, job.recording_id)
        if recording is not None:
            if growth is not None:
                _replace_shorter(ctx, session, growth, recording)
            prompt_queue.enqueue_watch_prompts(session, ctx.settings, recording, now=ctx.now())
            prompt_queue.recording_ready(session, recording.id)
    ctx.wake("delete", "upload", "prompt")


def _sha_of(ctx: Context, recording_id: int) -> str:
    with session_scope(ctx.sessions) as session:
        return session.scalar(select(Recording.sha256).where(Recording.id == recording_id)) or ""


def _take_identity(ctx: Context, job: Job, sha256: str) -> bool:
    """Claim the content hash for this recording, or settle what the same content elsewhere means. True when
    this row's work ends here (merged, or it brought an earlier recording back)."""
    now = ctx.now()
    try:
        with session_scope(ctx.sessions) as session:
            recording = session.get(Recording, job.recording_id)
            if recording is None or recording.claim_token != job.token:
                return True
            original = session.scalar(select(Recording).where(Recording.sha256 == sha256,
                                                              Recording.id != job.recording_id))
            if original is None:
                lifecycle.update_claimed(session, job.recording_id, job.token, sha256=sha256)
                return False
            if lifecycle.revive(session, original, recording, now=now):
                log.info("%s: same audio as %s recording %d; converting it again from here", recording.source_path,
                         original.state, original.id)
                ctx.wake("convert")
                return True
            if original.node == recording.node and not os.path.lexists(original.source_path) \
                    and original.state not in (S.DISCOVERED, S.CONVERTING):
                # The original's file is gone and this is the same audio: it was moved; follow it.
                lifecycle.follow_move(session, original.id, path=recording.source_path,
                                      watch_root=recording.watch_root, size=recording.source_size,
                                      mtime_ns=recording.source_mtime_ns, now=now)
                session.delete(recording)
                return True
            lifecycle.merge_duplicate(session, recording, original.id, now=now)
            log.info("%s: same content as recording %d; processed once", recording.source_path, original.id)
            return True
    except IntegrityError:
        # Another worker claimed the same hash a moment earlier: look again, it is now the original.
        return _take_identity(ctx, job, sha256)


def _replace_shorter(ctx: Context, session: Session, older_id: int, longer: Recording) -> None:
    """The file grew after its first part was taken (a writer that closed and reopened it): the longer recording
    replaces the shorter one. Its remote copy is deleted, prompts still waiting for it move to the longer one."""
    older = session.get(Recording, older_id)
    now = ctx.now()
    if older is None or older.state not in (S.CONVERTED, S.ACTIVE, S.EXPIRED, S.FAILED):
        return
    if older.state == S.ACTIVE:
        remote.queue_deletion(session, older, reason=f"superseded by recording {longer.id}", now=now)
    reason = (f"replaced by recording {longer.id}: the file grew from {older.source_size} to {longer.source_size} "
              "bytes with the same beginning")
    if not lifecycle.advance(session, older.id, expected=older.state, to=S.REJECTED, now=now, reason=reason,
                             error=reason):
        return
    waiting = select(PromptRecording.prompt_id).where(PromptRecording.recording_id == older.id)
    session.execute(update(PromptRecording).where(
        PromptRecording.recording_id == older.id,
        PromptRecording.prompt_id.in_(select(Prompt.id).where(Prompt.id.in_(waiting),
                                                              Prompt.state.in_((P.QUEUED, P.RUNNING)))))
        .values(recording_id=longer.id).execution_options(synchronize_session=False))
    if older.converted_path:
        Path(older.converted_path).unlink(missing_ok=True)
    lifecycle.note(session, longer.id, now=now, reason=f"replaces recording {older.id}, its shorter first part")
    log.info("recording %d replaces recording %d: the file grew", longer.id, older.id)


def _finish(ctx: Context, job: Job, to: S, *, reason: str, **changes: Any) -> bool:
    with session_scope(ctx.sessions) as session:
        moved = lifecycle.advance(session, job.recording_id, expected=S.CONVERTING, to=to, now=ctx.now(),
                                  reason=reason, token=job.token, release=True, **changes)
    if to in (S.REJECTED, S.FAILED):
        log.warning("recording %d %s: %s", job.recording_id, to.value, reason)
    return moved


def _failed(ctx: Context, job: Job, error: str, *, permanent: bool, reason: str | None = None) -> None:
    attempts = job.attempts + 1
    when = None if permanent else backoff(ctx.now(), attempts)
    hint = "run `audiodrop retry ID` once fixed" if permanent else \
        f"retried at {when.isoformat(timespec='seconds') if when else ''}"
    _finish(ctx, job, S.FAILED, reason=f"{reason or error}; {hint}", error=error, attempts=attempts,
            next_attempt_at=when)


def _back(ctx: Context, job: Job, reason: str) -> None:
    """Not convertible now (the file changed or vanished): back to discovered, to be looked at again."""
    now = ctx.now()
    changes: dict[str, Any] = {"last_change_at": now, "closed_after_write": False}
    if job.known_sha256 is None:
        changes["sha256"] = None  # the content hashed this time is not the recording's: it is still changing
    try:
        info = os.stat(job.source)
        changes.update(source_size=info.st_size, source_mtime_ns=info.st_mtime_ns)
    except OSError:
        pass
    with session_scope(ctx.sessions) as session:
        lifecycle.advance(session, job.recording_id, expected=S.CONVERTING, to=S.DISCOVERED, now=now, reason=reason,
                          token=job.token, release=True, **changes)
    log.info("recording %d: %s", job.recording_id, reason)
