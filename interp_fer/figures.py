"""Figures for papers: each function returns a :class:`matplotlib.figure.Figure`.

Conventions shared by every function here:

* no pyplot: figures are plain :class:`~matplotlib.figure.Figure` objects, built inside
  ``matplotlib.rc_context(STYLE)``, so nothing changes the caller's matplotlib state;
* colour-blind-safe colours: :data:`SEQUENTIAL` (viridis) for magnitudes, :data:`DIVERGING`
  (blue-red, centred on zero) for signed values, :data:`OKABE_ITO` for categories;
* a ``width`` argument in inches, :data:`ONE_COLUMN` (3.5) or :data:`TWO_COLUMNS` (7.2), with
  fonts sized to stay readable at that width (DejaVu Sans, shipped with matplotlib, so a
  figure looks the same on every machine);
* vector friendly: text stays text (TrueType embedded in PDF, real text in SVG) and images
  are drawn with ``interpolation="nearest"`` so a pixel stays a pixel when zoomed.
  :func:`save_figure` writes PDF and PNG at once, in that style.

Coordinates on faces are those of the preprocessed network input (e.g. 64 x 64 for
mini-Xception): projections and extremum points are ``(row, col)``, landmarks ``(x, y)``.

The figures of a mapping run (:func:`plot_au_projection_grid`, :func:`plot_channel_dossier`)
read the faces the run saw through :func:`top_faces` / :func:`mapped_faces`, which re-cut each
image with the crop the run recorded, so what is drawn is exactly what the network was fed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure

if TYPE_CHECKING:  # annotations only: figures must not import torch at module level
    import os

    import pandas as pd
    import torch

    from .au_regions import AURegions
    from .data import ImageDataset, Record
    from .mapping import MappingResult
    from .models import FERModel

ONE_COLUMN = 3.5  # inches
TWO_COLUMNS = 7.2  # inches
STYLE = {
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],  # bundled with matplotlib: same glyphs everywhere
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "figure.titlesize": 9,
    "figure.labelsize": 8,
    "pdf.fonttype": 42,  # embed TrueType so text stays editable in vector output
    "svg.fonttype": "none",
}
#: Colour map of signed values (projections, attributions, D), centred on zero. Blue-red
#: stays readable with red-green colour blindness, unlike red-green maps.
DIVERGING = "RdBu_r"
#: Colour map of magnitudes (rates, |attribution|): perceptually uniform, colour-blind safe.
SEQUENTIAL = "viridis"
#: Okabe & Ito (2008) colour-blind-safe qualitative colours (black left out: used for text).
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7",
             "#999999")
# No dates in the files: the same figure, built again, gives the same bytes.
_SAVE_METADATA = {"pdf": {"CreationDate": None}, "svg": {"Date": None}, "png": {}}


def new_figure(width: float = ONE_COLUMN, height: float | None = None) -> Figure:
    """A figure in the toolkit's style, not attached to pyplot (no global state).

    Parameters
    ----------
    width, height
        Size in inches; ``height`` defaults to ``width`` (square).
    """
    import matplotlib

    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(width, height or width), layout="constrained")
    return figure


def save_figure(
    figure: Figure,
    path: str | os.PathLike,
    formats: Sequence[str] = ("pdf", "png"),
    *,
    dpi: int = 300,
) -> list[Path]:
    """Write a figure once per format (vector and raster), in the toolkit's style.

    Saving inside :data:`STYLE` matters for vector files: the font embedding (TrueType in PDF,
    text in SVG) is read when the file is written, not when the figure is drawn.

    Parameters
    ----------
    figure
        The figure.
    path
        File name; its suffix, when it is one of ``formats``, is replaced per format
        (``figures/grid`` and ``figures/grid.pdf`` both give ``grid.pdf`` and ``grid.png``).
    formats
        File formats (``"pdf"``, ``"svg"``, ``"png"``, ...).
    dpi
        Resolution of raster formats, in dots per inch.

    Returns
    -------
    list of pathlib.Path
        The files written, in the order of ``formats``.
    """
    import matplotlib

    base = Path(path)
    if base.suffix.lstrip(".").lower() in formats:
        base = base.with_suffix("")
    written = []
    with matplotlib.rc_context(STYLE):
        for fmt in formats:
            target = base.with_name(f"{base.name}.{fmt}")
            figure.savefig(target, format=fmt, dpi=dpi, metadata=_SAVE_METADATA.get(fmt, {}))
            written.append(target)
    return written


# -- drawing helpers shared by the figures -----------------------------------------------------


def _bare(ax) -> None:
    """No ticks and no frame, but (unlike ``set_axis_off``) axis labels still show."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _network_input(model: FERModel, image: Any) -> torch.Tensor:
    """(1, c, H, W) float network input from an image array, an image file or a tensor.

    A tensor is taken as already preprocessed ((c, H, W) or (N, c, H, W); the first image is
    kept); anything else goes through ``model.preprocess``.
    """
    import os

    import torch

    if isinstance(image, (str, os.PathLike)):
        from .data import read_image

        image = read_image(image)
    if isinstance(image, torch.Tensor):
        inputs = image if image.ndim == 4 else image[None]
    else:
        inputs = model.preprocess([np.asarray(image)])
    return inputs[:1].float()


def _gray_faces(model: FERModel, inputs: torch.Tensor) -> np.ndarray:
    """(N, H, W) uint8 gray pictures of network inputs (N, c, H, W), for display."""
    pixels = model.preprocess.to_pixels(inputs)
    return pixels if pixels.ndim == 3 else np.rint(pixels.mean(axis=-1)).astype(np.uint8)


def _point_effects(width: float = 2.2) -> list:
    import matplotlib.patheffects as pe

    # A white halo keeps a black marker visible on dark pixels and on saturated colours.
    return [pe.withStroke(linewidth=width, foreground="white")]


def _draw_point(ax, point: np.ndarray | None, size: float = 6) -> None:
    """The extremum point ``(row, col)`` as a black ``+`` (nothing when NaN or None)."""
    if point is not None and np.isfinite(point).all():
        ax.plot(point[1], point[0], "+", color="black", ms=size, mew=1.1,
                path_effects=_point_effects())


def _draw_projection(ax, face: np.ndarray, scaled: np.ndarray, point: np.ndarray | None = None,
                     centre: np.ndarray | None = None, *, size: float = 6):
    """A display-scaled projection over its face, with extremum point and RF centre.

    Parameters
    ----------
    face
        (H, W) uint8 gray face.
    scaled
        (H, W) projection scaled to [-1, 1] (:func:`interp_fer.attributions.display_scale`).
    point, centre
        ``(row, col)`` extremum point (``+``) and receptive-field centre (``o``), or None.

    Returns
    -------
    matplotlib.image.AxesImage
        The projection layer (for a colour bar).
    """
    ax.imshow(face, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    # The face shows through where the projection is weak, so the map can be located on it.
    image = ax.imshow(scaled, cmap=DIVERGING, vmin=-1, vmax=1, interpolation="nearest",
                      alpha=np.clip(2 * np.abs(scaled), 0, 1))
    if centre is not None and np.isfinite(centre).all():
        ax.plot(centre[1], centre[0], "o", mfc="none", mec="#444444", ms=size * 0.8, mew=0.8)
    _draw_point(ax, point, size)
    return image


def _polygon_path(poly):
    """A matplotlib path of a polygon with holes (exterior and hole rings closed)."""
    from matplotlib.path import Path as MplPath

    rings = [poly.exterior, *poly.holes]
    verts = np.concatenate([np.vstack([r, r[:1]]) for r in rings])
    codes = np.concatenate([[MplPath.MOVETO] + [MplPath.LINETO] * (len(r) - 1)
                            + [MplPath.CLOSEPOLY] for r in rings])
    return MplPath(verts, codes)


def _draw_region(ax, parts, colour: str, *, alpha: float = 0.35, lw: float = 0.9,
                 ls: str = "-", halo: bool = False) -> None:
    """Fill and outline the polygons of one AU region."""
    from matplotlib.patches import PathPatch

    for poly in parts:
        path = _polygon_path(poly)
        if alpha > 0:
            ax.add_patch(PathPatch(path, fc=colour, ec="none", alpha=alpha))
        ax.add_patch(PathPatch(path, fc="none", ec=colour, lw=lw, ls=ls,
                               path_effects=_point_effects(lw + 1.2) if halo else None))


def _image_limits(ax, image: np.ndarray) -> None:
    """Limit the axes to the image (pixel centres at integers, so edges at -0.5)."""
    h, w = np.asarray(image).shape[:2]
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)


# -- classification (interp_fer.evaluation) ----------------------------------------------------


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
        (n_classes, n_classes) counts, rows = true class, columns = predicted class
        (:attr:`interp_fer.evaluation.Evaluation.confusion`).
    class_names
        Names in index order.
    normalise
        Colour and annotate by row-normalised rate (recall per class); counts otherwise.
        Classes absent from the data are left blank (grey), not shown as 0.
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
        cmap = matplotlib.colormaps[SEQUENTIAL].with_extremes(bad="0.9")
        image = ax.imshow(values, cmap=cmap, vmin=0, vmax=1 if normalise else None,
                          interpolation="nearest")
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


# -- projections of one face (interp_fer.projections) ------------------------------------------


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
    import matplotlib
    import torch

    from .attributions import display_scale
    from .projections import extremum_points, project, rf_centres

    inputs = _network_input(model, image)
    if channels is None:
        result = project(model.module, inputs, layer, method=method)
        order = torch.argsort(result.values[0], descending=True, stable=True)[:max_channels]
        channels = sorted(int(result.channels[i]) for i in order)
    result = project(model.module, inputs, layer, list(channels), method=method)
    points = extremum_points(result)[0].numpy()
    centres = rf_centres(result)[0].numpy() if result.receptive_field is not None else None
    maps = display_scale(result.maps[0].sum(dim=1))  # (K, H, W), input channels summed
    face = _gray_faces(model, inputs)[0]
    count = len(channels) + 1
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    with matplotlib.rc_context(STYLE):
        figure = new_figure(width, width / columns * rows * 1.12)
        axes = figure.subplots(rows, columns, squeeze=False).ravel()
        for ax in axes:
            ax.set_axis_off()
        axes[0].imshow(face, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        axes[0].set_title(f"input ({layer})")
        for k, ax in enumerate(axes[1:count]):
            ax.set_title(f"ch {channels[k]}  {float(result.values[0, k]):.2g}", fontsize=7)
            if not bool(result.active[0, k]):
                ax.text(0.5, 0.5, "inactive", ha="center", va="center",
                        transform=ax.transAxes, fontsize=7)
                continue
            _draw_projection(ax, face, maps[k], points[k],
                             None if centres is None else centres[k])
    return figure


# -- landmarks and AU regions (interp_fer.faces, interp_fer.au_regions) -----------------------


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


# -- the faces a mapping run saw (interp_fer.mapping) ------------------------------------------


@dataclass
class MappedFaces:
    """Images of a mapping run as the network saw them.

    Attributes
    ----------
    indices
        (n,) int, dataset positions of the images.
    inputs
        (n, c, H, W) float network input (each image cut with the run's crop, then
        preprocessed), on the model's device.
    landmarks
        (n, 68, 2) float64 ``(x, y)`` landmarks on the network input grid; NaN where the run
        kept no landmark table.
    """

    indices: np.ndarray
    inputs: torch.Tensor
    landmarks: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)


def mapped_faces(
    result: MappingResult,
    model: FERModel,
    dataset: ImageDataset,
    indices: Sequence[int] | np.ndarray,
) -> MappedFaces:
    """Load dataset images exactly as a mapping run fed them to the network.

    Parameters
    ----------
    result
        The run (:func:`interp_fer.mapping.map_dataset`); ``result.faces`` holds each mapped
        image's crop, ``result.landmarks`` its landmarks (one row per dataset image).
    model, dataset
        What the run was made with.
    indices
        Dataset positions. Images the run did not map, or that can no longer be read, are
        left out (the returned ``indices`` say which were kept).

    Returns
    -------
    MappedFaces
    """
    import torch

    from .preprocessing import Crop

    if result.faces is None:
        raise ValueError("this MappingResult has no face table (result.faces): it was not "
                         "made by interp_fer.mapping.map_dataset")
    crops = result.faces.set_index("index")
    kept, images, landmarks = [], [], []
    for index in (int(i) for i in indices):
        if index < 0 or index not in crops.index:
            continue
        sample = dataset.load(dataset.records[index])
        if sample.image is None:
            continue
        row = crops.loc[index]
        crop = Crop(int(row.crop_top), int(row.crop_left), int(row.crop_height),
                    int(row.crop_width))
        kept.append(index)
        images.append(crop.apply(sample.image))
        landmarks.append(_input_landmarks(result, index, crop, model.input_size))
    if images:
        inputs = model.preprocess(images).to(model.device)
    else:
        inputs = torch.zeros(0, model.preprocess.channels, *model.input_size,
                             device=model.device)
    return MappedFaces(np.asarray(kept, dtype=np.int64), inputs,
                       np.asarray(landmarks, dtype=np.float64).reshape(-1, 68, 2))


def _input_landmarks(result: MappingResult, index: int, crop: Any,
                     size: tuple[int, int]) -> np.ndarray:
    """(68, 2) landmarks of dataset image ``index`` on the network input grid (NaN if none)."""
    table = result.landmarks
    if table is None or index >= len(table):
        return np.full((68, 2), np.nan)
    # The landmark table has one row per dataset image, in dataset order (as map_dataset
    # reads it), so the dataset position is the row position.
    from .faces import landmarks_array

    return crop.to_input(landmarks_array(table.iloc[[index]])[0], size)


def top_faces(
    result: MappingResult,
    model: FERModel,
    dataset: ImageDataset,
    layer: str,
    channel: int,
    count: int = 4,
) -> MappedFaces:
    """The images on which a channel responds most (its top-activating faces), strongest first.

    Parameters
    ----------
    result, model, dataset
        The mapping run and what it was made with.
    layer, channel
        The channel.
    count
        How many faces at most (a run keeps the top 8 per channel).

    Returns
    -------
    MappedFaces
    """
    if not result.top_images or layer not in result.top_images:
        raise ValueError(f"this MappingResult has no top images for layer {layer!r}; "
                         "map the layer with interp_fer.mapping.map_dataset")
    ranked = result.top_images[layer]["indices"][int(channel)]
    return mapped_faces(result, model, dataset, [int(i) for i in ranked if i >= 0][:count])


def _label_name(record: Record, class_names: Sequence[str]) -> str | None:
    """The expression of a record by name (None when unlabelled)."""
    if record.label_name:
        return record.label_name
    if record.label is None:
        return None
    return class_names[record.label] if 0 <= record.label < len(class_names) \
        else str(record.label)


@dataclass
class ExpressionResponses:
    """Peak responses of every channel of a layer on labelled faces, by expression.

    Attributes
    ----------
    layer
        Layer name.
    classes
        Expression names present, in the dataset's class order.
    labels
        (n,) expression name of each face.
    peaks
        (n, K) peak activation (maximum over the feature map) of each channel.
    indices
        (n,) dataset positions of the faces.
    """

    layer: str
    classes: tuple[str, ...]
    labels: np.ndarray
    peaks: np.ndarray
    indices: np.ndarray

    def by_class(self, channel: int) -> pd.DataFrame:
        """Mean, standard error and count of one channel's peak response per expression.

        Returns
        -------
        pandas.DataFrame
            Indexed by expression (in :attr:`classes` order): ``mean``, ``sem`` (NaN for a
            single face), ``n``.
        """
        import pandas as pd

        frame = pd.DataFrame({"label": self.labels, "peak": self.peaks[:, int(channel)]})
        stats = frame.groupby("label")["peak"].agg(["mean", "sem", "count"])
        return stats.rename(columns={"count": "n"}).reindex(list(self.classes))


def expression_responses(
    model: FERModel,
    result: MappingResult,
    dataset: ImageDataset,
    layer: str,
    *,
    max_images: int = 256,
    batch_size: int = 64,
) -> ExpressionResponses:
    """Each channel's peak response on a bounded sample of labelled faces (a forward pass).

    The faces are the first ``max_images`` labelled images of the run (dataset order), cut
    with the run's crops, so the responses are those the mapping measured; no top-k
    selection is involved, so the per-expression means are not biased towards the faces a
    channel likes.

    Parameters
    ----------
    model, result, dataset
        The mapping run and what it was made with.
    layer
        Layer name.
    max_images
        Bound on the number of faces (and so on the time: one forward pass per batch).
    batch_size
        Faces per forward pass.

    Returns
    -------
    ExpressionResponses

    Raises
    ------
    ValueError
        When no image of the run has an expression label.
    """
    from .layers import layer_outputs

    names = dataset.class_names
    picked, labels = [], []
    for index in result.faces["index"]:
        label = _label_name(dataset.records[int(index)], names)
        if label is not None:
            picked.append(int(index))
            labels.append(label)
        if len(picked) == max_images:
            break
    if not picked:
        raise ValueError(f"no image of {dataset.source or 'the dataset'} has an expression "
                         "label: per-expression responses need a labelled dataset")
    kept, peaks = [], []
    for start in range(0, len(picked), batch_size):
        faces = mapped_faces(result, model, dataset, picked[start:start + batch_size])
        if len(faces):
            acts = layer_outputs(model.module, [layer], faces.inputs)[layer]
            peaks.append(acts.flatten(2).amax(dim=2).float().cpu().numpy())
            kept.extend(faces.indices.tolist())
    label_of = dict(zip(picked, labels, strict=True))
    labels_kept = np.array([label_of[i] for i in kept], dtype=object)
    order = [c for c in names if c in set(labels_kept)] + sorted(set(labels_kept) - set(names))
    return ExpressionResponses(layer, tuple(order), labels_kept, np.concatenate(peaks),
                               np.asarray(kept, dtype=np.int64))


def _mapping_row(result: MappingResult, layer: str, channel: int) -> pd.Series:
    rows = result.mapping[(result.mapping["layer"] == layer)
                          & (result.mapping["channel"] == int(channel))]
    if rows.empty:
        raise KeyError(f"channel {channel} of layer {layer!r} is not in the mapping "
                       f"(layers: {', '.join(result.mapping['layer'].unique())})")
    return rows.iloc[0]


def _channel_au(row: pd.Series) -> tuple[int, bool]:
    """A mapping row's AU, and whether it is significant (else its best, non-significant AU)."""
    import pandas as pd

    if pd.notna(row["au"]):
        return int(row["au"]), True
    return int(row["best_au"]), False


def _alpha(result: MappingResult) -> float:
    return float(result.run.get("alpha", 0.05))


def _au_title(regions: AURegions, au: int) -> str:
    try:
        return f"AU{au} {regions[au].name.lower()}"
    except KeyError:  # an AU the current region file no longer defines
        return f"AU{au}"


# -- the AU <-> channel mapping: heatmap -------------------------------------------------------


def _tick_step(count: int, most: int) -> int:
    """The smallest power of two that leaves at most ``most`` ticks for ``count`` items.

    Powers of two, because layers have 2^n channels: ticks then fall on 0, 8, 16, ...
    """
    step = 1
    while count > most * step:
        step *= 2
    return step


def plot_distance_heatmap(
    scores: pd.DataFrame,
    layer: str,
    *,
    alpha: float = 0.05,
    width: float = TWO_COLUMNS,
    limit: float | None = None,
) -> Figure:
    """AU x channel heatmap of the distance D for one layer, significant pairs marked.

    Each cell is D(channel, AU) in a diverging map centred on zero (red: the channel responds
    more inside the AU region than elsewhere on the face). A dot marks a significant pair
    (``q_value <= alpha``); an open circle marks the channel's mapped AU, as
    :func:`interp_fer.mapping.mapping_table` assigns it. Pairs without a value are grey.

    Parameters
    ----------
    scores
        One row per (layer, channel, AU) with ``distance`` and ``q_value``
        (:attr:`interp_fer.mapping.MappingResult.scores`); other columns are ignored.
    layer
        Which layer to draw.
    alpha
        False discovery rate of the marks (use the run's, ``result.run["alpha"]``).
    width
        Figure width in inches.
    limit
        Symmetric colour limit; default the largest finite |D| of the layer (1 when there is
        none). Values beyond it saturate, and the colour bar shows an arrow.

    Raises
    ------
    ValueError
        When ``scores`` has no row for ``layer``.
    """
    import matplotlib
    from matplotlib.lines import Line2D

    from .mapping import mapping_table

    part = scores[scores["layer"] == layer]
    if part.empty:
        known = ", ".join(map(str, scores["layer"].unique())) or "none"
        raise ValueError(f"no scores for layer {layer!r} (layers: {known})")
    grid = part.pivot(index="au", columns="channel", values="distance").sort_index()
    q = part.pivot(index="au", columns="channel", values="q_value").reindex_like(grid)
    values = grid.to_numpy(dtype=float)
    finite = np.abs(values[np.isfinite(values)])
    bound = float(limit) if limit is not None else float(finite.max()) if finite.size else 0.0
    bound = bound if bound > 0 else 1.0
    significant = q.to_numpy(dtype=float) <= alpha
    # The circles come from the mapping itself, so they cannot drift from its rule.
    mapped = mapping_table(part, alpha).dropna(subset=["au"])
    mapped_cols = grid.columns.get_indexer(mapped["channel"])
    mapped_rows = grid.index.get_indexer(mapped["au"].astype(int))
    with matplotlib.rc_context(STYLE):
        height = max(1.8, 0.14 * len(grid) + 1.1)
        figure = new_figure(width, height)
        ax = figure.add_subplot()
        cmap = matplotlib.colormaps[DIVERGING].with_extremes(bad="0.85")
        image = ax.imshow(values, cmap=cmap, vmin=-bound, vmax=bound, aspect="auto",
                          interpolation="nearest")
        rows, cols = np.nonzero(significant)
        ax.plot(cols, rows, ".", color="black", ms=2.5)
        ax.plot(mapped_cols, mapped_rows, "o", mfc="none", mec="black", ms=5, mew=0.7)
        ax.set_yticks(np.arange(len(grid)), [f"AU{int(a)}" for a in grid.index])
        step = _tick_step(len(grid.columns), most=int(width * 5))
        ax.set_xticks(np.arange(0, len(grid.columns), step), grid.columns[::step])
        ax.set_xlabel(f"channel of {layer}")
        ax.set_title(f"{layer}: distance D per AU and channel")
        over = finite.size and finite.max() > bound
        figure.colorbar(image, ax=ax, label="D", shrink=0.9, extend="both" if over else "neither")
        handles = [Line2D([], [], ls="", marker=".", color="black", ms=4),
                   Line2D([], [], ls="", marker="o", mfc="none", mec="black", ms=5, mew=0.7)]
        figure.legend(handles, [f"q \u2264 {alpha:g}", "mapped AU of the channel"],
                      loc="outside lower center", ncol=2, frameon=False)
    return figure


# -- the AU <-> channel mapping: projections of mapped channels -------------------------------


def _channel_projection(model: FERModel, faces: MappedFaces, layer: str, channel: int):
    """Deconvnet projections of one channel on some faces, ready to draw.

    Returns
    -------
    tuple
        (n, H, W) gray faces, (n, H, W) display-scaled maps, (n, 2) extremum points,
        (n, 2) receptive-field centres or None, (n,) bool active.
    """
    from .attributions import display_scale
    from .projections import deconvnet, extremum_points, rf_centres

    result = deconvnet(model.module, faces.inputs, layer, [int(channel)])
    points = extremum_points(result)[:, 0].numpy()
    centres = rf_centres(result)[:, 0].numpy() if result.receptive_field is not None else None
    maps = display_scale(result.maps[:, 0].sum(dim=1))
    return (_gray_faces(model, faces.inputs), maps, points, centres,
            result.active[:, 0].cpu().numpy())


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

    faces = MappedFaces(np.arange(len(inputs)), inputs, np.full((len(inputs), 68, 2), np.nan))
    gray, maps, points, _, active = _channel_projection(model, faces, layer, channel)
    with matplotlib.rc_context(STYLE):
        figure = new_figure(width, width / len(inputs) * 1.25)
        axes = figure.subplots(1, len(inputs), squeeze=False).ravel()
        for i, ax in enumerate(axes):
            ax.set_axis_off()
            if active[i]:
                _draw_projection(ax, gray[i], maps[i], points[i])
            else:
                ax.imshow(gray[i], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        if title:
            figure.suptitle(title, fontsize=8)
    return figure


def grid_channels(mapping: pd.DataFrame, au: int, count: int,
                  layers: Sequence[str] | None = None) -> pd.DataFrame:
    """The channels a projection grid shows for one AU.

    First the channels mapped to ``au`` (significant), largest D first; then, to fill the
    row, channels whose best but not significant AU is ``au`` (column ``fallback`` True).

    Parameters
    ----------
    mapping
        :attr:`interp_fer.mapping.MappingResult.mapping` (``au``, ``best_au``, ``distance``).
    au
        AU number.
    count
        Channels at most.
    layers
        Only channels of these layers (default all).

    Returns
    -------
    pandas.DataFrame
        At most ``count`` rows of ``mapping``, plus the boolean column ``fallback``.
    """
    import pandas as pd

    table = mapping if layers is None else mapping[mapping["layer"].isin(list(layers))]
    mapped = table[(table["au"] == au).fillna(False).astype(bool)]
    unmapped = table[table["au"].isna() & (table["best_au"] == au)]
    ranked = [part.sort_values("distance", ascending=False, kind="stable").assign(fallback=flag)
              for part, flag in ((mapped, False), (unmapped, True)) if len(part)]
    if not ranked:
        return table.head(0).assign(fallback=pd.Series(dtype=bool))
    return pd.concat(ranked).head(count)


def _grid_aus(result: MappingResult, layers: Sequence[str] | None) -> list[int]:
    """Default rows of the projection grid: AUs that are some channel's best AU."""
    mapping = result.mapping if layers is None else \
        result.mapping[result.mapping["layer"].isin(list(layers))]
    present = {int(a) for a in mapping["best_au"].dropna()}
    order = [int(a) for a in result.run.get("aus", sorted(present))]
    return [a for a in order if a in present]


def plot_au_projection_grid(
    model: FERModel,
    result: MappingResult,
    dataset: ImageDataset,
    aus: Sequence[int] | None = None,
    channels_per_au: int = 3,
    *,
    faces_per_channel: int = 1,
    layers: Sequence[str] | None = None,
    regions: AURegions | None = None,
    caption: bool = True,
    width: float = TWO_COLUMNS,
) -> Figure:
    """Deconvolution projections of the top channels of each AU (the paper's figure).

    One block per AU (titled with its FACS name), holding its top channels: the channels
    mapped to it, largest D first, then, when fewer are significant, channels whose best AU
    it is although not significantly (titled "n.s."; :func:`grid_channels`). Each cell is the
    channel's deconvnet projection on one of its top-activating faces, over the face, with the
    extremum point (``+``) and the AU's region (dashed outline). Blocks are laid out several
    per row when they fit the width.

    Parameters
    ----------
    model, result, dataset
        The mapping run (:func:`interp_fer.mapping.map_dataset`) and what it was made with.
    aus
        AU numbers, one block each; default every AU that is some channel's best AU, in the
        run's order.
    channels_per_au
        Channels per AU (cells are left empty when an AU has fewer).
    faces_per_channel
        Top faces per channel (cells per channel).
    layers
        Only channels of these layers (default all mapped layers).
    regions
        AU region definitions; default the package's.
    caption
        Explain the marks under the grid.
    width
        Figure width in inches.

    Raises
    ------
    ValueError
        When there is no AU to show.
    """
    import matplotlib

    from .au_regions import load_au_regions

    regions = regions or load_au_regions()
    aus = [int(a) for a in (aus if aus is not None else _grid_aus(result, layers))]
    if not aus:
        raise ValueError("no AU to show: no channel of these layers has a best AU")
    cells = channels_per_au * faces_per_channel
    cell = min(1.1, width / cells)  # inches: a 64 px face stays legible at about an inch
    per_row = max(1, int(width // (cells * cell + 0.2)))
    rows = -(-len(aus) // per_row)
    alpha = _alpha(result)
    any_fallback = False
    with matplotlib.rc_context(STYLE):
        figure = new_figure(width, rows * (cell + 0.55) + (0.35 if caption else 0))
        blocks = figure.subfigures(rows, per_row, squeeze=False).ravel()
        for block, au in zip(blocks, aus, strict=False):
            block.suptitle(_au_title(regions, au), fontsize=8)
            axes = block.subplots(1, cells, squeeze=False).ravel()
            for ax in axes:
                ax.set_axis_off()
            chosen = grid_channels(result.mapping, au, channels_per_au, layers)
            for slot, row in enumerate(chosen.itertuples(index=False)):
                any_fallback |= bool(row.fallback)
                _grid_cells(axes[slot * faces_per_channel:(slot + 1) * faces_per_channel],
                            model, result, dataset, row, au, regions)
            if chosen.empty:
                axes[0].text(0.5, 0.5, "no channel", ha="center", va="center",
                             transform=axes[0].transAxes, fontsize=7)
        if caption:
            note = ("+ extremum point of the deconvnet projection (red/blue: positive/negative, "
                    "scaled per cell); dashed: the AU's region")
            if any_fallback:
                note += f"; n.s.: best AU of the channel but q > {alpha:g}"
            figure.supxlabel(note, fontsize=6)
    return figure


def _grid_cells(axes, model: FERModel, result: MappingResult, dataset: ImageDataset, row,
                au: int, regions: AURegions) -> None:
    """Draw one channel's projections on its top faces into ``axes`` (one face each)."""
    faces = top_faces(result, model, dataset, row.layer, int(row.channel), len(axes))
    mark = " n.s." if row.fallback else ""
    axes[0].set_title(f"{row.layer} #{int(row.channel)}\nD = {row.distance:.2f}{mark}",
                      fontsize=6.5, style="italic" if row.fallback else "normal")
    if not len(faces):
        axes[0].text(0.5, 0.5, "faces not\nreadable", ha="center", va="center",
                     transform=axes[0].transAxes, fontsize=6)
        return
    gray, maps, points, _, active = _channel_projection(model, faces, row.layer, row.channel)
    for i, ax in enumerate(axes[:len(faces)]):
        _draw_projection(ax, gray[i], maps[i] if active[i] else np.zeros_like(maps[i]),
                         points[i], size=5)
        if np.isfinite(faces.landmarks[i]).all():
            _draw_region(ax, regions.polygons(faces.landmarks[i], [au])[f"AU{au:02d}"],
                         "black", alpha=0, lw=0.8, ls="--", halo=True)
        _image_limits(ax, gray[i])


# -- the AU <-> channel mapping: one channel's dossier -----------------------------------------


def plot_channel_dossier(
    model: FERModel,
    result: MappingResult,
    dataset: ImageDataset,
    layer: str,
    channel: int,
    *,
    faces: int = 5,
    aus: Sequence[int] | None = None,
    responses: ExpressionResponses | None = None,
    max_images: int = 256,
    regions: AURegions | None = None,
    width: float = TWO_COLUMNS,
) -> Figure:
    """Everything about one channel: where it looks, which AU it follows, and how strongly.

    Panels:

    1. its top-activating faces with the AU region(s) filled and the extremum point of the
       channel's deconvnet projection (``+``) and the receptive-field centre of its arg-max
       unit (``o``) drawn over them;
    2. the projections themselves on those faces;
    3. D per AU with its bootstrap confidence interval (from ``result.scores``), bars of
       significant pairs (``q <= alpha``) dark, the channel's AU outlined;
    4. when the dataset has expression labels, the mean peak response per expression
       (+- standard error) from a forward pass over a bounded sample of labelled faces
       (:func:`expression_responses`), not from the top faces, which would be biased.

    Parameters
    ----------
    model, result, dataset
        The mapping run (:func:`interp_fer.mapping.map_dataset`) and what it was made with.
    layer, channel
        The channel.
    faces
        Top faces to show.
    aus
        AU regions drawn on the faces; default the channel's AU (its best AU when it is not
        significantly mapped).
    responses
        Precomputed :func:`expression_responses` of ``layer`` (saves the forward pass when
        drawing many channels of one layer).
    max_images
        Labelled faces in the forward pass, when ``responses`` is None.
    regions
        AU region definitions; default the package's.
    width
        Figure width in inches.
    """
    import matplotlib

    from .au_regions import load_au_regions

    regions = regions or load_au_regions()
    row = _mapping_row(result, layer, channel)
    au, significant = _channel_au(row)
    drawn = [int(a) for a in (aus if aus is not None else [au])]
    if responses is None and dataset.labelled:
        responses = expression_responses(model, result, dataset, layer, max_images=max_images)
    top = top_faces(result, model, dataset, layer, channel, faces)
    cell = (width - 0.8) / faces  # inches per face; the projections' colour bar takes 0.8
    with matplotlib.rc_context(STYLE):
        figure = new_figure(width, 2 * cell + 0.5 + max(1.9, 0.3 * width) + 0.3)
        upper, lower = figure.subfigures(2, 1, height_ratios=[2 * cell + 0.5,
                                                              max(1.9, 0.3 * width)])
        face_axes = upper.subplots(2, faces, squeeze=False)
        for ax in face_axes.ravel():
            ax.set_axis_off()
        image = _dossier_faces(face_axes, model, result, top, layer, channel, drawn, regions)
        if image is not None:
            upper.colorbar(image, ax=face_axes[1, :], shrink=0.8, ticks=[-1, 0, 1],
                           label="projection\n(per-face scale)")
        d_ax, e_ax = lower.subplots(1, 2, width_ratios=[1.7, 1])
        _plot_au_distances(d_ax, result, layer, channel, au)
        _plot_expression_responses(e_ax, responses, channel)
        name = _au_title(regions, au)
        verdict = f"mapped to {name}" if significant else f"not mapped (best: {name})"
        figure.suptitle(f"{layer} channel {int(channel)}: {verdict}, D = {row['distance']:.2f} "
                        f"[{row['ci_low']:.2f}, {row['ci_high']:.2f}], q = {row['q_value']:.2g}")
    return figure


def _dossier_faces(axes, model: FERModel, result: MappingResult, top: MappedFaces, layer: str,
                   channel: int, aus: Sequence[int], regions: AURegions):
    """Row 0: faces with AU regions and points; row 1: projections. Returns a colour source."""
    if not len(top):
        axes[0, 0].text(0.5, 0.5, "top faces not readable", transform=axes[0, 0].transAxes,
                        fontsize=7)
        return None
    gray, maps, points, centres, active = _channel_projection(model, top, layer, channel)
    values = result.top_images[layer]["values"][int(channel)]
    image = None
    for i in range(len(top)):
        face_ax, map_ax = axes[0, i], axes[1, i]
        face_ax.imshow(gray[i], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        if np.isfinite(top.landmarks[i]).all():
            for k, (_, parts) in enumerate(regions.polygons(top.landmarks[i], aus).items()):
                _draw_region(face_ax, parts, OKABE_ITO[k % 7], alpha=0.35, lw=0.8)
        if centres is not None and active[i]:
            face_ax.plot(centres[i, 1], centres[i, 0], "o", mfc="none", mec="black", ms=5,
                         mew=0.8, path_effects=_point_effects())
        _draw_point(face_ax, points[i])
        _image_limits(face_ax, gray[i])
        face_ax.set_title(f"image {int(top.indices[i])}\npeak {values[i]:.2g}", fontsize=6.5)
        image = _draw_projection(map_ax, gray[i], maps[i], points[i]) if active[i] else image
    axes[0, 0].set_axis_on()
    _bare(axes[0, 0])
    axes[0, 0].set_ylabel("AU region, points", fontsize=7)
    axes[1, 0].set_axis_on()
    _bare(axes[1, 0])
    axes[1, 0].set_ylabel("projection", fontsize=7)
    return image


def _plot_au_distances(ax, result: MappingResult, layer: str, channel: int, au: int) -> None:
    """Bar chart of D per AU with its bootstrap interval; significant bars dark."""
    scores = result.scores
    part = scores[(scores["layer"] == layer) & (scores["channel"] == int(channel))]
    order = [int(a) for a in result.run.get("aus", part["au"])]
    part = part.set_index("au").reindex(order)
    x = np.arange(len(part))
    distance = part["distance"].to_numpy(dtype=float)
    significant = part["q_value"].to_numpy(dtype=float) <= _alpha(result)
    colours = np.where(significant, OKABE_ITO[4], "0.78")
    bars = ax.bar(x, np.nan_to_num(distance), color=colours, width=0.7)
    chosen = order.index(au) if au in order else None
    if chosen is not None:
        bars[chosen].set_edgecolor("black")
        bars[chosen].set_linewidth(1.0)
    # The percentile interval need not contain D, so it is drawn as a segment, not as errors.
    ax.vlines(x, part["ci_low"], part["ci_high"], color="black", lw=0.8)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xticks(x, [str(a) for a in order])
    ax.set_xlabel("AU")
    ax.set_ylabel("D")
    level = result.run.get("options", {}).get("confidence", 0.95)
    ax.set_title(f"D per AU, {100 * level:g} % bootstrap CI "
                 f"(dark: q \u2264 {_alpha(result):g})", fontsize=7)


def _plot_expression_responses(ax, responses: ExpressionResponses | None, channel: int) -> None:
    """Mean peak response per expression with standard errors, or why there is none."""
    if responses is None:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no expression labels:\nresponse per expression not shown",
                ha="center", va="center", transform=ax.transAxes, fontsize=7)
        return
    stats = responses.by_class(channel)
    x = np.arange(len(stats))
    ax.bar(x, stats["mean"].to_numpy(dtype=float), color=OKABE_ITO[2], width=0.7)
    sem = stats["sem"].to_numpy(dtype=float)
    finite = np.isfinite(sem)  # one face of a class: no standard error to draw
    ax.errorbar(x[finite], stats["mean"].to_numpy(dtype=float)[finite], yerr=sem[finite],
                fmt="none", ecolor="black", elinewidth=0.8, capsize=1.5)
    ax.set_xticks(x, [f"{name} ({int(n)})" for name, n in zip(stats.index, stats["n"],
                                                               strict=True)],
                  rotation=35, ha="right", fontsize=6)
    ax.set_ylabel("mean peak activation")
    ax.set_title(f"response per expression (\u00b1 SE)\nforward pass over "
                 f"{len(responses.labels)} labelled faces", fontsize=7)


# -- attribution methods side by side (interp_fer.attributions) --------------------------------

METHOD_TITLES = {
    "saliency": "saliency",
    "integrated_gradients": "integrated gradients",
    "guided_backprop": "guided backprop",
    "deconvolution": "deconvolution",
    "gradcam": "Grad-CAM",
    "occlusion": "occlusion",
}


def _target_title(model: FERModel, inputs: torch.Tensor, target: Any) -> str:
    """What is explained: a class with its predicted probability, or another target."""
    import torch

    if isinstance(target, (int, np.integer)):
        with torch.no_grad():
            probability = torch.softmax(model.module(inputs.to(model.device)), dim=1)
        return f"{model.class_names[int(target)]}, p = {float(probability[0, int(target)]):.2f}"
    return repr(target)


def plot_attribution_comparison(
    model: FERModel,
    image: np.ndarray | str | os.PathLike | torch.Tensor,
    target: Any,
    methods: Sequence[str] | None = None,
    *,
    layer: str | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    columns: int | None = None,
    width: float = TWO_COLUMNS,
) -> Figure:
    """Attribution methods side by side on one face (:func:`interp_fer.attributions.attribute`).

    The first panel is the network input; then one panel per method, its map summed over
    input channels and scaled for display only (:func:`~interp_fer.attributions.display_scale`:
    the 99.5th percentile of |value| maps to 1, the value given in the panel title as
    "1 = ..."), so the raw magnitudes stay readable. Signed maps use :data:`DIVERGING` over
    [-1, 1], non-negative ones (saliency's |gradient|) :data:`SEQUENTIAL` over [0, 1], both
    over the face.

    Parameters
    ----------
    model
        The network.
    image
        A raw image (array or file), or a preprocessed (c, H, W) / (1, c, H, W) tensor.
    target
        What to explain: a class index or name, or any target of
        :func:`~interp_fer.attributions.attribute` (``ChannelMax(layer, k)``, ...).
    methods
        Names from :data:`interp_fer.attributions.METHODS`; default all of them.
    layer
        Layer of ``"gradcam"``; default the model's last convolutional stage.
    options
        Keyword arguments per method, e.g. ``{"integrated_gradients": {"n_steps": 32}}``.
    columns
        Panels per row; default 4 (the input and three methods).
    width
        Figure width in inches.
    """
    import matplotlib

    from .attributions import METHODS, attribute, display_scale

    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if isinstance(target, str):
        if target not in model.class_names:
            raise ValueError(f"unknown class {target!r}; classes: {', '.join(model.class_names)}")
        target = model.class_names.index(target)
    if "gradcam" in methods and layer is None:
        if not model.stages:
            raise ValueError("method 'gradcam' needs layer= (the model names no stages)")
        layer = model.stages[-1]
    inputs = _network_input(model, image).to(model.device)
    settings = options or {}
    raw = {m: attribute(model.module, inputs, target, m, layer=layer if m == "gradcam" else None,
                        **settings.get(m, {}))[0] for m in methods}
    # Grad-CAM repeats one map over the input channels: summing would count it c times.
    maps = {m: (a[0] if m == "gradcam" else a.sum(dim=0)).cpu().numpy() for m, a in raw.items()}
    face = _gray_faces(model, inputs)[0]
    count = len(methods) + 1
    columns = max(1, min(columns or 4, count))
    rows = -(-count // columns)
    with matplotlib.rc_context(STYLE):
        figure = new_figure(width, rows * (width - 1.2) / columns + 0.4 * rows)
        axes = figure.subplots(rows, columns, squeeze=False)
        for ax in axes.ravel():
            ax.set_axis_off()
        flat = axes.ravel()
        flat[0].imshow(face, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        flat[0].set_title(f"input\n{_target_title(model, inputs, target)}", fontsize=7)
        colour_sources: dict[bool, Any] = {}
        for ax, method in zip(flat[1:], methods, strict=False):
            values = maps[method]
            signed = bool((values < 0).any())
            scaled = display_scale(values, signed=signed)
            scale = float(np.percentile(np.abs(values), 99.5))
            ax.imshow(face, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            colour_sources[signed] = ax.imshow(
                scaled, cmap=DIVERGING if signed else SEQUENTIAL, vmin=-1 if signed else 0,
                vmax=1, alpha=np.clip(2 * np.abs(scaled), 0, 1), interpolation="nearest")
            ax.set_title(f"{METHOD_TITLES[method]}\n1 = {scale:.2g}", fontsize=7)
        for signed, source in sorted(colour_sources.items()):
            figure.colorbar(source, ax=axes, shrink=0.7, ticks=[-1, 0, 1] if signed else [0, 1],
                            label="signed" if signed else "magnitude")
    return figure
