"""Engines and sessions on the SQLite file: WAL so the CLI reads while the daemon writes, a busy timeout,
foreign keys on, and migrations applied to head when the daemon starts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

BUSY_TIMEOUT_MS = 10_000


def make_engine(path: Path, *, readonly: bool = False) -> Engine:
    if readonly:
        # SQLAlchemy's documented URI form for a read-only SQLite connection.
        url = f"sqlite:///file:{path}?mode=ro&uri=true"
    else:
        url = f"sqlite:///{path}"
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        if not readonly:
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One short transaction: commit on success, roll back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(path: Path) -> Any:
    from alembic.config import Config

    import migrations

    config = Config()
    config.set_main_option("script_location", migrations.__path__[0])
    config.set_main_option("sqlalchemy.url", f"sqlite:///{path}")
    return config


def upgrade_to_head(path: Path) -> None:
    """Create or migrate the database file; state files are private to the daemon's group (0640)."""
    from alembic import command

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        command.upgrade(alembic_config(path), "head")
        return
    # A new database is built under a temporary name and renamed into place, so a reader never sees it
    # half made.
    building = path.with_name(f".{path.name}.new-{os.getpid()}")
    building.unlink(missing_ok=True)
    building.touch(mode=0o640)
    os.chmod(building, 0o640)
    command.upgrade(alembic_config(building), "head")
    os.replace(building, path)


def schema_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    import migrations

    config = alembic_config(Path("unused.db"))
    config.set_main_option("script_location", migrations.__path__[0])
    return ScriptDirectory.from_config(config).get_current_head()
