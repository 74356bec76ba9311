"""A prompt's state machine: the only code that changes `Prompt.state`. Like a recording's, every change is a
compare-and-set that writes a PromptEvent (the history `audiodrop show-prompt`/`prompts --json` lists), a
worker claims a prompt under a lease, and the final write of a claim names its fencing token.

    queued -> running -> done
      ^          |  \\-> failed
      \\---------/ (waits: its files, a rate limit, the network; or its worker stopped)
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from daemon.errors import IllegalTransition
from db.models import Prompt, PromptEvent
from db.session import rowcount
from db.states import PromptState

P = PromptState

TRANSITIONS: dict[PromptState, frozenset[PromptState]] = {
    P.QUEUED: frozenset({P.RUNNING, P.FAILED}),
    # Back to queued when it must wait (files, rate limit, network) or its worker lost the claim.
    P.RUNNING: frozenset({P.QUEUED, P.DONE, P.FAILED}),
    P.DONE: frozenset(),
    # `audiodrop retry --prompt` queues a failed prompt again.
    P.FAILED: frozenset({P.QUEUED}),
}


def _check(expected: PromptState, to: PromptState) -> None:
    if to not in TRANSITIONS[expected]:
        raise IllegalTransition(expected.value, to.value)


def advance(session: Session, prompt_id: int, *, expected: PromptState, to: PromptState, now: datetime,
            reason: str = "", token: int | None = None, release: bool = False, **changes: Any) -> bool:
    """Move one prompt from `expected` to `to` with `changes`; False if it is no longer there (or ours)."""
    _check(expected, to)
    conditions = [Prompt.id == prompt_id, Prompt.state == expected]
    if token is not None:
        conditions.append(Prompt.claim_token == token)
    if release:
        changes.update(claimed_by=None, claimed_until=None)
    result = session.execute(update(Prompt).where(*conditions).values(state=to, **changes)
                             .execution_options(synchronize_session=False))
    if not rowcount(result):
        return False
    session.add(PromptEvent(prompt_id=prompt_id, at=now, from_state=expected.value, to_state=to.value,
                            reason=reason))
    session.flush()
    return True


def claim(session: Session, prompt_id: int, *, now: datetime, holder: str, until: datetime,
          reason: str = "claimed by a worker") -> int | None:
    """queued -> running for one worker, under a lease. Returns the fencing token, or None."""
    _check(P.QUEUED, P.RUNNING)
    free = (Prompt.claimed_until.is_(None)) | (Prompt.claimed_until < now)
    result = session.execute(
        update(Prompt).where(Prompt.id == prompt_id, Prompt.state == P.QUEUED, free)
        .values(state=P.RUNNING, claimed_by=holder, claimed_until=until, claim_token=Prompt.claim_token + 1)
        .execution_options(synchronize_session=False))
    if not rowcount(result):
        return None
    started = session.scalar(select(Prompt.started_at).where(Prompt.id == prompt_id))
    if started is None:
        session.execute(update(Prompt).where(Prompt.id == prompt_id).values(started_at=now)
                        .execution_options(synchronize_session=False))
    session.add(PromptEvent(prompt_id=prompt_id, at=now, from_state=P.QUEUED.value, to_state=P.RUNNING.value,
                            reason=f"{reason} ({holder})"))
    session.flush()
    return session.scalar(select(Prompt.claim_token).where(Prompt.id == prompt_id))


def created(session: Session, prompt: Prompt, *, now: datetime, reason: str) -> None:
    """The first event of a new prompt."""
    session.add(PromptEvent(prompt_id=prompt.id, at=now, from_state=None, to_state=P.QUEUED.value, reason=reason))


def note(session: Session, prompt_id: int, *, now: datetime, reason: str) -> None:
    state = session.scalar(select(Prompt.state).where(Prompt.id == prompt_id))
    if state is not None:
        session.add(PromptEvent(prompt_id=prompt_id, at=now, from_state=state, to_state=state, reason=reason))


def take_back(session: Session, now: datetime, dead: Callable[[Any], ColumnElement[bool]]) -> int:
    """Prompts held by dead claims go back to the queue: their answer was never stored (an answer that was
    stored already made the prompt done)."""
    # A running prompt with no holder at all was left by a version without claims: it is dead too. A running prompt
    # with a batch_name is in a Batch API job: it stays running, free to be claimed, and the job is resumed by its
    # stored name, never sent again (daemon.prompts.batch).
    ownerless = (Prompt.state == P.RUNNING) & Prompt.claimed_by.is_(None) & Prompt.batch_name.is_(None)
    stale = session.execute(select(Prompt.id, Prompt.state, Prompt.claimed_by, Prompt.batch_name)
                            .where((Prompt.claimed_by.is_not(None) & dead(Prompt)) | ownerless)).all()
    for prompt_id, state, holder, batch_name in stale:
        if state == P.RUNNING and batch_name is None:
            advance(session, prompt_id, expected=P.RUNNING, to=P.QUEUED, now=now, release=True,
                    reason=f"its worker ({holder or 'an earlier run'}) stopped or lost its lease; running it again",
                    waiting_for="interrupted; running it again", wait_kind=None, next_attempt_at=None)
        else:
            session.execute(update(Prompt).where(Prompt.id == prompt_id).values(claimed_by=None, claimed_until=None)
                            .execution_options(synchronize_session=False))
    return len(stale)
