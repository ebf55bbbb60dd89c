"""The attribution engine: a plain PyTorch library (no HTTP, database or queue code).

score(q, i) = grad f(z_q)^T P grad l(z_i) (1/N-free), f = the query's loss or minus its margin;
positive = training example i helps query q. See docs/ for the methods.
"""

from worker.attribution.attribute import attribute
from worker.attribution.curvature.base import Curvature, Preconditioner, load_curvature
from worker.attribution.curvature.fit import fit_curvature
from worker.attribution.editing import CurvatureScale, EditResult, assess_edit, edit_parameters, retrain_objective_edit
from worker.attribution.hooks import trackable_layers
from worker.attribution.options import (
    DataInfOptions,
    EditOptions,
    FitOptions,
    GradientSimilarityOptions,
    InfluenceOptions,
)
from worker.attribution.types import (
    AttributionError,
    AttributionScores,
    Cancelled,
    Examples,
    Progress,
    TopK,
    no_progress,
)

__all__ = [
    "AttributionError",
    "AttributionScores",
    "Cancelled",
    "Curvature",
    "CurvatureScale",
    "DataInfOptions",
    "EditOptions",
    "EditResult",
    "Examples",
    "FitOptions",
    "GradientSimilarityOptions",
    "InfluenceOptions",
    "Preconditioner",
    "Progress",
    "TopK",
    "assess_edit",
    "attribute",
    "edit_parameters",
    "fit_curvature",
    "load_curvature",
    "no_progress",
    "retrain_objective_edit",
    "trackable_layers",
]
