"""The `audiodrop` command. Status commands read the database directly and read-only (WAL lets them run while
the daemon writes); the only writes are a retry request and, later, queued prompts. Heavy imports (the SDK,
watchdog, APScheduler) stay inside `run`, so status answers at once."""

from __future__ import annotations

import fcntl
import json
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon.config import Settings, load_settings
from daemon.errors import ConfigError, DaemonError
from db import queries
from db.models import Prompt, Recording
from db.states import PromptState, RecordingState
from db.session import make_engine, make_sessionmaker

STATES = [state.value for state in RecordingState]
PROMPT_STATES = [state.value for state in PromptState]


def config_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                        help="Configuration file (default: $AUDIODROP_CONFIG, then "
                             "$XDG_CONFIG_HOME/audiodrop/config.toml).")(function)


def json_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON only.")(function)


def fail(message: str) -> None:
    click.echo(f"audiodrop: {message}", err=True)
    sys.exit(1)


def settings_or_exit(config_path: str | None) -> Settings:
    try:
        return load_settings(config_path)
    except ConfigError as err:
        fail(str(err))
        raise  # unreachable


def open_session(settings: Settings, *, write: bool = False) -> Session | None:
    """A session on the daemon's database, or None when the daemon has never run."""
    if not settings.database_path.exists():
        return None
    engine = make_engine(settings.database_path, readonly=not write)
    return make_sessionmaker(engine)()


def open_row(settings: Settings, model: type[Any], row_id: int, noun: str, *, write: bool = False) -> tuple[Session, Any]:
    """A session and one row by id, or exit 1 with "no recording with id N" (and why, if no database yet)."""
    session = open_session(settings, write=write)
    if session is None:
        fail(f"no {noun} with id {row_id} (the daemon has not run yet)")
    assert session is not None
    row = session.get(model, row_id)
    if row is None:
        session.close()
        fail(f"no {noun} with id {row_id}")
    return session, row


def iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None


def lock_holder(settings: Settings) -> int | None:
    """The pid holding the state_dir lock (a daemon, or `audiodrop process`), or None when nobody does."""
    try:
        with open(settings.lock_path, encoding="ascii") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                content = handle.read().strip()
                return int(content) if content.isdigit() else -1
            fcntl.flock(handle, fcntl.LOCK_UN)
            return None
    except OSError:
        return None


def recording_json(recording: Recording) -> dict[str, Any]:
    has_remote = recording.remote_name and recording.state in ("processing", "active")
    return {
        "id": recording.id,
        "source_path": recording.source_path,
        "state": recording.state,
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
        "attempts": recording.attempts,
        "next_attempt_at": iso(recording.next_attempt_at),
        "created_at": iso(recording.created_at),
        "state_changed_at": iso(recording.state_changed_at),
    }


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="audiodrop")
def main() -> None:
    """audiodrop: converts recordings dropped in watched folders and uploads them to the Gemini API."""


@main.command()
@config_option
def run(config_path: str | None) -> None:
    """Run the daemon in the foreground (what the systemd unit starts)."""
    from daemon import logs
    from daemon.service import Daemon

    settings = settings_or_exit(config_path)
    logs.setup(settings.log_level)
    try:
        Daemon(settings, config_path).run()
    except DaemonError as err:
        fail(str(err))


@main.command()
@config_option
@json_option
def status(config_path: str | None, as_json: bool) -> None:
    """Counts by state, storage used, the next expiry and whether the daemon runs."""
    settings = settings_or_exit(config_path)
    session = open_session(settings)
    holder = lock_holder(settings)
    running = holder is not None
    counts: dict[str, int] = {}
    prompts: dict[str, int] = {}
    used, foreign, upcoming, state, tokens_today = 0, 0, None, None, {"prompt": 0, "audio": 0, "output": 0, "thinking": 0}
    if session is not None:
        with session:
            counts = queries.recording_counts(session)
            prompts = queries.prompt_counts(session)
            used = queries.storage_used(session)
            upcoming = queries.next_expiry(session)
            state = queries.daemon_state(session)
            foreign = (state.foreign_bytes or 0) if state else 0
            tokens_today = queries.tokens_since(session, datetime.now(UTC).replace(hour=0, minute=0, second=0,
                                                                                   microsecond=0))
    waiting = state.waiting_for if state and running else None
    report = {
        "daemon": {"running": running, "pid": holder if running else None,
                   "heartbeat_at": iso(state.heartbeat_at) if state else None, "waiting_for": waiting,
                   "offline_since": iso(state.offline_since) if state and running else None,
                   "unavailable_folders": (state.unavailable_folders or "").splitlines() if state and running
                   else []},
        "recordings": {name: counts.get(name, 0) for name in STATES},
        "prompts": {name: prompts.get(name, 0) for name in PROMPT_STATES},
        "storage": {"used_bytes": used + foreign, "limit_bytes": settings.gemini.storage_limit_bytes,
                    "ours_bytes": used, "foreign_bytes": foreign,
                    "headroom_bytes": settings.gemini.storage_headroom_bytes,
                    "reconciled_at": iso(state.reconciled_at) if state else None},
        "next_expiry": {"recording_id": upcoming[0], "expires_at": iso(upcoming[1])} if upcoming else None,
        "tokens_today": tokens_today,
        "state_dir": str(settings.state_dir),
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if running:
        console.print(f"daemon: [green]running[/green] (pid {report['daemon']['pid']})")
    else:
        console.print("daemon: [red]not running[/red]" + ("" if session else " (no database yet)"))
    if waiting:
        console.print(f"waiting: {waiting}")
    for folder in report["daemon"]["unavailable_folders"]:
        console.print(f"[yellow]unavailable drop folder[/yellow]: {folder}")
    table = Table("recordings", "count", "prompts", "count", box=None)
    for index in range(max(len(STATES), len(PROMPT_STATES))):
        left = STATES[index] if index < len(STATES) else ""
        right = PROMPT_STATES[index] if index < len(PROMPT_STATES) else ""
        table.add_row(left, str(report["recordings"][left]) if left else "",
                      right, str(report["prompts"][right]) if right else "")
    console.print(table)
    console.print(f"storage: {(used + foreign) / 1e9:.2f} GB used of {settings.gemini.storage_limit_bytes / 1e9:.2f} GB"
                  + (f" ({foreign / 1e9:.2f} GB by other tools)" if foreign else ""))
    if upcoming:
        console.print(f"next expiry: recording {upcoming[0]} at {iso(upcoming[1])}")
    thinking = f" (+{tokens_today['thinking']} thinking)" if tokens_today["thinking"] else ""
    console.print(f"tokens today (UTC): {tokens_today['prompt']} in ({tokens_today['audio']} audio), "
                  f"{tokens_today['output']} out{thinking}")


@main.command()
@config_option
@json_option
@click.option("--state", type=click.Choice(STATES), help="Only recordings in this state.")
def files(config_path: str | None, as_json: bool, state: str | None) -> None:
    """List the recordings."""
    settings = settings_or_exit(config_path)
    session = open_session(settings)
    recordings: list[Recording] = []
    if session is not None:
        with session:
            query = select(Recording).order_by(Recording.id)
            if state:
                query = query.where(Recording.state == state)
            recordings = list(session.scalars(query).all())
    if as_json:
        click.echo(json.dumps([recording_json(r) for r in recordings], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "state", "duration", "size", "expires", "file", "note")
    for r in recordings:
        note = r.error or r.warning or ""
        table.add_row(str(r.id), r.state, f"{r.duration_seconds:.0f} s" if r.duration_seconds else "",
                      f"{r.converted_bytes / 1e3:.0f} kB" if r.converted_bytes else "",
                      iso(r.remote_expires_at) or "" if r.state == "active" else "",
                      Path(r.source_path).name, note)
    Console().print(table if recordings else "no recordings yet")


@main.command()
@config_option
@json_option
@click.argument("recording_id", type=int)
def show(config_path: str | None, as_json: bool, recording_id: int) -> None:
    """One recording and its history."""
    settings = settings_or_exit(config_path)
    session, recording = open_row(settings, Recording, recording_id, "recording")
    with session:
        report = recording_json(recording)
        report["duplicates"] = [{"path": a.path, "seen_at": iso(a.seen_at)} for a in recording.aliases]
        report["history"] = [{"at": iso(e.at), "from": e.from_state, "to": e.to_state, "reason": e.reason}
                             for e in recording.events]
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]recording {report['id']}[/bold]  {report['state']}  {report['source_path']}")
    for key in ("error", "warning", "duration_seconds", "sha256"):
        if report[key] is not None:
            console.print(f"  {key}: {report[key]}")
    if report["converted"]:
        c = report["converted"]
        console.print(f"  converted: {c['path']} ({c['bytes']} bytes, {c['mime_type']})")
    if report["remote"]:
        r = report["remote"]
        console.print(f"  remote: {r['name']} expires {r['expires_at']}")
    for duplicate in report["duplicates"]:
        console.print(f"  duplicate: {duplicate['path']} (seen {duplicate['seen_at']})")
    table = Table("at", "change", "reason", box=None)
    for event in report["history"]:
        change = event["to"] if event["from"] in (None, event["to"]) else f"{event['from']} -> {event['to']}"
        table.add_row(event["at"], change, event["reason"])
    console.print(table)


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
        "waiting_for": prompt.waiting_for if prompt.state == "queued" else None,
        "delivery": prompt.delivery,
        "finish_reason": prompt.finish_reason,
        "chunks": prompt.chunks,
        "tokens": {"estimated_audio": prompt.estimated_audio_tokens, "prompt": prompt.prompt_tokens,
                   "audio": prompt.audio_tokens, "output": prompt.output_tokens, "thinking": prompt.thinking_tokens},
        "file_error": prompt.file_error,
        "created_at": iso(prompt.created_at),
        "finished_at": iso(prompt.finished_at),
        "history": [{"at": iso(e.at), "from": e.from_state, "to": e.to_state, "reason": e.reason}
                    for e in prompt.events],
    }


def parse_span(start: str | None, end: str | None) -> tuple[float, float] | None:
    from daemon.chunking import parse_clock

    if start is None and end is None:
        return None
    try:
        return (parse_clock(start) if start else 0.0, parse_clock(end) if end else float("inf"))
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


@main.command()
@config_option
@json_option
@click.argument("recording_ids", type=int, nargs=-1, required=True)
@click.option("--template", "-t", help="A template name: transcribe, summarize or one from the config.")
@click.option("--prompt", "-p", "prompt_text", help="Your own prompt text.")
@click.option("--from", "span_from", metavar="TIME", help="Only from this time (02:30, 1:02:03, 90s).")
@click.option("--to", "span_to", metavar="TIME", help="Only up to this time.")
@click.option("--model", help="The model (default: the template's, else gemini.model).")
@click.option("--wait", is_flag=True, help="Wait for the result and print it.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after this many seconds.")
@click.option("--dry-run", is_flag=True, help="Show the estimated audio tokens (and the API's count when online); "
                                              "queue nothing.")
def ask(config_path: str | None, as_json: bool, recording_ids: tuple[int, ...], template: str | None,
        prompt_text: str | None, span_from: str | None, span_to: str | None, model: str | None, wait: bool,
        timeout: float | None, dry_run: bool) -> None:
    """Queue a prompt over one or more recordings."""
    from daemon import prompts, wakeup

    if (template is None) == (prompt_text is None):
        raise click.UsageError("give exactly one of --template NAME or --prompt TEXT")
    settings = settings_or_exit(config_path)
    span = parse_span(span_from, span_to)
    try:
        request = prompts.request_for(settings, list(recording_ids), template=template, prompt_text=prompt_text,
                                      model=model, span=span)
    except prompts.QueueError as err:
        fail(str(err))
        return
    if dry_run:
        report = dry_run_report(settings, request)
        click.echo(json.dumps(report, indent=2) if as_json else
                   "\n".join(f"{key}: {value}" for key, value in report.items()))
        return
    session = open_session(settings, write=True)
    if session is None:
        fail("no recordings yet (the daemon has not run)")
    assert session is not None
    with session:
        try:
            queued = prompts.enqueue(session, request, now=datetime.now(UTC), reason="queued by audiodrop ask")
        except prompts.QueueError as err:
            fail(str(err))
            return
        session.commit()
        prompt_id = queued.id
        queued_json = prompt_json(queued)
    wakeup.poke(settings.state_dir, "prompt", "upload")
    if not wait:
        click.echo(json.dumps(queued_json, indent=2) if as_json else f"queued prompt {prompt_id}")
        return
    finished = wait_for_prompt(settings, prompt_id, timeout)
    if as_json:
        click.echo(json.dumps(prompt_json(finished), indent=2))
    elif finished.state == "done":
        click.echo(finished.result_text or "")
    if finished.state != "done":
        fail(f"prompt {prompt_id} failed: {finished.error}")


def dry_run_report(settings: Settings, request: Any) -> dict[str, Any]:
    """The estimate, and the API's countTokens answer when the recordings are live and a key is at hand. Reads
    the database read-only; ffmpeg and countTokens run with no transaction open."""
    from daemon import prompts
    from daemon.config import find_api_key

    session = open_session(settings)
    if session is None:
        fail("no recordings yet (the daemon has not run)")
    assert session is not None
    with session:
        try:
            estimate = prompts.check(session, request)
        except prompts.QueueError as err:
            fail(str(err))
        recordings = [session.get(Recording, rid) for rid in request.recording_ids]
        session.expunge_all()
    span = request.span
    draft = Prompt(template=request.template, prompt_text=request.prompt_text, model=request.model,
                   span_start_seconds=span[0] if span else None,
                   span_end_seconds=span[1] if span and span[1] != float("inf") else None)
    report: dict[str, Any] = {"recording_ids": list(request.recording_ids), "model": request.model,
                              "estimated_audio_tokens": estimate, "api_total_tokens": None}
    key, _ = find_api_key(settings)
    if not key:
        report["api_note"] = "no API key: estimate only"
        return report
    with tempfile.TemporaryDirectory(prefix="audiodrop-count-") as scratch:
        try:
            parts = prompts.parts_to_count(settings, draft, [r for r in recordings if r], Path(scratch))
        except prompts.NotReady as err:
            report["api_note"] = f"{err}: estimate only"
            return report
        from daemon.gemini import GeminiClient

        client = GeminiClient(key, settings.gemini, attempts=1)
        try:
            report["api_total_tokens"] = client.count_tokens(request.model, [*parts, request.prompt_text])
        except DaemonError as err:
            report["api_note"] = f"countTokens failed: {err.title}"
        finally:
            client.close()
    return report


def wait_for_prompt(settings: Settings, prompt_id: int, timeout: float | None) -> Prompt:
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        session = open_session(settings)
        assert session is not None
        with session:
            prompt = session.get(Prompt, prompt_id)
            assert prompt is not None
            # Done means answered; its files follow a moment later (or fail to, which file_error says).
            finished = prompt.state == "failed" or (prompt.state == "done" and (prompt.result_path or
                                                                               prompt.file_error))
            if finished:
                prompt_json(prompt)  # load the links while the session is open
                return prompt
        if deadline is not None and time.monotonic() > deadline:
            fail(f"prompt {prompt_id} is still {prompt.state} after {timeout:g} s"
                 + (f" ({prompt.waiting_for})" if prompt.waiting_for else ""))
        time.sleep(0.5)


@main.command(name="prompts")
@config_option
@json_option
@click.option("--state", type=click.Choice(PROMPT_STATES), help="Only prompts in this state.")
def list_prompts(config_path: str | None, as_json: bool, state: str | None) -> None:
    """The prompt queue and the finished prompts."""
    settings = settings_or_exit(config_path)
    session = open_session(settings)
    items: list[dict[str, Any]] = []
    if session is not None:
        with session:
            query = select(Prompt).order_by(Prompt.id)
            if state:
                query = query.where(Prompt.state == state)
            items = [prompt_json(p) for p in session.scalars(query).all()]
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "state", "template", "recordings", "audio tokens", "result / note")
    for item in items:
        tokens = item["tokens"]["audio"] or item["tokens"]["estimated_audio"]
        note = item["result_path"] or item["error"] or item["waiting_for"] or ""
        table.add_row(str(item["id"]), item["state"], item["template"] or "(own prompt)",
                      ", ".join(map(str, item["recording_ids"])), str(tokens or ""), note)
    Console().print(table if items else "no prompts yet")


@main.command()
@config_option
@click.argument("prompt_id", type=int)
def result(config_path: str | None, prompt_id: int) -> None:
    """Print one prompt's result text."""
    settings = settings_or_exit(config_path)
    session, prompt = open_row(settings, Prompt, prompt_id, "prompt")
    with session:
        if prompt.state != "done":
            detail = prompt.error if prompt.state == "failed" else prompt.waiting_for
            fail(f"prompt {prompt_id} is {prompt.state}" + (f": {detail}" if detail else ""))
        click.echo(prompt.result_text or "")


@main.command()
@config_option
@click.argument("item_id", metavar="ID", type=int)
@click.option("--prompt", "is_prompt", is_flag=True, help="ID is a failed prompt: queue it again.")
def retry(config_path: str | None, item_id: int, is_prompt: bool) -> None:
    """Retry a failed or rejected recording (or, with --prompt, a failed prompt) now."""
    from daemon import lifecycle, prompt_lifecycle, wakeup

    settings = settings_or_exit(config_path)
    now = datetime.now(UTC)
    if is_prompt:
        session, prompt = open_row(settings, Prompt, item_id, "prompt", write=True)
        with session:
            if prompt.state != "failed":
                fail(f"prompt {item_id} is {prompt.state}; only a failed prompt can be queued again")
            prompt_lifecycle.advance(session, item_id, expected=prompt.state, to=PromptState.QUEUED, now=now,
                                     reason="retry requested from the command line", error=None, attempts=0,
                                     timeouts=0, internal_errors=0, next_attempt_at=None, finished_at=None)
            session.commit()
        wakeup.poke(settings.state_dir, "prompt", "upload")
        click.echo(f"prompt {item_id} queued again")
        return
    session, recording = open_row(settings, Recording, item_id, "recording", write=True)
    with session:
        if recording.state not in ("failed", "rejected"):
            fail(f"recording {item_id} is {recording.state}; only failed or rejected recordings can be retried")
        lifecycle.retry(session, recording, now=now, reason="retry requested from the command line")
        session.commit()
    wakeup.poke(settings.state_dir, "convert", "upload")
    click.echo(f"recording {item_id} queued for another attempt")


@main.command()
@config_option
@json_option
@click.option("--offline", is_flag=True, help="Skip the check that talks to the Gemini API.")
def doctor(config_path: str | None, as_json: bool, offline: bool) -> None:
    """Check ffmpeg, the configuration, the database, the API key and the API, inotify limits and disk space."""
    from daemon import doctor as checks

    settings = settings_or_exit(config_path)
    results = checks.run_checks(settings, api=not offline)
    if as_json:
        click.echo(json.dumps([result.__dict__ for result in results], indent=2))
    else:
        click.echo(checks.render(results))
    if any(result.status == "fail" for result in results):
        sys.exit(1)


@main.command()
@config_option
@json_option
@click.argument("paths", metavar="FILE...", nargs=-1, required=True)
@click.option("--template", "-t", "templates", multiple=True, help="A template to run on each file (repeatable).")
@click.option("--prompt", "-p", "prompt_text", help="Your own prompt text, run on each file.")
@click.option("--no-upload", is_flag=True, help="Convert only; upload nothing.")
def process(config_path: str | None, as_json: bool, paths: tuple[str, ...], templates: tuple[str, ...],
            prompt_text: str | None, no_upload: bool) -> None:
    """Convert, upload and prompt the named files now, without the daemon (which must not be running)."""
    from daemon import process as pipeline

    settings = settings_or_exit(config_path)
    try:
        code = pipeline.main(settings, list(paths), templates=list(templates), prompt_text=prompt_text,
                             upload=not no_upload, as_json=as_json)
    except DaemonError as err:
        fail(str(err))
    sys.exit(code)


if __name__ == "__main__":
    main()
