"""Figures of a mapping run (:mod:`interp_fer.mapping`): the faces it saw, the heatmaps of
its two questions (which channel detects which AU: the detector test's ``effect``,
:func:`plot_detector_heatmap`; where channels look: D per region,
:func:`plot_distance_heatmap`) and the deconvnet projections of the detectors of each AU."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure

from ._style import (
    DIVERGING,
    ONE_COLUMN,
    STYLE,
    TWO_COLUMNS,
    _draw_projection,
    _draw_region,
    _gray_faces,
    _image_limits,
    new_figure,
)

if TYPE_CHECKING:  # annotations only: figures must not import torch at module level
    import pandas as pd
    import torch

    from ..au_regions import AURegions
    from ..data import ImageDataset
    from ..mapping import MappingResult
    from ..models import FERModel


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

    from ..preprocessing import Crop

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
                    int(row.crop_width), float(getattr(row, "crop_angle", 0.0)))
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
    from ..faces import landmarks_array

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


def _alpha(result: MappingResult) -> float:
    return float(result.run.get("alpha", 0.05))


def _number(value: float, digits: int = 2) -> str:
    """``value`` with ``digits`` decimals, or "n/a" when it is missing."""
    return f"{value:.{digits}f}" if value is not None and np.isfinite(value) else "n/a"


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


def _region_order(names) -> list[str]:
    """AU regions by number (``AU2`` before ``AU12``), then shams by name."""
    def key(name: str):
        name = str(name)
        return (0, int(name[2:]), "") if name.startswith("AU") and name[2:].isdigit() \
            else (1, 0, name)
    return sorted({str(n) for n in names}, key=key)


def _symmetric_bound(values: np.ndarray, limit: float | None) -> tuple[float, bool]:
    """Colour limit (``limit`` or the largest finite |value|, 1 if none) and whether values
    go beyond it (the colour bar then shows arrows)."""
    finite = np.abs(values[np.isfinite(values)])
    bound = float(limit) if limit is not None else float(finite.max()) if finite.size else 0.0
    bound = bound if bound > 0 else 1.0
    return bound, bool(finite.size and finite.max() > bound)


def _channel_heatmap(values: np.ndarray, bound: float, width: float) -> tuple[Figure, Any, Any]:
    """A new figure, its axes and the image of ``values`` (``(rows, channels)``) on the
    diverging scale ``[-bound, bound]``, NaN grey; call inside the style context."""
    import matplotlib

    figure = new_figure(width, max(1.8, 0.14 * len(values) + 1.1))
    ax = figure.add_subplot()
    cmap = matplotlib.colormaps[DIVERGING].with_extremes(bad="0.85")
    image = ax.imshow(values, cmap=cmap, vmin=-bound, vmax=bound, aspect="auto",
                      interpolation="nearest")
    return figure, ax, image


def _channel_ticks(ax: Any, channels: pd.Index, layer: str, width: float) -> None:
    """Channel numbers along x, at most five ticks an inch of figure width."""
    step = _tick_step(len(channels), most=int(width * 5))
    ax.set_xticks(np.arange(0, len(channels), step), channels[::step])
    ax.set_xlabel(f"channel of {layer}")


def _layer_rows(frame: pd.DataFrame, layer: str, what: str) -> pd.DataFrame:
    part = frame[frame["layer"] == layer]
    if part.empty:
        known = ", ".join(map(str, frame["layer"].unique())) or "none"
        raise ValueError(f"no {what} for layer {layer!r} (layers: {known})")
    return part


def plot_distance_heatmap(
    scores: pd.DataFrame,
    layer: str,
    *,
    mapping: pd.DataFrame | None = None,
    looks: pd.DataFrame | None = None,
    alpha: float = 0.05,
    width: float = TWO_COLUMNS,
    limit: float | None = None,
) -> Figure:
    """*Where channels look*: region x channel heatmap of the distance D.

    Each cell is D(channel, region) (the paper's distance function: the channel's peak
    response inside the region against its peak on the rest of the face, over images) in a
    diverging map centred on zero (red: the channel responds more inside the region). A dot
    marks a pair whose D beats the random placement of the region on the same face
    (``q_value <= alpha``); an open circle marks the channel's ``looks_at`` (its region of
    largest D), when ``mapping`` is given. D says where a channel looks, not what it detects:
    a network with random weights "looks" at eyes and mouth as well (the detector test,
    :func:`plot_detector_heatmap`, answers that). Pairs without a value are grey.

    Parameters
    ----------
    scores
        One row per (layer, channel, AU) with ``distance`` and ``q_value``
        (:attr:`interp_fer.mapping.MappingResult.scores`); other columns are ignored.
    layer
        Which layer to draw.
    mapping
        :attr:`~interp_fer.mapping.MappingResult.mapping` (``looks_at``), for the circles.
    looks
        :attr:`~interp_fer.mapping.MappingResult.looks` (one row per layer, channel and
        region, AU and sham regions): when given, the cells are its D (the values
        ``looks_at`` is chosen from) and the sham regions get rows below the AUs.
    alpha
        False discovery rate of the dots (use the run's, ``result.run["alpha"]``).
    width
        Figure width in inches.
    limit
        Symmetric colour limit; default the largest finite |D| of the layer (1 when there is
        none). Values beyond it saturate, and the colour bar shows an arrow.

    Raises
    ------
    ValueError
        When ``scores`` (or ``looks``) has no row for ``layer``.
    """
    import matplotlib
    from matplotlib.lines import Line2D

    part = _layer_rows(scores, layer, "scores")
    regions = part.assign(region=[f"AU{int(a)}" for a in part["au"]])
    q = regions.pivot(index="region", columns="channel", values="q_value")
    if looks is not None:
        grid = _layer_rows(looks, layer, "looks_at rows").pivot(
            index="region", columns="channel", values="distance")
    else:
        grid = regions.pivot(index="region", columns="channel", values="distance")
    grid = grid.reindex(_region_order(grid.index))
    q = q.reindex(index=grid.index, columns=grid.columns)
    values = grid.to_numpy(dtype=float)
    bound, over = _symmetric_bound(values, limit)
    significant = q.to_numpy(dtype=float) <= alpha
    looked_cols, looked_rows = _marks(mapping, layer, "looks_at", grid)
    with matplotlib.rc_context(STYLE):
        figure, ax, image = _channel_heatmap(values, bound, width)
        rows, cols = np.nonzero(significant)
        ax.plot(cols, rows, ".", color="black", ms=2.5)
        handles = [Line2D([], [], ls="", marker=".", color="black", ms=4)]
        labels = [f"q \u2264 {alpha:g} (D vs the region placed at random)"]
        if mapping is not None:
            ax.plot(looked_cols, looked_rows, "o", mfc="none", mec="black", ms=5, mew=0.7)
            handles.append(Line2D([], [], ls="", marker="o", mfc="none", mec="black", ms=5,
                                  mew=0.7))
            labels.append("looks_at (largest D)")
        ax.set_yticks(np.arange(len(grid)), [str(r).replace("_", " ") for r in grid.index])
        shams = [i for i, r in enumerate(grid.index) if not str(r).startswith("AU")]
        if shams:
            ax.axhline(shams[0] - 0.5, color="black", lw=0.6)
        _channel_ticks(ax, grid.columns, layer, width)
        ax.set_title(f"{layer}: where channels look, distance D per region")
        figure.colorbar(image, ax=ax, label="D", shrink=0.9, extend="both" if over else "neither")
        figure.legend(handles, labels, loc="outside lower center", ncol=len(handles),
                      frameon=False)
    return figure


def _marks(mapping: pd.DataFrame | None, layer: str, column: str, grid: pd.DataFrame,
           where: pd.Series | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grid (column, row) positions of ``mapping[column]`` (region names or AU numbers) for
    the channels of ``layer`` (rows of ``where`` only, when given); values not in the grid's
    rows are left out."""
    if mapping is None:
        return np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    chosen = mapping["layer"] == layer
    if where is not None:
        chosen &= where.fillna(False).astype(bool)
    rows = mapping.loc[chosen & mapping[column].notna(), ["channel", column]]
    names = [f"AU{int(v)}" if not isinstance(v, str) else v for v in rows[column]]
    cols = grid.columns.get_indexer(rows["channel"])
    found = grid.index.get_indexer(names)
    keep = (cols >= 0) & (found >= 0)
    return cols[keep], found[keep]


def plot_detector_heatmap(
    scores: pd.DataFrame,
    layer: str,
    mapping: pd.DataFrame | None = None,
    *,
    column: str = "effect",
    width: float = TWO_COLUMNS,
    limit: float | None = None,
) -> Figure:
    """*Does channel k detect AU a*: AU x channel heatmap of the detector test's ``effect``.

    Each cell is, by default, the report-half ``effect`` of the pair: Spearman's rho between
    the channel's peak response inside AU a's region and AU a's activity (2 AUC - 1 for 0/1
    activity; :mod:`interp_fer.detectors`), in a diverging map centred on zero. For
    ``column="effect"`` the right-hand axis gives each AU's ``control_bar``, the largest
    ``effect`` of any channel of the layer at that AU in the random-weights copies: a
    detector's ``effect`` must exceed it. With ``mapping``, an open circle marks each
    detected pair (``au``: q <= alpha, effect above the bar and above ``out_effect``) and a
    small dot each channel's candidate AU (chosen on the selection half) that was not
    detected. Only the AUs the test ran on (a non-NaN ``effect``) get a row; cells without a
    value (e.g. a report half of fewer than 3 images) are grey.

    Parameters
    ----------
    scores
        One row per (layer, channel, AU) with ``effect`` and ``column``
        (:attr:`interp_fer.mapping.MappingResult.scores`).
    layer
        Which layer to draw.
    mapping
        :attr:`~interp_fer.mapping.MappingResult.mapping` (``au``, ``candidate_au``), for
        the marks.
    column
        The measure drawn: ``effect`` (report half, the decision statistic),
        ``effect_select`` (selection half, where the candidate AU is chosen) or ``partial``
        (report half, the in-minus-out contrast given the other AUs: reported, not decided
        on).
    width
        Figure width in inches.
    limit
        Symmetric colour limit; default the largest finite |value| of the layer (1 when none).

    Raises
    ------
    ValueError
        When ``column`` is not one of those three, or ``scores`` lacks it or has no row for
        ``layer``.
    """
    import matplotlib
    from matplotlib.lines import Line2D

    if column not in _DETECTOR_COLUMNS:
        raise ValueError(f"column {column!r} is not a detector-test measure: use one of "
                         f"{', '.join(_DETECTOR_COLUMNS)}")
    if column not in scores or "effect" not in scores:
        raise ValueError(f"scores have no column {column!r}: run the detector test "
                         "(interp_fer.mapping.map_dataset with an activity source)")
    part = _layer_rows(scores, layer, "scores")
    tested = part.groupby("au")["effect"].apply(
        lambda e: np.isfinite(e.to_numpy(dtype=float)).any())
    aus = sorted(int(a) for a in tested.index[tested.to_numpy(dtype=bool)]) or \
        sorted(int(a) for a in part["au"].unique())
    regions = part.assign(region=[f"AU{int(a)}" for a in part["au"]])
    grid = regions.pivot(index="region", columns="channel", values=column) \
        .reindex([f"AU{a}" for a in aus])
    values = grid.to_numpy(dtype=float)
    bound, over = _symmetric_bound(values, limit)
    detected = None if mapping is None else mapping["au"].notna()
    with matplotlib.rc_context(STYLE):
        figure, ax, image = _channel_heatmap(values, bound, width)
        if mapping is not None:
            cols, rows = _marks(mapping, layer, "au", grid)
            ax.plot(cols, rows, "o", mfc="none", mec="black", ms=5, mew=0.9)
            cols, rows = _marks(mapping, layer, "candidate_au", grid, where=~detected)
            ax.plot(cols, rows, ".", color="black", ms=2.5)
            handles = [Line2D([], [], ls="", marker="o", mfc="none", mec="black", ms=5,
                              mew=0.9),
                       Line2D([], [], ls="", marker=".", color="black", ms=4)]
            figure.legend(handles, ["detected (the channel detects the AU)",
                                    "candidate AU, not detected"],
                          loc="outside lower center", ncol=2, frameon=False)
        if not np.isfinite(values).any():
            ax.text(0.5, 0.5, f"no {column} values (report half too small?)",
                    transform=ax.transAxes, ha="center", va="center", fontsize=7)
        ax.set_yticks(np.arange(len(grid)), list(grid.index))
        if column == "effect" and "control_bar" in regions:
            _control_bar_axis(ax, regions, grid.index)
        _channel_ticks(ax, grid.columns, layer, width)
        what = {"effect": "effect, report half", "effect_select": "effect, selection half",
                "partial": "partial (reported, not decided on), report half"}[column]
        ax.set_title(f"{layer}: does the channel detect the AU? {what}")
        figure.colorbar(image, ax=ax, label=column, shrink=0.9,
                        extend="both" if over else "neither")
    return figure


#: Measures :func:`plot_detector_heatmap` draws (columns of ``scores``).
_DETECTOR_COLUMNS = ("effect", "effect_select", "partial")


def _control_bar_axis(ax, regions: pd.DataFrame, rows: pd.Index) -> None:
    """Each AU row's ``control_bar`` (one value per layer and AU) on a right-hand axis."""
    bars = regions.groupby("region")["control_bar"].first().reindex(rows)
    right = ax.twinx()
    right.set_ylim(ax.get_ylim())
    right.set_yticks(np.arange(len(rows)),
                     ["\u2013" if not np.isfinite(b) else f"{b:.2f}" for b in bars])
    right.tick_params(axis="y", labelsize=6, length=0)
    right.set_ylabel("control_bar (random weights)", fontsize=6)
    for side in right.spines.values():
        side.set_visible(False)


# -- the AU <-> channel mapping: projections of mapped channels -------------------------------


def _channel_projection(model: FERModel, faces: MappedFaces, layer: str, channel: int):
    """Deconvnet projections of one channel on some faces, ready to draw.

    Returns
    -------
    tuple
        (n, H, W) gray faces, (n, H, W) display-scaled maps, (n, 2) extremum points,
        (n, 2) receptive-field centres or None, (n,) bool active.
    """
    from ..attributions import display_scale
    from ..projections import deconvnet, extremum_points, rf_centres

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

    First the channels that detect ``au`` (the detector test's ``au``), largest report-half
    ``auc`` first; then, to fill the row, channels whose candidate AU it is although the test
    did not pass (column ``fallback`` True: "not a detector"), also by ``auc``.

    Parameters
    ----------
    mapping
        :attr:`interp_fer.mapping.MappingResult.mapping` (``au``, ``candidate_au``, ``auc``).
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
    detected = table[(table["au"] == au).fillna(False).astype(bool)]
    candidates = table[table["au"].isna() & (table["candidate_au"] == au)]
    ranked = [part.sort_values("auc", ascending=False, kind="stable", na_position="last")
              .assign(fallback=flag)
              for part, flag in ((detected, False), (candidates, True)) if len(part)]
    if not ranked:
        return table.head(0).assign(fallback=pd.Series(dtype=bool))
    return pd.concat(ranked).head(count)


def _grid_aus(result: MappingResult, layers: Sequence[str] | None) -> list[int]:
    """Default rows of the projection grid: AUs with a detector, else AUs that are some
    channel's candidate."""
    mapping = result.mapping if layers is None else \
        result.mapping[result.mapping["layer"].isin(list(layers))]
    present = {int(a) for a in mapping["au"].dropna()} or \
        {int(a) for a in mapping["candidate_au"].dropna()}
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
    that detect it (the detector test), largest report-half AUC first, then, when fewer are
    detectors, channels whose candidate AU it is although the test did not pass (titled "not a
    detector"; :func:`grid_channels`). Each cell is the
    channel's deconvnet projection on one of its top-activating faces, over the face, with the
    extremum point (``+``) and the AU's region (dashed outline). Blocks are laid out several
    per row when they fit the width.

    Parameters
    ----------
    model, result, dataset
        The mapping run (:func:`interp_fer.mapping.map_dataset`) and what it was made with.
    aus
        AU numbers, one block each; default every AU with a detector (else every AU that is
        some channel's candidate), in the
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

    from ..au_regions import load_au_regions

    regions = regions or load_au_regions()
    aus = [int(a) for a in (aus if aus is not None else _grid_aus(result, layers))]
    if not aus:
        raise ValueError("no AU to show: no channel of these layers has a candidate AU")
    cells = channels_per_au * faces_per_channel
    cell = min(1.1, width / cells)  # inches: a 64 px face stays legible at about an inch
    per_row = max(1, int(width // (cells * cell + 0.2)))
    rows = -(-len(aus) // per_row)
    chosen = {au: grid_channels(result.mapping, au, channels_per_au, layers) for au in aus}
    any_fallback = any(bool(part["fallback"].any()) for part in chosen.values())
    lines = (2 if any_fallback else 1) if caption else 0
    with matplotlib.rc_context(STYLE):
        figure = new_figure(width, rows * (cell + 0.55) + 0.05 + 0.15 * lines)
        blocks = figure.subfigures(rows, per_row, squeeze=False).ravel()
        for block, au in zip(blocks, aus, strict=False):
            detectors = chosen[au][~chosen[au]["fallback"].astype(bool)]
            none = "" if len(detectors) or chosen[au].empty else " (no detector)"
            block.suptitle(_au_title(regions, au) + none, fontsize=8)
            axes = block.subplots(1, cells, squeeze=False).ravel()
            for ax in axes:
                ax.set_axis_off()
            for slot, row in enumerate(chosen[au].itertuples(index=False)):
                _grid_cells(axes[slot * faces_per_channel:(slot + 1) * faces_per_channel],
                            model, result, dataset, row, au, regions)
            if chosen[au].empty:
                axes[0].text(0.5, 0.5, "no channel", ha="center", va="center",
                             transform=axes[0].transAxes, fontsize=7)
        if caption:
            note = ("+ extremum point of the deconvnet projection (red/blue: positive/negative, "
                    "scaled per cell); dashed: the AU's region")
            if any_fallback:
                note += ("\nnot a detector: the channel's candidate AU (chosen on the "
                         "selection half), but the detector test did not pass")
            figure.supxlabel(note, fontsize=6)
    return figure


def _grid_cells(axes, model: FERModel, result: MappingResult, dataset: ImageDataset, row,
                au: int, regions: AURegions) -> None:
    """Draw one channel's projections on its top faces into ``axes`` (one face each)."""
    faces = top_faces(result, model, dataset, row.layer, int(row.channel), len(axes))
    mark = "\nnot a detector" if row.fallback else ""
    axes[0].set_title(f"{row.layer} #{int(row.channel)}\nAUC {_number(row.auc)}{mark}",
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
