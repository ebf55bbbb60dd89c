from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from service.db.base import Base, utcnow

JobKind = Literal["fit", "attribution", "edit"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATUSES: tuple[JobStatus, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED_STATUSES: tuple[JobStatus, ...] = ("succeeded", "failed", "cancelled")


class Job(Base):
    """A unit of queued work. This row, not the broker, is the truth about the job."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
        # the reaper's two questions: running jobs by heartbeat, queued jobs by when they were last sent
        Index("ix_jobs_status_heartbeat", "status", "heartbeat_at"),
        Index("ix_jobs_status_enqueued", "status", "enqueued_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    kind: Mapped[JobKind] = mapped_column(String(16))
    status: Mapped[JobStatus] = mapped_column(String(16), default="queued")
    progress_stage: Mapped[str] = mapped_column(String(64), default="queued")
    progress_completed: Mapped[int] = mapped_column(default=0)
    progress_total: Mapped[int] = mapped_column(default=0)
    error: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    attempts: Mapped[int] = mapped_column(default=0)  # claims by a worker; also fences a superseded attempt
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)  # last message sent to the broker
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)  # last sign of life of its worker
    claimed_by: Mapped[str | None] = mapped_column(String(255), default=None)  # host:pid of that worker
