"""search: the full-text index over prompt results (daemon.prompts.search owns it)

SQLite: an FTS5 table, one row per transcript line or other answer, its key prompt_id << 20 | line.
PostgreSQL (fleet mode): a plain table with a tsvector column under a GIN index, the same keys.
Neither is in the models' metadata: include_name in migrations/env.py keeps autogenerate off them.
The index is filled from the answers already stored, so an upgraded database is searchable at once.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 10:00:00.000000
"""

from __future__ import annotations

from alembic import context, op
from sqlalchemy.orm import Session

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

SQLITE_TABLE = """
CREATE VIRTUAL TABLE search_lines USING fts5(
    text,
    speaker UNINDEXED,
    prompt_id UNINDEXED,
    line UNINDEXED,
    seconds UNINDEXED,
    tokenize = 'unicode61 remove_diacritics 2'
)
"""

POSTGRES_TABLE = """
CREATE TABLE search_lines (
    id BIGINT PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts (id) ON DELETE CASCADE,
    line INTEGER NOT NULL,
    seconds DOUBLE PRECISION,
    speaker TEXT,
    text TEXT NOT NULL,
    document TSVECTOR NOT NULL
)
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute(SQLITE_TABLE)
    else:
        op.execute(POSTGRES_TABLE)
        op.execute("CREATE INDEX ix_search_lines_document ON search_lines USING GIN (document)")
        op.execute("CREATE INDEX ix_search_lines_prompt_id ON search_lines (prompt_id)")
    if not context.is_offline_mode():
        _fill()


def _fill() -> None:
    """Index the answers stored before this revision. It uses the search module as it is when this runs; that
    reads only prompts.id, state and result_text, which revision 0008 has."""
    from daemon.prompts import search

    session = Session(bind=op.get_bind())
    try:
        search.rebuild(session)
        session.flush()
    finally:
        session.close()


def downgrade() -> None:
    op.execute("DROP TABLE search_lines")
