"""costs: each answer's cost in dollars and its cached and batch usage; a prompt's cost, its budget exemption
(ask --force) and its Batch API job

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 15:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Rows already in the ledger get cost_usd NULL: `status` prices them from their token counts, or says the
    # model has no price. The server defaults fill the existing rows and keep the columns NOT NULL.
    with op.batch_alter_table('token_usage', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cost_usd', sa.Numeric(precision=12, scale=6), nullable=True))
        batch_op.add_column(sa.Column('cached_tokens', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('batch', sa.Boolean(), server_default=sa.false(), nullable=False))

    with op.batch_alter_table('prompts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cost_usd', sa.Numeric(precision=12, scale=6), nullable=True))
        batch_op.add_column(sa.Column('cached_tokens', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('force_budget', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('batch', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('batch_name', sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('prompts', schema=None) as batch_op:
        batch_op.drop_column('batch_name')
        batch_op.drop_column('batch')
        batch_op.drop_column('force_budget')
        batch_op.drop_column('cached_tokens')
        batch_op.drop_column('cost_usd')

    with op.batch_alter_table('token_usage', schema=None) as batch_op:
        batch_op.drop_column('batch')
        batch_op.drop_column('cached_tokens')
        batch_op.drop_column('cost_usd')
