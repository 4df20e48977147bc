"""All statistics of one layer against the AU regions, accumulated batch by batch.

:class:`LayerMapping` combines the accumulators of :mod:`interp_fer.accumulators` and turns
them into per-(channel, AU) scores and a mapping channel -> AU (DESIGN.md, "Distance
function", "Corroborating measures", "Significance and stability"):

* ``distance``: D(k, a) on the observed images (default Wasserstein-1 / pooled SD);
* ``ci_low``/``ci_high``: percentile interval of D over the Poisson-bootstrap replicates;
* ``excess``: D minus the mean D of the random-placement replicates (the area effect removed);
* ``p_value``: one-sided empirical p-value against the random-placement null replicates,
  ``(1 + #{D_null >= D}) / (1 + n_null)`` (no fitted tail: its floor is ``1 / (1 + n_null)``);
  this null is narrow (any fixed region tends to beat a region placed at random on each
  face), so it describes *where* a channel looks, never what it detects
  (:mod:`interp_fer.detectors` answers that);
* ``stability``: share of bootstrap replicates in which AU ``a`` has the channel's largest D;
* ``hit_rate``/``chance_rate``/``mean_distance``: pointing game of the extremum points;
* ``iou``: dataset-level dissection IoU;
* ``label_auc`` (with labels): AUC of the channel's peak response for "AU present vs
  absent" (:mod:`interp_fer.labels`).

Inputs per batch are plain arrays on the network input's pixel grid, so this module knows
nothing about dlib or images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd
import torch

from .accumulators import (
    DissectionIoU,
    LabelResponses,
    PeakHistograms,
    PointingAccumulator,
    TopImages,
    channel_edges,
    distance_maps,
    poisson_weights,
    region_peaks,
)
from .cells import CellGrid, SparseMasks
from .statistics import (
    empirical_p_value,
    placement_offsets_many,
    random_offsets,
)


@dataclass
class MappingOptions:
    """Choices that change the numbers (all recorded in ``run.json``).

    Attributes
    ----------
    distance
        ``"wasserstein"``, ``"ks"`` or ``"cohen_d"``.
    n_boot
        Bootstrap replicates for the confidence interval and stability.
    n_null
        Null replicates: each region placed at random on its own face
        (:meth:`FaceGeometry.placements`).
    n_bins
        Histogram bins per channel.
    hit_tolerance
        Pointing tolerance in IODs.
    iou_quantile
        Activation quantile that thresholds channel maps for the IoU.
    confidence
        Level of the bootstrap interval.
    seed
        Seed of the bootstrap weights and the placements.
    forward_dtype
        Precision of the map pass's forward passes (the network and its random copies):
        ``"float64"`` (default) makes the stored responses independent of the CPU's float32
        kernels (oneDNN picks them by instruction set and batch size; in float32 the
        AVX2 and AVX-512 runs of one job differed in the last digits of their statistics);
        ``"float32"`` is faster and takes half the memory for the networks' copies.
    """

    distance: str = "wasserstein"
    n_boot: int = 50
    n_null: int = 10
    n_bins: int = 64
    hit_tolerance: float = 0.1
    iou_quantile: float = 0.99
    confidence: float = 0.95
    seed: int = 0
    forward_dtype: str = "float64"

    def __post_init__(self) -> None:
        if self.forward_dtype not in ("float64", "float32"):
            raise ValueError(f"forward_dtype must be 'float64' or 'float32', not "
                             f"{self.forward_dtype!r}")


@dataclass
class FaceGeometry:
    """Where the face and its AU regions are, for a batch, on the network input grid.

    What is derived from the geometry alone (distance maps, random placements) is computed on
    first use and kept, so every layer of a batch shares it.

    Attributes
    ----------
    regions
        (N, A, H, W) boolean AU region masks.
    face
        (N, H, W) boolean face mask.
    iod
        (N,) inter-ocular distance in input pixels.
    """

    regions: np.ndarray
    face: np.ndarray
    iod: np.ndarray
    _placements: dict[tuple, SparseMasks] = field(default_factory=dict, repr=False)

    @cached_property
    def distances(self) -> np.ndarray:
        """(N, A, H, W) distance in pixels to the nearest pixel of each region."""
        return distance_maps(self.regions)

    @cached_property
    def sparse_regions(self) -> SparseMasks:
        """The AU regions as sparse masks, (image, AU) in C order."""
        return SparseMasks.from_dense(self.regions)

    def placements(self, image_indices: np.ndarray, n_null: int, seed: int) -> SparseMasks:
        """Random placements of every region on its own face, (image, AU, replicate) order.

        Placements are a deterministic function of (seed, image index, AU position), so a run
        cut into other batches, or resumed, draws the same ones. A region that fits nowhere
        inside the face is kept where it is (it then contributes no evidence either way).
        """
        key = (n_null, seed, tuple(int(i) for i in image_indices))
        if key not in self._placements:
            n, a, height, width = self.regions.shape
            valid = placement_offsets_many(self.regions.reshape(n * a, height, width),
                                           np.repeat(self.face, a, axis=0))
            masks, positions = [], []
            for i, index in enumerate(image_indices):
                for j in range(a):
                    rows, cols = np.nonzero(self.regions[i, j])
                    rng = np.random.default_rng([seed, 0xA11, int(index), j])
                    try:
                        offsets = random_offsets(valid[i * a + j], n_null, rng)
                    except ValueError:
                        offsets = np.zeros((n_null, 2), dtype=np.int64)
                    flat = (rows[None] + offsets[:, :1]) * width + cols[None] + offsets[:, 1:]
                    first = (i * a + j) * n_null
                    masks.append(np.repeat(np.arange(first, first + n_null), len(rows)))
                    positions.append(flat.ravel())
            self._placements[key] = SparseMasks(
                n * a * n_null, (height, width),
                np.concatenate(masks).astype(np.int64), np.concatenate(positions).astype(np.int64))
        return self._placements[key]


@dataclass
class LayerMapping:
    """Accumulates every statistic of one layer (K channels) against A AUs.

    Create it with :meth:`calibrate` on a calibration sample spread over the whole dataset
    (which fixes histogram bins and IoU thresholds), then :meth:`update` with every batch.
    """

    layer: str
    grid: CellGrid
    aus: tuple[int, ...]
    options: MappingOptions
    peaks: PeakHistograms
    pointing: PointingAccumulator
    iou: DissectionIoU
    top: TopImages
    labels: LabelResponses | None = None
    n_images: int = field(default=0)

    @classmethod
    def calibrate(cls, layer: str, grid: CellGrid, aus: tuple[int, ...], acts: torch.Tensor,
                  options: MappingOptions, n_classes: int | None = None) -> LayerMapping:
        """Fix per-channel bins and IoU thresholds from a calibration batch of feature maps.

        Parameters
        ----------
        acts
            (N, K, h, w) feature maps of the calibration images.
        n_classes
            Number of expressions when the faces are labelled (AUCs are then accumulated),
            0 for AU labels only, None without labels.
        """
        flat = acts.float().flatten(2)  # (N, K, hw)
        peaks = flat.amax(dim=2).cpu().numpy()
        lows = flat.amin(dim=2).cpu().numpy()
        edges = channel_edges(np.concatenate([peaks, lows]), options.n_bins)
        thresholds = torch.quantile(flat.transpose(0, 1).reshape(flat.shape[1], -1),
                                    options.iou_quantile, dim=1).cpu().numpy()
        k = acts.shape[1]
        labels = None
        if n_classes is not None:
            # The AUC counts pairs within one bin as ties: bins 8 times finer than D's.
            fine = channel_edges(np.concatenate([peaks, lows]), 8 * options.n_bins)
            labels = LabelResponses(fine, len(aus), n_classes)
        return cls(
            layer, grid, tuple(aus), options,
            PeakHistograms(edges, len(aus), options.n_boot, options.n_null),
            PointingAccumulator(k, len(aus), options.hit_tolerance),
            DissectionIoU(thresholds, len(aus)),
            TopImages(k),
            labels,
        )

    def update(self, image_indices: np.ndarray, acts: torch.Tensor, geometry: FaceGeometry,
               points: np.ndarray, active: np.ndarray, presence: np.ndarray | None = None,
               classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Add a batch; return its per-image region peaks ``r_in``, ``r_out`` (N, K, A).

        Parameters
        ----------
        image_indices
            (N,) dataset positions of the images (seed the bootstrap and the null).
        acts
            (N, K, h, w) feature maps.
        geometry
            Regions, faces and IODs of these images on the input grid.
        points
            (N, K, 2) extremum points (row, col) in input pixels.
        active
            (N, K) boolean: channel has a positive maximum.
        presence, classes
            With labels: (N, A) AU presence (1/0/NaN, :func:`interp_fer.labels.au_presence`)
            and (N,) expression index (-1 unlabelled).
        """
        n, a = geometry.regions.shape[:2]
        device = acts.device
        face_cells = torch.from_numpy(self.grid.cells_in(geometry.face)).to(device)
        in_cells = self.grid.cell_masks(geometry.sparse_regions)
        r_in, r_out = region_peaks(acts, in_cells, face_cells)
        null_in = null_out = None
        if self.options.n_null:
            m = self.options.n_null
            placed = geometry.placements(image_indices, m, self.options.seed)
            nin, nout = region_peaks(acts, self.grid.cell_masks(placed), face_cells)
            null_in = nin.reshape(n, -1, a, m).cpu().numpy()
            null_out = nout.reshape(n, -1, a, m).cpu().numpy()
        weights = poisson_weights(self.options.seed, image_indices, self.options.n_boot)
        self.peaks.update(r_in.cpu().numpy(), r_out.cpu().numpy(), weights, null_in, null_out)
        self.pointing.update(points, active, geometry.distances, geometry.face, geometry.iod)
        self.iou.update(acts, geometry.regions)
        peaks = acts.flatten(2).amax(dim=2).float().cpu().numpy()
        self.top.update(image_indices, peaks)
        if self.labels is not None:
            if presence is None or classes is None:
                raise ValueError(f"layer {self.layer}: labels were calibrated, give presence "
                                 "and classes with every batch")
            self.labels.update(peaks, presence, classes)
        self.n_images += n
        return r_in.cpu().numpy(), r_out.cpu().numpy()

    def empty(self) -> LayerMapping:
        """A copy with the same calibration (bins, thresholds) and nothing accumulated.

        What a worker of a distributed run fills with its shard of images, to be merged.
        """
        labels = None if self.labels is None else LabelResponses(
            self.labels.edges, self.labels.n_aus, self.labels.n_classes)
        return LayerMapping(
            self.layer, self.grid, self.aus, self.options,
            PeakHistograms(self.peaks.edges, self.peaks.n_aus, self.peaks.n_boot,
                           self.peaks.n_null),
            PointingAccumulator(self.pointing.n_channels, self.pointing.n_aus,
                                self.pointing.tolerance),
            DissectionIoU(self.iou.thresholds, self.iou.n_aus),
            TopImages(self.top.n_channels, self.top.k),
            labels,
        )

    def merge(self, other: LayerMapping) -> None:
        """Add what ``other`` accumulated (same calibration, other images).

        Sums add and top images merge by their tie rule. Merging per-batch accumulators in
        batch order gives bit for bit what :meth:`update` with those batches in that order
        gives (each running sum gets the same additions in the same order).
        """
        if (other.layer, other.aus) != (self.layer, self.aus):
            raise ValueError(f"cannot merge layer {other.layer} (AUs {other.aus}) into "
                             f"layer {self.layer} (AUs {self.aus})")
        self.peaks.merge(other.peaks)
        self.pointing.merge(other.pointing)
        self.iou.merge(other.iou)
        self.top.merge(other.top)
        if (self.labels is None) != (other.labels is None):
            raise ValueError(f"layer {self.layer}: cannot merge a labelled accumulator with "
                             "an unlabelled one")
        if self.labels is not None:
            self.labels.merge(other.labels)
        self.n_images += other.n_images

    def scores(self) -> pd.DataFrame:
        """Every measure per (channel, AU): a DataFrame with one row per pair."""
        options = self.options
        distances = self.peaks.distances(options.distance)  # (R, K, A)
        observed = distances[0]
        boot = distances[1:1 + options.n_boot]
        null = distances[1 + options.n_boot:]
        tail = (1 - options.confidence) / 2
        if len(boot):
            ci_low, ci_high = np.quantile(boot, [tail, 1 - tail], axis=0)
            best = boot.argmax(axis=2)  # (B, K)
            stability = np.stack([(best == j).mean(axis=0) for j in range(len(self.aus))], axis=1)
        else:
            ci_low = ci_high = np.full_like(observed, np.nan)
            stability = np.full_like(observed, np.nan)
        if len(null) > 1:
            p_value = p_empirical = empirical_p_value(observed, null)
            excess = observed - null.mean(axis=0)
        else:
            p_value = p_empirical = excess = np.full_like(observed, np.nan)
        extra = {
            "ks": self.peaks.distances("ks")[0],
            "cohen_d": self.peaks.distances("cohen_d")[0],
        }
        k, a = observed.shape
        channel, au = np.meshgrid(np.arange(k), np.arange(a), indexing="ij")
        table = pd.DataFrame({
            "layer": self.layer,
            "channel": channel.ravel(),
            "au": np.asarray(self.aus)[au.ravel()],
            "distance": observed.ravel(),
            "excess": excess.ravel(),
            "ci_low": ci_low.ravel(),
            "ci_high": ci_high.ravel(),
            "p_value": p_value.ravel(),
            "p_empirical": p_empirical.ravel(),
            "stability": stability.ravel(),
            "hit_rate": self.pointing.hit_rate.ravel(),
            "chance_rate": np.broadcast_to(self.pointing.chance_rate, (k, a)).ravel(),
            "mean_distance_iod": self.pointing.mean_distance.ravel(),
            "iou": self.iou.iou.ravel(),
            "ks": extra["ks"].ravel(),
            "cohen_d": extra["cohen_d"].ravel(),
            "n_images": self.n_images,
        })
        if self.labels is not None:
            table["label_auc"] = self.labels.au_auc().ravel()
        return table

    def expression_scores(self, class_names: tuple[str, ...]) -> pd.DataFrame:
        """One-vs-rest AUC of each channel's peak response per expression (with labels)."""
        if self.labels is None:
            raise ValueError(f"layer {self.layer} was mapped without labels")
        auc = self.labels.expression_auc()  # (K, C)
        k, c = auc.shape
        channel, expression = np.meshgrid(np.arange(k), np.arange(c), indexing="ij")
        return pd.DataFrame({"layer": self.layer, "channel": channel.ravel(),
                             "expression": np.asarray(class_names, dtype=object)[expression.ravel()],
                             "auc": auc.ravel(),
                             "n_images": np.broadcast_to(self.labels.class_counts[0].sum(axis=-1),
                                                         (k, c)).ravel()})

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to checkpoint (prefix-free; the caller namespaces them by layer)."""
        arrays = {f"peaks.{k}": v for k, v in self.peaks.state().items()}
        arrays.update({f"pointing.{k}": v for k, v in self.pointing.state().items()})
        arrays.update({f"iou.{k}": v for k, v in self.iou.state().items()})
        arrays.update({f"top.{k}": v for k, v in self.top.state().items()})
        if self.labels is not None:
            arrays.update({f"labels.{k}": v for k, v in self.labels.state().items()})
        arrays["n_images"] = np.array(self.n_images)
        return arrays

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        """Load arrays saved by :meth:`state`."""
        def part(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

        self.peaks.restore(part("peaks."))
        self.pointing.restore(part("pointing."))
        self.iou.restore(part("iou."))
        self.top.restore(part("top."))
        if self.labels is not None:
            self.labels.restore(part("labels."))
        self.n_images = int(arrays["n_images"])
