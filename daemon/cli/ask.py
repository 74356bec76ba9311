"""`audiodrop ask`, `prompts`, `result` and `retry`: the prompt queue from the command line. The only writes the
CLI makes are here (a queued prompt, a retry), each one short transaction followed by a poke at the daemon."""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from daemon.cli import config_option, fail, json_option, main, open_row, open_session, settings_or_exit
from daemon.cli.views import (
    PROMPT_STATES,
    RESULT_FORMATS,
    Filters,
    NoTimestamps,
    filter_options,
    prompt_json,
    prompts_query,
    recording_json,
    render_result,
)
from daemon.config import Settings
from daemon.errors import DaemonError, QueueError
from db.models import Prompt, Recording
from db.states import PromptState


def parse_span(start: str | None, end: str | None) -> tuple[float, float] | None:
    from daemon.prompts.chunking import parse_clock

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
@click.option("--dry-run", is_flag=True, help="Show the estimated audio tokens with and without trimming, the cost "
                                              "(and the API's count when online); queue nothing.")
@click.option("--trim/--no-trim", default=None, help="Cut long silences from the audio sent (default: the template's "
                                                    "setting; on for transcribe and summarize).")
@click.option("--batch", is_flag=True, default=None, help="Send through the Batch API: half price, within hours.")
@click.option("--speakers", metavar="NAMES", help='The speakers\' names, in order of appearance: "Ana,Ben".')
@click.option("--force", is_flag=True, help="Run even past daily_budget_usd/monthly_budget_usd (this prompt only).")
def ask(config_path: str | None, as_json: bool, recording_ids: tuple[int, ...], template: str | None,
        prompt_text: str | None, span_from: str | None, span_to: str | None, model: str | None, wait: bool,
        timeout: float | None, dry_run: bool, trim: bool | None, batch: bool | None, speakers: str | None,
        force: bool) -> None:
    """Queue a prompt over one or more recordings."""
    from daemon import wakeup
    from daemon.prompts import queue as prompt_queue

    if (template is None) == (prompt_text is None):
        raise click.UsageError("give exactly one of --template NAME or --prompt TEXT")
    settings = settings_or_exit(config_path)
    span = parse_span(span_from, span_to)
    try:
        request = prompt_queue.request_for(settings, list(recording_ids), template=template, prompt_text=prompt_text,
                                           model=model, span=span, trim=trim, batch=batch, force_budget=force,
                                           speakers=tuple(name.strip() for name in (speakers or "").split(",")
                                                          if name.strip()))
    except QueueError as err:
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
            queued = prompt_queue.enqueue(session, request, now=datetime.now(UTC), reason="queued by audiodrop ask")
        except QueueError as err:
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
    from daemon.config import find_api_key
    from daemon.errors import NotReady
    from daemon.prompts import answer as prompt_answer
    from daemon.prompts import pricing
    from daemon.prompts import queue as prompt_queue

    session = open_session(settings)
    if session is None:
        fail("no recordings yet (the daemon has not run)")
    assert session is not None
    with session:
        try:
            estimate = prompt_queue.check(session, request)
        except QueueError as err:
            fail(str(err))
        recordings = [session.get(Recording, rid) for rid in request.recording_ids]
        session.expunge_all()
    span = request.span
    draft = Prompt(template=request.template, prompt_text=request.prompt_text, model=request.model,
                   span_start_seconds=span[0] if span else None,
                   span_end_seconds=span[1] if span and span[1] != float("inf") else None)
    report: dict[str, Any] = {"recording_ids": list(request.recording_ids), "model": request.model,
                              "estimated_audio_tokens": estimate, "api_total_tokens": None}
    report.update(_trimmed_estimate(settings, request, [r for r in recordings if r], estimate))
    audio_tokens = report.get("trimmed_audio_tokens", estimate) or 0
    price = pricing.estimate(audio_tokens, settings.prompts.max_output_tokens, request.model, settings.price_table,
                             text_tokens=pricing.text_tokens_bound(request.prompt_text, request.system_instruction),
                             batch=request.batch)
    report["estimated_cost_usd_at_most"] = float(price) if price is not None else None
    key, _ = find_api_key(settings)
    if not key:
        report["api_note"] = "no API key: estimate only"
        return report
    with tempfile.TemporaryDirectory(prefix="audiodrop-count-") as scratch:
        try:
            parts = prompt_answer.parts_to_count(settings, draft, [r for r in recordings if r], Path(scratch))
        except NotReady as err:
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


def _trimmed_estimate(settings: Settings, request: Any, recordings: list[Recording],
                      estimate: int | None) -> dict[str, Any]:
    """What trimming would send of a single converted recording: found by the same speech detection the daemon
    runs (ffmpeg on the compact copy, no transaction open)."""
    from daemon.prompts import answer as prompt_answer
    from daemon.prompts.queue import estimate_audio_tokens

    if not request.trim or len(recordings) != 1 or request.batch:
        return {"trimming": "off" if not request.batch else "off: the batch lane sends recordings whole"}
    recording = recordings[0]
    if not recording.converted_path or not Path(recording.converted_path).is_file() or not recording.duration_seconds:
        return {"trimming": "on; the recording is not converted yet, so what it saves is not known"}
    trim_map = prompt_answer.plan_trim(settings, Path(recording.converted_path), recording.duration_seconds)
    if trim_map is None:
        return {"trimming": "on; too little silence to cut: the whole recording is sent",
                "trimmed_audio_tokens": estimate}
    start, end = request.span or (0.0, recording.duration_seconds)
    sent = prompt_answer.window(trim_map, trim_map.to_trimmed(start),
                                trim_map.to_trimmed(min(end, recording.duration_seconds))).trimmed_duration
    # estimated_audio_tokens stays the untrimmed count: the two side by side show what trimming saves.
    return {"trimming": f"on; {(min(end, recording.duration_seconds) - start) - sent:.0f} s of silence cut",
            "trimmed_audio_tokens": estimate_audio_tokens(sent)}


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
@filter_options(PROMPT_STATES)
def list_prompts(config_path: str | None, as_json: bool, state: str | None, folder: str | None,
                 template: str | None, since: datetime | None, until: datetime | None) -> None:
    """The prompt queue and the finished prompts (filters combine: --state, --folder, --template, --since,
    --until)."""
    settings = settings_or_exit(config_path)
    session = open_session(settings)
    items: list[dict[str, Any]] = []
    if session is not None:
        with session:
            query = prompts_query(Filters(state, folder, template, since, until))
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
    filtered = any((state, folder, template, since, until))
    Console().print(table if items else "no prompts match" if filtered else "no prompts yet")


@main.command()
@config_option
@json_option
@click.argument("prompt_id", type=int)
@click.option("--format", "fmt", type=click.Choice(RESULT_FORMATS), default="text", show_default=True,
              help="text: the answer as stored; markdown: as its .md file; json: its metadata with the answer; "
                   "srt, vtt: subtitles from a timestamped transcript.")
def result(config_path: str | None, as_json: bool, prompt_id: int, fmt: str) -> None:
    """Print one prompt's result, in any of its formats."""
    settings = settings_or_exit(config_path)
    session, prompt = open_row(settings, Prompt, prompt_id, "prompt")
    with session:
        if prompt.state != "done":
            detail = prompt.error if prompt.state == "failed" else prompt.waiting_for
            fail(f"prompt {prompt_id} is {prompt.state}" + (f": {detail}" if detail else ""))
        durations = [session.get(Recording, link.recording_id) for link in prompt.recordings]
        try:
            content = render_result(prompt, fmt, [r.duration_seconds if r else None for r in durations])
        except NoTimestamps as err:
            fail(str(err))
            return
        report = {**prompt_json(prompt), "format": fmt, "content": content}
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(content, nl=not content.endswith("\n"))


@main.command()
@config_option
@json_option
@click.argument("item_id", metavar="ID", type=int)
@click.option("--prompt", "is_prompt", is_flag=True, help="ID is a failed prompt: queue it again.")
def retry(config_path: str | None, as_json: bool, item_id: int, is_prompt: bool) -> None:
    """Retry a failed or rejected recording (or, with --prompt, a failed prompt) now."""
    from daemon import wakeup
    from daemon.pipeline import lifecycle
    from daemon.prompts import lifecycle as prompt_lifecycle

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
            session.refresh(prompt)
            retried = prompt_json(prompt)
        wakeup.poke(settings.state_dir, "prompt", "upload")
        click.echo(json.dumps(retried, indent=2) if as_json else f"prompt {item_id} queued again")
        return
    session, recording = open_row(settings, Recording, item_id, "recording", write=True)
    with session:
        if recording.state not in ("failed", "rejected"):
            fail(f"recording {item_id} is {recording.state}; only failed or rejected recordings can be retried")
        lifecycle.retry(session, recording, now=now, reason="retry requested from the command line")
        session.commit()
        session.refresh(recording)
        retried = recording_json(recording)
    wakeup.poke(settings.state_dir, "convert", "upload")
    click.echo(json.dumps(retried, indent=2) if as_json else f"recording {item_id} queued for another attempt")
