"""The edit's loss warning: the share of what the model had learned about the remaining rows that an edit gives
back, measured against the best constant prediction of those rows.

``constant_prediction_loss`` is checked against ``per_example_loss`` of that constant (the same units as the
edit's remaining-loss diagnostics) and against other constants (it must be the smallest), for every loss, to
1e-12 in float64. The edit's warning is checked on a small float64 MLP: the default edit gives back little and
does not warn; the first-order step with the scoring damping gives back more than LEARNED_SHARE_WARNING and
warns.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.engine.helpers import fit_classifier
from worker.attribution import EditOptions, Examples, InfluenceOptions, edit_parameters
from worker.attribution.editing import LEARNED_SHARE_WARNING
from worker.attribution.losses import IGNORE_INDEX, constant_prediction_loss, per_example_loss


def weighted_mean_loss(outputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, loss) -> float:
    return float((weights * per_example_loss(outputs, targets, loss)).sum()) / len(targets)


def test_cross_entropy_constant_is_the_weighted_class_frequencies() -> None:
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 4, (50,), generator=generator)
    weights = torch.rand(50, generator=generator, dtype=torch.float64)
    frequencies = torch.zeros(4, dtype=torch.float64).index_add_(0, targets, weights)
    best = (frequencies / frequencies.sum()).log().expand(50, 4)
    value = constant_prediction_loss(targets, weights, "cross_entropy")
    assert value == pytest.approx(weighted_mean_loss(best, targets, weights, "cross_entropy"), abs=1e-12)
    for _ in range(5):
        other = best + 0.3 * torch.randn(4, generator=generator, dtype=torch.float64)
        assert value < weighted_mean_loss(other, targets, weights, "cross_entropy")
    uniform = torch.tensor([0, 1, 2, 3] * 5)
    assert constant_prediction_loss(uniform, None, "cross_entropy") == pytest.approx(math.log(4), abs=1e-12)


def test_mse_constant_is_the_weighted_mean_target() -> None:
    generator = torch.Generator().manual_seed(1)
    targets = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    weights = torch.rand(40, generator=generator, dtype=torch.float64)
    mean = (weights.unsqueeze(1) * targets).sum(0) / weights.sum()
    value = constant_prediction_loss(targets, weights, "mse")
    assert value == pytest.approx(weighted_mean_loss(mean.expand(40, 3), targets, weights, "mse"), abs=1e-12)
    for _ in range(5):
        other = mean + 0.1 * torch.randn(3, generator=generator, dtype=torch.float64)
        assert value < weighted_mean_loss(other.expand(40, 3), targets, weights, "mse")
    column = targets[:, :1]  # a single output given as (N,) targets means the same
    assert constant_prediction_loss(column.reshape(-1), weights, "mse") == pytest.approx(
        constant_prediction_loss(column, weights, "mse"), abs=1e-12
    )


def test_causal_lm_constant_is_the_unigram_of_the_scored_next_tokens() -> None:
    generator = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 6, (8, 7), generator=generator)
    labels[:, :2] = IGNORE_INDEX  # a prompt that is not scored
    labels[3, 4:] = IGNORE_INDEX
    weights = torch.rand(8, generator=generator, dtype=torch.float64)
    scored = labels[:, 1:] != IGNORE_INDEX
    tokens = labels[:, 1:][scored]
    counts = torch.zeros(6, dtype=torch.float64).index_add_(0, tokens, weights.unsqueeze(1).expand(8, 6)[scored])
    logits = (counts / counts.sum()).log().expand(8, 7, 6)
    value = constant_prediction_loss(labels, weights, "causal_lm")
    assert value == pytest.approx(weighted_mean_loss(logits, labels, weights, "causal_lm"), abs=1e-12)
    other = logits + 0.3 * torch.randn(6, generator=generator, dtype=torch.float64)
    assert value < weighted_mean_loss(other, labels, weights, "causal_lm")


def test_undefined_constants_are_none() -> None:
    assert constant_prediction_loss(torch.zeros(0, dtype=torch.long), None, "cross_entropy") is None
    assert constant_prediction_loss(torch.tensor([0, 1]), torch.tensor([1.0, -0.5]), "cross_entropy") is None
    assert constant_prediction_loss(torch.tensor([0, 1]), torch.zeros(2), "cross_entropy") is None
    assert constant_prediction_loss(torch.full((2, 3), IGNORE_INDEX), None, "causal_lm") is None
    # a class seen only in rows of weight 0 counts for nothing (no log 0)
    assert constant_prediction_loss(torch.tensor([0, 0, 1]), torch.tensor([1.0, 1.0, 0.0]), "cross_entropy") == 0.0


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, Examples]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(120, 4, generator=generator, dtype=torch.float64)
    targets = (inputs @ torch.randn(4, 3, generator=generator, dtype=torch.float64)).argmax(1)
    torch.manual_seed(0)
    data = Examples(inputs, targets)
    return fit_classifier(nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double(), data, 400), data


def loss_warnings(diagnostics: dict) -> list[str]:
    return [w for w in diagnostics["warnings"] if "learned" in w]


def test_the_default_edit_gives_back_little_and_does_not_warn(trained) -> None:
    model, data = trained
    remove = torch.arange(10)
    result = edit_parameters(model, data, remove, loss="cross_entropy", edit=EditOptions())
    diagnostics = result.diagnostics
    kept = torch.ones(len(data), dtype=torch.bool)
    kept[remove] = False
    assert diagnostics["remaining_loss_constant"] == pytest.approx(
        constant_prediction_loss(data.targets[kept], None, "cross_entropy"), abs=1e-12
    )
    before, after = diagnostics["remaining_loss_before"], diagnostics["remaining_loss_after"]
    expected = (after - before) / (diagnostics["remaining_loss_constant"] - before)
    assert diagnostics["learned_given_back"] == pytest.approx(expected, abs=1e-12)
    assert diagnostics["learned_given_back"] < LEARNED_SHARE_WARNING
    assert loss_warnings(diagnostics) == []


def test_an_edit_that_gives_back_what_the_model_learned_warns(trained) -> None:
    model, data = trained
    # the first-order step with the scoring damping: far too long on a neural network (docs/editing.md)
    result = edit_parameters(
        model,
        data,
        torch.arange(10),
        loss="cross_entropy",
        options=InfluenceOptions(strategy="ekfac"),
        edit=EditOptions(estimator="first_order"),
    )
    diagnostics = result.diagnostics
    assert diagnostics["learned_given_back"] > LEARNED_SHARE_WARNING
    assert diagnostics["relative_step_norm"] > 1.0  # and the step leaves the trust radius: a warning of its own
    assert any("outside the region" in w for w in diagnostics["warnings"])
    (warning,) = loss_warnings(diagnostics)
    assert f"{100 * diagnostics['learned_given_back']:.1f}%" in warning and "class frequencies" in warning


def test_a_model_no_better_than_the_constant_has_no_share(trained) -> None:
    _, data = trained
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    nn.init.zeros_(model[2].weight)
    nn.init.zeros_(model[2].bias)  # uniform predictions: log 3 ≥ the label entropy
    result = edit_parameters(model, data, torch.arange(10), loss="cross_entropy", edit=EditOptions(proximity=1.0))
    assert result.diagnostics["learned_given_back"] is None
    assert result.diagnostics["remaining_loss_before"] >= result.diagnostics["remaining_loss_constant"]
