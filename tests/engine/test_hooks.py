"""Per-layer records from the hooks reproduce explicit per-example gradients (torch.func), tol 1e-10 (float64)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.engine.helpers import SequenceNet, SmallConvNet, explicit_gradients, make_data, make_mlp
from worker.attribution import Examples, trackable_layers
from worker.attribution.gradients import training_activities
from worker.attribution.hooks import ActivityRecorder, _conv_patches, _padded, resolve_layers

TOL = 1e-10


def _cases():
    yield "mlp", make_mlp(), make_data(9, (5,), 3, 1)
    yield "mlp_no_bias", make_mlp(bias=False), make_data(9, (5,), 3, 2)
    torch.manual_seed(0)
    yield "conv", SmallConvNet().double(), make_data(6, (2, 5, 5), 3, 3)
    torch.manual_seed(0)
    yield "sequence", SequenceNet().double(), make_data(7, (6, 4), 3, 4)


@pytest.mark.parametrize("name,model,data", list(_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_hook_gradients_match_explicit(name: str, model: nn.Module, data: Examples) -> None:
    expected = explicit_gradients(model, data, "cross_entropy")
    layers = resolve_layers(model, None)
    with ActivityRecorder(layers) as recorder:
        activities = training_activities(model, recorder, data, "cross_entropy")
    got = torch.cat([activities[layer.name].per_example_gradients().flatten(1) for layer in layers], dim=1)
    assert torch.allclose(got, expected, atol=TOL, rtol=0)
    # contraction and norms without forming per-example gradients
    vectors = torch.randn(4, expected.shape[1], dtype=torch.float64)
    offset, contracted, norms = 0, 0, 0
    for layer in layers:
        size = layer.num_parameters
        v = vectors[:, offset : offset + size].reshape(4, layer.out_features, layer.in_features)
        contracted = contracted + activities[layer.name].contract(v)
        norms = norms + activities[layer.name].squared_norms()
        offset += size
    assert torch.allclose(contracted, vectors @ expected.T, atol=TOL, rtol=0)
    assert torch.allclose(norms, expected.pow(2).sum(1), atol=TOL, rtol=0)


def test_trackable_layers_order_and_kinds() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4), nn.LayerNorm(4), nn.Linear(4, 2)
    )
    assert trackable_layers(model) == ["0", "3", "5"]
    assert trackable_layers(nn.Sequential(nn.ReLU())) == []


def test_inplace_relu_after_tracked_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).double()
    data = make_data(8, (4,), 3, 5)
    expected = explicit_gradients(model, data, "cross_entropy")
    layers = resolve_layers(model, None)
    with ActivityRecorder(layers) as recorder:
        activities = training_activities(model, recorder, data, "cross_entropy")
    got = torch.cat([activities[layer.name].per_example_gradients().flatten(1) for layer in layers], dim=1)
    assert torch.allclose(got, expected, atol=TOL, rtol=0)


def test_example_weights_scale_gradients() -> None:
    model = make_mlp()
    data = make_data(5, (5,), 3, 6)
    weights = torch.tensor([1.0, 2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    weighted = Examples(data.inputs, data.targets, weights=weights)
    layers = resolve_layers(model, None)
    with ActivityRecorder(layers) as recorder:
        activities = training_activities(model, recorder, weighted, "cross_entropy")
    got = torch.cat([activities[layer.name].per_example_gradients().flatten(1) for layer in layers], dim=1)
    expected = explicit_gradients(model, data, "cross_entropy") * weights[:, None]
    assert torch.allclose(got, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False),
        lambda: nn.Conv2d(2, 3, (3, 2), padding="same", dilation=2),
        lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
        lambda: nn.Conv2d(2, 3, 2, padding="valid"),
    ],
    ids=["stride_no_bias", "same_dilated", "reflect", "valid"],
)
def test_conv_variants_match_explicit(conv) -> None:
    torch.manual_seed(0)
    layer = conv()
    with torch.no_grad():
        features = layer(torch.zeros(1, 2, 6, 6)).numel()
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.Linear(features, 3)).double()
    data = make_data(5, (2, 6, 6), 3, 7)
    expected = explicit_gradients(model, data, "cross_entropy")
    layers = resolve_layers(model, None)
    with ActivityRecorder(layers) as recorder:
        activities = training_activities(model, recorder, data, "cross_entropy")
    got = torch.cat([activities[t.name].per_example_gradients().flatten(1) for t in layers], dim=1)
    assert torch.allclose(got, expected, atol=TOL, rtol=0)


CONV_SHAPES = [
    (kernel, stride, dilation, padding, mode)
    for kernel, stride, dilation, padding, mode in itertools.product(
        [(3, 3), (2, 3), (1, 1)], [1, 2, (2, 1)], [1, 2], [0, (2, 1), "same", "valid"], ["zeros", "reflect", "circular"]
    )
    if not (padding == "same" and stride != 1)  # torch allows "same" with stride 1 only
]


@pytest.mark.parametrize("kernel,stride,dilation,padding,padding_mode", CONV_SHAPES)
def test_conv_patches_equal_unfold(kernel, stride, dilation, padding, padding_mode) -> None:
    """The patches are copied from strided slices of the padded input: the very values of F.unfold."""
    module = nn.Conv2d(3, 4, kernel, stride=stride, dilation=dilation, padding=padding, padding_mode=padding_mode)
    x = torch.randn(2, 3, 11, 9, generator=torch.Generator().manual_seed(0))
    padded = _padded(module, x)
    expected = F.unfold(padded, module.kernel_size, dilation=module.dilation, stride=module.stride).transpose(1, 2)
    assert torch.equal(_conv_patches(module, x), expected)
    with_ones = _conv_patches(module, x, ones_column=True)
    assert torch.equal(with_ones[..., :-1], expected) and bool((with_ones[..., -1] == 1).all())
    assert padded is x or padded.shape[-2:] != x.shape[-2:]


def test_shared_layer_called_twice_sums_both_calls() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))

    torch.manual_seed(0)
    model = Shared().double()
    data = make_data(6, (4,), 3, 8)
    expected = explicit_gradients(model, data, "cross_entropy")
    layers = resolve_layers(model, None)
    with ActivityRecorder(layers) as recorder:
        activities = training_activities(model, recorder, data, "cross_entropy")
    got = torch.cat([activities[t.name].per_example_gradients().flatten(1) for t in layers], dim=1)
    assert torch.allclose(got, expected, atol=TOL, rtol=0)


def test_blocked_contraction_equals_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rank-one contraction g^T V a, processed in query blocks, equals <V, g a^T> (tol 1e-12)."""
    from worker.attribution import hooks
    from worker.attribution.hooks import LayerActivity

    generator = torch.Generator().manual_seed(0)
    for d_out, d_in in ((3, 5), (6, 2)):
        activity = LayerActivity(
            torch.randn(7, 1, d_in, generator=generator, dtype=torch.float64),
            torch.randn(7, 1, d_out, generator=generator, dtype=torch.float64),
        )
        vectors = torch.randn(11, d_out, d_in, generator=generator, dtype=torch.float64)
        dense = vectors.flatten(1) @ activity.per_example_gradients().flatten(1).T
        monkeypatch.setattr(hooks, "CONTRACTION_BLOCK_ELEMENTS", 30)
        assert torch.allclose(activity.contract(vectors), dense, atol=1e-12, rtol=0)
        monkeypatch.undo()
        assert torch.allclose(activity.contract(vectors), dense, atol=1e-12, rtol=0)
