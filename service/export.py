"""Streaming export of every result row as CSV, NDJSON or Parquet."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from service.schemas.attributions import ResultRow

COLUMNS = ("query_id", "direction", "rank", "train_id", "score", "task", "split", "query_token", "query_token_text")
PARQUET_BATCH = 10_000


def csv_chunks(rows: Iterable[ResultRow]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS)
    for count, row in enumerate(rows, start=1):
        writer.writerow(["" if v is None else v for v in row.model_dump(include=set(COLUMNS)).values()])
        if count % 1000 == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def ndjson_chunks(rows: Iterable[ResultRow]) -> Iterator[str]:
    lines: list[str] = []
    for row in rows:
        lines.append(json.dumps(row.model_dump()))
        if len(lines) == 1000:
            yield "\n".join(lines) + "\n"
            lines = []
    if lines:
        yield "\n".join(lines) + "\n"


def parquet_file(rows: Iterable[ResultRow], ids_are_strings: tuple[bool, bool]) -> str:
    """Write a Parquet file in batches; returns its path (the caller deletes it after sending)."""
    id_type: dict[bool, pa.DataType] = {True: pa.string(), False: pa.int64()}
    schema = pa.schema(
        [
            ("query_id", id_type[ids_are_strings[0]]),
            ("direction", pa.string()),
            ("rank", pa.int64()),
            ("train_id", id_type[ids_are_strings[1]]),
            ("score", pa.float64()),
            ("task", pa.int64()),
            ("split", pa.int64()),
            ("query_token", pa.int64()),
            ("query_token_text", pa.string()),
        ]
    )
    handle, path = tempfile.mkstemp(suffix=".parquet")
    os.close(handle)
    with pq.ParquetWriter(path, schema) as writer:
        batch: list[dict[str, object]] = []
        for row in rows:
            batch.append(row.model_dump())
            if len(batch) == PARQUET_BATCH:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch = []
        writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    return path
