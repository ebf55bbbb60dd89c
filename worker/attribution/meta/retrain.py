"""Proximal retraining (ground truth for tests and benchmarks, docs/methods.md, meta methods).

λ_new = argmin_λ Σ_i f_i(λ; modified weights) + (δ_o/2)‖λ‖² + (ρ/2)‖λ − λ*‖², by a chord iteration
λ ← λ − M⁻¹ ∇G(λ) with a fixed matrix M (the damped total Hessian of the modified objective at λ*),
starting at λ*. Removing a task = zero validation weights (f_k is linear in them); removing an
instance = zero weight in its split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from worker.attribution.meta.data import TaskData
from worker.attribution.meta.functional import FunctionalModel
from worker.attribution.meta.options import MetaOptions
from worker.attribution.meta.total import TaskTerm, make_term
from worker.attribution.types import AttributionError


@dataclass
class RetrainResult:
    lam: torch.Tensor
    iterations: int
    gradient_norm: float
    terms: list[TaskTerm]


def reweighted_tasks(
    tasks: list[TaskData], row_scale: dict[int, float] | None = None, task_scale: dict[int, float] | None = None
) -> list[TaskData]:
    """Copies of ``tasks`` with instance weights multiplied by row_scale[row] and validation weights of
    task t by task_scale[t] (ω_t)."""
    row_scale = row_scale or {}
    task_scale = task_scale or {}
    out = []
    for task in tasks:
        w_tr, w_val = task.w_tr.clone(), task.w_val.clone() * task_scale.get(task.task_id, 1.0)
        for i, row in enumerate(task.rows_tr.tolist()):
            w_tr[i] = w_tr[i] * row_scale.get(row, 1.0)
        for i, row in enumerate(task.rows_val.tolist()):
            w_val[i] = w_val[i] * row_scale.get(row, 1.0)
        out.append(replace(task, w_tr=w_tr, w_val=w_val))
    return out


def objective_gradient(
    fm: FunctionalModel,
    tasks: list[TaskData],
    lam: torch.Tensor,
    options: MetaOptions,
    warm: list[TaskTerm] | None = None,
) -> tuple[torch.Tensor, list[TaskTerm]]:
    """∇ [Σ_i f_i(λ) + (δ_o/2)‖λ‖²] and the terms at λ (inner problems warm-started from ``warm``)."""
    terms = []
    total = options.outer_l2 * lam
    for i, task in enumerate(tasks):
        start = warm[i].theta if warm is not None else None
        term = make_term(fm, task, lam, options.inner, False, start)
        terms.append(term)
        if bool((task.w_val != 0).any()):
            total = total + term.total_grad()
    return total, terms


def proximal_retrain(
    fm: FunctionalModel,
    tasks: list[TaskData],
    lam_star: torch.Tensor,
    options: MetaOptions,
    damping: float,
    chord_matrix: torch.Tensor,
    tol: float = 1e-7,
    max_iter: int = 100,
) -> RetrainResult:
    """Chord iteration from λ* on the modified, proximally damped objective; raises if it does not converge."""
    system = torch.linalg.cholesky(
        0.5 * (chord_matrix + chord_matrix.T) + damping * torch.eye(lam_star.numel(), dtype=lam_star.dtype)
    )

    def solve(g: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(g.reshape(-1, 1), system).reshape(-1)

    result = chord_retrain(fm, tasks, lam_star, options, damping, solve, tol=tol, max_iter=max_iter)
    if result.gradient_norm > tol:
        raise AttributionError(
            f"proximal retrain did not converge: ‖∇‖ = {result.gradient_norm:.2e} after {max_iter} chord steps"
        )
    return result


def chord_retrain(
    fm: FunctionalModel,
    tasks: list[TaskData],
    lam_star: torch.Tensor,
    options: MetaOptions,
    damping: float,
    solve: Callable[[torch.Tensor], torch.Tensor],
    anchor: torch.Tensor | None = None,
    tol: float = 1e-7,
    max_iter: int = 100,
) -> RetrainResult:
    """λ ← λ − M⁻¹ ∇G(λ) from λ*, G = the modified objective + (ρ/2)‖λ − λ*‖² − ⟨anchor, λ⟩ (``anchor``: the
    full objective's gradient at λ*, so that removing nothing stays at λ*; None: no anchor), ``solve`` = M⁻¹.
    Stops at ‖∇G‖ ≤ tol or after ``max_iter`` steps (the result says which)."""
    lam = lam_star.clone()
    terms = None
    norm = float("inf")
    for it in range(max_iter + 1):
        g, terms = objective_gradient(fm, tasks, lam, options, terms)
        g = g + damping * (lam - lam_star)
        if anchor is not None:
            g = g - anchor
        norm = float(g.norm())
        if norm <= tol or it == max_iter:
            return RetrainResult(lam, it, norm, terms)
        lam = lam - solve(g)
    raise AssertionError("unreachable")
