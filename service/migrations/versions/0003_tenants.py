"""Tenants and the API's lists: every identity and job has an owning tenant (existing rows: ``default``, the tenant
of the single shared API key); identities get a last-use time (retention), an Idempotency-Key and the request hash
it was made from; indexes for the paginated lists (tenant, created, id) and for an identity's job items. Job
Idempotency-Keys become per tenant: stored as ``<tenant>/<key>`` (existing ones get ``default/``).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("identities") as b:
        b.add_column(sa.Column("tenant", sa.Text, nullable=False, server_default="default"))
        b.add_column(sa.Column("last_used", sa.Float))
        b.add_column(sa.Column("idempotency_key", sa.Text))
        b.add_column(sa.Column("request_hash", sa.Text))
    with op.batch_alter_table("jobs") as b:
        b.add_column(sa.Column("tenant", sa.Text, nullable=False, server_default="default"))
    op.create_index("ix_identities_tenant_created", "identities", ["tenant", "created", "id"])
    op.create_index("ux_identities_idempotency_key", "identities", ["idempotency_key"], unique=True)
    op.create_index("ix_jobs_tenant_created", "jobs", ["tenant", "created", "id"])
    op.create_index("ix_job_items_identity", "job_items", ["identity_id"])
    jobs = sa.table("jobs", sa.column("idempotency_key", sa.Text))
    op.get_bind().execute(
        jobs.update()
        .where(jobs.c.idempotency_key.is_not(None))
        .values(idempotency_key=sa.literal("default/") + jobs.c.idempotency_key)
    )


def downgrade() -> None:
    jobs = sa.table("jobs", sa.column("idempotency_key", sa.Text))
    op.get_bind().execute(
        jobs.update()
        .where(jobs.c.idempotency_key.like("default/%"))
        .values(idempotency_key=sa.func.substr(jobs.c.idempotency_key, len("default/") + 1))
    )
    op.drop_index("ix_job_items_identity", "job_items")
    op.drop_index("ix_jobs_tenant_created", "jobs")
    op.drop_index("ux_identities_idempotency_key", "identities")
    op.drop_index("ix_identities_tenant_created", "identities")
    with op.batch_alter_table("jobs") as b:
        b.drop_column("tenant")
    with op.batch_alter_table("identities") as b:
        for col in ("request_hash", "idempotency_key", "last_used", "tenant"):
            b.drop_column(col)
