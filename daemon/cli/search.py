"""`audiodrop search` and `audiodrop open`: finding words in the results, and the result file (and line) to open
for a hit. Reads the database read-only; `search --rebuild` is the one write (the search index, remade)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from daemon.cli import config_option, fail, json_option, main, open_row, open_session, settings_or_exit
from daemon.clock import iso
from db.models import Prompt

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from daemon.prompts.search import Hit

STYLE_MARKS = ("\x02", "\x03")  # matched words in the table's snippets, turned into bold by _styled


def parse_when(value: str | None, *, end_of_day: bool = False) -> datetime | None:
    """An ISO 8601 date or time (UTC unless it says otherwise); a bare date as `until` means its whole day."""
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date (2026-11-25) or time (2026-11-25T14:30)") from None
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return when + timedelta(days=1) if end_of_day and len(value.strip()) == 10 else when


def hit_json(hit: Hit) -> dict[str, Any]:
    from daemon.prompts.chunking import format_clock

    seconds = hit.timestamp_seconds
    return {
        "prompt_id": hit.prompt_id,
        "recording_ids": list(hit.recording_ids),
        "template": hit.template,
        "timestamp": seconds,
        "time": format_clock(seconds) if seconds is not None else None,
        "speaker": hit.speaker,
        "snippet": hit.snippet,
        "result_line": hit.line + 1,
        "recordings": [{"id": r.id, "name": r.name, "created_at": iso(r.created_at)} for r in hit.recordings],
        "finished_at": iso(hit.finished_at),
        "result_path": hit.result_path,
    }


@main.command(name="search")
@config_option
@json_option
@click.argument("query", required=False)
@click.option("--template", "-t", help="Only results of this template.")
@click.option("--recording", "recording_id", type=int, metavar="ID", help="Only results over this recording.")
@click.option("--since", metavar="DATE", help="Only recordings found at or after this date/time (UTC).")
@click.option("--until", metavar="DATE", help="Only recordings found before this time, or during this date (UTC).")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True, help="At most this many hits.")
@click.option("--rebuild", is_flag=True, help="Make the search index again from every stored result.")
def search_command(config_path: str | None, as_json: bool, query: str | None, template: str | None,
                   recording_id: int | None, since: str | None, until: str | None, limit: int, rebuild: bool) -> None:
    """Search every result's text. All words must occur in one line; "a phrase" in quotes, prefix* with a star;
    case and accents are ignored."""
    from daemon.prompts import search

    if query is None and not rebuild:
        raise click.UsageError("give a QUERY to search for, or --rebuild")
    if query is not None and not search.parse_query(query):
        raise click.UsageError(f"the query {query!r} has no words to search for")
    settings = settings_or_exit(config_path)
    window = parse_when(since), parse_when(until, end_of_day=True)
    if rebuild:
        rows = _rebuild(open_session(settings, write=True))
        if query is None:
            click.echo(json.dumps({"indexed_rows": rows}) if as_json else f"search index rebuilt: {rows} rows")
            return
        click.echo(f"search index rebuilt: {rows} rows", err=True)
    assert query is not None
    session = open_session(settings)
    hits, empty = _search(session, query, template=template, recording_id=recording_id, since=window[0],
                          until=window[1], limit=limit, marks=search.MARKS if as_json else STYLE_MARKS)
    if empty:
        click.echo("audiodrop: the search index is empty; `audiodrop search --rebuild` fills it from the stored "
                   "results", err=True)
    if as_json:
        click.echo(json.dumps([hit_json(hit) for hit in hits], indent=2, ensure_ascii=False))
    else:
        _print_table(hits)


def _rebuild(session: Session | None) -> int:
    """The index made again in one transaction; the number of rows."""
    from sqlalchemy.exc import SQLAlchemyError

    from daemon.prompts import search

    if session is None:
        fail("no database yet (the daemon has not run)")
    assert session is not None
    with session:
        try:
            rows = search.rebuild(session)
            session.commit()
        except SQLAlchemyError as err:
            fail(f"the search index could not be rebuilt: {getattr(err, 'orig', None) or err}")
            raise
    return rows


def _search(session: Session | None, query: str, **options: Any) -> tuple[list[Hit], bool]:
    """The hits, and whether the index is empty while results exist (nothing found because nothing indexed)."""
    from sqlalchemy.exc import SQLAlchemyError

    from daemon.prompts import search

    if session is None:
        return [], False
    with session:
        try:
            hits = search.search(session, query, **options)
            empty = not hits and search.needs_rebuild(session)
        except SQLAlchemyError as err:
            fail(f"the search failed: {getattr(err, 'orig', None) or err} (is the daemon's database at the newest "
                 "schema? starting the daemon migrates it)")
            raise
    return hits, empty


def _styled(snippet: str) -> Any:
    """Rich text with the words between STYLE_MARKS in bold (never parsed as markup: transcripts have [..])."""
    from rich.text import Text

    styled = Text()
    for index, piece in enumerate(snippet.replace(STYLE_MARKS[1], STYLE_MARKS[0]).split(STYLE_MARKS[0])):
        styled.append(piece, style="bold yellow" if index % 2 else "")
    return styled


def _print_table(hits: list[Hit]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from daemon.prompts.chunking import format_clock

    if not hits:
        Console().print("no hits")
        return
    table = Table("prompt", "recording", "template", "time", "text")
    for hit in hits:
        seconds = hit.timestamp_seconds
        names = ", ".join(f"{r.name} ({r.id})" for r in hit.recordings)
        table.add_row(str(hit.prompt_id), Text(names), Text(hit.template or "(own prompt)"),
                      format_clock(seconds) if seconds is not None else "", _styled(hit.snippet))
    Console().print(table)


@main.command(name="open")
@config_option
@json_option
@click.argument("prompt_id", type=int)
@click.option("--at", "at", metavar="TIME", help="Also the line of the transcript at or after this time (01:02:03): "
                                                 "prints PATH:LINE, as editors take it.")
def open_command(config_path: str | None, as_json: bool, prompt_id: int, at: str | None) -> None:
    """Print the path of a prompt's result file (with --at, PATH:LINE of the line said at that time)."""
    from daemon.prompts.chunking import parse_clock

    try:
        seconds = parse_clock(at) if at is not None else None
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--at") from None
    settings = settings_or_exit(config_path)
    session, prompt = open_row(settings, Prompt, prompt_id, "prompt")
    with session:
        state, path = prompt.state, prompt.result_path
    if path is None:
        fail(f"prompt {prompt_id} has no result file" + (" yet" if state in ("queued", "running", "done") else "")
             + f" ({state})")
    assert path is not None
    line = None if seconds is None else line_at(prompt_id, Path(path), seconds)
    if as_json:
        click.echo(json.dumps({"prompt_id": prompt_id, "path": path, "line": line}, indent=2))
    else:
        click.echo(path if line is None else f"{path}:{line}")


def line_at(prompt_id: int, path: Path, seconds: float) -> int:
    """The 1-based line of the result file whose timestamp is the first at or after `seconds`."""
    from daemon.prompts.chunking import format_clock, parse_transcript

    try:
        lines = parse_transcript(path.read_text(encoding="utf-8"))
    except OSError as err:
        fail(f"the result file of prompt {prompt_id} cannot be read ({err.strerror or err}: {path})")
        raise
    stamped = [(index, line.seconds) for index, line in enumerate(lines, 1) if line.seconds is not None]
    if not stamped:
        fail(f"the result of prompt {prompt_id} has no timestamps")
    later = [index for index, when in stamped if when >= seconds]
    if not later:
        fail(f"the result of prompt {prompt_id} ends at {format_clock(stamped[-1][1])}, "
             f"before {format_clock(seconds)}")
    return later[0]
