"""`audiodrop process FILE...`: the whole pipeline for the named files, now, without a daemon.

Each file becomes a recording in the daemon's own database and state_dir (so `files`, `show` and `prompts` list it
afterwards) and goes through the daemon's own steps: conversion.convert_recording (which also merges a file whose
content is already known), uploader.upload_recording and poll_processing until ACTIVE, then prompts.enqueue and
run_prompt for each requested template or prompt text. A driver loop moves every file one step at a time until it
is done, failed, or waits for something this command cannot supply (a key, the network, storage); the daemon picks
those up later. The daemon's lock on state_dir is held throughout, so this never runs beside a daemon.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon import conversion, intake, lifecycle, logs, prompts, remote, uploader
from daemon.cli import prompt_json, recording_json
from daemon.config import Settings, find_api_key
from daemon.context import Context
from daemon.errors import DaemonError
from daemon.gemini import GeminiClient, display_name_for
from daemon.lifecycle import RecordingState as S
from daemon.prompts import PromptState as P
from daemon.service import AlreadyRunning, Daemon, acquire_lock
from db.models import Prompt, PromptRecording, Recording, SourceAlias
from db.session import make_engine, make_sessionmaker, session_scope, upgrade_to_head

log = logging.getLogger(__name__)

TICK_SECONDS = 0.2
LONGEST_WAIT_SECONDS = 90.0  # a prompt told to wait longer (rate limit, backoff) is left queued for the daemon
MAX_CLAIMS = 3  # conversions of a file that keeps changing, resumed uploads: then the daemon takes over
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
    seen_state: str | None = None  # the recording's state when last looked at
    prompt_ids: list[int] = field(default_factory=list)


class Pipeline:
    def __init__(self, settings: Settings, specs: list[tuple[str | None, str | None]], upload: bool,
                 report: Report) -> None:
        self.settings, self.specs, self.upload, self.report = settings, specs, upload, report
        self.futures: dict[tuple[str, int], Future[Any]] = {}
        self.prompt_ids: dict[int, list[int]] = {}
        self.claims: Counter[tuple[str, int]] = Counter()

    def run(self, args: list[str]) -> list[Item]:
        settings = self.settings
        os.umask(0o027)  # the daemon's private modes for everything written here
        try:
            for folder in (settings.state_dir, settings.results_dir, settings.converted_dir):
                folder.mkdir(parents=True, exist_ok=True, mode=0o750)
            lock = acquire_lock(settings.lock_path)
        except AlreadyRunning:
            raise DaemonError(f"the daemon is running on {settings.state_dir}: drop the files into a watch folder, "
                              "or use `audiodrop ask`") from None
        except PermissionError as err:
            raise DaemonError(f"{err.filename}: {err.strerror}", "run this as the user the daemon runs as") from None
        try:
            upgrade_to_head(settings.database_path)
            engine = make_engine(settings.database_path)
            key, _source = find_api_key(settings)
            client = GeminiClient(key, settings.gemini) if key and self.upload else None
            self.no_key = self.upload and client is None
            self.ctx = Context(settings=settings, sessions=make_sessionmaker(engine), client=client)
            daemon = Daemon(settings)
            daemon.ctx = self.ctx
            daemon.recover()  # we hold the lock: what a stopped daemon left half done resumes safely
            self.ctx.instance_id = daemon.ensure_instance_id()  # the daemon's display names: it knows our uploads
            remote.sweep_expired(self.ctx)
            self.converter = ThreadPoolExecutor(settings.conversion.workers, thread_name_prefix="convert")
            self.uploader, self.runner = uploader.Uploader(self.ctx), prompts.PromptRunner(self.ctx)
            unique: dict[str, str] = {}
            for arg in args:  # one item per file, however it is spelled
                unique.setdefault(os.path.abspath(arg), arg)
            try:
                items = [self.take(arg) for arg in unique.values()]
                self.drive(items)
            finally:
                for pool in (self.converter, self.uploader.pool, self.runner.pool):
                    pool.shutdown(wait=True, cancel_futures=True)  # interrupted: the next start resumes the rest
                engine.dispose()
            return items
        finally:
            lock.close()

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
                known = lifecycle.discover(session, path=path, size=size, mtime_ns=mtime_ns,
                                           watch_root=str(watch.path) if watch else None,
                                           closed_after_write=True, now=self.ctx.now()).id
            item.recording_id = known
            item.reused = session.get(Recording, known).state != S.DISCOVERED.value  # type: ignore[union-attr]
        return item

    def drive(self, items: list[Item]) -> None:
        next_poll = 0.0
        while True:
            busy = {key for key, future in self.futures.items() if not future.done()}
            work: list[tuple[tuple[str, int], ThreadPoolExecutor, Any, tuple[Any, ...]]] = []
            with session_scope(self.ctx.sessions) as session:
                for item in items:
                    if not item.done and ("recording", item.recording_id) not in busy:
                        self.step(session, item, busy, work)
                wanted = [pid for ids in self.prompt_ids.values() for pid in ids]
                prompt_states = {p.id: (p.state, p.template or "prompt")
                                 for p in session.scalars(select(Prompt).where(Prompt.id.in_(wanted)))}
            for key, pool, function, args in work:  # submitted once the claims are committed
                self.futures[key] = pool.submit(function, *args)
            if any(item.seen_state == S.PROCESSING.value for item in items) and time.monotonic() >= next_poll:
                uploader.poll_processing(self.ctx)
                next_poll = time.monotonic() + self.settings.gemini.processing_poll_seconds
            self.report.update(items, prompt_states)
            if all(item.done for item in items) and not busy and not work:
                return
            time.sleep(TICK_SECONDS)

    def step(self, session: Session, item: Item, busy: set[tuple[str, int]], work: list[Any]) -> None:
        """Move one file one step on: claim its next piece of work, or notice that it has finished."""
        ctx, now, name = self.ctx, self.ctx.now(), item.path.name
        recording = session.get(Recording, item.recording_id)
        if recording is None:  # merged into a recording with the same content: follow it there next time
            item.recording_id = session.scalar(select(SourceAlias.recording_id).where(
                SourceAlias.path == str(item.path)).order_by(SourceAlias.id.desc()))
            item.reused, item.done = True, item.recording_id is None
            item.error = None if item.recording_id else f"{name}: the file vanished before it was converted"
            return
        item.seen_state = state = recording.state
        rid = recording.id
        if state in (S.DISCOVERED.value, S.UPLOADING.value) and self.claims[(state, rid)] >= MAX_CLAIMS:
            item.done, item.note = True, f"{name}: still {state} (it keeps changing, or the upload was cut off)" \
                                         "; the daemon finishes it"
        elif state == S.DISCOVERED.value:  # new, or sent back by a change or a format refused by the API
            self.claims[(state, rid)] += 1
            if lifecycle.advance(session, rid, expected=S.DISCOVERED, to=S.CONVERTING, now=now,
                                 reason="converting now (audiodrop process)"):
                work.append((("recording", rid), self.converter, self.convert, (rid,)))
        elif state == S.FAILED.value and item.reused and not self.claims[(state, rid)]:
            self.claims[(state, rid)] += 1  # a passing problem of an earlier run: one more attempt now
            lifecycle.retry(session, recording, now=now, reason="retry requested by audiodrop process")
        elif state in (S.REJECTED.value, S.FAILED.value):
            item.done, item.error = True, recording.error or f"{name}: {state}"
        elif state in (S.CONVERTED.value, S.EXPIRED.value):
            waiting = ctx.waiting.describe(True)
            item.done, item.note = True, NO_KEY if self.no_key else (f"uploads wait ({waiting}); run this again "
                                                                    "later, or start the daemon") if waiting else None
            if ctx.client is None or waiting:
                return
            if not remote.make_room(ctx, session, recording.converted_bytes or 0):
                item.note = ctx.waiting.quota_problem
            elif lifecycle.advance(session, rid, expected=S(state), to=S.UPLOADING, now=now,
                                   reason="upload started (audiodrop process)",
                                   upload_display_name=display_name_for(ctx.instance_id, rid,
                                                                        recording.converted_sha256 or "")):
                item.done = False
                work.append((("recording", rid), self.uploader.pool, self.uploader._run, (rid, False)))
        elif state == S.UPLOADING.value:  # left by an interrupted run: looked up on the server before sending
            self.claims[(state, rid)] += 1
            work.append((("recording", rid), self.uploader.pool, self.uploader._run, (rid, True)))
        elif state == S.ACTIVE.value:
            self.prompt(session, item, recording.id, busy, work)

    def prompt(self, session: Session, item: Item, rid: int, busy: set[tuple[str, int]], work: list[Any]) -> None:
        now = self.ctx.now()
        # The drop folder's prompts, queued when the recording was converted, run here as well; a template
        # asked for on the command line is not queued a second time.
        folder_prompts = [] if rid in self.prompt_ids else session.scalars(
            select(Prompt).join(PromptRecording).where(PromptRecording.recording_id == rid,
                                                       Prompt.state.in_((P.QUEUED.value, P.RUNNING.value)))).all()
        if self.ctx.client is None:  # uploaded earlier, but no key to prompt with now
            item.done = True
            if self.specs or folder_prompts:
                item.note = "no API key: prompts need one; set GEMINI_API_KEY (or gemini.api_key_file)"
            return
        if rid not in self.prompt_ids:
            self.prompt_ids[rid] = [queued.id for queued in folder_prompts]
            queued_templates = {queued.template for queued in folder_prompts}
            for template, text in self.specs:
                if template is not None and template in queued_templates:
                    continue
                request = prompts.request_for(self.settings, [rid], template=template, prompt_text=text)
                try:
                    self.prompt_ids[rid].append(prompts.enqueue(session, request, now=now).id)
                except prompts.QueueError as err:
                    item.error = f"{item.path.name}: {err}"
        item.prompt_ids, item.done = self.prompt_ids[rid], True
        for prompt_id in item.prompt_ids:
            queued = session.get(Prompt, prompt_id)
            assert queued is not None
            if ("prompt", prompt_id) in busy or queued.state == P.RUNNING.value:
                item.done = False
            elif queued.state == P.QUEUED.value:
                wait = (queued.next_attempt_at - now).total_seconds() if queued.next_attempt_at else 0.0
                waiting = self.ctx.waiting.describe(True)
                if waiting or wait > LONGEST_WAIT_SECONDS:
                    item.note = f"a prompt stays queued for the daemon: {waiting or queued.waiting_for}"
                    continue
                item.done = False
                # The daemon's own workers run the steps (Uploader._run, PromptRunner._run: upload_recording and
                # run_prompt with their error handling); prompts.py has no public claim, so its compare-and-set.
                if wait <= 0 and prompts._move(session, prompt_id, P.QUEUED, P.RUNNING, started_at=queued.started_at
                                               or now, claimed_until=now + timedelta(hours=1)):
                    work.append((("prompt", prompt_id), self.runner.pool, self.runner._run, (prompt_id,)))

    def convert(self, recording_id: int) -> None:
        conversion.convert_guarded(self.ctx, recording_id)


class Report:
    """Progress on stderr: rich bars on a terminal, a line per change otherwise, nothing with --json."""

    def __init__(self, mode: str, per_file: int) -> None:
        self.mode, self.per_file, self.seen = mode, per_file, {}  # type: dict[Any, str]
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
        for task, (total, completed) in zip(self.tasks if self.mode == "bars" else [], counts):
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
            prompts.request_for(settings, [0], template=template, prompt_text=text)
        except prompts.QueueError as err:
            raise click.UsageError(str(err)) from None
    logs.setup("DEBUG" if settings.log_level == "DEBUG" else "ERROR")  # the report says what happens
    report = Report("quiet" if as_json else "bars" if sys.stderr.isatty() else "lines", len(specs))
    try:
        items = Pipeline(settings, specs, upload, report).run(args)
    finally:
        if report.mode == "bars":
            report.bars.stop()
    engine = make_engine(settings.database_path, readonly=True)
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
