"""Classification figures (:mod:`interp_fer.evaluation`): the confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from ._style import ONE_COLUMN, SEQUENTIAL, STYLE, new_figure


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
