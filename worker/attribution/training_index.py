"""A persisted training-gradient index: the per-example layer inputs a and output gradients g of the
training loss (given labels, weighted) for every training example, recorded while fitting.

Only for fits whose tracked layers are all rank-one (Linear layers without sequence positions: the
per-example gradient of W is g a^T), and only when the rows fit ``FitOptions.memory_budget_bytes``.
A fit carrying an index lets ``attribute`` score the SAME training set (same rows, same model
parameters, same loss: checked by fingerprints) without running the model over it again: pairwise
and aggregate scores are contractions of the preconditioned query vectors with the stored (a, g), self
influence is computed in closed form (EK-FAC / K-FAC: in the eigenbasis).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from worker.attribution.hooks import Activities, LayerActivity
from worker.attribution.types import Examples

INDEX_ACTIVATIONS = "index_activations"
INDEX_GRADIENTS = "index_gradients"
INDEX_STATISTICS = (INDEX_ACTIVATIONS, INDEX_GRADIENTS)
INDEX_METADATA_KEY = "training_index"
INDEX_BLOCK_ELEMENTS = 16 * 1024**2  # rows x (d_in + d_out) elements handed to the scorer at once
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
    """Per layer: activations (N, d_in) and output gradients (N, d_out) of the training loss, CPU."""

    activations: dict[str, torch.Tensor]
    gradients: dict[str, torch.Tensor]
    num_examples: int
    train_fingerprint: str
    model_fingerprint: str
    loss: str

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.activations.values(), *self.gradients.values()])

    def matches(self, model: nn.Module, train: Examples, loss: str, layer_names: list[str]) -> bool:
        """True when the index was recorded for this training set, model state, loss and layers."""
        if len(train) != self.num_examples or loss != self.loss:
            return False
        if sorted(layer_names) != sorted(self.activations) or sorted(layer_names) != sorted(self.gradients):
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
        return {
            name: {INDEX_ACTIVATIONS: self.activations[name], INDEX_GRADIENTS: self.gradients[name]}
            for name in self.activations
        }

    @classmethod
    def from_layer_tensors(cls, metadata: str, tensors: dict[str, dict[str, torch.Tensor]]) -> TrainingIndex | None:
        try:
            info = json.loads(metadata)
            # fresh (aligned, owned) copies: memory-mapped file tensors can take other kernel paths
            activations = {
                n: stats[INDEX_ACTIVATIONS].clone() for n, stats in tensors.items() if INDEX_ACTIVATIONS in stats
            }
            gradients = {n: stats[INDEX_GRADIENTS].clone() for n, stats in tensors.items() if INDEX_GRADIENTS in stats}
            index = cls(
                activations,
                gradients,
                int(info["num_examples"]),
                str(info["train_fingerprint"]),
                str(info["model_fingerprint"]),
                str(info["loss"]),
            )
        except (KeyError, TypeError, ValueError):
            return None  # an unreadable index is not used (the fit itself stays valid)
        if not activations or sorted(activations) != sorted(gradients):
            return None
        if any(t.shape[0] != index.num_examples for t in [*activations.values(), *gradients.values()]):
            return None
        return index

    def block_rows(self, batch_size: int) -> int:
        width = sum(t.shape[1] for t in [*self.activations.values(), *self.gradients.values()])
        return max(batch_size, MIN_INDEX_BLOCK_ROWS, INDEX_BLOCK_ELEMENTS // max(width, 1))

    def blocks(self, rows: int, device: torch.device, dtype: torch.dtype) -> Iterator[tuple[int, Activities]]:
        """(start row, {layer: rank-one LayerActivity}) for consecutive blocks of ``rows`` examples."""
        for start in range(0, self.num_examples, rows):
            stop = min(start + rows, self.num_examples)
            yield (
                start,
                {
                    name: LayerActivity(
                        self.activations[name][start:stop].to(device, dtype).unsqueeze(1),
                        self.gradients[name][start:stop].to(device, dtype).unsqueeze(1),
                    )
                    for name in self.activations
                },
            )


class IndexRecorder:
    """Collects the per-batch (a, g) of rank-one layers during a fitting pass, within a byte budget.

    Gives up (and frees what it holds) as soon as a layer is not rank-one or the budget is exceeded.
    """

    def __init__(self, layer_names: list[str], budget_bytes: int):
        self.layer_names = list(layer_names)
        self.budget = int(budget_bytes)
        self.used = 0
        self.active = self.budget > 0
        self.activations: dict[str, list[torch.Tensor]] = {name: [] for name in self.layer_names}
        self.gradients: dict[str, list[torch.Tensor]] = {name: [] for name in self.layer_names}

    def drop(self) -> None:
        self.active = False
        self.activations = {name: [] for name in self.layer_names}
        self.gradients = {name: [] for name in self.layer_names}
        self.used = 0

    def add(self, activities: Activities) -> None:
        if not self.active:
            return
        if any(not activities[name].rank_one for name in self.layer_names):
            self.drop()
            return
        size = sum(
            activities[n].activations[:, 0].numel() * activities[n].activations.element_size()
            + activities[n].gradients[:, 0].numel() * activities[n].gradients.element_size()
            for n in self.layer_names
        )
        if self.used + size > self.budget:
            self.drop()
            return
        self.used += size
        for name in self.layer_names:
            self.activations[name].append(activities[name].activations[:, 0])
            self.gradients[name].append(activities[name].gradients[:, 0])

    def activity_batches(self) -> Iterator[Activities]:
        """The recorded batches again, as {layer: LayerActivity} (for a second statistics pass)."""
        for position in range(len(self.activations[self.layer_names[0]])):
            yield {
                name: LayerActivity(
                    self.activations[name][position].unsqueeze(1), self.gradients[name][position].unsqueeze(1)
                )
                for name in self.layer_names
            }

    def index(self, num_examples: int, train_fingerprint: str, model_fp: str, loss: str) -> TrainingIndex | None:
        if not self.active:
            return None
        activations = {n: torch.cat(self.activations[n]).cpu().contiguous() for n in self.layer_names}
        gradients = {n: torch.cat(self.gradients[n]).cpu().contiguous() for n in self.layer_names}
        if any(t.shape[0] != num_examples for t in [*activations.values(), *gradients.values()]):
            return None
        return TrainingIndex(activations, gradients, num_examples, train_fingerprint, model_fp, loss)
