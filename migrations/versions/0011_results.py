"""results: trimming (on or off, the map, what it saved), speaker names and extra result formats per prompt;
a recording's progress in seconds of audio converted and bytes uploaded

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 15:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import db.types

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('prompts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('trim', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('trim_map', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('trimmed_seconds', sa.Double(), nullable=True))
        batch_op.add_column(sa.Column('speakers', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('extra_formats', sa.String(length=64), nullable=True))

    with op.batch_alter_table('recordings', schema=None) as batch_op:
        batch_op.add_column(sa.Column('progress_seconds', sa.Double(), nullable=True))
        batch_op.add_column(sa.Column('progress_bytes', db.types.Int64, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('recordings', schema=None) as batch_op:
        batch_op.drop_column('progress_bytes')
        batch_op.drop_column('progress_seconds')

    with op.batch_alter_table('prompts', schema=None) as batch_op:
        batch_op.drop_column('extra_formats')
        batch_op.drop_column('speakers')
        batch_op.drop_column('trimmed_seconds')
        batch_op.drop_column('trim_map')
        batch_op.drop_column('trim')
