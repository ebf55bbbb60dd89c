from __future__ import annotations

from sqlalchemy import Index, LargeBinary, PrimaryKeyConstraint, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from service.db.base import Base

CHUNK_KEY = ("attribution_id", "direction", "query_pos", "last_rank")


class ResultChunk(Base):
    """Consecutive ranked rows of one query row in one direction: the training units at ranks ``first_rank`` to
    ``last_rank`` for that query row (or for none), at most `CHUNK_ROWS` of them, as columns.

    ``train_ids`` is a JSON array of the units' ids as text (given back with their own JSON type by the dataset's
    ``ids_are_strings``), ``scores`` their scores as little-endian float64, ``tasks`` / ``splits`` (meta methods'
    instance units) little-endian int64, null when the method has none. ``query_pos`` orders query rows as in the
    query dataset (0 when there is no query); ``query_id`` is the query row's id, and in a per-token attribution
    (one query row per scored token of each query, in query then position order) ``query_token`` is the token's
    position in its query and ``query_token_text`` the token decoded (null without a tokenizer).

    A million ranked rows are a thousand chunk rows: a full ranking is written at the cost of its bytes, not of a
    million b-tree entries. The primary key (attribution_id, direction, query_pos, last_rank) is the table's only
    index: a results page after the cursor (query_pos, rank) starts at the first chunk whose (query_pos,
    last_rank) is past it and reads the next chunks of that range, so a page costs the same at any depth.
    """

    __tablename__ = "result_chunks"
    __table_args__ = (PrimaryKeyConstraint(*CHUNK_KEY),)

    # attributions.id, without a foreign key: rows are written only by the job of an existing attribution, and
    # attributions are never deleted.
    attribution_id: Mapped[str] = mapped_column(String(40))
    direction: Mapped[str] = mapped_column(String(8))
    query_pos: Mapped[int] = mapped_column(autoincrement=False)
    last_rank: Mapped[int] = mapped_column(autoincrement=False)
    first_rank: Mapped[int]
    query_id: Mapped[str | None] = mapped_column(String(200))
    query_token: Mapped[int | None] = mapped_column(default=None)
    query_token_text: Mapped[str | None] = mapped_column(String(200), default=None)
    train_ids: Mapped[str] = mapped_column(Text)
    scores: Mapped[bytes] = mapped_column(LargeBinary)
    tasks: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    splits: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)


class AttributionQuery(Base):
    """One query row of an attribution's results (the same rows in both directions): its query_pos with its query
    id and, in a per-token attribution, its query token. A results page filtered by ``query_id`` or
    ``query_token`` finds the matching query rows here (a range of one of the two indexes, in query_pos order),
    then reads each one's chunks as a range of the chunks' primary key. Written with the results, in the same
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
