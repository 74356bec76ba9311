"""The work engine on a real SQLite database: claims are compare-and-sets with fencing tokens, leases are renewed
while work runs and taken back by the sweeper when they pass, and the dispatcher sleeps until work is due or an
event wakes it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from daemon.clock import SystemClock
from daemon.engine import Claim, Engine
from daemon.pipeline import lifecycle, remote
from daemon.prompts import lifecycle as prompt_lifecycle
from db.models import Prompt, Recording, RecordingEvent
from db.session import session_scope
from db.states import PromptState as P
from db.states import RecordingState as S
from tests.conftest import T0
from tests.harness import wait_until


class FixedClock:
    def __init__(self, now: datetime) -> None:
        self.current = now

    def now(self) -> datetime:
        return self.current


def add(session: Session, state: S = S.DISCOVERED, **fields: Any) -> Recording:
    values: dict[str, Any] = dict(source_size=1, source_mtime_ns=1, closed_after_write=True, last_change_at=T0,
                                  created_at=T0, state_changed_at=T0)
    values.update(fields)
    recording = Recording(state=state, source_path=f"/in/{values.pop('name', 'a.wav')}", **values)
    session.add(recording)
    session.flush()
    return recording


def sweepers() -> list[Any]:
    return [lifecycle, prompt_lifecycle, remote.DeletionSweeper()]


def test_a_claim_is_a_compare_and_set_and_a_stale_token_writes_nothing(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as session:
        rid = add(session).id
        token = lifecycle.claim(session, rid, expected=S.DISCOVERED, to=S.CONVERTING, now=T0, holder="a",
                                until=T0 + timedelta(seconds=60))
        assert token is not None
        assert lifecycle.claim(session, rid, expected=S.DISCOVERED, to=S.CONVERTING, now=T0, holder="b",
                               until=T0 + timedelta(seconds=60)) is None, "claimed once only"
        assert not lifecycle.advance(session, rid, expected=S.CONVERTING, to=S.CONVERTED, now=T0, token=token - 1)
        assert lifecycle.advance(session, rid, expected=S.CONVERTING, to=S.CONVERTED, now=T0, token=token,
                                 release=True)
        row = session.get(Recording, rid, populate_existing=True)
        assert row is not None and row.state == S.CONVERTED and row.claimed_by is None


def test_the_sweeper_takes_back_work_whose_lease_passed_and_leaves_live_leases(
        sessions: sessionmaker[Session]) -> None:
    past, future = T0 - timedelta(seconds=1), T0 + timedelta(seconds=30)
    with session_scope(sessions) as session:
        dead_conversion = add(session, S.CONVERTING, name="dead.wav", claimed_by="ghost", claimed_until=past).id
        live_conversion = add(session, S.CONVERTING, name="live.wav", claimed_by="peer", claimed_until=future).id
        dead_upload = add(session, S.UPLOADING, name="up.wav", claimed_by="ghost", claimed_until=past).id
        prompt = Prompt(state=P.RUNNING, prompt_text="x", model="m", created_at=T0, claimed_by="ghost",
                        claimed_until=past)
        session.add(prompt)
        session.flush()
        prompt_id = prompt.id
    engine = Engine(sessions, FixedClock(T0), "me", [], sweepers())
    engine.sweep()
    with session_scope(sessions) as session:
        states = {r.id: (r.state, r.claimed_by) for r in session.scalars(select(Recording))}
        assert states[dead_conversion] == (S.DISCOVERED, None)
        assert states[live_conversion] == (S.CONVERTING, "peer")
        assert states[dead_upload] == (S.UPLOADING, None), "an upload is resumed (looked up first), not restarted"
        reasons = session.scalars(select(RecordingEvent.reason).where(RecordingEvent.recording_id == dead_conversion))
        assert any("interrupted" in reason for reason in reasons)
        resumed = session.get(Prompt, prompt_id)
        assert resumed is not None and resumed.state == P.QUEUED and resumed.claimed_by is None


def test_on_a_single_node_every_claim_of_another_run_is_dead_at_start(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as session:
        rid = add(session, S.CONVERTING, claimed_by="previous-run", claimed_until=T0 + timedelta(hours=1)).id
    engine = Engine(sessions, FixedClock(T0), "me", [], sweepers(), single_node=True)
    engine.start()
    try:
        with session_scope(sessions) as session:
            assert session.get(Recording, rid).state == S.DISCOVERED  # type: ignore[union-attr]
    finally:
        engine.stop(0.0)


class BlockingKind:
    """Claims one discovered recording at a time and holds it until released."""

    name = "block"

    def __init__(self, lease_seconds: float) -> None:
        self.lease_seconds = lease_seconds
        self.release = threading.Event()
        self.started = threading.Event()
        self.claim_times: list[datetime] = []
        self.due: datetime | None = None
        self.seen: list[Claim] = []

    @property
    def claim_calls(self) -> int:
        return len(self.claim_times)

    def workers(self) -> int:
        return 1

    def claim(self, session: Session, now: datetime, limit: int) -> list[Claim]:
        self.claim_times.append(datetime.now(UTC))
        row = session.scalar(select(Recording).where(Recording.state == S.DISCOVERED, lifecycle.is_free(now)))
        if row is None:
            return []
        token = lifecycle.claim(session, row.id, expected=S.DISCOVERED, to=S.CONVERTING, now=now, holder="me",
                                until=now + timedelta(seconds=self.lease_seconds))
        return [Claim(self.name, Recording, row.id, token or 0)]

    def next_due(self, session: Session, now: datetime) -> datetime | None:
        return self.due if self.due is not None and self.due > now else None

    def run(self, claim: Claim) -> None:
        self.seen.append(claim)
        self.started.set()
        self.release.wait(10)


class CountingSweeper:
    """Takes nothing back; counts the dispatcher's sweeps (one every lease_seconds, whatever else happens)."""

    def __init__(self) -> None:
        self.sweeps = 0

    def take_back(self, session: Session, now: datetime, dead: Any) -> int:
        self.sweeps += 1
        return 0


Started = Callable[..., tuple[Engine, BlockingKind, CountingSweeper]]


@pytest.fixture
def start_engine(sessions: sessionmaker[Session]) -> Iterator[Started]:
    """Starts an engine with one BlockingKind, on the system clock; each is released and stopped at the end."""
    started: list[tuple[Engine, BlockingKind]] = []

    def start(lease_seconds: float) -> tuple[Engine, BlockingKind, CountingSweeper]:
        kind, counter = BlockingKind(lease_seconds), CountingSweeper()
        engine = Engine(sessions, SystemClock(), "me", [kind], [*sweepers(), counter], lease_seconds=lease_seconds)
        engine.start()
        started.append((engine, kind))
        return engine, kind, counter

    yield start
    for engine, kind in started:
        kind.release.set()
        engine.stop(2.0)


def test_a_lease_is_renewed_while_the_work_runs_and_a_lost_claim_is_noticed(
        sessions: sessionmaker[Session], start_engine: Started) -> None:
    engine, kind, _ = start_engine(lease_seconds=0.6)
    with session_scope(sessions) as session:
        rid = add(session, last_change_at=datetime.now(UTC)).id
    engine.wake("block")
    assert kind.started.wait(5)
    first = _lease(sessions, rid)
    # Once the first lease has passed, renewals (every 0.2 s) keep the claim's lease ahead of the clock.
    wait_until(lambda: datetime.now(UTC) > first, 5, 0.05, message="the first lease to pass")
    wait_until(lambda: _lease(sessions, rid) > datetime.now(UTC), 5, 0.05, message="a renewed lease")
    assert not kind.seen[0].lost.is_set()
    with session_scope(sessions) as session:  # someone else takes the work over
        session.execute(update(Recording).where(Recording.id == rid).values(claim_token=Recording.claim_token + 1))
    assert kind.seen[0].lost.wait(10), "the next renewal notices that the claim is no longer ours"


def _lease(sessions: sessionmaker[Session], rid: int) -> datetime:
    with session_scope(sessions) as session:
        until = session.scalar(select(Recording.claimed_until).where(Recording.id == rid))
    assert until is not None
    return until


def test_idle_the_engine_claims_nothing_until_work_is_due_or_an_event_wakes_it(
        sessions: sessionmaker[Session], start_engine: Started) -> None:
    engine, kind, counter = start_engine(lease_seconds=0.6)
    wait_until(lambda: kind.claim_calls == 1, 5, 0.02, message="the first look at every kind, at start")
    with session_scope(sessions) as session:
        add(session, last_change_at=datetime.now(UTC))  # work that nobody announces
    # The dispatcher wakes for its sweeps (every 0.6 s) and goes back to sleep: no claims (no ticks).
    sweeps = counter.sweeps
    wait_until(lambda: counter.sweeps >= sweeps + 2, 10, 0.05, message="two sweeps")
    assert kind.claim_calls == 1 and not kind.started.is_set()


def test_a_wake_or_a_due_time_starts_the_work_without_waiting_for_anything_else(
        sessions: sessionmaker[Session], start_engine: Started) -> None:
    # A 30-s lease: the dispatcher's next housekeeping is 30 s away, so anything sooner is the wake or the due time.
    engine, kind, _ = start_engine(lease_seconds=30)
    wait_until(lambda: kind.claim_calls == 1, 5, 0.02, message="the first look at every kind, at start")
    with session_scope(sessions) as session:
        add(session, last_change_at=datetime.now(UTC))
    engine.wake("block")
    assert kind.started.wait(10), "a wake-up is acted on at once"
    # A due time wakes it by itself: the running work ends, and the kind reports work due in 0.4 s.
    due = kind.due = datetime.now(UTC) + timedelta(seconds=0.4)
    kind.release.set()
    wait_until(lambda: kind.claim_times[-1] >= due, 10, 0.05, message="a claim at the due time")
