"""The prompt queue: queueing a prompt over recordings, and running it (as engine work) once every file it needs
is usable.

A prompt runs only when all its recordings are ACTIVE and none expires within the margin; otherwise it waits
(queued, with `waiting_for` saying why) while the uploader re-uploads them, and their progress wakes it. A small
recording whose remote copy is not live goes inline instead. Long transcripts and `--from/--to` spans are cut
locally with ffmpeg and sent as inline pieces, and their timestamps are mapped back onto the recording's
timeline. A result whose finish reason is not STOP, or that is empty, is never `done`: the prompt is retried
with a larger output budget, then split, and fails with the reason if that does not help.

The answer is stored in the database the moment it arrives (the prompt is then `done`); its files are written
after, and a failed write is retried without asking the model again: every answer is billed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from daemon import policy
from daemon.clock import Clock, iso
from daemon.config import Settings
from daemon.context import Context
from daemon.engine import Claim
from daemon.errors import GenerationTimeout, PermanentError, TransientError
from daemon.gemini import FilePart, Generation, InlinePart
from daemon.pipeline import copies, lifecycle, remote, transcode
from daemon.policy import Action
from daemon.prompts import chunking, results, search
from daemon.prompts import lifecycle as prompt_lifecycle
from daemon.prompts.queue import planned_delivery
from db.models import Prompt, PromptPart, PromptRecording, RateSlot, Recording, TokenUsage
from db.session import advisory_lock, rowcount, session_scope
from db.states import PromptState as P
from db.states import RecordingState as S

log = logging.getLogger(__name__)

MIN_CHUNK_SECONDS = 120.0
# A transcript whose timestamps stop before this share of its audio is flagged: its end may be missing.
LOW_COVERAGE = 0.8
# A prompt waiting for its files is woken by their progress; this only bounds a lost wake-up.
FILES_RECHECK_SECONDS = 60.0
# Generations that run out of generate_timeout_seconds: each may have been billed, so only this many are tried.
MAX_GENERATION_TIMEOUTS = 2
RESULT_FILES_RETRY_SECONDS = 15.0


class NotReady(Exception):
    """The prompt's files are not usable yet; it waits in the queue (woken when they are)."""


class RateLimited(Exception):
    """No request slot for the model yet; it waits in the queue until `at`."""

    def __init__(self, message: str, at: datetime) -> None:
        super().__init__(message)
        self.at = at


class Truncated(Exception):
    """The model's answer stopped early (finish reason not STOP, or empty)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# The server counts requests when they arrive; a slot is taken a moment before (the request is still built and
# sent): a second of margin keeps a busy machine's late request out of the next window.
RATE_WINDOW_SECONDS = 61.0


class RateLimiter:
    """At most `requests_per_minute` requests to each model over any sliding minute, for every daemon sharing the
    database: the slots are rows, counted and taken under a lock (in a fleet, the database's advisory lock)."""

    def __init__(self, sessions: sessionmaker[Session], clock: Clock, per_minute: int,
                 window_seconds: float = RATE_WINDOW_SECONDS) -> None:
        self.sessions = sessions
        self.clock = clock
        self.per_minute = per_minute
        self.window_seconds = window_seconds
        self.lock = threading.Lock()  # this process's workers; the advisory lock orders the fleet's

    def take(self, model: str) -> float:
        """0 if a request to `model` may go now (and counts it), else the seconds until one may."""
        with self.lock, session_scope(self.sessions) as session:
            advisory_lock(session, f"rate:{model}")
            now = self.clock.now()
            window = now - timedelta(seconds=self.window_seconds)
            session.execute(delete(RateSlot).where(RateSlot.at < window))
            sent = session.scalars(select(RateSlot.at).where(RateSlot.model == model, RateSlot.at >= window)
                                   .order_by(RateSlot.at)).all()
            if len(sent) >= self.per_minute:
                return self.window_seconds - (now - sent[0]).total_seconds()
            session.add(RateSlot(model=model, at=now))
            return 0.0


class PromptKind:
    """Engine work: claim due prompts (queued -> running) and run them."""

    name = "prompt"

    def __init__(self, ctx: Context, lease: Any, only: set[int] | None = None) -> None:
        self.ctx = ctx
        self.lease = lease
        self.only = only
        self.limiter = RateLimiter(ctx.sessions, ctx.clock, ctx.settings.prompts.requests_per_minute)

    def workers(self) -> int:
        return self.ctx.settings.prompts.workers

    def claim(self, session: Session, now: datetime, limit: int) -> list[Claim]:
        if self.ctx.client is None or self.ctx.pauses.paused(now):
            return []
        query = (select(Prompt.id).where(Prompt.state == P.QUEUED,
                                         or_(Prompt.next_attempt_at.is_(None), Prompt.next_attempt_at <= now),
                                         or_(Prompt.claimed_until.is_(None), Prompt.claimed_until < now))
                 .order_by(Prompt.id).limit(limit).with_for_update(skip_locked=True))
        if self.only is not None:
            query = query.where(Prompt.id.in_(self.only))
        claims = []
        for prompt_id in session.scalars(query).all():
            token = prompt_lifecycle.claim(session, prompt_id, now=now, holder=self.ctx.holder, until=self.lease(now))
            if token is not None:
                claims.append(Claim(self.name, Prompt, prompt_id, token))
        return claims

    def next_due(self, session: Session, now: datetime) -> datetime | None:
        if self.ctx.client is None:
            return None
        if self.ctx.pauses.paused(now):
            return self.ctx.pauses.resume_at()
        return session.scalar(select(func.min(Prompt.next_attempt_at)).where(Prompt.state == P.QUEUED))

    def run(self, claim: Claim) -> None:
        try:
            run_prompt(self.ctx, claim.key, claim.token, self.limiter)
        except Exception:
            log.exception("prompt %s: unexpected error", claim.key)
            with session_scope(self.ctx.sessions) as session:
                prompt_lifecycle.advance(session, claim.key, expected=P.RUNNING, to=P.FAILED, now=self.ctx.now(),
                                         token=claim.token, release=True, finished_at=self.ctx.now(),
                                         reason="unexpected error", error="unexpected error while running the "
                                                                          "prompt; see the daemon log")
        finally:
            self.ctx.wake("upload")  # what it pinned may be evictable now


@dataclass
class Job:
    """Everything one run of a prompt needs, read from the database at its start."""

    prompt: Prompt
    recordings: list[Recording]
    token: int


def run_prompt(ctx: Context, prompt_id: int, token: int, limiter: RateLimiter) -> None:
    with session_scope(ctx.sessions) as session:
        prompt = session.get(Prompt, prompt_id)
        if prompt is None or prompt.state != P.RUNNING or prompt.claim_token != token:
            return
        ids = [link.recording_id for link in prompt.recordings]
        recordings = [session.get(Recording, rid) for rid in ids]
        job = Job(prompt, [r for r in recordings if r is not None], token)
        session.expunge_all()
    try:
        text, meta = answer(ctx, job, limiter)
    except NotReady as waiting:
        _requeue(ctx, job, str(waiting), ctx.now() + timedelta(seconds=FILES_RECHECK_SECONDS), wait_kind="files")
        return
    except RateLimited as limited:
        _requeue(ctx, job, str(limited), limited.at, wait_kind="rate")
        return
    except Exception as err:
        _handle_error(ctx, job, err)
        return
    _check_coverage(job, text, meta)
    if store_answer(ctx, job, text, meta):
        write_result_files(ctx, job.prompt.id)


def _check_coverage(job: Job, text: str, meta: dict[str, Any]) -> None:
    """How far a transcript's timestamps reach into its audio. Models sometimes stop early with a STOP finish
    (9 of 73 minutes transcribed): the result says so instead of looking complete. A recording that ends in
    silence scores low too, which is why this warns rather than fails."""
    prompt = job.prompt
    duration = job.recordings[0].duration_seconds if len(job.recordings) == 1 else None
    if prompt.template != "transcribe" or not duration:
        return
    start = prompt.span_start_seconds or 0.0
    end = min(prompt.span_end_seconds if prompt.span_end_seconds is not None else duration, duration)
    if end - start < MIN_CHUNK_SECONDS:
        return  # a short clip's last line may well start long before its end
    share = chunking.coverage(chunking.parse_transcript(text), end, start_seconds=start)
    meta["coverage"] = round(share, 3)
    if share < LOW_COVERAGE:
        reached = chunking.format_clock(start + share * (end - start))
        warning = (f"the transcript's timestamps stop at {reached} of {chunking.format_clock(end)}: "
                   "its end may be missing (or the recording ends in silence)")
        meta["warnings"] = [*meta.get("warnings", []), warning]
        log.warning("prompt %d: %s", prompt.id, warning)


def _budget(ctx: Context, prompt: Prompt) -> int:
    return prompt.max_output_tokens or ctx.settings.prompts.max_output_tokens


def _thinking_budget(ctx: Context) -> int | None:
    budget = ctx.settings.prompts.thinking_budget
    return None if budget < 0 else budget


def parts_to_count(settings: Settings, prompt: Prompt, recordings: list[Recording],
                   scratch: Path) -> list[FilePart | InlinePart]:
    """The audio of a prompt as countTokens can take it without uploading anything: live remote files, else the
    compact copies inline (a --from/--to span cut locally into `scratch`). NotReady says why it cannot.
    Runs ffmpeg: call it outside any transaction."""
    parts: list[FilePart | InlinePart] = []
    inline_bytes = 0
    for recording in recordings:
        live = recording.state == S.ACTIVE and recording.remote_uri
        if live and prompt.span_start_seconds is None:
            parts.append(FilePart(recording.remote_uri or "", recording.converted_mime or ""))
            continue
        if not recording.converted_path or not os.path.exists(recording.converted_path):
            raise NotReady(f"recording {recording.id} is not converted yet")
        source = Path(recording.converted_path)
        if prompt.span_start_seconds is not None:
            fmt = transcode.FORMATS[recording.converted_format or settings.conversion.format]
            end = min(prompt.span_end_seconds if prompt.span_end_seconds is not None else math.inf,
                      recording.duration_seconds or math.inf)
            source = transcode.cut(source, scratch / f"span{fmt.extension}", fmt, prompt.span_start_seconds, end,
                                   ffmpeg=settings.conversion.ffmpeg, ffprobe=settings.conversion.ffprobe).path
        data = source.read_bytes()
        inline_bytes += math.ceil(len(data) * 4 / 3)
        if inline_bytes > settings.prompts.inline_limit_bytes:
            raise NotReady("the audio that is not uploaded is too large to count inline")
        parts.append(InlinePart(data, recording.converted_mime or "audio/ogg"))
    return parts


def _shared(ctx: Context, job: Job) -> bool:
    ids = [r.id for r in job.recordings]
    with session_scope(ctx.sessions) as session:
        other = session.scalar(select(PromptRecording.prompt_id).join(Prompt).where(
            PromptRecording.recording_id.in_(ids), Prompt.id != job.prompt.id,
            Prompt.state.in_((P.QUEUED, P.RUNNING))).limit(1))
    return other is not None


def answer(ctx: Context, job: Job, limiter: RateLimiter) -> tuple[str, dict[str, Any]]:
    """The model's answer for the job, by its planned path: cut pieces, inline, or the Files API."""
    prompt, recordings = job.prompt, job.recordings
    rejected = [r for r in recordings if r.state == S.REJECTED]
    if rejected:
        raise PermanentError(f"recording {rejected[0].id} was rejected: {rejected[0].error}")
    not_converted = [r for r in recordings if not r.converted_path or r.duration_seconds is None]
    if not_converted:
        raise NotReady(f"recording {not_converted[0].id} is not converted yet ({not_converted[0].state})")
    delivery = planned_delivery(ctx.settings, prompt, recordings, shared=_shared(ctx, job))
    single = recordings[0]
    if delivery == "span":
        return _answer_span(ctx, job, single, limiter)
    if delivery == "chunks":
        return _answer_chunked(ctx, job, single, prompt.chunk_seconds or ctx.settings.prompts.chunk_seconds, limiter)
    if delivery == "inline":
        data = _copy_of(ctx, single).read_bytes()
        generation = _generate(ctx, job, [InlinePart(data, single.converted_mime or "audio/ogg")], limiter)
        return generation.text, _meta(generation, delivery="inline")
    parts: list[FilePart | InlinePart | str] = [FilePart(r.remote_uri or "", r.converted_mime or "") for r in
                                                _ready_remote(ctx, job)]
    generation = _generate(ctx, job, parts, limiter)
    return generation.text, _meta(generation, delivery="files")


def _ready_remote(ctx: Context, job: Job) -> list[Recording]:
    """The job's recordings if every one is ACTIVE beyond the expiry margin; otherwise start their re-upload and
    raise NotReady."""
    now = ctx.now()
    margin = timedelta(seconds=ctx.settings.gemini.expiry_margin_seconds)
    waiting = []
    with session_scope(ctx.sessions) as session:
        for recording in job.recordings:
            current = session.get(Recording, recording.id)
            assert current is not None
            live = current.remote_expires_at is not None and current.remote_expires_at > now + margin
            if current.state == S.ACTIVE and live:
                current.last_needed_at = now
                continue
            if current.state == S.ACTIVE:
                lifecycle.advance(session, current.id, expected=S.ACTIVE, to=S.EXPIRED, now=now,
                                  reason=f"expires within the margin; uploading again for prompt {job.prompt.id}")
            waiting.append(f"recording {current.id} ({current.state})")
        fresh = [session.get(Recording, r.id) for r in job.recordings]
        session.expunge_all()
    if waiting:
        ctx.wake("upload")
        raise NotReady("waiting for " + ", ".join(waiting) + " to be uploaded")
    return [r for r in fresh if r is not None]


def _generate(ctx: Context, job: Job, parts: list[FilePart | InlinePart | str], limiter: RateLimiter,
              *, text: str | None = None) -> Generation:
    prompt = job.prompt
    assert ctx.client is not None
    ctx.client.warm()
    wait = limiter.take(prompt.model)
    if wait:
        raise RateLimited(f"rate limit: at most {ctx.settings.prompts.requests_per_minute} requests a minute to "
                          f"{prompt.model}; next in {wait:.0f} s", ctx.now() + timedelta(seconds=wait))
    generation = ctx.client.generate(prompt.model, [*parts, text or prompt.prompt_text],
                                     system_instruction=prompt.system_instruction,
                                     max_output_tokens=_budget(ctx, prompt),
                                     thinking_budget=_thinking_budget(ctx),
                                     timeout_seconds=ctx.settings.prompts.generate_timeout_seconds)
    ctx.pauses.clear_network_problems()
    _record_usage(ctx, prompt, generation)
    if generation.finish_reason != "STOP":
        raise Truncated(f"the answer stopped early (finish reason {generation.finish_reason})")
    if not generation.text.strip():
        raise Truncated("the answer was empty (finish reason STOP)")
    return generation


def _record_usage(ctx: Context, prompt: Prompt, generation: Generation) -> None:
    with session_scope(ctx.sessions) as session:
        session.add(TokenUsage(at=ctx.now(), prompt_id=prompt.id, model=prompt.model,
                               finish_reason=generation.finish_reason, prompt_tokens=generation.prompt_tokens or 0,
                               audio_tokens=generation.audio_tokens or 0, output_tokens=generation.output_tokens or 0,
                               thinking_tokens=generation.thinking_tokens or 0))


def _meta(generation: Generation, *, delivery: str, chunks: int | None = None, fixes: list[str] | None = None,
          prompt_tokens: int | None = None, audio_tokens: int | None = None,
          output_tokens: int | None = None) -> dict[str, Any]:
    return {"delivery": delivery, "finish_reason": generation.finish_reason, "model_version": generation.model_version,
            "prompt_tokens": prompt_tokens if prompt_tokens is not None else generation.prompt_tokens,
            "audio_tokens": audio_tokens if audio_tokens is not None else generation.audio_tokens,
            "output_tokens": output_tokens if output_tokens is not None else generation.output_tokens,
            "thinking_tokens": generation.thinking_tokens, "chunks": chunks, "fixes": fixes or []}


def _copy_of(ctx: Context, recording: Recording) -> Path:
    """The recording's compact copy on this machine (in a fleet, fetched from the database if need be)."""
    path = copies.local(ctx, recording)
    if path is None:
        raise PermanentError(f"recording {recording.id}: its compact copy is gone", "run `audiodrop retry ID` on it")
    return path


def _piece(ctx: Context, job: Job, recording: Recording, start: float, end: float, index: int) -> InlinePart:
    """An exact span of the recording, cut locally from the compact copy, as inline audio."""
    fmt = transcode.FORMATS[recording.converted_format or ctx.settings.conversion.format]
    folder = ctx.settings.state_dir / "pieces"
    folder.mkdir(parents=True, exist_ok=True)
    destination = folder / f"prompt{job.prompt.id}-{index}{fmt.extension}"
    try:
        transcode.cut(_copy_of(ctx, recording), destination, fmt, start, end,
                      ffmpeg=ctx.settings.conversion.ffmpeg, ffprobe=ctx.settings.conversion.ffprobe)
        data = destination.read_bytes()
    finally:
        destination.unlink(missing_ok=True)
    if math.ceil(len(data) * 4 / 3) + 4096 > ctx.settings.prompts.inline_limit_bytes:
        raise Truncated(f"a {end - start:.0f} s piece is too large to send inline")
    return InlinePart(data, fmt.mime_type)


def _answer_span(ctx: Context, job: Job, recording: Recording, limiter: RateLimiter) -> tuple[str, dict[str, Any]]:
    prompt = job.prompt
    start = prompt.span_start_seconds or 0.0
    end = min(prompt.span_end_seconds if prompt.span_end_seconds is not None else math.inf,
              recording.duration_seconds or start)
    generation = _generate(ctx, job, [_piece(ctx, job, recording, start, end, 0)], limiter)
    mapped = chunking.offset_timestamps(generation.text, start, recording.duration_seconds or end,
                                        span_seconds=end - start)
    return mapped.text, _meta(generation, delivery="span", fixes=mapped.fixes)


TOTALS = ("prompt_tokens", "audio_tokens", "output_tokens", "thinking_tokens")


def _answer_chunked(ctx: Context, job: Job, recording: Recording, chunk_seconds: float,
                    limiter: RateLimiter) -> tuple[str, dict[str, Any]]:
    """Each chunk's answer is kept in the database as soon as it arrives, so a retry (after a 429, a crash, a
    cut-off chunk) sends only the chunks not yet answered, and bills their audio once."""
    duration = recording.duration_seconds or 0.0
    plan = chunking.plan_chunks(duration, chunk_seconds=chunk_seconds,
                                overlap_seconds=ctx.settings.prompts.chunk_overlap_seconds)
    with session_scope(ctx.sessions) as session:
        kept = {(part.start_seconds, part.end_seconds): part for part in session.scalars(
            select(PromptPart).where(PromptPart.prompt_id == job.prompt.id))}
        session.expunge_all()
    pieces: list[tuple[chunking.Chunk, str]] = []
    totals = dict.fromkeys(TOTALS, 0)
    model_version = None
    for chunk in plan:
        part = kept.get((chunk.start, chunk.end))
        if part is None:
            audio = _piece(ctx, job, recording, chunk.start, chunk.end, chunk.index)
            note = (f"{job.prompt.prompt_text}\n(This is part {chunk.index + 1} of {len(plan)}: timestamps start "
                    "at 00:00:00 at the beginning of this part.)")
            generation = _generate(ctx, job, [audio], limiter, text=note)
            part = _keep_part(ctx, job, chunk, generation)
        pieces.append((chunk, part.text))
        model_version = part.model_version
        for key in TOTALS:
            totals[key] += getattr(part, key) or 0
    stitched = chunking.stitch(pieces, duration)
    final = Generation(text=stitched.text, finish_reason="STOP", model_version=model_version, **totals)
    return stitched.text, _meta(final, delivery="chunks", chunks=len(plan), fixes=stitched.fixes)


def _keep_part(ctx: Context, job: Job, chunk: chunking.Chunk, generation: Generation) -> PromptPart:
    part = PromptPart(prompt_id=job.prompt.id, start_seconds=chunk.start, end_seconds=chunk.end,
                      text=generation.text, model_version=generation.model_version, created_at=ctx.now(),
                      **{key: getattr(generation, key) or 0 for key in TOTALS})
    try:
        with session_scope(ctx.sessions) as session:
            session.add(part)
            session.flush()
            session.expunge(part)
    except IntegrityError:
        pass  # an earlier run of this prompt kept the same chunk a moment ago; the text is the one in hand
    return part


def _requeue(ctx: Context, job: Job, waiting_for: str, when: datetime | None, **changes: Any) -> None:
    with session_scope(ctx.sessions) as session:
        prompt_lifecycle.advance(session, job.prompt.id, expected=P.RUNNING, to=P.QUEUED, now=ctx.now(),
                                 token=job.token, release=True, reason=waiting_for, waiting_for=waiting_for,
                                 next_attempt_at=when, **{"wait_kind": None, **changes})
    if when is not None:
        ctx.wake("prompt", at=when)


def _fail(ctx: Context, job: Job, error: str) -> None:
    with session_scope(ctx.sessions) as session:
        if prompt_lifecycle.advance(session, job.prompt.id, expected=P.RUNNING, to=P.FAILED, now=ctx.now(),
                                    token=job.token, release=True, reason=error, error=error, waiting_for=None,
                                    finished_at=ctx.now()):
            session.execute(delete(PromptPart).where(PromptPart.prompt_id == job.prompt.id))
    log.warning("prompt %d failed: %s", job.prompt.id, error)


def _handle_error(ctx: Context, job: Job, err: BaseException) -> None:
    prompt, now = job.prompt, ctx.now()
    if isinstance(err, Truncated):
        return _retry_bigger(ctx, job, err.reason)
    if isinstance(err, GenerationTimeout):
        return _timed_out(ctx, job, err)
    attempts = prompt.attempts + 1
    decision = policy.decide(err, attempts=attempts, now=now)
    if decision.action is Action.REUPLOAD:
        _mark_gone(ctx, job, str(err))
        return _requeue(ctx, job, "a file had expired on the server; uploading it again", None, wait_kind="files")
    if decision.action is Action.REENCODE:
        _reencode(ctx, job, decision.error)
        return _requeue(ctx, job, "the API refused the audio format; converting to the fallback format", None,
                        wait_kind="files")
    if decision.action in (Action.WAIT_OFFLINE, Action.WAIT_AUTH, Action.MAKE_ROOM):
        ctx.pauses.pause_for(decision, now)
        return _requeue(ctx, job, decision.error, decision.retry_at or now)
    if decision.action is Action.RETRY_LATER:
        internal_errors = prompt.internal_errors + 1 if isinstance(err, TransientError) and err.status == 500 else 0
        fallback = ctx.settings.prompts.fallback_model
        if internal_errors >= ctx.settings.prompts.fallback_after and fallback and fallback != prompt.model:
            reason = f"{prompt.model} answered 500 INTERNAL {internal_errors} times in a row"
            log.warning("prompt %d: %s; sending it to %s instead", prompt.id, reason, fallback)
            return _requeue(ctx, job, f"{reason}; trying {fallback}", now, model=fallback, attempts=0,
                            requested_model=prompt.requested_model or prompt.model, internal_errors=0)
        return _requeue(ctx, job, f"{decision.error}; retrying", decision.retry_at or now, attempts=attempts,
                        internal_errors=internal_errors)
    _fail(ctx, job, decision.error)


def _timed_out(ctx: Context, job: Job, err: GenerationTimeout) -> None:
    """A generation that ran out of time may still have been answered (and billed): it is tried again only a
    bounded number of times, with a pause, never blindly over and over."""
    timeouts = job.prompt.timeouts + 1
    limit = ctx.settings.prompts.generate_timeout_seconds
    if timeouts >= MAX_GENERATION_TIMEOUTS:
        return _fail(ctx, job, f"the model did not answer within {limit:g} s, {timeouts} times (each attempt may "
                               "be billed); raise prompts.generate_timeout_seconds, or ask over a shorter "
                               "--from/--to span, then `audiodrop retry --prompt ID`")
    when = policy.backoff(ctx.now(), timeouts + 1)
    _requeue(ctx, job, f"{err.title}; trying once more at {when.isoformat(timespec='seconds')}", when,
             timeouts=timeouts)


def _retry_bigger(ctx: Context, job: Job, reason: str) -> None:
    """A cut-off answer: first a larger output budget, then (for transcripts) smaller chunks, then fail."""
    prompt = job.prompt
    limits = ctx.settings.prompts
    budget = _budget(ctx, prompt)
    if budget < limits.max_output_tokens_limit:
        bigger = min(budget * 2, limits.max_output_tokens_limit)
        log.info("prompt %d: %s; retrying with %d output tokens", prompt.id, reason, bigger)
        return _requeue(ctx, job, f"{reason}; retrying with {bigger} output tokens", ctx.now(),
                        max_output_tokens=bigger)
    chunk = prompt.chunk_seconds or limits.chunk_seconds
    duration = sum(r.duration_seconds or 0 for r in job.recordings)
    if prompt.template == "transcribe" and len(job.recordings) == 1 and chunk / 2 >= MIN_CHUNK_SECONDS \
            and duration > MIN_CHUNK_SECONDS:
        smaller = min(chunk, duration) / 2
        log.info("prompt %d: %s; splitting into %.0f s pieces", prompt.id, reason, smaller)
        return _requeue(ctx, job, f"{reason}; splitting into {smaller / 60:.0f}-minute pieces", ctx.now(),
                        chunk_seconds=smaller)
    _fail(ctx, job, f"{reason}, even with {budget} output tokens; ask over a shorter --from/--to span")


def _mark_gone(ctx: Context, job: Job, message: str) -> None:
    """A 403 on a file we believed active: it is gone; mark it expired so it is uploaded again."""
    named = set(re.findall(r"File ([a-z0-9]+)", message))
    now = ctx.now()
    with session_scope(ctx.sessions) as session:
        for recording in job.recordings:
            current = session.get(Recording, recording.id)
            if current is None or current.state != S.ACTIVE:
                continue
            if named and (current.remote_name or "").removeprefix("files/") not in named:
                continue
            lifecycle.advance(session, current.id, expected=S.ACTIVE, to=S.EXPIRED, now=now,
                              reason=f"the server no longer has {current.remote_name} (403); uploading it again")
    ctx.wake("upload")


def _reencode(ctx: Context, job: Job, reason: str) -> None:
    """The API refused the format: each recording's remote copy is queued for deletion and the recording is
    converted again in the fallback format (no network call here)."""
    fallback = ctx.settings.conversion.fallback_format
    now = ctx.now()
    with session_scope(ctx.sessions) as session:
        for recording in job.recordings:
            current = session.get(Recording, recording.id)
            if current is None or current.converted_format == fallback or current.state not in (S.ACTIVE, S.EXPIRED):
                continue
            if current.state == S.ACTIVE:
                remote.queue_deletion(session, current, reason="the API refused its format", now=now)
            lifecycle.advance(session, current.id, expected=current.state, to=S.DISCOVERED, now=now,
                              reason=f"{reason}; converting again to {fallback}", target_format=fallback,
                              closed_after_write=True, last_change_at=now)
    ctx.wake("convert", "delete")


# -- the answer, then its files -------------------------------------------------------------------------------

def _metadata(job: Job, meta: dict[str, Any], now: datetime) -> dict[str, Any]:
    prompt = job.prompt
    metadata: dict[str, Any] = {
        "prompt_id": prompt.id, "recordings": [Path(r.source_path).name for r in job.recordings],
        "recording_ids": [r.id for r in job.recordings], "template": prompt.template, "prompt": prompt.prompt_text,
        "model": prompt.model, "created_at": iso(prompt.created_at), "finished_at": iso(now),
        "span_start_seconds": prompt.span_start_seconds, "span_end_seconds": prompt.span_end_seconds, **meta,
    }
    if prompt.requested_model:
        metadata["requested_model"] = prompt.requested_model
        metadata["warnings"] = [*metadata.get("warnings", []), f"answered by {prompt.model}: "
                                f"{prompt.requested_model} kept failing with 500 INTERNAL"]
    return metadata


def store_answer(ctx: Context, job: Job, text: str, meta: dict[str, Any]) -> bool:
    """The answer goes into the database at once, and the prompt is done: from here on nothing asks the model
    again. A database that does not answer is tried again (the answer is billed; it is not thrown away) for as long
    as the claim's lease could still hold. False if the claim was lost meanwhile (another run owns the prompt)."""
    deadline = time.monotonic() + ctx.settings.service.lease_seconds
    delay = 0.5
    while True:
        try:
            return _store_answer(ctx, job, text, meta)
        except OperationalError:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("prompt %d: the database does not answer; keeping the answer and trying again in %.1f s",
                        job.prompt.id, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _store_answer(ctx: Context, job: Job, text: str, meta: dict[str, Any]) -> bool:
    now = ctx.now()
    with session_scope(ctx.sessions) as session:
        stored = prompt_lifecycle.advance(
            session, job.prompt.id, expected=P.RUNNING, to=P.DONE, now=now, token=job.token, release=True,
            reason=f"answered ({meta['delivery']}, {meta['output_tokens']} output tokens)", result_text=text,
            result_meta=json.dumps(_metadata(job, meta, now)), finish_reason=meta["finish_reason"],
            prompt_tokens=meta["prompt_tokens"], audio_tokens=meta["audio_tokens"],
            output_tokens=meta["output_tokens"], thinking_tokens=meta["thinking_tokens"], delivery=meta["delivery"],
            chunks=meta["chunks"], model_version=meta["model_version"], error=None, waiting_for=None,
            wait_kind=None, finished_at=now)
        if stored:
            session.execute(delete(PromptPart).where(PromptPart.prompt_id == job.prompt.id))
            search.index_prompt(session, job.prompt.id)
    if not stored:
        log.warning("prompt %d: answered, but the claim was taken over meanwhile; this answer is not kept",
                    job.prompt.id)
    return stored


def write_result_files(ctx: Context, prompt_id: int) -> bool:
    """Write a done prompt's result and metadata files (atomically). A failure (a full disk, permissions, a
    results_dir the service may not write) is recorded on the prompt and retried later; the answer is safe."""
    with session_scope(ctx.sessions) as session:
        prompt = session.get(Prompt, prompt_id)
        if prompt is None or prompt.state != P.DONE or prompt.result_text is None:
            return True
        text, output_format = prompt.result_text, prompt.output_format
        metadata = json.loads(prompt.result_meta or "{}") or {"prompt_id": prompt_id}
        template = prompt.template
    try:
        text_path, meta_path = results.result_paths(ctx.settings.results_dir, recording_names=metadata.get(
            "recordings", []), template=template or "prompt", prompt_id=prompt_id, output_format=output_format)
        body = results.render_markdown(" + ".join(metadata.get("recordings", [])), text, metadata) \
            if output_format == "markdown" else text
        results.write_result(text_path, meta_path, body, metadata)
    except OSError as err:
        problem = f"the result file could not be written ({err.strerror or err}: {err.filename or ''}); " \
                  "the answer is kept and the write is retried"
        when = ctx.now() + timedelta(seconds=RESULT_FILES_RETRY_SECONDS)
        with session_scope(ctx.sessions) as session:
            session.execute(update(Prompt).where(Prompt.id == prompt_id)
                            .values(file_error=problem, next_attempt_at=when, claimed_by=None, claimed_until=None)
                            .execution_options(synchronize_session=False))
        log.warning("prompt %d: %s", prompt_id, problem)
        ctx.wake("files", at=when)
        return False
    with session_scope(ctx.sessions) as session:
        session.execute(update(Prompt).where(Prompt.id == prompt_id)
                        .values(result_path=str(text_path), file_error=None, next_attempt_at=None, claimed_by=None,
                                claimed_until=None)
                        .execution_options(synchronize_session=False))
    log.info("prompt %d done: %s", prompt_id, text_path)
    return True


class ResultFilesKind:
    """Engine work: write the files of answers stored in the database whose files are not written yet (a full
    disk, a results_dir the service may not write, a stop in between), again every little while."""

    name = "files"

    def __init__(self, ctx: Context, lease: Any) -> None:
        self.ctx = ctx
        self.lease = lease

    def workers(self) -> int:
        return 1

    def _pending(self, now: datetime) -> Any:
        return (Prompt.state == P.DONE) & Prompt.result_path.is_(None) & Prompt.result_text.is_not(None)

    def claim(self, session: Session, now: datetime, limit: int) -> list[Claim]:
        due = session.execute(select(Prompt.id, Prompt.claim_token).where(
            self._pending(now), or_(Prompt.next_attempt_at.is_(None), Prompt.next_attempt_at <= now),
            or_(Prompt.claimed_until.is_(None), Prompt.claimed_until < now)).limit(limit)
            .with_for_update(skip_locked=True)).all()
        claims = []
        for prompt_id, token in due:
            taken = session.execute(update(Prompt).where(Prompt.id == prompt_id, Prompt.claim_token == token)
                                    .values(claimed_by=self.ctx.holder, claimed_until=self.lease(now),
                                            claim_token=token + 1).execution_options(synchronize_session=False))
            if rowcount(taken):
                claims.append(Claim(self.name, Prompt, prompt_id, token + 1))
        return claims

    def next_due(self, session: Session, now: datetime) -> datetime | None:
        return session.scalar(select(func.min(Prompt.next_attempt_at)).where(self._pending(now)))

    def run(self, claim: Claim) -> None:
        write_result_files(self.ctx, claim.key)
