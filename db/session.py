"""Engines and sessions on the SQLite file: WAL so the CLI reads while the daemon writes, a busy timeout,
foreign keys on; opening checks the file's integrity first, keeps a backup before every migration, and refuses
a schema newer than this code."""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Result, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from daemon.errors import DatabaseError

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000
CACHE_KIB = 1024  # page cache per connection (SQLite's default is 2 MiB); the database is small and hot
BACKUPS_KEPT = 3


def _readonly_connection(path: Path) -> sqlite3.Connection:
    """A read-only connection. When the database is not being written (no -wal file) and its folder is not ours
    to write, SQLite cannot create the shared-memory file a WAL reader needs: then the file is opened as immutable,
    which is exact while nobody writes (a member of the service's group reading a stopped daemon's state)."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                                 check_same_thread=False)
    try:
        connection.execute("PRAGMA schema_version").fetchone()
        return connection
    except sqlite3.OperationalError:
        connection.close()
        if os.path.exists(f"{path}-wal"):
            raise
    return sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)


def make_engine(path: Path, *, readonly: bool = False) -> Engine:
    if readonly:
        engine = create_engine("sqlite://", creator=lambda: _readonly_connection(path))
    else:
        engine = create_engine(f"sqlite:///{path}",
                               connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        cursor.execute("PRAGMA foreign_keys = ON")
        if not readonly:
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    return engine


def rowcount(result: Result[Any]) -> int:
    """How many rows an UPDATE or DELETE changed (Session.execute is typed as returning a plain Result)."""
    return cast("CursorResult[Any]", result).rowcount


def advisory_lock(session: Session, name: str) -> None:
    """Serialize a read-then-write across the nodes of a fleet (the storage ledger, a model's rate limit): a
    PostgreSQL transaction lock taken now and released at commit. SQLite needs none: one daemon writes it."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": name})


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


def alembic_config(where: Path | str) -> Any:
    """Alembic's configuration for a SQLite file (a path) or any database URL."""
    from alembic.config import Config

    import migrations

    config = Config()
    config.set_main_option("script_location", migrations.__path__[0])
    url = where if isinstance(where, str) and "://" in where else f"sqlite:///{where}"
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # a password may hold a '%'
    return config


def check_integrity(path: Path) -> None:
    """DatabaseError, saying what to do, when the file is not a healthy SQLite database (a crash or a disk
    error can leave it so): refusing to start beats a crash loop on a damaged file."""
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)) as db:
            verdict = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
    except sqlite3.DatabaseError as err:
        verdict = [str(err)]
    if verdict != ["ok"]:
        backups = sorted(path.parent.glob(f"{path.name}.backup-*"))
        restore = f"restore the newest backup ({backups[-1].name}) over it, or " if backups else ""
        raise DatabaseError(f"the database {path} is damaged ({'; '.join(verdict[:3])})",
                            f"stop audiodrop, then {restore}move the file away: audiodrop starts a new one and finds "
                            "the recordings in the drop folders again (their results and history stay in the damaged "
                            "file)")


def upgrade_to_head(path: Path) -> None:
    """Create or migrate the database file; state files are private to the daemon's group (0640). An existing
    file is checked first and copied aside before its schema changes; a schema newer than this code is refused."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        check_integrity(path)
        current, head = file_revision(path), head_revision()
        if current == head:
            return
        if current is not None and current not in known_revisions():
            raise DatabaseError(f"the database {path} has schema {current}, newer than this audiodrop knows "
                                f"(up to {head})", "run the newer audiodrop that wrote it, or restore a backup")
        from alembic import command

        backup(path, f"{current or 'empty'}")
        command.upgrade(alembic_config(path), "head")
        return
    # A new database is built under a temporary name and renamed into place, so a reader never sees it
    # half made.
    from alembic import command

    building = path.with_name(f".{path.name}.new-{os.getpid()}")
    building.unlink(missing_ok=True)
    building.touch(mode=0o640)
    os.chmod(building, 0o640)
    command.upgrade(alembic_config(building), "head")
    os.replace(building, path)


def backup(path: Path, label: str) -> Path:
    """A consistent copy of the database beside it (SQLite's online backup), keeping the newest few."""
    target = path.with_name(f"{path.name}.backup-{time.strftime('%Y%m%d-%H%M%S')}-{label}")
    with closing(sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000)) as source, \
            closing(sqlite3.connect(str(target))) as copy:
        source.backup(copy)
    os.chmod(target, 0o640)
    for old in sorted(path.parent.glob(f"{path.name}.backup-*"))[:-BACKUPS_KEPT]:
        old.unlink(missing_ok=True)
    log.info("kept a copy of the database before migrating it: %s", target.name)
    return target


def file_revision(path: Path) -> str | None:
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)) as db:
        try:
            row = db.execute("SELECT version_num FROM alembic_version").fetchone()
        except sqlite3.OperationalError:
            return None
    return row[0] if row else None


def schema_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


_REVISION = re.compile(r"^(revision|down_revision)\s*=\s*['\"]?([0-9A-Za-z_]+|None)['\"]?\s*$", re.MULTILINE)


def _revisions() -> dict[str, str | None]:
    """Each migration's revision and the one it follows, read from the files: starting a daemon whose database
    is already at head needs no Alembic (which costs about 10 MB of memory to import)."""
    import migrations

    found: dict[str, str | None] = {}
    for script in Path(migrations.__path__[0], "versions").glob("*.py"):
        fields = dict(_REVISION.findall(script.read_text(encoding="utf-8")))
        if "revision" in fields:
            down = fields.get("down_revision")
            found[fields["revision"]] = None if down in (None, "None") else down
    return found


def head_revision() -> str | None:
    revisions = _revisions()
    followed = set(revisions.values())
    heads = [revision for revision in revisions if revision not in followed]
    return heads[0] if len(heads) == 1 else None


def known_revisions() -> set[str]:
    return set(_revisions())


# -- the database of a configuration: the SQLite file in state_dir, or PostgreSQL (fleet mode) -------------------

POSTGRES_TIMEOUTS = "-c statement_timeout=60000 -c idle_in_transaction_session_timeout=60000 -c TimeZone=UTC"


def is_fleet(url: str | None) -> bool:
    return bool(url) and str(url).startswith("postgresql")


def open_engine(database_path: Path, url: str | None, *, readonly: bool = False) -> Engine:
    """The engine for a configuration: SQLite (make_engine) unless `url` names PostgreSQL. On PostgreSQL a
    connection is checked before use (the server may have restarted), a frozen client's transaction cannot hold
    locks for long, and the read-only CLI gets read-only transactions."""
    if not is_fleet(url):
        return make_engine(database_path, readonly=readonly)
    options = POSTGRES_TIMEOUTS + (" -c default_transaction_read_only=on" if readonly else "")
    return create_engine(str(url), pool_pre_ping=True, pool_size=5, max_overflow=10, pool_recycle=600,
                         connect_args={"connect_timeout": 5, "options": options})


def migrate(database_path: Path, url: str | None) -> None:
    """Bring the database to head: the SQLite file (upgrade_to_head), or PostgreSQL, where a schema newer than
    this code is refused and nodes starting together migrate one at a time (migrations/env.py's advisory lock)."""
    if not is_fleet(url):
        upgrade_to_head(database_path)
        return
    engine = open_engine(database_path, url)
    try:
        current = schema_revision(engine)
    finally:
        engine.dispose()
    head = head_revision()
    if current == head:
        return
    if current is not None and current not in known_revisions():
        raise DatabaseError(f"the database has schema {current}, newer than this audiodrop knows (up to {head})",
                            "upgrade audiodrop on this node to the version the others run")
    from alembic import command

    command.upgrade(alembic_config(str(url)), "head")


def describe_failure(err: BaseException, url: str | None) -> tuple[str, bool]:
    """What a failure to reach the database means for a person, and whether waiting may help (the server is
    down or unreachable) or not (wrong credentials, no such database): one clear line, never a traceback."""
    message = str(getattr(err, "orig", None) or err).strip().splitlines()[0] if str(err).strip() else repr(err)
    where = place(url)
    lowered = message.lower()
    if "password authentication failed" in lowered or "authentication failed" in lowered \
            or "no pg_hba.conf entry" in lowered or "role" in lowered and "does not exist" in lowered:
        return f"the database server at {where} refused the credentials ({message})", False
    if "database" in lowered and "does not exist" in lowered:
        return f"there is no such database at {where} ({message}); create it first (createdb)", False
    return f"the database at {where} cannot be reached ({message})", True


def place(url: str | None) -> str:
    """Where the database is, for messages: host:port/name, never the password."""
    if not is_fleet(url):
        return "the SQLite file"
    from sqlalchemy.engine import make_url

    parsed = make_url(str(url))
    return f"{parsed.host}:{parsed.port or 5432}/{parsed.database}"  # never the password
