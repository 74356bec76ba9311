"""prompt requested model (kept when a prompt falls back to another model), 500s in a row, thinking tokens

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 11:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('prompts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('requested_model', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('internal_errors', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('thinking_tokens', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('prompts', schema=None) as batch_op:
        batch_op.drop_column('thinking_tokens')
        batch_op.drop_column('internal_errors')
        batch_op.drop_column('requested_model')
