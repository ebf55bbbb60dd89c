"""The one place where typed request options become the engine's option dataclasses.

Every field is named here, once. tests/service/test_method_registry.py checks that each option of each method
has a field of that name in the engine's dataclass (the trajectory methods' `stages` / `stage_datasets` are read
by the job, `worker.methods.stages`): an option the engine does not know fails that test, and mypy checks each
constructor call here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.schemas.options import FitSettings

if TYPE_CHECKING:
    from service.schemas.attributions import EditOptionsIn
    from worker.attribution import DataInfOptions as EngineDataInfOptions
    from worker.attribution import EditOptions, FitOptions
    from worker.attribution import GradientSimilarityOptions as EngineGradientSimilarityOptions
    from worker.attribution import InfluenceOptions as EngineInfluenceOptions
    from worker.attribution.meta import MetaOptions
    from worker.attribution.methods.source import SourceOptions as EngineSourceOptions
    from worker.attribution.methods.tracin import TracInOptions as EngineTracInOptions
    from worker.methods.base import EstimatorName
    from worker.methods.datainf import DataInfOptions
    from worker.methods.gradient_similarity import GradientSimilarityOptions
    from worker.methods.influence import InfluenceOptions
    from worker.methods.meta_common import MetaOptionsBase
    from worker.methods.source import SourceOptions
    from worker.methods.tracin import TracInOptions


def _layers(layers: list[str] | None) -> list[str] | None:
    return None if layers is None else list(layers)


def fit_options(settings: FitSettings) -> FitOptions:
    from worker.attribution import FitOptions

    return FitOptions(
        strategy=settings.strategy,
        fisher=settings.fisher,
        fisher_samples=settings.fisher_samples,
        seed=settings.seed,
        layers=_layers(settings.layers),
        batch_size=settings.batch_size,
    )


def influence_options(options: InfluenceOptions) -> EngineInfluenceOptions:
    from worker.attribution import InfluenceOptions as Engine

    return Engine(
        strategy=options.strategy,
        damping=options.damping,
        fisher=options.fisher,
        fisher_samples=options.fisher_samples,
        seed=options.seed,
        layers=_layers(options.layers),
        curvature=options.curvature,
        max_iter=options.max_iter,
        tol=options.tol,
        batch_size=options.batch_size,
    )


def datainf_options(options: DataInfOptions) -> EngineDataInfOptions:
    from worker.attribution import DataInfOptions as Engine

    return Engine(damping=options.damping, layers=_layers(options.layers), batch_size=options.batch_size)


def gradient_similarity_options(options: GradientSimilarityOptions) -> EngineGradientSimilarityOptions:
    from worker.attribution import GradientSimilarityOptions as Engine

    return Engine(layers=_layers(options.layers), batch_size=options.batch_size, normalize=options.normalize)


def tracin_options(options: TracInOptions) -> EngineTracInOptions:
    from worker.attribution.methods.tracin import TracInOptions as Engine

    return Engine(layers=_layers(options.layers), batch_size=options.batch_size)


def source_options(options: SourceOptions) -> EngineSourceOptions:
    from worker.attribution.methods.source import SourceOptions as Engine

    return Engine(
        segments=options.segments,
        variant=options.variant,
        damping=options.damping,
        fisher=options.fisher,
        fisher_samples=options.fisher_samples,
        seed=options.seed,
        layers=_layers(options.layers),
        batch_size=options.batch_size,
    )


def meta_options(options: MetaOptionsBase) -> MetaOptions:
    from worker.attribution.meta import InnerOptions, MetaOptions

    inner = options.inner
    return MetaOptions(
        inner=InnerOptions(
            mode=inner.mode,
            reg=inner.reg,
            steps=inner.steps,
            lr=inner.lr,
            ihvp=inner.ihvp,
            tol=inner.tol,
            max_iter=inner.max_iter,
        ),
        outer_l2=options.outer_l2,
        solver=options.solver,
        third_order=options.third_order,
        damping=options.damping,
        direct=options.direct,
        removal=options.removal,
        adapted_params=_layers(options.adapted_params),
        neumann_steps=options.neumann_steps,
        max_iter=options.max_iter,
        tol=options.tol,
    )


def edit_options(options: EditOptionsIn, default_estimator: EstimatorName) -> EditOptions:
    """The edit's options; estimator null = the method's default."""
    from worker.attribution import EditOptions

    return EditOptions(
        estimator=options.estimator or default_estimator,
        proximity=options.proximity,
        max_steps=options.max_steps,
        tol=options.tol,
        cg_max_iter=options.cg_max_iter,
        trust_radius=options.trust_radius,
        batch_size=options.batch_size,
        curvature_products=options.curvature_products,
        curvature_tol=options.curvature_tol,
        line_search=options.line_search,
        boundary_share=options.boundary_share,
        preconditioner=options.preconditioner,
        newton_steps=options.newton_steps,
        reduction=options.reduction,
    )
