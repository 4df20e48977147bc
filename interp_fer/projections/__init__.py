"""Deconvnet and guided-backprop projections (moved to :mod:`.api`; split next)."""

from .api import (
    ILL_CONDITIONED_MARGIN,
    Agreement,
    Engine,
    ExtremumMethod,
    Projections,
    deconvnet,
    extremum_points,
    guided_backprop,
    project,
    rf_agreement,
    rf_centres,
)

__all__ = [
    "ILL_CONDITIONED_MARGIN", "Agreement", "Engine", "ExtremumMethod", "Projections",
    "deconvnet", "extremum_points", "guided_backprop", "project", "rf_agreement", "rf_centres",
]
