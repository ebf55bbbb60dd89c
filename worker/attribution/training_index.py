"""A persisted training-gradient index: the per-example gradients of the training loss (given labels,
weighted) for every training example, recorded while fitting.

Per layer, the cheaper exact form is kept: for a rank-one layer (a Linear without sequence positions, whose
per-example gradient is g a^T) the layer input a and output gradient g (d_in + d_out numbers per example);
for a layer with positions (tokens, image patches: sum_t g_t a_t^T) the gradient matrix itself (d_out x d_in
per example; small for LoRA's adapter matrices, whose rank is one of the two sides). Only when the whole
index fits ``FitOptions.memory_budget_bytes``. A fit carrying an index lets ``attribute`` score the SAME
training set (same rows, same model parameters, same loss: checked by fingerprints) without running the
model over it again: pairwise and aggregate scores are contractions of the preconditioned query vectors
with the stored gradients, self influence is computed in closed form (EK-FAC / K-FAC: in the eigenbasis).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

import torch
from torch import nn

from worker.attribution.hooks import Activities, LayerActivity
from worker.attribution.types import Examples

INDEX_ACTIVATIONS = "index_activations"
INDEX_GRADIENTS = "index_gradients"
INDEX_EXAMPLE_GRADIENTS = "index_example_gradients"
INDEX_STATISTICS = (INDEX_ACTIVATIONS, INDEX_GRADIENTS, INDEX_EXAMPLE_GRADIENTS)
INDEX_METADATA_KEY = "training_index"
INDEX_BLOCK_ELEMENTS = 16 * 1024**2  # rows x (per-example width) elements handed to the scorer at once
MIN_INDEX_BLOCK_ROWS = 256
# A recorder whose rows may reach this many bytes writes them to temporary files as the pass goes and maps them
# back (``FileRows``), so they never sit in the process's memory beside the pass's own: what a GPT-2-small LoRA
# fit keeps of 256 sequences is 830 MB.
SPILL_BYTES = 64 * 1024**2


def _hash_tensor(digest: hashlib.blake2b, tensor: torch.Tensor | None) -> None:
    if tensor is None:
        digest.update(b"none;")
        return
    t = tensor.detach().to("cpu").contiguous()
    digest.update(f"{t.dtype};{tuple(t.shape)};".encode())
    if t.numel():
        digest.update(
            t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes()
        )


def examples_fingerprint(examples: Examples) -> str:
    """A hash of the training rows (inputs, targets, weights, and the attention mask of token datasets)."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in (examples.inputs, examples.targets, examples.weights):
        _hash_tensor(digest, tensor)
    if examples.attention_mask is not None:  # token datasets only (other fingerprints are unchanged)
        _hash_tensor(digest, examples.attention_mask)
    return digest.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's state (parameters and buffers, names, dtypes, values)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        digest.update(name.encode() + b";")
        _hash_tensor(digest, tensor)
    return digest.hexdigest()


@dataclass
class TrainingIndex:
    """Per layer, CPU: activations (N, d_in) and output gradients (N, d_out) of a rank-one layer, or the
    per-example gradient matrices (N, d_out, d_in) of a layer with positions (``matrices``)."""

    activations: dict[str, torch.Tensor]
    gradients: dict[str, torch.Tensor]
    num_examples: int
    train_fingerprint: str
    model_fingerprint: str
    loss: str
    matrices: dict[str, torch.Tensor] = field(default_factory=dict)
    # the file mappings the tensors live in, when the recorder spilled them (``FileRows``)
    mappings: list[mmap.mmap] = field(default_factory=list, repr=False)

    def release(self) -> None:
        release_pages(self.mappings)

    @property
    def nbytes(self) -> int:
        tensors = [*self.activations.values(), *self.gradients.values(), *self.matrices.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def layer_names(self) -> list[str]:
        return [*self.activations, *self.matrices]

    def matches(self, model: nn.Module, train: Examples, loss: str, layer_names: list[str]) -> bool:
        """True when the index was recorded for this training set, model state, loss and layers."""
        if len(train) != self.num_examples or loss != self.loss:
            return False
        if sorted(layer_names) != sorted(self.layer_names) or sorted(self.activations) != sorted(self.gradients):
            return False
        return (
            examples_fingerprint(train) == self.train_fingerprint and model_fingerprint(model) == self.model_fingerprint
        )

    def metadata(self) -> str:
        return json.dumps(
            {
                "num_examples": self.num_examples,
                "train_fingerprint": self.train_fingerprint,
                "model_fingerprint": self.model_fingerprint,
                "loss": self.loss,
            }
        )

    def layer_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        tensors = {
            name: {INDEX_ACTIVATIONS: self.activations[name], INDEX_GRADIENTS: self.gradients[name]}
            for name in self.activations
        }
        tensors.update({name: {INDEX_EXAMPLE_GRADIENTS: matrix} for name, matrix in self.matrices.items()})
        return tensors

    @classmethod
    def from_layer_tensors(cls, metadata: str, tensors: dict[str, dict[str, torch.Tensor]]) -> TrainingIndex | None:
        try:
            info = json.loads(metadata)
            # fresh (aligned, owned) copies: memory-mapped file tensors can take other kernel paths
            activations = {
                n: stats[INDEX_ACTIVATIONS].clone() for n, stats in tensors.items() if INDEX_ACTIVATIONS in stats
            }
            gradients = {n: stats[INDEX_GRADIENTS].clone() for n, stats in tensors.items() if INDEX_GRADIENTS in stats}
            matrices = {
                n: stats[INDEX_EXAMPLE_GRADIENTS].clone()
                for n, stats in tensors.items()
                if INDEX_EXAMPLE_GRADIENTS in stats
            }
            index = cls(
                activations,
                gradients,
                int(info["num_examples"]),
                str(info["train_fingerprint"]),
                str(info["model_fingerprint"]),
                str(info["loss"]),
                matrices,
            )
        except (KeyError, TypeError, ValueError):
            return None  # an unreadable index is not used (the fit itself stays valid)
        if not index.layer_names or sorted(activations) != sorted(gradients) or set(activations) & set(matrices):
            return None
        if any(t.shape[0] != index.num_examples for t in [*activations.values(), *gradients.values()]):
            return None
        if any(t.dim() != 3 or t.shape[0] != index.num_examples for t in matrices.values()):
            return None
        return index

    def block_rows(self, batch_size: int) -> int:
        width = sum(t[0].numel() for t in [*self.activations.values(), *self.gradients.values()])
        width += sum(t[0].numel() for t in self.matrices.values())
        return max(batch_size, MIN_INDEX_BLOCK_ROWS, INDEX_BLOCK_ELEMENTS // max(width, 1))

    def blocks(self, rows: int, device: torch.device, dtype: torch.dtype) -> Iterator[tuple[int, Activities]]:
        """(start row, {layer: LayerActivity}) for consecutive blocks of ``rows`` examples."""
        for start in range(0, self.num_examples, rows):
            stop = min(start + rows, self.num_examples)
            block = {
                name: LayerActivity(
                    self.activations[name][start:stop].to(device, dtype).unsqueeze(1),
                    self.gradients[name][start:stop].to(device, dtype).unsqueeze(1),
                )
                for name in self.activations
            }
            for name, matrix in self.matrices.items():
                block[name] = LayerActivity.of_gradients(matrix[start:stop].to(device, dtype))
            yield start, block
        self.release()


def release_pages(mappings: list[mmap.mmap]) -> None:
    """Hands the pages of file-mapped rows that were read back to the kernel (they stay in the page cache and are
    read again on the next use): read once per pass, the rows do not stay counted in the process."""
    for mapping in mappings:
        mapping.madvise(mmap.MADV_DONTNEED)


class MemoryRows:
    """One statistic's rows of one layer, kept in memory batch by batch."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []

    def append(self, rows: torch.Tensor) -> None:
        self.parts.append(rows)

    def finish(self) -> tuple[torch.Tensor, mmap.mmap | None]:
        return _joined(self.parts), None


class FileRows:
    """One statistic's rows of one layer, appended batch by batch to an anonymous temporary file (it has no name
    in the file system from the start, so the kernel frees it whenever the process ends, even by SIGKILL in the
    middle of a pass) and mapped back (private, read-only use) when the pass is done."""

    def __init__(self) -> None:
        self.file: IO[bytes] = tempfile.TemporaryFile(prefix="attrib-index-")  # noqa: SIM115  (closed by finish or close)
        self.rows = 0
        self.shape: tuple[int, ...] = ()
        self.dtype = torch.float32

    def append(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to("cpu").contiguous()
        if not self.rows:
            self.shape, self.dtype = tuple(rows.shape[1:]), rows.dtype
        self.file.write(rows.view(torch.uint8).numpy().data)
        self.rows += rows.shape[0]

    def finish(self) -> tuple[torch.Tensor, mmap.mmap | None]:
        try:
            self.file.flush()
            mapping = mmap.mmap(self.file.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            self.close()
        return torch.frombuffer(mapping, dtype=self.dtype).view(self.rows, *self.shape), mapping

    def close(self) -> None:
        """Frees the file (a mapping of it keeps its pages until the mapping is closed)."""
        self.file.close()


RowStore = MemoryRows | FileRows


class IndexRecorder:
    """Collects the per-batch gradients of the tracked layers during a fitting pass, within a byte budget:
    (a, g) rows of rank-one layers, per-example gradient matrices of layers with positions.

    Gives up (and frees what it holds) as soon as the budget is exceeded or a layer changes form. When the
    first batch's size says the ``expected_rows`` will take ``spill_bytes`` or more, the rows go to temporary
    files as they come (``FileRows``) instead of memory; ``finish`` maps them back once the pass is done.
    """

    def __init__(
        self, layer_names: list[str], budget_bytes: int, expected_rows: int = 0, spill_bytes: int | None = None
    ):
        self.layer_names = list(layer_names)
        self.budget = int(budget_bytes)
        self.used = 0
        self.active = self.budget > 0
        self.rank_one: dict[str, bool] = {}
        self.batch_rows: list[int] = []
        self.expected_rows = expected_rows
        self.spill_bytes = SPILL_BYTES if spill_bytes is None else spill_bytes
        self.spilling = False  # rows go to temporary files (FileRows) rather than memory
        self.stores: dict[tuple[str, str], RowStore] = {}
        self.finished: dict[tuple[str, str], torch.Tensor] = {}
        self.mappings: list[mmap.mmap] = []

    def drop(self) -> None:
        self.active = False
        self._close_files()
        self.stores, self.finished, self.mappings, self.batch_rows = {}, {}, [], []
        self.used = 0

    def _close_files(self) -> None:
        for store in self.stores.values():
            if isinstance(store, FileRows):
                store.close()

    def _store(self, name: str, statistic: str) -> RowStore:
        key = (name, statistic)
        if key not in self.stores:
            self.stores[key] = FileRows() if self.spilling else MemoryRows()
        return self.stores[key]

    def add(self, activities: Activities) -> None:
        if not self.active:
            return
        forms = {name: activities[name].rank_one for name in self.layer_names}
        if self.rank_one and forms != self.rank_one:
            self.drop()
            return
        self.rank_one = forms
        size = 0
        for name in self.layer_names:
            activity = activities[name]
            rows = activity.batch_size
            width = activity.activations.shape[2] + activity.gradients.shape[2]
            if not forms[name]:
                width = activity.activations.shape[2] * activity.gradients.shape[2]
            size += rows * width * activity.activations.element_size()
        if self.used + size > self.budget:
            self.drop()
            return
        rows_in_batch = activities[self.layer_names[0]].batch_size
        try:
            if not self.batch_rows and size * self.expected_rows >= self.spill_bytes * max(rows_in_batch, 1):
                self.spilling = True
            for name in self.layer_names:
                activity = activities[name]
                if forms[name]:
                    self._store(name, INDEX_ACTIVATIONS).append(activity.activations[:, 0])
                    self._store(name, INDEX_GRADIENTS).append(activity.gradients[:, 0])
                else:
                    self._store(name, INDEX_EXAMPLE_GRADIENTS).append(activity.per_example_gradients())
        except OSError:  # no room for the spilled rows: the fit goes on without them
            self.drop()
            return
        self.used += size
        self.batch_rows.append(rows_in_batch)

    def finish(self) -> bool:
        """Ends the recording: the rows joined (or mapped back from their files), one tensor per layer and
        statistic. False (and nothing kept) when the recorder gave up."""
        if not self.active:
            return False
        if not self.finished:
            try:
                for key in list(self.stores):
                    tensor, mapping = self.stores.pop(key).finish()
                    self.finished[key] = tensor
                    if mapping is not None:
                        self.mappings.append(mapping)
            except (OSError, ValueError):
                self.drop()
                return False
        return True

    def release(self) -> None:
        release_pages(self.mappings)

    def activity_batches(self) -> Iterator[Activities]:
        """The recorded batches again, as {layer: LayerActivity} (for a second statistics pass)."""
        if not self.finish():
            return
        start = 0
        for rows in self.batch_rows:
            stop = start + rows
            activities = {}
            for name in self.layer_names:
                if self.rank_one[name]:
                    activities[name] = LayerActivity(
                        self.finished[(name, INDEX_ACTIVATIONS)][start:stop].unsqueeze(1),
                        self.finished[(name, INDEX_GRADIENTS)][start:stop].unsqueeze(1),
                    )
                else:
                    activities[name] = LayerActivity.of_gradients(
                        self.finished[(name, INDEX_EXAMPLE_GRADIENTS)][start:stop]
                    )
            yield activities
            start = stop
        self.release()

    def index(self, num_examples: int, train_fingerprint: str, model_fp: str, loss: str) -> TrainingIndex | None:
        """The recorded rows as an index (the recorder hands them over)."""
        if not self.finish():
            return None
        one = [n for n in self.layer_names if self.rank_one[n]]
        activations = {n: self.finished[(n, INDEX_ACTIVATIONS)] for n in one}
        gradients = {n: self.finished[(n, INDEX_GRADIENTS)] for n in one}
        matrices = {n: self.finished[(n, INDEX_EXAMPLE_GRADIENTS)] for n in self.layer_names if not self.rank_one[n]}
        mappings = self.mappings
        self.finished, self.mappings = {}, []
        self.drop()
        if any(t.shape[0] != num_examples for t in [*activations.values(), *gradients.values(), *matrices.values()]):
            return None
        index = TrainingIndex(activations, gradients, num_examples, train_fingerprint, model_fp, loss, matrices)
        index.mappings = mappings
        return index


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)`` on the CPU, emptying ``parts`` as it copies (peak memory: the result and one part)."""
    rows = sum(p.shape[0] for p in parts)
    joined = torch.empty((rows, *parts[0].shape[1:]), dtype=parts[0].dtype, device="cpu")
    start = 0
    while parts:
        part = parts.pop(0)
        joined[start : start + part.shape[0]] = part
        start += part.shape[0]
        del part
    return joined
