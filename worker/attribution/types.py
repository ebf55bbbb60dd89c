"""Plain data types shared by every part of the attribution engine.

The engine is a library: it takes torch modules and tensors and returns tensors. It never imports
HTTP, database or queue code. The service and the worker talk to it only through the names exported
from ``worker.attribution`` (see ``__init__.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

LossName = Literal["cross_entropy", "mse", "causal_lm"]
Measurement = Literal["loss", "margin"]
Mode = Literal["pairwise", "aggregate", "self"]

# progress(stage, completed, total). The callback may raise ``Cancelled`` to stop the work.
Progress = Callable[[str, int, int], None]


def no_progress(stage: str, completed: int, total: int) -> None:
    """A progress callback that ignores every report."""


def tensor_sum(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of one or more tensors (a new tensor, like ``sum``, which types its result ``Tensor | int``)."""
    iterator = iter(terms)
    try:
        total = next(iterator) + 0
    except StopIteration:
        raise ValueError("tensor_sum needs at least one tensor") from None
    for term in iterator:
        total = total + term
    return total


class AttributionError(ValueError):
    """Bad input found while computing (no trackable layer, targets out of range, NaN gradients...).

    The message is shown to the user as the job's error detail, so it must say what is wrong.
    """


class Cancelled(Exception):
    """Raised by a progress callback when the job was cancelled."""


@dataclass(frozen=True)
class Examples:
    """A dataset in tensor form. Row i of every tensor describes example i.

    Token datasets (language models, see ``worker.attribution.text``): ``inputs`` are int64 token ids
    (N, T), ``attention_mask`` (N, T) is 1 at real tokens and 0 at padding, and ``targets`` are the labels
    (N, T) of loss ``causal_lm`` (-100 = not scored) or the classes (N,) of ``cross_entropy``.
    """

    inputs: torch.Tensor  # float32, (N, ...); or int64 token ids (N, T)
    targets: torch.Tensor  # int64 (N,) for cross_entropy; float32 (N, d_out) for mse; int64 (N, T) for causal_lm
    weights: torch.Tensor | None = None  # float32 (N,): multiplies the example's loss
    task: torch.Tensor | None = None  # int64 (N,): meta-learning task id
    split: torch.Tensor | None = None  # int64 (N,): 0 = task train, 1 = task validation
    attention_mask: torch.Tensor | None = None  # int64 or bool (N, T): 0 = padding (token inputs only)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def subset(self, index: torch.Tensor) -> Examples:
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index]

        return Examples(
            inputs=self.inputs[index],
            targets=self.targets[index],
            weights=pick(self.weights),
            task=pick(self.task),
            split=pick(self.split),
            attention_mask=pick(self.attention_mask),
        )


@dataclass
class TopK:
    """Pairwise result: for each query, the top-k training indices in each direction.

    ``positive_*`` are sorted by descending score (most helpful first); ``negative_*`` by ascending
    score (most harmful first). Shapes are (Q, k') with k' = min(k, N).
    """

    positive_indices: torch.Tensor
    positive_scores: torch.Tensor
    negative_indices: torch.Tensor
    negative_scores: torch.Tensor


@dataclass
class AttributionScores:
    """What an attribution computes.

    mode ``pairwise``: ``topk`` is set. Modes ``aggregate`` and ``self``: ``scores`` holds one float per
    training unit (example, or task for meta task influence), in dataset order.
    ``diagnostics`` is JSON-serialisable information stored with the attribution (damping used,
    solver iterations, warnings...).
    """

    mode: Mode
    topk: TopK | None = None
    scores: torch.Tensor | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)
    # Meta-learning only. ``unit_task`` / ``unit_split``: for each ranked unit, its task id (and split for
    # instances); with task units the unit index i means task ``unit_task[i]``, with instance units it is
    # the example's row in the training dataset. ``query_task``: in meta pairwise mode, the task id of each
    # query row of ``topk``.
    unit_task: torch.Tensor | None = None
    unit_split: torch.Tensor | None = None
    query_task: torch.Tensor | None = None
