"""DataInf against a direct implementation of DataInf's formula (docs/methods.md) on explicit per-example gradients.

Tolerance: 2e-7 relative to the largest |score| (results are float32).
"""

from __future__ import annotations

import torch

from tests.engine.helpers import SequenceNet, explicit_gradients, make_data, make_mlp
from worker.attribution import DataInfOptions, attribute
from worker.attribution.hooks import resolve_layers
from worker.attribution.methods.datainf import datainf_dampings
from worker.attribution.progress import StageCounter
from worker.attribution.types import no_progress


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


def test_kept_sequence_layers_hold_each_examples_gradient_matrix() -> None:
    """The first pass keeps a layer that runs on more positions than min(d_in, d_out) as its per-example gradient
    matrices sum_t g_t a_t^T (formed once, not again at every later use), counted in the cache budget; a layer
    with one position per example keeps its rows."""
    model = SequenceNet(d=4, hidden=5).double()
    train = make_data(6, (7, 4), 3, 4)  # 7 positions > min(d_in = 5 with the bias column, d_out = 5)
    layers = resolve_layers(model, None)

    def first_pass(cache_bytes: int):
        counter = StageCounter(no_progress, "fit", len(train))
        return datainf_dampings(model, layers, train, "cross_entropy", 4, torch.device("cpu"), counter, cache_bytes)

    dampings, kept = first_pass(10**6)
    assert kept is not None and not kept.spilled and [start for start, _ in kept.batches()] == [0, 4]
    expected = explicit_gradients(model, train, "cross_entropy")  # (6, 25 + 18): token layer, then head
    token = torch.cat([activities["token"].example_gradients for _, activities in kept.batches()])
    assert torch.allclose(token.flatten(1), expected[:, :25], rtol=1e-12, atol=1e-12)
    head = [activities["head"] for _, activities in kept.batches()]
    assert all(a.example_gradients is None and a.rank_one for a in head)
    lam = 0.1 * float(expected[:, :25].pow(2).sum(1).mean()) / 25
    assert abs(dampings["token"] - lam) <= 1e-12 * lam
    size = 6 * (25 + 6 + 3) * 8  # float64: the token layer's matrices, the head's input and output-gradient rows
    assert first_pass(size)[1] is not None
    assert first_pass(size - 1)[1] is None
