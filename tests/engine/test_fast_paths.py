"""Fast paths: the fit's cached first pass (EK-FAC eigenvalues without a second model pass) and the
training-gradient index (attribution on the fit's own training set without a training pass) give the
same fits and scores as the plain passes; the index is only used for the same data, model and loss."""

from __future__ import annotations

import tempfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tests.engine.helpers import SequenceNet, SmallConvNet, make_data, make_mlp
from worker.attribution import (
    Examples,
    FitOptions,
    InfluenceOptions,
    attribute,
    fit_curvature,
    load_curvature,
    training_index,
)
from worker.attribution.curvature.base import KEY_SEPARATOR
from worker.attribution.training_index import INDEX_METADATA_KEY

STRATEGIES = ["ekfac", "kfac", "diagonal", "identity"]
MODES = ["pairwise", "aggregate", "self"]
TOL = dict(rtol=1e-9, atol=1e-11)  # float64 models: equal up to rounding


def _fit(model, train, strategy, fisher="true", **kwargs):
    return fit_curvature(
        model, train, "cross_entropy", FitOptions(strategy=strategy, fisher=fisher, seed=3, batch_size=7, **kwargs)
    )


def _scores(model, train, queries, strategy, mode, fit, fisher="true", damping=None):
    options = InfluenceOptions(strategy=strategy, fisher=fisher, damping=damping, batch_size=6)
    result = attribute(
        [model],
        train,
        None if mode == "self" else queries,
        loss="cross_entropy",
        method="influence",
        mode=mode,
        top_k=len(train),
        options=options,
        fits=[fit],
    )
    if mode == "pairwise":
        order = result.topk.positive_indices.argsort(dim=1)
        return result.topk.positive_scores.gather(1, order), result
    return result.scores, result


def _used_index(result) -> bool:
    return result.diagnostics["models"][0]["training_gradients"] == "index"


def _assert_fits_equal(first, second) -> None:
    a, b = first.to_tensors(), second.to_tensors()
    stats = [k for k in a if "index_" not in k]
    assert stats == [k for k in b if "index_" not in k]
    for key in stats:
        torch.testing.assert_close(a[key], b[key], **TOL)


@pytest.mark.parametrize("fisher", ["true", "empirical"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_index_and_cache_give_the_same_fit_and_scores(strategy: str, fisher: str) -> None:
    model = make_mlp()
    train, queries = make_data(23, (5,), 3, 0), make_data(4, (5,), 3, 1)
    fast = _fit(model, train, strategy, fisher)
    slow = _fit(model, train, strategy, fisher, store_gradients=False, memory_budget_bytes=0)
    assert slow.training_index is None
    assert (fast.training_index is not None) == (strategy != "identity")  # identity fits take no pass
    _assert_fits_equal(fast, slow)
    for mode in MODES:
        with_index, result = _scores(model, train, queries, strategy, mode, fast, fisher)
        without, plain = _scores(model, train, queries, strategy, mode, slow, fisher)
        assert _used_index(result) == (strategy != "identity") and not _used_index(plain)
        torch.testing.assert_close(with_index, without, **TOL)


def test_several_label_draws_and_weights() -> None:
    model = make_mlp()
    train = make_data(17, (5,), 3, 2)
    train = Examples(train.inputs, train.targets, weights=torch.linspace(0.5, 2.0, 17, dtype=torch.float64))
    queries = make_data(3, (5,), 3, 4)
    fast = fit_curvature(model, train, "cross_entropy", FitOptions(strategy="ekfac", fisher_samples=3, batch_size=5))
    slow = fit_curvature(
        model,
        train,
        "cross_entropy",
        FitOptions(strategy="ekfac", fisher_samples=3, batch_size=5, memory_budget_bytes=0),
    )
    _assert_fits_equal(fast, slow)
    for mode in MODES:
        with_index, result = _scores(model, train, queries, "ekfac", mode, fast)
        without, _ = _scores(model, train, queries, "ekfac", mode, slow)
        assert _used_index(result)
        torch.testing.assert_close(with_index, without, **TOL)


def test_fit_without_index_but_with_cached_second_pass() -> None:
    model = make_mlp()
    train = make_data(15, (5,), 3, 2)
    fast = _fit(model, train, "ekfac", store_gradients=False)
    slow = _fit(model, train, "ekfac", memory_budget_bytes=0)
    assert fast.training_index is None and slow.training_index is None
    _assert_fits_equal(fast, slow)


@pytest.mark.parametrize(
    "model_factory, shape", [(lambda: SmallConvNet().double(), (2, 5, 5)), (lambda: SequenceNet().double(), (6, 4))]
)
@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
def test_layers_with_positions_keep_gradient_matrices(model_factory, shape, strategy: str, tmp_path) -> None:
    """Convolutions and Linears on sequences keep per-example gradient matrices: the EK-FAC eigenvalues and every
    mode's scores equal the plain passes', also after a save and reload of the fit."""
    model = model_factory()
    train, queries = make_data(12, shape, 3, 5), make_data(3, shape, 3, 6)
    fast = _fit(model, train, strategy, "empirical")
    slow = _fit(model, train, strategy, "empirical", memory_budget_bytes=0)
    assert slow.training_index is None
    index = fast.training_index
    assert index is not None and index.matrices
    for name, matrix in index.matrices.items():
        assert matrix.dim() == 3 and matrix.shape[0] == 12 and name not in index.activations
    _assert_fits_equal(fast, slow)
    path = tmp_path / "fit.safetensors"
    save_file(fast.to_tensors(), str(path), metadata=fast.metadata())
    with safe_open(str(path), "pt") as stored:
        loaded = load_curvature(load_file(str(path)), stored.metadata())
    assert loaded.training_index is not None and sorted(loaded.training_index.matrices) == sorted(index.matrices)
    for mode in MODES:
        a, result = _scores(model, train, queries, strategy, mode, fast, "empirical")
        b, plain = _scores(model, train, queries, strategy, mode, slow, "empirical")
        c, reloaded = _scores(model, train, queries, strategy, mode, loaded, "empirical")
        assert _used_index(result) and _used_index(reloaded) and not _used_index(plain)
        torch.testing.assert_close(a, b, **TOL)
        torch.testing.assert_close(c, b, **TOL)


def test_matrices_beyond_the_budget_fall_back() -> None:
    """The plan counts a Linear as rank-one; on sequences its matrices are larger and the recorder gives up."""
    model = SequenceNet().double()
    train = make_data(12, (6, 4), 3, 5)
    budget = _fit(model, train, "ekfac", "empirical").training_index.nbytes
    small = _fit(model, train, "ekfac", "empirical", memory_budget_bytes=budget - 1)
    assert small.training_index is None
    _assert_fits_equal(small, _fit(model, train, "ekfac", "empirical", memory_budget_bytes=0))


def test_other_training_set_model_or_loss_does_not_use_the_index() -> None:
    model = make_mlp()
    train, queries = make_data(20, (5,), 3, 0), make_data(3, (5,), 3, 1)
    fit = _fit(model, train, "ekfac")
    other_rows = Examples(train.inputs.clone(), train.targets.flip(0))  # same size, other labels
    for data in (other_rows, make_data(19, (5,), 3, 0)):
        with_fit, result = _scores(model, data, queries, "ekfac", "self", fit)
        assert not _used_index(result)
        plain, _ = _scores(model, data, queries, "ekfac", "self", _fit(model, train, "ekfac", memory_budget_bytes=0))
        torch.testing.assert_close(with_fit, plain, **TOL)
    changed = make_mlp()
    with torch.no_grad():
        changed[0].weight.add_(0.01)
    _, result = _scores(changed, train, queries, "ekfac", "pairwise", fit)
    assert not _used_index(result)
    targets = torch.nn.functional.one_hot(train.targets, 3).double()
    mse_train = Examples(train.inputs, targets)
    mse_fit = fit_curvature(model, mse_train, "mse", FitOptions(strategy="diagonal"))
    assert mse_fit.training_index is not None
    result = attribute(
        [model],
        mse_train,
        None,
        loss="mse",
        method="influence",
        mode="self",
        options=InfluenceOptions(strategy="diagonal"),
        fits=[mse_fit],
    )
    assert _used_index(result)
    assert not mse_fit.training_index.matches(model, mse_train, "cross_entropy", mse_fit.layer_names)
    assert mse_fit.training_index.matches(model, mse_train, "mse", mse_fit.layer_names)


@pytest.mark.parametrize("strategy", ["ekfac", "diagonal"])
def test_round_trip_keeps_the_index(strategy: str, tmp_path) -> None:
    model = make_mlp().float()
    train, queries = make_data(20, (5,), 3, 0, torch.float32), make_data(3, (5,), 3, 1, torch.float32)
    fit = _fit(model, train, strategy)
    path = tmp_path / "fit.safetensors"
    save_file(fit.to_tensors(), str(path), metadata=fit.metadata())
    with safe_open(str(path), "pt") as stored:
        metadata = stored.metadata()
    tensors = load_file(str(path))
    assert INDEX_METADATA_KEY in metadata and f"2{KEY_SEPARATOR}index_activations" in tensors
    loaded = load_curvature(tensors, metadata)
    assert loaded.training_index is not None
    for name in fit.layer_names:
        assert torch.equal(loaded.training_index.activations[name], fit.training_index.activations[name])
        assert torch.equal(loaded.training_index.gradients[name], fit.training_index.gradients[name])
    for mode in MODES:
        a, first = _scores(model, train, queries, strategy, mode, fit)
        b, second = _scores(model, train, queries, strategy, mode, loaded)
        assert _used_index(first) and _used_index(second)
        assert torch.equal(a, b)
    # a fit saved without an index (an older fit) still loads and scores through the training pass
    old_tensors = {k: v for k, v in tensors.items() if "index_" not in k}
    old_metadata = {k: v for k, v in metadata.items() if k != INDEX_METADATA_KEY}
    old = load_curvature(old_tensors, old_metadata)
    assert old.training_index is None
    c, result = _scores(model, train, queries, strategy, "self", old)
    assert not _used_index(result)
    torch.testing.assert_close(c, _scores(model, train, queries, strategy, "self", fit)[0], rtol=1e-5, atol=1e-6)


def test_memory_budget_zero_or_too_small_disables_the_index() -> None:
    model = make_mlp()
    train = make_data(20, (5,), 3, 0)
    assert _fit(model, train, "ekfac", memory_budget_bytes=0).training_index is None
    assert _fit(model, train, "kfac", store_gradients=False).training_index is None
    assert _fit(model, train, "ekfac", memory_budget_bytes=100).training_index is None
    fit = _fit(model, train, "ekfac")
    assert fit.training_index is not None and fit.training_index.num_examples == 20
    assert "index_activations" not in " ".join(_fit(model, train, "ekfac", memory_budget_bytes=0).to_tensors())


def test_inline_fit_uses_its_own_index_and_matches() -> None:
    model = make_mlp()
    train, queries = make_data(21, (5,), 3, 0), make_data(3, (5,), 3, 1)
    for mode in MODES:
        result = attribute(
            [model],
            train,
            None if mode == "self" else queries,
            loss="cross_entropy",
            method="influence",
            mode=mode,
            top_k=21,
            options=InfluenceOptions(strategy="ekfac", seed=3, batch_size=7),
        )
        assert _used_index(result)
        expected, _ = _scores(model, train, queries, "ekfac", mode, _fit(model, train, "ekfac", memory_budget_bytes=0))
        got = (
            result.scores
            if mode != "pairwise"
            else result.topk.positive_scores.gather(1, result.topk.positive_indices.argsort(dim=1))
        )
        torch.testing.assert_close(got, expected, **TOL)


def test_progress_reaches_the_totals_with_the_cache() -> None:
    model = make_mlp()
    train = make_data(20, (5,), 3, 0)
    reports: list[tuple[str, int, int]] = []
    fit_curvature(
        model,
        train,
        "cross_entropy",
        FitOptions(strategy="ekfac", fisher_samples=2, batch_size=6),
        progress=lambda stage, done, total: reports.append((stage, done, total)),
    )
    assert reports[-1] == ("fit", 40, 40)
    assert [done for _, done, _ in reports] == sorted(done for _, done, _ in reports)


def test_ensemble_with_one_index_falls_back() -> None:
    first, second = make_mlp(seed=0), make_mlp(seed=1)
    train = make_data(16, (5,), 3, 0)
    fits = [_fit(first, train, "ekfac"), _fit(second, train, "ekfac", memory_budget_bytes=0)]
    slow = [_fit(first, train, "ekfac", memory_budget_bytes=0), fits[1]]
    options = InfluenceOptions(strategy="ekfac", batch_size=5)
    a = attribute(
        [first, second], train, None, loss="cross_entropy", method="influence", mode="self", options=options, fits=fits
    )
    b = attribute(
        [first, second], train, None, loss="cross_entropy", method="influence", mode="self", options=options, fits=slow
    )
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-6, atol=1e-7)
    both = [fits[0], _fit(second, train, "ekfac")]
    c = attribute(
        [first, second], train, None, loss="cross_entropy", method="influence", mode="self", options=options, fits=both
    )
    assert all(m["training_gradients"] == "index" for m in c.diagnostics["models"])
    torch.testing.assert_close(c.scores, b.scores, rtol=1e-6, atol=1e-7)


def test_shared_linear_layer_keeps_its_gradient_matrices() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))

    torch.manual_seed(0)
    model = Twice().double()
    train = make_data(10, (4,), 3, 0)
    fast = _fit(model, train, "ekfac")
    assert fast.training_index is not None and sorted(fast.training_index.matrices) == ["inner"]  # two calls
    _assert_fits_equal(fast, _fit(model, train, "ekfac", memory_budget_bytes=0))


@pytest.mark.parametrize("model_factory, shape", [(lambda: make_mlp(), (5,)), (lambda: SequenceNet().double(), (6, 4))])
@pytest.mark.parametrize("fisher", ["true", "empirical"])
def test_spilled_rows_give_the_same_fit_and_scores(model_factory, shape, fisher: str, tmp_path, monkeypatch) -> None:
    """Rows beyond ``SPILL_BYTES`` go to temporary files and are mapped back: the same EK-FAC fit and every mode's
    scores as rows kept in memory (rank-one rows and gradient matrices, with the cached eigenvalue pass of the
    empirical Fisher), also scored twice (the pages are released after each read); the files are gone after."""
    model = model_factory()
    train, queries = make_data(23, shape, 3, 5), make_data(4, shape, 3, 6)
    in_memory = _fit(model, train, "ekfac", fisher)
    assert in_memory.training_index is not None and not in_memory.training_index.mappings
    monkeypatch.setattr(training_index, "SPILL_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    spilled = _fit(model, train, "ekfac", fisher)
    index = spilled.training_index
    assert index is not None and index.mappings  # file-backed
    assert list(tmp_path.iterdir()) == []  # the files were removed once mapped
    _assert_fits_equal(spilled, in_memory)
    for key, tensor in in_memory.training_index.layer_tensors().items():
        for statistic, value in tensor.items():
            assert torch.equal(index.layer_tensors()[key][statistic], value)
    for mode in MODES:
        expected, _ = _scores(model, train, queries, "ekfac", mode, in_memory, fisher)
        for _ in range(2):
            again, result = _scores(model, train, queries, "ekfac", mode, spilled, fisher)
            assert _used_index(result)
            torch.testing.assert_close(again, expected, **TOL)


def test_a_recorder_that_gives_up_removes_its_files(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(training_index, "SPILL_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = SequenceNet().double()
    train = make_data(23, (6, 4), 3, 5)
    # per example: the token layer's 5 x (4 + bias) gradient matrix and the head's (a, g) rows, 6 + 3: 34 float64s
    # (272 bytes); the plan counts the token layer as rank-one (152 bytes): the budget admits the plan and two
    # batches of 7, and the third batch gives up
    fit = _fit(model, train, "ekfac", "empirical", memory_budget_bytes=4000)
    assert fit.training_index is None
    assert list(tmp_path.iterdir()) == []


def test_spilled_rows_have_no_name_in_the_file_system_even_mid_pass(tmp_path, monkeypatch) -> None:
    """A worker killed (SIGKILL, out of memory) in the middle of a fit's pass can leave nothing behind: the spill
    files are anonymous from their first byte, so the temporary directory stays empty throughout."""
    monkeypatch.setattr(training_index, "SPILL_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen_during_pass: list[list[str]] = []
    append = training_index.FileRows.append

    def append_and_look(self: training_index.FileRows, rows: torch.Tensor) -> None:
        append(self, rows)
        seen_during_pass.append([path.name for path in tmp_path.iterdir()])

    monkeypatch.setattr(training_index.FileRows, "append", append_and_look)
    model = make_mlp()
    fit = _fit(model, make_data(23, (5,), 3, 5), "ekfac", "empirical")
    assert fit.training_index is not None and fit.training_index.mappings  # it did spill
    assert seen_during_pass and all(names == [] for names in seen_during_pass)
