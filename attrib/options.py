"""Typed method options for :meth:`attrib.Client.attribute`, and edit options for :meth:`attrib.Client.edit`
(plain dicts are accepted too).

Only the options you set are sent; the server fills in its defaults and refuses unknown ones with a 422.

>>> from attrib.options import Influence
>>> Influence(strategy="ekfac", damping=1e-3).to_json()
{'strategy': 'ekfac', 'damping': 0.001}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal


@dataclass(frozen=True)
class RequestOptions:
    """Options sent as a request's ``options``: only the ones set."""

    def to_json(self) -> dict[str, Any]:
        return {name: value for name, value in asdict(self).items() if value is not None}


@dataclass(frozen=True)
class MethodOptions(RequestOptions):
    method: ClassVar[str]


@dataclass(frozen=True)
class Influence(MethodOptions):
    """``method="influence"``: ∇f(z_q)ᵀ P ∇ℓ(z_i) with P the inverse damped curvature."""

    strategy: Literal["ekfac", "kfac", "diagonal", "identity", "exact", "cg", "lissa"] | None = None
    damping: float | None = None
    fisher: Literal["true", "empirical"] | None = None
    fisher_samples: int | None = None
    seed: int | None = None
    layers: list[str] | None = None
    curvature: Literal["gauss_newton", "hessian"] | None = None
    max_iter: int | None = None
    tol: float | None = None
    batch_size: int | None = None
    method: ClassVar[str] = "influence"


@dataclass(frozen=True)
class DataInf(MethodOptions):
    """``method="datainf"``: DataInf's closed form per layer."""

    damping: float | None = None
    layers: list[str] | None = None
    batch_size: int | None = None
    method: ClassVar[str] = "datainf"


@dataclass(frozen=True)
class GradientSimilarity(MethodOptions):
    """``method="gradient_similarity"``: gradient dot product, or cosine with ``normalize=True``."""

    normalize: bool | None = None
    layers: list[str] | None = None
    batch_size: int | None = None
    method: ClassVar[str] = "gradient_similarity"


@dataclass(frozen=True)
class TracIn(MethodOptions):
    """``method="tracin"``: TracInCP over the model's uploaded checkpoints."""

    stages: list[int] | None = None
    stage_datasets: dict[str, str] | None = None
    layers: list[str] | None = None
    batch_size: int | None = None
    method: ClassVar[str] = "tracin"


@dataclass(frozen=True)
class Source(MethodOptions):
    """``method="source"``: SOURCE, segmented unrolling over the model's checkpoints."""

    segments: int | Literal["stages"] | None = None
    stages: list[int] | None = None
    stage_datasets: dict[str, str] | None = None
    variant: Literal["full", "averaged_parameters"] | None = None
    damping: float | None = None
    fisher: Literal["true", "empirical"] | None = None
    fisher_samples: int | None = None
    seed: int | None = None
    layers: list[str] | None = None
    batch_size: int | None = None
    method: ClassVar[str] = "source"


@dataclass(frozen=True)
class Edit(RequestOptions):
    """Options of :meth:`attrib.Client.edit`: how the model retrained without the removed examples is estimated
    (the server's docs/editing.md says what each assumes). ``estimator``: ``newton`` (the default for most
    methods), ``proximal`` or ``first_order``; ``proximity``: λ of the proximal term (None: the L2 penalty the
    model's gradient shows, else a multiple of its mean curvature); ``newton_steps``: at most this many Gauss-Newton
    steps (None: two where the curvature's rows are stored, one matrix-free); ``reduction``: the retrain's loss over
    the remaining rows, ``mean`` (the default: as a model trained on its rows' mean loss) or ``sum``."""

    estimator: Literal["newton", "proximal", "first_order"] | None = None
    proximity: float | None = None
    newton_steps: int | None = None
    max_steps: int | None = None
    tol: float | None = None
    cg_max_iter: int | None = None
    trust_radius: float | None = None
    batch_size: int | None = None
    curvature_products: Literal["auto", "stored", "matrix_free"] | None = None
    curvature_tol: float | None = None
    line_search: Literal["boundary", "halving"] | None = None
    boundary_share: float | None = None
    preconditioner: Literal["auto", "kronecker", "none"] | None = None
    reduction: Literal["mean", "sum"] | None = None


def edit_options_json(options: Edit | dict[str, Any] | None) -> dict[str, Any]:
    """The edit request's ``options``: only the ones set (the server fills in its defaults)."""
    return options.to_json() if isinstance(options, Edit) else dict(options or {})


def method_and_options(
    method: str | None, options: MethodOptions | dict[str, Any] | None
) -> tuple[str, dict[str, Any]]:
    """The request's ``method`` and ``options``: a typed options object names its own method."""
    if isinstance(options, MethodOptions):
        if method is not None and method != options.method:
            raise ValueError(f"method={method!r} but the options are for {options.method!r}")
        return options.method, options.to_json()
    return method or "influence", dict(options or {})
