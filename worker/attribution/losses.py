"""Per-example losses, measurements and labels sampled from the model (true Fisher).

All objectives handed to the hooks are sums over the batch, so each example's gradient is its own.
cross_entropy: -log softmax(z)[y]; mse: 1/2 sum over outputs of the squared error; causal_lm: the
summed next-token negative log-likelihood of the scored tokens, -sum_t log softmax(z_t)[y_{t+1}] over
positions whose label y_{t+1} is not -100 (logits (B, T, V), labels (B, T) aligned with the inputs, the
shift done here as in Hugging Face's causal LM loss). Example weights multiply the loss.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from worker.attribution.text import IGNORE_INDEX, run_text_model
from worker.attribution.types import AttributionError, Examples

LossName = Literal["cross_entropy", "mse", "causal_lm"]
MeasurementName = Literal["loss", "margin"]
LOSS_NAMES: tuple[LossName, ...] = ("cross_entropy", "mse", "causal_lm")


def loss_name(loss: str) -> LossName:
    """``loss`` as a ``LossName``; an AttributionError when it names no loss."""
    for name in LOSS_NAMES:
        if loss == name:
            return name
    raise AttributionError(f"unknown loss {loss!r}; expected 'cross_entropy', 'mse' or 'causal_lm'")


def check_loss_name(loss: str) -> None:
    if loss not in LOSS_NAMES:
        raise AttributionError(f"unknown loss {loss!r}; expected 'cross_entropy', 'mse' or 'causal_lm'")


def forward(model: nn.Module, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Runs the model, turning a shape error into an AttributionError.

    With an ``attention_mask`` (token inputs) the model is run by ``text.run_text_model`` (the Hugging
    Face convention); a returned ``ModelOutput`` gives its ``logits``.
    """
    try:
        outputs = model(inputs) if attention_mask is None else run_text_model(model, inputs, attention_mask)
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, IndexError, TypeError) as error:
        raise AttributionError(
            f"inputs of shape {tuple(inputs.shape[1:])} (per example) do not fit the model: {error}"
        ) from error
    outputs = without_padding(output_tensor(outputs), attention_mask)
    if not torch.isfinite(outputs.detach()).all():
        raise AttributionError("the model's outputs contain NaN or Inf (non-finite weights or inputs?)")
    return outputs


def without_padding(outputs: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Token outputs (B, T, ...) set to 0 at padded positions: they are never used (and may be NaN: fully masked
    attention rows)."""
    if attention_mask is not None and outputs.dim() >= 3 and outputs.shape[:2] == attention_mask.shape:
        kept = attention_mask.bool()
        if not bool(kept.all()):  # (an unpadded batch keeps its logits: no copy of a (B, T, vocabulary) tensor)
            return torch.where(kept.unsqueeze(-1), outputs, 0.0)
    return outputs


def output_tensor(outputs: object) -> torch.Tensor:
    """The model's output tensor: the tensor itself, or the ``logits`` of a Hugging Face ``ModelOutput``."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise AttributionError(f"the model must return a tensor or logits, got {type(outputs).__name__}")
    return logits


def check_targets(outputs: torch.Tensor, targets: torch.Tensor, loss: LossName) -> torch.Tensor:
    """Validates targets against the model outputs; returns them in the form the loss needs."""
    if loss == "causal_lm":
        return _check_token_labels(outputs, targets)
    if loss == "cross_entropy":
        if outputs.dim() != 2:
            raise AttributionError(
                f"cross_entropy needs model outputs of shape (B, classes), got {tuple(outputs.shape)}"
            )
        if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.dim() != 1:
            raise AttributionError(
                f"cross_entropy targets must be integer class indices of shape (N,), got {targets.dtype} "
                f"{tuple(targets.shape)}"
            )
        classes = outputs.shape[1]
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= classes):
            raise AttributionError(
                f"cross_entropy targets must lie in [0, {classes - 1}], got values in "
                f"[{int(targets.min())}, {int(targets.max())}]"
            )
        return targets.long()
    if not targets.dtype.is_floating_point:
        targets = targets.to(outputs.dtype)
    if targets.shape != outputs.shape:
        if targets.dim() == 1 and outputs.dim() == 2 and outputs.shape[1] == 1:
            targets = targets.reshape(-1, 1)
        else:
            raise AttributionError(
                f"mse targets must have the model output's shape {tuple(outputs.shape)}, got {tuple(targets.shape)}"
            )
    if not torch.isfinite(targets).all():
        raise AttributionError("mse targets contain NaN or Inf")
    return targets.to(outputs.dtype)


def _check_token_labels(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if outputs.dim() != 3:
        raise AttributionError(f"causal_lm needs model logits of shape (B, T, vocabulary), got {tuple(outputs.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.shape != outputs.shape[:2]:
        raise AttributionError(
            f"causal_lm labels must be integer token ids of shape (N, T) = {tuple(outputs.shape[:2])} (-100 = not "
            f"scored), got {labels.dtype} {tuple(labels.shape)}"
        )
    vocabulary = outputs.shape[2]
    scored = labels[labels != IGNORE_INDEX]
    if scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= vocabulary):
        raise AttributionError(
            f"causal_lm labels must be -100 or lie in [0, {vocabulary - 1}], got values in "
            f"[{int(scored.min())}, {int(scored.max())}]"
        )
    return labels.long()


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: logit position t is scored when the next label y_{t+1} is not -100 (last position never)."""
    scored = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    scored[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return scored


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) next-token losses -log softmax(z_t)[y_{t+1}] at scored positions, 0 elsewhere."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    values = F.cross_entropy(logits.flatten(0, 1), shifted.flatten(), reduction="none", ignore_index=IGNORE_INDEX)
    return values.reshape(labels.shape)


def per_example_loss(outputs: torch.Tensor, targets: torch.Tensor, loss: LossName) -> torch.Tensor:
    """(B,) unweighted losses."""
    if loss == "causal_lm":
        return token_losses(outputs, targets).sum(1)
    if loss == "cross_entropy":
        return F.cross_entropy(outputs, targets, reduction="none")
    return 0.5 * (outputs - targets).pow(2).flatten(1).sum(1)


def weighted_sum(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return values.sum()
    return (values * weights.to(values.dtype)).sum()


def training_objective(
    outputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None, loss: LossName
) -> torch.Tensor:
    """Sum over the batch of weight_i * loss_i (targets already checked)."""
    return weighted_sum(per_example_loss(outputs, targets, loss), weights)


def margins(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) logit of the true class minus logsumexp of the other logits."""
    true_logit = outputs.gather(1, targets.reshape(-1, 1)).squeeze(1)
    others = outputs.scatter(1, targets.reshape(-1, 1), float("-inf"))
    return true_logit - torch.logsumexp(others, dim=1)


def measurement_values(
    outputs: torch.Tensor, targets: torch.Tensor, loss: LossName, measurement: MeasurementName
) -> torch.Tensor:
    """(B,) f(z_q): the query's loss, or minus its margin (so larger f = worse, as for the loss)."""
    if measurement == "loss":
        return per_example_loss(outputs, targets, loss)
    if measurement == "margin":
        if loss != "cross_entropy":
            raise AttributionError("measurement 'margin' needs loss 'cross_entropy'")
        if outputs.shape[1] < 2:
            raise AttributionError("measurement 'margin' needs at least two classes")
        return -margins(outputs, targets)
    raise AttributionError(f"unknown measurement {measurement!r}; expected 'loss' or 'margin'")


def sample_targets(outputs: torch.Tensor, loss: LossName, generator: torch.Generator) -> torch.Tensor:
    """Labels drawn from the model's predictive distribution (true Fisher = Gauss-Newton).

    cross_entropy: y ~ softmax(z); mse: y ~ N(f(x), I). Drawn on the CPU from ``generator`` so that a
    seed gives the same labels on every device.
    """
    detached = outputs.detach().to("cpu", torch.float64)
    if loss == "causal_lm":
        raise AttributionError("causal_lm labels are sampled by sample_token_labels (they need the given labels)")
    if loss == "cross_entropy":
        probabilities = torch.softmax(detached, dim=1)
        sampled = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
        return sampled.to(outputs.device)
    noise = torch.randn(detached.shape, generator=generator, dtype=torch.float64)
    return (detached + noise).to(outputs.device, outputs.dtype)


def sample_token_labels(logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Causal LM labels drawn from the model: y_{t+1} ~ softmax(z_t) at every scored position, -100 elsewhere.

    Drawn on the CPU from ``generator`` (as ``sample_targets``); ``labels`` gives the scored positions.
    """
    scored = scored_positions(labels)
    probabilities = torch.softmax(logits.detach()[scored].to("cpu", torch.float64), dim=-1)
    sampled = torch.full_like(labels, IGNORE_INDEX)
    if probabilities.shape[0]:
        draws = torch.multinomial(probabilities, 1, generator=generator).squeeze(1).to(labels.device)
        following = torch.zeros_like(scored)
        following[:, 1:] = scored[:, :-1]
        sampled[following] = draws
    return sampled


def output_hessian_factors(outputs: torch.Tensor, loss: LossName) -> torch.Tensor:
    """C (m, B, d_out) with sum_k C[k, b] C[k, b]^T = the Hessian of example b's loss in its outputs.

    cross_entropy: diag(p) - p p^T = sum_k p_k (e_k - p)(e_k - p)^T, so C[k] = sqrt(p_k) (e_k - p);
    mse (1/2 sum of squares): I, so C[k] = e_k. Back-propagating each C[k] gives pseudo-gradients whose
    outer products sum to the exact Gauss-Newton matrix (no label sampling). Detached; ``outputs`` (B, d_out).
    """
    detached = outputs.detach()
    eye = torch.eye(detached.shape[1], dtype=detached.dtype, device=detached.device)
    if loss == "cross_entropy":
        probabilities = torch.softmax(detached, dim=1)  # (B, C)
        return probabilities.T.sqrt().unsqueeze(-1) * (eye.unsqueeze(1) - probabilities.unsqueeze(0))
    return eye.unsqueeze(1).expand(-1, detached.shape[0], -1)


def fisher_weights(weights: torch.Tensor | None) -> torch.Tensor | None:
    """Weights for sampled-label pseudo-gradients: sqrt(|w|), so that E[g g^T] = w J^T H J."""
    return None if weights is None else weights.abs().sqrt()


def check_examples(examples: Examples, what: str) -> None:
    if len(examples) == 0:
        raise AttributionError(f"the {what} dataset is empty")
    if examples.targets.shape[0] != len(examples):
        raise AttributionError(f"the {what} dataset has {len(examples)} inputs but {examples.targets.shape[0]} targets")
    if examples.weights is not None:
        if examples.weights.shape != (len(examples),):
            raise AttributionError(f"the {what} dataset's weights must have shape ({len(examples)},)")
        if not torch.isfinite(examples.weights).all():
            raise AttributionError(f"the {what} dataset's weights contain NaN or Inf")
    if examples.attention_mask is not None and examples.attention_mask.shape != examples.inputs.shape[:2]:
        raise AttributionError(
            f"the {what} dataset's attention_mask must have the token inputs' shape {tuple(examples.inputs.shape[:2])}, "
            f"got {tuple(examples.attention_mask.shape)}"
        )
    if examples.inputs.dtype.is_floating_point and not torch.isfinite(examples.inputs).all():
        raise AttributionError(f"the {what} dataset's inputs contain NaN or Inf")


def check_scoring_request(loss: str, mode: str, measurement: str, top_k: int) -> None:
    """The checks every scoring method makes of its mode, measurement and top_k."""
    check_loss_name(loss)
    if mode not in ("pairwise", "aggregate", "self"):
        raise AttributionError(f"unknown mode {mode!r}; expected 'pairwise', 'aggregate' or 'self'")
    if measurement not in ("loss", "margin"):
        raise AttributionError(f"unknown measurement {measurement!r}; expected 'loss' or 'margin'")
    if measurement == "margin" and loss != "cross_entropy":
        raise AttributionError("measurement 'margin' needs loss 'cross_entropy'")
    if mode == "pairwise" and (not isinstance(top_k, int) or top_k < 1):
        raise AttributionError(f"top_k must be a positive integer, got {top_k!r}")


def constant_prediction_loss(targets: torch.Tensor, weights: torch.Tensor | None, loss: LossName) -> float | None:
    """Σ_i w_i ℓ_i(c) / B for the best constant prediction c of these B rows' targets (w_i = 1 without weights):
    the weighted class frequencies (cross_entropy), the weighted mean target (mse), the weighted unigram
    frequencies of the scored next tokens (causal_lm). What a model has learned about rows is this minus their
    mean loss. None when it is undefined: no rows (or no scored token), or weights that are negative or sum to 0."""
    if len(targets) == 0:
        return None
    w = torch.ones(len(targets), dtype=torch.float64) if weights is None else weights.detach().cpu().double()
    if bool((w < 0).any()) or float(w.sum()) <= 0:
        return None
    labels = targets.detach().cpu()
    if loss == "mse":
        values = labels.double().reshape(len(labels), -1)
        mean = (w.unsqueeze(1) * values).sum(0) / w.sum()
        return float((w * 0.5 * (values - mean).pow(2).sum(1)).sum()) / len(labels)
    if loss == "cross_entropy":
        rows, tokens = w, labels.long()
    else:
        scored = labels[:, 1:] != IGNORE_INDEX
        rows, tokens = w.unsqueeze(1).expand(scored.shape)[scored], labels[:, 1:][scored].long()
    weighted = rows > 0  # (a token seen only in rows of weight 0 has frequency 0 and counts for nothing)
    rows, tokens = rows[weighted], tokens[weighted]
    if tokens.numel() == 0:
        return None
    counts = torch.zeros(int(tokens.max()) + 1, dtype=torch.float64).index_add_(0, tokens, rows)
    frequencies = counts / counts.sum()
    return float(-(rows * frequencies[tokens].log()).sum()) / len(labels)
