"""Options of meta-learning influence (docs/methods.md, meta methods)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from worker.attribution.types import AttributionError


@dataclass
class InnerOptions:
    """How each task adapts the meta-parameters λ into task parameters θ_i(λ)."""

    mode: Literal["implicit_proximal", "unrolled"] = "implicit_proximal"
    reg: float = 1.0  # r of the proximal term (r/2)‖θ − λ‖²
    steps: int = 5  # K of the unrolled mode
    lr: float = 0.1  # α of the unrolled mode
    ihvp: Literal["dense", "cg", "ekfac"] = "cg"  # inner A⁻¹x (implicit mode); ekfac approximates A by EK-FAC
    tol: float = 1e-6  # stationarity tolerance ‖∂_θ L_I‖ and inner CG relative tolerance
    max_iter: int = 100  # Newton iterations of the inner solve and CG iterations of inner solves


@dataclass
class MetaOptions:
    """Options of task-IF / instance-IF."""

    inner: InnerOptions = field(default_factory=InnerOptions)
    outer_l2: float = 0.0  # δ_o
    solver: Literal["exact", "cg", "neumann"] = "cg"  # total-Hessian solve
    third_order: Literal["exact", "gamma", "drop"] = "exact"
    damping: float | None = None  # ρ; None = "auto" (docs/methods.md, meta methods)
    direct: bool = False  # direct-IF baseline: θ' = I, H = Σ ∇²L_O
    # task removal: "first_order" Δλ = (H + ρI)⁻¹ g_k (the paper's task-IF); "newton" Δλ = (H − H_k + ρI)⁻¹ g_k,
    # the Newton step of the proximal leave-one-out retrain (one solve per task; exact or cg solver)
    removal: Literal["first_order", "newton"] = "first_order"
    adapted_params: list[str] | None = None  # names adapted in the inner loop (default all)
    neumann_steps: int = 1000
    max_iter: int = 200  # total-Hessian CG iterations / power iterations bound
    tol: float = 1e-8  # relative residual of the total-Hessian solve


def validate_options(options: MetaOptions) -> None:
    """Reject option values that cannot be used, with a message naming the option."""
    inner = options.inner
    if inner.mode not in ("implicit_proximal", "unrolled"):
        raise AttributionError(f"options.inner.mode must be 'implicit_proximal' or 'unrolled', got {inner.mode!r}")
    if inner.ihvp not in ("dense", "cg", "ekfac"):
        raise AttributionError(f"options.inner.ihvp must be 'dense', 'cg' or 'ekfac', got {inner.ihvp!r}")
    if inner.mode == "implicit_proximal" and not inner.reg > 0:
        raise AttributionError(f"options.inner.reg must be > 0 for implicit_proximal, got {inner.reg}")
    if inner.mode == "unrolled" and (inner.steps < 1 or not inner.lr > 0):
        raise AttributionError(
            f"unrolled inner mode needs steps >= 1 and lr > 0, got steps={inner.steps}, lr={inner.lr}"
        )
    if not inner.tol > 0 or inner.max_iter < 1:
        raise AttributionError("options.inner.tol must be > 0 and options.inner.max_iter >= 1")
    if options.solver not in ("exact", "cg", "neumann"):
        raise AttributionError(f"options.solver must be 'exact', 'cg' or 'neumann', got {options.solver!r}")
    if options.third_order not in ("exact", "gamma", "drop"):
        raise AttributionError(f"options.third_order must be 'exact', 'gamma' or 'drop', got {options.third_order!r}")
    if options.removal not in ("first_order", "newton"):
        raise AttributionError(f"options.removal must be 'first_order' or 'newton', got {options.removal!r}")
    if options.removal == "newton" and options.solver == "neumann":
        raise AttributionError(
            "options.removal='newton' needs solver 'exact' or 'cg' (one solve with H − H_k per task)"
        )
    if options.outer_l2 < 0:
        raise AttributionError(f"options.outer_l2 must be >= 0, got {options.outer_l2}")
    if options.damping is not None and not options.damping >= 0:
        raise AttributionError(f"options.damping must be >= 0 or null (auto), got {options.damping}")
    if options.neumann_steps < 1 or options.max_iter < 1 or not options.tol > 0:
        raise AttributionError("options.neumann_steps and options.max_iter must be >= 1 and options.tol > 0")
