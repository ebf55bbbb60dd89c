"""Splitting an Examples meta-dataset into tasks (task id, split 0 = train, 1 = validation)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.attribution.types import AttributionError, Examples


@dataclass
class TaskData:
    """One task's two splits. ``w_*`` are the instance weights (default 1/|split|, times Examples.weights)."""

    task_id: int
    x_tr: torch.Tensor
    y_tr: torch.Tensor
    w_tr: torch.Tensor
    rows_tr: torch.Tensor  # row indices of the train split in the dataset
    x_val: torch.Tensor
    y_val: torch.Tensor
    w_val: torch.Tensor
    rows_val: torch.Tensor


def _targets(examples: Examples, loss: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if loss == "cross_entropy":
        if examples.targets.dim() != 1 or examples.targets.is_floating_point():
            raise AttributionError("cross_entropy targets must be int64 class indices of shape (N,)")
        return examples.targets.to(device=device, dtype=torch.long)
    targets = examples.targets.to(device=device, dtype=dtype)
    return targets.reshape(-1, 1) if targets.dim() == 1 else targets


def split_tasks(examples: Examples, loss: str, dtype: torch.dtype, device: torch.device, name: str) -> list[TaskData]:
    """Tasks of ``examples`` in sorted task-id order. ``name`` ('train' / 'query') goes in error messages."""
    if examples.task is None or examples.split is None:
        raise AttributionError(f"the {name} dataset needs 'task' and 'split' fields for meta-learning influence")
    if len(examples) == 0:
        raise AttributionError(f"the {name} dataset is empty")
    task = examples.task.to(device=device, dtype=torch.long).reshape(-1)
    split = examples.split.to(device=device, dtype=torch.long).reshape(-1)
    bad_split = sorted(set(torch.unique(split).tolist()) - {0, 1})
    if bad_split:
        raise AttributionError(
            f"the {name} dataset has split values {bad_split}; split must be 0 (task train) or 1 (task validation)"
        )
    inputs = examples.inputs.to(device=device, dtype=dtype)
    if not torch.isfinite(inputs).all():
        raise AttributionError(f"the {name} dataset has NaN or infinite inputs")
    targets = _targets(examples, loss, dtype, device)
    weights = None if examples.weights is None else examples.weights.to(device=device, dtype=dtype).reshape(-1)
    if weights is not None and not (torch.isfinite(weights).all() and (weights >= 0).all()):
        raise AttributionError(f"the {name} dataset has negative or non-finite weights")
    tasks = []
    for task_id in torch.unique(task, sorted=True).tolist():
        parts = []
        for s in (0, 1):
            rows = torch.nonzero((task == task_id) & (split == s)).reshape(-1)
            if rows.numel() == 0:
                which = "train (split 0)" if s == 0 else "validation (split 1)"
                raise AttributionError(f"task {task_id} of the {name} dataset has an empty {which} split")
            w = torch.full((rows.numel(),), 1.0 / rows.numel(), dtype=dtype, device=device)
            if weights is not None:
                w = w * weights[rows]
            parts.append((inputs[rows], targets[rows], w, rows))
        tasks.append(TaskData(int(task_id), *parts[0], *parts[1]))
    return tasks
