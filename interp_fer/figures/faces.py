"""Landmarks and AU regions on a face (:mod:`interp_fer.faces`, :mod:`interp_fer.au_regions`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from ._style import OKABE_ITO, ONE_COLUMN, STYLE, _draw_region, _image_limits, new_figure


def _face_axes(image: np.ndarray | None, ax, width: float, shape: tuple[int, int] | None):
    """An axes showing ``image`` (grey or RGB) in pixel coordinates, and its figure."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        if ax is None:
            h, w = (image.shape[:2] if image is not None else shape) or (1, 1)
            figure = new_figure(width, width * h / w)
            ax = figure.add_subplot()
        else:
            figure = ax.figure
        if image is not None:
            img = np.asarray(image)
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255,
                      interpolation="nearest" if max(img.shape[:2]) < 128 else "antialiased")
        ax.set_axis_off()
    return figure, ax


def plot_landmarks(
    image: np.ndarray | None,
    landmarks: np.ndarray,
    *,
    box: Sequence[float] | None = None,
    numbers: bool = False,
    ax=None,
    width: float = ONE_COLUMN,
) -> Figure:
    """A face with its 68 dlib landmarks, joined by feature (jaw, brows, nose, eyes, lips).

    Parameters
    ----------
    image
        ``(H, W)`` grey or ``(H, W, 3)`` RGB uint8 image, or None for the points alone.
    landmarks
        ``(68, 2)`` ``(x, y)`` pixel coordinates.
    box
        Optional face box ``(left, top, right, bottom)`` to draw.
    numbers
        Write each point's 0-based index beside it.
    ax
        Axes to draw into (its figure is returned); default a new figure.
    width
        Width in inches of a new figure.
    """
    import matplotlib
    from matplotlib.patches import Rectangle

    lm = np.asarray(landmarks, dtype=float)
    groups = [(range(0, 17), False), (range(17, 22), False), (range(22, 27), False),
              (range(27, 31), False), (range(31, 36), False), (range(36, 42), True),
              (range(42, 48), True), (range(48, 60), True), (range(60, 68), True)]
    new_axes = ax is None
    figure, ax = _face_axes(image, ax, width, None)
    with matplotlib.rc_context(STYLE):
        if image is None:
            ax.set_aspect("equal")
        scale = np.ptp(lm, axis=0).max()
        for k, (idx, closed) in enumerate(groups):
            pts = lm[list(idx) + ([idx[0]] if closed else [])]
            ax.plot(pts[:, 0], pts[:, 1], "-", color=OKABE_ITO[k % 7], lw=0.8)
        ax.plot(lm[:, 0], lm[:, 1], "o", ms=1.8, color="white", mec="black", mew=0.3)
        if numbers:
            for i, (x, y) in enumerate(lm):
                ax.annotate(str(i), (x, y), xytext=(1.5, 1.5), textcoords="offset points",
                            fontsize=4, color="black",
                            bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none",
                                  "alpha": 0.6})
        if box is not None:
            left, top, right, bottom = box
            ax.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False,
                                   ec=OKABE_ITO[4], lw=0.8, ls="--"))
        if image is None and new_axes:  # y down, like the image the points belong to
            pad = 0.05 * scale
            ax.set_xlim(lm[:, 0].min() - pad, lm[:, 0].max() + pad)
            ax.set_ylim(lm[:, 1].max() + pad, lm[:, 1].min() - pad)
        elif image is not None:  # the image's frame, whatever sticks out of it
            _image_limits(ax, image)
    return figure


def _label_point(poly) -> np.ndarray:
    """A point well inside a polygon (the sampled point farthest from its outline)."""
    rings = [poly.exterior, *poly.holes]
    lo, hi = poly.exterior.min(axis=0), poly.exterior.max(axis=0)
    xs, ys = np.linspace(lo[0], hi[0], 40), np.linspace(lo[1], hi[1], 40)
    pts = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
    pts = pts[poly.contains(pts)]
    if len(pts) == 0:
        return poly.exterior.mean(axis=0)
    best = np.full(len(pts), np.inf)
    for ring in rings:  # distance from every sample to every edge
        a, b = ring, np.roll(ring, -1, axis=0)
        ab = b - a
        t = np.clip(((pts[:, None, :] - a) * ab).sum(-1) / np.maximum((ab**2).sum(-1), 1e-12),
                    0, 1)
        d = np.linalg.norm(pts[:, None, :] - (a + t[..., None] * ab), axis=-1).min(axis=1)
        best = np.minimum(best, d)
    return pts[best.argmax()]


def plot_au_regions(
    image: np.ndarray | None,
    landmarks: np.ndarray,
    regions=None,
    ax=None,
    *,
    aus: Sequence[str | int] | None = None,
    face: bool = True,
    labels: bool = True,
    alpha: float = 0.35,
    width: float = ONE_COLUMN,
) -> Figure:
    """Every AU region drawn on a face, labelled.

    Parameters
    ----------
    image
        ``(H, W)`` grey or ``(H, W, 3)`` RGB uint8 image (None: regions alone).
    landmarks
        ``(68, 2)`` ``(x, y)`` pixel coordinates of the face.
    regions
        An :class:`~interp_fer.au_regions.AURegions`; default the package's definitions.
    ax
        Axes to draw into (its figure is returned); default a new figure.
    aus
        AUs to draw (keys or numbers); default all.
    face
        Outline the face region (hull used for "inside the face" and chance rates).
    labels
        Write "AU<n>" on each region (on the image-left side of bilateral ones).
    alpha
        Fill opacity.
    width
        Width in inches of a new figure.
    """
    import matplotlib
    import matplotlib.patheffects as pe

    from ..au_regions import load_au_regions

    regions = regions or load_au_regions()
    lm = np.asarray(landmarks, dtype=float)
    polys = regions.polygons(lm, aus)
    new_axes = ax is None
    figure, ax = _face_axes(image, ax, width, None)
    with matplotlib.rc_context(STYLE):
        if image is None:
            ax.set_aspect("equal")
        if face:
            hull = regions.face_polygon(lm).exterior
            closed = np.vstack([hull, hull[:1]])
            ax.plot(closed[:, 0], closed[:, 1], "--", color="white", lw=0.7)
            ax.plot(closed[:, 0], closed[:, 1], ":", color="black", lw=0.7)
        for k, (au, parts) in enumerate(polys.items()):
            _draw_region(ax, parts, OKABE_ITO[k % 7], alpha=alpha)
            if labels:
                x, y = _label_point(parts[0])
                ax.text(x, y, f"{int(au[2:])}", ha="center", va="center", fontsize=6,
                        color="black", fontweight="bold",
                        path_effects=[pe.withStroke(linewidth=1.6, foreground="white")])
        if image is None and new_axes:  # y down, like the image the points belong to
            everything = np.concatenate([p.exterior for parts in polys.values() for p in parts]
                                        + [lm, regions.face_polygon(lm).exterior])
            pad = 0.05 * np.ptp(everything, axis=0).max()
            ax.set_xlim(everything[:, 0].min() - pad, everything[:, 0].max() + pad)
            ax.set_ylim(everything[:, 1].max() + pad, everything[:, 1].min() - pad)
        elif image is not None:
            _image_limits(ax, image)
    return figure


def au_regions_figure(
    image: np.ndarray,
    *,
    regions=None,
    settings=None,
    margin: float = 0.25,
    width: float = ONE_COLUMN,
) -> Figure:
    """Detect the largest face of an image, crop around it and draw every AU region on it.

    Parameters
    ----------
    image
        ``(H, W)`` grey or ``(H, W, 3)`` RGB uint8 image.
    regions
        :class:`~interp_fer.au_regions.AURegions`; default the package's definitions.
    settings
        :class:`~interp_fer.faces.LandmarkSettings` for the detector; default settings.
    margin
        Space kept around the face region, as a fraction of its size.
    width
        Figure width in inches.

    Raises
    ------
    ValueError
        When no face is found.
    """
    from ..au_regions import load_au_regions
    from ..faces import LandmarkDetector

    regions = regions or load_au_regions()
    found = LandmarkDetector(settings)(image)
    if not found.ok:
        raise ValueError(f"no face to draw AU regions on ({found.status}: {found.message})")
    hull = regions.face_polygon(found.landmarks).exterior
    lo, hi = hull.min(axis=0), hull.max(axis=0)
    pad = margin * (hi - lo).max()
    h, w = image.shape[:2]
    x0, y0 = (max(0, int(v)) for v in np.floor(lo - pad))
    x1, y1 = min(w, int(np.ceil(hi[0] + pad)) + 1), min(h, int(np.ceil(hi[1] + pad)) + 1)
    crop = np.asarray(image)[y0:y1, x0:x1]
    return plot_au_regions(crop, found.landmarks - [x0, y0], regions, width=width)
