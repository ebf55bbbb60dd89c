"""Options of the engine's entry points: plain dataclasses with the documented defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from worker.attribution.types import AttributionError

FitStrategy = Literal["ekfac", "kfac", "diagonal", "identity"]  # curvatures that are a reusable fit
InfluenceStrategy = Literal["ekfac", "kfac", "diagonal", "identity", "exact", "cg", "lissa"]
FisherKind = Literal["true", "empirical"]
CurvatureKind = Literal["gauss_newton", "hessian"]

FIT_STRATEGIES: tuple[str, ...] = get_args(FitStrategy)
DEFAULT_FIT_MEMORY_BUDGET_BYTES = 1024**3  # cached per-example layer inputs / output gradients of a fit
EXACT_STRATEGIES: tuple[str, ...] = ("exact", "cg", "lissa")  # the rest of InfluenceStrategy


@dataclass
class FitOptions:
    """How a curvature approximation is fitted on the training data (damping is chosen at attribution)."""

    strategy: FitStrategy = "ekfac"
    fisher: FisherKind = "true"
    fisher_samples: int = 1
    seed: int = 0
    layers: list[str] | None = None
    batch_size: int = 256
    # Keep the training set's per-example layer inputs and loss output gradients with the fit (a training-
    # gradient index, saved with it) so that attributing on the same training set skips the training pass;
    # only for rank-one layers (Linear without sequence positions) and within ``memory_budget_bytes``.
    store_gradients: bool = True
    # Bytes of cached per-example (a, g) rows a fit may hold: the EK-FAC second pass reuses the first pass's
    # rows instead of re-running the model, and the index above. 0 turns both off.
    memory_budget_bytes: int = DEFAULT_FIT_MEMORY_BUDGET_BYTES

    def validate(self) -> None:
        check_memory_budget(self.memory_budget_bytes)
        if self.strategy not in FIT_STRATEGIES:
            raise AttributionError(f"unknown fit strategy {self.strategy!r}; expected one of {FIT_STRATEGIES}")
        if self.fisher not in ("true", "empirical"):
            raise AttributionError(f"fisher must be 'true' or 'empirical', got {self.fisher!r}")
        if self.fisher_samples < 1:
            raise AttributionError(f"fisher_samples must be >= 1, got {self.fisher_samples}")
        _check_batch_size(self.batch_size)


@dataclass
class InfluenceOptions:
    """Options of method ``influence``. ``damping`` None means 0.1 x the mean eigenvalue per layer
    (``exact``/``cg``/``lissa``: 0.1 x trace / D of the whole tracked curvature)."""

    strategy: InfluenceStrategy = "ekfac"
    damping: float | None = None
    fisher: FisherKind = "true"
    fisher_samples: int = 1
    seed: int = 0
    layers: list[str] | None = None
    curvature: CurvatureKind = "gauss_newton"
    max_iter: int = 100
    tol: float = 1e-6
    batch_size: int = 256

    def fit_options(self) -> FitOptions:
        """The fit-level part of these options (for the factor strategies)."""
        strategy = next((s for s in get_args(FitStrategy) if s == self.strategy), None)
        if strategy is None:
            raise AttributionError(f"strategy {self.strategy!r} has no reusable fit")
        return FitOptions(
            strategy=strategy,
            fisher=self.fisher,
            fisher_samples=self.fisher_samples,
            seed=self.seed,
            layers=None if self.layers is None else list(self.layers),
            batch_size=self.batch_size,
        )

    def validate(self) -> None:
        if self.strategy not in FIT_STRATEGIES + EXACT_STRATEGIES:
            raise AttributionError(f"unknown influence strategy {self.strategy!r}")
        if self.fisher not in ("true", "empirical"):
            raise AttributionError(f"fisher must be 'true' or 'empirical', got {self.fisher!r}")
        if self.fisher_samples < 1:
            raise AttributionError(f"fisher_samples must be >= 1, got {self.fisher_samples}")
        if self.curvature not in ("gauss_newton", "hessian"):
            raise AttributionError(f"curvature must be 'gauss_newton' or 'hessian', got {self.curvature!r}")
        if self.max_iter < 1:
            raise AttributionError(f"max_iter must be >= 1, got {self.max_iter}")
        if not self.tol > 0:
            raise AttributionError(f"tol must be > 0, got {self.tol}")
        check_damping(self.damping)
        _check_batch_size(self.batch_size)


@dataclass
class DataInfOptions:
    """Options of method ``datainf``. ``damping`` None: per layer 0.1 x mean_i ||g_il||^2 / d_l."""

    damping: float | None = None
    layers: list[str] | None = None
    batch_size: int = 256
    # the first training pass's per-example layer activities kept for the later two (see methods/datainf.py)
    memory_budget_bytes: int = DEFAULT_FIT_MEMORY_BUDGET_BYTES

    def validate(self) -> None:
        check_damping(self.damping)
        _check_batch_size(self.batch_size)
        check_memory_budget(self.memory_budget_bytes)


@dataclass
class GradientSimilarityOptions:
    """Options of method ``gradient_similarity``: the dot product of the tracked loss gradients (identity
    curvature), or their cosine with ``normalize``."""

    layers: list[str] | None = None
    batch_size: int = 256
    normalize: bool = False

    def validate(self) -> None:
        _check_batch_size(self.batch_size)


def check_memory_budget(memory_budget_bytes: int) -> None:
    if not isinstance(memory_budget_bytes, int) or memory_budget_bytes < 0:
        raise AttributionError(f"memory_budget_bytes must be a non-negative integer, got {memory_budget_bytes!r}")


def check_damping(damping: float | None) -> None:
    if damping is None:
        return
    if not isinstance(damping, (int, float)) or not float(damping) > 0 or float(damping) == float("inf"):
        raise AttributionError(f"damping must be a positive finite number, got {damping!r}")


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise AttributionError(f"batch_size must be >= 1, got {batch_size}")


EditEstimator = Literal["proximal", "newton", "first_order"]
EDIT_ESTIMATORS: tuple[str, ...] = ("proximal", "newton", "first_order")
CurvatureProducts = Literal["auto", "stored", "matrix_free"]
LineSearch = Literal["boundary", "halving"]
LINE_SEARCHES: tuple[str, ...] = ("boundary", "halving")
KeptReduction = Literal["mean", "sum"]
KEPT_REDUCTIONS: tuple[str, ...] = ("mean", "sum")
EditPreconditioner = Literal["auto", "kronecker", "none"]
EDIT_PRECONDITIONERS: tuple[str, ...] = ("auto", "kronecker", "none")
PRECONDITIONED_CG_ITERATIONS = 8  # CG products per solve by default with the Kronecker preconditioner
PLAIN_CG_ITERATIONS = 20  # and without it
# the ``boundary`` line search's step: this share of the way to the edge of the acceptable scales (chosen by
# benchmarks/edits_retraining.py on two models and checked on two held-out ones, see docs/editing.md)
DEFAULT_BOUNDARY_SHARE = 0.85
CURVATURE_PRODUCTS: tuple[str, ...] = ("auto", "stored", "matrix_free")
# λ of the auto proximity: this many times the mean Gauss-Newton eigenvalue trace(G)/D, computed from the rows of
# G's square root (chosen by benchmarks/edits_retraining.py on two models, checked on two held-out ones; until
# 2026-11-30 the fraction was 1 of a sampled estimate that came out at 0.64 of the trace on the CNN, docs/editing.md)
DEFAULT_PROXIMITY_FRACTION = 0.5
# λ of the auto proximity where the model shows the L2 penalty it was trained with: its own δ̂ = −⟨g₀, θ₀⟩/‖θ₀‖²,
# read off the data-loss gradient g₀ at its weights, when cos(g₀, −θ₀) is at least this (with λ = δ the proximal
# objective is that penalised retrain objective). Measured by benchmarks/implied_weight_decay.py: 0.72–0.99 on the
# benchmark's four models trained with L2, 0.29–0.55 on them trained without (docs/editing.md).
WEIGHT_DECAY_EVIDENCE = 0.65
# stored products: the share of the output-curvature weight whose smallest terms are left out (1e-4 until the
# seventh change of 2026-11-30: with two Gauss-Newton steps the CNN's edit at 1e-2 cost what one step cost at 1e-4,
# docs/editing.md)
DEFAULT_CURVATURE_TOL = 1e-2
# ``newton``'s Gauss-Newton steps where ``newton_steps`` is None (auto) and the rows of G are stored: a further step
# costs one linearisation (a pass over the remaining rows and the rows of G formed again) and a cheap solve; with
# matrix-free products it costs as much as the first step (its CG products), and auto takes one step
# (benchmarks/edits_retraining.py, docs/editing.md)
STORED_NEWTON_STEPS = 2


@dataclass
class EditOptions:
    """How an edit estimates the model retrained without some examples (docs/editing.md).

    ``proximal``: minimise the anchored proximal retrain objective J_S (worker/attribution/proximal.py) by
    Gauss-Newton steps; ``newton``: such a step from the current weights with a trust radius and a line search, and
    further ones (each linearised afresh at the point reached) while a line search stops short, at most
    ``newton_steps`` in all (None: STORED_NEWTON_STEPS where the rows of G are stored, else 1);
    ``first_order``: θ + (1/N) P Σ ∇ℓ with the attribution's own preconditioner P (its scoring damping).
    ``line_search``: how far along the Newton step (``newton``, and the first step of ``proximal``):
    ``boundary`` goes ``boundary_share`` of the way to the edge of the scales at which the proximal objective
    still decreases enough, at most the full step; ``halving`` takes the first such scale of 1, ½, ¼, …
    ``proximity`` None: the L2 penalty the model's own gradient shows, where it shows one clearly
    (``ProximalObjective.implied_weight_decay``, cosine at least WEIGHT_DECAY_EVIDENCE), else
    DEFAULT_PROXIMITY_FRACTION × the mean Gauss-Newton eigenvalue trace(G)/D at θ₀ (computed from the rows of a
    square root of G where they can be formed: ``ProximalObjective.mean_eigenvalue``).
    ``curvature_products``: how the Gauss-Newton products of the solves are computed: ``matrix_free`` (two
    backward passes over the kept rows each), ``stored`` (the rows of a square root of G kept in memory, leaving
    out terms worth at most ``curvature_tol`` of its trace, by default DEFAULT_CURVATURE_TOL), ``auto`` (stored
    where the model has few outputs per row, it fits in memory and it saves at least half the products' work,
    else matrix-free).
    ``preconditioner``: of the CG solves, ``kronecker`` (per layer, in the eigenbases of the Gram factors of the
    square-root rows of G: edit_preconditioner.py), ``none``, or ``auto`` (kronecker where the rows of G are
    stored, so fitting it costs no pass over the data; none with matrix-free products, where plain CG truncated
    at 20 products is part of the measured estimate). ``cg_max_iter`` None: PRECONDITIONED_CG_ITERATIONS with the
    preconditioner, PLAIN_CG_ITERATIONS without.
    ``reduction``: the loss the retrain minimises over the remaining rows: ``mean`` (Σ_{kept} w ℓ / |kept|, as a
    model trained on the mean loss is retrained: each remaining row then weighs N / |kept| times more against the
    penalty) or ``sum`` (Σ_{kept} w ℓ / N: each row keeps its weight, as for a loss summed over the rows).
    ``newton`` and ``proximal`` only (``first_order`` is the method's own step; meta methods have their own)."""

    estimator: EditEstimator = "newton"
    proximity: float | None = None
    max_steps: int = 5
    tol: float = 1e-3
    cg_max_iter: int | None = None
    cg_tol: float = 1e-3
    trust_radius: float = 1.0
    batch_size: int = 2048
    curvature_products: CurvatureProducts = "auto"
    curvature_tol: float = DEFAULT_CURVATURE_TOL
    line_search: LineSearch = "boundary"
    boundary_share: float = DEFAULT_BOUNDARY_SHARE
    preconditioner: EditPreconditioner = "auto"
    newton_steps: int | None = None
    reduction: KeptReduction = "mean"

    def validate(self) -> None:
        if self.reduction not in KEPT_REDUCTIONS:
            raise AttributionError(f"unknown reduction {self.reduction!r}; expected one of {KEPT_REDUCTIONS}")
        if self.preconditioner not in EDIT_PRECONDITIONERS:
            raise AttributionError(
                f"unknown preconditioner {self.preconditioner!r}; expected one of {EDIT_PRECONDITIONERS}"
            )
        if self.line_search not in LINE_SEARCHES:
            raise AttributionError(f"unknown line_search {self.line_search!r}; expected one of {LINE_SEARCHES}")
        if not 0 < self.boundary_share <= 1:
            raise AttributionError(f"boundary_share must lie in (0, 1], got {self.boundary_share}")
        if self.curvature_products not in CURVATURE_PRODUCTS:
            raise AttributionError(
                f"unknown curvature_products {self.curvature_products!r}; expected one of {CURVATURE_PRODUCTS}"
            )
        if not 0 <= self.curvature_tol < 1:
            raise AttributionError(f"curvature_tol must lie in [0, 1), got {self.curvature_tol}")
        if self.estimator not in EDIT_ESTIMATORS:
            raise AttributionError(f"unknown edit estimator {self.estimator!r}; expected one of {EDIT_ESTIMATORS}")
        check_damping(self.proximity)
        if self.max_steps < 1 or (self.cg_max_iter is not None and self.cg_max_iter < 1):
            raise AttributionError("max_steps and cg_max_iter must be >= 1")
        if not 0 < self.tol < 1 or not 0 < self.cg_tol < 1:
            raise AttributionError("tol and cg_tol must lie in (0, 1)")
        if self.newton_steps is not None and self.newton_steps < 1:
            raise AttributionError(f"newton_steps must be >= 1, got {self.newton_steps}")
        if not self.trust_radius > 0:
            raise AttributionError(f"trust_radius must be > 0, got {self.trust_radius}")
        _check_batch_size(self.batch_size)
