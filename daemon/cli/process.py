"""`audiodrop process FILE...`: the whole pipeline for the named files, now, without a daemon.

Each file becomes a recording in the daemon's own database and state_dir (so `files`, `show` and `prompts` list it
afterwards), and the daemon's own work engine runs it, restricted to these recordings and their prompts: the same
claims, leases and steps as the daemon's. This command follows them until each is done, failed, or waits for
something it cannot supply (a key, the network, storage); the daemon picks those up later. The daemon's lock on
state_dir is held throughout, so this never runs beside a daemon.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon import logs, nodes
from daemon.cli.views import prompt_json, recording_json
from daemon.clock import SystemClock
from daemon.config import Settings, find_api_key
from daemon.context import Context
from daemon.errors import DaemonError
from daemon.gemini import GeminiClient
from daemon.pipeline import intake, lifecycle
from daemon.prompts import queue as prompt_queue
from daemon.service import AlreadyRunning, acquire_lock, build_engine, ensure_instance_id, open_state
from db.models import Prompt, PromptRecording, Recording, SourceAlias
from db.session import is_fleet, make_sessionmaker, open_engine, session_scope
from db.states import PromptState as P
from db.states import RecordingState as S

log = logging.getLogger(__name__)

TICK_SECONDS = 0.2
LONGEST_WAIT_SECONDS = 90.0  # a prompt told to wait longer (rate limit, backoff) is left queued for the daemon
NO_KEY = ("no API key: the files are converted, and their uploads (and any prompts) wait for a key; set "
          "GEMINI_API_KEY (or gemini.api_key_file), then run this again or start the daemon, which uploads them")


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
    prompt_ids: list[int] = field(default_factory=list)
    queued: bool = False  # the command line's prompts were queued for it


class Pipeline:
    def __init__(self, settings: Settings, specs: list[tuple[str | None, str | None]], upload: bool,
                 report: Report) -> None:
        self.settings, self.specs, self.upload, self.report = settings, specs, upload, report
        self.recordings: set[int] = set()
        self.prompts: set[int] = set()
        self.stop = threading.Event()

    def run(self, args: list[str]) -> list[Item]:
        settings = self.settings
        os.umask(0o027)  # the daemon's private modes for everything written here
        try:
            settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            lock = acquire_lock(settings.lock_path)
        except AlreadyRunning:
            raise DaemonError(f"the daemon is running on {settings.state_dir}: drop the files into a watch folder, "
                              "or use `audiodrop ask`") from None
        except PermissionError as err:
            raise DaemonError(f"{err.filename}: {err.strerror}", "run this as the user the daemon runs as") from None
        try:
            database = open_state(settings)
            key, _source = find_api_key(settings)
            client = GeminiClient(key, settings.gemini) if key and self.upload else None
            self.no_key = self.upload and client is None
            fleet = is_fleet(settings.database_url)
            node = settings.service.node_name
            self.ctx = Context(settings=settings, sessions=make_sessionmaker(database), client=client,
                               clock=nodes.DatabaseClock() if fleet else SystemClock(), node=node, fleet=fleet,
                               holder=f"{node}/process-{os.getpid()}-{secrets.token_hex(4)}", wake=self.wake)
            if isinstance(self.ctx.clock, nodes.DatabaseClock):
                with session_scope(self.ctx.sessions) as session:
                    self.ctx.clock.measure(session)
            self.ctx.instance_id = ensure_instance_id(self.ctx)  # the daemon's display names: it knows our uploads
            unique: dict[str, str] = {}
            for arg in args:  # one item per file, however it is spelled
                unique.setdefault(os.path.abspath(arg), arg)
            items = [self.take(arg) for arg in unique.values()]
            self.engine = build_engine(self.ctx, only=self.recordings, prompts_only=self.prompts,
                                       upload=client is not None)
            self.engine.start()
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

    def wake(self, *kinds: str, at: Any = None) -> None:
        self.engine.wake(*kinds, at=at)

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
        with session_scope(self.ctx.sessions) as session:
            known = session.scalar(select(Recording.id).where(Recording.source_path == path, Recording.source_size
                                   == size, Recording.source_mtime_ns == mtime_ns).order_by(Recording.id.desc()))
            known = known or session.scalar(select(SourceAlias.recording_id).where(
                SourceAlias.path == path, SourceAlias.size == size, SourceAlias.mtime_ns == mtime_ns))
            if known is None:
                # A file inside a drop folder belongs to it, as if the daemon had found it: its prompts run too.
                watch = intake.watch_for(item.path, self.settings)
                known = lifecycle.discover(session, path=path, size=size, mtime_ns=mtime_ns, dev=info.st_dev,
                                           ino=info.st_ino, watch_root=str(watch.path) if watch else None,
                                           closed_after_write=True, now=self.ctx.now(), node=self.ctx.node,
                                           last_change_at=self.ctx.now() - intake.COMPLETE_AGO).id
            item.recording_id = known
            item.reused = session.get(Recording, known).state != S.DISCOVERED  # type: ignore[union-attr]
        self.recordings.add(known)
        return item

    def follow(self, items: list[Item]) -> None:
        while True:
            with session_scope(self.ctx.sessions) as session:
                for item in items:
                    if not item.done:
                        self.look(session, item)
                wanted = [pid for item in items for pid in item.prompt_ids]
                prompt_states = {p.id: (p.state.value, p.template or "prompt")
                                 for p in session.scalars(select(Prompt).where(Prompt.id.in_(wanted)))}
            self.engine.wake("convert", "upload", "prompt")
            self.report.update(items, prompt_states)
            if all(item.done for item in items) and not self.engine.busy():
                return
            self.stop.wait(TICK_SECONDS)

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
            lifecycle.retry(session, recording, now=self.ctx.now(), reason="retry requested by audiodrop process")
        elif state in (S.REJECTED, S.FAILED):
            item.done, item.error = True, recording.error or f"{item.path.name}: {state}"
        elif state in (S.CONVERTED, S.EXPIRED):
            self.waits_for_upload(session, item, recording)
        elif state == S.ACTIVE:
            self.prompt(session, item, recording)

    def waits_for_upload(self, session: Session, item: Item, recording: Recording) -> None:
        if self.no_key:
            item.done, item.note = True, NO_KEY
            return
        if not self.upload:
            item.done = True
            return
        waiting = self.ctx.pauses.describe(True)
        if waiting:
            item.done, item.note = True, f"uploads wait ({waiting}); run this again later, or start the daemon"
        elif recording.state == S.EXPIRED:
            self.prompt(session, item, recording)  # processed before: only its prompts may need it again

    def prompt(self, session: Session, item: Item, recording: Recording) -> None:
        now = self.ctx.now()
        if not item.queued:
            item.queued = True
            # The drop folder's prompts, queued at its conversion, run here as well; a template asked for on the
            # command line is not queued a second time.
            folder = session.scalars(select(Prompt).join(PromptRecording).where(
                PromptRecording.recording_id == recording.id, Prompt.state.in_((P.QUEUED, P.RUNNING)))).all()
            item.prompt_ids = [queued.id for queued in folder]
            templates = {queued.template for queued in folder}
            if self.ctx.client is not None:
                for template, text in self.specs:
                    if template is not None and template in templates:
                        continue
                    request = prompt_queue.request_for(self.settings, [recording.id], template=template,
                                                       prompt_text=text)
                    try:
                        item.prompt_ids.append(prompt_queue.enqueue(session, request, now=now,
                                                               reason="queued by audiodrop process").id)
                    except prompt_queue.QueueError as err:
                        item.error = f"{item.path.name}: {err}"
            self.prompts.update(item.prompt_ids)
        if self.ctx.client is None:  # uploaded earlier, but no key to prompt with now
            item.done = True
            if self.specs or item.prompt_ids:
                item.note = "no API key: prompts need one; set GEMINI_API_KEY (or gemini.api_key_file)"
            return
        item.done = True
        for prompt_id in item.prompt_ids:
            queued = session.get(Prompt, prompt_id)
            if queued is None or queued.state in (P.DONE, P.FAILED):
                continue
            wait = (queued.next_attempt_at - now).total_seconds() if queued.next_attempt_at else 0.0
            waiting = self.ctx.pauses.describe(True)
            if queued.state == P.QUEUED and queued.wait_kind != "files" and (waiting or wait > LONGEST_WAIT_SECONDS):
                item.note = f"a prompt stays queued for the daemon: {waiting or queued.waiting_for}"
                continue
            item.done = False


class Report:
    """Progress on stderr: rich bars on a terminal, a line per change otherwise, nothing with --json."""

    def __init__(self, mode: str, per_file: int) -> None:
        self.mode, self.per_file = mode, per_file
        self.seen: dict[Any, str] = {}
        if mode == "bars":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bars = Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=Console(stderr=True))
            self.tasks = [self.bars.add_task(name, total=None) for name in ("converting", "uploading", "prompts")]
            self.bars.start()

    def update(self, items: list[Item], prompt_states: dict[int, tuple[str, str]]) -> None:
        taken = [item for item in items if item.recording_id is not None]
        uploading = [i for i in taken if i.error is None and i.note is None]
        counts = [(len(taken), sum(i.done or i.seen_state not in ("discovered", "converting", None) for i in taken)),
                  (len(uploading), sum(i.seen_state == "active" for i in uploading)),
                  (len(taken) * self.per_file, sum(s in ("done", "failed") for s, _ in prompt_states.values()))]
        for task, (total, completed) in zip(self.tasks if self.mode == "bars" else [], counts, strict=False):
            self.bars.update(task, total=total, completed=completed)
        changes = [(i.arg, i.path.name, i.seen_state) for i in taken] + [
            (pid, f"{i.path.name}: {prompt_states[pid][1]}", prompt_states[pid][0])
            for i in taken for pid in i.prompt_ids if pid in prompt_states]
        for key, name, state in changes if self.mode == "lines" else []:
            if state and self.seen.get(key) != state:
                self.seen[key] = state
                click.echo(f"{name}: {state}", err=True)


def main(settings: Settings, args: list[str], *, templates: list[str], prompt_text: str | None, upload: bool,
         as_json: bool) -> int:
    """Run `audiodrop process`; returns the exit status: 1 if any file failed or a requested prompt has no result."""
    specs: list[tuple[str | None, str | None]] = [(name, None) for name in dict.fromkeys(templates)]
    specs += [(None, prompt_text)] if prompt_text else []
    if specs and not upload:
        raise click.UsageError("--no-upload converts only; it cannot be combined with --template or --prompt")
    for template, text in specs:
        try:
            prompt_queue.request_for(settings, [0], template=template, prompt_text=text)
        except prompt_queue.QueueError as err:
            raise click.UsageError(str(err)) from None
    logs.setup("DEBUG" if settings.log_level == "DEBUG" else "ERROR")  # the report says what happens
    report = Report("quiet" if as_json else "bars" if sys.stderr.isatty() else "lines", len(specs))
    try:
        items = Pipeline(settings, specs, upload, report).run(args)
    finally:
        if report.mode == "bars":
            report.bars.stop()
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
    if as_json:
        click.echo(json.dumps({"state_dir": str(settings.state_dir), "files": summary, "waiting_for": notes,
                               "failed": failed}, indent=2))
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
    return 1 if failed else 0
