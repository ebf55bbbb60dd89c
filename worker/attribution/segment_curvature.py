"""SOURCE's curvature per segment (docs/methods.md, source) and the segment walk.

variant ``full``: K-FAC factors A, S fitted at every checkpoint of the segment and averaged; one eigenbasis of
the averages; corrected eigenvalues fitted at every checkpoint in that basis and averaged. The training
gradients of the segment are averaged over its checkpoints.
variant ``averaged_parameters``: one EK-FAC fit at the mean of the segment's checkpoint parameters, whose
gradients stand for the segment's mean gradient.

Matrix functions of the segment's eigenvalues (plus the optional damping):
E_s = exp(-eta_s T_s Lambda_s), U_s = (1 - exp(-eta_s T_s Lambda_s)) / Lambda_s, applied in its eigenbasis.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from worker.attribution.curvature.base import LayerVectors
from worker.attribution.gradients import FisherLabels, model_dtype
from worker.attribution.hooks import resolve_layers
from worker.attribution.losses import LossName
from worker.attribution.matrix_functions import forgetting, unrolled
from worker.attribution.progress import StageCounter
from worker.attribution.statistics import (
    Covariances,
    apply_in_eigenbasis,
    eigenbasis,
    fit_corrected_eigenvalues,
    fit_covariances,
    pool_null_spaces,
)
from worker.attribution.trajectory import Segment
from worker.attribution.types import AttributionError, Examples

Variant = Literal["full", "averaged_parameters"]


@dataclass
class SegmentFit:
    """One segment's eigenbasis, mean corrected eigenvalues and matrix functions, and its gradient models."""

    segment: Segment
    num_examples: int  # N_s
    gradient_models: list[nn.Module]  # checkpoints (full) or the mean-parameter model (averaged_parameters)
    q_s: dict[str, torch.Tensor]
    q_a: dict[str, torch.Tensor]
    eigenvalues: dict[str, torch.Tensor]  # mean corrected Lambda (d_out, d_in), float64, damping not included
    forget: dict[str, torch.Tensor]  # E_s eigenvalues
    accumulate: dict[str, torch.Tensor]  # U_s eigenvalues

    def apply_forgetting(self, vectors: LayerVectors) -> LayerVectors:
        return {
            n: apply_in_eigenbasis(v, self.q_s[n], self.q_a[n], self.forget[n].to(v.dtype)) for n, v in vectors.items()
        }

    def apply_unrolled(self, vectors: LayerVectors) -> LayerVectors:
        return {
            n: apply_in_eigenbasis(v, self.q_s[n], self.q_a[n], self.accumulate[n].to(v.dtype))
            for n, v in vectors.items()
        }

    def describe(self) -> dict[str, object]:
        info = self.segment.describe(self.num_examples)
        scaled = torch.cat([(self.segment.horizon * lam).flatten() for lam in self.eigenvalues.values()])
        info["horizon_eigenvalue_max"] = float(scaled.max())
        info["horizon_eigenvalue_median"] = float(scaled.median())
        return info


def fit_passes_per_segment(segment: Segment, variant: Variant) -> int:
    """Passes over the stage data a segment's fit takes (two per fitted model)."""
    return 2 * (len(segment.checkpoints) if variant == "full" else 1)


def fit_segment(
    segment: Segment,
    data: Examples,
    layer_names: list[str],
    loss: LossName,
    labels: FisherLabels,
    variant: Variant,
    damping: float | None,
    batch_size: int,
    device: torch.device,
    counter: StageCounter,
) -> SegmentFit:
    models = [c.model for c in segment.checkpoints]
    if variant == "averaged_parameters":
        models = [mean_parameter_model(models)]
    per_model_layers = [resolve_layers(m, layer_names) for m in models]
    covariances = [
        fit_covariances(m, ls, data, loss, labels, batch_size, device, counter)
        for m, ls in zip(models, per_model_layers, strict=True)
    ]
    bases = {name: eigenbasis(mean_covariances([c[name] for c in covariances])) for name in layer_names}
    eigenvalue_fits = [
        fit_corrected_eigenvalues(m, ls, data, loss, labels.for_eigenvalues(), bases, batch_size, device, counter)
        for m, ls in zip(models, per_model_layers, strict=True)
    ]
    dtype = model_dtype(models[0])
    # averaged over the factors' null spaces, as for EK-FAC: the matrix functions do not depend on the basis there
    eigenvalues = {
        name: pool_null_spaces(torch.stack([e[name] for e in eigenvalue_fits]).mean(0), bases[name], dtype)
        for name in layer_names
    }
    return SegmentFit(
        segment=segment,
        num_examples=len(data),
        gradient_models=models,
        q_s={n: bases[n].gradient_eigenvectors.to(device, dtype) for n in layer_names},
        q_a={n: bases[n].activation_eigenvectors.to(device, dtype) for n in layer_names},
        eigenvalues=eigenvalues,
        forget={n: forgetting(_damped(lam, damping), segment.horizon).to(device) for n, lam in eigenvalues.items()},
        accumulate={n: unrolled(_damped(lam, damping), segment.horizon).to(device) for n, lam in eigenvalues.items()},
    )


def _damped(eigenvalues: torch.Tensor, damping: float | None) -> torch.Tensor:
    # Lambda are means of squares (>= 0); clamp tiny negative round-off before the matrix functions
    values = eigenvalues.to(torch.float64).clamp_min(0.0)
    return values if damping is None else values + float(damping)


def mean_covariances(parts: list[Covariances]) -> Covariances:
    return Covariances(
        torch.stack([p.activation for p in parts]).mean(0), torch.stack([p.gradient for p in parts]).mean(0)
    )


def mean_parameter_model(models: list[nn.Module]) -> nn.Module:
    """A copy of the first model whose floating-point parameters and buffers are the mean over ``models``."""
    averaged = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    mean_state = {}
    for key, value in states[0].items():
        if value.dtype.is_floating_point:
            mean_state[key] = torch.stack([s[key].to(value.device) for s in states]).mean(0)
        else:
            mean_state[key] = states[-1][key]
    averaged.load_state_dict(mean_state)
    return averaged.eval()


def check_same_architecture(reference: nn.Module, models: list[tuple[str, nn.Module]]) -> None:
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    for name, model in models:
        other = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if other != shapes:
            raise AttributionError(f"checkpoint {name} does not have the final model's parameter shapes")


def walk_query_vectors(
    fits: list[SegmentFit], gradients: LayerVectors, attributed: set[int]
) -> dict[int, LayerVectors]:
    """u_s = U_s E_{s+1} ... E_M grad f for the attributed segments (walking from the last segment to the first)."""
    v = gradients
    result: dict[int, LayerVectors] = {}
    for fit in reversed(fits):
        index = fit.segment.index
        if index in attributed:
            result[index] = fit.apply_unrolled(v)
        if any(i < index for i in attributed):
            v = fit.apply_forgetting(v)
    return result


def unrolled_parameter_change(fits: list[SegmentFit], steps: dict[int, LayerVectors]) -> LayerVectors:
    """sum_s E_M ... E_{s+1} U_s steps_s (walking from the first segment to the last)."""
    total: LayerVectors | None = None
    for fit in fits:
        if total is not None:
            total = fit.apply_forgetting(total)
        step = steps.get(fit.segment.index)
        if step is not None:
            moved = fit.apply_unrolled(step)
            total = moved if total is None else {n: total[n] + moved[n] for n in moved}
    assert total is not None, "no segment carries a parameter step"
    return total
