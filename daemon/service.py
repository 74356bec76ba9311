"""The composition root: configuration -> lock -> database at head -> the work engine, watchers, intake and the
periodic jobs -> READY -> wait for a signal -> orderly stop. No business rules live here."""

from __future__ import annotations

import ctypes
import errno
import faulthandler
import fcntl
import logging
import os
import queue
import secrets
import signal
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from daemon import nodes, notify, systemd
from daemon.clock import SystemClock
from daemon.config import Settings, find_api_key, load_settings
from daemon.context import Context
from daemon.engine import Engine as WorkEngine
from daemon.engine import Kind, SweepKind
from daemon.errors import AlreadyRunning, ConfigError, DatabaseError
from daemon.gemini import GeminiClient
from daemon.pipeline import intake, lifecycle, remote, transcode
from daemon.pipeline.conversion import ConvertKind
from daemon.pipeline.sources import SourceKind
from daemon.pipeline.upload import ProcessingKind, UploadKind
from daemon.pipeline.watcher import Hint, Watcher
from daemon.prompts import batch as batch_lane
from daemon.prompts import lifecycle as prompt_lifecycle
from daemon.prompts import results
from daemon.prompts import runner as prompt_runner
from daemon.wakeup import Listener
from db import queries
from db.models import DaemonState
from db.session import describe_failure, is_fleet, make_sessionmaker, migrate, open_engine, session_scope
from db.states import RecordingState as S

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0
# How often a node of a fleet looks for work queued by the others (each look is one claim query per kind).
FLEET_LOOK_SECONDS = 15.0
# Work only this node can do (its own drop folders' conversions and sources): never queued by another node.
FLEET_LOCAL_KINDS = frozenset({"convert", "source", "sources", "expire", "retry"})
FOLDER_CHECK_SECONDS = 10.0
# systemd's TimeoutStopSec, handed over by the unit (AUDIODROP_STOP_TIMEOUT); work in flight gets all of it
# but a margin to write the last state.
DEFAULT_STOP_TIMEOUT_SECONDS = 30.0
STOP_MARGIN_SECONDS = 5.0
INTAKE_BATCH_SECONDS = 0.02
CLOCK_SKEW_WARNING_SECONDS = 5.0


def acquire_lock(path: Path) -> IO[str]:
    """One daemon per state_dir: an exclusive flock held for the process's lifetime."""
    handle = open(path, "a+", encoding="ascii")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise AlreadyRunning(f"another audiodrop daemon (pid {holder}) already uses {path.parent}",
                             "stop it first, or give this one its own state_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def limit_malloc_arenas() -> None:
    """Threads each get a glibc malloc arena by default; two are plenty for a mostly idle daemon."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def stop_grace_seconds() -> float:
    try:
        timeout = float(os.environ.get("AUDIODROP_STOP_TIMEOUT", DEFAULT_STOP_TIMEOUT_SECONDS))
    except ValueError:
        timeout = DEFAULT_STOP_TIMEOUT_SECONDS
    return max(timeout - STOP_MARGIN_SECONDS, 1.0)


def open_state(settings: Settings, *, stop: threading.Event | None = None) -> Engine:
    """The folders and the database, migrated to head. A results folder that cannot be made does not stop the
    daemon: answers are kept in the database and their files written once it can be. A database server that
    cannot be reached is waited for (saying so), unless `stop` is None (the CLI: one clear line at once); wrong
    credentials, a missing database or a damaged file are one clear error each."""
    for folder in (settings.state_dir, settings.converted_dir):
        folder.mkdir(parents=True, exist_ok=True, mode=0o750)
    try:
        settings.results_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    except OSError as err:
        log.warning("results_dir %s cannot be made (%s): answers are kept in the database and their files written "
                    "once it can be", settings.results_dir, err.strerror or err)
    delay = 1.0
    while True:
        try:
            migrate(settings.database_path, settings.database_url)
            database = open_engine(settings.database_path, settings.database_url)
            with database.connect():
                return database
        except SQLAlchemyError as err:
            message, worth_waiting = describe_failure(err, settings.database_url)
            if not worth_waiting or stop is None:
                raise DatabaseError(message, "check database_url (or $AUDIODROP_DATABASE_URL)") from None
            log.warning("%s; trying again in %.0f s", message, delay)
            systemd.notify(f"STATUS=waiting for the database: {message}")
            if stop.wait(delay):
                raise DatabaseError(message, "stopped while waiting for the database") from None
            delay = min(delay * 2, 30.0)


def ensure_instance_id(ctx: Context) -> str:
    with session_scope(ctx.sessions) as session:
        state = session.get(DaemonState, 1)
        if state is None:
            state = DaemonState(id=1, started_at=ctx.now())
            session.add(state)
        if not state.instance_id:
            state.instance_id = secrets.token_hex(4)
        return state.instance_id


def build_engine(ctx: Context, *, only: set[int] | None = None, prompts_only: set[int] | None = None,
                 upload: bool = True) -> WorkEngine:
    """The work engine with every kind of work (`only`/`prompts_only`: `audiodrop process`'s recordings and
    prompts; `upload=False`: conversion only)."""
    engine: WorkEngine
    lease = lambda now: engine.lease_until(now)  # noqa: E731 - the engine is made just below
    kinds: list[Kind] = [
        ConvertKind(ctx, lease, only),
        SweepKind("expire", remote.expire_due, remote.next_expiry, lambda: ctx.wake("upload", "prompt")),
        SweepKind("retry", lifecycle.retry_due, lifecycle.next_retry, lambda: ctx.wake("convert", "upload")),
    ]
    if upload:
        kinds += [UploadKind(ctx, lease, only), ProcessingKind(ctx, lease), remote.DeleteKind(ctx, lease),
                  prompt_runner.PromptKind(ctx, lease, prompts_only), prompt_runner.ResultFilesKind(ctx, lease),
                  batch_lane.BatchKind(ctx, lease, prompts_only)]
        # What wakes the prompts (a file ACTIVE again, a config reload) wakes the Batch API lane's prompts too.
        wake_prompts = ctx.wake
        ctx.wake = lambda *names, at=None: wake_prompts(*names, *(("batch",) if "prompt" in names else ()), at=at)
    if only is None:  # the daemon moves or deletes sources as their folders say; `audiodrop process` never does
        sources = SourceKind(ctx, lease)
        kinds += [sources, sources.sweep_kind(), notify.OutboxKind(ctx, lease)]
    engine = WorkEngine(ctx.sessions, ctx.clock, ctx.holder, kinds,
                        [lifecycle, prompt_lifecycle, remote.DeletionSweeper(), notify.OutboxSweeper()],
                        single_node=not ctx.fleet,
                        lease_seconds=ctx.settings.service.lease_seconds, health=ctx.pauses,
                        previous_runs=nodes.holder_prefix(ctx.node))
    return engine


class Daemon:
    def __init__(self, settings: Settings, config_path: str | None = None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.stop_event = threading.Event()
        self.reload_requested = threading.Event()
        self.unavailable: dict[Path, str] = {}
        self.hints: queue.Queue[Hint | None] = queue.Queue()
        self.scheduler = BackgroundScheduler(timezone=UTC, job_defaults={"coalesce": True, "max_instances": 1,
                                                                         "misfire_grace_time": 30})
        self.has_key = False
        self.next_fleet_look = 0.0

    # -- start and stop ------------------------------------------------------------------------------

    def run(self) -> None:
        settings = self.settings
        # Everything the daemon writes is private to its group: state 0750, files 0640 at most.
        os.umask(0o027)
        limit_malloc_arenas()
        self._install_signal_handlers()
        settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        lock = acquire_lock(settings.lock_path)
        try:
            database = open_state(settings, stop=self.stop_event)
            client = self._make_client()
            fleet = is_fleet(settings.database_url)
            node, self.run_id = settings.service.node_name, secrets.token_hex(4)
            self.ctx = Context(settings=settings, sessions=make_sessionmaker(database), client=client,
                               clock=nodes.DatabaseClock() if fleet else SystemClock(), holder=f"{node}/{self.run_id}",
                               node=node, fleet=fleet, wake=self.wake)
            self._measure_clock()
            self.ctx.instance_id = ensure_instance_id(self.ctx)
            notify.follow_history(self.ctx.sessions, self.ctx)  # failures and rejections become notifications
            self._stopped_for_long()
            for leftover in [*transcode.remove_stale_partials(settings.converted_dir),
                             *results.remove_stale_temps(settings.results_dir)]:
                log.info("removed %s, the unfinished output of an interrupted write", leftover.name)
            self.engine = build_engine(self.ctx)
            self.engine.start()
            self.watcher = Watcher(settings, self.hints)
            self.watcher.start()
            self.intake_thread = threading.Thread(target=self._intake_loop, name="intake", daemon=True)
            self.intake_thread.start()
            self.listener = Listener(settings.state_dir, self.wake)
            self.listener.start()
            self._schedule_jobs()
            self.heartbeat()
            systemd.notify("READY=1")
            log.info("audiodrop is running (state in %s)", settings.state_dir)
            while not self.stop_event.wait(3600):
                pass
            self.shutdown()
            database.dispose()
        finally:
            lock.close()

    def _make_client(self) -> GeminiClient | None:
        api_key, key_source = find_api_key(self.settings)
        self.has_key = api_key is not None
        if api_key is None:
            log.warning("no API key found (GEMINI_API_KEY, GOOGLE_API_KEY, gemini.api_key_file or the systemd "
                        "credential gemini-api-key): recordings are converted and wait for one")
            return None
        log.info("API key from %s", key_source)
        return GeminiClient(api_key, self.settings.gemini)

    def _schedule_jobs(self) -> None:
        add = self.scheduler.add_job
        now = datetime.now(UTC)
        add(self.scan, "interval", seconds=self.settings.intake.scan_interval_seconds, id="scan", next_run_time=now)
        add(self.reconcile, "interval", seconds=self.settings.gemini.reconcile_interval_seconds, id="reconcile",
            next_run_time=now)
        add(self.heartbeat, "interval", seconds=HEARTBEAT_SECONDS, id="heartbeat")
        add(self.check_folders, "interval", seconds=FOLDER_CHECK_SECONDS, id="folders")
        interval = systemd.watchdog_interval()
        if interval:
            add(self.watchdog_ping, "interval", seconds=interval, id="watchdog")
        self.scheduler.start()

    def wake(self, *kinds: str, at: datetime | None = None) -> None:
        """Look for work of these kinds now (or at `at`): engine work, or a periodic job run early."""
        for job in ("scan", "reconcile"):
            if job in kinds and at is None:
                try:
                    self.scheduler.modify_job(job, next_run_time=datetime.now(UTC))
                except Exception:  # the scheduler is not running yet, or shutting down
                    pass
        if "prompt" in kinds:  # a prompt queued from the CLI may be the Batch API lane's
            kinds = (*kinds, "batch")
        self.engine.wake(*kinds, at=at)

    def _install_signal_handlers(self) -> None:
        def stop(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            self.stop_event.set()

        def reload(_signum: int, _frame: FrameType | None) -> None:
            threading.Thread(target=self.reload, name="reload", daemon=True).start()

        if threading.current_thread() is threading.main_thread():
            # `kill -USR1 PID` prints every thread's stack to the log: for diagnosing a stuck daemon.
            faulthandler.register(signal.SIGUSR1, all_threads=True)
            signal.signal(signal.SIGTERM, stop)
            signal.signal(signal.SIGINT, stop)
            signal.signal(signal.SIGHUP, reload)

    def reload(self) -> None:
        """SIGHUP: read the configuration and the API key again and apply what can change while running (drop
        folders, templates, limits, timings, a new or fixed key). The state and results folders need a restart."""
        try:
            new = load_settings(self.config_path)
        except ConfigError as err:
            log.error("configuration not reloaded, the old one stays in force: %s", err)
            return
        if (new.state_dir, new.results_dir) != (self.settings.state_dir, self.settings.results_dir):
            log.warning("state_dir and results_dir changes take effect after a restart")
            new = replace(new, state_dir=self.settings.state_dir, results_dir=self.settings.results_dir)
        self.settings = new
        self.ctx.settings = new
        old_client, self.ctx.client = self.ctx.client, self._make_client()
        if old_client is not None:
            old_client.close()
        self.ctx.pauses.clear_network_problems()
        self.watcher.stop()
        self.watcher = Watcher(new, self.hints)
        self.watcher.start()
        self.scheduler.reschedule_job("scan", trigger="interval", seconds=new.intake.scan_interval_seconds)
        self.wake("scan", "reconcile", *self.engine.kinds)
        log.info("configuration reloaded from %s", new.source or "the defaults")

    def check_folders(self) -> None:
        self.unavailable = self.watcher.check()

    def watchdog_ping(self) -> None:
        """WATCHDOG=1 only while the daemon is healthy: observers, intake and the engine alive."""
        threads = (self.intake_thread, self.engine.thread)
        if self.watcher.alive() and all(t is not None and t.is_alive() for t in threads):
            systemd.notify("WATCHDOG=1")
        else:
            log.error("a watcher, the intake or the engine stopped; withholding the systemd watchdog ping")

    def shutdown(self) -> None:
        """Stop claiming, let work in flight finish within the unit's stop timeout; what is still running then
        is abandoned safely (its lease passes and the next start takes it back; temporary files never reach a
        final name)."""
        systemd.notify("STOPPING=1\nSTATUS=stopping")
        self.scheduler.shutdown(wait=False)
        self.watcher.stop()
        self.listener.stop()
        self.hints.put(None)
        left = self.engine.stop(stop_grace_seconds())
        try:
            with session_scope(self.ctx.sessions) as session:
                nodes.stopped(session, self.ctx.node, self.run_id, self.ctx.now())
        except SQLAlchemyError as err:
            log.warning("could not record the stop: %s", describe_failure(err, self.settings.database_url)[0])
        if left:
            log.info("audiodrop stopped; abandoned %d task(s) in flight, they resume at the next start", left)
            logging.shutdown()
            os._exit(0)  # worker threads cannot be interrupted; the next start picks their work up
        log.info("audiodrop stopped")

    # -- intake --------------------------------------------------------------------------------------

    def _intake_loop(self) -> None:
        """Take watcher hints as they come: each path in its own transaction, then the conversion work looks."""
        while True:
            first = self.hints.get()
            if first is None:
                return
            batch = [first]
            try:
                while len(batch) < 500:
                    hint = self.hints.get(timeout=INTAKE_BATCH_SECONDS)
                    if hint is None:
                        return
                    batch.append(hint)
            except queue.Empty:
                pass
            self._take_until_stored(batch)
            self.engine.wake("convert")

    def _take_until_stored(self, batch: list[Hint]) -> None:
        """A database that cannot be reached loses no hint: the batch is taken again, with a growing pause."""
        delay = 1.0
        while True:
            try:
                self._take(batch)
                return
            except OperationalError as err:
                log.warning("intake waits: %s; trying again in %.0f s",
                            describe_failure(err, self.settings.database_url)[0], delay)
                self.ctx.pauses.database_failed(self.ctx.now())
                if self.stop_event.wait(delay):
                    return
                delay = min(delay * 2, 30.0)

    def _take(self, batch: list[Hint]) -> None:
        merged: dict[Path, Hint] = {}
        for hint in batch:
            previous = merged.get(hint.path)
            merged[hint.path] = Hint(hint.path, closed=hint.closed or bool(previous and previous.closed),
                                     rescan=hint.rescan or bool(previous and previous.rescan),
                                     moved_from=hint.moved_from or (previous.moved_from if previous else None),
                                     created=hint.created or bool(previous and previous.created))
        for hint in merged.values():
            now = self.ctx.now()
            if hint.rescan:
                intake.scan_and_observe(self.ctx.sessions, self.settings, now=now, folder=hint.path)
            else:
                intake.take(self.ctx.sessions, hint.path, self.settings, now=now, closed=hint.closed,
                            moved_from=hint.moved_from, created=hint.created)

    # -- periodic jobs -------------------------------------------------------------------------------

    def scan(self) -> None:
        """The catch-up scan: the folders are the truth; events are only hints."""
        try:
            found = intake.scan_and_observe(self.ctx.sessions, self.settings, now=self.ctx.now())
        except OperationalError as err:
            log.warning("the catch-up scan waits: %s", describe_failure(err, self.settings.database_url)[0])
            return
        if found:
            self.engine.wake("convert")

    def reconcile(self) -> None:
        """Compare the server's file list with the database (at start, every reconcile interval, and when the
        server says the storage is full). One node at a time runs it."""
        if self.ctx.client is None or self.ctx.pauses.paused(self.ctx.now()):
            return
        with session_scope(self.ctx.sessions) as session:
            if not (remote.worth_reconciling(session) or self.ctx.pauses.quota_problem):
                return
        try:
            self.engine.run_periodic("reconcile", lambda: remote.reconcile(self.ctx),
                                     interval_seconds=self.settings.gemini.reconcile_interval_seconds, force=True)
        except Exception as err:
            from daemon import policy

            decision = policy.decide(err, attempts=1, now=self.ctx.now())
            if decision.action in (policy.Action.WAIT_OFFLINE, policy.Action.WAIT_AUTH):
                self.ctx.pauses.pause_for(decision, self.ctx.now())
            log.warning("reconciliation with the server failed: %s", decision.error)

    def _stopped_for_long(self) -> None:
        """daemon.offline (reason "stopped") when this node's last heartbeat is long past: nothing was watched."""
        with session_scope(self.ctx.sessions) as session:
            last = nodes.last_heartbeat(session, self.ctx.node)
            if last is not None:
                notify.daemon_offline(session, self.ctx, since=last, reason="stopped",
                                      detail="the daemon was not running; recordings dropped meanwhile are taken now")

    def heartbeat(self) -> None:
        """This node's row says it is alive and what it waits for; in a fleet it also reads the database's clock.
        A database that does not answer pauses every API call until it does."""
        ctx = self.ctx
        try:
            self._measure_clock()
            waiting = ctx.pauses.describe(self.has_key)
            with session_scope(ctx.sessions) as session:
                if waiting:
                    backlog = queries.upload_backlog(session)
                    if backlog[0]:
                        waiting += f"; {backlog[0]} recording(s), {backlog[1] / 1e6:.1f} MB, waiting to upload"
                beat = nodes.Beat(waiting_for=waiting, offline_since=ctx.pauses.offline_since,
                                  folders=[str(watch.path) for watch in self.settings.watches],
                                  unavailable=[f"{path}: {why}" for path, why in self.unavailable.items()])
                nodes.heartbeat(session, ctx.node, self.run_id, beat, ctx.now())
                if ctx.pauses.offline_since is not None:  # once per outage, when it has lasted long enough
                    notify.daemon_offline(session, ctx, since=ctx.pauses.offline_since, reason="network",
                                          detail=waiting)
                counts = queries.recording_counts(session)
                used = queries.ours_bytes(session)
        except SQLAlchemyError as err:
            message, _ = describe_failure(err, self.settings.database_url)
            log.warning("heartbeat: %s", message)
            ctx.pauses.database_failed(ctx.now())
            systemd.notify(f"STATUS=waiting for the database: {message}")
            return
        if ctx.pauses.database_ok():
            self.wake(*self.engine.kinds)
        elif ctx.fleet and time.monotonic() >= self.next_fleet_look:
            # Other nodes queue work too, and their wake-ups do not reach this machine: look for it now and then.
            self.next_fleet_look = time.monotonic() + FLEET_LOOK_SECONDS
            self.wake(*(kind for kind in self.engine.kinds if kind not in FLEET_LOCAL_KINDS))
        systemd.notify("STATUS=" + status_line(counts, used, self.settings.gemini.storage_limit_bytes, waiting))

    def _measure_clock(self) -> None:
        if isinstance(self.ctx.clock, nodes.DatabaseClock):
            with session_scope(self.ctx.sessions) as session:
                skew = self.ctx.clock.measure(session)
            if abs(skew.total_seconds()) > CLOCK_SKEW_WARNING_SECONDS:
                log.warning("this node's clock is %.1f s off the database's; leases use the database's",
                            skew.total_seconds())


STATUS_ORDER = [state.value for state in S]
IN_PROGRESS = {"discovered", "converting", "converted", "uploading", "processing"}


def status_line(counts: dict[str, int], used: int, limit: int, waiting: str | None) -> str:
    """One line for `systemctl status`: '3 converting · 12 active · 4.1 of 21.5 GB used · offline since …'."""
    parts = [f"{counts[state]} {state}" for state in STATUS_ORDER if counts.get(state)]
    if not any(counts.get(state) for state in IN_PROGRESS):
        parts.insert(0, "idle")
    parts.append(f"{used / 1e9:.1f} of {limit / 1e9:.1f} GB used")
    if waiting:
        parts.append(waiting.split(";")[0])
    return " · ".join(parts)
