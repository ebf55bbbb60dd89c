from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from service.db.base import Base

SHARD_STATUSES = ("queued", "running", "done", "failed")


class JobShard(Base):
    """One training range of a sharded job. The job's row stays the truth about the job; this row is the truth
    about the shard: who runs it (``attempts`` fences its writers), whether it is alive (``heartbeat_at``), and
    where its output is once done (``output_sha256``, a blob — never result rows)."""

    __tablename__ = "job_shards"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    shard: Mapped[int] = mapped_column(primary_key=True)  # position of the range, from 0
    start: Mapped[int] = mapped_column()
    stop: Mapped[int] = mapped_column()
    status: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(default=0)
    claimed_by: Mapped[str | None] = mapped_column(String(255), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    progress_completed: Mapped[int] = mapped_column(default=0)
    progress_total: Mapped[int] = mapped_column(default=0)
    # what every shard scores against: {"curvatures": sha256, "queries": sha256 | null}
    prepared: Mapped[dict[str, Any]] = mapped_column()
    output_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    error: Mapped[dict[str, Any] | None] = mapped_column(default=None)
