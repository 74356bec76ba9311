"""`audiodrop process FILE...`: the whole pipeline for the named files, now, with or without the daemon.

Each file becomes a recording in the daemon's own database and state_dir, inserted as the daemon inserts what it
finds (through daemon.pipeline.lifecycle, with this node's name, as a complete file; a file inside a drop folder
keeps its folder and gets its prompts), so `files`, `show` and `prompts` list it afterwards. Who does the work:

- The daemon, when it runs on this state_dir (it holds the lock and answers on its wake-up socket): the files are
  handed to it, it is poked, and this command only follows the database until every file's prompts are done or
  failed. Ctrl-C stops following; the work stays with the daemon.
- This command, when no daemon runs: it takes the daemon's lock and runs the daemon's own work engine, restricted
  to these recordings and their prompts (the same claims, leases and steps).

Either way a file is followed until it is done, failed, or waits for something this command cannot supply (a
key, the network, storage); the daemon picks those up later. The prompts asked for are queued once a recording
has its identity (its content hash, taken at conversion): a file that turns out to hold audio already known is
merged into that recording then, and a prompt queued on it before would lose its recording.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from daemon import logs, nodes, wakeup
from daemon.cli import lock_holder
from daemon.cli.progress import Report, Row
from daemon.cli.views import prompt_json, recording_json
from daemon.clock import Clock, SystemClock
from daemon.config import Settings, find_api_key
from daemon.context import Context
from daemon.errors import AlreadyRunning, DaemonError, QueueError
from daemon.gemini import GeminiClient
from daemon.pipeline import intake, lifecycle, transcode
from daemon.prompts import queue as prompt_queue
from daemon.service import acquire_lock, build_engine, ensure_instance_id, open_state
from db.models import Node, Prompt, PromptRecording, Recording, SourceAlias
from db.session import is_fleet, make_sessionmaker, open_engine, session_scope
from db.states import PromptState as P
from db.states import RecordingState as S

log = logging.getLogger(__name__)

TICK_SECONDS = 0.2
LONGEST_WAIT_SECONDS = 90.0  # a prompt told to wait longer (rate limit, backoff) is left queued for the daemon
DAEMON_START_SECONDS = 15.0  # how long a daemon that holds the lock may take to answer on its socket
INTERRUPTED = 130  # the shell's status for a command ended by Ctrl-C
NO_KEY = ("no API key: the files are converted, and their uploads (and any prompts) wait for a key; set "
          "GEMINI_API_KEY (or gemini.api_key_file), then run this again or start the daemon, which uploads them")
Spec = tuple[str | None, str | None]  # (template, own prompt text): one of them


@dataclass
class Item:
    """One FILE argument and what became of it."""

    arg: str
    path: Path
    recording_id: int | None = None
    error: str | None = None  # why it failed, in the daemon's words where the daemon has them
    note: str | None = None  # what it waits for (a key, the network), when it stopped short without failing
    reused: bool = False  # processed before: the same file, or the same content under another name
    done: bool = False
    retried: bool = False
    seen_state: str | None = None  # the recording's state when last looked at
    duration: float | None = None  # probed before conversion, for the progress bars
    prompt_ids: list[int] = field(default_factory=list)
    queued: bool = False  # the command line's prompts were queued for it


class Follower:
    """Takes the files in and follows them until each is done, failed or waits for something this command cannot
    supply. Who does the work (this process's engine, or the daemon) is the subclass's business."""

    handled_by = ""
    sessions: sessionmaker[Session]
    clock: Clock
    node: str

    def __init__(self, settings: Settings, specs: list[Spec], upload: bool, report: Report) -> None:
        self.settings, self.specs, self.upload, self.report = settings, specs, upload, report
        self.recordings: set[int] = set()
        self.prompts: set[int] = set()
        self.stop = threading.Event()  # set by Ctrl-C while the daemon does the work
        self.interrupted = False
        self.gone: str | None = None  # why following ended before the work did (the daemon stopped)
        self.wakes: set[str] = set()  # kinds of work to wake once the transaction that made them is committed

    # -- what a subclass supplies ------------------------------------------------------------------------

    def send_wakes(self, kinds: set[str]) -> None:
        raise NotImplementedError

    def upload_wait(self, session: Session, recording: Recording) -> str | None:
        """Why this recording's upload will not start while we follow ("" when it just is not ours to upload)."""
        raise NotImplementedError

    def api_wait(self, session: Session) -> str | None:
        """What API calls wait for right now (the network, a key), if anything."""
        raise NotImplementedError

    def can_prompt(self) -> bool:
        return True

    def queue_now(self, session: Session, recording: Recording) -> bool:
        """Whether the command line's prompts may be queued for this recording now."""
        raise NotImplementedError

    def idle(self) -> bool:
        """Nothing of ours is still in flight."""
        return True

    def tick(self) -> None:
        """Called between looks."""

    # -- taking the files in -----------------------------------------------------------------------------

    def now(self) -> datetime:
        return self.clock.now()

    def take_all(self, args: list[str]) -> list[Item]:
        unique: dict[str, str] = {}
        for arg in args:  # one item per file, however it is spelled
            unique.setdefault(os.path.abspath(arg), arg)
        items = [self.take(arg) for arg in unique.values()]
        self.wake("convert")
        self.flush_wakes()
        return items

    def take(self, arg: str) -> Item:
        item = Item(arg, Path(os.path.abspath(arg)))
        try:
            info = os.stat(item.path)
            if not stat.S_ISREG(info.st_mode):
                item.error = f"{item.path.name}: not a regular file; name the recordings themselves"
        except FileNotFoundError:
            item.error = f"{arg}: no such file"
        except OSError as err:
            item.error = f"{item.path.name}: cannot be read ({err})"
        if item.error:
            item.done = True
            return item
        path, size, mtime_ns = str(item.path), info.st_size, info.st_mtime_ns
        with session_scope(self.sessions) as session:
            known = session.scalar(select(Recording.id).where(Recording.source_path == path, Recording.source_size
                                   == size, Recording.source_mtime_ns == mtime_ns).order_by(Recording.id.desc()))
            known = known or session.scalar(select(SourceAlias.recording_id).where(
                SourceAlias.path == path, SourceAlias.size == size, SourceAlias.mtime_ns == mtime_ns))
            if known is None:
                # A file inside a drop folder belongs to it, as if the daemon had found it: its prompts run too.
                watch = intake.watch_for(item.path, self.settings)
                known = lifecycle.discover(session, path=path, size=size, mtime_ns=mtime_ns, dev=info.st_dev,
                                           ino=info.st_ino, watch_root=str(watch.path) if watch else None,
                                           closed_after_write=True, now=self.now(), node=self.node,
                                           last_change_at=self.now() - intake.COMPLETE_AGO,
                                           reason=f"found {path} (given to audiodrop process)").id
            recording = session.get(Recording, known)
            assert recording is not None
            item.recording_id, item.reused = known, recording.state != S.DISCOVERED
            item.duration = recording.duration_seconds
        self.recordings.add(known)
        return item

    def probe(self, items: list[Item]) -> None:
        """The length of each file not converted yet, for the progress bars (ffprobe; unknown if it fails)."""
        for item in items:
            if item.duration is None and not item.done and not self.stop.is_set():
                try:
                    item.duration = transcode.probe(item.path, ffprobe=self.settings.conversion.ffprobe,
                                                    timeout=10).duration_seconds
                except Exception:  # not audio, unreadable: the conversion says why
                    item.duration = None

    # -- following -------------------------------------------------------------------------------------------

    def wake(self, *kinds: str) -> None:
        self.wakes.update(kinds)

    def flush_wakes(self) -> None:
        if self.wakes:
            kinds, self.wakes = self.wakes, set()
            self.send_wakes(kinds)

    def follow(self, items: list[Item]) -> None:
        while True:
            with session_scope(self.sessions) as session:
                for item in items:
                    if not item.done:
                        self.look(session, item)
                rows = self.rows(session, items)
            self.flush_wakes()
            self.report.update(rows)
            if self.gone or all(item.done for item in items) and self.idle():
                return
            if self.stop.wait(TICK_SECONDS):
                self.interrupted = True
                return
            self.tick()

    def rows(self, session: Session, items: list[Item]) -> list[Row]:
        rows = []
        for item in items:
            recording = session.get(Recording, item.recording_id) if item.recording_id else None
            prompts = [(p.id, p.template or "prompt", p.state.value) for p in
                       session.scalars(select(Prompt).where(Prompt.id.in_(item.prompt_ids)).order_by(Prompt.id))]
            rows.append(Row(
                key=item.arg, name=item.path.name, state=item.seen_state,
                duration=(recording.duration_seconds if recording else None) or item.duration,
                progress_seconds=recording.progress_seconds if recording else None,
                converted_bytes=recording.converted_bytes if recording else None,
                progress_bytes=recording.progress_bytes if recording else None,
                uploads=self.upload and item.error is None and item.note is None, prompts=prompts,
                expected_prompts=0 if item.queued or item.recording_id is None else len(self.specs)))
        return rows

    def look(self, session: Session, item: Item) -> None:
        """Look at one file's recording: done, failed, waiting for something this command cannot supply, or
        still moving (the engine moves it)."""
        recording = session.get(Recording, item.recording_id)
        if recording is None:  # merged into a recording with the same content: follow it there
            item.recording_id = session.scalar(select(SourceAlias.recording_id).where(
                SourceAlias.path == str(item.path)).order_by(SourceAlias.id.desc()))
            item.reused, item.done = True, item.recording_id is None
            item.error = None if item.recording_id else f"{item.path.name}: the file vanished before it was converted"
            if item.recording_id is not None:
                self.recordings.add(item.recording_id)
            return
        item.seen_state = state = recording.state.value
        if state == S.FAILED and item.reused and not item.retried:
            item.retried = True  # a passing problem of an earlier run: one more attempt now
            lifecycle.retry(session, recording, now=self.now(), reason="retry requested by audiodrop process")
            self.wake("convert", "upload")
            return
        if state in (S.REJECTED, S.FAILED):
            item.done, item.error = True, recording.error or f"{item.path.name}: {state}"
            return
        if state not in (S.DISCOVERED, S.CONVERTING) and not item.queued and self.queue_now(session, recording):
            self.queue_prompts(session, item, recording)
        if state in (S.CONVERTED, S.EXPIRED):
            self.waits_for_upload(session, item, recording)
        elif state == S.ACTIVE:
            self.prompt(session, item)

    def waits_for_upload(self, session: Session, item: Item, recording: Recording) -> None:
        waiting = self.upload_wait(session, recording)
        if waiting is not None:
            item.done, item.note = True, waiting or None
        elif recording.state == S.EXPIRED:
            self.prompt(session, item)  # processed before: only its prompts may need it again

    def queue_prompts(self, session: Session, item: Item, recording: Recording) -> None:
        """The command line's prompts, once; the drop folder's, queued at its conversion, are followed as well,
        and a template asked for on the command line is not queued a second time."""
        item.queued = True
        folder = session.scalars(select(Prompt).join(PromptRecording).where(
            PromptRecording.recording_id == recording.id, Prompt.state.in_((P.QUEUED, P.RUNNING)))).all()
        item.prompt_ids = [queued.id for queued in folder]
        templates = {queued.template for queued in folder}
        if self.can_prompt():
            for template, text in self.specs:
                if template is not None and template in templates:
                    continue
                request = prompt_queue.request_for(self.settings, [recording.id], template=template,
                                                   prompt_text=text)
                try:
                    item.prompt_ids.append(prompt_queue.enqueue(session, request, now=self.now(),
                                                                reason="queued by audiodrop process").id)
                except QueueError as err:
                    item.error = f"{item.path.name}: {err}"
        self.prompts.update(item.prompt_ids)
        if item.prompt_ids:
            self.wake("prompt", "upload")

    def prompt(self, session: Session, item: Item) -> None:
        if not item.queued:
            return
        if not self.can_prompt():  # uploaded earlier, but no key to prompt with now
            item.done = True
            if self.specs or item.prompt_ids:
                item.note = "no API key: prompts need one; set GEMINI_API_KEY (or gemini.api_key_file)"
            return
        now = self.now()
        item.done = True
        for prompt_id in item.prompt_ids:
            queued = session.get(Prompt, prompt_id)
            # Done means answered and its files written (or known to be unwritable: file_error says why).
            if queued is None or queued.state == P.FAILED or queued.state == P.DONE and (
                    queued.result_path or queued.file_error):
                continue
            wait = (queued.next_attempt_at - now).total_seconds() if queued.next_attempt_at else 0.0
            waiting = self.api_wait(session)
            if queued.state == P.QUEUED and queued.wait_kind != "files" and (waiting or wait > LONGEST_WAIT_SECONDS):
                item.note = f"a prompt stays queued for the daemon: {waiting or queued.waiting_for}"
                continue
            item.done = False


class OwnEngine(Follower):
    """No daemon runs: this process holds the daemon's lock and runs its work engine for these files only."""

    handled_by = "process"

    def run(self, args: list[str], lock: Any) -> list[Item]:
        settings = self.settings
        try:
            database = open_state(settings)
            key, _source = find_api_key(settings)
            client = GeminiClient(key, settings.gemini) if key and self.upload else None
            self.no_key = self.upload and client is None
            fleet = is_fleet(settings.database_url)
            self.node = node = settings.service.node_name
            self.sessions = make_sessionmaker(database)
            self.clock = nodes.DatabaseClock() if fleet else SystemClock()
            self.ctx = Context(settings=settings, sessions=self.sessions, client=client, clock=self.clock,
                               node=node, fleet=fleet, holder=f"{node}/process-{os.getpid()}-{secrets.token_hex(4)}",
                               wake=self._engine_wake)
            if isinstance(self.clock, nodes.DatabaseClock):
                with session_scope(self.sessions) as session:
                    self.clock.measure(session)
            self.ctx.instance_id = ensure_instance_id(self.ctx)  # the daemon's display names: it knows our uploads
            self.engine = build_engine(self.ctx, only=self.recordings, prompts_only=self.prompts,
                                       upload=client is not None)
            items = self.take_all(args)
            self.engine.start()
            self.probe(items)
            interrupted = True
            try:
                self.follow(items)
                interrupted = False
            finally:
                # Interrupted: what is in flight is abandoned; its claims are taken back at the next start.
                self.engine.stop(0.0 if interrupted else 5.0)
                database.dispose()
            return items
        finally:
            lock.close()

    def _engine_wake(self, *kinds: str, at: Any = None) -> None:
        self.engine.wake(*kinds, at=at)

    def send_wakes(self, kinds: set[str]) -> None:
        if hasattr(self, "engine"):
            self.engine.wake(*kinds)

    def tick(self) -> None:
        self.engine.wake("convert", "upload", "prompt")

    def idle(self) -> bool:
        return not self.engine.busy()

    def can_prompt(self) -> bool:
        return self.ctx.client is not None

    def queue_now(self, session: Session, recording: Recording) -> bool:
        return recording.state in (S.ACTIVE, S.EXPIRED) and not (recording.state == S.EXPIRED and self.upload_wait(
            session, recording))

    def upload_wait(self, session: Session, recording: Recording) -> str | None:
        if self.no_key:
            return NO_KEY
        if not self.upload:
            return ""
        waiting = self.ctx.pauses.describe(True)
        return f"uploads wait ({waiting}); run this again later, or start the daemon" if waiting else None

    def api_wait(self, session: Session) -> str | None:
        return self.ctx.pauses.describe(True)


class HandOff(Follower):
    """The daemon runs: it does the work; this process inserts the files, queues their prompts, pokes the daemon
    and follows the database. Ctrl-C ends the following only."""

    handled_by = "daemon"

    def __init__(self, settings: Settings, specs: list[Spec], upload: bool, report: Report, pid: int) -> None:
        super().__init__(settings, specs, upload, report)
        self.pid = pid
        self.checked_at = time.monotonic()

    def run(self, args: list[str]) -> list[Item]:
        settings = self.settings
        database = open_engine(settings.database_path, settings.database_url)
        self.sessions = make_sessionmaker(database)
        self.node = settings.service.node_name
        self.clock = nodes.DatabaseClock() if is_fleet(settings.database_url) else SystemClock()
        if isinstance(self.clock, nodes.DatabaseClock):
            with session_scope(self.sessions) as session:
                self.clock.measure(session)
        self.report.say(f"audiodrop: the daemon (pid {self.pid}) runs on {settings.state_dir}: the files are handed "
                        "to it; following them (Ctrl-C stops following, the daemon goes on)")
        previous = signal.getsignal(signal.SIGINT)
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread:  # Ctrl-C ends the following between two looks, never inside a transaction
            signal.signal(signal.SIGINT, lambda _signum, _frame: self.stop.set())
        try:
            items = self.take_all(args)
            self.probe(items)
            self.follow(items)
            return items
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, previous)
            database.dispose()

    def send_wakes(self, kinds: set[str]) -> None:
        wakeup.poke(self.settings.state_dir, *sorted(kinds))

    def tick(self) -> None:
        if time.monotonic() - self.checked_at < 1.0:
            return
        self.checked_at = time.monotonic()
        if lock_holder(self.settings) != self.pid:
            self.gone = (f"the daemon (pid {self.pid}) stopped before the work was done; it goes on when the daemon "
                         "starts again (`audiodrop files` and `audiodrop prompts` show how far it is)")

    def queue_now(self, session: Session, recording: Recording) -> bool:
        """Converted (its content identity is known) and, in a drop folder with prompts, once the conversion has
        queued the folder's: they are queued only for a recording that has no prompt yet."""
        watch = next((w for w in self.settings.watches if str(w.path) == recording.watch_root), None)
        if recording.state != S.CONVERTED or watch is None or not watch.prompts:
            return True
        return session.scalar(select(PromptRecording.prompt_id).where(
            PromptRecording.recording_id == recording.id).limit(1)) is not None

    def upload_wait(self, session: Session, recording: Recording) -> str | None:
        """What the daemon said it waits for in a heartbeat written after this recording came to rest (a key,
        the network, room): its upload will not start while we follow."""
        node = session.get(Node, self.node)
        if node is None or not node.waiting_for or node.heartbeat_at is None \
                or node.heartbeat_at <= recording.state_changed_at:
            return None
        return f"the daemon waits: {node.waiting_for}; it uploads the files when it can"

    def api_wait(self, session: Session) -> str | None:
        """What the daemon's API calls wait for (no key, offline, a refused key); waiting for storage holds up
        uploads only."""
        node = session.get(Node, self.node)
        waiting = node.waiting_for if node is not None else None
        return None if waiting is None or waiting.startswith("waiting for storage") else waiting


def running_daemon(settings: Settings) -> int | None:
    """The pid of the daemon running on this state_dir, or None when the lock is free. A daemon holds the lock and
    answers on its wake-up socket; one that is starting is waited for a little; a lock held by anything else (an
    `audiodrop process` run) is refused."""
    deadline = time.monotonic() + DAEMON_START_SECONDS
    while True:
        holder = lock_holder(settings)
        if holder is None:
            return None
        if wakeup.poke(settings.state_dir, "convert"):
            return holder
        if time.monotonic() > deadline:
            raise DaemonError(f"{settings.state_dir} is in use by pid {holder} (another `audiodrop process`, or a "
                              "daemon that does not answer on its wake-up socket)", "wait for it to finish")
        time.sleep(0.2)


def run_files(settings: Settings, specs: list[Spec], upload: bool, report: Report,
              args: list[str]) -> tuple[Follower, list[Item]]:
    """Hand the files to the running daemon, or run the work here under the daemon's lock."""
    os.umask(0o027)  # the daemon's private modes for everything written here
    while True:
        try:
            settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            lock = acquire_lock(settings.lock_path)
        except AlreadyRunning:
            pid = running_daemon(settings)
            if pid is None:
                continue  # it stopped meanwhile: the lock is ours to take
            if not upload:
                raise DaemonError(f"the daemon is running on {settings.state_dir} and uploads what it converts",
                                  "--no-upload works only while it is stopped") from None
            handoff = HandOff(settings, specs, upload, report, pid)
            return handoff, handoff.run(args)
        except PermissionError as err:
            raise DaemonError(f"{err.filename}: {err.strerror}", "run this as the user the daemon runs as") from None
        own = OwnEngine(settings, specs, upload, report)
        return own, own.run(args, lock)


def main(settings: Settings, args: list[str], *, templates: list[str], prompt_text: str | None, upload: bool,
         as_json: bool) -> int:
    """Run `audiodrop process`; returns the exit status: 1 if any file failed or a requested prompt has no result,
    130 when Ctrl-C ended the following (the daemon goes on)."""
    specs: list[Spec] = [(name, None) for name in dict.fromkeys(templates)]
    specs += [(None, prompt_text)] if prompt_text else []
    if specs and not upload:
        raise click.UsageError("--no-upload converts only; it cannot be combined with --template or --prompt")
    for template, text in specs:
        try:
            prompt_queue.request_for(settings, [0], template=template, prompt_text=text)
        except QueueError as err:
            raise click.UsageError(str(err)) from None
    logs.setup("DEBUG" if settings.log_level == "DEBUG" else "ERROR")  # the report says what happens
    report = Report("quiet" if as_json else "bars" if sys.stderr.isatty() else "lines")
    try:
        follower, items = run_files(settings, specs, upload, report, args)
    finally:
        report.stop()
    return summarize(settings, follower, items, specs, as_json)


def summarize(settings: Settings, follower: Follower, items: list[Item], specs: list[Spec], as_json: bool) -> int:
    """Print the outcome of every file (JSON with --json) and return the exit status."""
    engine = open_engine(settings.database_path, settings.database_url, readonly=True)
    summary, failed = [], 0
    with session_scope(make_sessionmaker(engine)) as session:
        for item in items:
            recording = session.get(Recording, item.recording_id) if item.recording_id else None
            ran = [prompt_json(p) for p in (session.get(Prompt, i) for i in item.prompt_ids) if p is not None]
            summary.append({**(recording_json(recording) if recording else {"id": None, "state": None}),
                            "path": item.arg, "error": item.error, "note": item.note, "reused": item.reused,
                            "prompts": ran})
            failed += bool(item.error or specs and (not ran or any(p["state"] != "done" for p in ran)))
    engine.dispose()
    notes = list(dict.fromkeys(item.note for item in items if item.note))
    if follower.gone:
        notes.append(follower.gone)
    if as_json:
        click.echo(json.dumps({"state_dir": str(settings.state_dir), "handled_by": follower.handled_by,
                               "interrupted": follower.interrupted, "files": summary, "waiting_for": notes,
                               "failed": failed}, indent=2))
    if follower.interrupted:
        left = sum(not item.done for item in items)
        click.echo(f"audiodrop: stopped following; the daemon goes on with {left} file(s) "
                   "(`audiodrop files` and `audiodrop prompts` show how far they are)", err=True)
        for item in items:
            if not item.done and not item.queued and specs and item.recording_id is not None:
                asked = " ".join(f"--template {t}" if t else "--prompt ..." for t, _ in specs)
                click.echo(f"audiodrop: {item.path.name} is not converted yet, so the prompts asked for are not "
                           f"queued: once it is, run `audiodrop ask {item.recording_id} {asked}`", err=True)
        return INTERRUPTED
    for entry in summary:  # results on stdout (unless --json), problems on stderr
        if entry["error"]:
            click.echo(f"audiodrop: {entry['error']}", err=True)
        elif not as_json:
            reused = " (processed before)" if entry["reused"] else ""
            click.echo(f"{entry['path']}: recording {entry['id']} {entry['state']}{reused}")
        for ran in entry["prompts"]:
            label = ran["template"] or "prompt"
            if ran["state"] != "done":
                click.echo(f"audiodrop: {Path(entry['path']).name}: {label} {ran['state']}: "
                           f"{ran['error'] or ran['waiting_for'] or ''}", err=True)
            elif not as_json:
                click.echo(f"  {label}: {ran['result_path']}")
    for note in notes:
        click.echo(f"audiodrop: {note}", err=True)
    return 1 if failed or follower.gone else 0
