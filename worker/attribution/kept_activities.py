"""A training pass's layer activities, kept so that later passes over the same training set run no model.

DataInf needs three passes over the training data with the same per-example layer gradients: its damping's
norms, each preconditioning of the query vectors, and the scores. ``ActivityKeeper`` keeps the first pass's
activities batch by batch within a byte budget; beyond the budget it gives up and the later passes run the model
again. Kept activities that would take ``SPILL_BYTES`` or more are not held beside the pass's own memory: each
batch's tensors are appended to anonymous temporary files (``FileRows``, as the training-gradient index does) and
mapped back read-only when the pass ends; each read of them hands its pages back to the kernel.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import torch

from worker.attribution.hooks import Activities, LayerActivity
from worker.attribution.training_index import SPILL_BYTES, FileRows, release_pages
from worker.attribution.types import Examples

# the tensors of a LayerActivity, in the order its constructor takes them
FIELDS = ("activations", "gradients", "mask", "example_gradients")


def activity_bytes(activities: Activities) -> int:
    return sum(
        t.numel() * t.element_size()
        for activity in activities.values()
        for t in (activity.activations, activity.gradients, activity.mask, activity.example_gradients)
        if t is not None
    )


Form = tuple[tuple[torch.dtype, tuple[int, ...]] | None, ...]


def _form(activity: LayerActivity) -> Form:
    """Which tensors the activity holds and their shapes past the batch dimension (the same in every batch)."""
    tensors = (activity.activations, activity.gradients, activity.mask, activity.example_gradients)
    return tuple(None if t is None else (t.dtype, tuple(t.shape[1:])) for t in tensors)


class KeptActivities:
    """Every batch's layer activities of one training set (the ``batch_size`` batches of ``gradients.batches``):
    in memory as they came, or in file mappings (``files``), read back batch by batch onto ``device``."""

    def __init__(
        self,
        examples: Examples,
        batch_size: int,
        in_memory: list[tuple[int, Activities]] | None = None,
        files: dict[tuple[str, str], torch.Tensor] | None = None,
        layer_names: list[str] | None = None,
        starts: list[int] | None = None,
        sizes: list[int] | None = None,
        mappings: list[mmap.mmap] | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.examples = examples
        self.batch_size = batch_size
        self.in_memory = in_memory
        self.files = files or {}
        self.layer_names = layer_names or []
        self.starts = starts or []
        self.sizes = sizes or []
        self.mappings = mappings or []
        self.device = device

    @property
    def spilled(self) -> bool:
        return self.in_memory is None

    def matches(self, examples: Examples, batch_size: int) -> bool:
        return examples is self.examples and batch_size == self.batch_size

    def batches(self) -> Iterator[tuple[int, Activities]]:
        """(start row, {layer: LayerActivity}) for each batch, in order."""
        if self.in_memory is not None:
            yield from self.in_memory
            return
        for start, size in zip(self.starts, self.sizes, strict=True):
            offset = start - self.starts[0]
            activities = {}
            for name in self.layer_names:
                tensors = [self._slice(name, field, offset, size) for field in FIELDS]
                activations, gradients, mask, example_gradients = tensors
                assert activations is not None and gradients is not None
                activities[name] = LayerActivity(activations, gradients, mask, example_gradients)
            yield start, activities
        release_pages(self.mappings)

    def _slice(self, name: str, field: str, offset: int, size: int) -> torch.Tensor | None:
        tensor = self.files.get((name, field))
        if tensor is None:
            return None
        return tensor[offset : offset + size].to(self.device)


class ActivityKeeper:
    """Keeps each batch's activities of a pass (``add``) within ``budget_bytes``; ``finish`` hands them over.

    Gives up (and frees what it holds) when the budget is exceeded or a layer's tensors change form between
    batches. When the first batch says the whole pass (``expected_rows``) will take ``spill_bytes`` or more, the
    tensors go to temporary files as they come."""

    def __init__(
        self,
        examples: Examples,
        batch_size: int,
        budget_bytes: int,
        spill_bytes: int | None = None,
    ) -> None:
        self.examples = examples
        self.batch_size = batch_size
        self.budget = int(budget_bytes)
        self.spill_bytes = SPILL_BYTES if spill_bytes is None else spill_bytes
        self.active = self.budget > 0
        self.used = 0
        self.in_memory: list[tuple[int, Activities]] | None = None
        self.files: dict[tuple[str, str], FileRows] = {}
        self.forms: dict[str, Form] = {}
        self.starts: list[int] = []
        self.sizes: list[int] = []
        self.device: torch.device | None = None

    def drop(self) -> None:
        self.active = False
        for store in self.files.values():
            store.close()
        self.files, self.in_memory, self.starts, self.sizes = {}, None, [], []

    def add(self, start: int, activities: Activities) -> None:
        if not self.active:
            return
        forms = {name: _form(activity) for name, activity in activities.items()}
        if self.forms and forms != self.forms:
            self.drop()
            return
        size = activity_bytes(activities)
        if self.used + size > self.budget:
            self.drop()
            return
        rows = next(iter(activities.values())).batch_size
        if not self.starts:
            self.forms = forms
            self.device = next(iter(activities.values())).activations.device
            expected = size * len(self.examples) // max(rows, 1)
            if expected < self.spill_bytes:
                self.in_memory = []
        try:
            if self.in_memory is not None:
                self.in_memory.append((start, activities))
            else:
                self._append_to_files(activities)
        except OSError:  # no room for the files: the later passes run the model
            self.drop()
            return
        self.used += size
        self.starts.append(start)
        self.sizes.append(rows)

    def _append_to_files(self, activities: Activities) -> None:
        for name, activity in activities.items():
            tensors = (activity.activations, activity.gradients, activity.mask, activity.example_gradients)
            for field, tensor in zip(FIELDS, tensors, strict=True):
                if tensor is None or tensor[0].numel() == 0:
                    continue  # nothing per row (a compact activity's empty activations): rebuilt when read
                self.files.setdefault((name, field), FileRows()).append(tensor)

    def finish(self) -> KeptActivities | None:
        """The kept activities (the keeper hands them over), or None when it gave up or kept nothing."""
        if not self.active or not self.starts:
            self.drop()
            return None
        if self.in_memory is not None:
            kept = KeptActivities(self.examples, self.batch_size, in_memory=self.in_memory)
            self.in_memory = None
            return kept
        tensors: dict[tuple[str, str], torch.Tensor] = {}
        mappings: list[mmap.mmap] = []
        try:
            for key in list(self.files):
                tensor, mapping = self.files.pop(key).finish()
                tensors[key] = tensor
                if mapping is not None:
                    mappings.append(mapping)
        except (OSError, ValueError):
            self.drop()
            return None
        self._add_empty_fields(tensors)
        kept = KeptActivities(
            self.examples,
            self.batch_size,
            files=tensors,
            layer_names=list(self.forms),
            starts=self.starts,
            sizes=self.sizes,
            mappings=mappings,
            device=self.device,
        )
        self.starts, self.sizes = [], []
        return kept

    def _add_empty_fields(self, tensors: dict[tuple[str, str], torch.Tensor]) -> None:
        """The tensors with no numbers per row (not written to files) as empty views of the right shape."""
        rows = sum(self.sizes)
        for name, form in self.forms.items():
            for field, described in zip(FIELDS, form, strict=True):
                if described is not None and (name, field) not in tensors:
                    dtype, shape = described
                    tensors[(name, field)] = torch.empty((rows, *shape), dtype=dtype)
