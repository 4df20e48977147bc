"""The figures' shared style: sizes, rc parameters, colour maps, saving, drawing helpers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure

if TYPE_CHECKING:  # annotations only: figures must not import torch at module level
    import os

    import torch

    from ..models import FERModel

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


def _network_input(model: FERModel, image: Any) -> torch.Tensor:
    """(1, c, H, W) float network input from an image array, an image file or a tensor.

    A tensor is taken as already preprocessed ((c, H, W) or (N, c, H, W); the first image is
    kept); anything else goes through ``model.preprocess``.
    """
    import os

    import torch

    if isinstance(image, (str, os.PathLike)):
        from ..data import read_image

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
