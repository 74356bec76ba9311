"""`audiodrop process`'s progress on stderr: three bars on a terminal, a line per change otherwise, nothing with
--json. Pure reporting: it is handed what the database says (`Row`s) and never reads or writes anything itself.
Imported only by `process` (rich is not needed by the other commands).

The bars count what takes the time, in its own unit, each with an ETA: seconds of audio converted (out of the
files' durations, probed up front, and `recordings.progress_seconds` while ffmpeg runs), bytes uploaded (out of
the compact copies' sizes, estimated from the duration until a copy exists, and `recordings.progress_bytes`
while an upload runs) and prompts finished. A 2-hour recording moves its bars while it converts and uploads."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import click
from rich.progress import ProgressColumn, Task
from rich.text import Text

# The compact Opus copy at 16 kbps holds about 7.3 MB per hour: an upload's size until its copy exists.
ESTIMATED_COPY_BYTES_PER_SECOND = 2036.0
BEFORE_CONVERTED = frozenset({"discovered", "converting"})
UPLOADED = frozenset({"processing", "active"})
FINISHED_PROMPT = frozenset({"done", "failed"})
LINE_EVERY_SECONDS = 5.0  # without a terminal, a long step's progress is printed at most this often


@dataclass(frozen=True)
class Row:
    """One file as the database has it now."""

    key: str  # the FILE argument
    name: str
    state: str | None
    duration: float | None  # seconds: the recording's, or probed before it was converted
    progress_seconds: float | None
    converted_bytes: int | None
    progress_bytes: int | None
    uploads: bool  # its upload is part of the work followed (not with --no-upload or without a key)
    prompts: list[tuple[int, str, str]] = field(default_factory=list)  # (id, label, state)
    expected_prompts: int = 0  # prompts it will have once they are queued


@dataclass(frozen=True)
class Totals:
    converted_seconds: float
    audio_seconds: float
    uploaded_bytes: float
    upload_bytes: float
    prompts_finished: int
    prompts: int


def totals(rows: list[Row]) -> Totals:
    """What the bars show: each file's share of the audio converted, the bytes uploaded, the prompts finished.
    A file whose length is unknown (not audio) weighs nothing; a failed or rejected file counts as past its step."""
    converted = audio = uploaded = upload = 0.0
    finished = prompts = 0
    for row in rows:
        duration = row.duration or 0.0
        audio += duration
        if row.state == "converting":
            converted += min(row.progress_seconds or 0.0, duration)
        elif row.state is not None and row.state not in BEFORE_CONVERTED:
            converted += duration
        if row.uploads and row.state not in ("failed", "rejected"):
            size = float(row.converted_bytes or duration * ESTIMATED_COPY_BYTES_PER_SECOND)
            upload += size
            if row.state == "uploading":
                uploaded += min(float(row.progress_bytes or 0), size)
            elif row.state in UPLOADED:
                uploaded += size
        prompts += max(len(row.prompts), row.expected_prompts)
        finished += sum(state in FINISHED_PROMPT for _id, _label, state in row.prompts)
    return Totals(converted, audio, uploaded, upload, finished, prompts)


def clock(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class Report:
    """Progress on stderr in one of three modes: "bars" (rich, on a terminal), "lines" or "quiet" (--json)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.seen: dict[Any, str] = {}
        self.lines_at: dict[str, tuple[float, int]] = {}
        if mode == "bars":
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bars = Progress(TextColumn("{task.description:<10}"), BarColumn(), _Amount(),
                                 TimeRemainingColumn(), console=Console(stderr=True))
            self.tasks = [self.bars.add_task(name, total=None, unit=unit) for name, unit in
                          (("converting", "seconds"), ("uploading", "bytes"), ("prompts", "count"))]
            self.bars.start()

    def say(self, message: str) -> None:
        """A line for the person watching (not with --json)."""
        if self.mode != "quiet":
            click.echo(message, err=True)

    def update(self, rows: list[Row]) -> None:
        if self.mode == "bars":
            done = totals(rows)
            for task, (completed, total) in zip(self.tasks, ((done.converted_seconds, done.audio_seconds),
                                                            (done.uploaded_bytes, done.upload_bytes),
                                                            (done.prompts_finished, done.prompts)), strict=True):
                self.bars.update(task, total=total or None, completed=completed)
        elif self.mode == "lines":
            self._lines(rows)

    def _lines(self, rows: list[Row]) -> None:
        changes = [(row.key, row.name, row.state) for row in rows] + [
            (prompt_id, f"{row.name}: {label}", state) for row in rows for prompt_id, label, state in row.prompts]
        for key, name, state in changes:
            if state and self.seen.get(key) != state:
                self.seen[key] = state
                click.echo(f"{name}: {state}", err=True)
        for row in rows:  # a long step says how far it is, now and then
            share = _share(row)
            if share is None:
                continue
            last_at, last_share = self.lines_at.get(row.key, (0.0, -1))
            now = time.monotonic()
            if share != last_share and now - last_at >= LINE_EVERY_SECONDS:
                self.lines_at[row.key] = (now, share)
                click.echo(f"{row.name}: {row.state} {share} %", err=True)

    def stop(self) -> None:
        if self.mode == "bars":
            self.bars.stop()


def _share(row: Row) -> int | None:
    """How far a converting or uploading file is, in percent (None: not in such a step, or no measure yet)."""
    if row.state == "converting" and row.duration and row.progress_seconds:
        return min(100, int(100 * row.progress_seconds / row.duration))
    if row.state == "uploading" and row.converted_bytes and row.progress_bytes:
        return min(100, int(100 * row.progress_bytes / row.converted_bytes))
    return None


def _amount(completed: float, total: float | None, unit: str) -> str:
    if unit == "seconds":
        return f"{clock(completed)} of {clock(total)} audio" if total else ""
    if unit == "bytes":
        return f"{completed / 1e6:.1f} of {total / 1e6:.1f} MB" if total else ""
    return f"{int(completed)}/{int(total)}" if total else ""


class _Amount(ProgressColumn):
    """How much of a bar's total is done, in its unit: audio time, megabytes or a count."""

    def render(self, task: Task) -> Text:
        return Text(_amount(task.completed, task.total, str(task.fields.get("unit", "count"))))
