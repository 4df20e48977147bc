"""Extremum points of projections, receptive-field centres, and how often the two agree.

Coordinates: (row, col) in the pixel grid of the preprocessed network input, pixel ``i``
covering ``[i - 0.5, i + 0.5)``; rows grow downwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .api import Projections

ExtremumMethod = Literal["centroid", "argmax", "rf"]


def extremum_points(
    projections: Projections | torch.Tensor,
    method: ExtremumMethod = "centroid",
    *,
    top: float = 0.01,
) -> torch.Tensor:
    """Location of each projection in input pixels: (N, K, 2) float (row, col).

    Parameters
    ----------
    projections
        A :class:`Projections`, or maps (N, K, c, H, W) for ``"centroid"`` / ``"argmax"``.
    method
        ``"centroid"`` (default): energy-weighted centroid of e = sum over input channels of
        |map|, restricted to its strongest pixels: those with e >= the ``ceil(top * H * W)``-th
        largest value (ties included) and e > 0. ``"argmax"``: the pixel of largest e (first in
        row-major order). ``"rf"``: the receptive-field centre of the channel's arg-max unit
        (no projection needed; can lie outside the image for padded layers).
    top
        Share of the input pixels kept by ``"centroid"``.

    Returns
    -------
    torch.Tensor
        (N, K, 2) float64 (row, col) in the preprocessed input's pixel grid (pixel i covers
        [i - 0.5, i + 0.5)); NaN for inactive channels (all-zero maps).
    """
    if method == "rf":
        if not isinstance(projections, Projections) or projections.receptive_field is None:
            raise ValueError("method='rf' needs a Projections whose layer has a known "
                             "receptive field")
        return rf_centres(projections)
    maps = projections.maps if isinstance(projections, Projections) else projections
    if maps.ndim != 5:
        raise ValueError(f"maps must be (N, K, c, H, W), got {tuple(maps.shape)}")
    energy = maps.detach().abs().sum(dim=2)  # (N, K, H, W)
    n, k, h, w = energy.shape
    flat = energy.flatten(2)
    if method == "argmax":
        position = flat.argmax(dim=2)
        points = torch.stack([position // w, position % w], dim=-1).double()
    elif method == "centroid":
        if not 0 < top <= 1:
            raise ValueError(f"top must be in (0, 1], got {top}")
        points = _top_centroids(flat, max(1, math.ceil(top * h * w)), w)
    else:
        raise ValueError(f"method must be 'centroid', 'argmax' or 'rf', not {method!r}")
    empty = flat.amax(dim=2) <= 0
    return points.masked_fill(empty[..., None], float("nan")).cpu()


def _top_centroids(flat: torch.Tensor, keep: int, width: int) -> torch.Tensor:
    """(N, K, 2) float64 centroid of the positive values >= the ``keep``-th largest.

    Sums over the ``keep`` largest values only; rows where more values tie with the
    threshold (a positive one) are summed over their whole map.
    """
    values, index = flat.topk(keep, dim=2)
    weight = values.clamp_min(0).double()
    rows, cols = (index // width).double(), (index % width).double()
    points = torch.stack([(weight * rows).sum(2), (weight * cols).sum(2)], -1) \
        / weight.sum(2)[..., None]
    threshold = values[..., -1:]
    tied = (((flat >= threshold).sum(2) > keep) & (threshold[..., 0] > 0)).nonzero(as_tuple=True)
    if len(tied[0]):
        some = flat[tied].double()
        weight = torch.where(some >= threshold[tied].double(), some, 0.0)
        position = torch.arange(some.shape[1], device=flat.device)
        rows, cols = (position // width).double(), (position % width).double()
        points[tied] = torch.stack([(weight * rows).sum(1), (weight * cols).sum(1)], -1) \
            / weight.sum(1)[:, None]
    return points


def rf_centres(projections: Projections) -> torch.Tensor:
    """Receptive-field centre of each channel's arg-max unit: (N, K, 2) float64 (row, col)."""
    field = projections.receptive_field
    if field is None:
        raise ValueError(f"layer {projections.layer!r}: receptive field unknown")
    units = projections.units.double().cpu()
    rows, cols = field.centre(units[..., 0], units[..., 1])
    points = torch.stack([rows, cols], dim=-1)
    return points.masked_fill(~projections.active.cpu()[..., None], float("nan"))


@dataclass
class Agreement:
    """How often the receptive-field centre agrees with the projection's extremum point.

    Attributes
    ----------
    rate
        Share of active (image, channel) pairs whose two points are within ``threshold``.
    distances
        (N, K) Euclidean distance in input pixels (NaN for inactive channels).
    threshold
        Distance in input pixels under which the two points agree.
    count
        Number of active pairs the rate is computed on.
    """

    rate: float
    distances: torch.Tensor
    threshold: float
    count: int


def rf_agreement(projections: Projections, threshold: float | None = None, *,
                 method: ExtremumMethod = "centroid", top: float = 0.01) -> Agreement:
    """Share of (image, channel) pairs where the cheap receptive-field centre is right.

    Parameters
    ----------
    projections
        Result of :func:`deconvnet` (or :func:`guided_backprop`).
    threshold
        Agreement distance in input pixels (Euclidean, inclusive). Default: half the
        layer's receptive-field stride, at least 1 pixel, i.e. the projection's point lies in
        the feature-map cell that the arg-max unit stands for.
    method, top
        How the projection's point is computed (see :func:`extremum_points`).
    """
    field = projections.receptive_field
    if field is None:
        raise ValueError(f"layer {projections.layer!r}: receptive field unknown")
    if threshold is None:
        threshold = max(1.0, 0.5 * max(field.rows.stride, field.cols.stride))
    centre = rf_centres(projections)
    point = extremum_points(projections, method, top=top)
    distances = (centre - point).norm(dim=-1)
    known = ~torch.isnan(distances)
    count = int(known.sum())
    rate = float((distances[known] <= threshold).double().mean()) if count else float("nan")
    return Agreement(rate, distances, float(threshold), count)
