"""attribute_meta / edit_meta end to end on tiny problems, and the AttributionErrors of bad inputs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from meta_toys import classification_tasks, implicit_options, mlp, regression_tasks, unrolled_options

from worker.attribution.meta import InnerOptions, MetaOptions, attribute_meta, edit_meta
from worker.attribution.meta.influence import HessianInverse, build_problem, instance_scores
from worker.attribution.types import AttributionError, Cancelled, Examples


@pytest.fixture(scope="module")
def classification():
    model = mlp((2, 3, 3), seed=1)
    return model, classification_tasks(3, seed=0), classification_tasks(2, seed=5)


@pytest.mark.parametrize("mode", ["implicit_proximal", "unrolled"])
def test_attribute_meta_task_and_instance_units(mode, classification):
    model, train, queries = classification
    options = implicit_options() if mode == "implicit_proximal" else unrolled_options()
    options.damping = 20.0  # λ is untrained, H indefinite
    problem = build_problem(model, train, queries, "cross_entropy", options)
    inverse = HessianInverse(problem)
    q_grads = torch.stack([t.total_grad() for t in problem.query_terms])
    g = torch.stack([t.total_grad() for t in problem.terms])
    kw = dict(loss="cross_entropy", options=options)

    agg = attribute_meta(model, train, queries, unit="task", mode="aggregate", top_k=2, **kw)
    s_q = inverse.solve(q_grads.sum(0))
    assert torch.allclose(agg.scores.double(), g @ s_q, rtol=1e-5, atol=1e-8)
    assert agg.unit_task.tolist() == [10, 11, 12]
    assert agg.diagnostics["damping"] == 20.0 and isinstance(agg.diagnostics["warnings"], list)
    json.dumps(agg.diagnostics, allow_nan=False)  # JSON-serialisable

    pair = attribute_meta(model, train, queries, unit="task", mode="pairwise", top_k=2, **kw)
    full = (g @ inverse.solve(q_grads.T)).T  # (Q, K)
    assert pair.query_task.tolist() == [10, 11] and pair.topk.positive_indices.shape == (2, 2)
    for q in range(2):
        assert pair.topk.positive_indices[q].tolist() == torch.argsort(full[q], descending=True)[:2].tolist()
        assert pair.topk.negative_indices[q].tolist() == torch.argsort(full[q])[:2].tolist()
        assert torch.allclose(
            pair.topk.positive_scores[q].double(), full[q].sort(descending=True).values[:2], rtol=1e-5
        )

    inst = attribute_meta(model, train, queries, unit="instance", mode="aggregate", top_k=3, **kw)
    assert inst.scores.shape == (len(train),)
    assert torch.equal(inst.unit_task, train.task) and torch.equal(inst.unit_split, train.split)
    expected = instance_scores(problem, s_q)
    assert torch.allclose(inst.scores.double(), expected, rtol=1e-5, atol=1e-8)
    val_sum = torch.stack([inst.scores[(train.task == t) & (train.split == 1)].sum() for t in (10, 11, 12)])
    assert torch.allclose(val_sum.double(), g @ s_q, rtol=1e-4, atol=1e-7)  # Σ val-instance = task score

    inst_pair = attribute_meta(model, train, queries, unit="instance", mode="pairwise", top_k=4, **kw)
    row0 = instance_scores(problem, inverse.solve(q_grads[0]))
    assert inst_pair.topk.positive_indices[0].tolist() == torch.argsort(row0, descending=True)[:4].tolist()


def test_matrix_free_solver_and_auto_damping_agree_with_exact():
    model, train, queries = mlp(), regression_tasks(3), regression_tasks(1, seed=1)
    base = implicit_options("cg")
    scores = {}
    for solver in ("exact", "cg"):
        options = dataclasses.replace(base, solver=solver, damping=6.0, tol=1e-10)
        scores[solver] = attribute_meta(
            model, train, queries, loss="mse", unit="task", mode="aggregate", top_k=1, options=options
        ).scores
    assert torch.allclose(scores["cg"], scores["exact"], rtol=1e-4, atol=1e-7)
    auto = attribute_meta(
        model,
        train,
        queries,
        loss="mse",
        unit="task",
        mode="aggregate",
        top_k=1,
        options=dataclasses.replace(base, damping=None),
    )
    d = auto.diagnostics
    assert d["damping"] >= 1e-3 * abs(d["lambda_max"]) and d["damping"] + d["lambda_min"] > 0
    assert d["stationarity_ratio"] > 0.1 and any("stationary" in w for w in d["warnings"])  # untrained λ
    for order in ("gamma", "drop"):
        out = attribute_meta(
            model,
            train,
            queries,
            loss="mse",
            unit="task",
            mode="aggregate",
            top_k=1,
            options=dataclasses.replace(base, solver="exact", third_order=order),
        )
        assert torch.isfinite(out.scores).all()
    direct = attribute_meta(
        model,
        train,
        queries,
        loss="mse",
        unit="task",
        mode="aggregate",
        top_k=1,
        options=dataclasses.replace(base, solver="exact", direct=True),
    )
    assert torch.isfinite(direct.scores).all()


def test_progress_reports_and_cancellation():
    model, train, queries = mlp(), regression_tasks(2), regression_tasks(1, seed=1)
    seen = []
    attribute_meta(
        model,
        train,
        queries,
        loss="mse",
        unit="task",
        mode="aggregate",
        top_k=1,
        options=unrolled_options(damping=10.0),
        progress=lambda s, c, t: seen.append((s, c, t)),
    )
    assert ("inner_train_tasks", 2, 2) in seen

    def cancel(stage, completed, total):
        raise Cancelled()

    with pytest.raises(Cancelled):
        attribute_meta(
            model,
            train,
            queries,
            loss="mse",
            unit="task",
            mode="aggregate",
            top_k=1,
            options=unrolled_options(),
            progress=cancel,
        )


def _run(train=None, queries=None, options=None, model=None, unit="task", loss="mse"):
    return attribute_meta(
        model or mlp(),
        train or regression_tasks(2),
        queries or regression_tasks(1, seed=1),
        loss=loss,
        unit=unit,
        mode="aggregate",
        top_k=1,
        options=options or implicit_options(),
    )


def test_bad_inputs_raise_attribution_error():
    train = regression_tasks(2)
    with pytest.raises(AttributionError, match="'task' and 'split'"):
        _run(train=Examples(train.inputs, train.targets))
    only_train = train.subset(torch.nonzero(~((train.task == 1) & (train.split == 1))).reshape(-1))
    with pytest.raises(AttributionError, match=r"task 1 .*empty validation"):
        _run(train=only_train)
    with pytest.raises(AttributionError, match="unknown parameters"):
        _run(options=implicit_options(adapted_params=["5.weight"]))
    with pytest.raises(AttributionError, match="not at stationarity"):
        _run(options=MetaOptions(inner=InnerOptions(ihvp="dense", tol=1e-14, max_iter=1)))
    with pytest.raises(AttributionError, match="did not converge"):
        _run(options=dataclasses.replace(implicit_options("cg"), solver="cg", max_iter=1, damping=50.0, tol=1e-12))
    with pytest.raises(AttributionError, match="not positive definite"):
        _run(options=implicit_options(damping=0.0))  # untrained λ: H is indefinite
    nan_model = mlp()
    with torch.no_grad():
        nan_model[0].weight[0, 0] = float("nan")
    with pytest.raises(AttributionError, match="NaN"):
        _run(model=nan_model)
    with pytest.raises(AttributionError, match="direct-IF"):
        _run(options=implicit_options(direct=True, damping=10.0), unit="instance")
    with pytest.raises(AttributionError, match="split values"):
        _run(train=dataclasses.replace(train, split=train.split + 1))
    with pytest.raises(AttributionError, match="not in the training dataset"):
        edit_meta(mlp(), train, torch.tensor([7]), loss="mse", unit="task", options=implicit_options(damping=10.0))


@pytest.mark.parametrize("ihvp", ["dense", "cg"])
def test_inner_hessian_not_positive_definite_is_rejected(ihvp):
    """y = w2·tanh(w1·x) at w1 = w2 = 0 is a saddle of the inner loss with ∂_θL = 0 and A indefinite."""
    model = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.Tanh(), torch.nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    x = torch.linspace(1, 2, 8).reshape(-1, 1)
    data = Examples(x, 3 * x, task=torch.zeros(8, dtype=torch.long), split=(torch.arange(8) % 2))
    options = MetaOptions(inner=InnerOptions(reg=0.1, ihvp=ihvp), solver="exact", damping=1.0)
    with pytest.raises(AttributionError, match="not positive definite"):
        attribute_meta(model, data, data, loss="mse", unit="task", mode="aggregate", top_k=1, options=options)
