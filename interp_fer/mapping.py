"""The AU <-> channel mapping: the toolkit's main job, and its tables.

Two questions, kept apart (docs/method.md):

1. **Does channel k detect AU a?** (``au`` in ``mapping.csv``). The detector test of
   :mod:`interp_fer.detectors`: the channel's peak response inside AU a's region rises with
   AU a's *activity* on the face (landmark proxies, :mod:`interp_fer.au_activity`, or the
   user's AU codes), given the other AUs and the channel's response elsewhere on the face;
   chosen on one half of the images and tested on the other (permutation p-values,
   Benjamini-Hochberg over every tested pair); and more than any channel of the same layer of
   a copy of the network with every parameter re-drawn (built into the decision).
2. **Where does channel k look?** (``looks_at``). The paper's distance function D (Zhu, Fan &
   Yuan), computed for every AU region and for *sham* regions (the same shape at non-AU places
   of the face). It is descriptive: on aligned faces nearly every spatially structured
   channel, trained or random, "looks at" eyes, brows or mouth, so it says nothing about what
   training put there. Where a region's cells at a layer are contained in another region's
   cells on most faces, the two cannot be told apart at that layer (``looks_at_resolvable``).

:func:`map_dataset` runs the analysis in three stages a reader can follow:

* :func:`prepare_faces`: landmarks (cached), crops, AU regions, AU activity;
* :func:`stream_layers`: one pass over the faces, batch by batch, for the network and its
  random-weights control: per-image region responses (in memory, or in the chunked Zarr
  store of :mod:`interp_fer.feature_store`), and the streamed corroborating measures of
  :class:`interp_fer.layer_mapping.LayerMapping` (checkpointed); on Dask workers with
  :mod:`interp_fer.distributed`, with identical results;
* :func:`interp_fer.decision.decide`: the detector test, ``looks_at``, and the tables, read
  back from the store in blocks of channels (here or on the Dask workers).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .cells import CellGrid, SparseMasks
from .data import ImageDataset, Record
from .decision import (  # noqa: F401  (stage 3 lives in decision.py; importable from here)
    DEFAULT_MEMORY,
    MAPPING_COLUMNS,
    StoredResponses,
    decide,
    looks_at_table,
)
from .detectors import DetectorOptions, selection_half
from .labels import EMFACS_PROTOTYPES, au_presence, has_labels, prototype_name
from .layer_mapping import FaceGeometry, LayerMapping, MappingOptions
from .layers import layer_outputs
from .models import FERModel
from .preprocessing import Crop
from .statistics import benjamini_hochberg

#: Measures of ``scores.csv`` (long format, one row per layer, channel, AU and measure).
MEASURES = [
    "effect_select", "effect", "out_effect", "partial", "control_bar", "distance", "excess", "ci_low", "ci_high",
    "p_value", "q_value", "stability", "hit_rate", "chance_rate", "mean_distance_iod", "iou",
    "ks", "cohen_d", "label_auc", "control_percentile", "n_images",
]
ACTIVITY_SOURCES = ("auto", "landmarks", "labels", "expressions")


def add_q_values(scores: pd.DataFrame) -> pd.DataFrame:
    """Return ``scores`` with a ``q_value`` column (BH over all rows with a p-value)."""
    scores = scores.copy()
    scores["q_value"] = benjamini_hochberg(scores["p_value"].to_numpy(dtype=float))
    return scores


def long_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """The long table ``layer, channel, au, measure, value`` (``scores.csv``)."""
    present = [m for m in MEASURES if m in scores]
    long = scores.melt(id_vars=["layer", "channel", "au"], value_vars=present,
                       var_name="measure", value_name="value")
    return long.sort_values(["layer", "channel", "au", "measure"], kind="stable",
                            ignore_index=True)


def channels_for_au(mapping: pd.DataFrame, au: int) -> pd.DataFrame:
    """The channels detected as detectors of ``au``, strongest (report-half AUC) first."""
    picked = mapping[mapping["au"] == au]
    return picked.sort_values("auc", ascending=False, ignore_index=True)


def compare_with_control(scores: pd.DataFrame, control: pd.DataFrame) -> pd.DataFrame:
    """Add ``control_percentile``: where each pair's ``excess`` falls among the control's.

    For layer l and AU a, the share of the control network's channels of l whose ``excess``
    (D beyond the random-placement null: where the channel looks) at a is below this channel's (ties count
    half). It places *where a channel looks* among what random filters show on the same faces
    (Adebayo et al. 2018); the detector test has its own control built in.

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
    """Per layer: channels, detectors of the network and of its random-weights control.

    Columns: ``channels``, ``detectors`` (channels with an ``au``), ``control_detectors``
    (the same test run on the random-weights copy against a second copy: what chance and the
    architecture give), ``median_auc`` of the detectors (report half), and ``sham_rate``
    (share of channels whose ``looks_at`` is a sham region) beside ``sham_share`` (share of
    the regions that are shams: what a sham wins by chance).
    """
    rows = []
    control = result.control_detectors
    for layer, part in result.mapping.groupby("layer", sort=False):
        mapped = part[part["au"].notna()]
        looked = part["looks_at"].dropna().astype(str)
        row = {"layer": layer, "channels": len(part), "detectors": len(mapped),
               "median_auc": float(mapped["auc"].median()) if len(mapped) else np.nan,
               "sham_rate": float(looked.str.startswith("sham").mean()) if len(looked)
               else np.nan,
               "sham_share": result.run.get("looks_at", {}).get("sham_share", np.nan)}
        if control is not None:
            row["control_detectors"] = int(control.loc[control["layer"] == layer, "au"]
                                           .notna().sum())
        rows.append(row)
    return pd.DataFrame(rows)


def summary_counts(mapping: pd.DataFrame) -> pd.Series:
    """Number of channels detecting each AU (``none`` for channels without one)."""
    labels = mapping["au"].astype("string").fillna("none")
    return labels.value_counts().rename("channels")


def headline(result: MappingResult) -> str:
    """One line: detectors found in the network and in its random-weights control."""
    mapping = result.mapping
    found = int(mapping["au"].notna().sum())
    layers = ", ".join(result.run["layers"])
    text = f"{found} of {len(mapping)} channels of {layers} are AU detectors"
    control = result.control_detectors
    if control is not None:
        text += (f"; the random-weights control: {int(control['au'].notna().sum())} of "
                 f"{len(control)}")
    detector = result.run.get("detector", {})
    if detector.get("small_sample"):
        text += (f" (small sample: {detector.get('n_report')} report images, too few to map "
                 "anything)")
    return text


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class MappingResult:
    """Everything :func:`map_dataset` computed.

    Attributes
    ----------
    mapping
        One row per (layer, channel), columns :data:`MAPPING_COLUMNS` (``mapping.csv``):
        the detector test's verdict ``au`` and its numbers, ``looks_at`` and the
        corroborating measures of that region.
    scores
        One row per (layer, channel, AU) with every measure (``scores.csv``, long format).
    run
        What was run on what: model, layers, data, options, activity sources, detector counts
        of the network and its control, sham rate, image counts by landmark status, clipped
        regions, skipped inputs with reasons, wall seconds per phase (``run.json``).
    landmarks
        The landmark table of the dataset (:func:`interp_fer.faces.landmarks_table`).
    faces
        The mapped images: dataset ``index``, ``key``, the crop fed to the network, their
        half (``half``: ``select`` or ``report``) and the regions clipped on them
        (``clipped_regions``, e.g. ``"AU17;AU26"`` for a chin below the frame).
    top_images
        Per layer, ``values``/``indices`` (K, k): each channel's top-activating images.
    expressions
        With expression labels: one row per (layer, channel, expression), the one-vs-rest
        ``auc`` of the channel's peak response.
    activity
        One row per mapped face, one column per tested AU (``AU1``, ...): the activity the
        detector test used (``activity.csv``).
    responses
        Per layer, ``x_in`` (N, K, A): each face's in-region peak response per channel and
        tested AU (dossier plots of response against activity).
    looks
        One row per (layer, channel, region) with D for AU and sham regions (``looks_at.csv``).
    control_detectors
        The detector table of the random-weights copy tested against a second copy.
    """

    mapping: pd.DataFrame
    scores: pd.DataFrame
    run: dict[str, Any]
    landmarks: pd.DataFrame | None = None
    faces: pd.DataFrame | None = None
    top_images: dict[str, dict[str, np.ndarray]] | None = None
    expressions: pd.DataFrame | None = None
    activity: pd.DataFrame | None = None
    responses: dict[str, np.ndarray] | None = None
    looks: pd.DataFrame | None = None
    control_detectors: pd.DataFrame | None = None

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``mapping.csv``, ``scores.csv``, ``run.json`` and the other tables.

        Every file is written atomically (a temporary file renamed into place), so a reader
        or a killed run never sees half a file.
        """
        from .outputs import write_csv, write_text

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(self.mapping, out / "mapping.csv", index=False)
        write_csv(long_scores(self.scores), out / "scores.csv", index=False)
        if self.expressions is not None:
            write_csv(self.expressions, out / "expressions.csv", index=False)
        if self.activity is not None:
            write_csv(self.activity, out / "activity.csv", index=False)
        if self.faces is not None:
            write_csv(self.faces, out / "faces.csv", index=False)
        if self.looks is not None:
            write_csv(self.looks, out / "looks_at.csv", index=False)
        if self.control_detectors is not None:
            write_csv(self.control_detectors, out / "control_mapping.csv", index=False)
        write_text(json.dumps(self.run, indent=2, default=_json_default), out / "run.json")
        return out


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --------------------------------------------------------------------------------------------
# Stage 1: faces, regions and AU activity


@dataclass
class _Face:
    """One usable image: its dataset position, network-input crop and geometry."""

    index: int
    key: str
    crop: Crop
    landmarks: np.ndarray  # (68, 2) (x, y) on the network input grid


@dataclass
class FaceSet:
    """The faces a mapping run uses, with everything derived from landmarks alone.

    Attributes
    ----------
    faces
        Usable faces in dataset order.
    skipped
        ``(key, reason)`` of every image left out.
    table
        The landmark table (:func:`interp_fer.faces.landmarks_table`).
    records
        The dataset records of ``faces``.
    aus
        AU numbers with a region (where channels look is asked of all of them).
    tested
        AU numbers with a region *and* an activity source (the detector test).
    activity
        (N, len(tested)) activity of every face.
    activity_source
        ``"AU12" -> "labels" | "landmarks" | "expressions"``.
    clipped
        Region name -> number of faces on which part of it lies outside the network input
        (clipped to the image; e.g. a chin cut off by a tight crop).
    clipped_by_face
        Per face, the regions clipped on it (``"AU17;AU26"``, empty when none).
    """

    faces: list[_Face]
    skipped: list[tuple[str, str]]
    table: pd.DataFrame
    records: list[Record]
    aus: tuple[int, ...]
    tested: tuple[int, ...]
    activity: np.ndarray
    activity_source: dict[str, str]
    clipped: dict[str, int] = field(default_factory=dict)
    clipped_by_face: list[str] = field(default_factory=list)

    @property
    def indices(self) -> np.ndarray:
        """(N,) dataset positions of the faces."""
        return np.array([f.index for f in self.faces], dtype=np.int64)


def _choose_crop(shape: tuple[int, ...], landmarks: np.ndarray | None, crop: str,
                 input_size: tuple[int, int]) -> Crop:
    # The toolkit's one face pipeline (interp_fer.face_crops): registered crops whole,
    # other faces aligned on the eye line and cropped with the model's (FER2013) framing.
    from .face_crops import choose_crop

    return choose_crop(shape, landmarks, crop, input_size)[0]


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
        chosen = _choose_crop(shapes[index], points[index], crop, input_size)
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


def label_activity(records: Sequence[Record], aus: Sequence[int]) -> np.ndarray:
    """AU activity from the records' AU columns: (N, A) values as given (0/1 or intensity).

    NaN where a record has no value for the AU (or no AU columns at all).
    """
    out = np.full((len(records), len(aus)), np.nan)
    for i, record in enumerate(records):
        for j, au in enumerate(aus):
            if record.aus and au in record.aus:
                out[i, j] = float(record.aus[au])
    return out


def face_activity(faces: list[_Face], records: Sequence[Record], aus: Sequence[int],
                  source: str = "auto") -> tuple[np.ndarray, tuple[int, ...], dict[str, str]]:
    """The AU activity the detector test uses, and where each AU's came from.

    Parameters
    ----------
    faces, records
        The mapped faces and their records (same order).
    aus
        AU numbers that have a region.
    source
        ``"auto"``: the user's AU columns for every AU coded on *every* face, landmark
        proxies for the others (:mod:`interp_fer.au_activity`); ``"landmarks"``: proxies
        only; ``"labels"``: AU columns only (an AU not coded on every face is not tested);
        ``"expressions"``: EMFACS prototypes of the expression labels (a weak source: every
        face of an expression gets the same AUs).

    Returns
    -------
    activity
        (N, T) for the T tested AUs.
    tested
        The tested AU numbers (those with an activity on every face).
    sources
        ``"AU12" -> source`` per tested AU.
    """
    from .au_activity import ACTIVITY_AUS, au_activity

    if source not in ACTIVITY_SOURCES:
        raise ValueError(f"activity source must be one of {', '.join(ACTIVITY_SOURCES)}, "
                         f"not {source!r}")
    aus = [int(a) for a in aus]
    columns, tested, sources = [], [], {}
    if source == "expressions":
        names = [prototype_name(r.label_name) for r in records]
        if any(n is None for n in names):
            missing = sum(n is None for n in names)
            raise ValueError(f"activity from expressions needs an expression with an EMFACS "
                             f"prototype on every face; {missing} face(s) have none")
        prototyped = sorted({a for aus_ in EMFACS_PROTOTYPES.values() for a in aus_})
        for au in aus:
            if au in prototyped:
                columns.append(np.array([au in EMFACS_PROTOTYPES[n] for n in names], float))
                tested.append(au)
                sources[f"AU{au}"] = "expressions"
    else:
        coded = label_activity(records, aus) if source in ("auto", "labels") else None
        measured = None
        if source in ("auto", "landmarks"):
            proxied = [a for a in aus if a in ACTIVITY_AUS]
            values = au_activity(np.stack([f.landmarks for f in faces]), proxied) if faces \
                else np.zeros((0, len(proxied)))
            measured = dict(zip(proxied, values.T, strict=True))
        for j, au in enumerate(aus):
            if coded is not None and len(faces) and np.isfinite(coded[:, j]).all():
                columns.append(coded[:, j])
                sources[f"AU{au}"] = "labels"
            elif measured is not None and au in measured and np.isfinite(measured[au]).all():
                columns.append(measured[au])
                sources[f"AU{au}"] = "landmarks"
            else:
                continue
            tested.append(au)
    activity = np.stack(columns, axis=1) if columns else np.zeros((len(faces), 0))
    return activity, tuple(tested), sources


def prepare_faces(model: FERModel, dataset: ImageDataset, *, aus: Sequence[int] | None = None,
                  crop: str = "auto", activity: str = "auto", landmark_settings: Any = None,
                  progress: bool = True) -> FaceSet:
    """Stage 1 of :func:`map_dataset`: landmarks, crops, clipped regions and AU activity.

    Parameters
    ----------
    model
        Gives the input size the faces are cropped and scaled to.
    dataset
        Face images (their records carry labels, when any).
    aus
        AU numbers; default every AU with a region in ``landmarks/au_regions.json``.
    crop, activity, landmark_settings, progress
        As in :func:`map_dataset`.
    """
    from .au_regions import load_au_regions, region_clipping
    from .faces import LandmarkSettings

    settings = landmark_settings or LandmarkSettings()
    if settings.faces != "largest":
        raise ValueError("the mapping takes one face per image: use LandmarkSettings("
                         "faces='largest') (crop group photos into single faces first)")
    regions = load_au_regions()
    aus = tuple(int(a) for a in (aus or [r.number for r in regions]))
    table, shapes = _landmark_pass(dataset, settings, progress)
    faces, skipped = _faces(table, shapes, crop, model.input_size)
    if len(faces) < 2:
        raise ValueError(f"only {len(faces)} usable face(s) in {dataset.source}: "
                         "the mapping needs at least 2")
    records = [dataset.records[f.index] for f in faces]
    values, tested, sources = face_activity(faces, records, aus, activity)
    clipped: dict[str, int] = {}
    clipped_by_face = []
    for face in faces:
        cut = [f"AU{regions[name].number}" for name, share in
               region_clipping(regions, face.landmarks, model.input_size).items() if share > 0]
        for key in cut:
            clipped[key] = clipped.get(key, 0) + 1
        clipped_by_face.append(";".join(cut))
    return FaceSet(faces, skipped, table, records, aus, tested, values, sources, clipped,
                   clipped_by_face)


# --------------------------------------------------------------------------------------------
# Stage 2: one streaming pass over the faces


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


def _sham_masks(faces: list[_Face], shams: Any, size: tuple[int, int]) -> np.ndarray:
    """(N, S, H, W) sham-region masks of a batch."""
    out = np.zeros((len(faces), len(shams.names), *size), dtype=bool)
    for i, face in enumerate(faces):
        by_name = shams.masks(face.landmarks, size)
        for j, name in enumerate(shams.names):
            out[i, j] = by_name[name]
    return out


def _locate(model: FERModel, layer: str, inputs: torch.Tensor, acts: torch.Tensor,
            field: Any, locate: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Extremum points (N, K, 2) in input pixels, (N, K) activity, and the (N, K, 2)
    receptive-field centres of each channel's arg-max unit."""
    flat = acts.flatten(2)
    values, position = flat.max(dim=2)
    position = position.cpu().numpy()
    rows, cols = field.centre(position // acts.shape[-1], position % acts.shape[-1])
    centres = np.stack([rows, cols], axis=-1).astype(np.float64)
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
        return np.concatenate(points, axis=1), np.concatenate(active, axis=1), centres
    return centres, (values > 0).cpu().numpy(), centres


class ResponseStore:
    """Per-image arrays of a run, appended batch by batch in image order.

    The detector test ranks and permutes images, so it needs every image's responses, not a
    summary: (N, K, A) float32 per layer and network.
    """

    def __init__(self) -> None:
        self._parts: dict[str, list[np.ndarray]] = {}

    def add(self, name: str, values: np.ndarray) -> None:
        """Append a batch's rows to array ``name``."""
        self._parts.setdefault(name, []).append(np.asarray(values, dtype=np.float32))

    def put(self, name: str, start: int, values: np.ndarray) -> None:
        """Write rows ``start ..`` of ``name``: here only appending (rows come in order).

        The interface of :class:`interp_fer.feature_store.FeatureStore`, which writes
        anywhere.
        """
        have = sum(len(p) for p in self._parts.get(name, []))
        if start != have:
            raise ValueError(f"ResponseStore {name}: rows must come in order; got row {start} "
                             f"after {have} rows")
        self.add(name, values)

    def array(self, name: str) -> np.ndarray:
        """Every row of ``name`` so far (concatenated once, then kept)."""
        parts = self._parts[name]
        if len(parts) > 1:
            self._parts[name] = parts = [np.concatenate(parts)]
        return parts[0]

    def block(self, name: str, channels: slice, columns: list[int] | None = None) -> np.ndarray:
        """Rows of channels ``channels`` of ``name``, only ``columns`` of the last axis (the
        interface of :meth:`interp_fer.feature_store.FeatureStore.block`)."""
        values = self.array(name)[:, channels]
        return values if columns is None else values[..., columns]

    @property
    def n_rows(self) -> int:
        """Rows written so far (of the first array)."""
        return len(self.array(next(iter(self._parts)))) if self._parts else 0

    def state(self) -> dict[str, np.ndarray]:
        return {name: self.array(name) for name in self._parts}

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        self._parts = {name: [values] for name, values in arrays.items()}


def _cell_membership(grid: CellGrid, masks: np.ndarray) -> np.ndarray:
    """(N, R, h*w) boolean: the cells of each region at this layer."""
    n, r = masks.shape[:2]
    cells = grid.cell_masks(SparseMasks.from_dense(masks))
    out = np.zeros((n * r, grid.shape[0] * grid.shape[1]), dtype=bool)
    out[cells.mask, cells.position] = True
    return out.reshape(n, r, -1)


def _containment(member: np.ndarray) -> np.ndarray:
    """(R, R) faces on which region i's cells are all inside region j's cells (i != j)."""
    # i inside j <=> |i and j| == |i|: one batched matrix product instead of an (N, R, R, cells)
    # boolean array.
    cells = member.astype(np.float32)
    size = cells.sum(axis=2)  # (N, R)
    overlap = np.matmul(cells, cells.transpose(0, 2, 1))  # (N, R, R)
    inside = (overlap == size[:, :, None]) & (size[:, :, None] > 0)
    counts = inside.sum(axis=0)
    np.fill_diagonal(counts, 0)
    return counts


@dataclass
class Stream:
    """What :func:`stream_layers` accumulated.

    Attributes
    ----------
    accumulators
        Per layer, the corroborating measures of the network (:class:`LayerMapping`).
    store
        Per-image responses: ``"{network}/{layer}/{in|out|sham_in|sham_out}"`` for networks
        ``model`` and the random-weights copies ``control1``, ``control2``, ...
        (:class:`ResponseStore`).
    containment
        Per layer, (R, R) face counts of region i's cells inside region j's (AUs, then shams).
    agreement
        Per layer, ``[n, n_agree]``: (image, active channel) pairs whose deconvnet location
        lies within 0.1 IOD of the receptive-field centre (``locate='deconv'`` only).
    """

    accumulators: dict[str, LayerMapping]
    store: ResponseStore
    containment: dict[str, np.ndarray]
    agreement: dict[str, np.ndarray]

    def state(self) -> dict[str, np.ndarray]:
        arrays = {f"acc/{name}/{k}": v for name, acc in self.accumulators.items()
                  for k, v in acc.state().items()}
        arrays.update({f"store/{k}": v for k, v in self.store.state().items()})
        arrays.update({f"containment/{k}": v for k, v in self.containment.items()})
        arrays.update({f"agreement/{k}": v for k, v in self.agreement.items()})
        return arrays

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        def part(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

        for name, acc in self.accumulators.items():
            acc.restore(part(f"acc/{name}/"))
        self.store.restore(part("store/"))
        self.containment.update(part("containment/"))
        self.agreement.update(part("agreement/"))

    def merge(self, other: Stream) -> None:
        """Add the accumulators, containment and agreement counts of ``other`` (other images;
        its per-image responses are in the shared store already)."""
        for name, acc in self.accumulators.items():
            acc.merge(other.accumulators[name])
        for name, counts in other.containment.items():
            self.containment[name] = self.containment.get(name, 0) + counts
        for name, seen in other.agreement.items():
            self.agreement[name] = self.agreement.get(name, np.zeros(2)) + seen

    def partial(self) -> dict[str, Any]:
        """What a worker sends back: accumulators, containment and agreement (no store)."""
        return {"accumulators": self.accumulators, "containment": self.containment,
                "agreement": self.agreement}

    @classmethod
    def from_partial(cls, partial: dict[str, Any], store: Any) -> Stream:
        """The inverse of :meth:`partial`, over ``store``."""
        return cls(partial["accumulators"], store, partial["containment"], partial["agreement"])


def _calibration_faces(faces: list[_Face], n: int = 256) -> list[_Face]:
    # Bins and thresholds from a sample spread evenly over the whole dataset, not from its
    # first batch (files sorted by expression would otherwise calibrate on one expression).
    step = max(1, int(np.ceil(len(faces) / n)))
    return faces[::step]


def _forward(model: FERModel, dataset: ImageDataset, batch: list[_Face]) -> torch.Tensor:
    images = [dataset.load(dataset.records[f.index]).image for f in batch]
    inputs = model.preprocess([f.crop.apply(image) for f, image in zip(batch, images, strict=True)])
    return inputs.to(model.device)


def _in_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` itself when its parameters are in ``dtype``, else a copy in ``dtype`` (the
    caller's network is never converted in place)."""
    if all(p.dtype == dtype for p in module.parameters()):
        return module
    return copy.deepcopy(module).to(dtype)


class _MapPass:
    """What every batch of the pass needs, set up once: networks, layers' cell grids and
    receptive fields, regions, labels. Picklable, so a distributed run sends it to workers.
    """

    def __init__(self, model: FERModel, dataset: ImageDataset, faceset: FaceSet,
                 layers: Sequence[str], controls: Sequence[FERModel], locate: str,
                 options: MappingOptions, batch_size: int, labelled: bool) -> None:
        from .au_regions import load_au_regions, load_sham_regions
        from .layers import receptive_field

        self.model, self.dataset, self.faceset = model, dataset, faceset
        self.layers, self.locate, self.options = tuple(layers), locate, options
        self.batch_size = batch_size
        # The forward passes run in options.forward_dtype (float64 by default), so that the
        # responses do not depend on the CPU's float32 kernels; stored as float32. The model
        # itself stays as given (deconvnet locations use it).
        self.dtype = getattr(torch, options.forward_dtype)
        self.exact = {net: _in_dtype(m.module, self.dtype) for net, m in
                      [("model", model)] + [(f"control{i + 1}", c)
                                            for i, c in enumerate(controls)]}
        self.controls = list(self.exact)[1:]
        # Copies that only set the control bar need their in-region responses alone; the
        # last of two or more is tested like the network and needs the out-of-region ones.
        self.with_out = {f"control{len(controls)}"} if len(controls) >= 2 else set()
        self.regions, self.shams = load_au_regions(), load_sham_regions()
        self.n_classes = len(dataset.class_names) if labelled else None
        self.presence = self.classes = None
        if labelled:
            self.presence = au_presence(faceset.records, faceset.aus)
            self.classes = np.array([-1 if r.label is None else r.label
                                     for r in faceset.records])
        size = model.input_size
        shape = (model.preprocess.channels, *size)
        probe = layer_outputs(model.module, self.layers,
                              torch.zeros(1, *shape, device=model.device))
        self.channels = {name: int(probe[name].shape[1]) for name in self.layers}
        self.fields = {name: receptive_field(model, name) for name in self.layers}
        self.grids = {name: CellGrid.from_field(self.fields[name],
                                                tuple(probe[name].shape[-2:]), size)
                      for name in self.layers}

    @property
    def batches(self) -> list[list[_Face]]:
        faces = self.faceset.faces
        return [faces[i:i + self.batch_size] for i in range(0, len(faces), self.batch_size)]

    def calibrate(self) -> dict[str, LayerMapping]:
        """Empty accumulators with bins and thresholds from a sample of the whole dataset."""
        sample = _calibration_faces(self.faceset.faces)
        acts = layer_outputs(self.exact["model"], self.layers,
                             _forward(self.model, self.dataset, sample).to(self.dtype))
        return {name: LayerMapping.calibrate(name, self.grids[name], self.faceset.aus,
                                             acts[name], self.options, self.n_classes)
                for name in self.layers}

    def layout(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """The arrays of a feature store (name -> (shape after the row axis, dtype))."""
        a, s = len(self.faceset.aus), len(self.shams.names)
        out: dict[str, tuple[tuple[int, ...], str]] = {
            "index": ((), "int64"), "landmarks": ((68, 2), "float32"),
            "activity": ((len(self.faceset.tested),), "float64")}
        for name in self.layers:
            k = self.channels[name]
            out.update({f"model/{name}/in": ((k, a), "float32"),
                        f"model/{name}/out": ((k, a), "float32"),
                        f"model/{name}/sham_in": ((k, s), "float32"),
                        f"model/{name}/sham_out": ((k, s), "float32"),
                        f"model/{name}/points": ((k, 2), "float32"),
                        f"model/{name}/active": ((k,), "bool")})
            for net in self.controls:
                out[f"{net}/{name}/in"] = ((k, a), "float32")
                if net in self.with_out:
                    out[f"{net}/{name}/out"] = ((k, a), "float32")
        return out

    def prepare_store(self, store: Any) -> None:
        """Create the store's arrays and write the per-face ones known before the pass."""
        faceset = self.faceset
        store.ensure(self.layout())
        store.write_all("index", faceset.indices)
        store.write_all("landmarks", np.stack([f.landmarks for f in faceset.faces]))
        store.write_all("activity", faceset.activity)
        status = faceset.table["status"].astype(str).to_numpy()
        codes = sorted(set(status))
        # Every dataset image's status (also the unusable ones, which have no row).
        store.set_attrs(status_codes=codes, landmark_status=[codes.index(v) for v in status],
                        layers=list(self.layers), aus=list(faceset.aus),
                        tested=list(faceset.tested), shams=list(self.shams.names))

    def to(self, device: str | torch.device) -> None:
        """Move the network and its random-weights copies to ``device`` (in place)."""
        self.model.to(device)
        for module in self.exact.values():
            module.to(device)

    def empty_stream(self, accumulators: dict[str, LayerMapping], store: Any) -> Stream:
        """A stream with nothing accumulated, calibrated as ``accumulators``."""
        return Stream({name: acc.empty() for name, acc in accumulators.items()}, store, {}, {})

    def run_batch(self, number: int, stream: Stream, clock: Any, complete: bool = True) -> None:
        """Add batch ``number`` to ``stream``: its accumulators, store rows and counts.

        ``complete``: flag the chunk complete in a feature store (False: the caller does,
        after saving what else the chunk needs, :func:`interp_fer.distributed.run_shard`).
        """
        from .accumulators import region_peaks

        batch = self.batches[number]
        model, layers, size = self.model, self.layers, self.model.input_size
        with clock("forward"):
            inputs = _forward(model, self.dataset, batch)
            exact = inputs.to(self.dtype)
            acts = {net: layer_outputs(m, layers, exact) for net, m in self.exact.items()}
        with clock("geometry"):
            geometry = _geometry(batch, self.regions, self.faceset.aus, size)
            sham = _sham_masks(batch, self.shams, size)
            every = np.concatenate([geometry.regions, sham], axis=1)
        indices = np.array([f.index for f in batch])
        start = number * self.batch_size
        rows = slice(start, start + len(batch))
        batch_presence = None if self.presence is None else self.presence[rows]
        batch_classes = None if self.classes is None else self.classes[rows]
        store = stream.store
        for name in layers:
            grid = self.grids[name]
            with clock(f"locate ({self.locate})"):
                points, active, centres = _locate(model, name, inputs, acts["model"][name],
                                                  self.fields[name], self.locate)
            with clock("statistics"):
                r_in, r_out = stream.accumulators[name].update(
                    indices, acts["model"][name], geometry, points, active, batch_presence,
                    batch_classes)
                store.put(f"model/{name}/in", start, r_in)
                store.put(f"model/{name}/out", start, r_out)
                face_cells = torch.from_numpy(grid.cells_in(geometry.face))
                sham_cells = grid.cell_masks(SparseMasks.from_dense(sham))
                s_in, s_out = region_peaks(acts["model"][name], sham_cells,
                                           face_cells.to(acts["model"][name].device))
                store.put(f"model/{name}/sham_in", start, s_in.cpu().numpy())
                store.put(f"model/{name}/sham_out", start, s_out.cpu().numpy())
                if not isinstance(store, ResponseStore):  # memory: decide() needs no points
                    store.put(f"model/{name}/points", start, points)
                    store.put(f"model/{name}/active", start, active)
                in_cells = grid.cell_masks(geometry.sparse_regions)
                for net in self.controls:
                    c_act = acts[net][name]
                    c_in, c_out = region_peaks(c_act, in_cells, face_cells.to(c_act.device))
                    store.put(f"{net}/{name}/in", start, c_in.cpu().numpy())
                    if net in self.with_out:
                        store.put(f"{net}/{name}/out", start, c_out.cpu().numpy())
                counts = _containment(_cell_membership(grid, every))
                stream.containment[name] = stream.containment.get(name, 0) + counts
                if self.locate == "deconv":
                    near = np.linalg.norm(points - centres, axis=-1) <= \
                        0.1 * geometry.iod[:, None]
                    seen = stream.agreement.get(name, np.zeros(2))
                    stream.agreement[name] = seen + [active.sum(), (near & active).sum()]
        if complete and not isinstance(store, ResponseStore):
            store.mark_complete(number)


def stream_layers(model: FERModel, dataset: ImageDataset, faceset: FaceSet,
                  layers: Sequence[str], *, controls: Sequence[FERModel] = (),
                  locate: str = "deconv", options: MappingOptions | None = None,
                  batch_size: int = 64, labelled: bool = False, checkpoint: Any = None,
                  clock: Any = None, progress: bool = True, store: Any = None,
                  cluster: Any = None) -> Stream:
    """Stage 2 of :func:`map_dataset`: one pass over the faces, batch by batch.

    Parameters
    ----------
    model
        The network.
    dataset, faceset
        The images and their faces (:func:`prepare_faces`).
    layers
        Layer names.
    controls
        Random-weights copies (:func:`interp_fer.controls.randomized_copy`), stored as
        ``control1``, ``control2``, ... (:func:`decide` says which is used for what).
    locate, options, batch_size
        As in :func:`map_dataset`.
    labelled
        Accumulate label AUCs (the dataset's expression or AU labels).
    checkpoint
        A :class:`interp_fer.checkpoint.Checkpoint`, saved when due (time-based) and resumed
        from when its key matches.
    clock
        A :class:`_Clock` for wall seconds per phase.
    progress
        Show a progress bar that moves per face.
    store
        A :class:`interp_fer.feature_store.FeatureStore` (chunks of ``batch_size`` rows) for
        the per-image features; default an in-memory :class:`ResponseStore`.
    cluster
        A :class:`interp_fer.distributed.Cluster`: batches go to its Dask workers (needs
        ``store``); None runs here.
    """
    from tqdm.auto import tqdm

    options = options or MappingOptions()
    clock = clock or _Clock()
    job = _MapPass(model, dataset, faceset, layers, controls, locate, options, batch_size,
                   labelled)
    if store is not None:
        if store.chunk != batch_size or store.n_rows != len(faceset.faces):
            raise ValueError(f"{store.path}: chunks of {store.chunk} rows over {store.n_rows} "
                             f"faces; this pass has batches of {batch_size} over "
                             f"{len(faceset.faces)} faces")
        job.prepare_store(store)
    elif cluster is not None:
        raise ValueError("a distributed pass writes its features to a FeatureStore: give store")
    with clock("forward"):
        calibrated = job.calibrate()
    stream = Stream(calibrated, store if store is not None else ResponseStore(), {}, {})
    resumed = checkpoint.load() if checkpoint is not None else None
    start = 0
    if resumed and (store is None or store.complete()[:resumed[0]].all()):
        # With a feature store, the checkpoint's cursor counts only if the store still holds
        # every row before it (a deleted or replaced store means starting over).
        start = resumed[0]
        stream.restore(resumed[1])

    batches = job.batches
    bar = tqdm(total=len(faceset.faces), desc=f"map {model.name}", unit="face",
               disable=not progress, initial=sum(len(b) for b in batches[:start]))
    if cluster is not None:
        with clock("pass (Dask workers)"):  # the workers' phases are not timed one by one
            cluster.run(job, stream, start, checkpoint, bar)
    else:
        for number in range(start, len(batches)):
            job.run_batch(number, stream, clock)
            bar.update(len(batches[number]))
            if checkpoint is not None and number + 1 < len(batches) and checkpoint.due():
                checkpoint.save(number + 1, stream.state())
        if store is not None:  # a killed distributed run's, unused here
            store.drop_partials()
    bar.close()
    return stream


# --------------------------------------------------------------------------------------------
# Stage 3: the decision and the tables


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


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a network's parameters and buffers (names, shapes, dtypes and values).

    Part of a run's checkpoint key: a retrained file at the same path, or a randomised
    copy, never resumes another network's statistics.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.numpy().tobytes() if value.dtype != torch.bfloat16
                      else value.float().numpy().tobytes())
    return digest.hexdigest()


def data_digest(dataset: ImageDataset) -> str:
    """SHA-256 of a dataset's identity: every record's key, label and AU values, and the
    size and modification time of each image file."""
    digest = hashlib.sha256()
    for record in dataset.records:
        stat = ""
        if record.path is not None:
            try:
                info = os.stat(record.path)
                stat = f"{info.st_size}:{info.st_mtime_ns}"
            except OSError:
                stat = "missing"
        digest.update(json.dumps([record.key, record.label, record.label_name, record.usage,
                                  sorted((record.aus or {}).items()), stat,
                                  hashlib.sha256((record.pixels or "").encode()).hexdigest()],
                                 default=str).encode())
    return digest.hexdigest()


def map_dataset(
    model: FERModel,
    dataset: ImageDataset,
    layers: Sequence[str] | None = None,
    *,
    aus: Sequence[int] | None = None,
    locate: str = "deconv",
    options: MappingOptions | None = None,
    detector: DetectorOptions | None = None,
    activity: str = "auto",
    controls: int | Sequence[FERModel] = 4,
    crop: str = "auto",
    batch_size: int = 64,
    alpha: float | None = None,
    labels: bool | None = None,
    landmark_settings: Any = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_interval: float = 60.0,
    progress: bool = True,
    store: str | os.PathLike | None = None,
    cluster: Any = None,
    decision_memory: int = DEFAULT_MEMORY,
) -> MappingResult:
    """Which channel of ``layers`` detects which facial Action Unit, and where each looks.

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
        Extremum point of each (image, channel), for the pointing measures: ``"deconv"``
        (centroid of the deconvnet projection's top 1 %) or ``"rf-center"`` (receptive-field
        centre of the arg-max unit). The detector test does not depend on it.
    options
        Choices of the streamed measures of where channels look (:class:`MappingOptions`).
    detector
        Choices of the detector test (:class:`interp_fer.detectors.DetectorOptions`); its
        seed defaults to ``options.seed``.
    activity
        Where AU activity comes from: ``"auto"`` (the user's AU columns where every face is
        coded, landmark proxies otherwise), ``"landmarks"``, ``"labels"`` or
        ``"expressions"`` (EMFACS prototypes; :func:`face_activity`).
    controls
        Random-weights copies to run beside the network (:func:`interp_fer.controls.
        randomized_copy`, seeds ``seed + 1``, ``seed + 2``, ...). With n >= 2 (default 4),
        the first n - 1 pooled set the bar a detector must clear (per layer and AU) and the
        last is tested against that bar like the network (its detector count is what chance
        and the architecture give); 1 sets the bar only; 0 none (the decision then has no
        control bar: not recommended). Or the control networks themselves (same layer names).
    crop
        ``"auto"`` (whole image for registered crops, a square around the face in photos),
        ``"face"`` or ``"none"``.
    batch_size
        Images per forward pass.
    alpha
        False discovery rate of the detector test (default ``detector.alpha``, 0.05).
    labels
        Score channels against the faces' labels (AU columns, or expressions through the
        EMFACS prototypes): ``label_auc`` per (channel, AU) and one-vs-rest AUCs per
        expression. Default: when the dataset has labels.
    landmark_settings
        :class:`interp_fer.faces.LandmarkSettings` (default: automatic).
    checkpoint
        File to checkpoint to (resumed when it matches this run's arguments, the network's
        weights and the data's identity).
    checkpoint_interval
        Seconds between checkpoints.
    progress
        Show progress bars (tqdm; notebooks too).
    store
        Folder of a Zarr feature store (:class:`interp_fer.feature_store.FeatureStore`,
        e.g. ``OUT/features.zarr``) for the per-image features, read back by the decision;
        with ``checkpoint``, a rerun skips the chunks already written. Default: in memory.
    cluster
        A :class:`interp_fer.distributed.Cluster` to run the pass on Dask workers (needs
        ``store``); results are identical to a run in this process. The decision's tasks
        run there too.
    decision_memory
        Bytes per task of the decision (:func:`interp_fer.decision.decide`: the responses are
        read back in blocks of channels of at most this size); the tables do not depend on it.

    Returns
    -------
    MappingResult
    """
    from .checkpoint import Checkpoint, run_key
    from .controls import randomized_copy
    from .faces import LandmarkSettings

    if locate not in ("deconv", "rf-center"):
        raise ValueError(f"locate must be 'deconv' or 'rf-center', not {locate!r}")
    if crop not in ("auto", "face", "none"):
        raise ValueError(f"crop must be 'auto', 'face' or 'none', not {crop!r}")
    if isinstance(controls, int) and not 0 <= controls <= 16:
        raise ValueError(f"controls must be between 0 and 16, not {controls!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    options = options or MappingOptions()
    detector = detector or DetectorOptions(seed=options.seed)
    if alpha is not None:
        detector = DetectorOptions(**{**asdict(detector), "alpha": alpha})
    settings = landmark_settings or LandmarkSettings()
    layers = tuple(layers or model.stages)
    if not layers:
        raise ValueError("no layers to map: name some (interp-fer layers lists them)")

    clock = _Clock()
    with clock("landmarks"):
        faceset = prepare_faces(model, dataset, aus=aus, crop=crop, activity=activity,
                                landmark_settings=settings, progress=progress)
    available = has_labels(faceset.records)
    if labels and not available:
        raise ValueError(f"{dataset.source}: no expression or AU labels to score against "
                         "(give a labels CSV, e.g. interp-fer map --labels)")
    labelled = available if labels is None else bool(labels)
    control_models = [randomized_copy(model, seed=options.seed + 1 + i)
                      for i in range(controls)] if isinstance(controls, int) else list(controls)

    key = run_key({"model": model.source or model.name, "weights": weights_digest(model.module),
                   "layers": layers, "aus": faceset.aus, "data": dataset.source,
                   "data_digest": data_digest(dataset), "locate": locate, "crop": crop,
                   "batch": batch_size, "options": asdict(options),
                   "controls": [weights_digest(c.module) for c in control_models],
                   "labels": labelled, "landmarks": settings.fingerprint()})
    saver = Checkpoint(checkpoint, key, interval=checkpoint_interval) if checkpoint else None
    features = None
    if store is not None:
        from .feature_store import FeatureStore

        features = FeatureStore.open(store, key, len(faceset.faces), batch_size)
    elif cluster is not None:
        raise ValueError("map_dataset: a cluster needs a store folder for the per-image "
                         "features (store=...)")
    stream = stream_layers(model, dataset, faceset, layers, controls=control_models,
                           locate=locate, options=options, batch_size=batch_size,
                           labelled=labelled, checkpoint=saver, clock=clock, progress=progress,
                           store=features, cluster=cluster)
    if saver:  # the pass is the expensive part: keep it until the outputs are written
        saver.save(len(faceset.faces), stream.state())

    with clock("decision"):
        mapping, scores, looks, control_detectors, summary = decide(
            stream, faceset, layers, detector=detector, distance=options.distance,
            controls=len(control_models), memory=decision_memory, cluster=cluster)
        scores = add_q_values(scores)
    statuses = faceset.table["status"].value_counts().to_dict()
    half = ["select" if h else "report"
            for h in selection_half(faceset.indices, detector.seed)]
    run = {
        "model": {"name": model.name, "source": model.source, "input_size": list(model.input_size),
                  "class_names": list(model.class_names)},
        "layers": list(layers),
        "aus": list(faceset.aus),
        "data": {"source": dataset.source, "n_images": len(dataset),
                 "n_mapped": len(faceset.faces), "n_skipped": len(faceset.skipped)},
        "activity": {"requested": activity, "sources": faceset.activity_source},
        "landmark_status": {str(k): int(v) for k, v in statuses.items()},
        "landmark_settings": asdict(settings),
        "clipped_regions": faceset.clipped,
        "skipped": [{"key": k, "reason": r} for k, r in faceset.skipped],
        "locate": locate,
        "locate_agreement": {
            name: {"pairs": int(v[0]), "within_0.1_iod": float(v[1] / v[0]) if v[0] else None}
            for name, v in stream.agreement.items()} or None,
        "crop": crop,
        "batch_size": batch_size,
        "distributed": None if cluster is None else cluster.record(),
        "alpha": detector.alpha,
        "options": asdict(options),
        "detector_options": asdict(detector),
        "seed": options.seed,
        **summary,
        "labels": _label_summary(faceset.records, au_presence(faceset.records, faceset.aus),
                                 faceset.aus) if labelled else None,
        "versions": _versions(),
        "seconds": clock.seconds,
    }
    face_table = pd.DataFrame([
        {"index": f.index, "key": f.key, "crop_top": f.crop.top, "crop_left": f.crop.left,
         "crop_height": f.crop.height, "crop_width": f.crop.width,
         "crop_angle": f.crop.angle, "half": h,
         "clipped_regions": c}
        for f, h, c in zip(faceset.faces, half, faceset.clipped_by_face, strict=True)])
    top = {name: stream.accumulators[name].top.state() for name in layers}
    expressions = None
    if labelled and dataset.class_names:
        expressions = pd.concat([stream.accumulators[name].expression_scores(dataset.class_names)
                                 for name in layers], ignore_index=True)
    columns = [faceset.aus.index(a) for a in faceset.tested]
    activity_frame = pd.DataFrame(faceset.activity, columns=[f"AU{a}" for a in faceset.tested])
    activity_frame.insert(0, "key", [f.key for f in faceset.faces])
    activity_frame.insert(0, "index", faceset.indices)
    responses = StoredResponses(stream.store, layers, columns)
    result = MappingResult(mapping, scores, run, faceset.table, face_table, top, expressions,
                           activity_frame, responses, looks, control_detectors)
    if saver:
        saver.clear()
    return result


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
