"""Scalar functions of curvature eigenvalues used by SOURCE (docs/methods.md, source), applied elementwise.

For a segment with T steps at mean effective learning rate eta and eigenvalues Lambda >= 0:

    forgetting  E = exp(-eta T Lambda)                 (what the segment's later steps forget)
    unrolled    U = (1 - exp(-eta T Lambda)) / Lambda  (the segment's accumulated step, -> eta T as Lambda -> 0)

Both are computed in float64 and stay finite for Lambda = 0 and for very large eta T Lambda.
"""

from __future__ import annotations

import torch

SERIES_THRESHOLD = 1e-4


def forgetting(eigenvalues: torch.Tensor, horizon: float) -> torch.Tensor:
    """exp(-horizon * eigenvalues), horizon = eta T."""
    x = horizon * eigenvalues.to(torch.float64)
    return torch.exp(-x)


def phi1(x: torch.Tensor) -> torch.Tensor:
    """(1 - exp(-x)) / x, equal to 1 at x = 0; a series near 0, -expm1(-x)/x elsewhere."""
    x = x.to(torch.float64)
    small = x.abs() < SERIES_THRESHOLD
    safe = torch.where(small, torch.ones_like(x), x)
    exact = -torch.expm1(-safe) / safe
    series = 1.0 - x / 2.0 + x * x / 6.0 - x * x * x / 24.0
    return torch.where(small, series, exact)


def unrolled(eigenvalues: torch.Tensor, horizon: float) -> torch.Tensor:
    """(1 - exp(-horizon * eigenvalues)) / eigenvalues, = horizon * phi1(horizon * eigenvalues)."""
    values = eigenvalues.to(torch.float64)
    return horizon * phi1(horizon * values)
