"""Streaming a dataset through the model in batches and recording per-layer gradients.

Three kinds of gradients: of the training loss (given labels, weighted), of pseudo-losses with labels
sampled from the model (true Fisher) or the given labels (empirical Fisher), and of the query
measurement.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from worker.attribution.hooks import Activities, ActivityRecorder
from worker.attribution.losses import (
    LossName,
    MeasurementName,
    check_targets,
    fisher_weights,
    forward,
    measurement_values,
    sample_targets,
    sample_token_labels,
    training_objective,
    weighted_sum,
)
from worker.attribution.types import Examples

EIGENVALUE_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class FisherLabels:
    """Where the labels of fitting gradients come from: sampled from the model (``true``) or given."""

    kind: str = "true"  # "true" | "empirical"
    samples: int = 1
    seed: int = 0

    def generator(self, first_row: int = 0) -> torch.Generator:
        """The generator of the labels drawn for the batch starting at training row ``first_row``: seeded by the
        seed and the row alone, so any pass (or shard of the training set) that starts a batch at that row draws
        the same labels for it."""
        # torch's CPU generator keeps 32 bits of its seed: the pair is hashed to 32 bits
        digest = hashlib.blake2b(f"{self.seed}:{first_row}".encode(), digest_size=4).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little"))

    def for_eigenvalues(self) -> FisherLabels:
        """Labels of the EK-FAC eigenvalue pass. With the true Fisher they are drawn independently of the
        covariance pass: labels re-used from the samples that chose the eigenbasis bias its eigenvalues
        (LDS on digits, untuned recipe: 0.50 with re-used labels, 0.60 with fresh ones, as kronfluence)."""
        if self.kind != "true":
            return self
        return FisherLabels(self.kind, self.samples, self.seed + EIGENVALUE_SEED_OFFSET)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


def batches(
    examples: Examples, batch_size: int, device: torch.device, dtype: torch.dtype
) -> Iterator[tuple[int, Examples]]:
    """(start row, batch on ``device``) for consecutive batches; float inputs cast to ``dtype``."""
    for start in range(0, len(examples), batch_size):
        index = torch.arange(start, min(start + batch_size, len(examples)))
        batch = examples.subset(index)
        inputs = batch.inputs.to(device)
        if inputs.dtype.is_floating_point:
            inputs = inputs.to(dtype)
        weights = None if batch.weights is None else batch.weights.to(device, dtype)
        mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
        yield start, Examples(inputs=inputs, targets=batch.targets.to(device), weights=weights, attention_mask=mask)


def run_model(model: nn.Module, recorder: ActivityRecorder, batch: Examples) -> torch.Tensor:
    """Clears ``recorder`` (which masks padded positions with the batch's attention mask) and runs the model."""
    recorder.clear(batch.attention_mask)
    return forward(model, batch.inputs, batch.attention_mask)


def sampled_labels(
    outputs: torch.Tensor, given: torch.Tensor, loss: LossName, generator: torch.Generator
) -> torch.Tensor:
    """Labels drawn from the model (true Fisher); causal LM labels only at the given labels' scored positions."""
    if loss == "causal_lm":
        return sample_token_labels(outputs, given, generator)
    return sample_targets(outputs, loss, generator)


def training_activities(model: nn.Module, recorder: ActivityRecorder, batch: Examples, loss: LossName) -> Activities:
    """Per-layer activity for the gradient of sum_i w_i loss_i (the given labels)."""
    outputs = run_model(model, recorder, batch)
    targets = check_targets(outputs, batch.targets, loss)
    objective = training_objective(outputs, targets, batch.weights, loss)
    del outputs  # not needed by the backward pass (see ``fitting_activities``)
    return recorder.backward(objective, retain_graph=False)


MAX_REPLICATED_ROWS = 4096


def fitting_activities(
    model: nn.Module,
    recorder: ActivityRecorder,
    batch: Examples,
    loss: LossName,
    labels: FisherLabels,
    generator: torch.Generator,
) -> list[Activities]:
    """Activities of fitting gradients: with the given labels (empirical), or with labels sampled from
    the model (true Fisher). Several draws replicate the batch (one row per example and draw, in chunks
    of at most MAX_REPLICATED_ROWS rows), so each returned activity may hold B x draws rows."""
    if labels.kind == "empirical":
        outputs = run_model(model, recorder, batch)
        given = check_targets(outputs, batch.targets, loss)
        objective = training_objective(outputs, given, batch.weights, loss)
        # the backward pass does not read the outputs (the loss keeps what it needs): a language model's
        # (B, T, vocabulary) logits are freed before it, instead of living through its peak
        del outputs
        return [recorder.backward(objective, retain_graph=False)]
    rows = len(batch)
    per_chunk = max(1, min(labels.samples, MAX_REPLICATED_ROWS // max(rows, 1)))
    result = []
    for first in range(0, labels.samples, per_chunk):
        draws = min(per_chunk, labels.samples - first)
        replicated = batch if draws == 1 else _replicate(batch, draws)
        outputs = run_model(model, recorder, replicated)
        check_targets(outputs[::draws], batch.targets, loss)
        sampled = sampled_labels(outputs, replicated.targets, loss, generator)
        weights = fisher_weights(batch.weights)
        if weights is not None and draws > 1:
            weights = weights.repeat_interleave(draws)
        objective = training_objective(outputs, sampled, weights, loss)
        del outputs
        result.append(recorder.backward(objective, retain_graph=False))
    return result


def _replicate(batch: Examples, draws: int) -> Examples:
    """Each row repeated ``draws`` times in a row (inputs, targets and attention mask; weights are not kept)."""
    mask = None if batch.attention_mask is None else batch.attention_mask.repeat_interleave(draws, dim=0)
    return Examples(
        inputs=batch.inputs.repeat_interleave(draws, dim=0),
        targets=batch.targets.repeat_interleave(draws, dim=0),
        attention_mask=mask,
    )


def measurement_activities(
    model: nn.Module, recorder: ActivityRecorder, batch: Examples, loss: LossName, measurement: MeasurementName
) -> Activities:
    """Per-layer activity for the gradient of sum_q f(z_q) (query weights are not applied)."""
    outputs = run_model(model, recorder, batch)
    targets = check_targets(outputs, batch.targets, loss)
    objective = weighted_sum(measurement_values(outputs, targets, loss, measurement), None)
    del outputs
    return recorder.backward(objective, retain_graph=False)


def place_model(model: nn.Module, device: torch.device | str | None) -> tuple[nn.Module, torch.device]:
    """The model on ``device`` (a copy when it lives elsewhere; the caller's model is never moved)."""
    current = model_device(model)
    if device is None:
        return model, current
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    if target == current:
        return model, current
    return copy.deepcopy(model).to(target), target


def fitting_and_training_activities(
    model: nn.Module,
    recorder: ActivityRecorder,
    batch: Examples,
    loss: LossName,
    labels: FisherLabels,
    generator: torch.Generator,
) -> tuple[list[Activities], Activities]:
    """``fitting_activities`` and ``training_activities`` of one batch, sharing work where possible: with
    the empirical Fisher they are the same gradients; with one sampled label per example both backward
    passes use one forward. The sampled labels are drawn exactly as ``fitting_activities`` draws them."""
    if labels.kind == "empirical":
        fitting = fitting_activities(model, recorder, batch, loss, labels, generator)
        return fitting, fitting[0]
    if labels.samples == 1:
        outputs = run_model(model, recorder, batch)
        given = check_targets(outputs, batch.targets, loss)
        sampled = sampled_labels(outputs, given, loss, generator)
        fitting_objective = training_objective(outputs, sampled, fisher_weights(batch.weights), loss)
        objective = training_objective(outputs, given, batch.weights, loss)
        del outputs
        sampled_fitting = recorder.backward(fitting_objective, retain_graph=True)
        training = recorder.backward(objective, retain_graph=False)
        return [sampled_fitting], training
    fitting_list = fitting_activities(model, recorder, batch, loss, labels, generator)
    return fitting_list, training_activities(model, recorder, batch, loss)
