"""One channel's dossier (:func:`plot_channel_dossier`): its top faces and projections, its
response against its AU's activity, the detector test's ``effect`` per AU beside the bar set
by the random-weights copies, and its response per expression."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from ._style import (
    OKABE_ITO,
    ONE_COLUMN,
    STYLE,
    TWO_COLUMNS,
    _draw_point,
    _draw_projection,
    _draw_region,
    _image_limits,
    _point_effects,
    new_figure,
)
from .mapping import (
    MappedFaces,
    _au_title,
    _channel_projection,
    _number,
    mapped_faces,
    top_faces,
)

if TYPE_CHECKING:  # annotations only: figures must not import torch at module level
    import pandas as pd

    from ..au_regions import AURegions
    from ..data import ImageDataset, Record
    from ..mapping import MappingResult
    from ..models import FERModel


# -- a layer's responses per expression --------------------------------------------------------


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
    from ..layers import layer_outputs

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


# -- the AU <-> channel mapping: one channel's dossier -----------------------------------------


def _mapping_row(result: MappingResult, layer: str, channel: int) -> pd.Series:
    rows = result.mapping[(result.mapping["layer"] == layer)
                          & (result.mapping["channel"] == int(channel))]
    if rows.empty:
        raise KeyError(f"channel {channel} of layer {layer!r} is not in the mapping "
                       f"(layers: {', '.join(result.mapping['layer'].unique())})")
    return rows.iloc[0]


def _channel_au(row: pd.Series) -> tuple[int, bool]:
    """A mapping row's AU, and whether the channel detects it (else its candidate AU)."""
    import pandas as pd

    if pd.notna(row["au"]):
        return int(row["au"]), True
    return int(row["candidate_au"]), False


def _file_name(key: object) -> str:
    """The file name of an image key (a path or a ``file#row`` key), for titles."""
    text = str(key)
    return text.replace("\\", "/").rsplit("/", 1)[-1] or text


@dataclass
class ActivityResponses:
    """One channel's in-region response against one AU's activity, on the report half.

    Attributes
    ----------
    au
        AU number.
    activity
        (n,) activity of the AU on each report-half face (``result.activity``).
    response
        (n,) the channel's peak response inside the AU's region on those faces
        (``result.responses``); faces where the region has no cell are left out.
    keys
        (n,) image keys.
    source
        Where the activity came from (``landmarks``, ``labels`` or ``expressions``).
    binary
        Whether the activity takes two values only (present / absent).
    effect
        Spearman's rho (rank-biserial 2 AUC - 1 for binary activity) over the half's faces,
        as the detector test computes it (:func:`interp_fer.detectors.rank_effect`; faces
        without a cell in the region ranked lowest); NaN when undefined.
    missing
        Faces of the half left out of the points because the region had no cell there.
    """

    au: int
    activity: np.ndarray
    response: np.ndarray
    keys: np.ndarray
    source: str
    binary: bool
    effect: float
    missing: int = 0

    @property
    def auc(self) -> float:
        """``(1 + effect) / 2``: the AUC for binary activity, AUC-like otherwise."""
        return (1 + self.effect) / 2


def activity_responses(result: MappingResult, layer: str, channel: int, au: int,
                       half: str = "report") -> ActivityResponses:
    """The points of a channel's response-vs-activity plot (faces of one half of the run).

    Parameters
    ----------
    result
        A mapping run with ``activity``, ``responses`` and ``faces`` (``half``).
    layer, channel
        The channel.
    au
        An AU the detector test ran on (``result.run["detector"]["tested_aus"]``).
    half
        ``"report"`` (where the numbers of the mapping come from) or ``"select"``.

    Raises
    ------
    ValueError
        When the run kept no activity or responses, or did not test ``au``.
    """
    from ..detectors import rank_effect

    if result.activity is None or result.responses is None or result.faces is None:
        raise ValueError("this MappingResult keeps no activity/responses: it was not made by "
                         "interp_fer.mapping.map_dataset with the detector test")
    column = f"AU{int(au)}"
    tested = [int(a) for a in result.run.get("detector", {}).get("tested_aus", [])]
    if column not in result.activity or int(au) not in tested:
        raise ValueError(f"AU{au} was not tested (no activity source); tested AUs: "
                         f"{', '.join(map(str, tested)) or 'none'}")
    if layer not in result.responses:
        raise ValueError(f"no responses for layer {layer!r} "
                         f"(layers: {', '.join(result.responses)})")
    rows = (result.faces["half"] == half).to_numpy()
    x = result.activity[column].to_numpy(dtype=float)[rows]
    every = np.asarray(result.responses[layer][:, int(channel)], dtype=float)  # (N, A)
    y = every[rows, tested.index(au)]
    keys = result.activity["key"].to_numpy(dtype=object)[rows]
    missing = ~np.isfinite(y)
    effect = float("nan")
    if len(x) >= 2:
        # As the detector test ranks them (interp_fer.detectors): a face where the region
        # has no cell (clipped off the image) counts below the channel's lowest response.
        low = np.nanmin(every) if np.isfinite(every).any() else 0.0
        effect = float(rank_effect(np.where(missing, low - 1.0, y)[:, None], x[:, None])[0])
    binary = len(np.unique(x)) == 2 and len(x) > 2  # two faces are not a 0/1 code
    source = result.run.get("activity", {}).get("sources", {}).get(column, "unknown")
    return ActivityResponses(int(au), x[~missing], y[~missing], keys[~missing], source, binary,
                             effect, int(missing.sum()))


def _bare(ax) -> None:
    """No ticks and no frame, but (unlike ``set_axis_off``) axis labels still show."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


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
    """Everything about one channel: where it looks, and whether it detects its AU.

    Panels:

    1. its top-activating faces (titled with the image's file name and its peak) with the
       AU region(s) filled, the extremum point of the channel's deconvnet projection (``+``)
       and the receptive-field centre of its arg-max unit (``o``) drawn over them;
    2. the projections themselves on those faces;
    3. **response vs activity** (the detector test as a picture): on the report-half faces, the
       activity of the channel's AU (its candidate AU when it is not a detector) against the
       channel's peak response inside that AU's region, Spearman's rho (AUC for 0/1
       activity) in the title (:func:`activity_responses`);
    4. the detector test's ``effect`` per tested AU (report half, ``result.scores``), the
       channel's AU outlined, and each AU's ``control_bar`` (the largest ``effect`` of any
       channel of the layer at that AU in the random-weights copies: the bar the channel
       must beat at that AU) as a black tick; ``partial`` (the in-minus-out contrast given
       the other AUs) as small diamonds beside the bars, reported, not decided on;
    5. when the dataset has expression labels, the mean peak response per expression
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
        AU regions drawn on the faces; default the channel's AU (its candidate AU when it is
        not a detector).
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

    from ..au_regions import load_au_regions

    regions = regions or load_au_regions()
    row = _mapping_row(result, layer, channel)
    au, detected = _channel_au(row)
    drawn = [int(a) for a in (aus if aus is not None else [au])]
    if responses is None and dataset.labelled:
        responses = expression_responses(model, result, dataset, layer, max_images=max_images)
    top = top_faces(result, model, dataset, layer, channel, faces)
    cell = (width - 0.8) / faces  # inches per face; the projections' colour bar takes 0.8
    lower_height = max(2.1, 0.3 * width)
    with matplotlib.rc_context(STYLE):
        figure = new_figure(width, 2 * cell + 0.5 + lower_height + 0.3)
        upper, lower = figure.subfigures(2, 1, height_ratios=[2 * cell + 0.5, lower_height])
        face_axes = upper.subplots(2, faces, squeeze=False)
        for ax in face_axes.ravel():
            ax.set_axis_off()
        image = _dossier_faces(face_axes, model, result, top, layer, channel, drawn, regions)
        if image is not None:
            upper.colorbar(image, ax=face_axes[1, :], shrink=0.8, ticks=[-1, 0, 1],
                           label="projection\n(per-face scale)")
        a_ax, p_ax, e_ax = lower.subplots(1, 3, width_ratios=[1.1, 1.4, 1])
        _plot_activity_response(a_ax, result, layer, channel, au)
        _plot_effects(p_ax, result, layer, channel, au, detected)
        _plot_expression_responses(e_ax, responses, channel)
        name = _au_title(regions, au)
        numbers = (f"effect {_number(row['effect'])}, bar {_number(row['control_bar'])}, "
                   f"AUC {_number(row['auc'])}, q {_number(row['q_value'], 3)}")
        verdict = f"detects {name} ({numbers})" if detected else \
            f"not a detector (candidate {name}: {numbers})"
        figure.suptitle(f"{layer} channel {int(channel)}: {verdict}")
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
        face_ax.set_title(f"{_image_name(result, int(top.indices[i]))}\npeak {values[i]:.2g}",
                          fontsize=6.5)
        image = _draw_projection(map_ax, gray[i], maps[i], points[i]) if active[i] else image
    axes[0, 0].set_axis_on()
    _bare(axes[0, 0])
    axes[0, 0].set_ylabel("AU region, points", fontsize=7)
    axes[1, 0].set_axis_on()
    _bare(axes[1, 0])
    axes[1, 0].set_ylabel("projection", fontsize=7)
    return image


def plot_activity_response(
    result: MappingResult,
    layer: str,
    channel: int,
    au: int | None = None,
    *,
    width: float = ONE_COLUMN,
) -> Figure:
    """One channel's response against an AU's activity on the report half (the detector test).

    The dossier's panel on its own: x is the AU's activity on each report-half face
    (``result.activity``; its source in the axis label), y the channel's peak response inside
    the AU's region (``result.responses``); the title gives n and Spearman's rho (the AUC for
    0/1 activity), the number the detector test reports as ``effect``/``auc``.

    Parameters
    ----------
    result
        The mapping run (:func:`interp_fer.mapping.map_dataset`).
    layer, channel
        The channel.
    au
        The AU; default the channel's AU (its candidate AU when it is not a detector).
    width
        Figure width in inches.
    """
    import matplotlib

    row = _mapping_row(result, layer, channel)
    own, detected = _channel_au(row)
    au = own if au is None else int(au)
    verdict = "detects" if detected and au == own else "is not a detector of"
    with matplotlib.rc_context(STYLE):
        figure = new_figure(width, 0.8 * width)
        ax = figure.add_subplot()
        _plot_activity_response(ax, result, layer, channel, au)
        figure.suptitle(f"{layer} channel {int(channel)} {verdict} AU{au}", fontsize=8)
    return figure


def _image_name(result: MappingResult, index: int) -> str:
    """A face's title: its file name (shortened to fit a cell) and dataset index."""
    keys = result.faces.set_index("index")["key"] if result.faces is not None else {}
    name = _file_name(keys[index]) if index in keys else "?"
    stem = name.rsplit(".", 1)[0] or name
    if len(stem) > 20:  # keep both ends: datasets often number their files at the end
        stem = stem[:9] + "\u2026" + stem[-10:]
    return f"{stem} ({index})"


def _plot_activity_response(ax, result: MappingResult, layer: str, channel: int,
                            au: int) -> None:
    """Scatter of the AU's activity against the channel's in-region peak, report half."""
    try:
        points = activity_responses(result, layer, channel, au)
    except ValueError as error:
        ax.set_axis_off()
        ax.text(0.5, 0.5, f"response vs activity\nnot available:\n{error}", ha="center",
                va="center", transform=ax.transAxes, fontsize=6, wrap=True)
        return
    x = points.activity
    if points.binary:  # 0/1 codes: spread the two columns so the points can be seen
        x = x + np.random.default_rng(0).uniform(-0.08, 0.08, len(x))
    ax.plot(x, points.response, "o", ms=2.5, mfc=OKABE_ITO[4], mec="none", alpha=0.7)
    statistic = (f"AUC {_number(points.auc)}" if points.binary
                 else f"Spearman \u03c1 {_number(points.effect)}")
    left_out = f", {points.missing} without a cell" if points.missing else ""
    ax.set_title(f"response vs activity, report half\n(n = {len(x)}{left_out}): {statistic}",
                 fontsize=7)
    ax.set_xlabel(f"AU{points.au} activity ({points.source})")
    ax.set_ylabel(f"peak in AU{points.au} region")
    least = int(result.run.get("detector_options", {}).get("min_report", 30))
    if len(points.activity) + points.missing < least:  # the run's small_sample flag
        ax.text(0.5, 0.05, f"fewer than {least} faces: not evidence", ha="center",
                va="bottom", transform=ax.transAxes, fontsize=6, color=OKABE_ITO[5])


def _plot_effects(ax, result: MappingResult, layer: str, channel: int, au: int,
                  detected: bool) -> None:
    """Bars of ``effect`` per tested AU (report half), each AU's control bar as a tick, and
    ``partial`` as small markers beside the bars (reported, not decided on)."""
    scores = result.scores
    if "effect" not in scores:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no detector test in this run", ha="center", va="center",
                transform=ax.transAxes, fontsize=7)
        return
    part = scores[(scores["layer"] == layer) & (scores["channel"] == int(channel))]
    tested = [int(a) for a in result.run.get("detector", {}).get("tested_aus", [])] or \
        sorted(int(a) for a in part.loc[part["effect"].notna(), "au"])
    part = part.set_index("au").reindex(tested)
    x = np.arange(len(part))
    effect = part["effect"].to_numpy(dtype=float)
    colours = ["0.7"] * len(part)
    chosen = tested.index(au) if au in tested else None
    if chosen is not None:
        colours[chosen] = OKABE_ITO[4] if detected else "0.45"
    bars = ax.bar(x, np.nan_to_num(effect), color=colours, width=0.6)
    if chosen is not None:
        bars[chosen].set_edgecolor("black")
        bars[chosen].set_linewidth(1.0)
    bar = part["control_bar"].to_numpy(dtype=float)
    ax.hlines(bar, x - 0.4, x + 0.4, color="black", lw=1.2,
              label="control_bar (random weights): effect must exceed it")
    if "partial" in part:
        ax.plot(x + 0.38, part["partial"].to_numpy(dtype=float), "d", ms=2.5,
                color=OKABE_ITO[5], mec="none", label="partial (reported, not decided on)")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xticks(x, [str(a) for a in tested], fontsize=6)
    ax.set_xlabel("AU")
    ax.set_ylabel("effect (rank correlation)")
    ax.set_title("effect per AU, report half (outlined: its AU)\n\u2014 control bar to beat "
                 "(random weights)\n\u25c6 partial: reported, not decided on", fontsize=6.5)
    if not np.isfinite(effect).any():
        n = result.run.get("detector", {}).get("n_report")
        ax.text(0.5, 0.5, f"no report-half values (n = {n})", ha="center", va="center",
                transform=ax.transAxes, fontsize=7, backgroundcolor="white")


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
    ax.set_title(f"response per expression (\u00b1 SE)\nforward pass, "
                 f"{len(responses.labels)} labelled faces", fontsize=7)
