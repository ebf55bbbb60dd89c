"""fit -> to_tensors -> safetensors file -> load_curvature gives identical scores (exact equality)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.engine.helpers import make_data, make_mlp
from worker.attribution import FitOptions, InfluenceOptions, attribute, fit_curvature, load_curvature


@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac", "ekfac"])
def test_round_trip_gives_identical_scores(strategy: str, tmp_path) -> None:
    model = make_mlp().float()
    train, queries = make_data(20, (5,), 3, 0, dtype=torch.float32), make_data(3, (5,), 3, 1, dtype=torch.float32)
    fit = fit_curvature(
        model, train, "cross_entropy", FitOptions(strategy=strategy, fisher_samples=2, seed=5, layers=["2"])
    )
    path = tmp_path / "fit.safetensors"
    save_file(fit.to_tensors(), str(path), metadata=fit.metadata())
    with safe_open(str(path), "pt") as stored:
        metadata = stored.metadata()
    loaded = load_curvature(load_file(str(path)), metadata)
    assert loaded.strategy == strategy and loaded.layer_names == ["2"] and loaded.options == fit.options
    options = InfluenceOptions(strategy=strategy, layers=["2"])
    first = attribute(
        [model],
        train,
        queries,
        loss="cross_entropy",
        method="influence",
        mode="pairwise",
        top_k=5,
        options=options,
        fits=[fit],
    )
    second = attribute(
        [model],
        train,
        queries,
        loss="cross_entropy",
        method="influence",
        mode="pairwise",
        top_k=5,
        options=options,
        fits=[loaded],
    )
    assert torch.equal(first.topk.positive_scores, second.topk.positive_scores)
    assert torch.equal(first.topk.positive_indices, second.topk.positive_indices)
    assert first.diagnostics["layers"] == ["2"]
