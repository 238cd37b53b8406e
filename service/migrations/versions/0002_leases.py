"""Job leases (owner, expiry, attempts), the replicas table, an index for the job queue; result paths that an older
build may have stored absolute are made relative to the data directory.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as b:
        b.add_column(sa.Column("lease_owner", sa.Text))
        b.add_column(sa.Column("lease_expires", sa.Float))
        b.add_column(sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
    op.create_index("ix_jobs_status_created", "jobs", ["status", "created"])
    op.create_table(
        "replicas",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("started", sa.Float, nullable=False),
        sa.Column("heartbeat", sa.Float, nullable=False),
    )
    # 'results/<job>/<file>' is the only form the service reads; keep the tail of any absolute path
    results = sa.table("results", sa.column("file", sa.Text))
    conn = op.get_bind()
    for (path,) in conn.execute(sa.select(results.c.file).where(~results.c.file.like("results/%"))).all():
        at = path.replace("\\", "/").rfind("/results/")
        if at >= 0:
            conn.execute(results.update().where(results.c.file == path).values(file=path[at + 1 :]))


def downgrade() -> None:
    op.drop_table("replicas")
    op.drop_index("ix_jobs_status_created", "jobs")
    with op.batch_alter_table("jobs") as b:
        b.drop_column("attempts")
        b.drop_column("lease_expires")
        b.drop_column("lease_owner")
