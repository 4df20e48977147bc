"""Figures for papers: each function returns a :class:`matplotlib.figure.Figure`.

Conventions: colour-blind-safe colour maps (viridis/cividis for magnitudes, a diverging
blue-red map centred on zero for signed values), sizes for one paper column (3.5 in) or two
(7.2 in), fonts readable at that width. Save with ``fig.savefig("x.pdf")`` (vector) and
``fig.savefig("x.png", dpi=300)``. No function changes global matplotlib state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

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
