"""Running a prompt as engine work: claim it, get its answer (daemon.prompts.answer), store the answer, write its
files; and what happens when it fails.

A prompt runs only when all its recordings are usable; otherwise it waits (queued, with `waiting_for` saying why)
while the uploader re-uploads them, and their progress wakes it. It waits the same way for the rate limit and the
budget. A result whose finish reason is not STOP, or that is empty, is never `done`: the prompt is retried with a
larger output budget, then split, and fails with the reason if that does not help.

The answer is stored in the database the moment it arrives (the prompt is then `done`); its files are written
after, and a failed write is retried without asking the model again: every answer is billed.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from daemon import notify, policy
from daemon.clock import iso
from daemon.context import Context, ContextKind
from daemon.engine import Claim
from daemon.errors import GenerationTimeout, NoTimestamps, NotReady, TransientError, Truncated, Waiting
from daemon.pipeline import lifecycle, remote
from daemon.policy import Action
from daemon.prompts import lifecycle as prompt_lifecycle
from daemon.prompts import results, search, subtitles
from daemon.prompts.answer import MIN_CHUNK_SECONDS, answer
from daemon.prompts.generation import Job, RateLimiter, output_budget
from db.models import Prompt, PromptPart, Recording
from db.session import rowcount, session_scope
from db.states import PromptState as P
from db.states import RecordingState as S

log = logging.getLogger(__name__)

# A prompt waiting for its files is woken by their progress; this only bounds a lost wake-up.
FILES_RECHECK_SECONDS = 60.0
# A prompt the budget stops with no time to wait for (a call larger than the budget, a model without a price)
# looks again this often; a config reload or ask --force wakes it sooner.
BUDGET_RECHECK_SECONDS = 3600.0
# Generations that run out of generate_timeout_seconds: each may have been billed, so only this many are tried.
MAX_GENERATION_TIMEOUTS = 2
RESULT_FILES_RETRY_SECONDS = 15.0


class PromptKind(ContextKind):
    """Engine work: claim due prompts (queued -> running) and run them."""

    name = "prompt"

    def __init__(self, ctx: Context, lease: Callable[[datetime], datetime], only: set[int] | None = None) -> None:
        super().__init__(ctx, lease)
        self.only = only
        self.limiter = RateLimiter(ctx.sessions, ctx.clock, ctx.settings.prompts.requests_per_minute)

    def workers(self) -> int:
        return self.ctx.settings.prompts.workers

    def claim(self, session: Session, now: datetime, limit: int) -> list[Claim]:
        if self.api_unusable(now):
            return []
        # Batch prompts are the Batch API lane's (daemon.prompts.batch) until it gives them back with batch=False.
        query = (select(Prompt.id).where(Prompt.state == P.QUEUED, Prompt.batch.is_(False),
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
        return session.scalar(select(func.min(Prompt.next_attempt_at)).where(Prompt.state == P.QUEUED,
                                                                             Prompt.batch.is_(False)))

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
    except Waiting as waiting:
        _requeue(ctx, job, str(waiting), waiting.at or ctx.now() + timedelta(seconds=BUDGET_RECHECK_SECONDS),
                 wait_kind=waiting.kind)
        return
    except Exception as err:
        _handle_error(ctx, job, err)
        return
    if store_answer(ctx, job, text, meta):
        write_result_files(ctx, job.prompt.id)


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
    budget = output_budget(ctx, prompt)
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
        cost, cached = session.execute(select(Prompt.cost_usd, Prompt.cached_tokens)
                                       .where(Prompt.id == job.prompt.id)).one()
        meta = {**meta, "cost_usd": float(cost) if cost is not None else None, "cached_tokens": cached or 0}
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
        template, extra = prompt.template, [f for f in (prompt.extra_formats or "").split(",") if f]
        durations = [session.scalar(select(Recording.duration_seconds).where(Recording.id == link.recording_id))
                     for link in prompt.recordings]
        if prompt.span_end_seconds is not None:
            durations = [prompt.span_end_seconds]
    files = _rendered(prompt_id, text, output_format, extra, durations, metadata)
    try:
        text_path, meta_path = results.result_paths(ctx.settings.results_dir, recording_names=metadata.get(
            "recordings", []), template=template or "prompt", prompt_id=prompt_id, output_format=files[0][0])
        extras = [(text_path.with_suffix(results.EXTENSIONS[fmt]), body) for fmt, body in files[1:]]
        if extras:
            metadata["extra_files"] = [str(path) for path, _ in extras]
        for path, body in extras:  # beside the main file, under its name; the metadata, written last, says done
            results.write_text(path, body)
        results.write_result(text_path, meta_path, files[0][1], metadata)
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
        notify.result_done(session, ctx, prompt_id)  # with the path written: the event exists once the file does
    log.info("prompt %d done: %s", prompt_id, text_path)
    return True


def _rendered(prompt_id: int, text: str, output_format: str, extra: list[str], durations: list[float | None],
              metadata: dict[str, Any]) -> list[tuple[str, str]]:
    """(format, body) of every file of a result, the main one first. Subtitles need a timestamped transcript:
    without one, a subtitle main file becomes Markdown and extra subtitle files are left out, with a warning."""
    files: list[tuple[str, str]] = []
    for fmt in [output_format, *extra]:
        if fmt in ("srt", "vtt"):
            try:
                files.append((fmt, subtitles.render(text, fmt, durations, prompt_id=prompt_id)))
            except NoTimestamps as err:
                metadata["warnings"] = [*metadata.get("warnings", []), f"no {fmt} file: {err}"]
                if not files:
                    files.append(("markdown", ""))
        elif fmt == "markdown":
            files.append((fmt, ""))
        else:
            files.append((fmt, text))
    title = " + ".join(metadata.get("recordings", []))
    # The Markdown header is rendered last, so it shows the warnings found above.
    return [(fmt, results.render_markdown(title, text, metadata) if fmt == "markdown" else body)
            for fmt, body in files]


class ResultFilesKind(ContextKind):
    """Engine work: write the files of answers stored in the database whose files are not written yet (a full
    disk, a results_dir the service may not write, a stop in between), again every little while."""

    name = "files"

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
