"""Named queries shared by the daemon and the CLI."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import DaemonState, Prompt, Recording, RemoteDeletion, TokenUsage
from db.states import RecordingState


def recording_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(Recording.state, func.count()).group_by(Recording.state)).all()
    return dict(rows)


def prompt_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(Prompt.state, func.count()).group_by(Prompt.state)).all()
    return dict(rows)


def ours_bytes(session: Session) -> int:
    """Our bytes on the server: live copies, uploads in flight (reserved at their claim), copies being deleted.
    The one storage sum: the ledger, `status` and the systemd status line all read it."""
    live = session.scalar(select(func.coalesce(func.sum(Recording.remote_bytes), 0))
                          .where(Recording.state.in_((RecordingState.PROCESSING, RecordingState.ACTIVE))))
    in_flight = session.scalar(select(func.coalesce(func.sum(Recording.converted_bytes), 0))
                               .where(Recording.state == RecordingState.UPLOADING))
    leaving = session.scalar(select(func.coalesce(func.sum(RemoteDeletion.remote_bytes), 0)))
    return int(live or 0) + int(in_flight or 0) + int(leaving or 0)


def next_expiry(session: Session) -> tuple[int, datetime] | None:
    row = session.execute(select(Recording.id, Recording.remote_expires_at)
                          .where(Recording.state == "active", Recording.remote_expires_at.is_not(None))
                          .order_by(Recording.remote_expires_at).limit(1)).first()
    return (row[0], row[1]) if row and row[1] is not None else None


def daemon_state(session: Session) -> DaemonState | None:
    return session.get(DaemonState, 1)


def upload_backlog(session: Session) -> tuple[int, int]:
    """How many converted recordings wait to be uploaded, and their bytes."""
    count, size = session.execute(select(func.count(), func.coalesce(func.sum(Recording.converted_bytes), 0))
                                  .where(Recording.state == "converted")).one()
    return int(count), int(size or 0)


def ledger_since(session: Session, since: datetime) -> list[TokenUsage]:
    """The token ledger's rows since `since` (what a spend is summed from)."""
    return list(session.scalars(select(TokenUsage).where(TokenUsage.at >= since)).all())


def tokens_since(session: Session, since: datetime) -> dict[str, int]:
    """Tokens of every answer since `since`, cut-off ones included (all are billed; thinking counts as output)."""
    columns = {"prompt": TokenUsage.prompt_tokens, "audio": TokenUsage.audio_tokens,
               "output": TokenUsage.output_tokens, "thinking": TokenUsage.thinking_tokens,
               "cached": TokenUsage.cached_tokens}
    sums = session.execute(select(*(func.coalesce(func.sum(column), 0) for column in columns.values()))
                           .where(TokenUsage.at >= since)).one()
    return {name: int(value) for name, value in zip(columns, sums, strict=True)}
