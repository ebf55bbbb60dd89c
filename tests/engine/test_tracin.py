"""TracInCP against the explicit formula sum_c eta_c G_query(theta_c) G_train(theta_c)^T (float64 models;
2e-7 relative to the largest |score|, as results are float32)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.engine.helpers import explicit_gradients, make_data, make_mlp
from worker.attribution import AttributionError
from worker.attribution.methods.tracin import TracInOptions, attribute_tracin
from worker.attribution.trajectory import TrajectoryCheckpoint


def _checkpoints() -> list[TrajectoryCheckpoint]:
    train = make_data(20, (5,), 3, 0)
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.4)
    checkpoints = []
    for step in range(1, 4):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(train.inputs), train.targets).backward()
        optimizer.step()
        checkpoints.append(TrajectoryCheckpoint(copy.deepcopy(model).eval(), step, 0.1 * step))
    return checkpoints


def _expected(checkpoints, train, queries, measurement: str) -> torch.Tensor:
    return sum(
        c.learning_rate
        * explicit_gradients(c.model, queries, "cross_entropy", measurement=measurement)
        @ explicit_gradients(c.model, train, "cross_entropy").T
        for c in checkpoints
    )


@pytest.mark.parametrize("measurement", ["loss", "margin"])
def test_tracin_pairwise_and_aggregate_equal_the_explicit_sum(measurement: str) -> None:
    checkpoints = _checkpoints()
    train, queries = make_data(17, (5,), 3, 3), make_data(4, (5,), 3, 4)
    expected = _expected(checkpoints, train, queries, measurement)
    scale = float(expected.abs().max())
    result = attribute_tracin(
        checkpoints[::-1],
        train,
        queries,
        loss="cross_entropy",
        mode="pairwise",
        measurement=measurement,
        top_k=len(train),
        options=TracInOptions(batch_size=5),
    )
    got = torch.full_like(expected, float("nan"))
    got.scatter_(1, result.topk.positive_indices, result.topk.positive_scores.double())
    assert float((got - expected).abs().max()) <= 2e-7 * scale
    top2 = attribute_tracin(
        checkpoints, train, queries, loss="cross_entropy", mode="pairwise", measurement=measurement, top_k=2
    )
    assert torch.equal(top2.topk.negative_indices, expected.argsort(1)[:, :2])
    aggregate = attribute_tracin(
        checkpoints, train, queries, loss="cross_entropy", mode="aggregate", measurement=measurement
    )
    assert float((aggregate.scores.double() - expected.sum(0)).abs().max()) <= 1e-6 * scale
    assert [c["step"] for c in result.diagnostics["checkpoints"]] == [1, 2, 3]


def test_tracin_self_is_the_weighted_squared_gradient_norm() -> None:
    checkpoints = _checkpoints()
    train = make_data(9, (5,), 3, 3)
    expected = sum(
        c.learning_rate * explicit_gradients(c.model, train, "cross_entropy").pow(2).sum(1) for c in checkpoints
    )
    result = attribute_tracin(checkpoints, train, None, loss="cross_entropy", mode="self")
    assert torch.allclose(result.scores.double(), expected, rtol=1e-6)


def test_tracin_bad_input() -> None:
    train = make_data(9, (5,), 3, 3)
    with pytest.raises(AttributionError, match="no checkpoint"):
        attribute_tracin([], train, None, loss="cross_entropy", mode="self")
    with pytest.raises(AttributionError, match="needs a query dataset"):
        attribute_tracin(_checkpoints(), train, None, loss="cross_entropy", mode="aggregate")
