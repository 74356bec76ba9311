"""One generation call of a prompt, with everything that must hold around it: the fleet-wide rate limit, the
budget, and the token ledger with each answer's cost in dollars.

The ledger row of a call is written before the call, holding its estimated cost (an upper bound), under the
same lock that checks the budget: two workers (or two nodes) can never both pass a budget that had room for one.
When the answer comes the row gets the real usage and cost; a call the server refused (a 4xx or 5xx answer is
not billed) gives its row back; a call that timed out or lost its connection may have been billed, so its
estimate stays.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from daemon.clock import Clock
from daemon.context import Context
from daemon.errors import PermanentError, TransientError, Truncated, Waiting
from daemon.gemini import FilePart, Generation, InlinePart
from daemon.prompts import pricing
from daemon.prompts.queue import estimate_audio_tokens
from db import queries
from db.models import Prompt, RateSlot, Recording, TokenUsage
from db.session import advisory_lock, session_scope

log = logging.getLogger(__name__)

# The server counts requests when they arrive; a slot is taken a moment before (the request is still built and
# sent): a second of margin keeps a busy machine's late request out of the next window.
RATE_WINDOW_SECONDS = 61.0
SENT = "SENT"  # a ledger row's finish_reason while its call is under way (or was lost with its answer)


@dataclass
class Job:
    """Everything one run of a prompt needs, read from the database at its start."""

    prompt: Prompt
    recordings: list[Recording]
    token: int


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
            window = now - timedelta(seconds=self.window_seconds)  # a slot this old is free again
            session.execute(delete(RateSlot).where(RateSlot.at <= window))
            sent = session.scalars(select(RateSlot.at).where(RateSlot.model == model, RateSlot.at > window)
                                   .order_by(RateSlot.at)).all()
            if len(sent) >= self.per_minute:
                return self.window_seconds - (now - sent[0]).total_seconds()
            session.add(RateSlot(model=model, at=now))
            return 0.0


def output_budget(ctx: Context, prompt: Prompt) -> int:
    return prompt.max_output_tokens or ctx.settings.prompts.max_output_tokens


def thinking_budget(ctx: Context) -> int | None:
    budget = ctx.settings.prompts.thinking_budget
    return None if budget < 0 else budget


def generate(ctx: Context, job: Job, parts: list[FilePart | InlinePart | str], limiter: RateLimiter, *,
             audio_seconds: float, text: str | None = None) -> Generation:
    """One generateContent call for the job: audio first and the instructions after (a repeated prefix is what
    the API's implicit cache reuses), under the rate limit and the budget, its usage and cost in the ledger."""
    prompt = job.prompt
    assert ctx.client is not None
    ctx.client.warm()
    wait = limiter.take(prompt.model)
    if wait:
        raise Waiting(f"rate limit: at most {ctx.settings.prompts.requests_per_minute} requests a minute to "
                      f"{prompt.model}; next in {wait:.0f} s", ctx.now() + timedelta(seconds=wait), "rate")
    prompt_text = text or prompt.prompt_text
    budget = output_budget(ctx, prompt)
    estimate = pricing.estimate(estimate_audio_tokens(audio_seconds), budget, prompt.model, ctx.settings.price_table,
                                text_tokens=pricing.text_tokens_bound(prompt_text, prompt.system_instruction))
    usage_id = reserve(ctx, prompt, estimate)
    try:
        generation = ctx.client.generate(prompt.model, [*parts, prompt_text],
                                         system_instruction=prompt.system_instruction, max_output_tokens=budget,
                                         thinking_budget=thinking_budget(ctx),
                                         timeout_seconds=ctx.settings.prompts.generate_timeout_seconds)
    except Exception as err:
        if _refused(err):
            give_back(ctx, usage_id)
        raise
    ctx.pauses.clear_network_problems()
    settle(ctx, usage_id, prompt, generation)
    if generation.finish_reason != "STOP":
        raise Truncated(f"the answer stopped early (finish reason {generation.finish_reason})")
    if not generation.text.strip():
        raise Truncated("the answer was empty (finish reason STOP)")
    return generation


def _refused(err: Exception) -> bool:
    """The server answered the call with an error, which is not billed (a timeout or a cut connection may be)."""
    return isinstance(err, PermanentError) or (isinstance(err, TransientError) and err.status is not None)


def spent(session: Session, now: datetime, prices: pricing.Prices) -> pricing.Spending:
    """Today's and this month's spend (UTC) from the ledger."""
    return pricing.spending(queries.ledger_since(session, pricing.month_start(now)), now, prices)


def reserve(ctx: Context, prompt: Prompt, estimate: Decimal | None) -> int:
    """The call's ledger row, at its estimated cost, once the budget has room for it (else Waiting)."""
    now = ctx.now()
    budget = ctx.settings.budget
    with session_scope(ctx.sessions) as session:
        if budget.limited:
            advisory_lock(session, "budget")
            spending = spent(session, now, ctx.settings.price_table)
            force = bool(session.scalar(select(Prompt.force_budget).where(Prompt.id == prompt.id)))
            verdict = pricing.budget_check(spending.today_usd, spending.month_usd, estimate, budget, now,
                                           force=force, model=prompt.model)
            if not verdict.allowed:
                _budget_reached(session, ctx, spending, verdict, now)
                raise Waiting(verdict.reason or "the budget is reached", verdict.until, "budget")
        row = TokenUsage(at=now, prompt_id=prompt.id, model=prompt.model, finish_reason=SENT,
                         cost_usd=pricing.ledger_amount(estimate))
        session.add(row)
        session.flush()
        return row.id


def _budget_reached(session: Session, ctx: Context, spending: pricing.Spending, verdict: pricing.BudgetVerdict,
                    now: datetime) -> None:
    from daemon import notify

    budget = ctx.settings.budget
    monthly = verdict.until is not None and verdict.until == pricing.next_month(now) and \
        budget.monthly_usd is not None
    period, spent_usd, limit = ("month", spending.month_usd, budget.monthly_usd) if monthly else \
        ("day", spending.today_usd, budget.daily_usd)
    if limit is not None and verdict.until is not None:
        notify.budget_reached(session, ctx, period=period, spent_usd=spent_usd, budget_usd=limit)


def give_back(ctx: Context, usage_id: int) -> None:
    with session_scope(ctx.sessions) as session:
        session.execute(delete(TokenUsage).where(TokenUsage.id == usage_id, TokenUsage.finish_reason == SENT))


def settle(ctx: Context, usage_id: int, prompt: Prompt, generation: Generation, *, batch: bool = False) -> None:
    """The call's real usage and cost, into its ledger row and the prompt's running totals."""
    usage = pricing.Usage(prompt_tokens=generation.prompt_tokens or 0, audio_tokens=generation.audio_tokens or 0,
                          output_tokens=generation.output_tokens or 0,
                          thinking_tokens=generation.thinking_tokens or 0,
                          cached_tokens=generation.cached_tokens or 0,
                          cached_audio_tokens=generation.cached_audio_tokens)
    amount = pricing.ledger_amount(pricing.cost(usage, prompt.model, batch=batch, prices=ctx.settings.price_table))
    with session_scope(ctx.sessions) as session:
        session.execute(update(TokenUsage).where(TokenUsage.id == usage_id).values(
            at=ctx.now(), finish_reason=generation.finish_reason, prompt_tokens=usage.prompt_tokens,
            audio_tokens=usage.audio_tokens, output_tokens=usage.output_tokens,
            thinking_tokens=usage.thinking_tokens, cached_tokens=usage.cached_tokens, batch=batch, cost_usd=amount))
        add_cost(session, prompt.id, amount, usage.cached_tokens)


def record(ctx: Context, prompt: Prompt, generation: Generation, *, batch: bool = False) -> None:
    """An answer that came without a reserved row (a Batch API job's): its ledger row and cost."""
    with session_scope(ctx.sessions) as session:
        row = TokenUsage(at=ctx.now(), prompt_id=prompt.id, model=prompt.model, finish_reason=SENT)
        session.add(row)
        session.flush()
        usage_id = row.id
    settle(ctx, usage_id, prompt, generation, batch=batch)


def add_cost(session: Session, prompt_id: int, amount: Decimal | None, cached_tokens: int) -> None:
    session.execute(update(Prompt).where(Prompt.id == prompt_id).values(
        cost_usd=func.coalesce(Prompt.cost_usd, 0) + (amount or 0),
        cached_tokens=func.coalesce(Prompt.cached_tokens, 0) + cached_tokens))
