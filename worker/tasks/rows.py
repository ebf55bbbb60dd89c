"""Turning engine scores into ranked result rows (the caller's ids, rank 1 = strongest), column by column.

Rows are built as numpy columns straight from the engine's top-k tensors (no Python object per row until the
writer asks for tuples), so a full ranking of a million rows takes a fraction of a second to prepare. Ids are
stored as text: each distinct id is turned into text once, and the columns pick from those texts by index.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any, TypedDict

import numpy as np
import torch

from worker.attribution import AttributionScores, TopK
from worker.methods.registry import get_method

# The stored columns of a result row, in the order of ``ResultColumns.tuples()``.
RESULT_FIELDS = (
    "direction",
    "query_pos",
    "query_id",
    "rank",
    "train_id",
    "score",
    "task",
    "split",
    "query_token",
    "query_token_text",
)
MAX_TOKEN_TEXT = 200  # characters of a decoded query token kept (the column's width)
DIRECTIONS = ("positive", "negative")


def _text(value: Any) -> str:
    return str(value.item() if hasattr(value, "item") else value)


def _texts(values: Sequence[Any]) -> np.ndarray:
    """Each value as text, in an object array that columns index into."""
    texts = np.empty(len(values), dtype=object)
    texts[:] = [_text(value) for value in values]
    return texts


class UnitColumns(TypedDict):
    """The columns that say which training unit a row ranks."""

    train_id: np.ndarray
    task: np.ndarray | None
    split: np.ndarray | None


@dataclass
class ResultColumns:
    """Result rows as equal-length columns; ``task``/``split`` (``query_token``/``query_token_text``) are None
    when no row has them."""

    direction: np.ndarray
    query_pos: np.ndarray
    query_id: np.ndarray | None
    rank: np.ndarray
    train_id: np.ndarray
    score: np.ndarray
    task: np.ndarray | None = None
    split: np.ndarray | None = None
    query_token: np.ndarray | None = None
    query_token_text: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.rank.shape[0])

    def tuples(self, fields: Sequence[str] = RESULT_FIELDS) -> Iterator[tuple[Any, ...]]:
        """One plain tuple per row (Python ints, floats, str or None) of ``fields``, in that order."""
        columns = [getattr(self, name) for name in fields]
        return zip(*(repeat(None, len(self)) if column is None else column.tolist() for column in columns), strict=True)

    def where(self, mask: np.ndarray) -> ResultColumns:
        """The rows where ``mask`` (a boolean array) is true, in order."""
        return self.take(mask)

    def take(self, index: np.ndarray) -> ResultColumns:
        """The rows that ``index`` picks (a boolean mask, or positions in the order wanted)."""

        def optional(column: np.ndarray | None) -> np.ndarray | None:
            return None if column is None else column[index]

        return ResultColumns(
            direction=self.direction[index],
            query_pos=self.query_pos[index],
            query_id=optional(self.query_id),
            rank=self.rank[index],
            train_id=self.train_id[index],
            score=self.score[index],
            task=optional(self.task),
            split=optional(self.split),
            query_token=optional(self.query_token),
            query_token_text=optional(self.query_token_text),
        )

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(RESULT_FIELDS, row, strict=True)) for row in self.tuples()]

    @staticmethod
    def concat(parts: list[ResultColumns]) -> ResultColumns:
        def joined(name: str) -> np.ndarray | None:
            columns = [getattr(part, name) for part in parts]
            if all(column is None for column in columns):
                return None
            return np.concatenate(
                [
                    np.full(len(part), None, dtype=object) if column is None else column
                    for part, column in zip(parts, columns, strict=True)
                ]
            )

        def required(name: str) -> np.ndarray:
            column = joined(name)
            assert column is not None  # every part has this column
            return column

        return ResultColumns(
            direction=required("direction"),
            query_pos=required("query_pos"),
            query_id=joined("query_id"),
            rank=required("rank"),
            train_id=required("train_id"),
            score=required("score"),
            task=joined("task"),
            split=joined("split"),
            query_token=joined("query_token"),
            query_token_text=joined("query_token_text"),
        )


class UnitLabels:
    """Maps unit indices of the engine's output to the rows' train_id (and task/split for meta instances)."""

    def __init__(self, train_ids: Sequence[Any], scores: AttributionScores, method: str) -> None:
        self.by_task = get_method(method).train_unit == "task"
        task = scores.unit_task.cpu().numpy() if scores.unit_task is not None else None
        split = scores.unit_split.cpu().numpy() if scores.unit_split is not None else None
        if self.by_task:
            assert task is not None
            self.train_text, self.task, self.split = _texts(task.tolist()), None, None
        else:
            self.train_text, self.task, self.split = _texts(train_ids), task, split

    def columns(self, indices: np.ndarray) -> UnitColumns:
        """train_id, task and split of the units at ``indices`` (a flat integer array)."""
        train_id = self.train_text[indices]
        if self.task is None:
            return {"train_id": train_id, "task": None, "split": None}
        task = self.task[indices].astype(np.int64).astype(object)
        if self.split is None:
            return {"train_id": train_id, "task": task, "split": np.full(indices.shape[0], None, dtype=object)}
        return {"train_id": train_id, "task": task, "split": self.split[indices].astype(np.int64).astype(object)}


@dataclass(frozen=True)
class QueryTokenLabels:
    """Per-token queries (``worker.attribution.text.per_token_queries``): for each query row of the engine, the
    row of its query in the query dataset, the scored token's position, and that token decoded (or None)."""

    query: np.ndarray  # int64 (R,)
    position: np.ndarray  # int64 (R,)
    text: Sequence[str | None]

    def __post_init__(self) -> None:
        if not self.query.shape == self.position.shape == (len(self.text),):
            raise ValueError("query, position and text must have one entry per query row")


def pairwise_columns(
    topk: TopK, query_ids: Sequence[Any], units: UnitLabels, tokens: QueryTokenLabels | None = None
) -> ResultColumns:
    """Per query row, its top-k; both directions; query_pos is the query row, rank counts from 1. With ``tokens``
    a query row is one scored token of a query: its query_id is the query's and it adds query_token(_text)."""
    query_text = _texts(query_ids)
    if tokens is not None:
        query_text = query_text[tokens.query]
        token_text = np.empty(len(tokens.text), dtype=object)
        token_text[:] = [None if t is None else t[:MAX_TOKEN_TEXT] for t in tokens.text]
    parts = []
    for direction, indices, scores in (
        ("positive", topk.positive_indices, topk.positive_scores),
        ("negative", topk.negative_indices, topk.negative_scores),
    ):
        num_queries, k = indices.shape
        query_pos = np.repeat(np.arange(num_queries, dtype=np.int64), k)
        parts.append(
            ResultColumns(
                direction=np.full(num_queries * k, direction, dtype=object),
                query_pos=query_pos,
                query_id=query_text[query_pos],
                rank=np.tile(np.arange(1, k + 1, dtype=np.int64), num_queries),
                score=scores.detach().cpu().numpy().astype(np.float64).reshape(-1),
                query_token=None if tokens is None else tokens.position[query_pos],
                query_token_text=None if tokens is None else token_text[query_pos],
                **units.columns(indices.detach().cpu().numpy().reshape(-1)),
            )
        )
    return ResultColumns.concat(parts)


def ranked_columns(scores: torch.Tensor, top_k: int, units: UnitLabels, *, all_positive: bool) -> ResultColumns:
    """aggregate: top_k each way; self (``all_positive``): every unit highest first, top_k lowest first."""
    order = torch.argsort(scores, descending=True, stable=True)
    values = scores.detach().cpu().numpy().astype(np.float64)
    parts = []
    for direction, picked in (
        ("positive", order if all_positive else order[:top_k]),
        ("negative", torch.flip(order, dims=[0])[:top_k]),
    ):
        indices = picked.cpu().numpy()
        count = indices.shape[0]
        parts.append(
            ResultColumns(
                direction=np.full(count, direction, dtype=object),
                query_pos=np.zeros(count, dtype=np.int64),
                query_id=None,
                rank=np.arange(1, count + 1, dtype=np.int64),
                score=values[indices],
                **units.columns(indices),
            )
        )
    return ResultColumns.concat(parts)


def result_columns(
    scores: AttributionScores,
    method: str,
    top_k: int,
    train_ids: Sequence[Any],
    query_ids: Sequence[Any] | None,
    tokens: QueryTokenLabels | None = None,
) -> ResultColumns:
    """The rows of the engine's scores; ``tokens``: the queries were per-token query rows (pairwise only)."""
    units = UnitLabels(train_ids, scores, method)
    if scores.mode == "pairwise":
        assert scores.topk is not None
        labels = scores.query_task.tolist() if scores.query_task is not None else list(query_ids or [])
        return pairwise_columns(scores.topk, labels, units, tokens)
    if tokens is not None:
        raise ValueError("per-token query rows are ranked in pairwise mode only")
    assert scores.scores is not None
    return ranked_columns(scores.scores, top_k, units, all_positive=scores.mode == "self")
