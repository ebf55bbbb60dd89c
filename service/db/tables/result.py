from __future__ import annotations

from sqlalchemy import Index, PrimaryKeyConstraint, String
from sqlalchemy.orm import Mapped, mapped_column

from service.db.base import Base

RESULT_KEY = ("attribution_id", "direction", "query_pos", "rank")


class AttributionResult(Base):
    """One ranked row: the training unit at ``rank`` for one query (or none) and one direction.

    ``query_pos`` orders query rows as in the query dataset (0 when there is no query); ids are stored as
    text and given back with their own JSON type by the dataset's ``ids_are_strings``. A per-token attribution
    has one query row per scored token of each query (query_pos counts them, in query then position order):
    ``query_token`` is the token's position in its query and ``query_token_text`` the token decoded (null
    without a tokenizer); both are null in every other attribution.

    The primary key (attribution_id, direction, query_pos, rank) is the table's only index: every results page is
    a range of it (a filtered page first finds its query rows in ``attribution_queries``). On SQLite the table is
    ``WITHOUT ROWID``: the rows are stored in that key's b-tree, so a million rows fill one b-tree, not a table and
    an index.
    """

    __tablename__ = "attribution_results"
    __table_args__ = (PrimaryKeyConstraint(*RESULT_KEY), {"sqlite_with_rowid": False})

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


class AttributionQuery(Base):
    """One query row of an attribution's results (the same rows in both directions): its query_pos with its query
    id and, in a per-token attribution, its query token. A results page filtered by ``query_id`` or
    ``query_token`` finds the matching query rows here (a range of one of the two indexes, in query_pos order),
    then reads each one's rows as a range of the results' primary key. Written with the results, in the same
    transaction."""

    __tablename__ = "attribution_queries"
    __table_args__ = (
        Index("ix_queries_query_id", "attribution_id", "query_id", "query_pos"),
        Index("ix_queries_query_token", "attribution_id", "query_token", "query_pos"),
    )

    attribution_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    query_pos: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    query_id: Mapped[str | None] = mapped_column(String(200))
    query_token: Mapped[int | None] = mapped_column(default=None)
