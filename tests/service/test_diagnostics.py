"""Every method's diagnostics, as the engine reports them, fit the model the method declares (and edits' fit
`EditDiagnostics`): a key the model does not declare would fail the job, so each engine path is checked here."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from service.schemas.diagnostics import (
    InfluenceDiagnostics,
    OtherMethodDiagnostics,
    UndeclaredDiagnostics,
    read_diagnostics,
    stored_attribution_diagnostics,
)
from tests.engine.helpers import make_data, make_mlp
from worker.attribution import attribute
from worker.attribution.editing import edit_parameters
from worker.attribution.options import (
    DataInfOptions,
    EditOptions,
    GradientSimilarityOptions,
    InfluenceOptions,
)
from worker.methods.registry import get_method
from worker.tasks.diagnostics import edit_diagnostics, method_diagnostics


def _data() -> tuple[torch.nn.Module, Any, Any]:
    torch.manual_seed(0)
    return make_mlp(d_in=4, hidden=3), make_data(16, (4,), 3, 0), make_data(3, (4,), 3, 1)


INFLUENCE_CASES = [
    InfluenceOptions(strategy=strategy) for strategy in ("ekfac", "kfac", "diagonal", "identity", "exact")
] + [InfluenceOptions(strategy="cg", max_iter=20, tol=1e-4), InfluenceOptions(strategy="lissa", max_iter=20)]


@pytest.mark.parametrize("options", INFLUENCE_CASES, ids=lambda o: o.strategy)
@pytest.mark.parametrize("mode", ["pairwise", "self"])
def test_influence_diagnostics_are_declared(options: InfluenceOptions, mode: str) -> None:
    model, train, queries = _data()
    result = attribute(
        [model], train, None if mode == "self" else queries, loss="cross_entropy", method="influence", mode=mode,
        top_k=4, options=options,
    )  # fmt: skip
    stored = method_diagnostics(get_method("influence"), result.diagnostics)
    typed = stored_attribution_diagnostics("influence", stored)
    assert isinstance(typed, InfluenceDiagnostics)
    assert typed.strategy == options.strategy and typed.models is not None and len(typed.models) == 1
    assert typed.num_train == 16 and typed.num_queries == (None if mode == "self" else 3)


@pytest.mark.parametrize(
    ("method", "options"),
    [("datainf", DataInfOptions(batch_size=5)), ("gradient_similarity", GradientSimilarityOptions(normalize=True))],
)
def test_closed_form_diagnostics_are_declared(method: str, options: Any) -> None:
    model, train, queries = _data()
    result = attribute(
        [model], train, queries, loss="cross_entropy", method=method, mode="pairwise", top_k=4, options=options
    )
    stored = method_diagnostics(get_method(method), result.diagnostics)
    typed = stored_attribution_diagnostics(method, stored)
    assert typed is not None and typed.method == method
    assert stored == {**result.diagnostics, "method": method}  # nothing the engine said is lost or changed


@pytest.mark.parametrize("estimator", ["newton", "proximal", "first_order"])
def test_edit_diagnostics_are_declared(estimator: str) -> None:
    model, train, queries = _data()
    result = edit_parameters(
        model, train, torch.tensor([0, 3]), loss="cross_entropy", options=InfluenceOptions(strategy="ekfac"),
        edit=EditOptions(estimator=estimator), queries=queries,
    )  # fmt: skip
    stored = edit_diagnostics(result.diagnostics)
    assert stored["estimator"] == estimator and stored["num_removed"] == 2
    assert len(stored["query_loss_changes"]) == 3


def test_an_undeclared_key_fails_and_an_unknown_stored_key_is_dropped() -> None:
    with pytest.raises(UndeclaredDiagnostics, match="surprise"):
        read_diagnostics(InfluenceDiagnostics, {"method": "influence", "surprise": 1})
    # Rows stored by an older release read back without the keys the model no longer knows.
    typed = stored_attribution_diagnostics("influence", {"strategy": "ekfac", "retired_key": 3})
    assert isinstance(typed, InfluenceDiagnostics) and typed.strategy == "ekfac"
    # A method registered outside the package keeps its diagnostics as an open object.
    other = stored_attribution_diagnostics("random", {"seed": 3})
    assert isinstance(other, OtherMethodDiagnostics) and other.model_extra == {"seed": 3}
