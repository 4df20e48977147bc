"""The AU <-> channel mapping: the toolkit's main job, and its tables.

:func:`map_dataset` runs the whole analysis in one streaming pass over a dataset (landmarks
first, cached; then feature maps, extremum points and every statistic, batch by batch, with a
checkpoint to resume from) and returns a :class:`MappingResult` of pandas DataFrames.

:func:`mapping_table` applies Benjamini-Hochberg over *every* (layer, channel, AU) pair of the
run and assigns each channel the AU with the largest distance D among its significant pairs
(DESIGN.md: "the mapping of a channel is the AU with the largest D, when that D is
significant"). A channel with no significant pair keeps an empty ``au``; its best pair's
numbers are still reported (``best_au``), so a reader sees how close it came.

Why D may be negative for a mapped pair: ``r_out`` is a peak over the whole rest of the face,
a much larger area than the region, so even a channel that prefers the region often peaks
elsewhere (D < 0). Significance is judged against the same regions placed at random on the
same faces, which face the same area handicap; ``excess`` (D minus the mean D of those
placements) shows the effect with the area effect removed. D, not ``excess``, ranks the AUs
of a channel, as DESIGN.md says; on planted channels D ranks right where ``excess`` can
prefer a larger, nearby region (``tests/test_mapping_controls.py``).

On aligned faces almost every spatially structured channel, including those of a network
with random weights, beats the random-placement null for some AU: eyes, brows and mouth are
where the image has contrast. The mapping says where a channel responds, not that training
put it there; compare with ``--control randomized`` (Adebayo et al. 2018) and read the
corroborating measures (hit rate against chance, IoU) beside D.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .cells import CellGrid
from .data import ImageDataset
from .labels import au_presence, has_labels, prototype_name
from .layer_mapping import FaceGeometry, LayerMapping, MappingOptions
from .layers import layer_outputs
from .models import FERModel
from .preprocessing import Crop
from .statistics import benjamini_hochberg

MAPPING_COLUMNS = [
    "layer", "channel", "au", "distance", "ci_low", "ci_high", "p_value", "q_value",
    "stability", "hit_rate", "chance_rate", "iou", "n_images",
]
MEASURES = [
    "distance", "excess", "ci_low", "ci_high", "p_value", "p_empirical", "q_value", "stability",
    "hit_rate", "chance_rate", "mean_distance_iod", "iou", "ks", "cohen_d", "label_auc",
    "control_percentile", "n_images",
]


def add_q_values(scores: pd.DataFrame) -> pd.DataFrame:
    """Return ``scores`` with a ``q_value`` column (BH over all rows with a p-value)."""
    scores = scores.copy()
    scores["q_value"] = benjamini_hochberg(scores["p_value"].to_numpy(dtype=float))
    return scores


def mapping_table(scores: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """One row per (layer, channel): its AU when significant, with that pair's measures.

    Parameters
    ----------
    scores
        One row per (layer, channel, AU) with at least the columns of
        :data:`MAPPING_COLUMNS` but ``q_value`` (added here when absent).
    alpha
        False discovery rate.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`MAPPING_COLUMNS` plus ``best_au`` (the AU of largest D, significant or
        not), ``significant`` and, when the scores have them, ``label_auc`` and
        ``control_percentile`` of the chosen pair.
    """
    if "q_value" not in scores:
        scores = add_q_values(scores)
    rows = []
    for (layer, channel), pairs in scores.groupby(["layer", "channel"], sort=False):
        significant = pairs[pairs["q_value"] <= alpha]
        chosen = significant if len(significant) else pairs
        best = chosen.loc[chosen["distance"].idxmax()] if chosen["distance"].notna().any() \
            else chosen.iloc[0]
        row = {column: best[column]
               for column in [*MAPPING_COLUMNS, "label_auc", "control_percentile"]
               if column in best}
        row.update(layer=layer, channel=int(channel), best_au=best["au"],
                   au=best["au"] if len(significant) else None,
                   significant=bool(len(significant)))
        rows.append(row)
    table = pd.DataFrame(rows)
    table["au"] = table["au"].astype("Int64")
    extra = [c for c in ("label_auc", "control_percentile") if c in table]
    return table[[*MAPPING_COLUMNS, "best_au", "significant", *extra]]


def long_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """The long table ``layer, channel, au, measure, value`` (``scores.csv``)."""
    present = [m for m in MEASURES if m in scores]
    long = scores.melt(id_vars=["layer", "channel", "au"], value_vars=present,
                       var_name="measure", value_name="value")
    return long.sort_values(["layer", "channel", "au", "measure"], kind="stable",
                            ignore_index=True)


def channels_for_au(mapping: pd.DataFrame, au: int) -> pd.DataFrame:
    """The channels mapped to ``au``, strongest first."""
    picked = mapping[mapping["au"] == au]
    return picked.sort_values("distance", ascending=False, ignore_index=True)


def compare_with_control(scores: pd.DataFrame, control: pd.DataFrame) -> pd.DataFrame:
    """Add ``control_percentile``: where each pair's ``excess`` falls among the control's.

    For layer l and AU a, the share of the control network's channels of l whose ``excess``
    at a is below this channel's (ties count half). Channels of a trained and a randomised
    network do not correspond one to one, but their populations do: a pair at 0.99 is
    stronger than 99 % of what random filters of the same architecture show on the same
    faces; a pair near 0.5 is what any filter bank gives there (Adebayo et al. 2018).

    Parameters
    ----------
    scores, control
        One row per (layer, channel, AU) with ``excess`` (:attr:`MappingResult.scores` of
        the model and of its control, same layers and AUs).
    """
    out = scores.copy()
    reference = {key: np.sort(part["excess"].dropna().to_numpy())
                 for key, part in control.groupby(["layer", "au"])}
    percentile = np.full(len(out), np.nan)
    for position, (layer, au, value) in enumerate(zip(out["layer"], out["au"], out["excess"],
                                                      strict=True)):
        pool = reference.get((layer, au))
        if pool is None or not len(pool) or not np.isfinite(value):
            continue
        below = np.searchsorted(pool, value, side="left")
        equal = np.searchsorted(pool, value, side="right") - below
        percentile[position] = (below + 0.5 * equal) / len(pool)
    out["control_percentile"] = percentile
    return out


def layer_summary(result: MappingResult) -> pd.DataFrame:
    """Per layer: how many channels are mapped and how strongly their chosen pairs hold up.

    Columns: ``channels``, ``mapped``, and over the mapped channels' pairs the median
    ``excess`` (D beyond the random-placement null), the mean pointing ``hit_rate`` minus
    its ``chance_rate``, and (with labels) the mean ``|label_auc - 0.5|``. Put beside the
    same summary of ``--control randomized``, it shows how much of the mapping training
    explains (Adebayo et al. 2018).
    """
    rows = []
    scores = result.scores.set_index(["layer", "channel", "au"])
    for layer, part in result.mapping.groupby("layer", sort=False):
        mapped = part[part["au"].notna()]
        keys = [(layer, int(c), int(a)) for c, a in zip(mapped["channel"], mapped["au"],
                                                         strict=True)]
        chosen = scores.loc[keys] if keys else scores.iloc[:0]
        row = {"layer": layer, "channels": len(part), "mapped": len(mapped),
               "median_excess": float(chosen["excess"].median()) if keys else np.nan,
               "hit_minus_chance": float((chosen["hit_rate"] - chosen["chance_rate"]).mean())
               if keys else np.nan}
        if "label_auc" in chosen:
            row["label_auc_strength"] = float((chosen["label_auc"] - 0.5).abs().mean()) \
                if keys else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def summary_counts(mapping: pd.DataFrame) -> pd.Series:
    """Number of channels mapped to each AU (``none`` for unmapped channels)."""
    labels = mapping["au"].astype("string").fillna("none")
    return labels.value_counts().rename("channels")



# --------------------------------------------------------------------------------------------
# The streaming pass


@dataclass
class MappingResult:
    """Everything :func:`map_dataset` computed.

    Attributes
    ----------
    mapping
        One row per (layer, channel) (:func:`mapping_table`).
    scores
        One row per (layer, channel, AU) with every measure, q-values included.
    run
        What was run on what: model, layers, data, options, versions, image counts by
        landmark status, skipped inputs with reasons, wall seconds per phase (``run.json``).
    landmarks
        The landmark table of the dataset (:func:`interp_fer.faces.landmarks_table`).
    faces
        The mapped images: dataset ``index``, ``key`` and the crop fed to the network.
    top_images
        Per layer, ``values``/``indices`` (K, k): each channel's top-activating images.
    expressions
        With expression labels: one row per (layer, channel, expression), the one-vs-rest
        ``auc`` of the channel's peak response.
    """

    mapping: pd.DataFrame
    scores: pd.DataFrame
    run: dict[str, Any]
    landmarks: pd.DataFrame | None = None
    faces: pd.DataFrame | None = None
    top_images: dict[str, dict[str, np.ndarray]] | None = None
    expressions: pd.DataFrame | None = None

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``mapping.csv``, ``scores.csv``, ``run.json`` (and ``expressions.csv``)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.mapping.to_csv(out / "mapping.csv", index=False)
        long_scores(self.scores).to_csv(out / "scores.csv", index=False)
        if self.expressions is not None:
            self.expressions.to_csv(out / "expressions.csv", index=False)
        with open(out / "run.json", "w") as handle:
            json.dump(self.run, handle, indent=2, default=_json_default)
        return out


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@dataclass
class _Face:
    """One usable image: its dataset position, network-input crop and geometry."""

    index: int
    key: str
    crop: Crop
    landmarks: np.ndarray  # (68, 2) (x, y) on the network input grid


def _choose_crop(shape: tuple[int, ...], box: tuple[float, float, float, float] | None,
                 crop: str) -> Crop:
    if crop == "none" or box is None:
        return Crop.whole(shape)
    if crop == "face":
        return Crop.around(box)
    # auto: registered crops (the face fills most of the image) are fed whole, as the
    # models' publishers did; photos with a small face are cut around it.
    face_area = (box[2] - box[0]) * (box[3] - box[1])
    return Crop.whole(shape) if face_area >= 0.25 * shape[0] * shape[1] else Crop.around(box)


def _landmark_pass(dataset: ImageDataset, settings: Any, progress: bool
                   ) -> tuple[pd.DataFrame, list[tuple[int, ...] | None]]:
    """Landmarks of every image, and each image's shape (None when unreadable)."""
    from .faces import landmarks_table

    shapes: list[tuple[int, ...] | None] = []

    def items():
        for sample in dataset.samples():
            shapes.append(None if sample.image is None else sample.image.shape)
            yield sample.key, sample.image, sample.error

    table = landmarks_table(items(), settings=settings, progress=progress, total=len(dataset))
    return table, shapes


def _faces(table: pd.DataFrame, shapes: list[tuple[int, ...] | None], crop: str,
           input_size: tuple[int, int]) -> tuple[list[_Face], list[tuple[str, str]]]:
    """Usable faces in dataset order, and (key, reason) of every image left out."""
    from .faces import landmarks_array

    points = landmarks_array(table)  # (N, 68, 2)
    faces, skipped = [], []
    for index, row in enumerate(table.itertuples(index=False)):
        if not np.isfinite(points[index]).all():
            skipped.append((row.key, f"{row.status}: {row.message}".rstrip(": ")))
            continue
        box = (row.box_left, row.box_top, row.box_right, row.box_bottom)
        chosen = _choose_crop(shapes[index], box, crop)
        landmarks = chosen.to_input(points[index], input_size)
        faces.append(_Face(index, row.key, chosen, landmarks))
    return faces, skipped


def input_landmarks(model: FERModel, dataset: ImageDataset, *, crop: str = "auto",
                    landmark_settings: Any = None, progress: bool = False) -> np.ndarray:
    """Landmarks of every usable face, on the network input grid, as the mapping sees them.

    Parameters
    ----------
    model
        Gives the input size.
    dataset
        Face images.
    crop, landmark_settings
        As in :func:`map_dataset`.
    progress
        Show a progress bar.

    Returns
    -------
    numpy.ndarray
        (n_faces, 68, 2) (x, y) in input pixels, in dataset order; images without landmarks
        are left out.
    """
    from .faces import LandmarkSettings

    table, shapes = _landmark_pass(dataset, landmark_settings or LandmarkSettings(), progress)
    faces, _ = _faces(table, shapes, crop, model.input_size)
    return np.stack([f.landmarks for f in faces]) if faces else np.zeros((0, 68, 2))


def _geometry(faces: list[_Face], regions: Any, aus: tuple[int, ...],
              size: tuple[int, int]) -> FaceGeometry:
    from .faces import inter_ocular_distance

    masks = np.zeros((len(faces), len(aus), *size), dtype=bool)
    face_masks = np.zeros((len(faces), *size), dtype=bool)
    iod = np.zeros(len(faces))
    for i, face in enumerate(faces):
        by_au = regions.masks(face.landmarks, size, aus=list(aus))
        for j, au in enumerate(aus):
            masks[i, j] = by_au[f"AU{au:02d}"]
        face_masks[i] = regions.face_mask(face.landmarks, size)
        iod[i] = float(inter_ocular_distance(face.landmarks))
    return FaceGeometry(masks, face_masks, iod)


def _locate(model: FERModel, layer: str, inputs: torch.Tensor, acts: torch.Tensor,
            field: Any, locate: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, K, 2) extremum points in input pixels and (N, K) activity of every channel."""
    if locate == "deconv":
        from .projections import deconvnet, extremum_points

        # A few channels at a time, with a small working set: only their extremum points
        # are kept, so the maps of a whole layer never sit in memory together (and smaller
        # backward batches are no slower on a CPU).
        points, active = [], []
        for start in range(0, acts.shape[1], 32):
            channels = list(range(start, min(start + 32, acts.shape[1])))
            projections = deconvnet(model.module, inputs, layer, channels,
                                    max_memory=128 * 2**20)
            points.append(extremum_points(projections).numpy())
            active.append(projections.active.cpu().numpy())
        return np.concatenate(points, axis=1), np.concatenate(active, axis=1)
    flat = acts.flatten(2)
    values, position = flat.max(dim=2)
    position = position.cpu().numpy()
    rows, cols = field.centre(position // acts.shape[-1], position % acts.shape[-1])
    return np.stack([rows, cols], axis=-1).astype(np.float64), (values > 0).cpu().numpy()


class _Clock:
    """Wall seconds spent per phase of a run (``run.json`` ``seconds``; this session only)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = round(self.seconds.get(phase, 0.0)
                                        + time.perf_counter() - start, 3)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("interp_fer", "torch", "captum", "numpy", "scipy", "pandas", "dlib-bin",
                 "scikit-image"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def map_dataset(
    model: FERModel,
    dataset: ImageDataset,
    layers: Sequence[str] | None = None,
    *,
    aus: Sequence[int] | None = None,
    locate: str = "deconv",
    options: MappingOptions | None = None,
    crop: str = "auto",
    batch_size: int = 64,
    alpha: float = 0.05,
    labels: bool | None = None,
    landmark_settings: Any = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    progress: bool = True,
) -> MappingResult:
    """Map every channel of ``layers`` to the facial Action Unit it detects.

    Parameters
    ----------
    model
        The network (:func:`interp_fer.load_model`).
    dataset
        Face images (:func:`interp_fer.open_dataset`).
    layers
        Layer names; default the model's convolutional stages.
    aus
        AU numbers; default every AU defined in ``landmarks/au_regions.json``.
    locate
        Extremum point of each (image, channel): ``"deconv"`` (centroid of the deconvnet
        projection's top 1 %) or ``"rf-center"`` (receptive-field centre of the arg-max unit).
    options
        Statistical choices (:class:`MappingOptions`), the seed included.
    crop
        ``"auto"`` (whole image for registered crops, a square around the face in photos),
        ``"face"`` or ``"none"``.
    batch_size
        Images per forward pass.
    alpha
        False discovery rate of the mapping.
    labels
        Score channels against the faces' labels (AU columns, or expressions through the
        EMFACS prototypes, :mod:`interp_fer.labels`): ``label_auc`` per (channel, AU) and
        one-vs-rest AUCs per expression. Default: when the dataset has labels.
    landmark_settings
        :class:`interp_fer.faces.LandmarkSettings` (default: automatic).
    checkpoint
        File to checkpoint to (resumed when it matches this run's arguments).
    checkpoint_every
        Batches between checkpoints.
    progress
        Show progress bars (tqdm; notebooks too).

    Returns
    -------
    MappingResult
    """
    from tqdm.auto import tqdm

    from .au_regions import load_au_regions
    from .checkpoint import Checkpoint, run_key
    from .faces import LandmarkSettings
    from .layers import receptive_field

    if locate not in ("deconv", "rf-center"):
        raise ValueError(f"locate must be 'deconv' or 'rf-center', not {locate!r}")
    if crop not in ("auto", "face", "none"):
        raise ValueError(f"crop must be 'auto', 'face' or 'none', not {crop!r}")
    options = options or MappingOptions()
    settings = landmark_settings or LandmarkSettings()
    if settings.faces != "largest":
        raise ValueError("the mapping takes one face per image: use LandmarkSettings("
                         "faces='largest') (crop group photos into single faces first)")
    layers = tuple(layers or model.stages)
    if not layers:
        raise ValueError("no layers to map: name some (interp-fer layers lists them)")
    regions = load_au_regions()
    aus = tuple(int(a) for a in (aus or [r.number for r in regions]))
    size = model.input_size

    clock = _Clock()
    with clock("landmarks"):
        table, shapes = _landmark_pass(dataset, settings, progress)
    faces, skipped = _faces(table, shapes, crop, size)
    if len(faces) < 2:
        raise ValueError(f"only {len(faces)} usable face(s) in {dataset.source}: "
                         "the mapping needs at least 2")
    records = [dataset.records[f.index] for f in faces]
    available = has_labels(records)
    if labels and not available:
        raise ValueError(f"{dataset.source}: no expression or AU labels to score against "
                         "(give a labels CSV, e.g. interp-fer map --labels)")
    labelled = available if labels is None else bool(labels)
    n_classes = len(dataset.class_names) if labelled else None
    presence = classes = None  # per mapped face, sliced batch by batch
    if labelled:
        presence = au_presence(records, aus)
        classes = np.array([-1 if r.label is None else r.label for r in records])

    shape = (model.preprocess.channels, *size)
    probe = layer_outputs(model.module, layers, torch.zeros(1, *shape, device=model.device))
    fields = {name: receptive_field(model, name) for name in layers}
    grids = {name: CellGrid.from_field(fields[name], tuple(probe[name].shape[-2:]), size)
             for name in layers}

    key = run_key({"model": model.source or model.name, "layers": layers, "aus": aus,
                   "data": dataset.source, "n": len(dataset), "locate": locate,
                   "crop": crop, "batch": batch_size, "options": asdict(options),
                   "labels": labelled,
                   "landmarks": settings.fingerprint()})
    saver = Checkpoint(checkpoint, key) if checkpoint else None
    resumed = saver.load() if saver else None
    start = resumed[0] if resumed else 0

    batches = [faces[i:i + batch_size] for i in range(0, len(faces), batch_size)]
    accumulators: dict[str, LayerMapping] = {}
    bar = tqdm(total=len(faces), desc=f"map {model.name}", unit="face", disable=not progress,
               initial=sum(len(b) for b in batches[:start]))
    for number, batch in enumerate(batches):
        if number >= start or not accumulators:
            with clock("forward"):
                images = [dataset.load(dataset.records[f.index]).image for f in batch]
                inputs = model.preprocess([f.crop.apply(image)
                                           for f, image in zip(batch, images, strict=True)])
                inputs = inputs.to(model.device)
                acts = layer_outputs(model.module, layers, inputs)
        if not accumulators:  # the first batch fixes bins and thresholds, resumed or not
            accumulators = {name: LayerMapping.calibrate(name, grids[name], aus, acts[name],
                                                         options, n_classes) for name in layers}
            if resumed:
                for name, mapping in accumulators.items():
                    prefix = f"{name}/"
                    mapping.restore({k[len(prefix):]: v for k, v in resumed[1].items()
                                     if k.startswith(prefix)})
        if number < start:
            continue
        with clock("geometry"):
            geometry = _geometry(batch, regions, aus, size)
        indices = np.array([f.index for f in batch])
        rows = slice(number * batch_size, number * batch_size + len(batch))
        batch_presence = None if presence is None else presence[rows]
        batch_classes = None if classes is None else classes[rows]
        for name in layers:
            with clock(f"locate ({locate})"):
                points, active = _locate(model, name, inputs, acts[name], fields[name], locate)
            with clock("statistics"):
                accumulators[name].update(indices, acts[name], geometry, points, active,
                                          batch_presence, batch_classes)
        bar.update(len(batch))
        done = number + 1
        if saver and (done % checkpoint_every == 0) and done < len(batches):
            saver.save(done, {f"{name}/{k}": v for name, m in accumulators.items()
                              for k, v in m.state().items()})
    bar.close()

    with clock("scores"):
        scores = add_q_values(pd.concat([accumulators[name].scores() for name in layers],
                                        ignore_index=True))
        mapping = mapping_table(scores, alpha)
    statuses = table["status"].value_counts().to_dict()
    run = {
        "model": {"name": model.name, "source": model.source, "input_size": list(size),
                  "class_names": list(model.class_names)},
        "layers": list(layers),
        "aus": list(aus),
        "data": {"source": dataset.source, "n_images": len(dataset),
                 "n_mapped": len(faces), "n_skipped": len(skipped)},
        "landmark_status": {str(k): int(v) for k, v in statuses.items()},
        "landmark_settings": asdict(settings),
        "skipped": [{"key": k, "reason": r} for k, r in skipped],
        "locate": locate,
        "crop": crop,
        "alpha": alpha,
        "options": asdict(options),
        "seed": options.seed,
        "labels": _label_summary(records, presence, aus) if labelled else None,
        "versions": _versions(),
        "seconds": clock.seconds,
    }
    if saver:
        saver.clear()
    face_table = pd.DataFrame([
        {"index": f.index, "key": f.key, "crop_top": f.crop.top, "crop_left": f.crop.left,
         "crop_height": f.crop.height, "crop_width": f.crop.width} for f in faces])
    top = {name: accumulators[name].top.state() for name in layers}
    expressions = None
    if labelled and dataset.class_names:
        expressions = pd.concat([accumulators[name].expression_scores(dataset.class_names)
                                 for name in layers], ignore_index=True)
    return MappingResult(mapping, scores, run, table, face_table, top, expressions)


def _label_summary(records: list[Any], presence: np.ndarray, aus: tuple[int, ...]
                   ) -> dict[str, Any]:
    """How many mapped faces carry which labels (``run.json``); ``presence`` (N, A)."""
    known = np.isfinite(presence)
    return {
        "from_au_columns": sum(bool(r.aus) for r in records),
        "from_expressions": sum(bool(not r.aus and prototype_name(r.label_name))
                                for r in records),
        "au_present": {f"AU{au}": int(np.nansum(presence[:, j])) for j, au in enumerate(aus)},
        "au_known": {f"AU{au}": int(known[:, j].sum()) for j, au in enumerate(aus)},
    }
