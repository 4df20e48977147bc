"""Classification figures (:mod:`interp_fer.evaluation`): the confusion matrix, and per-class
accuracy across datasets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from ._style import OKABE_ITO, ONE_COLUMN, SEQUENTIAL, STYLE, TWO_COLUMNS, new_figure


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


def plot_dataset_comparison(
    per_class: Mapping[str, Mapping[str, Mapping[str, float]]],
    *,
    title: str | None = None,
    width: float = TWO_COLUMNS,
) -> Figure:
    """Per-class accuracy of one model on several datasets, as grouped bars.

    Parameters
    ----------
    per_class
        Dataset name -> class name -> {"accuracy", "n"}
        (:attr:`interp_fer.evaluation.Evaluation.per_class` of each dataset). Classes are
        shown in the order first met; each bar carries its number of images, and a class a
        dataset lacks (n = 0) has no bar, only its "n=0" mark, so it is not mistaken for 0 %.
    title
        Axes title.
    width
        Figure width in inches.
    """
    import matplotlib

    datasets = list(per_class)
    if not datasets:
        raise ValueError("plot_dataset_comparison needs at least one dataset")
    classes: list[str] = []
    for stats in per_class.values():
        classes += [c for c in stats if c not in classes]
    n_sets = len(datasets)
    bar = 0.8 / n_sets
    x = np.arange(len(classes))
    with matplotlib.rc_context(STYLE):
        figure = new_figure(width, width * 0.42)
        ax = figure.add_subplot()
        for j, data in enumerate(datasets):
            stats = per_class[data]
            acc = np.array([_accuracy(stats.get(c)) for c in classes])
            counts = [int((stats.get(c) or {}).get("n") or 0) for c in classes]
            offset = (j - (n_sets - 1) / 2) * bar
            colour = OKABE_ITO[j % len(OKABE_ITO)]
            ax.bar(x + offset, np.nan_to_num(acc), bar, color=colour,
                   label=f"{data} ({sum(counts)} images)")
            for xi, value, count in zip(x + offset, acc, counts, strict=True):
                # the number of images over each bar: a real 0 % differs from no image
                ax.text(xi, 0.01 if np.isnan(value) else value + 0.01, f"n={count}",
                        ha="center", va="bottom", fontsize=5, rotation=90,
                        color="0.4" if np.isnan(value) else "black")
        ax.set_xticks(x, classes, rotation=30, ha="right")
        ax.set_ylim(0, 1.12)  # room for the counts over 100 % bars
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_ylabel("accuracy (recall)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        if title:
            ax.set_title(title)
    return figure


def _accuracy(stats: Mapping[str, float] | None) -> float:
    if not stats or not stats.get("n"):
        return float("nan")
    value = stats.get("accuracy")
    return float("nan") if value is None else float(value)
