from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, String, false
from sqlalchemy.orm import Mapped, mapped_column

from service.db.base import Base, utcnow


class Attribution(Base):
    """An attribution request, what it was computed with, and its diagnostics."""

    __tablename__ = "attributions"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    method: Mapped[str] = mapped_column(String(32))
    mode: Mapped[str] = mapped_column(String(16))
    measurement: Mapped[str] = mapped_column(String(16))
    model_ids: Mapped[list[str]]
    train_dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    query_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"), default=None)
    fit_id: Mapped[str | None] = mapped_column(ForeignKey("fits.id"), default=None)
    top_k: Mapped[int]
    options: Mapped[dict[str, Any]]
    used_fit_ids: Mapped[list[str] | None] = mapped_column(default=None)
    diagnostics: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    num_results: Mapped[int] = mapped_column(default=0)
    # Each scored query token attributed separately (causal LM, pairwise): result rows carry query_token.
    per_token: Mapped[bool] = mapped_column(default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
