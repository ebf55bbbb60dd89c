"""Channels-last max-pooling in forward-only passes (``pooling_layout``): the same values, the layout a model sees
unchanged (a model that calls ``.view`` on the pooled output still runs), gradients untouched, hooks removed, and
an edit of a pooling CNN identical with and without it (float64, exact equality)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from tests.engine.helpers import fit_classifier
from worker.attribution import EditOptions, Examples, InfluenceOptions, edit_parameters, fit_curvature
from worker.attribution import proximal as proximal_module
from worker.attribution.pooling_layout import MIN_CHANNELS, channels_last_max_pooling, max_pooling_layers


class ViewingConvNet(nn.Module):
    """Conv → max-pool → ``.view`` (a flatten that fails on a channels-last tensor) → linear."""

    def __init__(self, return_indices: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=return_indices)
        self.head = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(torch.relu(self.conv(x)))
        if isinstance(pooled, tuple):
            pooled = pooled[0]
        assert pooled.is_contiguous()  # the layout the model sees without the hooks
        return self.head(pooled.view(pooled.shape[0], -1))


def _data(rows: int, seed: int) -> Examples:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(rows, 2, 6, 6, generator=generator, dtype=torch.float64)
    return Examples(inputs, torch.randint(0, 3, (rows,), generator=generator))


def test_same_values_and_layout_for_a_viewing_model() -> None:
    torch.manual_seed(0)
    model = ViewingConvNet().double()
    inputs = _data(7, 1).inputs
    with torch.no_grad():
        plain = model(inputs)
        with channels_last_max_pooling(max_pooling_layers(model)):
            pooled_channels_last = model(inputs)
    assert torch.equal(plain, pooled_channels_last)
    assert not model.pool._forward_hooks and not model.pool._forward_pre_hooks


def test_pooling_runs_channels_last_inside_and_returns_contiguous() -> None:
    pool = nn.MaxPool2d(2, return_indices=True)
    seen: list[bool] = []
    pool.register_forward_hook(
        lambda module, inputs, output: seen.append(inputs[0].is_contiguous(memory_format=torch.channels_last))
    )
    x = torch.randn(3, 5, 4, 4)
    with torch.no_grad():
        values, indices = pool(x)
        with channels_last_max_pooling([pool]):
            values_cl, indices_cl = pool(x)
    assert seen == [False, True]
    assert torch.equal(values, values_cl) and torch.equal(indices, indices_cl)
    assert values_cl.is_contiguous() and indices_cl.is_contiguous()


def test_few_channels_are_left_alone() -> None:
    pool = nn.MaxPool2d(2)
    seen: list[bool] = []
    pool.register_forward_hook(
        lambda module, inputs, output: seen.append(inputs[0].is_contiguous(memory_format=torch.channels_last))
    )
    with torch.no_grad(), channels_last_max_pooling([pool]):
        pool(torch.randn(3, MIN_CHANNELS - 1, 4, 4))
        pool(torch.randn(3, MIN_CHANNELS, 4, 4))
    assert seen == [False, True]


def test_gradient_passes_are_left_alone() -> None:
    torch.manual_seed(0)
    model = ViewingConvNet().double()
    seen: list[bool] = []
    model.pool.register_forward_hook(
        lambda module, inputs, output: seen.append(inputs[0].is_contiguous(memory_format=torch.channels_last))
    )
    inputs = _data(4, 2).inputs
    with channels_last_max_pooling(max_pooling_layers(model)):
        model(inputs).sum().backward()
    assert seen == [False]


def test_edit_of_a_pooling_cnn_is_the_same_with_and_without(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    train = _data(60, 3)
    model = fit_classifier(ViewingConvNet().double(), train, steps=60)
    fit = fit_curvature(model, train, "cross_entropy", InfluenceOptions(strategy="ekfac").fit_options())
    layouts: list[bool] = []
    model.pool.register_forward_hook(
        lambda module, inputs, output: layouts.append(inputs[0].is_contiguous(memory_format=torch.channels_last))
    )

    def edited() -> dict[str, torch.Tensor]:
        result = edit_parameters(
            model,
            train,
            torch.tensor([3, 17, 41]),
            loss="cross_entropy",
            method="influence",
            fit=fit,
            edit=EditOptions(),
        )
        return result.state

    with_hooks = edited()
    assert any(layouts)  # the line search's forward passes pooled channels-last
    layouts.clear()
    monkeypatch.setattr(proximal_module, "channels_last_max_pooling", lambda layers: contextlib.nullcontext())
    without = edited()
    assert not any(layouts)
    for key, value in with_hooks.items():
        assert torch.equal(value, without[key]), key
