"""`audiodrop status`, `files` and `show`: what the daemon holds, read straight from the database (read-only)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from daemon import nodes, notify, profiles
from daemon.cli import config_option, json_option, lock_holder, main, open_row, open_session, settings_or_exit
from daemon.cli.views import PROMPT_STATES, STATES, Filters, filter_options, recording_json, recordings_query
from daemon.clock import iso
from daemon.config import Settings
from daemon.prompts import pricing
from db import queries
from db.models import Node, Recording


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
    used, foreign, upcoming, state, local, fleet = 0, 0, None, None, None, []
    tokens_today = {"prompt": 0, "audio": 0, "output": 0, "thinking": 0, "cached": 0}
    spending, notifications = None, None
    if session is not None:
        with session:
            counts = queries.recording_counts(session)
            prompts = queries.prompt_counts(session)
            used = queries.ours_bytes(session)
            upcoming = queries.next_expiry(session)
            state = queries.daemon_state(session)
            local = session.get(Node, settings.service.node_name)
            fleet = nodes.listing(session, datetime.now(UTC))
            foreign = (state.foreign_bytes or 0) if state else 0
            tokens_today = queries.tokens_since(session, datetime.now(UTC).replace(hour=0, minute=0, second=0,
                                                                                   microsecond=0))
            now = datetime.now(UTC)
            spending = pricing.spending(queries.ledger_since(session, pricing.month_start(now)), now,
                                        settings.price_table)
            notifications = notify.summary(session)
    live = local is not None and running
    report: dict[str, Any] = {
        "daemon": {"running": running, "pid": holder if running else None, "node": settings.service.node_name,
                   "heartbeat_at": iso(local.heartbeat_at) if local else None,
                   "waiting_for": local.waiting_for if live and local else None,
                   "offline_since": iso(local.offline_since) if live and local else None,
                   "unavailable_folders": (local.unavailable_folders or "").splitlines() if live and local
                   else []},
        "nodes": fleet,
        "recordings": {name: counts.get(name, 0) for name in STATES},
        "prompts": {name: prompts.get(name, 0) for name in PROMPT_STATES},
        "storage": {"used_bytes": used + foreign, "limit_bytes": settings.gemini.storage_limit_bytes,
                    "ours_bytes": used, "foreign_bytes": foreign,
                    "headroom_bytes": settings.gemini.storage_headroom_bytes,
                    "reconciled_at": iso(state.reconciled_at) if state else None},
        "next_expiry": {"recording_id": upcoming[0], "expires_at": iso(upcoming[1])} if upcoming else None,
        "tokens_today": tokens_today,
        "cost": _cost(settings, spending),
        "notifications": notifications,
        "state_dir": str(settings.state_dir),
        "profiles": profiles.statuses(settings),  # each drop folder's .audiodrop.toml: loaded, or ignored and why
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
    waiting = report["daemon"]["waiting_for"]
    if waiting:
        console.print(f"waiting: {waiting}")
    if len(fleet) > 1:
        for node in fleet:
            work = ", ".join(f"{count} {what}" for what, count in node["work_in_hand"].items()) or "nothing in hand"
            console.print(f"node {node['name']}: {'alive' if node['alive'] else 'silent'}, last heartbeat "
                          f"{node['last_heartbeat']}, {work}" + (f"; {node['waiting_for']}" if node["waiting_for"]
                                                                else ""))
    for folder in report["daemon"]["unavailable_folders"]:
        console.print(f"[yellow]unavailable drop folder[/yellow]: {folder}")
    for profile in report["profiles"]:
        if profile["state"] == "ignored":
            console.print(f"[yellow]folder profile ignored[/yellow]: {profile['path']}: {profile['error']}")
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
    cached = f", {tokens_today['cached']} cached" if tokens_today["cached"] else ""
    console.print(f"tokens today (UTC): {tokens_today['prompt']} in ({tokens_today['audio']} audio{cached}), "
                  f"{tokens_today['output']} out{thinking}")
    cost = report["cost"]
    if cost:
        limits = [f"{label} budget ${cost[key]:.2f}" for label, key in (("daily", "daily_budget_usd"),
                                                                         ("monthly", "monthly_budget_usd"))
                  if cost[key] is not None]
        console.print(f"spent: ${cost['today_usd']:.4f} today, ${cost['month_usd']:.4f} this month (UTC)"
                      + (f"; {', '.join(limits)}" if limits else "")
                      + (f"; no price for {', '.join(cost['unpriced_models'])}" if cost["unpriced_models"] else ""))
    if notifications and (notifications["pending"] or notifications["gave_up"]):
        console.print(f"notifications: {notifications['pending']} waiting to be delivered, "
                      f"{notifications['gave_up']} given up" + (f" (last error: {notifications['last_error']})"
                                                                 if notifications["last_error"] else ""))


def _cost(settings: Settings, spending: pricing.Spending | None) -> dict[str, Any] | None:
    """Today's and this month's spend in dollars (UTC days), with the budget; None before any database."""
    if spending is None:
        return None
    budget = settings.budget
    return {"today_usd": float(spending.today_usd), "month_usd": float(spending.month_usd),
            "daily_budget_usd": float(budget.daily_usd) if budget.daily_usd is not None else None,
            "monthly_budget_usd": float(budget.monthly_usd) if budget.monthly_usd is not None else None,
            "unpriced_models": list(spending.unpriced_models)}


@main.command()
@config_option
@json_option
@filter_options(STATES)
def files(config_path: str | None, as_json: bool, state: str | None, folder: str | None, template: str | None,
          since: datetime | None, until: datetime | None) -> None:
    """List the recordings (filters combine: --state, --folder, --template, --since, --until)."""
    settings = settings_or_exit(config_path)
    session = open_session(settings)
    recordings: list[Recording] = []
    if session is not None:
        with session:
            query = recordings_query(Filters(state, folder, template, since, until))
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
    filtered = any((state, folder, template, since, until))
    Console().print(table if recordings else "no recordings match" if filtered else "no recordings yet")


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
        # What became of the source file (daemon.pipeline.sources); null until it is decided.
        report["source"] = {"action": recording.source_action, "moved_to": recording.source_moved_to,
                            "done_at": iso(recording.source_done_at)} if recording.source_action else None
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
    if report["source"] and report["source"]["action"] != "keep":
        source = report["source"]
        console.print(f"  source: {source['action']}" + (f" to {source['moved_to']}" if source["action"] in
                                                          ("move", "moved") else "")
                      + (f" at {source['done_at']}" if source["done_at"] else " (in progress)"))
    table = Table("at", "change", "reason", box=None)
    for event in report["history"]:
        change = event["to"] if event["from"] in (None, event["to"]) else f"{event['from']} -> {event['to']}"
        table.add_row(event["at"], change, event["reason"])
    console.print(table)
