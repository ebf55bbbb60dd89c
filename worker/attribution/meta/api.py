"""Entry points of meta-learning influence used by the worker."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from worker.attribution.meta.influence import (HessianInverse, MetaProblem, build_problem, finish_diagnostics,
                                               instance_scores, meta_work, newton_task_scores, query_gradients,
                                               removal_gradient, removed_tasks, task_scores)
from worker.attribution.meta.options import MetaOptions
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


def attribute_meta(model: nn.Module, train: Examples, queries: Examples, *,
                   loss: Literal["cross_entropy", "mse"], unit: Literal["task", "instance"],
                   mode: Literal["pairwise", "aggregate"], top_k: int, options: MetaOptions,
                   progress: Progress = no_progress, device: torch.device | str | None = None) -> AttributionScores:
    """Task-IF or instance-IF of the training meta-dataset on the query tasks' post-adaptation loss.

    Scores are ΔQ on removal (positive = helpful). ``aggregate``: one score per unit for Q = Σ_q f_q.
    ``pairwise``: per query task (sorted ids), the top_k positive and negative units.
    """
    _check_request(unit, mode, top_k, options)
    with few_threads(_work(model, len(train), options)):
        return _attribute_meta(model, train, queries, loss=loss, unit=unit, mode=mode, top_k=top_k,
                               options=options, progress=progress, device=device)


def _scores(problem: MetaProblem, inverse: HessianInverse, query_grads: torch.Tensor, unit: str,
            progress: Progress) -> torch.Tensor:
    """(m, U) removal scores for query gradients (m, p): tasks or dataset rows as units."""
    if problem.options.removal == "newton":
        return newton_task_scores(problem, inverse, query_grads, progress).T
    directions = inverse.solve(query_grads.T)  # s_Q per query, (p, m)
    if unit == "task":
        return task_scores(problem, directions).T
    return torch.stack([instance_scores(problem, directions[:, q], progress, f"instance_scores_query_{q + 1}")
                        for q in range(directions.shape[1])])


def _attribute_meta(model: nn.Module, train: Examples, queries: Examples, *, loss: str, unit: str, mode: str,
                    top_k: int, options: MetaOptions, progress: Progress, device) -> AttributionScores:
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
        result.unit_task = train.task.detach().cpu().to(torch.long).reshape(-1)
        result.unit_split = train.split.detach().cpu().to(torch.long).reshape(-1)
    if mode == "aggregate":
        result.scores = scores[0].detach().cpu().float()
    else:
        result.topk = _topk(scores.detach().cpu(), top_k)
        result.query_task = torch.tensor([t.task_id for t in problem.query_tasks], dtype=torch.long)
    return result


def edit_meta(model: nn.Module, train: Examples, remove: torch.Tensor, *,
              loss: Literal["cross_entropy", "mse"], unit: Literal["task", "instance"], options: MetaOptions,
              device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """λ* + Σ Δλ_{−c} over the removed tasks (task ids) or instances (row indices), as a full state_dict.
    With ``removal='newton'`` (tasks): λ* + (H − Σ_S H_k + ρI)⁻¹ Σ_S g_k, the Newton step of the retrain."""
    if unit not in ("task", "instance"):
        raise AttributionError(f"meta edit unit must be 'task' or 'instance', got {unit!r}")
    with few_threads(_work(model, len(train), options)):
        problem = build_problem(model, train, None, loss, options, device)
        b = removal_gradient(problem, unit, torch.as_tensor(remove))
        inverse = HessianInverse(problem)
        if options.removal == "newton" and unit == "task":
            delta = inverse.solve_without(removed_tasks(problem, torch.as_tensor(remove)), b)
        else:
            delta = inverse.solve(b)
    return problem.fm.state_dict(problem.lam + delta, model)
