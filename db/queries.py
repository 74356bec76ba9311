"""Named queries shared by the daemon and the CLI."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import DaemonState, Prompt, Recording, TokenUsage

# Recordings whose remote copy counts against the project's storage quota.
REMOTE_STATES = ("uploading", "processing", "active")


def recording_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(Recording.state, func.count()).group_by(Recording.state)).all()
    return {state: count for state, count in rows}


def prompt_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(Prompt.state, func.count()).group_by(Prompt.state)).all()
    return {state: count for state, count in rows}


def storage_used(session: Session) -> int:
    used = session.scalar(select(func.coalesce(func.sum(Recording.remote_bytes), 0))
                          .where(Recording.state.in_(("processing", "active"))))
    return int(used or 0)


def next_expiry(session: Session) -> tuple[int, datetime] | None:
    row = session.execute(select(Recording.id, Recording.remote_expires_at)
                          .where(Recording.state == "active", Recording.remote_expires_at.is_not(None))
                          .order_by(Recording.remote_expires_at).limit(1)).first()
    return (row[0], row[1]) if row else None


def daemon_state(session: Session) -> DaemonState | None:
    return session.get(DaemonState, 1)


def upload_backlog(session: Session) -> tuple[int, int]:
    """How many converted recordings wait to be uploaded, and their bytes."""
    count, size = session.execute(select(func.count(), func.coalesce(func.sum(Recording.converted_bytes), 0))
                                  .where(Recording.state == "converted")).one()
    return int(count), int(size)


def tokens_since(session: Session, since: datetime) -> dict[str, int]:
    """Tokens of every answer since `since`, cut-off ones included (all are billed; thinking counts as output)."""
    prompt, audio, output, thinking = session.execute(
        select(*(func.coalesce(func.sum(column), 0) for column in (
            TokenUsage.prompt_tokens, TokenUsage.audio_tokens, TokenUsage.output_tokens, TokenUsage.thinking_tokens)))
        .where(TokenUsage.at >= since)).one()
    return {"prompt": int(prompt), "audio": int(audio), "output": int(output), "thinking": int(thinking)}
