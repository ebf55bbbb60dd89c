"""SOURCE: matrix functions, segments, exactness against unrolled differentiation, the one-segment limit
(EK-FAC influence with damping 1/(eta T)), the dense formula, modes and editing.

Tolerances (stated): linear regression by full-batch GD with eta * lambda_max = 0.05 and 40 checkpoints, the
relative error ||dtheta_SOURCE - dtheta_unrolled|| / ||dtheta_unrolled|| is < 0.45 with 1 segment, < 0.10 with
2, < 0.05 with 4 and decreases as segments are added (the floor, ~2%, is the noise of the sampled Fisher with
64 draws). One segment with eta T Lambda >> 1: Spearman >= 0.95 with EK-FAC influence at damping 1/(eta T),
and scores within 1.3x. The dense formula: 2e-7 relative (float32 scores).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from tests.engine.helpers import explicit_gradients, make_data, make_mlp
from worker.attribution import AttributionError, Examples, InfluenceOptions, attribute
from worker.attribution.curvature.exact import flatten_vectors, unflatten_vectors
from worker.attribution.hooks import resolve_layers
from worker.attribution.matrix_functions import forgetting, phi1, unrolled
from worker.attribution.methods.source import (
    SourceOptions,
    attribute_source,
    edit_source,
    fit_source,
    predicted_parameter_change,
)
from worker.attribution.segment_curvature import SegmentFit
from worker.attribution.trajectory import TrajectoryCheckpoint, build_segments

# ---------------------------------------------------------------- matrix functions


def test_matrix_functions_near_zero_and_for_large_arguments() -> None:
    x = torch.tensor([0.0, 1e-300, 1e-12, 1e-6, 9.9e-5, 1.01e-4, 1e-3, 0.5, 2.0, 30.0, 1e4, 1e300], dtype=torch.float64)
    expected = torch.tensor([1.0] + [-math.expm1(-v) / v for v in x.tolist()[1:]], dtype=torch.float64)
    assert torch.allclose(phi1(x), expected, rtol=1e-14, atol=0)
    horizon = 250.0
    lam = x / horizon
    assert torch.allclose(unrolled(lam, horizon), horizon * expected, rtol=1e-14, atol=0)
    assert float(unrolled(torch.zeros(1, dtype=torch.float64), horizon)) == horizon  # U -> eta T as Lambda -> 0
    assert torch.allclose(
        unrolled(torch.tensor([1e6], dtype=torch.float64), horizon),
        torch.tensor([1e-6], dtype=torch.float64),
        rtol=1e-15,
    )
    e = forgetting(torch.tensor([0.0, 1e-3, 1e6], dtype=torch.float64), horizon)
    assert e.tolist() == [1.0, math.exp(-0.25), 0.0]
    # Lambda U = 1 - E, computed without cancellation for small Lambda
    lam = torch.logspace(-12, 3, 200, dtype=torch.float64)
    assert torch.allclose(lam * unrolled(lam, horizon), -torch.expm1(-horizon * lam), rtol=1e-13, atol=0)
    assert torch.isfinite(phi1(torch.tensor([-1e-5, -1.0], dtype=torch.float64))).all()


def test_one_segment_limit_matches_damped_inverse_within_1_3x() -> None:
    lam = torch.logspace(-6, 3, 400, dtype=torch.float64)
    horizon = 50.0
    ratio = unrolled(lam, horizon) * (lam + 1.0 / horizon)
    assert float(ratio.min()) >= 1.0 - 1e-12 and float(ratio.max()) <= 1.3


# ---------------------------------------------------------------- segments


def _checkpoints(steps, stage=0, lr=0.1, momentum=0.0):
    model = nn.Linear(2, 1)
    return [TrajectoryCheckpoint(model, s, lr, momentum, stage) for s in steps]


def test_equal_segments_by_step_boundary_goes_to_the_earlier_segment() -> None:
    segments = build_segments(_checkpoints([10, 20, 30, 40, 50, 60]), None)
    assert [[c.step for c in s.checkpoints] for s in segments] == [[10, 20], [30, 40], [50, 60]]
    assert [(s.start_step, s.end_step, s.steps) for s in segments] == [(0, 20, 20), (20, 40, 20), (40, 60, 20)]
    segments = build_segments(_checkpoints([5, 10, 100]), 2)
    assert [[c.step for c in s.checkpoints] for s in segments] == [[5, 10], [100]]
    # an equal part with no checkpoint: split by count instead
    segments = build_segments(_checkpoints([1, 2, 3, 100]), 3)
    assert [len(s.checkpoints) for s in segments] == [1, 2, 1]
    assert len(build_segments(_checkpoints([1, 2]), None)) == 2  # 3 capped at the number of checkpoints


def test_stage_segments_momentum_and_restarting_steps() -> None:
    chain = _checkpoints([10, 20], stage=0, lr=0.1, momentum=0.9) + _checkpoints([5, 15], stage=1, lr=0.2)
    segments = build_segments(chain, None)
    assert [s.stage for s in segments] == [0, 1]
    assert [(s.start_step, s.end_step) for s in segments] == [(0, 20), (20, 35)]  # stage 1 counts from its start
    assert segments[0].mean_learning_rate == pytest.approx(1.0)  # eta / (1 - beta)
    assert segments[1].mean_learning_rate == pytest.approx(0.2)
    global_steps = _checkpoints([10, 20], stage=0) + _checkpoints([30, 40], stage=1)
    assert [(s.start_step, s.end_step) for s in build_segments(global_steps, "stages")] == [(0, 20), (20, 40)]
    # an int never mixes stages in one segment
    assert [s.stage for s in build_segments(global_steps, 1)] == [0, 1]


def test_bad_trajectories_are_attribution_errors() -> None:
    with pytest.raises(AttributionError, match="no checkpoint"):
        build_segments([], None)
    with pytest.raises(AttributionError, match="segment would have none"):
        build_segments(_checkpoints([1, 2]), 3)
    with pytest.raises(AttributionError, match="learning rate"):
        build_segments(_checkpoints([1], lr=0.0), None)
    adam = [TrajectoryCheckpoint(nn.Linear(2, 1), 1, 0.1, optimizer="adam")]
    with pytest.raises(AttributionError, match="appendix C"):
        build_segments(adam, None)
    model = make_mlp()
    other = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    data = make_data(10, (5,), 3, 0)
    with pytest.raises(AttributionError, match="parameter shapes"):
        fit_source(
            model, [TrajectoryCheckpoint(other, 1, 0.1)], {0: data}, loss="cross_entropy", options=SourceOptions()
        )
    with pytest.raises(AttributionError, match="no training dataset for stage"):
        fit_source(
            model,
            [TrajectoryCheckpoint(model, 1, 0.1, stage=1)],
            {0: data},
            loss="cross_entropy",
            options=SourceOptions(),
        )


# ---------------------------------------------------------------- linear regression: unrolled differentiation


def _linear_regression_run(steps: int = 2000, every: int = 50):
    torch.manual_seed(0)
    n, d = 40, 4
    x = torch.randn(n, d, dtype=torch.float64) * torch.tensor([2.0, 1.0, 0.5, 0.3], dtype=torch.float64)
    y = x @ torch.randn(d, 1, dtype=torch.float64) + 0.3 * torch.randn(n, 1, dtype=torch.float64)
    a = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    hessian = a.T @ a / n  # of L = (1/N) sum 1/2 (theta^T a - y)^2
    eta = 0.05 / float(torch.linalg.eigvalsh(hessian).max())
    theta = torch.cat([torch.full((d,), 3.0), torch.tensor([-2.0])]).double()
    thetas, checkpoints = [theta], []
    for t in range(1, steps + 1):
        theta = theta - eta * a.T @ (a @ theta - y[:, 0]) / n
        thetas.append(theta)
        if t % every == 0:
            model = nn.Linear(d, 1).double()
            with torch.no_grad():
                model.weight.copy_(theta[:d][None])
                model.bias.copy_(theta[d:])
            checkpoints.append(TrajectoryCheckpoint(model, t, eta))
    return Examples(inputs=x, targets=y), a, y, hessian, eta, thetas, checkpoints


def _unrolled_removal(a, y, hessian, eta, thetas, z: int) -> torch.Tensor:
    """d theta_T from removing z, to first order through the actual GD steps:
    delta_{t+1} = (I - eta H) delta_t + (eta / N) grad l_z(theta_t)."""
    n = a.shape[0]
    delta = torch.zeros(a.shape[1], dtype=torch.float64)
    for theta in thetas[:-1]:
        delta = delta - eta * hessian @ delta + eta / n * a[z] * (a[z] @ theta - y[z, 0])
    return delta


def test_predicted_parameter_change_matches_unrolled_differentiation_and_improves_with_segments() -> None:
    data, a, y, hessian, eta, thetas, checkpoints = _linear_regression_run()
    removed = [0, 1, 2, 3, 4]
    truth = torch.stack([_unrolled_removal(a, y, hessian, eta, thetas, z) for z in removed])
    errors = {}
    for segments in (1, 2, 4):
        trajectory = fit_source(
            checkpoints[-1].model,
            checkpoints,
            {0: data},
            loss="mse",
            options=SourceOptions(segments=segments, fisher_samples=64),
        )
        predicted = torch.stack(
            [predicted_parameter_change(trajectory, data, torch.tensor([z]), "mse", 256)[""].flatten() for z in removed]
        )
        errors[segments] = float((predicted - truth).norm() / truth.norm())
    assert errors[1] < 0.45 and errors[2] < 0.10 and errors[4] < 0.05, errors
    assert errors[1] > errors[2] > errors[4], errors


# ---------------------------------------------------------------- one segment: EK-FAC influence limit


def _trained_mlp(train: Examples, steps: int = 200, lr: float = 0.5) -> nn.Module:
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(train.inputs), train.targets).backward()
        optimizer.step()
    return model.eval()


def test_one_segment_with_long_horizon_agrees_with_ekfac_influence() -> None:
    train, queries = make_data(60, (5,), 3, 0), make_data(5, (5,), 3, 1)
    model = _trained_mlp(train)
    lr = 0.5
    steps = 4000
    checkpoint = TrajectoryCheckpoint(model, steps, lr)
    source = attribute_source(
        model,
        [checkpoint],
        {0: train},
        train,
        queries,
        loss="cross_entropy",
        mode="aggregate",
        options=SourceOptions(segments=1, fisher_samples=4),
    )
    median = source.diagnostics["segments"][0]["horizon_eigenvalue_median"]
    assert median > 10  # eta T Lambda >> 1 for most directions
    influence = attribute(
        model,
        train,
        queries,
        loss="cross_entropy",
        method="influence",
        mode="aggregate",
        options=InfluenceOptions(damping=1.0 / (lr * steps), fisher_samples=4),
    )
    s, e = source.scores.double(), influence.scores.double()
    assert spearmanr(s.numpy(), e.numpy()).statistic >= 0.95
    big = e.abs() >= e.abs().median()
    ratio = s[big] / e[big]
    assert float(ratio.min()) >= 1 / 1.3 and float(ratio.max()) <= 1.3, ratio


# ---------------------------------------------------------------- the dense formula


def _dense(fit: SegmentFit, tracked, which: str) -> torch.Tensor:
    size = sum(layer.num_parameters for layer in tracked)
    apply = fit.apply_unrolled if which == "U" else fit.apply_forgetting
    return flatten_vectors(apply(unflatten_vectors(torch.eye(size, dtype=torch.float64), tracked)), tracked)


def _two_stage_trajectory():
    stage0, stage1 = make_data(24, (5,), 3, 0), make_data(20, (5,), 3, 2)
    model = make_mlp()
    checkpoints = []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    for stage, data in ((0, stage0), (1, stage1)):
        for step in range(1, 7):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(data.inputs), data.targets).backward()
            optimizer.step()
            if step % 2 == 0:
                checkpoints.append(TrajectoryCheckpoint(copy.deepcopy(model).eval(), step + 6 * stage, 0.3, 0.0, stage))
    return model.eval(), checkpoints, {0: stage0, 1: stage1}


@pytest.mark.parametrize("variant", ["full", "averaged_parameters"])
def test_scores_equal_the_dense_segment_walk(variant: str) -> None:
    final, checkpoints, stage_data = _two_stage_trajectory()
    queries = make_data(3, (5,), 3, 5)
    options = SourceOptions(segments=3, variant=variant, batch_size=7)
    trajectory = fit_source(
        final, checkpoints, stage_data, loss="cross_entropy", options=options, attributed_stages=[0]
    )
    tracked = resolve_layers(final, None)
    fits = trajectory.fits
    assert [f.segment.stage for f in fits] == [0, 0, 1, 1]  # the middle third is cut where the stage changes
    train = stage_data[0]
    expected = torch.zeros(len(queries), len(train), dtype=torch.float64)
    walk = explicit_gradients(final, queries, "cross_entropy", measurement="margin")
    for fit in reversed(fits):
        if fit.segment.stage == 0:
            mean = sum(explicit_gradients(m, train, "cross_entropy") for m in fit.gradient_models) / len(
                fit.gradient_models
            )
            expected += walk @ _dense(fit, tracked, "U") @ mean.T
        walk = walk @ _dense(fit, tracked, "E")
    result = attribute_source(
        final,
        checkpoints,
        stage_data,
        train,
        queries,
        loss="cross_entropy",
        mode="pairwise",
        measurement="margin",
        top_k=len(train),
        options=options,
        attributed_stages=[0],
    )
    got = torch.full_like(expected, float("nan"))
    got.scatter_(1, result.topk.positive_indices, result.topk.positive_scores.double())
    assert float((got - expected).abs().max()) <= 2e-7 * float(expected.abs().max())
    aggregate = attribute_source(
        final,
        checkpoints,
        stage_data,
        train,
        queries,
        loss="cross_entropy",
        mode="aggregate",
        measurement="margin",
        options=options,
        attributed_stages=[0],
    )
    assert torch.allclose(
        aggregate.scores.double(), expected.sum(0), rtol=0, atol=2e-7 * float(expected.abs().max()) * 3
    )
    diagnostics = result.diagnostics
    assert diagnostics["variant"] == variant and diagnostics["attributed_segments"] == [0, 1]
    assert {"steps", "mean_learning_rate", "num_examples", "checkpoints"} <= set(diagnostics["segments"][0])


def test_self_mode_is_the_segment_unrolled_self_influence() -> None:
    final, checkpoints, stage_data = _two_stage_trajectory()
    options = SourceOptions(segments="stages")
    train = stage_data[1]
    result = attribute_source(
        final,
        checkpoints,
        stage_data,
        train,
        None,
        loss="cross_entropy",
        mode="self",
        options=options,
        attributed_stages=[1],
    )
    trajectory = fit_source(
        final, checkpoints, stage_data, loss="cross_entropy", options=options, attributed_stages=[1]
    )
    fit = trajectory.fits[1]
    tracked = resolve_layers(final, None)
    mean = sum(explicit_gradients(m, train, "cross_entropy") for m in fit.gradient_models) / len(fit.gradient_models)
    expected = ((mean @ _dense(fit, tracked, "U")) * mean).sum(1)
    assert torch.allclose(result.scores.double(), expected, rtol=1e-6)
    assert (result.scores > 0).all()


def test_edit_moves_the_final_weights_by_the_predicted_change() -> None:
    final, checkpoints, stage_data = _two_stage_trajectory()
    options = SourceOptions(segments=2)
    remove = torch.tensor([3, 5])
    state = edit_source(
        final,
        checkpoints,
        stage_data,
        stage_data[0],
        remove,
        loss="cross_entropy",
        options=options,
        attributed_stages=[0],
    )
    trajectory = fit_source(
        final, checkpoints, stage_data, loss="cross_entropy", options=options, attributed_stages=[0]
    )
    change = predicted_parameter_change(trajectory, stage_data[0], remove, "cross_entropy", 256)
    assert set(state) == set(final.state_dict())
    assert torch.allclose(state["2.weight"] - final.state_dict()["2.weight"], change["2"][:, :-1], atol=1e-12)
    assert torch.allclose(state["0.bias"] - final.state_dict()["0.bias"], change["0"][:, -1], atol=1e-12)
    assert float(change["0"].abs().max()) > 0


def test_progress_stages_and_cancellation() -> None:
    from worker.attribution import Cancelled

    final, checkpoints, stage_data = _two_stage_trajectory()
    seen: list[tuple[str, int, int]] = []
    attribute_source(
        final,
        checkpoints,
        stage_data,
        stage_data[0],
        make_data(2, (5,), 3, 5),
        loss="cross_entropy",
        mode="aggregate",
        attributed_stages=[0],
        progress=lambda *report: seen.append(report),
    )
    stages = [s for s, _, _ in seen]
    assert stages.index("fit") < stages.index("queries") < stages.index("score")
    assert ("fit", 2 * 3 * 24 + 2 * 3 * 20, 2 * 3 * 24 + 2 * 3 * 20) in seen  # two passes per checkpoint
    assert seen[-1] == ("score", 24, 24)

    def cancel(stage: str, done: int, total: int) -> None:
        if stage == "fit" and done > 0:
            raise Cancelled()

    with pytest.raises(Cancelled):
        attribute_source(
            final, checkpoints, stage_data, stage_data[0], None, loss="cross_entropy", mode="self", progress=cancel
        )
