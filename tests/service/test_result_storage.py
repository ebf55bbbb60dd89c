"""Result storage: rows built column-wise equal the row-by-row definition; the chunks written read back as exactly
the rows given, page by page at any chunk size; rows appear only with the job's success, never from a fenced or
cancelled attempt; every results page is an index range scan with no sort, at any depth."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.orm import Session

from service.db.session import session_scope
from service.db.tables import AttributionQuery, Job, ResultChunk
from service.pagination import RankCursor
from service.results import (
    CHUNK_COLUMNS,
    CHUNK_HEADER,
    all_results,
    chunk_query,
    page_of_results,
    query_positions,
    read_rows,
)
from tests.service.conftest import Api, build_api, tiny_classifier, tiny_dataset
from worker.attribution import AttributionScores, TopK
from worker.tasks import attribution as attribution_task
from worker.tasks import result_writer
from worker.tasks.result_writer import chunk_bounds, key_ordered_parts, write_results
from worker.tasks.rows import RESULT_FIELDS, QueryTokenLabels, ResultColumns, result_columns


def reference_rows(
    scores: AttributionScores,
    method: str,
    top_k: int,
    train_ids: list[Any],
    query_ids: list[Any] | None,
    tokens: QueryTokenLabels | None = None,
) -> list[dict[str, Any]]:
    """The rows by their definition, one at a time (as the service built them before the column-wise path);
    ``tokens``: query row ``pos`` is token ``tokens.position[pos]`` of query ``tokens.query[pos]``."""

    def unit(index: int) -> dict[str, Any]:
        if method == "meta_task_influence":
            assert scores.unit_task is not None
            return {"train_id": str(int(scores.unit_task[index])), "task": None, "split": None}
        if scores.unit_task is None:
            return {"train_id": str(train_ids[index]), "task": None, "split": None}
        split = int(scores.unit_split[index]) if scores.unit_split is not None else None
        return {"train_id": str(train_ids[index]), "task": int(scores.unit_task[index]), "split": split}

    rows: list[dict[str, Any]] = []
    if scores.mode == "pairwise":
        assert scores.topk is not None
        labels = scores.query_task.tolist() if scores.query_task is not None else query_ids
        assert labels is not None
        for direction, indices, values in (
            ("positive", scores.topk.positive_indices, scores.topk.positive_scores),
            ("negative", scores.topk.negative_indices, scores.topk.negative_scores),
        ):
            for pos in range(indices.shape[0]):
                query = pos if tokens is None else int(tokens.query[pos])
                token: dict[str, Any] = {"query_token": None, "query_token_text": None}
                if tokens is not None:
                    token = {"query_token": int(tokens.position[pos]), "query_token_text": tokens.text[pos]}
                for rank, (index, score) in enumerate(
                    zip(indices[pos].tolist(), values[pos].tolist(), strict=True), start=1
                ):
                    rows.append(
                        {
                            "direction": direction,
                            "query_pos": pos,
                            "query_id": str(labels[query]),
                            "rank": rank,
                            "score": float(score),
                            **unit(index),
                            **token,
                        }
                    )
        return rows
    assert scores.scores is not None
    order = torch.argsort(scores.scores, descending=True, stable=True).tolist()
    picks = (("positive", order if scores.mode == "self" else order[:top_k]), ("negative", order[::-1][:top_k]))
    for direction, picked in picks:
        for rank, index in enumerate(picked, start=1):
            rows.append(
                {
                    "direction": direction,
                    "query_pos": 0,
                    "query_id": None,
                    "rank": rank,
                    "score": float(scores.scores[index]),
                    **unit(index),
                    "query_token": None,
                    "query_token_text": None,
                }
            )
    return rows


def pairwise_scores(num_queries: int, num_train: int, k: int, seed: int = 0, **meta: Any) -> AttributionScores:
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(num_queries, num_train, generator=generator) * torch.logspace(-30, 3, num_train)
    positive, positive_index = torch.topk(matrix, k, dim=1)
    negative, negative_index = torch.topk(matrix, k, dim=1, largest=False)
    return AttributionScores(mode="pairwise", topk=TopK(positive_index, positive, negative_index, negative), **meta)


CASES = {
    "pairwise, string ids": (pairwise_scores(3, 7, 4), "influence", 4, [f"ex-{i}" for i in range(7)], ["a", "b", "c"]),
    "pairwise, int ids": (pairwise_scores(2, 5, 5), "influence", 5, list(range(100, 105)), [7, 9]),
    "pairwise, per token": (pairwise_scores(5, 6, 3), "gradient_similarity", 3, list(range(6)), ["p", "q"]),
    "aggregate": (
        AttributionScores(mode="aggregate", scores=torch.tensor([0.5, -2.0, 0.5, 3.0, 1e-40])),
        "influence",
        2,
        [10, 11, 12, 13, 14],
        None,
    ),
    "self": (AttributionScores(mode="self", scores=torch.tensor([1.0, -1.0, 2.0])), "tracin", 1, ["x", "y", "z"], None),
    "meta instances": (
        pairwise_scores(
            2,
            4,
            3,
            unit_task=torch.tensor([0, 0, 1, 1]),
            unit_split=torch.tensor([0, 1, 0, 1]),
            query_task=torch.tensor([5, 5]),
        ),
        "meta_instance_influence",
        3,
        [0, 1, 2, 3],
        None,
    ),
    "meta tasks": (
        AttributionScores(mode="aggregate", scores=torch.tensor([0.1, 0.3, -0.2]), unit_task=torch.tensor([4, 8, 6])),
        "meta_task_influence",
        3,
        [0, 1, 2],
        None,
    ),
}


# per-token query rows: 3 tokens of query "p", 2 of "q" (one token without a decoded text)
TOKENS = {
    "pairwise, per token": QueryTokenLabels(
        query=np.array([0, 0, 0, 1, 1]), position=np.array([2, 3, 5, 1, 2]), text=["a", " b", "c", None, "\u00e9"]
    )
}


@pytest.mark.parametrize("case", CASES)
def test_columns_equal_the_row_by_row_definition(case: str) -> None:
    scores, method, top_k, train_ids, query_ids = CASES[case]
    columns = result_columns(scores, method, top_k, train_ids, query_ids, TOKENS.get(case))
    assert columns.dicts() == reference_rows(scores, method, top_k, train_ids, query_ids, TOKENS.get(case))
    assert len(columns) == len(columns.dicts())


# --- with a real attribution row, on both databases ---------------------------------------------------------------


def setup_attribution(api: Api, n_train: int = 40, n_query: int = 5, top_k: int = 6) -> dict[str, Any]:
    """Upload a tiny model and data and submit a pairwise job; the queue is paused: nothing ran yet."""
    model = api.upload_model(tiny_classifier()).json()["id"]
    train = api.upload_npz(**tiny_dataset(n_train, seed=1)).json()["id"]
    query = api.upload_npz(**tiny_dataset(n_query, seed=2)).json()["id"]
    api.queue.paused = True
    response = api.client.post(
        "/v1/attributions",
        json={
            "model_id": model,
            "train_dataset_id": train,
            "query_dataset_id": query,
            "method": "gradient_similarity",
            "mode": "pairwise",
            "top_k": top_k,
        },
    )
    assert response.status_code == 202, response.text
    api.queue.paused = False
    return response.json()


def in_key_order(rows: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows (tuples of RESULT_FIELDS) by (direction, query_pos, rank)."""
    return sorted(rows, key=lambda row: (row[0], row[1], row[3]))


def stored(session: Session, attribution_id: str) -> list[tuple[Any, ...]]:
    """The attribution's rows as read back, as tuples of RESULT_FIELDS in key order."""
    rows = all_results(session, attribution_id)
    return in_key_order(tuple(getattr(row, name) for name in RESULT_FIELDS) for row in rows)


def count_results(session: Session, attribution_id: str) -> int:
    """How many rows the attribution has stored (its chunks' rank counts summed)."""
    count = func.sum(ResultChunk.last_rank - ResultChunk.first_rank + 1)
    return int(session.scalar(select(count).where(ResultChunk.attribution_id == attribution_id)) or 0)


def count_rows(url: str, attribution_id: str) -> int:
    with session_scope(url) as session:
        return count_results(session, attribution_id)


def job_row(url: str, job_id: str) -> Job:
    with session_scope(url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


@pytest.mark.parametrize("case", ["pairwise, string ids", "meta instances", "pairwise, per token"])
def test_rows_are_written_in_primary_key_order_whatever_order_they_come_in(case: str) -> None:
    scores, method, top_k, train_ids, query_ids = CASES[case]
    columns = result_columns(scores, method, top_k, train_ids, query_ids, TOKENS.get(case))
    shuffled = columns.take(np.random.default_rng(0).permutation(len(columns)))
    for given in (columns, shuffled):
        written = [row for _, part in key_ordered_parts(given) for row in part.tuples()]
        key = [(row[0], row[1], row[3]) for row in written]  # direction, query_pos, rank
        assert key == sorted(key) and len(set(key)) == len(key)
        assert sorted(written, key=repr) == sorted(columns.tuples(), key=repr)


def test_chunks_are_runs_of_one_query_row_with_consecutive_ranks_cut_at_the_chunk_size() -> None:
    query_pos = np.array([0, 0, 0, 0, 0, 1, 1, 2, 2, 2])
    rank = np.array([1, 2, 3, 4, 5, 1, 2, 1, 2, 5])  # query row 2 skips ranks 3 and 4
    assert chunk_bounds(query_pos, rank, size=2) == [(0, 2), (2, 4), (4, 5), (5, 7), (7, 9), (9, 10)]
    assert chunk_bounds(query_pos, rank, size=1000) == [(0, 5), (5, 7), (7, 9), (9, 10)]


@pytest.mark.parametrize("chunk_rows", [1000, 3])
def test_written_rows_read_back_exactly(api: Api, monkeypatch: pytest.MonkeyPatch, chunk_rows: int) -> None:
    """Every kind of row (text and integer ids, meta instances' task and split, aggregate rows without a query,
    per-token rows with their token text) reads back as written, scores to the last bit, at any chunk size."""
    monkeypatch.setattr(result_writer, "CHUNK_ROWS", chunk_rows)
    attribution = setup_attribution(api)
    url = api.settings.resolved_database_url
    for case in ("pairwise, string ids", "meta instances", "aggregate", "pairwise, per token"):
        scores, method, top_k, train_ids, query_ids = CASES[case]
        columns = result_columns(scores, method, top_k, train_ids, query_ids, TOKENS.get(case))
        with session_scope(url) as session:
            write_results(session, attribution["id"], columns)
            back = stored(session, attribution["id"])
            assert count_results(session, attribution["id"]) == len(columns)
            session.rollback()
        assert back == in_key_order(columns.tuples()) and len(back) == len(columns), case


@pytest.mark.parametrize("chunk_rows", [1000, 7])
def test_pages_walk_every_row_once_across_chunk_boundaries(
    api: Api, monkeypatch: pytest.MonkeyPatch, chunk_rows: int
) -> None:
    """Pages of 1, 5 and 13 rows, unfiltered and filtered by query id, give each direction's rows once, in order,
    whatever the chunks' size."""
    monkeypatch.setattr(result_writer, "CHUNK_ROWS", chunk_rows)
    attribution = setup_attribution(api)
    url = api.settings.resolved_database_url
    columns = result_columns(
        pairwise_scores(6, 40, 30), "influence", 30, list(range(40)), ["a", "b", "a", "c", "b", "a"]
    )
    with session_scope(url) as session:
        write_results(session, attribution["id"], columns)
    expected = in_key_order(columns.tuples())
    for direction in ("positive", "negative"):
        for query_id in (None, "a", "c"):
            want = [
                (row[1], row[3], row[4], row[5])
                for row in expected
                if row[0] == direction and (query_id is None or row[2] == query_id)
            ]
            for size in (1, 5, 13):
                got: list[tuple[Any, ...]] = []
                cursor: RankCursor | None = None
                with session_scope(url) as session:
                    while True:
                        page, cursor = page_of_results(session, attribution["id"], direction, query_id, cursor, size)
                        assert len(page) == size or cursor is None
                        got.extend((row.query_pos, row.rank, row.train_id, row.score) for row in page)
                        if cursor is None:
                            break
                assert got == want, (direction, query_id, size)


def test_rows_are_visible_only_with_the_jobs_success(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    url = api.settings.resolved_database_url
    seen_before_commit: list[tuple[int, str]] = []
    real_write = attribution_task.write_results

    def write_and_look(session: Session, attribution_id: str, columns: ResultColumns) -> None:
        real_write(session, attribution_id, columns)
        job_id = session.execute(
            text("SELECT job_id FROM attributions WHERE id = :id"), {"id": attribution_id}
        ).scalar()
        seen_before_commit.append((count_rows(url, attribution_id), job_row(url, str(job_id)).status))

    monkeypatch.setattr(attribution_task, "write_results", write_and_look)
    attribution = setup_attribution(api, top_k=6)
    api.queue.enqueue(attribution["job_id"], "attribution")
    assert seen_before_commit == [(0, "running")]  # another connection sees neither the rows nor the success
    assert job_row(url, attribution["job_id"]).status == "succeeded"
    assert count_rows(url, attribution["id"]) == 2 * 5 * 6


@pytest.mark.parametrize("interruption", ["taken over by a new attempt", "cancelled"])
def test_a_fenced_or_cancelled_attempt_writes_no_rows(
    api: Api, monkeypatch: pytest.MonkeyPatch, interruption: str
) -> None:
    url = api.settings.resolved_database_url
    real_save = attribution_task.save_results

    def interrupt_then_save(context: Any, *args: Any) -> None:
        with session_scope(url) as session:
            if interruption == "cancelled":
                values: dict[str, Any] = {"cancel_requested": True}
            else:
                values = {"attempts": Job.attempts + 1, "claimed_by": "another-worker"}
            session.execute(update(Job).where(Job.id == context.job_id).values(**values))
        real_save(context, *args)

    monkeypatch.setattr(attribution_task, "save_results", interrupt_then_save)
    attribution = setup_attribution(api)
    api.queue.enqueue(attribution["job_id"], "attribution")
    job = job_row(url, attribution["job_id"])
    assert count_rows(url, attribution["id"]) == 0
    if interruption == "cancelled":
        assert job.status == "cancelled"
    else:
        assert (job.status, job.attempts, job.claimed_by) == ("running", 2, "another-worker")


# --- results pages read an index range, with no sort, at any depth --------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def filled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A real attribution with 2 x 20 x 1,000 rows, and another one's rows beside it (statistics analysed).
    Filled once per backend for the module: the tests that use it only read."""
    database_url = None if request.param == "sqlite" else str(request.getfixturevalue("postgres_schema_url"))
    for api in build_api(tmp_path_factory.mktemp("filled"), database_url):
        url = api.settings.resolved_database_url
        attribution = setup_attribution(api)
        neighbour = setup_attribution(api)
        columns = result_columns(
            pairwise_scores(20, 1000, 1000), "influence", 1000, list(range(1000)), [f"q{i % 10}" for i in range(20)]
        )  # query ids shared by two query rows each
        with session_scope(url) as session:
            write_results(session, attribution["id"], columns)
            write_results(session, neighbour["id"], columns)
            add_other_query_rows(session)
        with session_scope(url) as session:
            session.execute(text("ANALYZE"))
        yield url, attribution["id"]


def add_other_query_rows(session: Session, attributions: int = 500, queries: int = 40) -> None:
    """The query rows and result chunks of many other attributions, as a service soon has: on a table of a few
    rows, PostgreSQL rightly reads it all rather than an index."""
    prefix = f"attr_{uuid.uuid4().hex[:8]}"
    session.execute(
        insert(AttributionQuery),
        [
            {"attribution_id": f"{prefix}{a:04d}", "query_pos": pos, "query_id": f"q{pos}", "query_token": pos % 8}
            for a in range(attributions)
            for pos in range(queries)
        ],
    )
    one_row = {"first_rank": 1, "last_rank": 1, "train_ids": '["0"]', "scores": np.zeros(1).tobytes()}
    session.execute(
        insert(ResultChunk),
        [
            {"attribution_id": f"{prefix}{a:04d}", "direction": direction, "query_pos": pos, **one_row}
            for a in range(attributions)
            for pos in range(queries)
            for direction in ("positive", "negative")
        ],
    )


def page_plan(session: Session, statement: Any) -> str:
    compiled = statement.compile(dialect=session.get_bind().dialect, compile_kwargs={"literal_binds": True})
    explain = "EXPLAIN QUERY PLAN " if session.get_bind().dialect.name == "sqlite" else "EXPLAIN "
    if session.get_bind().dialect.name == "postgresql":
        # the test tables hold a few hundred rows: on them PostgreSQL may pick a bitmap scan of the same index range
        # plus a sort of its few rows, a plan it drops on real tables; without it the plan shows whether the
        # ordered index range alone serves the page
        session.execute(text("SET LOCAL enable_bitmapscan = off"))
    return "\n".join(
        str(row[-1] if explain.endswith("PLAN ") else row[0]) for row in session.execute(text(explain + str(compiled)))
    )


def sqlite_index(index: str, table: str) -> str:
    """How SQLite's plans name an index: a rowid table's primary key is its first automatic index."""
    return f"INDEX sqlite_autoindex_{table}_1" if index.startswith("pk_") else f"INDEX {index}"


def assert_range_scan(session: Session, statement: Any, index: str, table: str, cursor: bool) -> None:
    """``statement`` reads one range of ``index`` of ``table`` in index order: no sort, no scan, no filter."""
    plan = page_plan(session, statement)
    if session.get_bind().dialect.name == "sqlite":
        name = sqlite_index(index, table)
        assert f"SEARCH {table} USING {name} (" in plan or f"SEARCH {table} USING COVERING {name} (" in plan, plan
        assert "(query_pos,last_rank)>(?,?)" in plan or not cursor, plan
        assert "TEMP B-TREE" not in plan and "SCAN" not in plan, plan
    else:
        assert f"Scan using {index} on {table}" in plan, plan
        assert "ROW(query_pos, last_rank) > ROW(" in plan or not cursor, plan
        assert "Sort" not in plan and "Seq Scan" not in plan and "Filter" not in plan, plan


@pytest.mark.parametrize("after", [None, RankCursor(1, 3), RankCursor(12, 900)])
def test_every_results_page_is_an_index_range_scan_without_a_sort(
    filled: tuple[str, str], after: RankCursor | None
) -> None:
    url, attribution_id = filled
    with session_scope(url) as session:
        for columns in (CHUNK_HEADER, CHUNK_COLUMNS):  # the chunks' ranks, then the chunks the page reads
            statement = chunk_query(columns, attribution_id, "positive", after, 101)
            assert_range_scan(session, statement, "pk_result_chunks", "result_chunks", after is not None)
        # and the page itself: the rows right after the cursor, in order
        rows = read_rows(session, attribution_id, "positive", after, 5)
    keys = [(row.query_pos, row.rank) for row in rows]
    assert keys == sorted(keys) and len(keys) == 5
    assert after is None or keys[0] > tuple(after)


@pytest.mark.parametrize("after", [None, RankCursor(1, 3), RankCursor(12, 900), RankCursor(13, 1000)])
def test_a_query_id_page_reads_its_query_rows_then_ranges_of_the_primary_key(
    filled: tuple[str, str], after: RankCursor | None
) -> None:
    """q3 names query rows 3 and 13: their positions come from attribution_queries, their rows from the key."""
    url, attribution_id = filled
    start = after.query_pos if after is not None else 0
    with session_scope(url) as session:
        positions = query_positions(attribution_id, "q3", None, start, 102)
        assert_range_scan(session, positions, "ix_queries_query_id", "attribution_queries", False)
        assert session.scalars(positions).all() == [pos for pos in (3, 13) if pos >= start]
        for columns in (CHUNK_HEADER, CHUNK_COLUMNS):
            statement = chunk_query(columns, attribution_id, "positive", after, 101, query_pos=13)
            assert_range_scan(session, statement, "pk_result_chunks", "result_chunks", False)
        pages: list[list[tuple[int, int]]] = []
        cursor = after
        while len(pages) < 3:
            rows, cursor = page_of_results(session, attribution_id, "positive", "q3", cursor, 700)
            assert {row.query_id for row in rows} <= {"q3"}
            pages.append([(row.query_pos, row.rank) for row in rows])
            if cursor is None:
                break
    keys = [key for page in pages for key in page]
    expected = [(pos, rank) for pos in (3, 13) for rank in range(1, 1001) if after is None or (pos, rank) > after]
    assert keys == expected and all(len(page) == 700 for page in pages[:-1])
    assert cursor is None  # the last page says so


@pytest.mark.parametrize("query_ids_are_strings", [False, True])
@pytest.mark.parametrize("train_ids_are_strings", [False, True])
def test_a_page_serialized_from_stored_rows_is_the_documented_page(
    query_ids_are_strings: bool, train_ids_are_strings: bool
) -> None:
    """The results route writes pages straight from the stored rows: the same bytes as the ResultsPage model."""
    from service.results import StoredResult, page_json, row_out
    from service.schemas.attributions import ResultIdTypes, ResultsPage

    def stored(**values: Any) -> StoredResult:  # a row as read back from its chunk
        return StoredResult(**values)

    generator = torch.Generator().manual_seed(0)
    scores = (torch.randn(12, generator=generator, dtype=torch.float64) * 10.0 ** torch.arange(-6, 6)).tolist()
    rows = [
        stored(
            **{
                "query_pos": i // 4,
                "query_id": None if i >= 8 else f"{i // 4:03d}",
                "direction": "positive" if i % 2 else "negative",
                "rank": i % 4 + 1,
                "train_id": str(1000 + i),
                "score": scores[i],
                "task": i if i % 3 == 0 else None,
                "split": i % 2 if i % 3 == 0 else None,
                "query_token": i + 1 if i < 8 and i % 3 else None,
                "query_token_text": f" tok\u00e9{i}" if i < 8 and i % 3 == 1 else None,
            }
        )
        for i in range(12)
    ]
    types = ResultIdTypes(query_ids_are_strings=query_ids_are_strings, train_ids_are_strings=train_ids_are_strings)
    for token in (None, "WzAsIDJd"):
        documented = ResultsPage(results=[row_out(row, types) for row in rows], next_page_token=token)
        assert page_json(rows, types, token) == documented.model_dump_json().encode()


def test_a_filtered_page_asked_again_costs_one_statement_and_an_unknown_query_is_not_remembered(
    api: Api,
) -> None:
    """A finished attribution's query rows never change: the positions a filtered page found are remembered, so
    the same pages again read only their chunks, and give the same rows. A query id with no rows (yet) is asked
    again each time: rows written later are found."""
    from sqlalchemy import event

    attribution = setup_attribution(api)
    url = api.settings.resolved_database_url
    columns = result_columns(pairwise_scores(4, 30, 10), "influence", 10, list(range(30)), ["a", "b", "a", "c"])
    statements: list[str] = []

    def count(connection: Any, cursor: Any, statement: str, *rest: Any) -> None:
        statements.append(statement)

    def two_pages(session: Session) -> tuple[list[tuple[int, int]], int]:
        """Query "a"'s rows (query rows 0 and 2) in a page of 5 and the rest, and the statements they took."""
        statements.clear()
        first, cursor = page_of_results(session, attribution["id"], "positive", "a", None, 5)
        rest, last = page_of_results(session, attribution["id"], "positive", "a", cursor, 50)
        assert last is None
        return [(row.query_pos, row.rank) for row in [*first, *rest]], len(statements)

    with session_scope(url) as session:
        event.listen(session.get_bind(), "before_cursor_execute", count)
        try:
            assert page_of_results(session, attribution["id"], "positive", "a", None, 5) == ([], None)
            write_results(session, attribution["id"], columns)  # the job's success, after the page above
            walks = [two_pages(session) for _ in range(3)]
        finally:
            event.remove(session.get_bind(), "before_cursor_execute", count)
    expected = [(pos, rank) for pos in (0, 2) for rank in range(1, 11)]
    assert [rows for rows, _ in walks] == [expected] * 3
    # first: each page asks for its query rows' positions, then reads their chunks (one statement for the first
    # page, one per query row for the second); again: the chunks only
    assert [statements for _, statements in walks] == [5, 3, 3]
