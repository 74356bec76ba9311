"""The JSON views of recordings and prompts: one place for what `files`, `show`, `prompts` and `process` print
(their fields are the public contract PRODUCT.md fixes); the filters `files` and `prompts` share; a result in
each of the formats `result` prints."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import click
from sqlalchemy import ColumnElement, Select, or_, select

from daemon.clock import iso as iso  # re-exported: the CLI modules take it from here
from daemon.errors import NoTimestamps as NoTimestamps  # re-exported for the CLI
from db.models import Prompt, PromptRecording, Recording
from db.states import PromptState, RecordingState

STATES = [state.value for state in RecordingState]
PROMPT_STATES = [state.value for state in PromptState]


def recording_json(recording: Recording) -> dict[str, Any]:
    has_remote = recording.remote_name and recording.state in ("processing", "active")
    return {
        "id": recording.id,
        "source_path": recording.source_path,
        "state": recording.state,
        "node": recording.node,
        "error": recording.error,
        "warning": recording.warning,
        "duration_seconds": recording.duration_seconds,
        "sha256": recording.sha256,
        "converted": {"path": recording.converted_path, "bytes": recording.converted_bytes,
                      "mime_type": recording.converted_mime, "format": recording.converted_format}
        if recording.converted_path and recording.state not in ("discovered", "converting") else None,
        "remote": {"name": recording.remote_name, "uri": recording.remote_uri,
                   "expires_at": iso(recording.remote_expires_at), "bytes": recording.remote_bytes}
        if has_remote else None,
        # How far a conversion or an upload in flight has come (each null before its first report).
        "progress": {"converted_seconds": recording.progress_seconds} if recording.state == "converting"
        else {"uploaded_bytes": recording.progress_bytes} if recording.state == "uploading" else None,
        "attempts": recording.attempts,
        "next_attempt_at": iso(recording.next_attempt_at),
        "created_at": iso(recording.created_at),
        "state_changed_at": iso(recording.state_changed_at),
    }


def prompt_json(prompt: Prompt) -> dict[str, Any]:
    return {
        "id": prompt.id,
        "recording_ids": [link.recording_id for link in prompt.recordings],
        "state": prompt.state,
        "template": prompt.template,
        "prompt": prompt.prompt_text,
        "model": prompt.model,
        "requested_model": prompt.requested_model,  # set when `model` is the fallback after 500s
        "span": {"from_seconds": prompt.span_start_seconds, "to_seconds": prompt.span_end_seconds}
        if prompt.span_start_seconds is not None else None,
        "result_path": prompt.result_path,
        "error": prompt.error,
        # A running prompt in a Batch API job says which, and since when ("in batch batches/... since ...").
        "waiting_for": prompt.waiting_for if prompt.state == "queued" or (
            prompt.state == "running" and prompt.batch_name) else None,
        "delivery": prompt.delivery,
        "finish_reason": prompt.finish_reason,
        "chunks": prompt.chunks,
        "tokens": {"estimated_audio": prompt.estimated_audio_tokens, "prompt": prompt.prompt_tokens,
                   "audio": prompt.audio_tokens, "output": prompt.output_tokens, "thinking": prompt.thinking_tokens,
                   "cached": prompt.cached_tokens},
        "cost_usd": float(prompt.cost_usd) if prompt.cost_usd is not None else None,
        "cached_tokens": prompt.cached_tokens,
        "trimmed_seconds": prompt.trimmed_seconds,
        "batch": prompt.batch,
        "batch_name": prompt.batch_name,
        "file_error": prompt.file_error,
        "created_at": iso(prompt.created_at),
        "finished_at": iso(prompt.finished_at),
        "history": [{"at": iso(e.at), "from": e.from_state, "to": e.to_state, "reason": e.reason}
                    for e in prompt.events],
    }


# -- filters shared by `files` and `prompts` (the same rows in the table and in --json) --------------------------

class When(click.ParamType[datetime]):
    """An ISO 8601 date or date-time, in UTC unless it names its offset. `--until` with a date alone takes that
    whole day; the bound is kept as an exclusive end."""

    name = "DATE"

    def __init__(self, *, until: bool = False) -> None:
        self.until = until

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        text = str(value).strip()
        try:
            if len(text) == 10:  # a date alone: from its first moment, or (--until) to its last
                day = datetime.combine(date.fromisoformat(text), time.min, tzinfo=UTC)
                return day + timedelta(days=1) if self.until else day
            moment = datetime.fromisoformat(text)
        except ValueError:
            self.fail(f"{text!r} is not an ISO 8601 date or date-time (2026-11-25, 2026-11-25T14:30, "
                      "2026-11-25T14:30:00+01:00)", param, ctx)
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
        return moment + timedelta(microseconds=1) if self.until else moment


@dataclass(frozen=True)
class Filters:
    """What `files` and `prompts` are narrowed to; every given filter applies (they combine with AND)."""

    state: str | None = None
    folder: str | None = None  # a drop folder (watch root), or any folder the recordings' files lie in
    template: str | None = None
    since: datetime | None = None  # created at or after (a recording found, a prompt queued)
    until: datetime | None = None  # created before (exclusive; When(until=True) makes it so)


def filter_options(states: list[str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The filter options of `files` and `prompts`, in one place so that both read them the same way."""
    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed([
            click.option("--state", type=click.Choice(states), help="Only those in this state."),
            click.option("--folder", type=click.Path(file_okay=False), metavar="PATH",
                         help="Only recordings from this drop folder (or any folder their files lie in)."),
            click.option("--template", metavar="NAME", help="Only prompts of this template (files: recordings "
                                                            "with such a prompt)."),
            click.option("--since", type=When(), help="Only those created at or after DATE (ISO 8601, UTC)."),
            click.option("--until", type=When(until=True), help="Only those created up to DATE (a date alone: "
                                                                "that whole day)."),
        ]):
            function = option(function)
        return function
    return decorate


def _in_folder(folder: str) -> ColumnElement[bool]:
    """Recordings of a drop folder, or whose file lies under the folder (its subfolders too)."""
    roots = {os.path.abspath(folder), os.path.realpath(folder)}
    under = [Recording.source_path.like(root.rstrip("/").replace("\\", "\\\\").replace("%", "\\%")
                                        .replace("_", "\\_") + "/%", escape="\\") for root in roots]
    return or_(Recording.watch_root.in_(roots), *under)


def recordings_query(filters: Filters) -> Select[Recording]:
    query = select(Recording).order_by(Recording.id)
    if filters.state:
        query = query.where(Recording.state == filters.state)
    if filters.folder:
        query = query.where(_in_folder(filters.folder))
    if filters.template:
        query = query.where(Recording.id.in_(select(PromptRecording.recording_id).join(
            Prompt, Prompt.id == PromptRecording.prompt_id).where(Prompt.template == filters.template)))
    if filters.since:
        query = query.where(Recording.created_at >= filters.since)
    if filters.until:
        query = query.where(Recording.created_at < filters.until)
    return query


def prompts_query(filters: Filters) -> Select[Prompt]:
    query = select(Prompt).order_by(Prompt.id)
    if filters.state:
        query = query.where(Prompt.state == filters.state)
    if filters.folder:
        query = query.where(Prompt.id.in_(select(PromptRecording.prompt_id).join(
            Recording, Recording.id == PromptRecording.recording_id).where(_in_folder(filters.folder))))
    if filters.template:
        query = query.where(Prompt.template == filters.template)
    if filters.since:
        query = query.where(Prompt.created_at >= filters.since)
    if filters.until:
        query = query.where(Prompt.created_at < filters.until)
    return query


# -- a result in any of its formats (as the result files are written: daemon.prompts.results) ------------------

RESULT_FORMATS = ["text", "markdown", "json", "srt", "vtt"]


def render_result(prompt: Prompt, fmt: str, durations: list[float | None]) -> str:
    """A done prompt's answer as `fmt`: text (the answer as stored), markdown (the .md result file: a small
    header, then the answer), json (the .meta.json file's metadata with the answer under "text"), srt or vtt
    (cues from a timestamped transcript; `durations`: its recordings' lengths, bounding the last cue)."""
    from daemon.prompts import results

    text = prompt.result_text or ""
    metadata: dict[str, Any] = json.loads(prompt.result_meta or "{}") or {"prompt_id": prompt.id}
    if fmt == "text":
        return text
    if fmt == "markdown":
        return results.render_markdown(" + ".join(metadata.get("recordings", [])), text, metadata)
    if fmt == "json":
        return json.dumps({**metadata, "text": text}, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    return subtitles_of(prompt.id, text, fmt, durations)


def subtitles_of(prompt_id: int, text: str, fmt: str, durations: list[float | None]) -> str:
    from daemon.prompts import subtitles

    return subtitles.render(text, fmt, durations, prompt_id=prompt_id)
