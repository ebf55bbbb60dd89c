"""Ground truth for the engine tests: explicit per-example gradients by torch.func, dense matrices."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from worker.attribution import Examples
from worker.attribution.hooks import TrackedLayer, resolve_layers


def make_mlp(d_in: int = 5, hidden: int = 7, classes: int = 3, bias: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden, bias=bias), nn.Tanh(), nn.Linear(hidden, classes, bias=bias)).double()


def fit_classifier(model: nn.Module, data: Examples, steps: int, lr: float = 0.03) -> nn.Module:
    """``model`` trained by full-batch Adam on the mean cross-entropy of ``data`` (seeded by the caller)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(data.inputs), data.targets).backward()
        optimizer.step()
    return model


class SmallConvNet(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.pool(torch.tanh(self.conv(x)))).flatten(1))


class SequenceNet(nn.Module):
    """(B, T, d) inputs: a Linear applied at every position, mean-pooled, then a Linear head."""

    def __init__(self, d: int = 4, hidden: int = 5, classes: int = 3):
        super().__init__()
        self.token = nn.Linear(d, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.token(x)).mean(1))


def make_data(n: int, shape: tuple[int, ...], classes: int, seed: int, dtype: torch.dtype = torch.float64) -> Examples:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn((n, *shape), generator=generator, dtype=dtype)
    targets = torch.randint(0, classes, (n,), generator=generator)
    return Examples(inputs=inputs, targets=targets)


def per_example_loss(outputs: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "cross_entropy":
        return F.cross_entropy(outputs, targets, reduction="none")
    return 0.5 * (outputs - targets).pow(2).flatten(1).sum(1)


def margin_measurement(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """minus (true logit - logsumexp of the other logits)."""
    true = outputs.gather(1, targets[:, None]).squeeze(1)
    mask = torch.arange(outputs.shape[1]) == targets[:, None]
    others = outputs.masked_fill(mask, float("-inf"))
    return -(true - torch.logsumexp(others, 1))


def explicit_gradients(
    model: nn.Module,
    data: Examples,
    loss: str,
    layers: list[str] | None = None,
    measurement: str = "loss",
    weights: bool = True,
) -> torch.Tensor:
    """(N, D) per-example gradients in the engine's flat layout (layer order, weight matrix rows, bias last)."""
    tracked = resolve_layers(model, layers)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def single(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (x.unsqueeze(0),))
        if measurement == "margin":
            return margin_measurement(out, y.unsqueeze(0)).sum()
        return (per_example_loss(out, y.unsqueeze(0), loss) * w).sum()

    w = data.weights if (weights and data.weights is not None) else torch.ones(len(data), dtype=data.inputs.dtype)
    grads = vmap(grad(single), in_dims=(None, 0, 0, 0))(params, data.inputs, data.targets, w)
    return flatten_parameter_gradients(tracked, grads)


def flatten_parameter_gradients(tracked: list[TrackedLayer], grads: dict[str, torch.Tensor]) -> torch.Tensor:
    columns = []
    for layer in tracked:
        prefix = f"{layer.name}." if layer.name else ""
        weight = grads[prefix + "weight"].reshape(grads[prefix + "weight"].shape[0], layer.out_features, -1)
        if layer.has_bias:
            weight = torch.cat([weight, grads[prefix + "bias"].reshape(weight.shape[0], -1, 1)], dim=2)
        columns.append(weight.flatten(1))
    return torch.cat(columns, dim=1)


def dense_operator(preconditioner, tracked: list[TrackedLayer], dtype=torch.float64) -> torch.Tensor:
    """The (D, D) matrix of a preconditioner, by applying it to the identity."""
    from worker.attribution.curvature.exact import flatten_vectors, unflatten_vectors

    size = sum(layer.num_parameters for layer in tracked)
    basis = torch.eye(size, dtype=dtype)
    return flatten_vectors(preconditioner.precondition(unflatten_vectors(basis, tracked)), tracked)


def dense_scores(model, train, queries, loss, preconditioner_matrix, measurement="loss", layers=None) -> torch.Tensor:
    g_train = explicit_gradients(model, train, loss, layers)
    g_query = explicit_gradients(model, queries, loss, layers, measurement=measurement)
    return g_query @ preconditioner_matrix @ g_train.T
