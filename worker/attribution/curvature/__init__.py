"""Curvature approximations: identity, diagonal, K-FAC, EK-FAC (fitted, serialisable) and exact solvers."""

from worker.attribution.curvature.base import Curvature, Preconditioner, load_curvature
from worker.attribution.curvature.diagonal import DiagonalCurvature
from worker.attribution.curvature.ekfac import EkfacCurvature
from worker.attribution.curvature.fit import fit_curvature
from worker.attribution.curvature.identity import IdentityCurvature
from worker.attribution.curvature.kfac import KfacCurvature

__all__ = [
    "Curvature",
    "DiagonalCurvature",
    "EkfacCurvature",
    "IdentityCurvature",
    "KfacCurvature",
    "Preconditioner",
    "fit_curvature",
    "load_curvature",
]
