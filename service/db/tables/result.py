from __future__ import annotations

from sqlalchemy import BigInteger, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from service.db.base import Base


class AttributionResult(Base):
    """One ranked row: the training unit at ``rank`` for one query (or none) and one direction.

    ``query_pos`` orders queries as in the query dataset (0 when there is no query); ids are stored as
    text and given back with their own JSON type by the dataset's ``ids_are_strings``.
    """

    __tablename__ = "attribution_results"
    __table_args__ = (
        Index("ix_results_page", "attribution_id", "direction", "query_pos", "rank", unique=True),
        Index("ix_results_query", "attribution_id", "direction", "query_id", "query_pos", "rank"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    # attributions.id, without a foreign key: checking one per row doubled the bulk write of a full ranking on
    # PostgreSQL; rows are written only by the job of an existing attribution, and attributions are never deleted.
    attribution_id: Mapped[str] = mapped_column(String(40))
    direction: Mapped[str] = mapped_column(String(8))
    query_pos: Mapped[int]
    query_id: Mapped[str | None] = mapped_column(String(200))
    rank: Mapped[int]
    train_id: Mapped[str] = mapped_column(String(200))
    score: Mapped[float]
    task: Mapped[int | None] = mapped_column(default=None)
    split: Mapped[int | None] = mapped_column(default=None)
