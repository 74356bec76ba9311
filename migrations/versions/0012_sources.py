"""sources: what became of each recording's source file (kept, moved, deleted), recorded before and after the
file is touched

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import db.types

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('recordings', schema=None) as batch_op:
        batch_op.add_column(sa.Column('source_action', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('source_moved_to', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('source_done_at', db.types.UTCDateTime(), nullable=True))
        batch_op.create_index(batch_op.f('ix_recordings_source_action'), ['source_action'], unique=False)
    # Recordings taken before sources could be moved or deleted keep them: a folder given source_action = "move"
    # or "delete" later acts on the recordings that arrive from then on, never on a whole past at once.
    op.execute("UPDATE recordings SET source_action = 'keep' WHERE state NOT IN ('discovered', 'converting')")


def downgrade() -> None:
    with op.batch_alter_table('recordings', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_recordings_source_action'))
        batch_op.drop_column('source_done_at')
        batch_op.drop_column('source_moved_to')
        batch_op.drop_column('source_action')
