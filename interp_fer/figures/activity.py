"""AU activity proxies drawn on a face (:mod:`interp_fer.au_activity`), and the sham regions
beside the AU regions (:func:`interp_fer.au_regions.load_sham_regions`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ._style import OKABE_ITO, ONE_COLUMN, STYLE, TWO_COLUMNS, _draw_region, new_figure
from .faces import _face_axes, _label_point

_NUM, _DEN = OKABE_ITO[5], OKABE_ITO[4]  # vermillion: measured length; blue: the divisor


def _frame(lm: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    from ..au_regions import FaceFrame

    f = FaceFrame.of(lm)
    return f.ex, f.ey, f.iod


def _draw_term(ax, term: Mapping[str, Any], lm: np.ndarray, mirror: bool, colour: str,
               ls: str) -> None:
    """One distance term: its two point sets and the measured segment, in the face frame."""
    from ..faces import MIRROR_INDEX

    ex, ey, _ = _frame(lm)
    keys = ("upper", "lower") if term["op"] == "vdist" else ("a", "b")
    sets = [[MIRROR_INDEX[i] for i in term[k]] if mirror else list(term[k]) for k in keys]
    p, q = (lm[s].mean(axis=0) for s in sets)
    for s in sets:  # the landmarks averaged into each end
        ax.plot(lm[s, 0], lm[s, 1], "o", ms=2.2, color=colour, mec="white", mew=0.3)
    if term["op"] == "dist":
        end = q
    else:  # the component along ey (vdist) or ex (hdist), drawn from the first point
        axis = ey if term["op"] == "vdist" else ex
        end = p + np.dot(q - p, axis) * axis
        guide = np.stack([end, q])  # dotted: from the segment's end to the second point's level
        ax.plot(guide[:, 0], guide[:, 1], ":", color=colour, lw=0.6)
    seg = np.stack([p, end])
    ax.plot(seg[:, 0], seg[:, 1], ls, color=colour, lw=1.2, solid_capstyle="butt")


def _draw_proxy(ax, proxy: Any, lm: np.ndarray) -> None:
    for mirror in (False, True) if proxy.bilateral else (False,):
        for term in proxy.formula:
            if term["op"] == "ratio":
                _draw_term(ax, term["num"], lm, mirror, _NUM, "-")
                _draw_term(ax, term["den"], lm, mirror, _DEN, "--")
            else:
                _draw_term(ax, term, lm, mirror, _NUM if len(proxy.formula) == 1 or
                           term is proxy.formula[0] else OKABE_ITO[2], "-")


def plot_activity(
    image: np.ndarray,
    landmarks: np.ndarray,
    *,
    aus: Sequence[int] | None = None,
    proxies: Any = None,
    columns: int = 5,
    zoom: bool = True,
    margin: float = 0.35,
    width: float = TWO_COLUMNS,
) -> Figure:
    """Every AU activity proxy drawn on one face: the landmarks it uses and what it measures.

    One panel per AU: the landmarks averaged into each point (dots), the measured length
    (solid; a second term in green), a ratio's divisor (dashed blue), and dotted guides from a
    vertical (or horizontal) component to the point it is measured to; vertical and
    horizontal are the face's, along and across the eye line. The title gives the AU, its
    name and the proxy's value on this face (IOD or ratio; larger = more active).

    Parameters
    ----------
    image
        ``(H, W)`` grey or ``(H, W, 3)`` RGB uint8 image.
    landmarks
        ``(68, 2)`` ``(x, y)`` pixels of the face in the image.
    aus
        AU numbers to draw; default every proxy.
    proxies
        :class:`~interp_fer.au_activity.ActivityProxies`; default the package's.
    columns
        Panels per row.
    zoom
        Each panel shows a square around the landmarks its proxy uses (else the whole face).
    margin
        Space kept around what a panel shows, in IOD.
    width
        Figure width in inches.
    """
    import matplotlib

    from ..au_activity import au_activity, load_activity_proxies

    proxies = proxies or load_activity_proxies()
    lm = np.asarray(landmarks, dtype=float)
    chosen = [proxies[a] for a in (proxies.aus if aus is None else aus)]
    values = au_activity(lm, [p.number for p in chosen], proxies)[0]
    iod = _frame(lm)[2]
    rows = -(-len(chosen) // columns)
    with matplotlib.rc_context(STYLE):
        figure = new_figure(width, width / columns * rows * 1.22)
        axes = figure.subplots(rows, columns, squeeze=False).ravel()
        for ax in axes:
            ax.set_axis_off()
        for ax, proxy, value in zip(axes, chosen, values, strict=False):
            _face_axes(image, ax, width, None)
            ax.plot(lm[:, 0], lm[:, 1], ".", ms=1.2, color="white", alpha=0.8)
            _draw_proxy(ax, proxy, lm)
            shown = lm[list(proxy.landmarks)] if zoom else lm
            centre = (shown.min(axis=0) + shown.max(axis=0)) / 2
            half = np.ptp(shown, axis=0).max() / 2 + margin * iod
            ax.set_xlim(centre[0] - half, centre[0] + half)
            ax.set_ylim(centre[1] + half, centre[1] - half)
            ax.set_title(f"AU{proxy.number} {proxy.name}\n{value:+.3f}"
                         f"{' IOD' if proxy.unit == 'IOD' else ''}"
                         f"{' (negated)' if proxy.sign < 0 else ''}", fontsize=6)
    return figure


def plot_sham_regions(
    image: np.ndarray | None,
    landmarks: np.ndarray,
    shams: Any = None,
    regions: Any = None,
    ax=None,
    *,
    width: float = ONE_COLUMN,
) -> Figure:
    """The sham regions (hatched, labelled) over the AU regions (grey outlines) on a face.

    Parameters
    ----------
    image
        ``(H, W)`` grey or ``(H, W, 3)`` RGB uint8 image (None: the regions alone).
    landmarks
        ``(68, 2)`` ``(x, y)`` pixels.
    shams, regions
        :class:`~interp_fer.au_regions.AURegions` of the shams and of the AUs; default the
        package's.
    ax
        Axes to draw into (its figure is returned); default a new figure.
    width
        Width in inches of a new figure.
    """
    import matplotlib
    import matplotlib.patheffects as pe
    from matplotlib.patches import PathPatch

    from ..au_regions import load_au_regions, load_sham_regions
    from ._style import _polygon_path

    shams = shams or load_sham_regions()
    regions = regions or load_au_regions()
    lm = np.asarray(landmarks, dtype=float)
    figure, ax = _face_axes(image, ax, width, None)
    with matplotlib.rc_context(STYLE):
        for parts in regions.polygons(lm).values():
            _draw_region(ax, parts, "0.55", alpha=0.0, lw=0.6)
        for k, (name, parts) in enumerate(shams.polygons(lm).items()):
            colour = OKABE_ITO[(k + 4) % 7]
            for poly in parts:
                ax.add_patch(PathPatch(_polygon_path(poly), fc="none", ec=colour, lw=1.0,
                                       hatch="////", alpha=0.9))
            x, y = _label_point(parts[0])
            ax.text(x, y, name.removeprefix("sham_").replace("_", " "), ha="center",
                    va="center", fontsize=5, color="black",
                    path_effects=[pe.withStroke(linewidth=1.6, foreground="white")])
        everything = np.concatenate([regions.face_polygon(lm).exterior, lm])
        pad = 0.08 * np.ptp(everything, axis=0).max()
        ax.set_aspect("equal")
        ax.set_xlim(everything[:, 0].min() - pad, everything[:, 0].max() + pad)
        ax.set_ylim(everything[:, 1].max() + pad, everything[:, 1].min() - pad)
    return figure
