"""DataInf against a direct implementation of DataInf's formula (docs/methods.md) on explicit per-example gradients.

Tolerance: 2e-7 relative to the largest |score| (results are float32).
"""

from __future__ import annotations

import torch

from tests.engine.helpers import explicit_gradients, make_data, make_mlp
from worker.attribution import DataInfOptions, attribute
from worker.attribution.hooks import resolve_layers


def direct_datainf(model, train, queries, damping=None) -> tuple[torch.Tensor, list[float]]:
    g_train = explicit_gradients(model, train, "cross_entropy")
    g_query = explicit_gradients(model, queries, "cross_entropy")
    n = g_train.shape[0]
    scores = torch.zeros(g_query.shape[0], n, dtype=torch.float64)
    lambdas, offset = [], 0
    for layer in resolve_layers(model, None):
        d = layer.num_parameters
        g = g_train[:, offset : offset + d]
        v = g_query[:, offset : offset + d]
        offset += d
        lam = 0.1 * float(g.pow(2).sum(1).mean()) / d if damping is None else damping
        lambdas.append(lam)
        norms = g.pow(2).sum(1)
        for q in range(v.shape[0]):
            for i in range(n):
                correction = (
                    sum(float(g[j] @ v[q]) * float(g[j] @ g[i]) / (lam + float(norms[j])) for j in range(n)) / n
                )
                scores[q, i] += (float(v[q] @ g[i]) - correction) / lam
    return scores, lambdas


def test_datainf_matches_direct_formula() -> None:
    model, train, queries = make_mlp(d_in=4, hidden=3), make_data(12, (4,), 3, 0), make_data(3, (4,), 3, 1)
    expected, lambdas = direct_datainf(model, train, queries)
    result = attribute(
        [model],
        train,
        queries,
        loss="cross_entropy",
        method="datainf",
        mode="pairwise",
        top_k=12,
        options=DataInfOptions(batch_size=5),
    )
    got = torch.zeros(3, 12, dtype=torch.float64).scatter_(
        1, result.topk.positive_indices, result.topk.positive_scores.double()
    )
    assert float((got - expected).abs().max()) <= 2e-7 * float(expected.abs().max())
    used = result.diagnostics["models"][0]["damping"]
    assert all(abs(used[name] - lam) <= 1e-9 * lam for name, lam in zip(used, lambdas, strict=True))


def test_datainf_user_damping() -> None:
    model, train, queries = make_mlp(d_in=4, hidden=3), make_data(10, (4,), 3, 2), make_data(2, (4,), 3, 3)
    expected, _ = direct_datainf(model, train, queries, damping=0.3)
    result = attribute(
        [model],
        train,
        queries,
        loss="cross_entropy",
        method="datainf",
        mode="aggregate",
        options=DataInfOptions(damping=0.3, batch_size=4),
    )
    assert float((result.scores.double() - expected.sum(0)).abs().max()) <= 2e-7 * float(expected.sum(0).abs().max())
