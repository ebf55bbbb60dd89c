"""Task-IF and instance-IF (docs/methods.md, meta methods): s_Q = (H + ρI)⁻¹ ∇Q, scores, damping and edits (first order, or the
Newton step with H − Σ_S H_k for removed tasks)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from worker.attribution.meta.data import TaskData, split_tasks
from worker.attribution.meta.functional import FunctionalModel
from worker.attribution.meta.options import MetaOptions, validate_options
from worker.attribution.meta.solvers import (
    DenseSPD,
    NonPositiveCurvature,
    SolveInfo,
    conjugate_gradient,
    extreme_eigenvalues,
    neumann_series,
)
from worker.attribution.meta.total import TaskTerm, TotalProblem, make_term
from worker.attribution.threads import eigh_work, few_threads
from worker.attribution.types import AttributionError, Examples, Progress, no_progress, tensor_sum

FLOAT64_MAX_PARAMS = 200_000
POWER_ITERATIONS = 30
STATIONARITY_WARNING = 0.1


@dataclass
class MetaProblem:
    """Everything computed once at λ*: per-task terms of the training and query tasks, and F."""

    fm: FunctionalModel
    options: MetaOptions
    lam: torch.Tensor
    train_tasks: list[TaskData]
    terms: list[TaskTerm]
    total: TotalProblem
    num_rows: int
    query_tasks: list[TaskData] = field(default_factory=list)
    query_terms: list[TaskTerm] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    train_task_gradients: list[torch.Tensor] = field(default_factory=list)  # g_k of each training task

    @property
    def task_ids(self) -> list[int]:
        return [t.task_id for t in self.train_tasks]


def _build_terms(
    fm: FunctionalModel, tasks: list[TaskData], lam: torch.Tensor, options: MetaOptions, stage: str, progress: Progress
) -> list[TaskTerm]:
    terms = []
    for i, task in enumerate(tasks):
        terms.append(make_term(fm, task, lam, options.inner, options.direct))
        progress(stage, i + 1, len(tasks))
    return terms


def meta_work(num_params: int, rows: int, options: MetaOptions) -> float:
    """Rough multiply-adds of the largest single operation: a vmapped per-task product over all p tangents
    (exact solver) or one product (matrix-free), and the p × p eigendecomposition of the exact solver.
    Meta influence is many such small operations; below SMALL_WORK they run on one intra-op thread, which on
    a loaded machine is an order of magnitude faster (threads.py) and changes results only by rounding."""
    if options.solver == "exact":
        return max(float(rows) * num_params * num_params, eigh_work(num_params))
    return float(rows) * num_params


def build_problem(
    model: nn.Module,
    train: Examples,
    queries: Examples | None,
    loss: str,
    options: MetaOptions,
    device: torch.device | str | None = None,
    progress: Progress = no_progress,
) -> MetaProblem:
    """Solve every inner problem at λ* (the model's parameters) and check stationarity of F."""
    validate_options(options)
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with few_threads(meta_work(num_params, len(train), options)):
        return _build_problem(model, train, queries, loss, options, device, progress)


def _build_problem(
    model: nn.Module,
    train: Examples,
    queries: Examples | None,
    loss: str,
    options: MetaOptions,
    device: torch.device | str | None,
    progress: Progress,
) -> MetaProblem:
    device = torch.device(device) if device is not None else next(model.parameters()).device
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dtype = torch.float64 if num_params <= FLOAT64_MAX_PARAMS else torch.float32
    fm = FunctionalModel(model, loss, options.adapted_params, dtype, device)
    lam = fm.flat_lambda()
    if not torch.isfinite(lam).all():
        raise AttributionError("the model's parameters contain NaN or infinite values")
    train_tasks = split_tasks(train, loss, dtype, device, "train")
    query_tasks = split_tasks(queries, loss, dtype, device, "query") if queries is not None else []
    terms = _build_terms(fm, train_tasks, lam, options, "inner_train_tasks", progress)
    query_terms = _build_terms(fm, query_tasks, lam, options, "inner_query_tasks", progress)
    total = TotalProblem(terms, lam, options.outer_l2, options.third_order)
    problem = MetaProblem(fm, options, lam, train_tasks, terms, total, len(train), query_tasks, query_terms)
    _stationarity_diagnostics(problem)
    return problem


def _stationarity_diagnostics(problem: MetaProblem) -> None:
    grads = [t.total_grad() for t in problem.terms]
    full = tensor_sum(grads) + problem.options.outer_l2 * problem.lam
    if not torch.isfinite(full).all():
        raise AttributionError("NaN in the total gradients of the training tasks")
    norms = sorted(float(g.norm()) for g in grads)
    median = norms[len(norms) // 2] if len(norms) % 2 else 0.5 * (norms[len(norms) // 2 - 1] + norms[len(norms) // 2])
    ratio = float(full.norm()) / median if median > 0 else math.inf
    residuals = [t.inner_residual for t in problem.terms + problem.query_terms]
    d = problem.diagnostics
    d.update(
        {
            "num_parameters": problem.fm.num_lambda,
            "num_adapted_parameters": problem.fm.num_theta,
            "num_train_tasks": len(problem.terms),
            "num_query_tasks": len(problem.query_terms),
            "dtype": str(problem.fm.dtype).replace("torch.", ""),
            "inner_mode": problem.options.inner.mode,
            "total_gradient_norm": float(full.norm()),
            "median_task_gradient_norm": median,
            "stationarity_ratio": ratio if math.isfinite(ratio) else None,
            "inner_residuals": residuals,
            "inner_residual_max": max(residuals) if residuals else 0.0,
        }
    )
    if ratio > STATIONARITY_WARNING:
        problem.warnings.append(
            f"λ* is not a stationary point of the outer objective: ‖∇F(λ*)‖ = {float(full.norm()):.3e} is "
            f"{ratio:.2f} × the median task gradient norm (> {STATIONARITY_WARNING}); influence estimates assume "
            "a trained meta-model (check outer_l2 and that the model was trained with these inner settings)"
        )
    problem.train_task_gradients = grads


class HessianInverse:
    """(H + ρI)⁻¹ for the chosen solver, with ρ from options.damping or the auto rule (docs/methods.md, meta methods)."""

    def __init__(self, problem: MetaProblem, progress: Progress = no_progress) -> None:
        self.problem = problem
        self.options = problem.options
        self.total = problem.total
        self.iterations: list[int] = []
        self.residuals: list[float] = []
        self.dense: DenseSPD | None = None
        self.work = meta_work(problem.fm.num_lambda, problem.num_rows, self.options)
        with few_threads(self.work):
            if self.options.solver == "exact":
                self._init_dense(progress)
            else:
                self._init_matrix_free(progress)
        d = problem.diagnostics
        d.update(
            {
                "solver": self.options.solver,
                "third_order": self.options.third_order,
                "direct": self.options.direct,
                "removal": self.options.removal,
                "damping": self.damping,
                "damping_rule": self.damping_rule,
                "lambda_min": self.lambda_min,
                "lambda_max": self.lambda_max,
                "gamma": self.total.gamma,
            }
        )

    def _init_dense(self, progress: Progress) -> None:
        if self.problem.fm.num_lambda > 5000:
            raise AttributionError(
                f"solver 'exact' forms the dense total Hessian and supports at most 5000 "
                f"parameters; the model has {self.problem.fm.num_lambda}: use 'cg' or 'neumann'"
            )
        p = self.problem.fm.num_lambda
        lam = self.problem.lam
        progress("total_hessian", 0, len(self.total.terms))
        per_task = self.total.dense_all()
        progress("total_hessian", len(self.total.terms), len(self.total.terms))
        self.per_task = per_task  # dense H_k (exact solver only)
        h = sum(per_task) + self.options.outer_l2 * torch.eye(p, dtype=lam.dtype, device=lam.device)
        self.hessian = 0.5 * (h + h.T)
        self.dense = DenseSPD(self.hessian, "the total Hessian")
        self.lambda_min, self.lambda_max = self.dense.min_eigenvalue, self.dense.max_eigenvalue
        if self.options.damping is not None:
            self.damping, self.damping_rule = float(self.options.damping), "given"
            return
        worst = min(0.0, self.lambda_min)
        for h_k in per_task:
            worst = min(worst, float(torch.linalg.eigvalsh(self.hessian - 0.5 * (h_k + h_k.T))[0]))
        self.damping = max(1.2 * abs(worst), 1e-3 * abs(self.lambda_max))
        self.damping_rule = "auto: max(1.2·max_k |min(0, λ_min(H − H_k))|, 1e-3·λ_max(H))"

    def _init_matrix_free(self, progress: Progress) -> None:
        like = self.problem.lam
        progress("power_iteration", 0, 2)
        self.lambda_min, self.lambda_max = extreme_eigenvalues(self.total.hvp, like.numel(), POWER_ITERATIONS, like)
        progress("power_iteration", 2, 2)
        if self.options.damping is not None:
            self.damping, self.damping_rule = float(self.options.damping), "given"
        else:
            self.damping = max(1e-3 * abs(self.lambda_max), 1.1 * abs(min(0.0, self.lambda_min)))
            self.damping_rule = "auto (matrix-free fallback): max(1e-3·λ̂_max, 1.1·|min(0, λ̂_min)|)"

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.total.hvp(v) + self.damping * v

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """(H + ρI)⁻¹ b for b of shape (p,) or, with the exact solver, (p, m)."""
        with few_threads(self.work):
            return self._solve(b)

    def _solve(self, b: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return self.dense.solve(b, self.damping)
        if b.dim() == 2:
            return torch.stack([self._solve(col) for col in b.T], dim=1)
        if self.options.solver == "neumann":
            return self._solve_neumann(b)
        return self._solve_cg(b)

    def _solve_cg(self, b: torch.Tensor) -> torch.Tensor:
        for attempt in range(6):
            try:
                x, info = conjugate_gradient(
                    self._matvec, b, self.options.tol, self.options.max_iter, "total Hessian solve (H + ρI)⁻¹b"
                )
                self._record(info)
                return x
            except NonPositiveCurvature as exc:
                if self.options.damping is not None or attempt == 5:
                    raise AttributionError(f"{exc} with damping ρ = {self.damping:.3e}; raise options.damping") from exc
                self.damping = 2.0 * self.damping + 1.1 * abs(exc.curvature)
                self.problem.diagnostics["damping"] = self.damping
                self.problem.warnings.append(
                    f"H + ρI was not positive definite in CG; auto damping raised to {self.damping:.3e}"
                )
        raise AssertionError("unreachable")

    def solve_without(self, removed: list[int], b: torch.Tensor) -> torch.Tensor:
        """(H − Σ_{k ∈ removed} H_k + ρI)⁻¹ b: the Newton step of the proximal retrain without those tasks."""
        what = f"the total Hessian without task(s) {[self.problem.task_ids[k] for k in removed]} + damping"
        with few_threads(self.work):
            if self.dense is not None:
                reduced = self.hessian - sum(0.5 * (self.per_task[k] + self.per_task[k].T) for k in removed)
                return DenseSPD(reduced, what).solve(b, self.damping)

            def matvec(v: torch.Tensor) -> torch.Tensor:
                return self._matvec(v) - sum(self.total.task_hvp(k, v) for k in removed)

            try:
                x, info = conjugate_gradient(matvec, b, self.options.tol, self.options.max_iter, what)
            except NonPositiveCurvature as exc:
                raise AttributionError(f"{exc} with damping ρ = {self.damping:.3e}; raise options.damping") from exc
            self._record(info)
            return x

    def _solve_neumann(self, b: torch.Tensor) -> torch.Tensor:
        top = self.lambda_max + self.damping
        if top <= 0:
            raise AttributionError(
                "the damped total Hessian has no positive eigenvalue estimate; raise options.damping"
            )
        eta = 1.0 / (1.05 * top)
        x, info = neumann_series(
            self._matvec, b, eta, self.options.neumann_steps, self.options.tol, "total Hessian solve (Neumann)"
        )
        self._record(info)
        if info.relative_residual > 1e-2:
            self.problem.warnings.append(
                f"Neumann series truncated at {info.iterations} steps with relative residual {info.relative_residual:.2e} "
                "(acts as extra damping); raise neumann_steps or use solver 'cg'"
            )
        return x

    def _record(self, info: SolveInfo) -> None:
        self.iterations.append(info.iterations)
        self.residuals.append(info.relative_residual)
        self.problem.diagnostics["solver_iterations"] = list(self.iterations)
        self.problem.diagnostics["solver_relative_residuals"] = list(self.residuals)


# ----- query gradients -----
def query_gradients(problem: MetaProblem) -> torch.Tensor:
    """(Q, p): total gradient of each query task's post-adaptation validation loss."""
    if not problem.query_terms:
        raise AttributionError("meta influence needs a query dataset with at least one task")
    return torch.stack([t.total_grad() for t in problem.query_terms])


def train_gradients(problem: MetaProblem) -> torch.Tensor:
    """(K, p): total gradient g_k of each training task."""
    return torch.stack(problem.train_task_gradients)


# ----- scores for one direction s = s_Q -----
def task_scores(problem: MetaProblem, s: torch.Tensor) -> torch.Tensor:
    """ΔQ_{−k} = s_Q·g_k for every training task (positive = helpful). ``s`` is (p,) or (p, m)."""
    return train_gradients(problem) @ s


def newton_task_scores(
    problem: MetaProblem, inverse: HessianInverse, query_grads: torch.Tensor, progress: Progress = no_progress
) -> torch.Tensor:
    """ΔQ_{−k} = ∇Qᵀ (H − H_k + ρI)⁻¹ g_k for every training task: (K, m) for query gradients (m, p)."""
    grads = train_gradients(problem)
    columns = []
    for k in range(len(grads)):
        columns.append(query_grads @ inverse.solve_without([k], grads[k]))
        progress("newton_removal", k + 1, len(grads))
    return torch.stack(columns)


def instance_scores(
    problem: MetaProblem, s: torch.Tensor, progress: Progress = no_progress, stage: str = "instance_scores"
) -> torch.Tensor:
    """ΔQ on removing each training-dataset row (train and validation instances), in dataset order."""
    out = torch.zeros(problem.num_rows, dtype=s.dtype, device=s.device)
    for k, term in enumerate(problem.terms):
        out[term.task.rows_val] = term.val_scores(s)
        out[term.task.rows_tr] = term.train_scores(s)
        progress(stage, k + 1, len(problem.terms))
    if not torch.isfinite(out).all():
        raise AttributionError("NaN in the instance influence scores")
    return out


# ----- editing -----
def removed_tasks(problem: MetaProblem, remove: torch.Tensor) -> list[int]:
    """Positions (in problem.terms) of the task ids ``remove``, each once; unknown ids are an error."""
    index = {tid: k for k, tid in enumerate(problem.task_ids)}
    ids = set(remove.reshape(-1).to(torch.long).cpu().tolist())
    unknown = sorted(ids - set(index))
    if unknown:
        raise AttributionError(f"tasks {unknown} are not in the training dataset (its tasks are {problem.task_ids})")
    return [index[tid] for tid in sorted(ids)]


def removal_gradient(problem: MetaProblem, unit: str, remove: torch.Tensor) -> torch.Tensor:
    """b = Σ_{c removed} c ∂_c ∇F(λ*), so that Σ Δλ_{−c} = (H + ρI)⁻¹ b (first order, additive)."""
    remove = remove.reshape(-1).to(torch.long).cpu()
    b = torch.zeros_like(problem.lam)
    if unit == "task":
        grads = train_gradients(problem)
        for k in removed_tasks(problem, remove):
            b = b + grads[k]
        return b
    if remove.numel() and (int(remove.min()) < 0 or int(remove.max()) >= problem.num_rows):
        raise AttributionError(f"instance rows to remove must be in [0, {problem.num_rows}); got {remove.tolist()}")
    mask = torch.zeros(problem.num_rows, dtype=torch.bool)
    mask[remove] = True
    mask = mask.to(problem.lam.device)
    for term in problem.terms:
        m_tr = term.task.w_tr * mask[term.task.rows_tr]
        m_val = term.task.w_val * mask[term.task.rows_val]
        if bool((m_tr != 0).any()) or bool((m_val != 0).any()):
            b = b + term.removal_gradient(m_tr, m_val)
    return b


def finish_diagnostics(problem: MetaProblem) -> dict[str, Any]:
    d = dict(problem.diagnostics)
    d["warnings"] = list(problem.warnings)
    return d
