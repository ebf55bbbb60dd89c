from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from service.db.base import Base, utcnow


class Checkpoint(Base):
    """One point of a model's training trajectory (for SOURCE and TracInCP)."""

    __tablename__ = "checkpoints"
    __table_args__ = (Index("ix_checkpoints_model_stage_step", "model_id", "stage", "step"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    step: Mapped[int]
    learning_rate: Mapped[float]
    momentum: Mapped[float] = mapped_column(default=0.0)
    stage: Mapped[int] = mapped_column(default=0)
    optimizer: Mapped[str] = mapped_column(String(16), default="sgd")  # "sgd" (with momentum) | "adam"
    weights_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
