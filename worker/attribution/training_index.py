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
from collections.abc import Iterator
from dataclasses import dataclass, field

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


class IndexRecorder:
    """Collects the per-batch gradients of the tracked layers during a fitting pass, within a byte budget:
    (a, g) rows of rank-one layers, per-example gradient matrices of layers with positions.

    Gives up (and frees what it holds) as soon as the budget is exceeded or a layer changes form.
    """

    def __init__(self, layer_names: list[str], budget_bytes: int):
        self.layer_names = list(layer_names)
        self.budget = int(budget_bytes)
        self.used = 0
        self.active = self.budget > 0
        self.rank_one: dict[str, bool] = {}
        self.activations: dict[str, list[torch.Tensor]] = {name: [] for name in self.layer_names}
        self.gradients: dict[str, list[torch.Tensor]] = {name: [] for name in self.layer_names}
        self.matrices: dict[str, list[torch.Tensor]] = {name: [] for name in self.layer_names}

    def drop(self) -> None:
        self.active = False
        self.activations = {name: [] for name in self.layer_names}
        self.gradients = {name: [] for name in self.layer_names}
        self.matrices = {name: [] for name in self.layer_names}
        self.used = 0

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
        self.used += size
        for name in self.layer_names:
            activity = activities[name]
            if forms[name]:
                self.activations[name].append(activity.activations[:, 0])
                self.gradients[name].append(activity.gradients[:, 0])
            else:
                self.matrices[name].append(activity.per_example_gradients())

    def activity_batches(self) -> Iterator[Activities]:
        """The recorded batches again, as {layer: LayerActivity} (for a second statistics pass)."""
        for position in range(self._batches()):
            activities = {}
            for name in self.layer_names:
                if self.rank_one[name]:
                    activities[name] = LayerActivity(
                        self.activations[name][position].unsqueeze(1), self.gradients[name][position].unsqueeze(1)
                    )
                else:
                    activities[name] = LayerActivity.of_gradients(self.matrices[name][position])
            yield activities

    def _batches(self) -> int:
        first = self.layer_names[0]
        return len(self.activations[first]) if self.rank_one.get(first, True) else len(self.matrices[first])

    def index(self, num_examples: int, train_fingerprint: str, model_fp: str, loss: str) -> TrainingIndex | None:
        """The recorded rows as an index; the recorder gives its batches up to it (one batch at a time, so the
        rows are never held twice)."""
        if not self.active:
            return None
        parts = {name: self.activations[name] for name in self.layer_names if self.rank_one[name]}
        gradient_parts = {name: self.gradients[name] for name in parts}
        matrix_parts = {name: self.matrices[name] for name in self.layer_names if not self.rank_one[name]}
        self.active = False
        activations = {n: _joined(p) for n, p in parts.items()}
        gradients = {n: _joined(p) for n, p in gradient_parts.items()}
        matrices = {n: _joined(p) for n, p in matrix_parts.items()}
        self.drop()
        if any(t.shape[0] != num_examples for t in [*activations.values(), *gradients.values(), *matrices.values()]):
            return None
        return TrainingIndex(activations, gradients, num_examples, train_fingerprint, model_fp, loss, matrices)


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
