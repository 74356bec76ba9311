"""The composition root: configuration -> database at head -> lock -> recovery -> watchers and jobs ->
READY -> wait for a signal -> orderly stop. No business rules live here."""

from __future__ import annotations

import errno
import faulthandler
import fcntl
import logging
import os
import queue
import secrets
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import IO

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import and_, or_, select

from daemon import conversion, intake, lifecycle, policy, prompts, remote, systemd, transcode, uploader
from daemon.config import Settings, find_api_key, load_settings
from daemon.context import Context
from daemon.errors import ConfigError, DaemonError
from daemon.gemini import GeminiClient
from daemon.lifecycle import RecordingState as S
from daemon.watcher import Hint, Watcher
from db import queries
from db.models import DaemonState, Recording
from db.session import make_engine, make_sessionmaker, session_scope, upgrade_to_head

log = logging.getLogger(__name__)

INTAKE_TICK_SECONDS = 0.25
FOLDER_CHECK_SECONDS = 5.0
SHUTDOWN_GRACE_SECONDS = 5.0
UPLOAD_TICK_SECONDS = 1.0
HEARTBEAT_SECONDS = 2.0


class AlreadyRunning(DaemonError):
    pass


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


class Daemon:
    def __init__(self, settings: Settings, config_path: str | None = None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.stop_event = threading.Event()
        self.reload_requested = threading.Event()
        self.unavailable: dict[Path, str] = {}
        self.hints: queue.Queue[Hint] = queue.Queue()
        self.scheduler = BackgroundScheduler(timezone=UTC, job_defaults={"coalesce": True, "max_instances": 1,
                                                                         "misfire_grace_time": 30})
        self.has_key = False

    # -- start and stop ------------------------------------------------------------------------------

    def run(self) -> None:
        settings = self.settings
        # Everything the daemon writes is private to its group: state 0750, files 0640 at most.
        os.umask(0o027)
        self._install_signal_handlers()
        for folder in (settings.state_dir, settings.results_dir, settings.converted_dir):
            folder.mkdir(parents=True, exist_ok=True, mode=0o750)
        lock = acquire_lock(settings.lock_path)
        try:
            upgrade_to_head(settings.database_path)
            engine = make_engine(settings.database_path)
            api_key, key_source = find_api_key(settings)
            self.has_key = api_key is not None
            client = GeminiClient(api_key, settings.gemini) if api_key else None
            self.ctx = Context(settings=settings, sessions=make_sessionmaker(engine), client=client)
            self.ctx.wake = self.wake
            if client is None:
                log.warning("no API key found (GEMINI_API_KEY, GOOGLE_API_KEY, gemini.api_key_file or the systemd "
                            "credential gemini-api-key): recordings are converted and wait for one")
            else:
                log.info("API key from %s", key_source)
            self.recover()
            self.ctx.instance_id = self.ensure_instance_id()
            self.conversions = ThreadPoolExecutor(max_workers=settings.conversion.workers,
                                                  thread_name_prefix="convert")
            self.converting: set[int] = set()
            self.converting_lock = threading.Lock()
            self.uploader = uploader.Uploader(self.ctx)
            self.prompt_runner = prompts.PromptRunner(self.ctx)
            self.watcher = Watcher(settings, self.hints)
            self.watcher.start()
            self._schedule_jobs()
            self.heartbeat()
            systemd.notify("READY=1")
            log.info("audiodrop is running (state in %s)", settings.state_dir)
            while not self.stop_event.wait(0.5):
                if self.reload_requested.is_set():
                    self.reload_requested.clear()
                    self.reload()
            self.shutdown()
            engine.dispose()
        finally:
            lock.close()

    def _schedule_jobs(self) -> None:
        add = self.scheduler.add_job
        now = datetime.now(UTC)
        add(self.intake_tick, "interval", seconds=INTAKE_TICK_SECONDS, id="intake")
        add(self.scan, "interval", seconds=self.settings.intake.scan_interval_seconds, id="scan", next_run_time=now)
        add(self.uploader.dispatch, "interval", seconds=UPLOAD_TICK_SECONDS, id="upload")
        add(uploader.poll_processing, "interval", args=[self.ctx], id="processing",
            seconds=self.settings.gemini.processing_poll_seconds)
        add(self.prompt_runner.dispatch, "interval", seconds=1, id="prompts")
        add(self.retry_due, "interval", seconds=5, id="retry")
        add(remote.sweep_expired, "interval", args=[self.ctx], seconds=30, id="expiry", next_run_time=now)
        if self.ctx.client is not None:
            add(self.reconcile, "interval", seconds=self.settings.gemini.reconcile_interval_seconds, id="reconcile",
                next_run_time=now)
        add(self.heartbeat, "interval", seconds=HEARTBEAT_SECONDS, id="heartbeat")
        add(self.check_folders, "interval", seconds=FOLDER_CHECK_SECONDS, id="folders")
        interval = systemd.watchdog_interval()
        if interval:
            add(self.watchdog_ping, "interval", seconds=interval, id="watchdog")
        self.scheduler.start()

    def wake(self, job_id: str) -> None:
        """Run a job now instead of at its next tick (a conversion finished, an upload slot freed)."""
        try:
            self.scheduler.modify_job(job_id, next_run_time=datetime.now(UTC))
        except Exception:  # the job is gone during shutdown
            pass

    def _install_signal_handlers(self) -> None:
        def stop(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            self.stop_event.set()

        def reload(_signum: int, _frame: FrameType | None) -> None:
            self.reload_requested.set()

        if threading.current_thread() is threading.main_thread():
            # `kill -USR1 PID` prints every thread's stack to the log: for diagnosing a stuck daemon.
            faulthandler.register(signal.SIGUSR1, all_threads=True)
            signal.signal(signal.SIGTERM, stop)
            signal.signal(signal.SIGINT, stop)
            signal.signal(signal.SIGHUP, reload)

    def reload(self) -> None:
        """SIGHUP: read the configuration again and apply what can change while running (drop folders,
        templates, limits and timings). The state and results folders need a restart."""
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
        self.watcher.stop()
        self.watcher = Watcher(new, self.hints)
        self.watcher.start()
        self.scheduler.reschedule_job("scan", trigger="interval", seconds=new.intake.scan_interval_seconds)
        self.wake("scan")
        log.info("configuration reloaded from %s", new.source or "the defaults")

    def check_folders(self) -> None:
        self.unavailable = self.watcher.check()

    def watchdog_ping(self) -> None:
        """WATCHDOG=1 only while the daemon is healthy: observers alive and the intake job running."""
        job = self.scheduler.get_job("intake")
        if self.watcher.alive() and job is not None:
            systemd.notify("WATCHDOG=1")
        else:
            log.error("a watcher or the intake job stopped; withholding the systemd watchdog ping")

    def shutdown(self) -> None:
        """Stop within seconds: work still in flight after a short grace period is abandoned safely. Its rows
        stay converting/uploading/running and resume at the next start; temporary files never reach a final name."""
        systemd.notify("STOPPING=1\nSTATUS=stopping")
        self.scheduler.shutdown(wait=False)
        self.watcher.stop()
        for pool in (self.conversions, self.uploader.pool, self.prompt_runner.pool):
            pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
        while time.monotonic() < deadline and self._busy_threads():
            time.sleep(0.1)
        with session_scope(self.ctx.sessions) as session:
            state = session.get(DaemonState, 1)
            if state is not None:
                state.stopped_at = self.ctx.now()
        busy = self._busy_threads()
        if busy:
            log.info("audiodrop stopped; abandoned %d task(s) in flight, they resume at the next start", len(busy))
            logging.shutdown()
            os._exit(0)  # worker threads cannot be interrupted; the next start picks their work up
        log.info("audiodrop stopped")

    @staticmethod
    def _busy_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith(("convert", "upload", "prompt"))
                and t.is_alive() and t is not threading.current_thread()]

    def ensure_instance_id(self) -> str:
        with session_scope(self.ctx.sessions) as session:
            state = session.get(DaemonState, 1)
            if state is None:
                state = DaemonState(id=1, started_at=self.ctx.now())
                session.add(state)
            if not state.instance_id:
                state.instance_id = secrets.token_hex(4)
            return state.instance_id

    def reconcile(self) -> None:
        """Compare the server's file list with the database (at start, every reconcile interval, and when the
        server says the storage is full)."""
        if self.ctx.waiting.paused(self.ctx.now()) and not self.ctx.waiting.quota_problem:
            return
        try:
            remote.reconcile(self.ctx, in_flight=self.uploader.busy())
        except Exception as err:
            decision = policy.decide(err, attempts=1, now=self.ctx.now())
            if decision.action in (policy.Action.WAIT_OFFLINE, policy.Action.WAIT_AUTH):
                self.ctx.waiting.note(decision, self.ctx.now())
            log.warning("reconciliation with the server failed: %s", decision.error)
            return
        self.ctx.waiting.clear_network_problems()
        self.ctx.waiting.storage_reconciled()
        self.wake("upload")

    def recover(self) -> None:
        """Work a previous run left half done goes back to where it resumes safely."""
        with session_scope(self.ctx.sessions) as session:
            stale = session.scalars(select(Recording.id).where(Recording.state == S.CONVERTING.value)).all()
            for recording_id in stale:
                lifecycle.advance(session, recording_id, expected=S.CONVERTING, to=S.DISCOVERED, now=self.ctx.now(),
                                  reason="the daemon stopped during conversion; converting again",
                                  closed_after_write=True)
        if stale:
            log.info("resuming %d conversion(s) interrupted by the last stop", len(stale))
        requeued = prompts.recover(self.ctx)
        if requeued:
            log.info("%d prompt(s) interrupted by the last stop are queued again", requeued)
        for leftover in transcode.remove_stale_partials(self.settings.converted_dir):
            log.info("removed %s, the unfinished output of an interrupted conversion", leftover.name)

    # -- jobs ----------------------------------------------------------------------------------------

    def intake_tick(self) -> None:
        """Take in watcher hints, then claim every settled file for conversion (up to the free workers)."""
        ctx = self.ctx
        seen: dict[Path, Hint] = {}
        while True:
            try:
                hint = self.hints.get_nowait()
            except queue.Empty:
                break
            previous = seen.get(hint.path)
            seen[hint.path] = Hint(hint.path, closed=hint.closed or bool(previous and previous.closed),
                                   rescan=hint.rescan or bool(previous and previous.rescan))
        if seen:
            with session_scope(ctx.sessions) as session:
                for hint in seen.values():
                    if hint.rescan:
                        for found in intake.scan_folder(hint.path, self.settings):
                            intake.observe(session, found, closed=False, now=ctx.now())
                        continue
                    found = intake.candidate(hint.path, self.settings)
                    if found is not None:
                        intake.observe(session, found, closed=hint.closed, now=ctx.now())
        self.claim_settled()

    def claim_settled(self) -> None:
        ctx = self.ctx
        with self.converting_lock:
            free = self.settings.conversion.workers - len(self.converting)
        if free <= 0:
            return
        claimed: list[int] = []
        now = ctx.now()
        rules = self.settings.intake
        # Only rows the database already sees as settled, a few at a time: files still being written are
        # followed by their events and the scan, and a large batch must not cost a full read every tick.
        settled = or_(and_(Recording.closed_after_write.is_(True),
                           Recording.last_change_at <= now - timedelta(seconds=rules.close_quiet_seconds)),
                      Recording.last_change_at <= now - timedelta(seconds=rules.settle_seconds))
        with session_scope(ctx.sessions) as session:
            pending = session.scalars(select(Recording).where(Recording.state == S.DISCOVERED.value, settled)
                                      .order_by(Recording.id).limit(free * 4)).all()
            for recording in pending:
                if len(claimed) >= free:
                    break
                found = intake.candidate(Path(recording.source_path), self.settings)
                if found is None:
                    if os.path.exists(recording.source_path):
                        continue
                    if recording.sha256 and recording.converted_path and os.path.exists(recording.converted_path):
                        # The original is gone but its compact copy is kept: convert from that (conversion.py).
                        if lifecycle.advance(session, recording.id, expected=S.DISCOVERED, to=S.CONVERTING,
                                             now=ctx.now(), reason="the original is gone; converting the kept copy"):
                            claimed.append(recording.id)
                        continue
                    if lifecycle.forget(session, recording.id):
                        log.info("%s: vanished before it was complete; forgotten", recording.source_path)
                    else:
                        lifecycle.advance(session, recording.id, expected=S.DISCOVERED, to=S.REJECTED,
                                          now=ctx.now(), reason="the source file is gone",
                                          error=f"{Path(recording.source_path).name}: the source file is gone, so "
                                                "it cannot be converted again; drop it again to retry")
                    continue
                intake.observe(session, found, closed=False, now=ctx.now())
                session.refresh(recording)
                if not intake.is_settled(closed_after_write=recording.closed_after_write,
                                         last_change_at=recording.last_change_at, now=ctx.now(),
                                         intake=self.settings.intake):
                    continue
                if intake.open_for_writing(found.path):
                    continue
                if lifecycle.advance(session, recording.id, expected=S.DISCOVERED, to=S.CONVERTING,
                                     now=ctx.now(), reason="the file is complete; converting"):
                    claimed.append(recording.id)
        for recording_id in claimed:
            with self.converting_lock:
                self.converting.add(recording_id)
            self.conversions.submit(self._convert, recording_id)

    def _convert(self, recording_id: int) -> None:
        try:
            conversion.convert_guarded(self.ctx, recording_id)
        finally:
            with self.converting_lock:
                self.converting.discard(recording_id)
            self.wake("intake")

    def scan(self) -> None:
        """The reconcile scan: the folders are the truth; events are only hints."""
        found = intake.scan(self.settings)
        with session_scope(self.ctx.sessions) as session:
            for item in found:
                intake.observe(session, item, closed=False, now=self.ctx.now())

    def retry_due(self) -> None:
        now = self.ctx.now()
        with session_scope(self.ctx.sessions) as session:
            due = session.scalars(select(Recording).where(Recording.state == S.FAILED.value,
                                                          Recording.next_attempt_at.is_not(None),
                                                          Recording.next_attempt_at <= now)).all()
            for recording in due:
                lifecycle.retry(session, recording, now=now, reason=f"automatic retry (attempt {recording.attempts + 1})")

    def heartbeat(self) -> None:
        ctx = self.ctx
        waiting = ctx.waiting.describe(self.has_key)
        with session_scope(ctx.sessions) as session:
            if waiting:
                backlog = queries.upload_backlog(session)
                if backlog[0]:
                    waiting += f"; {backlog[0]} recording(s), {backlog[1] / 1e6:.1f} MB, waiting to upload"
            state = session.get(DaemonState, 1)
            if state is None:
                state = DaemonState(id=1, started_at=ctx.now())
                session.add(state)
            if state.pid != os.getpid():
                state.started_at = ctx.now()
            state.pid = os.getpid()
            state.hostname = socket.gethostname()
            state.heartbeat_at = ctx.now()
            state.stopped_at = None
            state.waiting_for = waiting
            state.unavailable_folders = "\n".join(f"{path}: {why}" for path, why in self.unavailable.items()) or None
            state.offline_since = ctx.waiting.offline_since
            counts = queries.recording_counts(session)
            used = queries.storage_used(session)
        systemd.notify("STATUS=" + status_line(counts, used, self.settings.gemini.storage_limit_bytes, waiting))


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
