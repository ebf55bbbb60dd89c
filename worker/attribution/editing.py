"""First-order editing: the parameters the model would have if retrained without some examples.

theta_new = theta + (1/N) sum_{removed z} P grad l(z), with P the same preconditioner as the attribution
(removing z from the mean objective L = (1/N) sum_i l_i moves its minimiser by (1/N) H^-1 grad l(z)).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from worker.attribution.attribute import OPTION_TYPES, MethodOptions, build_scorers
from worker.attribution.curvature.base import Curvature
from worker.attribution.gradients import batches, model_dtype, place_model, training_activities
from worker.attribution.hooks import ActivityRecorder, evaluation_mode, split_weight_matrix, weight_matrix
from worker.attribution.losses import LossName, check_examples, check_loss_name
from worker.attribution.options import FIT_STRATEGIES, InfluenceOptions
from worker.attribution.scoring import check_finite_vectors
from worker.attribution.types import AttributionError, Examples, no_progress


def edit_parameters(
    model: nn.Module,
    train: Examples,
    remove: torch.Tensor,
    *,
    loss: LossName,
    method: Literal["influence", "datainf"] = "influence",
    options: MethodOptions | None = None,
    fit: Curvature | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """A full state_dict (same keys as ``model.state_dict()``) with the tracked layers moved by
    (1/N) P sum_{removed} grad l; every other entry is a copy of the model's."""
    check_loss_name(loss)
    if method not in ("influence", "datainf"):
        raise AttributionError(f"editing needs method 'influence' or 'datainf', got {method!r}")
    options = options if options is not None else OPTION_TYPES[method]()
    if not isinstance(options, OPTION_TYPES[method]):
        raise AttributionError(f"method {method!r} takes {OPTION_TYPES[method].__name__}, got {type(options).__name__}")
    options.validate()
    check_examples(train, "training")
    rows = removed_rows(remove, len(train))
    if fit is not None and not (isinstance(options, InfluenceOptions) and options.strategy in FIT_STRATEGIES):
        raise AttributionError("a precomputed fit is only used by method 'influence' with a factor strategy")
    placed, target = place_model(model, device)
    scorer = build_scorers([(placed, target)], train, loss, method, options, None if fit is None else [fit], no_progress)[0]
    assert scorer.preconditioner is not None
    removed = train.subset(rows)
    summed = {layer.name: torch.zeros(1, layer.out_features, layer.in_features, device=target, dtype=scorer.dtype) for layer in scorer.layers}
    with evaluation_mode(placed), ActivityRecorder(scorer.layers) as recorder:
        for _, batch in batches(removed, options.batch_size, target, model_dtype(placed)):
            activities = training_activities(placed, recorder, batch, loss)
            for name in scorer.layer_names:
                summed[name] += activities[name].summed_gradient().unsqueeze(0)
    steps = scorer.preconditioner.precondition(summed)
    check_finite_vectors(steps, "parameter edits")
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    for layer in scorer.layers:
        matrix = weight_matrix(layer) + steps[layer.name][0] / len(train)
        for key, value in split_weight_matrix(layer, matrix).items():
            state[key] = value.detach().to(state[key].device, state[key].dtype).clone()
    return state


def removed_rows(remove: torch.Tensor, size: int) -> torch.Tensor:
    rows = torch.as_tensor(remove)
    if rows.dtype.is_floating_point or rows.dtype == torch.bool or rows.dim() != 1:
        raise AttributionError("remove must be a 1-D tensor of integer row indices into the training data")
    if rows.numel() == 0:
        raise AttributionError("remove names no training example")
    if int(rows.min()) < 0 or int(rows.max()) >= size:
        raise AttributionError(f"remove indices must lie in [0, {size - 1}]")
    return torch.unique(rows.long())
