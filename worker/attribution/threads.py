"""Small pieces of work run on one thread.

Intra-op threading only pays for large operations; for small ones (a 65 x 65 eigendecomposition, the
per-batch statistics of a narrow MLP) waking and joining the worker threads costs far more than the
arithmetic, and on a loaded machine each parallel region can wait tens of milliseconds for a core.
``few_threads(work)`` runs its block with one intra-op thread when ``work`` (an estimate of the
multiply-adds of the block) is below SMALL_WORK, and restores the thread count after. Results do not
depend on it beyond float rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from worker.attribution.hooks import TrackedLayer
from worker.attribution.types import Examples

SMALL_WORK = 1 << 29  # multiply-adds (some 20-50 ms on one core)


@contextmanager
def few_threads(work: float) -> Iterator[None]:
    previous = torch.get_num_threads()
    if work >= SMALL_WORK or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def batch_work(layers: list[TrackedLayer], rows: int, model: nn.Module | None = None) -> float:
    """Rough multiply-adds of one batch step (forward, backward and per-layer statistics) over ``rows``.

    With ``model`` (a step that runs it), at least 3 x its parameter count per row: when only small layers
    are tracked (LoRA adapters of a large language model) the untracked layers' forward and backward are
    most of the work, and must not be run on one thread."""
    per_row = sum(
        layer.in_features * layer.out_features * 3 + layer.in_features**2 + layer.out_features**2 for layer in layers
    )
    if model is not None:
        per_row = max(per_row, 3 * sum(p.numel() for p in model.parameters()))
    return float(rows) * per_row


def token_rows(batch: Examples) -> int:
    """Rows of the tracked layers' work in a batch: examples, times the sequence length for token batches."""
    if batch.attention_mask is None:
        return len(batch)
    return len(batch) * int(batch.attention_mask.shape[1])


def eigh_work(size: int) -> float:
    return 10.0 * float(size) ** 3
