"""Turning engine scores into ranked result rows (the caller's ids, rank 1 = strongest)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from worker.attribution import AttributionScores, TopK

Row = dict[str, Any]


def _text(value: Any) -> str:
    return str(value.item() if hasattr(value, "item") else value)


def pairwise_rows(
    topk: TopK, query_ids: Sequence[Any], unit_id: "UnitLabels",
) -> Iterator[Row]:
    for direction, indices, scores in (
        ("positive", topk.positive_indices, topk.positive_scores),
        ("negative", topk.negative_indices, topk.negative_scores),
    ):
        for pos in range(indices.shape[0]):
            for rank, (index, score) in enumerate(zip(indices[pos].tolist(), scores[pos].tolist()), start=1):
                yield {"direction": direction, "query_pos": pos, "query_id": _text(query_ids[pos]), "rank": rank,
                       "score": float(score), **unit_id(index)}


def ranked_rows(scores: torch.Tensor, top_k: int, unit_id: "UnitLabels", *, all_positive: bool) -> Iterator[Row]:
    """aggregate: top_k each way; self (``all_positive``): every unit highest first, top_k lowest first."""
    order = torch.argsort(scores, descending=True, stable=True)
    positive = order if all_positive else order[:top_k]
    negative = torch.flip(order, dims=[0])[:top_k]
    for direction, picked in (("positive", positive), ("negative", negative)):
        for rank, index in enumerate(picked.tolist(), start=1):
            yield {"direction": direction, "query_pos": 0, "query_id": None, "rank": rank,
                   "score": float(scores[index]), **unit_id(index)}


class UnitLabels:
    """Maps a unit index of the engine's output to the row's train_id (and task/split for meta instances)."""

    def __init__(self, train_ids: Sequence[Any], scores: AttributionScores, method: str) -> None:
        self.train_ids = train_ids
        self.task = scores.unit_task
        self.split = scores.unit_split
        self.by_task = method == "meta_task_influence"

    def __call__(self, index: int) -> Row:
        if self.by_task:
            return {"train_id": _text(self.task[index]), "task": None, "split": None}  # type: ignore[index]
        row: Row = {"train_id": _text(self.train_ids[index]), "task": None, "split": None}
        if self.task is not None:
            row["task"] = int(self.task[index])
            row["split"] = int(self.split[index]) if self.split is not None else None
        return row


def result_rows(
    scores: AttributionScores, method: str, top_k: int, train_ids: Sequence[Any], query_ids: Sequence[Any] | None
) -> list[Row]:
    units = UnitLabels(train_ids, scores, method)
    if scores.mode == "pairwise":
        assert scores.topk is not None
        labels = scores.query_task.tolist() if scores.query_task is not None else list(query_ids or [])
        return list(pairwise_rows(scores.topk, labels, units))
    assert scores.scores is not None
    return list(ranked_rows(scores.scores, top_k, units, all_positive=scores.mode == "self"))
