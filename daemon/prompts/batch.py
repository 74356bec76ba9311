"""The Batch API lane: prompts that can wait (a template's `batch = true`, `ask --batch`) answered through Gemini's
Batch API at half price, their results landing exactly like the normal lane's (runner.store_answer and
write_result_files, the ledger at the batch discount).

A batch prompt stays `queued` while its files are made ready and others gather to share its job (the oldest waits
at most [batch] gather_seconds; at most max_prompts per job, one job per model). It is `running` for as long as its
job runs: `batch_name` names the job and `waiting_for` says since when. The job is created once, outside any
transaction, under a display name that is stored first ("pending:<display name>"), so a create whose answer was
lost (a crash, a timeout) is found again on the server instead of sent twice; the job's name is then stored on
every prompt and the job is polled every poll_seconds. Between polls the prompts keep their claim until the next
poll (plus a lease): a dead run's jobs are taken back like any work, and resumed by their stored name, never created
again. A job that fails, is cancelled or expires puts its prompts back in the normal lane (batch=False).

What goes: one generateContent request per prompt over its uploaded files, whole (prompt states and parts are
those of the normal lane). Audio cut locally (a --from/--to span, a long transcript's chunks) would travel inline,
and a job's inlined requests share one 20 MB request: such prompts go to the normal lane at once
(queue.batch_lane_refusal). Trimming is not applied in this lane: the trimmed timeline exists only as pieces cut
locally, and the batch discount (50 %) is larger than what trimming saves below ~50 % silence.

Files: a request names its files by URI, so a file must outlive the job: re-uploading later does not help the job,
which refers to the old name. A job is only sent with files that live at least batch.min_file_hours more (others are
uploaded again first); files have 48 hours in all and a job may run until it expires at 48 hours, so a job slower
than min_file_hours can still see a file expire: that request fails and its prompt runs in the normal lane. While a
job runs, its files are pinned (never evicted for quota), and a recording one of them belongs to is not refreshed
for another job (its new upload would leave the old file to be deleted as unclaimed).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from daemon import policy
from daemon.clock import iso
from daemon.context import Context
from daemon.engine import Claim
from daemon.errors import PermanentError, TransientError, Waiting
from daemon.gemini import BatchAnswer, BatchJob, BatchRequest, FilePart, display_prefix
from daemon.pipeline import lifecycle
from daemon.policy import Action
from daemon.prompts import lifecycle as prompt_lifecycle
from daemon.prompts import pricing
from daemon.prompts import queue as prompt_queue
from daemon.prompts.answer import with_names
from daemon.prompts.generation import (
    SENT,
    Job,
    give_back,
    output_budget,
    record,
    reserve,
    settle,
    thinking_budget,
)
from daemon.prompts.runner import FILES_RECHECK_SECONDS, store_answer, write_result_files
from db.models import Prompt, PromptRecording, Recording, TokenUsage
from db.session import rowcount, session_scope
from db.states import PromptState as P
from db.states import RecordingState as S

log = logging.getLogger(__name__)

# batch_name while the job is being created: "pending:<display name>" (looked up by that name if interrupted).
PENDING = "pending:"


class BatchKind:
    """Engine work: send gathered batch prompts as one Batch API job (queued -> running), and poll running jobs."""

    name = "batch"

    def __init__(self, ctx: Context, lease: Any, only: set[int] | None = None) -> None:
        self.ctx = ctx
        self.lease = lease
        self.only = only

    def workers(self) -> int:
        return 2

    # -- claims -----------------------------------------------------------------------------------------------

    def _free_or_mine(self, now: datetime) -> Any:
        return or_(Prompt.claimed_until.is_(None), Prompt.claimed_until < now, Prompt.claimed_by == self.ctx.holder)

    def _hold_until(self, now: datetime) -> datetime:
        """A claim lasts a lease and one API call's time limit (the engine renews only its first prompt's)."""
        until: datetime = self.lease(now)
        return until + timedelta(seconds=self.ctx.settings.gemini.request_timeout_seconds)

    def claim(self, session: Session, now: datetime, limit: int) -> list[Claim]:
        if self.ctx.client is None or self.ctx.pauses.paused(now):
            return []
        claims = self._claim_polls(session, now, limit)
        if len(claims) < limit:
            claims += self._claim_submissions(session, now, limit - len(claims))
        return claims

    def _claim_polls(self, session: Session, now: datetime, limit: int) -> list[Claim]:
        """Jobs due for a look: this run's, and those of runs that are gone (resumed by their stored name)."""
        query = (select(Prompt.id, Prompt.batch_name, Prompt.claim_token).where(
            Prompt.state == P.RUNNING, Prompt.batch_name.is_not(None),
            or_(Prompt.next_attempt_at.is_(None), Prompt.next_attempt_at <= now), self._free_or_mine(now))
            .order_by(Prompt.id).with_for_update(skip_locked=True))
        if self.only is not None:
            query = query.where(Prompt.id.in_(self.only))
        jobs: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for prompt_id, name, token in session.execute(query).all():
            jobs[str(name)].append((prompt_id, token))
        claims = []
        until = self._hold_until(now)
        for name, rows in list(jobs.items())[:limit]:
            tokens = {}
            for prompt_id, token in rows:
                taken = session.execute(update(Prompt).where(Prompt.id == prompt_id, Prompt.claim_token == token)
                                        .values(claimed_by=self.ctx.holder, claimed_until=until,
                                                claim_token=token + 1, next_attempt_at=until)
                                        .execution_options(synchronize_session=False))
                if rowcount(taken):
                    tokens[prompt_id] = token + 1
            if tokens:
                leader = min(tokens)
                claims.append(Claim(self.name, Prompt, leader, tokens[leader], {"name": name, "tokens": tokens}))
        return claims

    def _claim_submissions(self, session: Session, now: datetime, limit: int) -> list[Claim]:
        """Queued batch prompts whose files are ready, gathered per model; the rest wait, or go to the normal lane."""
        settings = self.ctx.settings.batch
        query = (select(Prompt).where(
            Prompt.state == P.QUEUED, Prompt.batch.is_(True), Prompt.batch_name.is_(None),
            or_(Prompt.next_attempt_at.is_(None), Prompt.next_attempt_at <= now),
            or_(Prompt.claimed_until.is_(None), Prompt.claimed_until < now))
            .order_by(Prompt.created_at, Prompt.id).with_for_update(skip_locked=True))
        if self.only is not None:
            query = query.where(Prompt.id.in_(self.only))
        candidates = session.scalars(query).all()
        if not candidates:
            return []
        in_jobs = _recordings_in_jobs(session)
        ready: dict[str, list[Prompt]] = defaultdict(list)
        for prompt in candidates:
            recordings = [r for r in (session.get(Recording, link.recording_id) for link in prompt.recordings)
                          if r is not None]
            refusal = prompt_queue.batch_lane_refusal(self.ctx.settings, prompt, recordings)
            if refusal is not None:
                _queued_to_normal_lane(self.ctx, session, prompt.id, now, f"not sent to the Batch API ({refusal}); "
                                                                         "running in the normal lane")
                continue
            waiting = self._files_waiting(session, prompt, recordings, now, in_jobs)
            if waiting is not None:
                _set(session, prompt.id, waiting_for=waiting, wait_kind="files",
                     next_attempt_at=now + timedelta(seconds=FILES_RECHECK_SECONDS))
                continue
            ready[prompt.model].append(prompt)
        claims: list[Claim] = []
        for model, prompts in ready.items():
            deadline = min(p.created_at for p in prompts) + timedelta(seconds=settings.gather_seconds)
            if len(prompts) < settings.max_prompts and now < deadline:
                note = f"gathering prompts for a Batch API job until {iso(deadline)}"
                for prompt in prompts:
                    if prompt.waiting_for != note:
                        _set(session, prompt.id, waiting_for=note, wait_kind=None)
                continue
            if len(claims) < limit:
                claim = self._claim_group(session, model, prompts[:settings.max_prompts], now)
                if claim is not None:
                    claims.append(claim)
        return claims

    def _claim_group(self, session: Session, model: str, prompts: list[Prompt], now: datetime) -> Claim | None:
        until = self._hold_until(now)
        tokens: dict[int, int] = {}
        for prompt in prompts:
            token = prompt_lifecycle.claim(session, prompt.id, now=now, holder=self.ctx.holder, until=until,
                                           reason="claimed for a Batch API job")
            if token is not None:
                tokens[prompt.id] = token
        if not tokens:
            return None
        leader = min(tokens)
        pending = f"{PENDING}{display_prefix(self.ctx.instance_id)}batch-{leader}-{tokens[leader]}"
        for prompt_id in tokens:
            _set(session, prompt_id, batch_name=pending, next_attempt_at=until, wait_kind=None,
                 waiting_for="being sent to the Batch API")
        return Claim(self.name, Prompt, leader, tokens[leader], {"name": pending, "tokens": tokens, "fresh": True,
                                                                 "model": model})

    def _files_waiting(self, session: Session, prompt: Prompt, recordings: list[Recording], now: datetime,
                       in_jobs: dict[int, str]) -> str | None:
        """None when every file is ACTIVE for at least batch.min_file_hours more; else what the prompt waits for
        (a file that expires sooner is uploaded again first, unless a running job still uses it)."""
        hours = self.ctx.settings.batch.min_file_hours
        keep_until = now + timedelta(hours=hours)
        waiting = []
        for recording in recordings:
            expires = recording.remote_expires_at
            if recording.state == S.ACTIVE and expires is not None and expires >= keep_until:
                recording.last_needed_at = now
                continue
            if recording.state == S.ACTIVE and recording.id in in_jobs:
                waiting.append(f"recording {recording.id} (its upload expires at {iso(expires)}, within "
                               f"batch.min_file_hours, and {in_jobs[recording.id]} still uses it)")
                continue
            if recording.state == S.ACTIVE:
                lifecycle.advance(session, recording.id, expected=S.ACTIVE, to=S.EXPIRED, now=now,
                                  reason=f"expires at {iso(expires)}, within batch.min_file_hours ({hours:g} h); "
                                         f"uploading again for batch prompt {prompt.id}")
                waiting.append(f"recording {recording.id} (expires within {hours:g} h)")
            else:
                waiting.append(f"recording {recording.id} ({recording.state})")
            self.ctx.wake("upload")
        return f"waiting for {', '.join(waiting)} to be uploaded for the Batch API" if waiting else None

    def next_due(self, session: Session, now: datetime) -> datetime | None:
        if self.ctx.client is None:
            return None
        if self.ctx.pauses.paused(now):
            return self.ctx.pauses.resume_at()
        times: list[datetime] = []
        for due, holder, until in session.execute(select(Prompt.next_attempt_at, Prompt.claimed_by,
                                                         Prompt.claimed_until)
                                                  .where(Prompt.state == P.RUNNING, Prompt.batch_name.is_not(None))):
            others = holder is not None and holder != self.ctx.holder and until is not None and until >= now
            times.append(until if others and until is not None else due or now)
        gather = timedelta(seconds=self.ctx.settings.batch.gather_seconds)
        for due, created, until in session.execute(select(Prompt.next_attempt_at, Prompt.created_at,
                                                          Prompt.claimed_until)
                                                   .where(Prompt.state == P.QUEUED, Prompt.batch.is_(True),
                                                          Prompt.batch_name.is_(None))):
            times.append(max(t for t in (created + gather, due, until) if t is not None))
        return min(times, default=None)

    # -- work -------------------------------------------------------------------------------------------------

    def run(self, claim: Claim) -> None:
        name = claim.data["name"]
        try:
            if name.startswith(PENDING):
                self._submit(claim)
            else:
                self._poll(claim)
        finally:
            self.ctx.wake("upload")  # what the job pinned may be evictable now

    def _load(self, claim: Claim) -> list[Job]:
        """The claim's prompts that are still its own, with their recordings."""
        jobs = []
        with session_scope(self.ctx.sessions) as session:
            for prompt_id, token in sorted(claim.data["tokens"].items()):
                prompt = session.get(Prompt, prompt_id)
                if prompt is None or prompt.state != P.RUNNING or prompt.claim_token != token:
                    continue
                recordings = [session.get(Recording, link.recording_id) for link in prompt.recordings]
                jobs.append(Job(prompt, [r for r in recordings if r is not None], token))
            session.expunge_all()
        return jobs

    def _request(self, job: Job) -> BatchRequest:
        prompt = job.prompt
        parts: list[Any] = [FilePart(r.remote_uri or "", r.converted_mime or "") for r in job.recordings]
        return BatchRequest(key=str(prompt.id), parts=[*parts, with_names(prompt)],
                            system_instruction=prompt.system_instruction,
                            max_output_tokens=output_budget(self.ctx, prompt),
                            thinking_budget=thinking_budget(self.ctx))

    def _submit(self, claim: Claim) -> None:
        ctx = self.ctx
        assert ctx.client is not None
        jobs = self._load(claim)
        changed = [job for job in jobs if any(r.state != S.ACTIVE or not r.remote_uri for r in job.recordings)]
        for job in changed:
            _back_to_queue(ctx, job, "its files changed before the job was sent; waiting for them again")
        jobs = [job for job in jobs if job not in changed]
        if not jobs:
            return
        display = claim.data["name"].removeprefix(PENDING)
        fresh = bool(claim.data.get("fresh"))
        if fresh:
            jobs = self._reserve(jobs)
            if not jobs:
                return
        model = jobs[0].prompt.model
        try:
            found = None if fresh else ctx.client.find_batch(display)
            name = found or ctx.client.create_batch(model, [self._request(job) for job in jobs], display)
        except Exception as err:
            self._not_sent(jobs, err)
            return
        ctx.pauses.clear_network_problems()
        now = ctx.now()
        next_poll = now + timedelta(seconds=ctx.settings.batch.poll_seconds)
        how = f"found {name} on the server, created before an interruption" if found else \
            f"sent to the Batch API as {name} ({len(jobs)} prompt(s) to {model})"
        with session_scope(ctx.sessions) as session:
            for job in jobs:
                if _set(session, job.prompt.id, token=job.token, batch_name=name, next_attempt_at=next_poll,
                        claimed_until=next_poll + timedelta(seconds=ctx.settings.service.lease_seconds),
                        waiting_for=f"in batch {name} since {iso(now)}"):
                    prompt_lifecycle.note(session, job.prompt.id, now=now, reason=how)
        log.info("prompts %s: %s", ", ".join(str(job.prompt.id) for job in jobs), how)
        ctx.wake(self.name, at=next_poll)

    def _reserve(self, jobs: list[Job]) -> list[Job]:
        """Each prompt's estimated cost (at the batch price) in the ledger, once the budget has room for it; the
        prompts the budget stops wait in the queue, as in the normal lane."""
        ctx = self.ctx
        kept = []
        for job in jobs:
            prompt = job.prompt
            seconds = sum(r.duration_seconds or 0 for r in job.recordings)
            estimate = pricing.estimate(prompt_queue.estimate_audio_tokens(seconds), output_budget(ctx, prompt),
                                        prompt.model, ctx.settings.price_table, batch=True,
                                        text_tokens=pricing.text_tokens_bound(prompt.prompt_text,
                                                                              prompt.system_instruction))
            try:
                reserve(ctx, prompt, estimate)
            except Waiting as waiting:
                _back_to_queue(ctx, job, str(waiting), when=waiting.at, wait_kind=waiting.kind)
                continue
            kept.append(job)
        return kept

    def _not_sent(self, jobs: list[Job], err: Exception) -> None:
        """The job could not be created. A call that got no answer may have made it: the prompts keep its display
        name and look it up first next time. A refusal is tried again later, or (one that would not pass) goes to
        the normal lane, whose handling of that error is the daemon's one way."""
        ctx, now = self.ctx, self.ctx.now()
        decision = policy.decide(err, attempts=jobs[0].prompt.attempts + 1, now=now)
        if decision.action in (Action.WAIT_OFFLINE, Action.WAIT_AUTH):
            ctx.pauses.pause_for(decision, now)
        when = decision.retry_at or policy.backoff(now, jobs[0].prompt.attempts + 1)
        unanswered = isinstance(err, TransientError) and err.status is None
        for job in jobs:
            if unanswered:
                with session_scope(ctx.sessions) as session:
                    _set(session, job.prompt.id, token=job.token, next_attempt_at=when,
                         claimed_until=when + timedelta(seconds=ctx.settings.service.lease_seconds),
                         waiting_for=f"{decision.error}; looking for the job on the server and sending it if "
                                     f"it is not there, at {iso(when)}")
            elif decision.action in (Action.WAIT_OFFLINE, Action.WAIT_AUTH, Action.MAKE_ROOM, Action.RETRY_LATER):
                _back_to_queue(ctx, job, f"{decision.error}; sending it to the Batch API again at {iso(when)}",
                               when=when, attempts=job.prompt.attempts + 1)
            else:
                _to_normal_lane(ctx, job, f"the Batch API refused the job ({decision.error}); running it in the "
                                          "normal lane")
        ctx.wake(self.name, at=when)
        log.warning("Batch API job for prompts %s not sent: %s", ", ".join(str(job.prompt.id) for job in jobs),
                    decision.error)

    def _poll(self, claim: Claim) -> None:
        ctx = self.ctx
        assert ctx.client is not None
        name = claim.data["name"]
        jobs = self._load(claim)
        if not jobs:
            return
        try:
            batch = ctx.client.get_batch(name, [str(job.prompt.id) for job in jobs])
        except PermanentError as err:  # 404: the job is gone (deleted by hand); its prompts run normally
            for job in jobs:
                _to_normal_lane(ctx, job, f"batch {name} can no longer be read ({err.title}); running it in the "
                                          "normal lane")
            return
        except Exception as err:
            self._look_again(jobs, err)
            return
        ctx.pauses.clear_network_problems()
        if not batch.finished:
            now = ctx.now()
            next_poll = now + timedelta(seconds=ctx.settings.batch.poll_seconds)
            with session_scope(ctx.sessions) as session:
                for job in jobs:
                    _set(session, job.prompt.id, token=job.token, next_attempt_at=next_poll,
                         claimed_until=next_poll + timedelta(seconds=ctx.settings.service.lease_seconds))
            ctx.wake(self.name, at=next_poll)
            return
        self._finished(batch, jobs)

    def _look_again(self, jobs: list[Job], err: Exception) -> None:
        now = self.ctx.now()
        decision = policy.decide(err, attempts=1, now=now)
        if decision.action in (Action.WAIT_OFFLINE, Action.WAIT_AUTH):
            self.ctx.pauses.pause_for(decision, now)
        when = max(decision.retry_at or now, now + timedelta(seconds=self.ctx.settings.batch.poll_seconds))
        with session_scope(self.ctx.sessions) as session:
            for job in jobs:
                _set(session, job.prompt.id, token=job.token, next_attempt_at=when,
                     claimed_until=when + timedelta(seconds=self.ctx.settings.service.lease_seconds))
        log.warning("batch %s: could not be looked at (%s); looking again at %s", jobs[0].prompt.batch_name,
                    decision.error, iso(when))
        self.ctx.wake(self.name, at=when)

    def _finished(self, batch: BatchJob, jobs: list[Job]) -> None:
        ctx = self.ctx
        if batch.state not in ("SUCCEEDED", "PARTIALLY_SUCCEEDED"):
            ended = f"batch {batch.name} ended {batch.state}" + (f" ({batch.error})" if batch.error else "")
            log.warning("%s; its %d prompt(s) run in the normal lane", ended, len(jobs))
            for job in jobs:
                _to_normal_lane(ctx, job, f"{ended}; running it in the normal lane")
        else:
            if batch.by_order:
                log.warning("batch %s: %d answer(s) came without their metadata; matched to prompts by their order",
                            batch.name, batch.by_order)
            for job in jobs:
                self._answered(job, batch.name, batch.answers.get(str(job.prompt.id)))
        with session_scope(ctx.sessions) as session:
            left = session.scalar(select(Prompt.id).where(Prompt.batch_name == batch.name, Prompt.state == P.RUNNING)
                                  .limit(1))
        if left is None:
            try:
                assert ctx.client is not None
                ctx.client.delete_batch(batch.name)
            except Exception as err:  # the job's record on the server is only tidied up: nothing depends on it
                log.info("batch %s: not deleted on the server (%s)", batch.name, err)

    def _answered(self, job: Job, name: str, answer: BatchAnswer | None) -> None:
        """One prompt's answer: stored like the normal lane's; an error, a missing or a cut-off answer puts the
        prompt in the normal lane, which meets that error again and handles it in the daemon's one way (a refused
        request is not billed)."""
        ctx, prompt = self.ctx, job.prompt
        if answer is None or answer.generation is None:
            problem = "no answer for it" if answer is None else f"an error for it ({answer.code}: {answer.error})"
            return _to_normal_lane(ctx, job, f"batch {name} returned {problem}; running it in the normal lane")
        generation = answer.generation
        usage_id = _reserved_row(ctx, prompt.id)
        if usage_id is None:
            record(ctx, prompt, generation, batch=True)
        else:
            settle(ctx, usage_id, prompt, generation, batch=True)
        if generation.finish_reason != "STOP" or not generation.text.strip():
            budget = output_budget(ctx, prompt)
            bigger = min(budget * 2, ctx.settings.prompts.max_output_tokens_limit)
            reason = f"the answer from batch {name} stopped early (finish reason {generation.finish_reason})" \
                if generation.text.strip() else f"the answer from batch {name} was empty"
            return _to_normal_lane(ctx, job, f"{reason}; running it in the normal lane with {bigger} output tokens",
                                   max_output_tokens=bigger)
        meta: dict[str, Any] = {"delivery": "batch", "batch": name, "finish_reason": generation.finish_reason,
                "model_version": generation.model_version, "prompt_tokens": generation.prompt_tokens,
                "audio_tokens": generation.audio_tokens, "output_tokens": generation.output_tokens,
                "thinking_tokens": generation.thinking_tokens, "cached_tokens": generation.cached_tokens,
                "chunks": None, "fixes": []}
        if prompt.trim:
            meta["warnings"] = ["sent whole: the Batch API lane does not cut silences (its discount is larger)"]
        if store_answer(ctx, job, generation.text, meta):
            write_result_files(ctx, prompt.id)


# -- database helpers (each in the caller's transaction, or its own) ----------------------------------------------

def _set(session: Session, prompt_id: int, *, token: int | None = None, **values: Any) -> bool:
    """Columns of one prompt that are not its state (those change through prompt_lifecycle.advance)."""
    conditions = [Prompt.id == prompt_id] + ([Prompt.claim_token == token] if token is not None else [])
    return bool(rowcount(session.execute(update(Prompt).where(*conditions).values(**values)
                                         .execution_options(synchronize_session=False))))


def _recordings_in_jobs(session: Session) -> dict[int, str]:
    """Recordings whose current upload a running job refers to, and that job's name."""
    rows = session.execute(select(PromptRecording.recording_id, Prompt.batch_name)
                           .join(Prompt, Prompt.id == PromptRecording.prompt_id)
                           .where(Prompt.state == P.RUNNING, Prompt.batch_name.is_not(None))).all()
    return {recording_id: str(name) for recording_id, name in rows}


def _reserved_row(ctx: Context, prompt_id: int) -> int | None:
    with session_scope(ctx.sessions) as session:
        return session.scalar(select(TokenUsage.id).where(TokenUsage.prompt_id == prompt_id,
                                                          TokenUsage.finish_reason == SENT).order_by(TokenUsage.id)
                              .limit(1))


def _give_back_all(ctx: Context, prompt_id: int) -> None:
    """The job's unanswered reservation for this prompt leaves the ledger (nothing was billed for it)."""
    usage_id = _reserved_row(ctx, prompt_id)
    if usage_id is not None:
        give_back(ctx, usage_id)


def _back_to_queue(ctx: Context, job: Job, why: str, *, when: datetime | None = None, **changes: Any) -> None:
    """Back to the queue, still for the Batch API (its reservation in the ledger, if any, is given back)."""
    _give_back_all(ctx, job.prompt.id)
    with session_scope(ctx.sessions) as session:
        prompt_lifecycle.advance(session, job.prompt.id, expected=P.RUNNING, to=P.QUEUED, now=ctx.now(),
                                 token=job.token, release=True, reason=why, waiting_for=why, batch_name=None,
                                 next_attempt_at=when, **{"wait_kind": None, **changes})
    ctx.wake("batch", **({"at": when} if when is not None else {}))


def _to_normal_lane(ctx: Context, job: Job, why: str, **changes: Any) -> None:
    """Back to the queue for the normal lane (batch=False), which runs it at once; an unanswered reservation in the
    ledger is given back (a job that failed or expired, a refused request: nothing was billed)."""
    _give_back_all(ctx, job.prompt.id)
    with session_scope(ctx.sessions) as session:
        prompt_lifecycle.advance(session, job.prompt.id, expected=P.RUNNING, to=P.QUEUED, now=ctx.now(),
                                 token=job.token, release=True, reason=why, waiting_for=why, wait_kind=None,
                                 next_attempt_at=None, batch=False, batch_name=None, **changes)
    log.info("prompt %d: %s", job.prompt.id, why)
    ctx.wake("prompt")


def _queued_to_normal_lane(ctx: Context, session: Session, prompt_id: int, now: datetime, why: str) -> None:
    _set(session, prompt_id, batch=False, waiting_for=why, wait_kind=None, next_attempt_at=None)
    prompt_lifecycle.note(session, prompt_id, now=now, reason=why)
    log.info("prompt %d: %s", prompt_id, why)
    ctx.wake("prompt")


__all__ = ["BatchKind", "PENDING"]
