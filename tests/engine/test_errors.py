"""Bad inputs raise AttributionError with a message that says what is wrong."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from worker.attribution import (
    AttributionError,
    DataInfOptions,
    Examples,
    FitOptions,
    GradientSimilarityOptions,
    InfluenceOptions,
    attribute,
    fit_curvature,
)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def data(n: int = 10, d: int = 4, classes: int = 3) -> Examples:
    return Examples(torch.randn(n, d), torch.randint(0, classes, (n,)))


def run(model=None, train=None, queries=None, **kwargs):
    params = dict(
        loss="cross_entropy",
        method="influence",
        mode="pairwise",
        measurement="loss",
        top_k=3,
        options=InfluenceOptions(batch_size=4),
    )
    params.update(kwargs)
    return attribute([model or mlp()], train or data(), queries if queries is not None else data(3), **params)


@pytest.mark.parametrize(
    "case,match",
    [
        (lambda: run(model=nn.Sequential(nn.ReLU())), "no trackable layer"),
        (lambda: run(options=InfluenceOptions(layers=["7"])), "unknown layer"),
        (lambda: run(train=data(d=6)), "do not fit the model"),
        (lambda: run(queries=data(3, d=2)), "do not fit the model"),
        (lambda: run(train=Examples(torch.randn(10, 4), torch.full((10,), 3))), r"targets must lie in \[0, 2\]"),
        (lambda: run(train=Examples(torch.randn(10, 4), torch.full((10,), -1))), "targets must lie"),
        (lambda: run(train=Examples(torch.randn(10, 4), torch.rand(10))), "integer class indices"),
        (
            lambda: run(
                loss="mse",
                measurement="loss",
                train=Examples(torch.randn(10, 4), torch.randn(10, 2)),
                queries=Examples(torch.randn(3, 4), torch.randn(3, 3)),
            ),
            "mse targets must have",
        ),
        (lambda: run(loss="mse", measurement="margin"), "margin"),
        (lambda: run(options=InfluenceOptions(damping=0.0)), "damping must be a positive"),
        (lambda: run(options=InfluenceOptions(damping=-1.0, strategy="exact")), "damping must be a positive"),
        (lambda: run(method="datainf", options=DataInfOptions(damping=-0.1)), "damping must be a positive"),
        (lambda: run(method="datainf", options=InfluenceOptions()), "takes DataInfOptions"),
        (
            lambda: attribute(
                [mlp()],
                data(),
                None,
                loss="cross_entropy",
                method="influence",
                mode="pairwise",
                options=InfluenceOptions(),
            ),
            "needs a query dataset",
        ),
        (
            lambda: attribute(
                [mlp()],
                data(),
                None,
                loss="cross_entropy",
                method="gradient_similarity",
                mode="self",
                options=GradientSimilarityOptions(normalize=True),
            ),
            "self mode",
        ),
        (lambda: run(top_k=0), "top_k"),
        (lambda: run(loss="hinge"), "unknown loss"),
        (lambda: run(train=Examples(torch.full((10, 4), float("nan")), torch.zeros(10, dtype=torch.long))), "NaN"),
        (
            lambda: run(
                options=InfluenceOptions(strategy="ekfac"),
                fits=[fit_curvature(mlp(), data(), "cross_entropy", FitOptions(strategy="kfac"))],
            ),
            "strategy",
        ),
        (lambda: fit_curvature(mlp(), data(), "cross_entropy", FitOptions(fisher_samples=0)), "fisher_samples"),
        (
            lambda: attribute(
                [mlp(), nn.Sequential(nn.Linear(4, 3))],
                data(),
                data(3),
                loss="cross_entropy",
                method="influence",
                mode="aggregate",
                options=InfluenceOptions(),
            ),
            "architecture",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_inputs_raise(case, match) -> None:
    with pytest.raises(AttributionError, match=match):
        case()


def test_non_finite_gradients_raise() -> None:
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    with pytest.raises(AttributionError, match=r"non-finite|NaN or Inf"):
        run(model=model)


def test_mse_targets_of_shape_n_accepted_for_one_output() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 1))
    result = attribute(
        [model],
        Examples(torch.randn(8, 4), torch.randn(8)),
        None,
        loss="mse",
        method="influence",
        mode="self",
        options=InfluenceOptions(strategy="kfac"),
    )
    assert result.scores.shape == (8,)
