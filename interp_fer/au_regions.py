"""Facial Action Unit regions: reviewed data in ``landmarks/au_regions.json``, made geometry here.

The data file (installed as ``interp_fer.landmarks/au_regions.json``) defines, per AU, its FACS
name, muscles, the dlib landmarks it is anchored to, a shape built from those landmarks with
offsets in IOD units (inter-ocular distance, between the eye centres), its expected size and
its sources. This module validates the file and turns the definitions into

* polygons in pixel space for one face's 68 landmarks (:meth:`AURegions.polygons`);
* boolean masks on any grid: the image's pixel grid or a feature map's ``h x w`` grid laid
  over the image (:meth:`AURegions.masks`, :func:`grid_points`);
* the face region (:meth:`AURegions.face_polygon`) and each region's share of the face's area,
  the chance rate of a random point on the face falling in the region
  (:meth:`AURegions.area_shares`);
* sham regions, AU1's disc at non-AU places, from ``sham_regions.json`` in the same schema
  (:func:`load_sham_regions`), a control for "where a channel looks";
* how much of each region a face cut by the image frame loses (:func:`region_clipping`).

Coordinates are ``(x, y)`` pixels (dlib's convention, pixel centres at integers); arrays that
are images or grids are indexed ``[row, col]`` = ``[y, x]``. The face frame: ``ex`` = unit
vector from the image-left eye centre to the image-right eye centre, ``ey`` = ``ex`` turned
90 degrees towards the chin; an offset ``[dx, dy]`` means ``IOD * (dx * ex + dy * ey)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .faces import MIRROR_INDEX, N_LANDMARKS, eye_centres
from .landmark_files import (
    check_au_key,
    check_fields,
    check_sources,
    field_error,
    load_data_file,
)

DATA_FILE = "au_regions.json"
SHAM_FILE = "sham_regions.json"

#: Vertices used for a full circle when discs, sectors and band ends become polygons.
CIRCLE_VERTICES = 64

_SHAPE_FIELDS = {
    "polygon": ({"type", "points"}, {"holes"}),
    "disc": ({"type", "center", "radius"}, set()),
    "sector": ({"type", "center", "radius", "angles"}, {"inner_radius"}),
    "band": ({"type", "points", "half_width"}, set()),
}
_AU_FIELDS = ({"name", "muscles", "bilateral", "anchors", "shape", "size", "sources"}, {"notes"})
_MAX_OFFSET = 3.0  # IOD; anything larger is a unit mistake (pixels or percent), not a face part
_MAX_RADIUS = 2.0  # IOD


class AURegionError(ValueError):
    """The AU region data is invalid; the message names the AU and the field."""


# --------------------------------------------------------------------------------------------
# Polygons
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Polygon:
    """A simple polygon with optional holes, ``(x, y)`` vertices in pixels.

    Attributes
    ----------
    exterior
        ``(K, 2)`` float array (not closed: the last vertex is not repeated).
    holes
        ``(K_i, 2)`` arrays cut out of the exterior.
    """

    exterior: np.ndarray
    holes: tuple[np.ndarray, ...] = ()

    @property
    def area(self) -> float:
        """Area in square pixels: exact (shoelace) without holes, else a fine raster count.

        With holes the raster handles a hole that reaches outside the exterior (e.g. the
        mouth opening of a thin-lipped face) where exterior-minus-hole areas would not.
        """
        if not self.holes:
            return _shoelace(self.exterior)
        lo, hi = self.exterior.min(axis=0), self.exterior.max(axis=0)
        step = max(hi - lo) / 400
        xs = np.arange(lo[0] + step / 2, hi[0], step)
        ys = np.arange(lo[1] + step / 2, hi[1], step)
        pts = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
        return float(self.contains(pts).sum() * step * step)

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Which ``(N, 2)`` ``(x, y)`` points lie inside (exterior and not in a hole)."""
        inside = _inside(self.exterior, points)
        for hole in self.holes:
            inside &= ~_inside(hole, points)
        return inside

    def transformed(self, fn: Any) -> Polygon:
        """The polygon with ``fn`` applied to every ``(K, 2)`` vertex array."""
        return Polygon(fn(self.exterior), tuple(fn(h) for h in self.holes))


def _shoelace(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _inside(vertices: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test (matplotlib's C implementation)."""
    from matplotlib.path import Path as MplPath

    if len(points) == 0:
        return np.zeros(0, dtype=bool)
    return MplPath(vertices).contains_points(points)


def _self_intersects(ring: np.ndarray) -> bool:
    """Whether two non-adjacent edges of a closed polygon cross (proper crossings)."""
    a = ring
    b = np.roll(ring, -1, axis=0)
    n = len(ring)

    def orient(p, q, r):  # sign of the turn p -> q -> r, for all edge pairs at once
        return np.sign((q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1])
                       - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0]))

    i, j = np.triu_indices(n, k=2)
    keep = ~((i == 0) & (j == n - 1))  # the last edge touches the first
    i, j = i[keep], j[keep]
    o1, o2 = orient(a[i], b[i], a[j]), orient(a[i], b[i], b[j])
    o3, o4 = orient(a[j], b[j], a[i]), orient(a[j], b[j], b[i])
    return bool(np.any((o1 * o2 < 0) & (o3 * o4 < 0)))


def convex_hull(points: np.ndarray) -> np.ndarray:
    """Convex hull of ``(N, 2)`` points, counter-clockwise in ``(x, y)`` (Andrew's chain).

    Returns
    -------
    numpy.ndarray
        ``(K, 2)`` hull vertices.
    """
    pts = np.unique(np.asarray(points, dtype=float), axis=0)
    if len(pts) < 3:
        return pts

    def half(seq: np.ndarray) -> list[np.ndarray]:
        chain: list[np.ndarray] = []
        for p in seq:
            while len(chain) >= 2:
                a, b = chain[-2], chain[-1]
                if (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]) > 0:
                    break
                chain.pop()
            chain.append(p)
        return chain

    lower, upper = half(pts), half(pts[::-1])
    return np.array(lower[:-1] + upper[:-1])


# --------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------


def grid_points(
    image_shape: Sequence[int], grid: Sequence[int] | None = None, supersample: int = 1
) -> np.ndarray:
    """``(x, y)`` image coordinates of the sample points of a grid laid over an image.

    A grid of ``h x w`` cells covers the image exactly: cell ``[i, j]`` spans columns
    ``j * W / w`` to ``(j + 1) * W / w`` of the image (edge coordinates, in which pixel ``c``
    spans ``c - 0.5 .. c + 0.5`` around its centre ``c``), and likewise for rows. Each cell
    is sampled at ``supersample x supersample`` evenly spaced points (its centre when 1).

    Parameters
    ----------
    image_shape
        ``(H, W)`` of the image (extra trailing dimensions are ignored).
    grid
        ``(h, w)`` of the grid, e.g. a layer's feature-map size; default the pixel grid.
    supersample
        Sample points per cell along each axis.

    Returns
    -------
    numpy.ndarray
        ``(h, w, s * s, 2)`` float array of ``(x, y)``.
    """
    height, width = int(image_shape[0]), int(image_shape[1])
    h, w = (height, width) if grid is None else (int(grid[0]), int(grid[1]))
    if min(height, width, h, w, supersample) < 1:
        raise ValueError(f"empty image {image_shape} or grid {grid} or supersample {supersample}")
    sub = (np.arange(supersample) + 0.5) / supersample  # fractions inside a cell
    xs = ((np.arange(w)[:, None] + sub[None, :]) * (width / w) - 0.5)  # (w, s)
    ys = ((np.arange(h)[:, None] + sub[None, :]) * (height / h) - 0.5)  # (h, s)
    gx = np.broadcast_to(xs[None, :, None, :], (h, w, supersample, supersample))
    gy = np.broadcast_to(ys[:, None, :, None], (h, w, supersample, supersample))
    return np.stack([gx, gy], axis=-1).reshape(h, w, supersample * supersample, 2)


def polygons_mask(
    polygons: Sequence[Polygon],
    image_shape: Sequence[int],
    grid: Sequence[int] | None = None,
    *,
    mode: Literal["centre", "overlap", "fraction"] = "centre",
    supersample: int | None = None,
) -> np.ndarray:
    """Rasterise a union of polygons on the pixel grid or a feature-map grid.

    Parameters
    ----------
    polygons
        Polygons in ``(x, y)`` pixel coordinates of the image.
    image_shape
        ``(H, W)`` of the image the polygons live in.
    grid
        ``(h, w)`` grid laid over the image (see :func:`grid_points`); default the pixels.
    mode
        ``"centre"``: a cell is in when its centre is inside (the pixel-grid convention);
        ``"overlap"``: when any part of it is (sampled finely, plus every cell holding a
        polygon vertex, so that a region smaller than a cell still marks the cells it
        touches); ``"fraction"``: the covered fraction of each cell (float).
    supersample
        Samples per cell and axis for ``overlap``/``fraction``; default enough for about
        four samples per image pixel, at least 4.

    Returns
    -------
    numpy.ndarray
        ``(h, w)`` bool (``centre``, ``overlap``) or float (``fraction``) array, ``[row, col]``.
    """
    height, width = int(image_shape[0]), int(image_shape[1])
    h, w = (height, width) if grid is None else (int(grid[0]), int(grid[1]))
    if mode == "centre":
        s = 1
    elif mode in ("overlap", "fraction"):
        s = supersample or max(4, math.ceil(2 * max(height / h, width / w)))
    else:
        raise ValueError(f"mode must be 'centre', 'overlap' or 'fraction', not {mode!r}")
    pts = grid_points((height, width), (h, w), s).reshape(-1, 2)
    inside = np.zeros(len(pts), dtype=bool)
    for poly in polygons:
        # Only points in the polygon's bounding box can be inside: test those (exact, and
        # an order of magnitude faster for the small AU regions).
        lo, hi = poly.exterior.min(axis=0), poly.exterior.max(axis=0)
        near = np.flatnonzero(((pts >= lo) & (pts <= hi)).all(axis=1))
        inside[near] |= poly.contains(pts[near])
    inside = inside.reshape(h, w, s * s)
    if mode == "centre":
        return inside[..., 0]
    if mode == "fraction":
        return inside.mean(axis=-1)
    out = inside.any(axis=-1)
    for poly in polygons:  # cells holding a vertex: regions thinner than the sampling
        v = poly.exterior
        col = np.floor((v[:, 0] + 0.5) * w / width).astype(int)
        row = np.floor((v[:, 1] + 0.5) * h / height).astype(int)
        ok = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        out[row[ok], col[ok]] = True
    return out


# --------------------------------------------------------------------------------------------
# Face frame and shapes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaceFrame:
    """The face's axes: ``ex`` along the eye line, ``ey`` towards the chin, ``iod`` pixels."""

    ex: np.ndarray
    ey: np.ndarray
    iod: float

    @classmethod
    def of(cls, landmarks: np.ndarray) -> FaceFrame:
        """Frame of one face's ``(68, 2)`` landmarks."""
        left, right = eye_centres(landmarks)
        d = right - left
        iod = float(np.hypot(*d))
        if not np.isfinite(iod) or iod <= 0:
            raise ValueError("landmarks have coincident or missing eye centres (IOD = 0 or NaN)")
        ex = d / iod
        return cls(ex, np.array([-ex[1], ex[0]]), iod)

    def offset(self, dx: float, dy: float) -> np.ndarray:
        """Pixel displacement of an offset given in IOD units in the face frame."""
        return self.iod * (dx * self.ex + dy * self.ey)


def _point(spec: Mapping[str, Any], lm: np.ndarray, frame: FaceFrame, mirror: bool) -> np.ndarray:
    at = spec["at"]
    idx = [at] if isinstance(at, int) else list(at)
    if mirror:
        idx = [MIRROR_INDEX[i] for i in idx]
    dx, dy = spec.get("offset", (0.0, 0.0))
    return lm[idx].mean(axis=0) + frame.offset(-dx if mirror else dx, dy)


def _arc(centre: np.ndarray, radius: float, frame: FaceFrame, a0: float, a1: float,
         n: int) -> np.ndarray:
    """Points on a circle of ``radius`` IOD from angle a0 to a1 (degrees, face frame)."""
    t = np.radians(np.linspace(a0, a1, n))
    return (centre[None, :] + frame.iod * radius
            * (np.cos(t)[:, None] * frame.ex[None, :] + np.sin(t)[:, None] * frame.ey[None, :]))


def _band(points: np.ndarray, half: float) -> np.ndarray:
    """Outline of a polyline thickened by ``half`` pixels, with round ends (simple polylines)."""
    seg = np.diff(points, axis=0)
    seg_len = np.linalg.norm(seg, axis=1, keepdims=True)
    if np.any(seg_len == 0):
        raise ValueError("band polyline has repeated points")
    normals = np.stack([-seg[:, 1], seg[:, 0]], axis=1) / seg_len  # left of the direction
    # vertex normals: mean of adjacent segment normals, lengthened (miter) up to 2x
    vn = np.concatenate([normals[:1], normals[:-1] + normals[1:], normals[-1:]])
    vn /= np.linalg.norm(vn, axis=1, keepdims=True)
    cos = np.concatenate([[1.0], np.einsum("ij,ij->i", vn[1:-1], normals[1:]), [1.0]])
    vn *= (1 / np.clip(cos, 0.5, 1.0))[:, None]
    left, right = points + half * vn, points - half * vn
    k = CIRCLE_VERTICES // 2

    def cap(centre: np.ndarray, start: np.ndarray) -> np.ndarray:
        """Half circle from the point ``start`` around ``centre`` (clockwise in (x, y))."""
        a = math.atan2(*(start - centre)[::-1])
        t = a - np.linspace(0, math.pi, k + 1)[1:-1]
        return centre + half * np.stack([np.cos(t), np.sin(t)], axis=1)

    end_cap = cap(points[-1], left[-1])
    start_cap = cap(points[0], right[0])
    return np.concatenate([left, end_cap, right[::-1], start_cap])


def _shape_polygon(shape: Mapping[str, Any], lm: np.ndarray, frame: FaceFrame,
                   mirror: bool) -> Polygon:
    kind = shape["type"]
    if kind == "polygon":
        ext = np.array([_point(p, lm, frame, mirror) for p in shape["points"]])
        holes = tuple(np.array([_point(p, lm, frame, mirror) for p in hole])
                      for hole in shape.get("holes", []))
        return Polygon(ext, holes)
    if kind == "disc":
        c = _point(shape["center"], lm, frame, mirror)
        return Polygon(_arc(c, shape["radius"], frame, 0, 360, CIRCLE_VERTICES + 1)[:-1])
    if kind == "sector":
        c = _point(shape["center"], lm, frame, mirror)
        a0, a1 = shape["angles"]
        if mirror:
            a0, a1 = 180 - a1, 180 - a0
        n = max(3, int(CIRCLE_VERTICES * (a1 - a0) / 360) + 2)
        outer = _arc(c, shape["radius"], frame, a0, a1, n)
        r0 = shape.get("inner_radius", 0.0)
        inner = _arc(c, r0, frame, a1, a0, n) if r0 > 0 else c[None, :]
        return Polygon(np.concatenate([outer, inner]))
    if kind == "band":
        pts = np.array([_point(p, lm, frame, mirror) for p in shape["points"]])
        return Polygon(_band(pts, shape["half_width"] * frame.iod))
    raise AssertionError(f"unvalidated shape type {kind!r}")  # validation rejects these


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _err(au: str, field: str, problem: str) -> AURegionError:
    return field_error(AURegionError, au, field, problem)


_check_fields = partial(check_fields, error=AURegionError)


def _number(value: Any, au: str, field: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _err(au, field, f"must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise _err(au, field, f"{value} is outside {lo}..{hi} (units are IOD)")
    return float(value)


def _check_index(i: Any, au: str, field: str) -> int:
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < N_LANDMARKS:
        raise _err(au, field, f"unknown landmark index {i!r} (0-based iBUG indices are 0..67)")
    return i


def _check_point(p: Any, au: str, field: str) -> set[int]:
    _check_fields(p, {"at"}, {"offset"}, au, field)
    at = p["at"]
    idx = [at] if not isinstance(at, list) else at
    if not idx:
        raise _err(au, f"{field}.at", "empty landmark list")
    used = {_check_index(i, au, f"{field}.at") for i in idx}
    if "offset" in p:
        off = p["offset"]
        if not isinstance(off, list) or len(off) != 2:
            raise _err(au, f"{field}.offset", f"must be [dx, dy] in IOD, got {off!r}")
        for v in off:
            _number(v, au, f"{field}.offset", -_MAX_OFFSET, _MAX_OFFSET)
    return used


def _check_points(points: Any, au: str, field: str, minimum: int) -> set[int]:
    if not isinstance(points, list) or len(points) < minimum:
        raise _err(au, field, f"needs at least {minimum} points, got "
                   f"{len(points) if isinstance(points, list) else points!r}")
    used: set[int] = set()
    for k, p in enumerate(points):
        used |= _check_point(p, au, f"{field}[{k}]")
    return used


def _check_shape(shape: Any, au: str) -> set[int]:
    if not isinstance(shape, Mapping) or shape.get("type") not in _SHAPE_FIELDS:
        kind = shape.get("type") if isinstance(shape, Mapping) else shape
        raise _err(au, "shape.type", f"must be one of {', '.join(_SHAPE_FIELDS)}, got {kind!r}")
    required, optional = _SHAPE_FIELDS[shape["type"]]
    _check_fields(shape, required, optional, au, "shape")
    kind = shape["type"]
    if kind == "polygon":
        used = _check_points(shape["points"], au, "shape.points", 3)
        holes = shape.get("holes", [])
        if not isinstance(holes, list):
            raise _err(au, "shape.holes", "must be a list of point lists")
        for k, hole in enumerate(holes):
            used |= _check_points(hole, au, f"shape.holes[{k}]", 3)
        return used
    if kind == "band":
        _number(shape["half_width"], au, "shape.half_width", 1e-3, _MAX_RADIUS)
        return _check_points(shape["points"], au, "shape.points", 2)
    used = _check_point(shape["center"], au, "shape.center")
    r = _number(shape["radius"], au, "shape.radius", 1e-3, _MAX_RADIUS)
    if kind == "sector":
        r0 = _number(shape.get("inner_radius", 0.0), au, "shape.inner_radius", 0.0, _MAX_RADIUS)
        if r0 >= r:
            raise _err(au, "shape.inner_radius", f"{r0} is not below radius {r}")
        angles = shape["angles"]
        if not isinstance(angles, list) or len(angles) != 2:
            raise _err(au, "shape.angles", f"must be [from, to] in degrees, got {angles!r}")
        a0, a1 = (_number(a, au, "shape.angles", -360, 720) for a in angles)
        if not 0 < a1 - a0 <= 360:
            raise _err(au, "shape.angles", f"[{a0}, {a1}] is empty or more than a turn")
    return used


def _check_size(size: Any, au: str) -> None:
    _check_fields(size, {"area", "bounds"}, set(), au, "size")
    area = _number(size["area"], au, "size.area", 1e-4, 10.0)
    bounds = size["bounds"]
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise _err(au, "size.bounds", f"must be [low, high] in IOD^2, got {bounds!r}")
    lo, hi = (_number(b, au, "size.bounds", 0.0, 10.0) for b in bounds)
    if not lo <= area <= hi:
        raise _err(au, "size.bounds", f"[{lo}, {hi}] does not contain area {area}")


def _check_reference(meta: Mapping[str, Any]) -> np.ndarray:
    """The reference face's (68, 2) points (IOD units, face frame)."""
    block = meta["reference_face"]
    points = block.get("points") if isinstance(block, Mapping) else None
    try:
        arr = np.asarray(points, dtype=float)
    except (TypeError, ValueError):
        arr = np.empty(0)
    if arr.shape != (N_LANDMARKS, 2) or not np.isfinite(arr).all():
        raise _err("_meta", "reference_face.points", "must be 68 [x, y] pairs")
    return arr


def validate(data: Any, kind: Literal["au", "sham"] = "au") -> None:
    """Check AU region data; raise :class:`AURegionError` naming the AU and field.

    Checks: the ``_meta`` block (version, conventions with unit ``IOD``, sources, face,
    reference face); per AU: required and unknown fields, FACS name, muscles, landmark indices
    in 0..67, ``anchors`` equal to the indices the shape uses, shape parameters in IOD
    ranges, sources that ``_meta.sources`` defines, and a non-empty, non-self-intersecting
    shape whose area on the reference face matches ``size.area`` within bounds.

    ``kind="sham"`` checks a file of sham regions (``sham_regions.json``): the same schema
    with keys ``sham_<place>`` (lower-case letters and ``_``) instead of AU numbers, and
    ``muscles`` that may be empty (a sham targets none).
    """
    if not isinstance(data, Mapping):
        raise AURegionError("AU region data must be a JSON object")
    meta = data.get("_meta")
    _check_fields(meta, {"version", "description", "conventions", "face", "sources",
                         "reference_face"}, set(), "_meta", "_meta")
    conventions = meta["conventions"]
    if not isinstance(conventions, Mapping) or conventions.get("unit") != "IOD":
        raise _err("_meta", "conventions.unit", "must be 'IOD' (offsets and sizes in "
                   "inter-ocular distances)")
    if not isinstance(meta["sources"], Mapping) or not meta["sources"]:
        raise _err("_meta", "sources", "must map source keys to references")
    if not isinstance(meta["face"], Mapping):
        raise _err("_meta", "face", "must be an object")
    _number(meta["face"].get("forehead_margin"), "_meta", "face.forehead_margin", 0.0,
            _MAX_OFFSET)
    reference = _check_reference(meta)
    aus = [k for k in data if k != "_meta"]
    if kind not in ("au", "sham"):
        raise ValueError(f"kind must be 'au' or 'sham', not {kind!r}")
    if not aus:
        raise AURegionError("no AU regions defined" if kind == "au" else
                            "no sham regions defined")
    seen: dict[int, str] = {}
    for au in aus:
        if kind == "sham":
            if not _is_sham_key(au):
                raise _err(au, "(key)", "sham keys are 'sham_' + a place in lower-case "
                           "letters and '_', e.g. 'sham_cheek'")
        else:
            check_au_key(au, seen, error=AURegionError)
        spec = data[au]
        _check_fields(spec, *_AU_FIELDS, au, "(region)")
        if not isinstance(spec["name"], str) or not spec["name"].strip():
            raise _err(au, "name", "must be the FACS name" if kind == "au" else
                       "must say what the sham is")
        muscles = spec["muscles"]
        if not isinstance(muscles, list) or (kind == "au" and not muscles) or not all(
                isinstance(m, str) and m for m in muscles):
            raise _err(au, "muscles", "must be a non-empty list of names" if kind == "au"
                       else "must be a list of names (empty: the sham targets none)")
        if not isinstance(spec["bilateral"], bool):
            raise _err(au, "bilateral", f"must be true or false, got {spec['bilateral']!r}")
        used = _check_shape(spec["shape"], au)
        anchors = spec["anchors"]
        if not isinstance(anchors, list) or not anchors:
            raise _err(au, "anchors", "must be a non-empty list of landmark indices")
        declared = {_check_index(i, au, "anchors") for i in anchors}
        if declared != used:
            raise _err(au, "anchors", f"{sorted(declared)} differ from the landmarks the shape "
                       f"uses {sorted(used)}")
        check_sources(spec["sources"], meta["sources"], au, error=AURegionError)
        _check_size(spec["size"], au)
        _check_geometry(au, spec, reference)


def _is_sham_key(key: str) -> bool:
    place = key[len("sham_"):]
    return (key.startswith("sham_") and bool(place) and place[0].isalpha()
            and all(c.islower() or c == "_" for c in place))


def _check_geometry(au: str, spec: Mapping[str, Any], reference: np.ndarray) -> None:
    """The shape must be a real, simple region on the reference face."""
    frame = FaceFrame.of(reference)
    sides = (False, True) if spec["bilateral"] else (False,)
    try:
        polys = [_shape_polygon(spec["shape"], reference, frame, m) for m in sides]
    except ValueError as exc:
        raise _err(au, "shape", str(exc)) from exc
    for poly in polys:
        if _shoelace(poly.exterior) < 1e-4:
            raise _err(au, "shape", "has no area on the reference face (points coincide or "
                       "are collinear)")
        for ring in (poly.exterior, *poly.holes):
            if _self_intersects(ring):
                raise _err(au, "shape", "outline crosses itself on the reference face "
                           "(points out of order?)")
    area = sum(p.area for p in polys)
    stated = spec["size"]["area"]
    if abs(area - stated) > 0.03 * area + 1e-3:
        raise _err(au, "size.area", f"states {stated} IOD^2 but the shape covers {area:.4f} "
                   "IOD^2 on the reference face")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AURegion:
    """One AU's definition (from the data file); for a sham region, ``au`` is its name
    (``"sham_cheek"``) and ``number`` is None."""

    au: str
    number: int | None
    name: str
    muscles: tuple[str, ...]
    bilateral: bool
    anchors: tuple[int, ...]
    shape: Mapping[str, Any]
    area: float
    area_bounds: tuple[float, float]
    sources: tuple[str, ...]
    notes: str = ""

    @property
    def all_anchors(self) -> tuple[int, ...]:
        """Anchor landmarks of both sides (mirror partners added for bilateral regions)."""
        if not self.bilateral:
            return self.anchors
        return tuple(sorted(set(self.anchors) | {MIRROR_INDEX[i] for i in self.anchors}))

    def polygons(self, landmarks: np.ndarray, frame: FaceFrame | None = None) -> list[Polygon]:
        """The region's polygon(s) for one face's ``(68, 2)`` landmarks (one per side)."""
        lm = np.asarray(landmarks, dtype=float)
        frame = frame or FaceFrame.of(lm)
        sides = (False, True) if self.bilateral else (False,)
        return [_shape_polygon(self.shape, lm, frame, m) for m in sides]


class AURegions:
    """Validated AU region definitions, and their geometry on faces.

    Parameters
    ----------
    data
        Parsed ``au_regions.json`` content (validated here).
    kind
        ``"sham"`` for sham regions (``sham_regions.json``: keys are names such as
        ``"sham_cheek"``, kept in file order; see :func:`load_sham_regions`).
    """

    def __init__(self, data: Mapping[str, Any], kind: Literal["au", "sham"] = "au") -> None:
        validate(data, kind)
        self.kind = kind
        self.data = copy.deepcopy(dict(data))
        self.meta = self.data["_meta"]
        self.forehead_margin = float(self.meta["face"]["forehead_margin"])
        self.reference_face = np.asarray(self.meta["reference_face"]["points"], dtype=float)
        regions = []
        for au, spec in self.data.items():
            if au == "_meta":
                continue
            regions.append(AURegion(
                au=au, number=int(au[2:]) if kind == "au" else None, name=spec["name"], muscles=tuple(spec["muscles"]),
                bilateral=spec["bilateral"], anchors=tuple(sorted(spec["anchors"])),
                shape=spec["shape"], area=float(spec["size"]["area"]),
                area_bounds=tuple(spec["size"]["bounds"]), sources=tuple(spec["sources"]),
                notes=spec.get("notes", "")))
        if kind == "au":
            regions.sort(key=lambda r: r.number)
        self.regions = {r.au: r for r in regions}

    @classmethod
    def from_file(cls, path: str | Path, kind: Literal["au", "sham"] = "au") -> AURegions:
        """Load and validate a region file (errors name the file)."""
        return load_data_file(path, DATA_FILE, lambda data: cls(data, kind), "AU region data",
                              AURegionError)

    # -- mapping-like access ---------------------------------------------------------------
    def __getitem__(self, au: str | int) -> AURegion:
        key = au if isinstance(au, str) else f"AU{au:02d}"
        if key not in self.regions:
            raise KeyError(f"no region for {key}; defined: {', '.join(self.regions)}")
        return self.regions[key]

    def __iter__(self) -> Iterator[AURegion]:
        return iter(self.regions.values())

    def __len__(self) -> int:
        return len(self.regions)

    @property
    def names(self) -> list[str]:
        """AU keys in numeric order (``"AU01"``, ``"AU02"``, ...); sham names in file order."""
        return list(self.regions)

    def _select(self, aus: Sequence[str | int] | None) -> list[AURegion]:
        return list(self.regions.values()) if aus is None else [self[a] for a in aus]

    # -- geometry ----------------------------------------------------------------------------
    def polygons(self, landmarks: np.ndarray,
                 aus: Sequence[str | int] | None = None) -> dict[str, list[Polygon]]:
        """Every region's polygons in pixels for one face.

        Parameters
        ----------
        landmarks
            ``(68, 2)`` ``(x, y)`` pixel coordinates.
        aus
            Subset of AUs (keys or numbers); default all.

        Returns
        -------
        dict
            AU key -> list of :class:`Polygon` (two for bilateral regions).
        """
        lm = _check_landmarks(landmarks)
        frame = FaceFrame.of(lm)
        return {r.au: r.polygons(lm, frame) for r in self._select(aus)}

    def face_polygon(self, landmarks: np.ndarray) -> Polygon:
        """The face: convex hull of the landmarks and of the brows raised by the margin."""
        lm = _check_landmarks(landmarks)
        frame = FaceFrame.of(lm)
        forehead = lm[17:27] + frame.offset(0.0, -self.forehead_margin)
        return Polygon(convex_hull(np.concatenate([lm, forehead])))

    def masks(
        self,
        landmarks: np.ndarray,
        image_shape: Sequence[int],
        grid: Sequence[int] | None = None,
        *,
        aus: Sequence[str | int] | None = None,
        mode: Literal["centre", "overlap", "fraction"] = "centre",
    ) -> dict[str, np.ndarray]:
        """Region masks on the image's pixel grid or a feature-map grid.

        Parameters
        ----------
        landmarks
            ``(68, 2)`` ``(x, y)`` pixel coordinates in the image.
        image_shape
            ``(H, W)`` of that image.
        grid
            ``(h, w)`` of a feature map laid over the image; default the pixel grid.
        aus
            Subset of AUs; default all.
        mode
            See :func:`polygons_mask` (``"overlap"`` for coarse layers: the cells a region
            touches).

        Returns
        -------
        dict
            AU key -> ``(h, w)`` array indexed ``[row, col]``.
        """
        polys = self.polygons(landmarks, aus)
        return {au: polygons_mask(p, image_shape, grid, mode=mode) for au, p in polys.items()}

    def face_mask(self, landmarks: np.ndarray, image_shape: Sequence[int],
                  grid: Sequence[int] | None = None, *,
                  mode: Literal["centre", "overlap", "fraction"] = "centre") -> np.ndarray:
        """The face region (:meth:`face_polygon`) as a mask; arguments as :meth:`masks`."""
        return polygons_mask([self.face_polygon(landmarks)], image_shape, grid, mode=mode)

    def areas(self, landmarks: np.ndarray, aus: Sequence[str | int] | None = None,
              unit: Literal["px", "iod"] = "iod") -> dict[str, float]:
        """Area of each region (exact polygon area), in IOD^2 or square pixels."""
        lm = _check_landmarks(landmarks)
        scale = FaceFrame.of(lm).iod ** 2 if unit == "iod" else 1.0
        return {au: sum(p.area for p in polys) / scale
                for au, polys in self.polygons(lm, aus).items()}

    def area_shares(self, landmarks: np.ndarray, aus: Sequence[str | int] | None = None,
                    samples: int = 200) -> dict[str, float]:
        """Share of the face's area inside each region: the chance rate of a random point.

        Computed on a fine raster of the face's bounding box (``samples`` points across),
        counting only region parts inside the face; independent of any image grid.
        """
        lm = _check_landmarks(landmarks)
        face = self.face_polygon(lm)
        lo, hi = face.exterior.min(axis=0), face.exterior.max(axis=0)
        step = max(hi - lo) / samples
        xs, ys = np.arange(lo[0], hi[0], step), np.arange(lo[1], hi[1], step)
        pts = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
        pts = pts[face.contains(pts)]
        out = {}
        for au, polys in self.polygons(lm, aus).items():
            inside = np.zeros(len(pts), dtype=bool)
            for p in polys:
                inside |= p.contains(pts)
            out[au] = float(inside.mean())
        return out


def _check_landmarks(landmarks: np.ndarray) -> np.ndarray:
    lm = np.asarray(landmarks, dtype=float)
    if lm.shape != (N_LANDMARKS, 2):
        raise ValueError(f"expected (68, 2) landmarks, got shape {lm.shape}")
    if not np.isfinite(lm).all():
        raise ValueError("landmarks contain NaN or inf (no face found in this image?)")
    return lm


@lru_cache(maxsize=2)
def _default_regions(filename: str = DATA_FILE, kind: Literal["au", "sham"] = "au"
                     ) -> AURegions:
    return load_data_file(None, filename, lambda data: AURegions(data, kind), "AU region data",
                          AURegionError)


def load_au_regions(path: str | Path | None = None) -> AURegions:
    """The AU region definitions, validated.

    Parameters
    ----------
    path
        A region file; default the one installed with the package (read once, then cached).

    Returns
    -------
    AURegions
    """
    return _default_regions() if path is None else AURegions.from_file(path)


def load_sham_regions(path: str | Path | None = None) -> AURegions:
    """Sham regions: AU1's disc at places no AU region covers (cheek, side of the nose,
    forehead, jaw), validated like the AU regions.

    A control for "where a channel looks": a sham must win no more often than chance.
    The result has the :class:`AURegions` API with names (``"sham_cheek"``, ...) as keys.

    Parameters
    ----------
    path
        A sham region file; default the one installed with the package
        (``interp_fer.landmarks/sham_regions.json``, read once, then cached).

    Returns
    -------
    AURegions
        With ``kind == "sham"``.
    """
    if path is None:
        return _default_regions(SHAM_FILE, "sham")
    return AURegions.from_file(path, "sham")


def region_clipping(regions: AURegions, landmarks: np.ndarray, image_shape: Sequence[int],
                    samples: int = 200) -> dict[str, float]:
    """Share of each region's area that lies outside the image (a face cut by the frame).

    Masks are clipped to the image already; this says how much of each region was lost, so
    that faces with e.g. the chin below the frame can be flagged and counted.

    Parameters
    ----------
    regions
        :class:`AURegions` (AU or sham regions).
    landmarks
        ``(68, 2)`` ``(x, y)`` pixels of the face in the image (points may lie outside it).
    image_shape
        ``(H, W)`` of the image; it spans ``-0.5 .. W - 0.5`` and ``-0.5 .. H - 0.5`` in
        ``(x, y)`` (pixel centres at integers).
    samples
        Raster points across each region's bounding box (the share is exact to about
        ``1 / samples``; a region wholly inside gives exactly 0).

    Returns
    -------
    dict
        Region key -> share in ``[0, 1]`` (0 = fully inside the image).
    """
    height, width = int(image_shape[0]), int(image_shape[1])
    out = {}
    for name, polys in regions.polygons(landmarks).items():
        every = np.concatenate([p.exterior for p in polys])
        lo, hi = every.min(axis=0), every.max(axis=0)
        if lo[0] >= -0.5 and lo[1] >= -0.5 and hi[0] <= width - 0.5 and hi[1] <= height - 0.5:
            out[name] = 0.0
            continue
        step = max(hi - lo) / samples
        xs = np.arange(lo[0] + step / 2, hi[0], step)
        ys = np.arange(lo[1] + step / 2, hi[1], step)
        pts = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
        inside = np.zeros(len(pts), dtype=bool)
        for p in polys:
            inside |= p.contains(pts)
        pts = pts[inside]
        outside = ((pts[:, 0] < -0.5) | (pts[:, 0] > width - 0.5)
                   | (pts[:, 1] < -0.5) | (pts[:, 1] > height - 0.5))
        out[name] = float(outside.mean()) if len(pts) else 0.0
    return out
