"""Alembic environment: migrates the daemon's database (SQLite file, or PostgreSQL in fleet mode); batch mode
because SQLite cannot ALTER much. On PostgreSQL the migration holds an advisory lock, so nodes that start together
migrate one after the other (the second finds the schema at head)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, text

from db.models import Base

config = context.config
target_metadata = Base.metadata
# pg_advisory_lock key of the schema migration (any fixed 64-bit number, the same on every node).
MIGRATION_LOCK = 0x61756469_6F64726F  # "audiodro"


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Tables outside the models (full-text search's own tables) are not ours to compare."""
    return type_ != "table" or name in target_metadata.tables or name == "alembic_version"


def run_migrations_online() -> None:
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as connection:
        postgres = connection.dialect.name == "postgresql"
        if postgres:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
            connection.commit()
        try:
            context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                              include_name=include_name)
            with context.begin_transaction():
                context.run_migrations()
        finally:
            if postgres:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
                connection.commit()
    engine.dispose()


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      render_as_batch=True, literal_binds=True, include_name=include_name)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
