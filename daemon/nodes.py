"""The daemons sharing one database (a fleet of one on SQLite): each node's heartbeat row, the clock that judges
leases (the database's, in a fleet), and what `status` shows of every node."""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import metadata
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from daemon.clock import iso
from db.models import Node

# A node whose heartbeat is older than this is shown as silent; its claims lapse with their leases anyway.
SILENT_AFTER_SECONDS = 30.0


class DatabaseClock:
    """Leases in a fleet are judged by the database's clock, never a node's: local time plus the offset to the
    database's now(), measured at start and with every heartbeat."""

    def __init__(self) -> None:
        self.offset = timedelta(0)
        self.lock = threading.Lock()

    def now(self) -> datetime:
        with self.lock:
            return datetime.now(UTC) + self.offset

    def measure(self, session: Session) -> timedelta:
        """Read the database's clock; returns (and keeps) how far ahead of this node's it is."""
        before = datetime.now(UTC)
        # clock_timestamp(), not now(): now() is the transaction's start.
        database_now = session.scalar(select(func.clock_timestamp()))
        after = datetime.now(UTC)
        if database_now is None:
            return self.offset
        if database_now.tzinfo is None:
            database_now = database_now.replace(tzinfo=UTC)
        with self.lock:
            self.offset = database_now - (before + (after - before) / 2)
            return self.offset


@dataclass(frozen=True)
class Beat:
    """What a node says about itself with each heartbeat."""

    waiting_for: str | None
    offline_since: datetime | None
    folders: list[str]
    unavailable: list[str]


def version() -> str:
    try:
        return metadata.version("audiodrop")
    except metadata.PackageNotFoundError:
        return "unknown"


def heartbeat(session: Session, name: str, run_id: str, beat: Beat, now: datetime) -> None:
    """Write this node's row: alive now, and what it waits for."""
    node = session.get(Node, name)
    if node is None:
        node = Node(name=name)
        session.add(node)
    if node.run_id != run_id:
        node.started_at = now
    node.run_id, node.pid, node.hostname, node.version = run_id, os.getpid(), socket.gethostname(), version()
    node.heartbeat_at, node.stopped_at = now, None
    node.waiting_for, node.offline_since = beat.waiting_for, beat.offline_since
    node.folders = "\n".join(beat.folders) or None
    node.unavailable_folders = "\n".join(beat.unavailable) or None


def last_heartbeat(session: Session, name: str) -> datetime | None:
    """The last heartbeat of node `name` before this run (None: never ran here)."""
    node = session.get(Node, name)
    return node.heartbeat_at if node is not None else None


def stopped(session: Session, name: str, run_id: str, now: datetime) -> None:
    session.execute(update(Node).where(Node.name == name, Node.run_id == run_id).values(stopped_at=now)
                    .execution_options(synchronize_session=False))


def holder_prefix(name: str) -> str:
    """Claims of node `name` (any run) start with this: `claimed_by` is "NAME/RUN"."""
    return f"{name}/"


def listing(session: Session, now: datetime) -> list[dict[str, Any]]:
    """Every node, for `status`: name, heartbeat, whether it is alive, its folders and what it waits for."""
    rows: list[dict[str, Any]] = []
    for node in session.scalars(select(Node).order_by(Node.name)):
        beat_age = (now - node.heartbeat_at).total_seconds() if node.heartbeat_at else None
        alive = node.stopped_at is None and beat_age is not None and beat_age <= SILENT_AFTER_SECONDS
        rows.append({"name": node.name, "last_heartbeat": iso(node.heartbeat_at), "alive": alive,
                     "hostname": node.hostname, "pid": node.pid, "version": node.version,
                     "started_at": iso(node.started_at), "stopped_at": iso(node.stopped_at),
                     "folders": (node.folders or "").splitlines(),
                     "unavailable_folders": (node.unavailable_folders or "").splitlines(),
                     "waiting_for": node.waiting_for if alive else None,
                     "work_in_hand": work_in_hand(session, node.name)})
    return rows


def work_in_hand(session: Session, name: str) -> dict[str, int]:
    """What a node holds claims on right now: conversions, uploads, prompts."""
    from db.models import Prompt, Recording

    held = holder_prefix(name) + "%"
    by_state = session.execute(select(Recording.state, func.count()).where(Recording.claimed_by.like(held))
                               .group_by(Recording.state)).all()
    work = {str(state): int(count) for state, count in by_state}
    prompts = session.scalar(select(func.count()).select_from(Prompt).where(Prompt.claimed_by.like(held)))
    if prompts:
        work["prompts"] = int(prompts)
    return work
