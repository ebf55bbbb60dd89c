"""Tiny meta-learning problems for the meta influence tests (float64 inside the engine)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from worker.attribution.meta import InnerOptions, MetaOptions
from worker.attribution.meta.influence import build_problem
from worker.attribution.meta.total import make_term
from worker.attribution.types import Examples


def regression_tasks(num_tasks: int = 4, per_split: int = 5, seed: int = 0, dim: int = 2) -> Examples:
    """Linear-ish regression tasks y = a_t·x + noise, with task and split fields."""
    g = torch.Generator().manual_seed(seed)
    xs, ys, ts, ss = [], [], [], []
    for t in range(num_tasks):
        a = torch.randn(dim, generator=g)
        for s in (0, 1):
            x = torch.randn(per_split, dim, generator=g)
            y = torch.tanh(x @ a) + 0.1 * torch.randn(per_split, generator=g)
            xs.append(x)
            ys.append(y.reshape(-1, 1))
            ts.append(torch.full((per_split,), t))
            ss.append(torch.full((per_split,), s))
    return Examples(torch.cat(xs), torch.cat(ys), task=torch.cat(ts), split=torch.cat(ss))


def classification_tasks(num_tasks: int = 3, per_split: int = 6, classes: int = 3, seed: int = 0) -> Examples:
    g = torch.Generator().manual_seed(seed)
    xs, ys, ts, ss = [], [], [], []
    for t in range(num_tasks):
        centers = torch.randn(classes, 2, generator=g) * 2
        for s in (0, 1):
            y = torch.arange(per_split) % classes
            x = centers[y] + torch.randn(per_split, 2, generator=g)
            xs.append(x)
            ys.append(y)
            ts.append(torch.full((per_split,), t + 10))
            ss.append(torch.full((per_split,), s))
    return Examples(torch.cat(xs), torch.cat(ys), task=torch.cat(ts), split=torch.cat(ss))


def mlp(sizes: tuple[int, ...] = (2, 3, 1), seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def implicit_options(ihvp: str = "dense", **kw) -> MetaOptions:
    inner = InnerOptions(mode="implicit_proximal", reg=2.0, ihvp=ihvp, tol=1e-11, max_iter=100)
    return MetaOptions(inner=inner, solver="exact", outer_l2=0.1, **kw)


def unrolled_options(**kw) -> MetaOptions:
    inner = InnerOptions(mode="unrolled", steps=3, lr=0.3)
    return MetaOptions(inner=inner, solver="exact", outer_l2=0.1, **kw)


def term_at(problem, k: int, lam: torch.Tensor, task=None):
    """Task k's term re-solved at another λ (or with modified weights)."""
    return make_term(problem.fm, task or problem.terms[k].task, lam, problem.options.inner, problem.options.direct)


def with_weights(task, w_tr=None, w_val=None):
    return dataclasses.replace(
        task, w_tr=task.w_tr if w_tr is None else w_tr, w_val=task.w_val if w_val is None else w_val
    )


def problem_for(mode: str, ihvp: str = "dense", model=None, train=None, queries=None, **kw):
    options = implicit_options(ihvp, **kw) if mode == "implicit_proximal" else unrolled_options(**kw)
    model = model or mlp()
    train = train or regression_tasks()
    queries = queries or regression_tasks(2, seed=1)
    return build_problem(model, train, queries, "mse", options), model, train, queries, options


def random_direction(problem, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(problem.fm.num_lambda, generator=g, dtype=torch.float64)
