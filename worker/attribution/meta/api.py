"""Entry points of meta-learning influence used by the worker."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

import torch
from torch import nn

from worker.attribution.editing import EditResult
from worker.attribution.losses import LossName
from worker.attribution.meta.data import TaskData
from worker.attribution.meta.influence import (
    HessianInverse,
    MetaProblem,
    build_problem,
    finish_diagnostics,
    instance_scores,
    meta_work,
    newton_task_scores,
    query_gradients,
    removal_gradient,
    removed_tasks,
    task_scores,
    train_gradients,
)
from worker.attribution.meta.options import MetaOptions
from worker.attribution.meta.retrain import chord_retrain, objective_gradient, reweighted_tasks
from worker.attribution.options import EditOptions
from worker.attribution.threads import few_threads
from worker.attribution.types import AttributionError, AttributionScores, Examples, Progress, TopK, no_progress


def _check_request(unit: str, mode: str, top_k: int, options: MetaOptions) -> None:
    if unit not in ("task", "instance"):
        raise AttributionError(f"meta influence unit must be 'task' or 'instance', got {unit!r}")
    if options.removal == "newton" and unit != "task":
        raise AttributionError("options.removal='newton' applies to task influence; instance influence is first order")
    if mode not in ("pairwise", "aggregate"):
        raise AttributionError(f"meta influence supports modes 'pairwise' and 'aggregate', got {mode!r}")
    if mode == "pairwise" and top_k < 1:
        raise AttributionError(f"top_k must be >= 1, got {top_k}")


def _topk(scores: torch.Tensor, top_k: int) -> TopK:
    """scores (Q, U) → the top_k most positive and most negative units per query."""
    k = min(top_k, scores.shape[1])
    pos_scores, pos_idx = torch.topk(scores, k, dim=1, largest=True, sorted=True)
    neg_scores, neg_idx = torch.topk(scores, k, dim=1, largest=False, sorted=True)
    return TopK(pos_idx, pos_scores.float(), neg_idx, neg_scores.float())


def _work(model: nn.Module, rows: int, options: MetaOptions) -> float:
    return meta_work(sum(q.numel() for q in model.parameters() if q.requires_grad), rows, options)


def attribute_meta(
    model: nn.Module,
    train: Examples,
    queries: Examples,
    *,
    loss: Literal["cross_entropy", "mse"],
    unit: Literal["task", "instance"],
    mode: Literal["pairwise", "aggregate"],
    top_k: int,
    options: MetaOptions,
    progress: Progress = no_progress,
    device: torch.device | str | None = None,
) -> AttributionScores:
    """Task-IF or instance-IF of the training meta-dataset on the query tasks' post-adaptation loss.

    Scores are ΔQ on removal (positive = helpful). ``aggregate``: one score per unit for Q = Σ_q f_q.
    ``pairwise``: per query task (sorted ids), the top_k positive and negative units.
    """
    _check_request(unit, mode, top_k, options)
    with few_threads(_work(model, len(train), options)):
        return _attribute_meta(
            model,
            train,
            queries,
            loss=loss,
            unit=unit,
            mode=mode,
            top_k=top_k,
            options=options,
            progress=progress,
            device=device,
        )


def _scores(
    problem: MetaProblem, inverse: HessianInverse, query_grads: torch.Tensor, unit: str, progress: Progress
) -> torch.Tensor:
    """(m, U) removal scores for query gradients (m, p): tasks or dataset rows as units."""
    if problem.options.removal == "newton":
        return newton_task_scores(problem, inverse, query_grads, progress).T
    directions = inverse.solve(query_grads.T)  # s_Q per query, (p, m)
    if unit == "task":
        return task_scores(problem, directions).T
    return torch.stack(
        [
            instance_scores(problem, directions[:, q], progress, f"instance_scores_query_{q + 1}")
            for q in range(directions.shape[1])
        ]
    )


def _attribute_meta(
    model: nn.Module,
    train: Examples,
    queries: Examples,
    *,
    loss: LossName,
    unit: Literal["task", "instance"],
    mode: Literal["pairwise", "aggregate"],
    top_k: int,
    options: MetaOptions,
    progress: Progress,
    device: torch.device | str | None,
) -> AttributionScores:
    problem = build_problem(model, train, queries, loss, options, device, progress)
    inverse = HessianInverse(problem, progress)
    query_grads = query_gradients(problem)  # (Q, p)
    if mode == "aggregate":
        query_grads = query_grads.sum(dim=0, keepdim=True)  # Q = Σ_q f_q
    scores = _scores(problem, inverse, query_grads, unit, progress)  # (Q, U)
    if not torch.isfinite(scores).all():
        raise AttributionError("NaN in the meta influence scores")
    result = AttributionScores(mode=mode, diagnostics=finish_diagnostics(problem))
    if unit == "task":
        result.unit_task = torch.tensor(problem.task_ids, dtype=torch.long)
    else:
        assert train.task is not None and train.split is not None  # build_problem refuses a dataset without them
        result.unit_task = train.task.detach().cpu().to(torch.long).reshape(-1)
        result.unit_split = train.split.detach().cpu().to(torch.long).reshape(-1)
    if mode == "aggregate":
        result.scores = scores[0].detach().cpu().float()
    else:
        result.topk = _topk(scores.detach().cpu(), top_k)
        result.query_task = torch.tensor([t.task_id for t in problem.query_tasks], dtype=torch.long)
    return result


def edit_meta(
    model: nn.Module,
    train: Examples,
    remove: torch.Tensor,
    *,
    loss: Literal["cross_entropy", "mse"],
    unit: Literal["task", "instance"],
    options: MetaOptions,
    edit: EditOptions | None = None,
    queries: Examples | None = None,
    device: torch.device | str | None = None,
) -> EditResult:
    """The meta-parameters retrained without the removed tasks (task ids) or instances (row indices), as a full
    state_dict with diagnostics. ``edit.estimator``: ``first_order`` λ* + (H + ρI)⁻¹ Σ g (additive, docs/methods.md, meta methods);
    ``newton`` (tasks) λ* + (H − Σ_S H_k + ρI)⁻¹ Σ g, the solve of ``removal='newton'``; ``proximal``: chord
    iterations on the anchored proximal retrain objective, with that Newton matrix (instances: H + ρI) as the chord.
    ``edit.proximity`` replaces the damping ρ when given; ``edit`` None follows ``options.removal``."""
    if edit is None:  # the attribution's own removal rule
        edit = EditOptions(estimator="newton" if options.removal == "newton" and unit == "task" else "first_order")
    edit.validate()
    if unit not in ("task", "instance"):
        raise AttributionError(f"meta edit unit must be 'task' or 'instance', got {unit!r}")
    if edit.estimator == "newton" and unit != "task":
        raise AttributionError("estimator 'newton' applies to task influence; use 'first_order' or 'proximal'")
    if edit.proximity is not None:
        options = replace(options, damping=float(edit.proximity))
    with few_threads(_work(model, len(train), options)):
        problem = build_problem(model, train, queries, loss, options, device)
        remove = torch.as_tensor(remove).reshape(-1)
        b = removal_gradient(problem, unit, remove)
        inverse = HessianInverse(problem)
        removed = removed_tasks(problem, remove) if unit == "task" else []
        info: dict[str, Any]
        if remove.numel() == 0:
            delta, info = torch.zeros_like(problem.lam), {}
        elif edit.estimator == "first_order":
            delta, info = inverse.solve(b), {}
        elif edit.estimator == "newton":
            delta, info = inverse.solve_without(removed, b), {}
        else:
            delta, info = _proximal_delta(problem, inverse, unit, remove, removed, b, edit)
        diagnostics = _edit_diagnostics(problem, unit, remove, delta, edit, info)
    result = EditResult(problem.fm.state_dict(problem.lam + delta, model), diagnostics)
    return result


def _modified_tasks(problem: MetaProblem, unit: str, remove: torch.Tensor) -> list[TaskData]:
    if unit == "task":
        return reweighted_tasks(problem.train_tasks, task_scale={int(t): 0.0 for t in remove.tolist()})
    return reweighted_tasks(problem.train_tasks, row_scale={int(r): 0.0 for r in remove.tolist()})


def _proximal_delta(
    problem: MetaProblem,
    inverse: HessianInverse,
    unit: str,
    remove: torch.Tensor,
    removed: list[int],
    b: torch.Tensor,
    edit: EditOptions,
) -> tuple[torch.Tensor, dict[str, Any]]:
    anchor = train_gradients(problem).sum(0) + problem.options.outer_l2 * problem.lam

    def solve(g: torch.Tensor) -> torch.Tensor:
        return inverse.solve_without(removed, g) if unit == "task" else inverse.solve(g)

    tol = edit.tol * float(b.norm())
    result = chord_retrain(
        problem.fm,
        _modified_tasks(problem, unit, remove),
        problem.lam,
        problem.options,
        inverse.damping,
        solve,
        anchor=anchor,
        tol=tol,
        max_iter=edit.max_steps,
    )
    converged = result.gradient_norm <= tol
    if not converged:
        problem.warnings.append(
            f"the proximal retrain was not solved to tolerance in {edit.max_steps} chord steps "
            f"(‖∇‖ = {result.gradient_norm:.2e}); raise options.max_steps"
        )
    return result.lam - problem.lam, {
        "steps": result.iterations,
        "converged": converged,
        "gradient_norm_ratio": result.gradient_norm / max(float(b.norm()), 1e-300),
    }


def _objective_value(problem: MetaProblem, tasks: list[TaskData], lam: torch.Tensor) -> float:
    """Σ over tasks of the post-adaptation validation loss at λ (weights as in ``tasks``), plus the outer L2."""
    _, terms = objective_gradient(problem.fm, tasks, lam, problem.options)
    return sum(t.value() for t in terms) + 0.5 * problem.options.outer_l2 * float(lam @ lam)


def _edit_diagnostics(
    problem: MetaProblem, unit: str, remove: torch.Tensor, delta: torch.Tensor, edit: EditOptions, info: dict[str, Any]
) -> dict[str, Any]:
    new = problem.lam + delta
    relative = float(delta.norm()) / max(float(problem.lam.norm()), 1e-300)
    warnings = list(problem.warnings)
    if relative > edit.trust_radius:
        warnings.append(
            f"the edit moves the meta-parameters by {100 * relative:.1f}% of their norm (trust radius "
            f"{100 * edit.trust_radius:.0f}%): outside the region where a local estimate can be trusted"
        )
    diagnostics = {
        "estimator": edit.estimator,
        "unit": unit,
        "num_removed": int(remove.numel()),
        "proximity": problem.diagnostics.get("damping"),
        "proximity_rule": problem.diagnostics.get("damping_rule"),
        "step_norm": float(delta.norm()),
        "relative_step_norm": relative,
        "solver": info or None,
    }
    if remove.numel():
        tasks = _modified_tasks(problem, unit, remove)
        before, after = _objective_value(problem, tasks, problem.lam), _objective_value(problem, tasks, new)
        diagnostics.update({"remaining_loss_before": before, "remaining_loss_after": after})
        if after > before * 1.1 + 1e-12:
            warnings.append(f"the remaining tasks' outer loss rose from {before:.4g} to {after:.4g}")
    if problem.query_tasks:
        start = torch.tensor([t.value() for t in problem.query_terms], dtype=torch.float64)
        _, terms = objective_gradient(problem.fm, problem.query_tasks, new, problem.options)
        end = torch.tensor([t.value() for t in terms], dtype=torch.float64)
        diagnostics.update(
            {
                "query_loss_before_mean": float(start.mean()),
                "query_loss_after_mean": float(end.mean()),
                "query_loss_changes": [float(v) for v in (end - start)[:1000]],
            }
        )
    diagnostics["warnings"] = warnings
    return diagnostics
