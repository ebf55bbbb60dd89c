"""End-to-end scores against the dense formula score = G_query P G_train^T (float64 models).

Tolerance: 2e-7 relative to the largest |score| (results are float32) unless stated. Top-k is compared with a full sort of the
dense matrix (random data, no ties).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tests.engine.helpers import SequenceNet, SmallConvNet, dense_operator, dense_scores, make_data, make_mlp
from worker.attribution import (
    AttributionScores,
    Cancelled,
    DataInfOptions,
    Examples,
    GradientSimilarityOptions,
    InfluenceOptions,
    attribute,
    fit_curvature,
    scoring,
)
from worker.attribution.curvature.exact import exact_preconditioner
from worker.attribution.hooks import resolve_layers

REL = 2e-7  # scores are returned in float32


def full_matrix(result: AttributionScores, n: int) -> torch.Tensor:
    """Rebuilds the (Q, N) score matrix from a pairwise result with top_k >= N."""
    topk = result.topk
    assert topk is not None and topk.positive_indices.shape[1] == n
    matrix = torch.full((topk.positive_indices.shape[0], n), float("nan"), dtype=torch.float64)
    matrix.scatter_(1, topk.positive_indices, topk.positive_scores.double())
    return matrix


def assert_close(got: torch.Tensor, expected: torch.Tensor, rel: float = REL) -> None:
    scale = float(expected.abs().max())
    assert float((got.double() - expected).abs().max()) <= rel * scale, (got, expected)


def preconditioner_matrix(model, train, strategy: str, fit=None) -> torch.Tensor:
    tracked = resolve_layers(model, None)
    if strategy in ("exact",):
        p = exact_preconditioner(
            model, tracked, train, "cross_entropy", "exact", "gauss_newton", None, 100, 1e-6, 64, torch.device("cpu")
        )
    else:
        p = fit.preconditioner(None, dtype=torch.float64)
    return dense_operator(p, tracked)


@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac", "ekfac", "exact"])
@pytest.mark.parametrize("measurement", ["loss", "margin"])
def test_pairwise_topk_equals_sorted_dense_scores(strategy: str, measurement: str) -> None:
    model, train, queries = make_mlp(), make_data(30, (5,), 3, 0), make_data(4, (5,), 3, 1)
    options = InfluenceOptions(strategy=strategy, batch_size=8)
    fit = None
    if strategy != "exact":
        fit = fit_curvature(model, train, "cross_entropy", options.fit_options())
    result = attribute(
        [model],
        train,
        queries,
        loss="cross_entropy",
        method="influence",
        mode="pairwise",
        measurement=measurement,
        top_k=5,
        options=options,
        fits=None if fit is None else [fit],
    )
    expected = dense_scores(
        model, train, queries, "cross_entropy", preconditioner_matrix(model, train, strategy, fit), measurement
    )
    values, indices = expected.sort(dim=1, descending=True)
    assert torch.equal(result.topk.positive_indices, indices[:, :5])
    assert_close(result.topk.positive_scores, values[:, :5])
    low_values, low_indices = expected.sort(dim=1)
    assert torch.equal(result.topk.negative_indices, low_indices[:, :5])
    assert_close(result.topk.negative_scores, low_values[:, :5])
    assert result.topk.positive_scores.dtype == torch.float32
    assert result.diagnostics["num_layers"] == 2


def test_fitting_inside_attribute_equals_precomputed_fit() -> None:
    model, train, queries = make_mlp(), make_data(30, (5,), 3, 0), make_data(4, (5,), 3, 1)
    options = InfluenceOptions(strategy="ekfac", fisher_samples=2, seed=3, batch_size=8)
    fit = fit_curvature(model, train, "cross_entropy", options.fit_options())
    inside = attribute(
        [model], train, queries, loss="cross_entropy", method="influence", mode="aggregate", options=options
    )
    given = attribute(
        [model], train, queries, loss="cross_entropy", method="influence", mode="aggregate", options=options, fits=[fit]
    )
    assert torch.equal(inside.scores, given.scores)


@pytest.mark.parametrize(
    "model,shape",
    [
        (make_mlp(bias=False), (5,)),
        (SmallConvNet().double(), (2, 5, 5)),
        (SequenceNet().double(), (6, 4)),
    ],
    ids=["no_bias", "conv2d", "sequence"],
)
def test_ekfac_scores_on_other_architectures(model: nn.Module, shape: tuple[int, ...]) -> None:
    train, queries = make_data(20, shape, 3, 2), make_data(3, shape, 3, 3)
    options = InfluenceOptions(strategy="ekfac", fisher="empirical", batch_size=6)
    fit = fit_curvature(model, train, "cross_entropy", options.fit_options())
    result = attribute(
        [model],
        train,
        queries,
        loss="cross_entropy",
        method="influence",
        mode="pairwise",
        top_k=20,
        options=options,
        fits=[fit],
    )
    expected = dense_scores(model, train, queries, "cross_entropy", preconditioner_matrix(model, train, "ekfac", fit))
    assert_close(full_matrix(result, 20), expected)
    self_result = attribute(
        [model], train, None, loss="cross_entropy", method="influence", mode="self", options=options, fits=[fit]
    )
    on_train = attribute(
        [model],
        train,
        train,
        loss="cross_entropy",
        method="influence",
        mode="pairwise",
        top_k=20,
        options=options,
        fits=[fit],
    )
    assert_close(self_result.scores, torch.diagonal(full_matrix(on_train, 20)), rel=1e-6)


def test_scores_do_not_depend_on_batch_size() -> None:
    model, train, queries = make_mlp(), make_data(30, (5,), 3, 4), make_data(5, (5,), 3, 5)
    results = []
    for batch_size in (4, 7, 64):
        options = InfluenceOptions(strategy="ekfac", fisher="empirical", batch_size=batch_size)
        results.append(
            attribute(
                [model],
                train,
                queries,
                loss="cross_entropy",
                method="influence",
                mode="pairwise",
                top_k=30,
                options=options,
            )
        )
    for other in results[1:]:
        assert_close(full_matrix(other, 30), full_matrix(results[0], 30), rel=1e-6)


@pytest.mark.parametrize(
    "method,options",
    [
        ("influence", InfluenceOptions(strategy="identity", batch_size=8)),
        ("influence", InfluenceOptions(strategy="diagonal", batch_size=8)),
        ("influence", InfluenceOptions(strategy="kfac", batch_size=8)),
        ("influence", InfluenceOptions(strategy="ekfac", batch_size=8)),
        ("influence", InfluenceOptions(strategy="exact", batch_size=8)),
        ("influence", InfluenceOptions(strategy="cg", damping=0.05, tol=1e-10, batch_size=30)),
        ("datainf", DataInfOptions(batch_size=8)),
    ],
    ids=["identity", "diagonal", "kfac", "ekfac", "exact", "cg", "datainf"],
)
def test_self_equals_diagonal_and_aggregate_equals_sum(method, options) -> None:
    model, train, queries = make_mlp(), make_data(16, (5,), 3, 6), make_data(5, (5,), 3, 7)
    common = dict(loss="cross_entropy", method=method, options=options)
    self_scores = attribute([model], train, None, mode="self", **common).scores
    on_train = full_matrix(attribute([model], train, train, mode="pairwise", top_k=16, **common), 16)
    assert self_scores.shape == (16,) and self_scores.dtype == torch.float32
    assert_close(self_scores, torch.diagonal(on_train), rel=1e-6)
    aggregate_result = attribute([model], train, queries, mode="aggregate", **common)
    json.dumps(aggregate_result.diagnostics)  # diagnostics are JSON-serialisable
    aggregate = aggregate_result.scores
    pairwise = full_matrix(attribute([model], train, queries, mode="pairwise", top_k=16, **common), 16)
    assert_close(aggregate, pairwise.sum(0), rel=1e-6)


def test_query_chunks_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    model, train, queries = make_mlp(), make_data(25, (5,), 3, 8), make_data(7, (5,), 3, 9)
    options = InfluenceOptions(strategy="ekfac", batch_size=10)
    whole = attribute(
        [model], train, queries, loss="cross_entropy", method="influence", mode="pairwise", top_k=4, options=options
    )
    monkeypatch.setattr(scoring, "DEFAULT_MEMORY_BUDGET_BYTES", 3 * 8 * 71)  # about 3 queries per chunk
    chunked = attribute(
        [model], train, queries, loss="cross_entropy", method="influence", mode="pairwise", top_k=4, options=options
    )
    assert chunked.diagnostics["query_chunks"] > 1 and whole.diagnostics["query_chunks"] == 1
    assert torch.equal(chunked.topk.positive_indices, whole.topk.positive_indices)
    assert_close(chunked.topk.negative_scores, whole.topk.negative_scores.double())


def test_ensemble_averages_scores() -> None:
    models = [make_mlp(seed=0), make_mlp(seed=1)]
    train, queries = make_data(20, (5,), 3, 10), make_data(3, (5,), 3, 11)
    options = InfluenceOptions(strategy="ekfac", fisher="empirical", batch_size=8)
    fits = [fit_curvature(m, train, "cross_entropy", options.fit_options()) for m in models]
    result = attribute(
        models,
        train,
        queries,
        loss="cross_entropy",
        method="influence",
        mode="pairwise",
        top_k=20,
        options=options,
        fits=fits,
    )
    expected = (
        sum(
            dense_scores(m, train, queries, "cross_entropy", preconditioner_matrix(m, train, "ekfac", f))
            for m, f in zip(models, fits, strict=True)
        )
        / 2
    )
    assert_close(full_matrix(result, 20), expected)
    assert result.diagnostics["num_models"] == 2


def test_gradient_similarity_is_the_gradient_dot_product_or_cosine() -> None:
    from tests.engine.helpers import explicit_gradients

    model, train, queries = make_mlp(), make_data(12, (5,), 3, 12), make_data(3, (5,), 3, 13)
    g_train = explicit_gradients(model, train, "cross_entropy")
    g_query = explicit_gradients(model, queries, "cross_entropy")
    dot = attribute(
        [model],
        train,
        queries,
        loss="cross_entropy",
        method="gradient_similarity",
        mode="pairwise",
        top_k=12,
        options=GradientSimilarityOptions(batch_size=5),
    )
    assert_close(full_matrix(dot, 12), g_query @ g_train.T)
    self_scores = attribute(
        [model],
        train,
        None,
        loss="cross_entropy",
        method="gradient_similarity",
        mode="self",
        options=GradientSimilarityOptions(batch_size=5),
    ).scores
    assert_close(self_scores, g_train.pow(2).sum(1))
    cosine = attribute(
        [model],
        train,
        queries,
        loss="cross_entropy",
        method="gradient_similarity",
        mode="pairwise",
        top_k=12,
        options=GradientSimilarityOptions(batch_size=5, normalize=True),
    )
    expected = (g_query / g_query.norm(dim=1, keepdim=True)) @ (g_train / g_train.norm(dim=1, keepdim=True)).T
    assert_close(full_matrix(cosine, 12), expected)


def test_mse_float32_model_and_progress_stages() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    train = Examples(torch.randn(30, 4), torch.randn(30, 2))
    queries = Examples(torch.randn(4, 4), torch.randn(4, 2))
    seen: list[tuple[str, int, int]] = []
    result = attribute(
        [model],
        train,
        queries,
        loss="mse",
        method="influence",
        mode="pairwise",
        top_k=3,
        options=InfluenceOptions(batch_size=8),
        progress=lambda *a: seen.append(a),
    )
    assert result.topk.positive_scores.shape == (4, 3)
    stages = {s for s, _, _ in seen}
    assert {"fit", "queries", "score"} <= stages
    assert ("score", 30, 30) in seen and ("fit", 60, 60) in seen

    def cancel(stage: str, completed: int, total: int) -> None:
        if stage == "score" and completed > 0:
            raise Cancelled()

    with pytest.raises(Cancelled):
        attribute(
            [model],
            train,
            queries,
            loss="mse",
            method="influence",
            mode="aggregate",
            options=InfluenceOptions(batch_size=8),
            progress=cancel,
        )


def test_frozen_parameters_and_outer_no_grad() -> None:
    """The engine works for a model with requires_grad=False parameters called inside torch.no_grad(),
    and leaves the flags as they were."""
    model, train = make_mlp(), make_data(12, (5,), 3, 14)
    options = InfluenceOptions(strategy="ekfac", fisher="empirical")
    expected = attribute(
        [model], train, None, loss="cross_entropy", method="influence", mode="self", options=options
    ).scores
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        got = attribute(
            [model], train, None, loss="cross_entropy", method="influence", mode="self", options=options
        ).scores
    assert torch.equal(got, expected)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.training  # modes restored
