from __future__ import annotations

from sqlalchemy import BigInteger, Index, Integer, String, text
from sqlalchemy.orm import Mapped, mapped_column

from service.db.base import Base

PER_TOKEN_ROWS = text("query_token IS NOT NULL")


class AttributionResult(Base):
    """One ranked row: the training unit at ``rank`` for one query (or none) and one direction.

    ``query_pos`` orders query rows as in the query dataset (0 when there is no query); ids are stored as
    text and given back with their own JSON type by the dataset's ``ids_are_strings``. A per-token attribution
    has one query row per scored token of each query (query_pos counts them, in query then position order):
    ``query_token`` is the token's position in its query and ``query_token_text`` the token decoded (null
    without a tokenizer); both are null in every other attribution. The two partial indexes hold only
    per-token rows: they serve pages filtered by ``query_token``.
    """

    __tablename__ = "attribution_results"
    __table_args__ = (
        Index("ix_results_page", "attribution_id", "direction", "query_pos", "rank", unique=True),
        Index("ix_results_query", "attribution_id", "direction", "query_id", "query_pos", "rank"),
        Index(
            "ix_results_token",
            "attribution_id",
            "direction",
            "query_token",
            "query_pos",
            "rank",
            postgresql_where=PER_TOKEN_ROWS,
            sqlite_where=PER_TOKEN_ROWS,
        ),
        Index(
            "ix_results_query_token",
            "attribution_id",
            "direction",
            "query_id",
            "query_token",
            "query_pos",
            "rank",
            postgresql_where=PER_TOKEN_ROWS,
            sqlite_where=PER_TOKEN_ROWS,
        ),
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
    query_token: Mapped[int | None] = mapped_column(default=None)
    query_token_text: Mapped[str | None] = mapped_column(String(200), default=None)
