"""Where a recording's compact copy is read from. On one machine it is the file in state_dir/converted. In a
fleet the copy is also kept in the database (1 MiB pieces), so any node can upload it again or cut pieces of it
for a prompt while the node that converted it is asleep; such a node keeps a local cache of what it fetched."""

from __future__ import annotations

import hashlib
import logging
import secrets
from pathlib import Path

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from daemon import atomic
from daemon.context import Context
from db.models import AudioCopy, Recording
from db.session import session_scope

log = logging.getLogger(__name__)

PIECE_BYTES = 1024 * 1024
CACHE_MARKER = ".fetching-"


def store(session: Session, sha256: str, path: Path) -> None:
    """Keep the copy `path` (whose SHA-256 is `sha256`) in the database, in this transaction."""
    if session.scalar(select(func.count()).select_from(AudioCopy).where(AudioCopy.sha256 == sha256)):
        return
    with open(path, "rb") as stream:
        piece = 0
        while data := stream.read(PIECE_BYTES):
            session.add(AudioCopy(sha256=sha256, piece=piece, data=data))
            session.flush()  # one piece in memory at a time
            session.expunge_all()
            piece += 1


def forget(session: Session, sha256: str) -> None:
    """The copy is no longer any recording's (a refused format converted again, a replaced part)."""
    session.execute(delete(AudioCopy).where(AudioCopy.sha256 == sha256))


def local(ctx: Context, recording: Recording) -> Path | None:
    """A path on this machine holding the recording's compact copy: its own file, else (in a fleet) a cached copy
    fetched from the database. None when there is no copy anywhere."""
    own = Path(recording.converted_path) if recording.converted_path else None
    if own is not None and own.is_file():
        return own
    if not ctx.fleet or not recording.converted_sha256:
        return None
    suffix = own.suffix if own is not None else ".ogg"
    cached = ctx.settings.state_dir / "cache" / f"{recording.converted_sha256[:24]}{suffix}"
    if cached.is_file():
        return cached
    return fetch(ctx.sessions, recording.converted_sha256, cached)


def fetch(sessions: sessionmaker[Session], sha256: str, destination: Path) -> Path | None:
    """Write the copy kept in the database to `destination`, a piece at a time, checked against its hash; None
    if it is not kept."""
    destination.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    temporary = destination.with_name(f".{destination.name}{CACHE_MARKER}{secrets.token_hex(4)}")
    digest, size = hashlib.sha256(), 0
    try:
        with session_scope(sessions) as session, open(temporary, "wb") as out:
            pieces = session.scalars(select(AudioCopy.data).where(AudioCopy.sha256 == sha256)
                                     .order_by(AudioCopy.piece).execution_options(yield_per=4))
            for piece in pieces:
                digest.update(piece)
                out.write(piece)
                size += len(piece)
        if not size:
            return None
        if digest.hexdigest() != sha256:
            log.warning("the compact copy %s kept in the database does not match its hash; not used", sha256[:16])
            return None
        atomic.replace(temporary, destination)
        return destination
    finally:
        temporary.unlink(missing_ok=True)
