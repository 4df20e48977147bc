"""Figures for papers: each function returns a :class:`matplotlib.figure.Figure`.

Conventions: colour-blind-safe colour maps (viridis/cividis for magnitudes, a diverging
blue-red map centred on zero for signed values), sizes for one paper column (3.5 in) or two
(7.2 in), fonts readable at that width. Save with ``fig.savefig("x.pdf")`` (vector) and
``fig.savefig("x.png", dpi=300)``. No function changes global matplotlib state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

if TYPE_CHECKING:  # annotations only: figures must not import torch at module level
    import os

    import pandas as pd
    import torch

    from .models import FERModel

ONE_COLUMN = 3.5  # inches
TWO_COLUMNS = 7.2  # inches
STYLE = {
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "pdf.fonttype": 42,  # embed TrueType so text stays editable in vector output
    "svg.fonttype": "none",
}


def new_figure(width: float = ONE_COLUMN, height: float | None = None) -> Figure:
    """A figure in the toolkit's style, not attached to pyplot (no global state)."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(width, height or width), layout="constrained")
    return figure


def plot_confusion_matrix(
    confusion: np.ndarray,
    class_names: Sequence[str],
    *,
    normalise: bool = True,
    title: str | None = None,
    width: float = ONE_COLUMN,
) -> Figure:
    """Confusion matrix as a heatmap with the count or rate in each cell.

    Parameters
    ----------
    confusion
        (n_classes, n_classes) counts, rows = true class, columns = predicted class.
    class_names
        Names in index order.
    normalise
        Colour and annotate by row-normalised rate (recall per class); counts otherwise.
    title
        Axes title.
    width
        Figure width in inches (:data:`ONE_COLUMN` or :data:`TWO_COLUMNS`).
    """
    import matplotlib

    counts = np.asarray(confusion, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = counts / counts.sum(axis=1, keepdims=True)
    empty = counts.sum(axis=1) == 0  # classes absent from the data: left blank, not "0.00"
    values = np.where(empty[:, None], np.nan, rates if normalise else counts)
    with matplotlib.rc_context(STYLE):
        figure = new_figure(width, width * 0.9)
        ax = figure.add_subplot()
        image = ax.imshow(values, cmap="viridis", vmin=0, vmax=1 if normalise else None)
        ticks = np.arange(len(class_names))
        ax.set_xticks(ticks, class_names, rotation=45, ha="right")
        ax.set_yticks(ticks, class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if title:
            ax.set_title(title)
        threshold = 0.5 * (np.nanmax(values) if np.isfinite(values).any() else 1)
        for (row, col), value in np.ndenumerate(values):
            if np.isnan(value):
                continue
            text = f"{value:.2f}" if normalise else f"{int(value)}"
            ax.text(col, row, text, ha="center", va="center", fontsize=6,
                    color="black" if value > threshold else "white")
        figure.colorbar(image, ax=ax, label="recall" if normalise else "images", shrink=0.8)
    return figure




def project_figure(
    model: FERModel,
    image: np.ndarray | str | os.PathLike | torch.Tensor,
    layer: str,
    channels: Sequence[int] | None = None,
    method: str = "deconvnet",
    *,
    max_channels: int = 15,
    columns: int = 6,
    width: float = TWO_COLUMNS,
) -> Figure:
    """Grid of one face and the projections of a layer's channels, with extremum points.

    The first panel is the network input (the preprocessed face, gray); each other panel is
    one channel's projection of its arg-max unit (:func:`interp_fer.projections.project`),
    in a diverging map centred on zero and scaled per panel for display (over the face,
    which shows through where the projection is weak), with the extremum
    point (energy centroid of the top 1 % pixels, ``+``) and the arg-max unit's
    receptive-field centre (``o``) when known. Inactive channels are left blank.

    Parameters
    ----------
    model
        A :class:`~interp_fer.models.FERModel`.
    image
        A raw image (array, or path to a file), or an already preprocessed (c, H, W) /
        (1, c, H, W) tensor.
    layer
        Layer name.
    channels
        Channels to show; default: the ``max_channels`` with the largest maximum activation.
    method
        ``"deconvnet"`` or ``"guided_backprop"``.
    max_channels, columns, width
        Panel count when ``channels`` is None, grid columns, figure width (inches).
    """
    import os

    import matplotlib
    import torch

    from .attributions import display_scale
    from .projections import extremum_points, project, rf_centres

    if isinstance(image, (str, os.PathLike)):
        from .data import read_image

        image = read_image(image)
    if isinstance(image, torch.Tensor):
        inputs = image if image.ndim == 4 else image[None]
    else:
        inputs = model.preprocess([np.asarray(image)])
    inputs = inputs[:1].float()
    if channels is None:
        result = project(model.module, inputs, layer, method=method)
        order = torch.argsort(result.values[0], descending=True, stable=True)[:max_channels]
        channels = sorted(int(result.channels[i]) for i in order)
    result = project(model.module, inputs, layer, list(channels), method=method)
    points = extremum_points(result)[0]
    centres = rf_centres(result)[0] if result.receptive_field is not None else None
    maps = display_scale(result.maps[0].sum(dim=1))  # (K, H, W), input channels summed
    face = inputs[0].mean(dim=0).cpu().numpy()
    count = len(channels) + 1
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    with matplotlib.rc_context(STYLE):
        figure = new_figure(width, width / columns * rows * 1.12)
        axes = figure.subplots(rows, columns, squeeze=False).ravel()
        for ax in axes:
            ax.set_axis_off()
        axes[0].imshow(face, cmap="gray")
        axes[0].set_title(f"input ({layer})")
        for k, ax in enumerate(axes[1:count]):
            ax.set_title(f"ch {channels[k]}  {float(result.values[0, k]):.2g}", fontsize=7)
            if not bool(result.active[0, k]):
                ax.text(0.5, 0.5, "inactive", ha="center", va="center",
                        transform=ax.transAxes, fontsize=7)
                continue
            # The face shows through where the projection is weak, to locate it.
            ax.imshow(face, cmap="gray")
            ax.imshow(maps[k], cmap="RdBu_r", vmin=-1, vmax=1,
                      alpha=np.clip(2 * np.abs(maps[k]), 0, 1))
            if centres is not None:
                ax.plot(centres[k, 1], centres[k, 0], "o", mfc="none", mec="#444444", ms=5,
                        mew=0.8)
            ax.plot(points[k, 1], points[k, 0], "+", color="black", ms=7, mew=1.2)
    return figure


# -- landmarks and AU regions (interp_fer.faces, interp_fer.au_regions) -----------------------

#: Okabe & Ito (2008) colour-blind-safe qualitative colours (black left out: used for text).
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7",
             "#999999")


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


def _image_limits(ax, image: np.ndarray) -> None:
    """Limit the axes to the image (pixel centres at integers, so edges at -0.5)."""
    h, w = np.asarray(image).shape[:2]
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)


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
    from matplotlib.patches import PathPatch
    from matplotlib.path import Path as MplPath

    from .au_regions import load_au_regions

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
            colour = OKABE_ITO[k % 7]
            for poly in parts:
                rings = [poly.exterior, *poly.holes]
                verts = np.concatenate([np.vstack([r, r[:1]]) for r in rings])
                codes = np.concatenate([[MplPath.MOVETO] + [MplPath.LINETO] * (len(r) - 1)
                                        + [MplPath.CLOSEPOLY] for r in rings])
                ax.add_patch(PathPatch(MplPath(verts, codes), fc=colour, ec="none",
                                       alpha=alpha))
                ax.add_patch(PathPatch(MplPath(verts, codes), fc="none", ec=colour, lw=0.9))
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
    from .au_regions import load_au_regions
    from .faces import LandmarkDetector

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


# -- the AU <-> channel mapping (interp_fer.mapping) -----------------------------------------


def plot_distance_heatmap(
    scores: pd.DataFrame,
    layer: str,
    *,
    alpha: float = 0.05,
    width: float = TWO_COLUMNS,
    limit: float | None = None,
) -> Figure:
    """AU x channel heatmap of the distance D for one layer, significant pairs marked.

    Parameters
    ----------
    scores
        One row per (layer, channel, AU) with ``distance`` and ``q_value``
        (:attr:`interp_fer.mapping.MappingResult.scores`).
    layer
        Which layer to draw.
    alpha
        Pairs with ``q_value <= alpha`` and positive D get a dot.
    width
        Figure width in inches.
    limit
        Symmetric colour limit; default the largest |D| of the layer.
    """
    import matplotlib

    part = scores[scores["layer"] == layer]
    grid = part.pivot(index="au", columns="channel", values="distance")
    q = part.pivot(index="au", columns="channel", values="q_value").reindex_like(grid)
    values = grid.to_numpy(dtype=float)
    bound = limit or float(np.nanmax(np.abs(values))) or 1.0
    with matplotlib.rc_context(STYLE):
        height = max(1.6, 0.16 * len(grid) + 0.9)
        figure = new_figure(width, height)
        ax = figure.add_subplot()
        image = ax.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto",
                          interpolation="nearest")
        rows, cols = np.nonzero((q.to_numpy(dtype=float) <= alpha) & (values > 0))
        ax.plot(cols, rows, ".", color="black", ms=2.5)
        ax.set_yticks(np.arange(len(grid)), [f"AU{int(a)}" for a in grid.index])
        step = max(1, len(grid.columns) // 16)
        ax.set_xticks(np.arange(0, len(grid.columns), step), grid.columns[::step])
        ax.set_xlabel(f"channel of {layer}")
        ax.set_title(f"{layer}: distance D (dots: q <= {alpha:g}, D > 0)")
        figure.colorbar(image, ax=ax, label="D", shrink=0.9)
    return figure


def plot_channel_faces(
    model: FERModel,
    inputs: torch.Tensor,
    layer: str,
    channel: int,
    *,
    title: str = "",
    width: float = ONE_COLUMN,
) -> Figure:
    """A channel's deconvnet projections on several faces (e.g. its top-activating ones).

    Parameters
    ----------
    model
        The network.
    inputs
        (n, c, H, W) preprocessed faces.
    layer, channel
        Which channel to project.
    title
        Figure title.
    width
        Figure width in inches.
    """
    import matplotlib

    from .attributions import display_scale
    from .projections import deconvnet, extremum_points

    result = deconvnet(model.module, inputs, layer, [channel])
    points = extremum_points(result)[:, 0]
    maps = display_scale(result.maps[:, 0].sum(dim=1))
    faces = inputs.mean(dim=1).cpu().numpy()
    with matplotlib.rc_context(STYLE):
        figure = new_figure(width, width / len(inputs) * 1.25)
        axes = figure.subplots(1, len(inputs), squeeze=False).ravel()
        for i, ax in enumerate(axes):
            ax.set_axis_off()
            ax.imshow(faces[i], cmap="gray")
            if bool(result.active[i, 0]):
                ax.imshow(maps[i], cmap="RdBu_r", vmin=-1, vmax=1,
                          alpha=np.clip(2 * np.abs(maps[i]), 0, 1))
                ax.plot(points[i, 1], points[i, 0], "+", color="black", ms=6, mew=1.0)
        if title:
            figure.suptitle(title, fontsize=8)
    return figure
