"""The work engine: every kind of work (conversion, upload, processing checks, remote deletions, prompts, and
the periodic jobs) is claimed under a lease and run the same way.

A claim is a compare-and-set in one short transaction that writes who holds the work (`claimed_by`: this
node and run), until when (`claimed_until`) and a new fencing token (`claim_token`). The work then runs
outside any transaction (network, ffmpeg), and its outcome is committed in a new short transaction that names
the token: if the claim was lost meanwhile, that write changes nothing. Leases are renewed while work runs;
work whose lease has passed is taken back by the sweeper while the daemon runs, not only at start.

Nothing ticks. Each kind says when it next has something due (a settle time, a retry, an expiry), the engine
sleeps until the earliest of those, and the events that concern a kind (a new file, a finished conversion,
freed quota, a prompt queued from the CLI) wake it early.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import ColumnElement, or_, true, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from daemon.clock import Clock
from db.models import PeriodicJob
from db.session import rowcount, session_scope

log = logging.getLogger(__name__)

LEASE_SECONDS = 60.0
# The longest the dispatcher sleeps without being woken: a safety net for a lost wake-up, not a tick.
LONGEST_SLEEP_SECONDS = 300.0


@dataclass
class Claim:
    """One piece of work held by this run: the row, its fencing token and what the claim read."""

    kind: str
    table: Any  # the mapped class whose row is claimed (Recording, Prompt, RemoteDeletion, PeriodicJob)
    key: Any  # its primary key
    token: int
    data: dict[str, Any] = field(default_factory=dict)
    lost: threading.Event = field(default_factory=threading.Event)


class Kind(Protocol):
    """A kind of work: how to claim it, how to run one claim, and when it next has something due."""

    name: str

    def workers(self) -> int:
        """How many claims of this kind may run at once."""
        ...

    def claim(self, session: Session, now: datetime, limit: int) -> list[Claim]:
        """Claim at most `limit` due items (compare-and-set, inside the caller's short transaction)."""
        ...

    def run(self, claim: Claim) -> None:
        """Do the work, outside any transaction; commit the outcome fenced by claim.token."""
        ...

    def next_due(self, session: Session, now: datetime) -> datetime | None:
        """When something not claimable now becomes due (None: only an event can make work appear)."""
        ...


# Which claims of a table are dead: given the table's mapped class, a SQL condition on its claim columns.
DeadClaims = Callable[[Any], ColumnElement[bool]]


class Sweeper(Protocol):
    """Takes back the work of dead claims, each table in the way its states need."""

    def take_back(self, session: Session, now: datetime, dead: DeadClaims) -> int:
        ...


class DatabaseHealth(Protocol):
    """Told whether the database answers (ApiPauses: no API call starts while it does not)."""

    def database_failed(self, now: datetime) -> None:
        ...

    def database_ok(self) -> bool:
        """True if it had been failing."""
        ...


class Engine:
    """One dispatcher thread that claims work for every kind, one small pool of workers per kind, a lease
    renewer and a sweeper, all driven by due times and wake-ups."""

    def __init__(self, sessions: sessionmaker[Session], clock: Clock, holder: str, kinds: list[Kind],
                 sweepers: list[Sweeper], *, single_node: bool = True, lease_seconds: float = LEASE_SECONDS,
                 health: DatabaseHealth | None = None, previous_runs: str | None = None) -> None:
        self.sessions = sessions
        self.health = health
        # "NODE/": claims of this node's earlier runs, dead at this run's start (a fleet's other nodes are not).
        self.previous_runs = previous_runs
        self.lease_seconds = lease_seconds
        self.renew_every = lease_seconds / 3
        self.clock = clock
        self.holder = holder
        self.kinds = {kind.name: kind for kind in kinds}
        self.sweeps = [kind.name for kind in kinds if isinstance(kind, SweepKind)]
        self.sweepers = sweepers
        # With one node per database (SQLite and its file lock), a claim by anyone else is a dead run's.
        self.single_node = single_node
        self.cond = threading.Condition()
        self.woken: set[str] = set(self.kinds)
        self.due: dict[str, float] = {}
        self.running: dict[str, int] = dict.fromkeys(self.kinds, 0)
        self.held: dict[tuple[str, Any], Claim] = {}
        self.held_lock = threading.Lock()
        self.pools = {name: ThreadPoolExecutor(max(1, kind.workers()), thread_name_prefix=f"work-{name}")
                      for name, kind in self.kinds.items()}
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.next_sweep = 0.0
        self.next_renew = time.monotonic() + self.renew_every
        self.filters: dict[str, Callable[[Claim], bool]] = {}

    # -- control --------------------------------------------------------------------------------------

    def start(self) -> None:
        if self.single_node:  # every claim not held by this run belongs to a run that is gone
            self.sweep(lambda table: or_(table.claimed_until < self.clock.now(), table.claimed_by != self.holder))
        elif self.previous_runs:
            self.sweep(lambda table: or_(table.claimed_until < self.clock.now(),
                                         table.claimed_by.like(f"{self.previous_runs}%")
                                         & (table.claimed_by != self.holder)))
        else:
            self.sweep()
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()

    def wake(self, *names: str, at: datetime | None = None) -> None:
        """Look for work of these kinds now (or at `at`), instead of at their next due time."""
        with self.cond:
            for name in names:
                if name not in self.kinds:
                    continue
                if at is None:
                    self.woken.add(name)
                else:
                    when = time.monotonic() + max((at - self.clock.now()).total_seconds(), 0.0)
                    self.due[name] = min(self.due.get(name, when), when)
            self.cond.notify()

    def busy(self, *, worth_waiting: bool = False) -> int:
        """Claims in hand (`worth_waiting`: only those whose loss costs something: an upload or a billed answer;
        a conversion is cheap to start again)."""
        with self.held_lock:
            return sum(1 for (kind, _key) in self.held
                       if not worth_waiting or kind not in self.kinds or not getattr(self.kinds[kind], "restartable",
                                                                                    False))

    def stop(self, grace_seconds: float) -> int:
        """Stop claiming; give work in flight that is costly to lose (uploads, prompts) up to `grace_seconds` to
        finish. Returns how many claims are left: their leases pass, and the next start takes them back."""
        self.stopping.set()
        with self.cond:
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout=5)
        deadline = time.monotonic() + grace_seconds
        while self.busy(worth_waiting=True) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = self.busy()
        for pool in self.pools.values():
            pool.shutdown(wait=not left, cancel_futures=True)
        if not left:
            self.release_all()
        return left

    def release_all(self) -> None:
        """Nothing is held any more: take back this run's claims that a kind left behind (a bug must not keep
        work locked until the lease passes)."""
        self.sweep(lambda table: table.claimed_by == self.holder)

    # -- the dispatcher ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self.stopping.is_set():
            names = self._wait_for_work()
            if self.stopping.is_set():
                return
            for name in names:
                try:
                    self._dispatch(self.kinds[name])
                except Exception as err:  # a database hiccup must not end the dispatcher: look again soon
                    self._database_failed(err, f"claiming {name} work")
                    self.wake(name, at=self.clock.now() + timedelta(seconds=5))
            now = time.monotonic()
            if now >= self.next_renew:
                self._renew()
            if now >= self.next_sweep:
                self.sweep()

    def _wait_for_work(self) -> list[str]:
        with self.cond:
            while not self.stopping.is_set():
                now = time.monotonic()
                ready = set(self.woken) | {name for name, when in self.due.items() if when <= now}
                if ready:
                    self.woken.clear()
                    for name in ready:
                        self.due.pop(name, None)
                    return sorted(ready)
                housekeeping = min(self.next_sweep, self.next_renew if self.busy() else now + LONGEST_SLEEP_SECONDS)
                if housekeeping <= now:
                    return []
                wake_at = min([*self.due.values(), housekeeping, now + LONGEST_SLEEP_SECONDS])
                self.cond.wait(timeout=max(wake_at - now, 0.0))
        return []

    def _dispatch(self, kind: Kind) -> None:
        with self.held_lock:
            free = kind.workers() - self.running[kind.name]
        if free <= 0:
            return  # a finishing worker wakes this kind again
        now = self.clock.now()
        with session_scope(self.sessions) as session:
            claims = kind.claim(session, now, free)
        for claim in claims:
            with self.held_lock:
                self.held[(claim.kind, claim.key)] = claim
                self.running[kind.name] += 1
            self.pools[kind.name].submit(self._run, kind, claim)
        if len(claims) < free:
            now = self.clock.now()
            with session_scope(self.sessions) as session:
                due = kind.next_due(session, now)
            if due is not None:
                if due <= now and not claims:
                    # Due, yet nothing could be claimed (held by a dead run until its lease passes): no spinning.
                    due = now + timedelta(seconds=1)
                self.wake(kind.name, at=due)
            log.debug("%s: claimed %d, next due %s", kind.name, len(claims), due)

    def _run(self, kind: Kind, claim: Claim) -> None:
        try:
            kind.run(claim)
        except Exception:
            log.exception("%s %s: unexpected error; the work is taken back when its lease passes", kind.name,
                          claim.key)
        finally:
            with self.held_lock:
                self.held.pop((claim.kind, claim.key), None)
                self.running[kind.name] -= 1
            # Finished work may have set a retry or an expiry time: the sweeps look again (two cheap queries).
            self.wake(kind.name, *self.sweeps)

    # -- leases -------------------------------------------------------------------------------------------

    def lease_until(self, now: datetime | None = None) -> datetime:
        return (now or self.clock.now()) + timedelta(seconds=self.lease_seconds)

    def _renew(self) -> None:
        """Extend the leases of everything this run holds; a claim that is no longer ours is marked lost."""
        self.next_renew = time.monotonic() + self.renew_every
        with self.held_lock:
            held = list(self.held.values())
        if not held:
            return
        until = self.lease_until()
        try:
            with session_scope(self.sessions) as session:
                for claim in held:
                    key_column = claim.table.__mapper__.primary_key[0]
                    result = session.execute(
                        update(claim.table)
                        .where(key_column == claim.key, claim.table.claimed_by == self.holder,
                               claim.table.claim_token == claim.token)
                        .values(claimed_until=until).execution_options(synchronize_session=False))
                    if not rowcount(result) and not claim.lost.is_set():
                        claim.lost.set()
                        log.warning("%s %s: the claim was taken over; its outcome will not be written",
                                    claim.kind, claim.key)
        except Exception as err:
            self._database_failed(err, "renewing leases")
            self.next_renew = time.monotonic() + 2.0
            return
        self._database_answered()

    def sweep(self, dead: DeadClaims | None = None) -> None:
        """Take back work whose claims are dead: by default those whose lease has passed."""
        self.next_sweep = time.monotonic() + self.lease_seconds
        now = self.clock.now()
        condition = dead or (lambda table: table.claimed_until < now)
        try:
            with session_scope(self.sessions) as session:
                taken = sum(sweeper.take_back(session, now, condition) for sweeper in self.sweepers)
        except Exception as err:
            self._database_failed(err, "taking back expired leases")
            self.next_sweep = time.monotonic() + 5.0
            return
        self._database_answered()
        if taken:
            log.info("took back %d piece(s) of work whose lease had passed", taken)
            with self.cond:
                self.woken.update(self.kinds)
                self.cond.notify()

    def _database_failed(self, err: Exception, doing: str) -> None:
        if isinstance(err, OperationalError):  # the database is unreachable (down, restarting, partitioned)
            log.warning("%s failed: the database cannot be reached (%s); trying again shortly", doing,
                        str(err.orig).strip().splitlines()[0] if err.orig else err)
            if self.health is not None:
                self.health.database_failed(self.clock.now())
        else:
            log.exception("%s failed; trying again shortly", doing)

    def _database_answered(self) -> None:
        if self.health is not None and self.health.database_ok():
            log.info("the database answers again; resuming")
            with self.cond:
                self.woken.update(self.kinds)
                self.cond.notify()

    # -- periodic jobs ------------------------------------------------------------------------------------

    def run_periodic(self, name: str, job: Callable[[], Any], *, interval_seconds: float,
                     force: bool = False) -> bool:
        """Run a periodic job if no other node holds it and it is due (`force`: due now); False when skipped."""
        now = self.clock.now()
        due = or_(PeriodicJob.next_run_at.is_(None), PeriodicJob.next_run_at <= now)
        with session_scope(self.sessions) as session:
            if session.get(PeriodicJob, name) is None:
                session.add(PeriodicJob(name=name))
                session.flush()
            result = session.execute(
                update(PeriodicJob)
                .where(PeriodicJob.name == name,
                       or_(PeriodicJob.claimed_until.is_(None), PeriodicJob.claimed_until < now),
                       true() if force else due)
                .values(claimed_by=self.holder, claimed_until=self.lease_until(now),
                        claim_token=PeriodicJob.claim_token + 1, last_started_at=now)
                .execution_options(synchronize_session=False))
            if not rowcount(result):
                return False
            token = session.get(PeriodicJob, name, populate_existing=True).claim_token  # type: ignore[union-attr]
        claim = Claim("periodic", PeriodicJob, name, token)
        with self.held_lock:
            self.held[("periodic", name)] = claim
        error: str | None = None
        try:
            job()
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
            raise
        finally:
            with self.held_lock:
                self.held.pop(("periodic", name), None)
            finished = self.clock.now()
            with session_scope(self.sessions) as session:
                session.execute(
                    update(PeriodicJob).where(PeriodicJob.name == name, PeriodicJob.claim_token == token)
                    .values(claimed_by=None, claimed_until=None, last_finished_at=finished, last_error=error,
                            next_run_at=finished + timedelta(seconds=interval_seconds * 0.9))
                    .execution_options(synchronize_session=False))
        return True


class SweepKind:
    """A kind of work that is a database update needing no worker (active recordings past their expiry, failed
    ones due for a retry): done inside the claim transaction, due when its next row is."""

    def __init__(self, name: str, apply: Callable[[Session, datetime], int],
                 due: Callable[[Session, datetime], datetime | None], after: Callable[[], None]) -> None:
        self.name = name
        self.apply = apply
        self.due = due
        self.after = after

    def workers(self) -> int:
        return 1

    def claim(self, session: Session, now: datetime, limit: int) -> list[Claim]:
        if self.apply(session, now):
            self.after()
        return []

    def next_due(self, session: Session, now: datetime) -> datetime | None:
        return self.due(session, now)

    def run(self, claim: Claim) -> None:  # pragma: no cover - a sweep claims nothing
        raise AssertionError(f"{self.name} claims no work")
