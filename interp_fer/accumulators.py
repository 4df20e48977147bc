"""Streaming accumulators of the AU <-> channel statistics for one layer.

One pass over a dataset, memory independent of the number of images: per-image peak
responses are reduced at once into fixed-size histograms and running sums.

For image ``i``, channel ``k`` and AU ``a`` (DESIGN.md, "Distance function"):

* ``r_in[i, k, a]`` = the channel's peak over the cells of region ``a``
  (:meth:`interp_fer.cells.CellGrid.cells_in`);
* ``r_out[i, k, a]`` = its peak over the face cells outside region ``a``.

:class:`PeakHistograms` keeps, per (k, a), histograms of ``r_in`` and ``r_out`` on per-channel
bins fixed before the pass (:func:`channel_edges`), the exact running moments, the same under
``n_boot`` Poisson-bootstrap reweightings of the images (online bootstrap: image ``i`` gets
weight ``Poisson(1)`` in replicate ``b``, drawn from ``(seed, i)`` so the result does not depend
on batch boundaries or on resuming), and under ``n_null`` random placements of each region on
the same face (:func:`interp_fer.statistics.random_offsets`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .cells import SparseMasks
from .statistics import histogram_auc, histogram_distance


def region_peaks(acts: torch.Tensor, cells: SparseMasks, face_cells: torch.Tensor,
                 top: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Peak response of each channel inside each region and elsewhere on the face.

    Parameters
    ----------
    acts
        (N, K, h, w) feature maps.
    cells
        N x S cell masks on the (h, w) grid, (image, region) in C order: the cells of each of
        S regions (real or placed) of every image (:meth:`interp_fer.cells.CellGrid.cell_masks`).
    face_cells
        (N, h, w) boolean: the cells of the face.
    top
        How many of each channel's best face cells to keep for ``r_out`` on fine grids (a
        speed knob; the result does not depend on it).

    Returns
    -------
    r_in, r_out
        (N, K, S) each; NaN where the set of cells is empty.

    Notes
    -----
    Regions are small and many (S = AUs x null replicates), so a dense (N, K, S, h*w)
    masked maximum would dominate a run. On coarse grids (at most 63 cells) the regions of an
    image fall on few distinct sets of cells, each masked once. On finer grids ``r_in`` is a
    scatter-max over
    the regions' cells only, and ``r_out`` is the channel's best face cell when the region
    does not hold it (most triples), else the best of its ``top`` face cells outside the
    region, computed densely only for the triples whose ``top`` cells all lie inside it.
    """
    n, k = acts.shape[:2]
    s = cells.n_masks // n
    size = acts.shape[-2] * acts.shape[-1]
    flat = acts.reshape(n, k, size).float()
    device = flat.device
    nan = torch.tensor(float("nan"), device=device)
    owner = torch.from_numpy(cells.mask).to(device)
    cell = torch.from_numpy(cells.position).to(device)

    member = torch.zeros(n * s, size, dtype=torch.bool, device=device)
    member[owner, cell] = True
    member = member.reshape(n, s, size)
    face = face_cells.reshape(n, 1, size)
    if size <= 63:
        r_in, r_out = _coarse_peaks(flat, member, face)
    else:
        r_in, r_out = _sparse_peaks(flat, member, face, owner, cell, top)
    return (torch.where(torch.isinf(r_in), nan, r_in), torch.where(torch.isinf(r_out), nan, r_out))


def _coarse_peaks(flat: torch.Tensor, member: torch.Tensor, face: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    # Grids of at most 63 cells: a region's cells fit in one int64 bit pattern, and the many
    # placed regions of an image fall on few distinct patterns; mask each pattern once.
    n, k, size = flat.shape
    s = member.shape[1]
    bits = (member.long() << torch.arange(size, device=flat.device)).sum(dim=-1)  # (N, S)
    image = torch.arange(n, device=flat.device)[:, None].expand(n, s)
    keys, inverse = torch.unique(torch.stack([image, bits], dim=-1).reshape(-1, 2), dim=0,
                                 return_inverse=True)
    cells = (keys[:, 1:] >> torch.arange(size, device=flat.device)) & 1 == 1  # (U, size)
    values = flat[keys[:, 0]]  # (U, K, size)
    outside = face[keys[:, 0]] & ~cells[:, None]
    r_in = torch.where(cells[:, None], values, float("-inf")).amax(dim=-1)  # (U, K)
    r_out = torch.where(outside, values, float("-inf")).amax(dim=-1)
    return (r_in[inverse].reshape(n, s, k).permute(0, 2, 1),
            r_out[inverse].reshape(n, s, k).permute(0, 2, 1))


def _sparse_peaks(flat: torch.Tensor, member: torch.Tensor, face: torch.Tensor,
                  owner: torch.Tensor, cell: torch.Tensor, top: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    # Flat (linear) indices throughout: multi-tensor advanced indexing is several times slower.
    n, k, size = flat.shape
    s = member.shape[1]
    device = flat.device
    by_cell = flat.permute(0, 2, 1).reshape(n * size, k)
    values = by_cell.index_select(0, (owner // s) * size + cell)  # (P, K)
    r_in = torch.full((n * s, k), float("-inf"), device=device)
    r_in.scatter_reduce_(0, owner[:, None].expand(-1, k), values, reduce="amax",
                         include_self=True)
    r_in = r_in.reshape(n, s, k).permute(0, 2, 1)

    member = member.reshape(-1)
    on_face = torch.where(face, flat, float("-inf"))
    best, where = on_face.topk(min(top, size), dim=-1)  # (N, K, T), descending
    # Most regions do not hold the channel's best face cell: then r_out is that cell's value.
    base = (torch.arange(n * s, device=device) * size).reshape(n, s, 1)  # (N, S, 1)
    first = member.take(base + where[:, None, :, 0])  # (N, S, K)
    r_out = best[:, None, :, 0].expand(n, s, k).clone()
    i, j, c = first.nonzero(as_tuple=True)
    # The others take the best of the `top` cells outside the region...
    pair = i * k + c
    inside = member.take(base.reshape(-1)[i * s + j, None] + where.reshape(n * k, -1)[pair])
    r_out[i, j, c] = torch.where(inside, float("-inf"), best.reshape(n * k, -1)[pair]
                                 ).amax(dim=-1)
    # ... unless all of those are inside and the face has more cells: then go dense.
    dense = inside.all(dim=-1) & (face.sum(dim=-1)[i, 0] > best.shape[-1])
    i, j, c = i[dense], j[dense], c[dense]
    member = member.reshape(n, s, size)
    for chunk in torch.split(torch.arange(len(i), device=device), 4096):
        outside = face[i[chunk], 0] & ~member[i[chunk], j[chunk]]
        r_out[i[chunk], j[chunk], c[chunk]] = torch.where(
            outside, flat[i[chunk], c[chunk]], float("-inf")).amax(dim=-1)
    return r_in, r_out.permute(0, 2, 1)


def channel_edges(samples: np.ndarray, n_bins: int) -> np.ndarray:
    """Per-channel histogram bin edges from a calibration sample of peak responses.

    Parameters
    ----------
    samples
        (n, K) peak responses (any finite values) of the calibration images.
    n_bins
        Bins per channel.

    Returns
    -------
    numpy.ndarray
        (K, n_bins + 1) increasing edges spanning the calibration range widened by half of it
        on each side; later values beyond the edges fall in the end bins (their exact values
        still enter the moments).
    """
    samples = np.asarray(samples, dtype=np.float64)
    lo = np.nanmin(samples, axis=0)
    hi = np.nanmax(samples, axis=0)
    span = np.where(hi > lo, hi - lo, np.maximum(np.abs(hi), 1.0))
    lo, hi = lo - 0.5 * span, hi + 0.5 * span
    steps = np.linspace(0.0, 1.0, n_bins + 1)
    return lo[:, None] + (hi - lo)[:, None] * steps[None, :]


def bin_index(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Bin of each value on its channel's edges; the end bins absorb values beyond them.

    Parameters
    ----------
    edges
        (K, n_bins + 1) per-channel edges (:func:`channel_edges`).
    values
        (N, K, ...) finite values, channel on axis 1.
    """
    bins = edges.shape[1] - 1
    index = np.empty(values.shape, dtype=np.int64)
    for channel in range(edges.shape[0]):
        index[:, channel] = np.searchsorted(edges[channel, 1:-1], values[:, channel],
                                            side="right")
    return np.clip(index, 0, bins - 1)


def poisson_weights(seed: int, image_indices: np.ndarray, n_boot: int) -> np.ndarray:
    """(N, n_boot) bootstrap weights, a deterministic function of (seed, image index)."""
    rows = [np.random.default_rng([seed, 0x5EED, int(i)]).poisson(1.0, n_boot)
            for i in image_indices]
    return np.asarray(rows, dtype=np.float64).reshape(len(image_indices), n_boot)


@dataclass
class PeakHistograms:
    """Histograms and moments of ``r_in``/``r_out`` per (channel, AU, replicate).

    Replicate axis: 0 = the data as observed, ``1 .. n_boot`` = bootstrap reweightings,
    ``n_boot + 1 ..`` = random-placement null replicates.

    Attributes
    ----------
    edges
        (K, n_bins + 1) bin edges per channel.
    n_aus, n_boot, n_null
        Sizes of the AU, bootstrap and null axes.
    """

    edges: np.ndarray
    n_aus: int
    n_boot: int
    n_null: int
    counts: np.ndarray = field(init=False)
    moments: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        k, bins = self.edges.shape[0], self.edges.shape[1] - 1
        # side (in/out), replicate, channel, AU, bin
        self.counts = np.zeros((2, self.n_replicates, k, self.n_aus, bins))
        # side, replicate, channel, AU, (weight, sum, sum of squares)
        self.moments = np.zeros((2, self.n_replicates, k, self.n_aus, 3))

    @property
    def n_replicates(self) -> int:
        return 1 + self.n_boot + self.n_null

    def _add(self, side: int, replicate: slice, values: np.ndarray, weights: np.ndarray) -> None:
        # values (N, V, K, A) with V = 1 (shared by the replicates) or V = R; weights (N, R)
        # for the R replicates in `replicate`.
        finite = np.isfinite(values)
        clean = np.where(finite, values, 0.0)
        index = bin_index(self.edges, clean.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
        n, r = weights.shape
        k, a = values.shape[2:]
        bins = self.counts.shape[-1]
        slots = k * a * bins
        slot = (np.arange(k)[:, None] * a + np.arange(a)[None, :]) * bins + index  # (N, V, K, A)
        if values.shape[1] == 1:
            # Shared values, many weightings (the bootstrap): every sum over images is a
            # product with the (N, R) weights, a sparse one for the histograms.
            from scipy.sparse import csr_matrix

            present = finite[:, 0].reshape(n, -1).astype(np.float64)
            value = clean[:, 0].reshape(n, -1)
            images = np.broadcast_to(np.arange(n)[:, None], present.shape)
            onehot = csr_matrix((present.ravel(), (slot[:, 0].ravel(), images.ravel())),
                                shape=(slots, n))
            self.counts[side, replicate] += (onehot @ weights).T.reshape(r, k, a, bins)
            for j, term in enumerate((present, present * value, present * value ** 2)):
                self.moments[side, replicate, ..., j] += (weights.T @ term).reshape(r, k, a)
            return
        w = weights[:, :, None, None] * finite  # (N, R, K, A)
        target = np.arange(r)[None, :, None, None] * slots + slot
        hist = np.bincount(target.ravel(), weights=w.ravel(), minlength=r * slots)
        self.counts[side, replicate] += hist.reshape(r, k, a, bins)
        self.moments[side, replicate, ..., 0] += w.sum(axis=0)
        self.moments[side, replicate, ..., 1] += (w * clean).sum(axis=0)
        self.moments[side, replicate, ..., 2] += (w * clean ** 2).sum(axis=0)

    def update(self, r_in: np.ndarray, r_out: np.ndarray, boot_weights: np.ndarray,
               null_in: np.ndarray | None = None, null_out: np.ndarray | None = None) -> None:
        """Add a batch.

        Parameters
        ----------
        r_in, r_out
            (N, K, A) observed peaks (NaN = undefined for that image, left out).
        boot_weights
            (N, n_boot) bootstrap weights (:func:`poisson_weights`).
        null_in, null_out
            (N, K, A, n_null) peaks for the randomly placed regions.
        """
        n = len(r_in)
        observed = slice(0, 1 + self.n_boot)
        weights = np.ones((n, 1))
        if self.n_boot:
            weights = np.concatenate([weights, boot_weights[:, :self.n_boot]], axis=1)
        self._add(0, observed, r_in[:, None], weights)
        self._add(1, observed, r_out[:, None], weights)
        if self.n_null:
            if null_in is None or null_out is None:
                raise ValueError("null peaks are required when n_null > 0")
            null = slice(1 + self.n_boot, self.n_replicates)
            ones = np.ones((n, self.n_null))
            self._add(0, null, np.moveaxis(null_in, -1, 1), ones)
            self._add(1, null, np.moveaxis(null_out, -1, 1), ones)

    def distances(self, method: str = "wasserstein") -> np.ndarray:
        """Signed distance per (replicate, channel, AU): (n_replicates, K, A)."""
        edges = self.edges[None, :, None, :]
        return histogram_distance(
            self.counts[0], self.counts[1], edges,
            tuple(self.moments[0, ..., j] for j in range(3)),
            tuple(self.moments[1, ..., j] for j in range(3)),
            method=method,
        )

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to checkpoint."""
        return {"edges": self.edges, "counts": self.counts, "moments": self.moments}

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        """Load arrays saved by :meth:`state`."""
        self.edges, self.counts, self.moments = arrays["edges"], arrays["counts"], arrays["moments"]

    def merge(self, other: PeakHistograms) -> None:
        """Add the counts and moments of ``other`` (same bins; another set of images).

        Merging batch accumulators in batch order gives the same floating-point sums as
        updating one accumulator with those batches in that order. The counts are integers
        (weights are Poisson draws), exact in any order: ``other.counts`` may be None when
        they are summed elsewhere (:func:`interp_fer.distributed.run_shard` sends them once
        per shard).
        """
        _same(self.edges, other.edges, "histogram bins")
        if other.counts is not None:
            self.counts += other.counts
        self.moments += other.moments


def distance_maps(regions: np.ndarray) -> np.ndarray:
    """Euclidean distance (pixels) from every pixel to the nearest pixel of each region.

    Parameters
    ----------
    regions
        (..., H, W) boolean masks.

    Returns
    -------
    numpy.ndarray
        (..., H, W) float32; 0 inside a region, inf everywhere for an empty region.
    """
    from scipy.ndimage import distance_transform_edt

    regions = np.asarray(regions, dtype=bool)
    flat = regions.reshape(-1, *regions.shape[-2:])
    out = np.full(flat.shape, np.inf, dtype=np.float32)
    for i, mask in enumerate(flat):
        if mask.any():
            out[i] = distance_transform_edt(~mask)
    return out.reshape(regions.shape)


@dataclass
class PointingAccumulator:
    """Pointing game between extremum points and AU regions, per (channel, AU).

    A point *hits* region ``a`` when it lies within ``tolerance * IOD`` of it; the chance
    rate is the share of the face that is within that distance of the region, so a channel
    pointing uniformly at random over the face hits at the chance rate. Also accumulates the
    point's distance to the region in IODs.
    """

    n_channels: int
    n_aus: int
    tolerance: float = 0.1
    hits: np.ndarray = field(init=False)
    counts: np.ndarray = field(init=False)
    distance_sum: np.ndarray = field(init=False)
    chance_sum: np.ndarray = field(init=False)
    faces: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.hits = np.zeros((self.n_channels, self.n_aus))
        self.counts = np.zeros((self.n_channels, self.n_aus))
        self.distance_sum = np.zeros((self.n_channels, self.n_aus))
        self.chance_sum = np.zeros(self.n_aus)

    def update(self, points: np.ndarray, active: np.ndarray, distances: np.ndarray,
               faces: np.ndarray, iod: np.ndarray) -> None:
        """Add a batch.

        Parameters
        ----------
        points
            (N, K, 2) extremum points, (row, col) in input pixels.
        active
            (N, K) boolean; inactive channels (no positive response) are not counted.
        distances
            (N, A, H, W) distance in pixels to each region on the input grid
            (:func:`distance_maps`).
        faces
            (N, H, W) face masks.
        iod
            (N,) inter-ocular distance in input pixels.
        """
        height, width = distances.shape[-2:]
        located = np.isfinite(points).all(axis=-1)  # an inactive channel has no point
        active = np.asarray(active, dtype=bool) & located
        points = np.where(located[..., None], points, 0.0)
        rows = np.clip(np.floor(points[..., 0] + 0.5).astype(np.int64), 0, height - 1)
        cols = np.clip(np.floor(points[..., 1] + 0.5).astype(np.int64), 0, width - 1)
        n = len(points)
        image = np.arange(n)[:, None]
        at_point = distances[image[:, :, None], np.arange(distances.shape[1])[None, None, :],
                             rows[:, :, None], cols[:, :, None]]  # (N, K, A)
        scale = np.asarray(iod, dtype=np.float64)[:, None, None]
        weight = np.asarray(active, dtype=np.float64)[:, :, None] * np.ones((1, 1, self.n_aus))
        finite = np.isfinite(at_point)
        weight = weight * finite
        self.hits += ((at_point <= self.tolerance * scale) * weight).sum(axis=0)
        self.counts += weight.sum(axis=0)
        self.distance_sum += (np.where(finite, at_point / scale, 0.0) * weight).sum(axis=0)
        near = distances <= self.tolerance * np.asarray(iod, dtype=np.float64)[:, None, None, None]
        face_area = np.maximum(faces.sum(axis=(-2, -1)), 1)[:, None]
        self.chance_sum += ((near & faces[:, None]).sum(axis=(-2, -1)) / face_area).sum(axis=0)
        self.faces += n

    @property
    def hit_rate(self) -> np.ndarray:
        """(K, A) share of active images whose point hits the region."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.hits / self.counts

    @property
    def chance_rate(self) -> np.ndarray:
        """(A,) mean share of the face within the tolerance of each region."""
        return self.chance_sum / max(self.faces, 1)

    @property
    def mean_distance(self) -> np.ndarray:
        """(K, A) mean distance from the point to the region, in IODs."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.distance_sum / self.counts

    def state(self) -> dict[str, np.ndarray]:
        return {"hits": self.hits, "counts": self.counts, "distance_sum": self.distance_sum,
                "chance_sum": self.chance_sum, "faces": np.array(self.faces)}

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.hits, self.counts = arrays["hits"], arrays["counts"]
        self.distance_sum, self.chance_sum = arrays["distance_sum"], arrays["chance_sum"]
        self.faces = int(arrays["faces"])

    def merge(self, other: PointingAccumulator) -> None:
        """Add the sums of ``other`` (another set of images)."""
        self.hits += other.hits
        self.counts += other.counts
        self.distance_sum += other.distance_sum
        self.chance_sum += other.chance_sum
        self.faces += other.faces


def bilinear_matrix(size_out: int, size_in: int) -> torch.Tensor:
    """(size_out, size_in) weights of 1-D bilinear resampling, ``align_corners=False``.

    ``M @ x`` resamples ``x`` along one axis exactly as
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` does.
    """
    scale = size_in / size_out
    source = np.maximum((np.arange(size_out) + 0.5) * scale - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    frac = source - low
    matrix = np.zeros((size_out, size_in), dtype=np.float32)
    np.add.at(matrix, (np.arange(size_out), low), 1.0 - frac)
    np.add.at(matrix, (np.arange(size_out), high), frac)
    return torch.from_numpy(matrix)


@dataclass
class DissectionIoU:
    """Network-Dissection IoU between thresholded channel maps and AU regions (Bau et al.).

    Each channel's map is upsampled (bilinear) to the input grid and thresholded at
    ``thresholds[k]`` (a top quantile of that channel's activations over the dataset); the
    IoU of channel ``k`` and AU ``a`` is ``sum_i |M_ik & R_ia| / sum_i |M_ik | R_ia|`` over
    the images, as in the paper (dataset-level, not a mean of per-image IoUs).
    """

    thresholds: np.ndarray
    n_aus: int
    intersection: np.ndarray = field(init=False)
    union: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.intersection = np.zeros((len(self.thresholds), self.n_aus))
        self.union = np.zeros((len(self.thresholds), self.n_aus))

    def update(self, acts: torch.Tensor, regions: np.ndarray) -> None:
        """Add a batch: ``acts`` (N, K, h, w), ``regions`` (N, A, H, W) on the input grid."""
        height, width = regions.shape[-2:]
        # Bilinear upsampling is separable: two small matrix products (several times faster
        # than the interpolation kernel on many small maps; equal to F.interpolate with
        # align_corners=False up to rounding).
        rows = bilinear_matrix(height, acts.shape[-2]).to(acts.device)
        cols = bilinear_matrix(width, acts.shape[-1]).to(acts.device)
        up = rows @ acts.float() @ cols.T
        threshold = torch.as_tensor(self.thresholds, dtype=up.dtype, device=up.device)
        masks = (up > threshold[None, :, None, None]).flatten(2).float()  # (N, K, HW)
        region = torch.as_tensor(regions, device=up.device).flatten(2).float()  # (N, A, HW)
        inter = torch.bmm(masks, region.transpose(1, 2)).sum(dim=0)  # (K, A)
        size_m = masks.sum(dim=2).sum(dim=0)[:, None]
        size_r = region.sum(dim=2).sum(dim=0)[None, :]
        self.intersection += inter.double().cpu().numpy()
        self.union += (size_m + size_r - inter).double().cpu().numpy()

    @property
    def iou(self) -> np.ndarray:
        """(K, A) dataset-level IoU."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.union > 0, self.intersection / self.union, 0.0)

    def state(self) -> dict[str, np.ndarray]:
        return {"thresholds": self.thresholds, "intersection": self.intersection,
                "union": self.union}

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.thresholds = arrays["thresholds"]
        self.intersection, self.union = arrays["intersection"], arrays["union"]

    def merge(self, other: DissectionIoU) -> None:
        """Add the sums of ``other`` (same thresholds; another set of images)."""
        _same(self.thresholds, other.thresholds, "IoU thresholds")
        self.intersection += other.intersection
        self.union += other.union


@dataclass
class TopImages:
    """The ``k`` images on which each channel responds most (peak activation), streamed.

    Ties keep the earlier image, so the result does not depend on batch boundaries.
    """

    n_channels: int
    k: int = 8
    values: np.ndarray = field(init=False)
    indices: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.values = np.full((self.n_channels, self.k), -np.inf)
        self.indices = np.full((self.n_channels, self.k), -1, dtype=np.int64)

    def update(self, image_indices: np.ndarray, peaks: np.ndarray) -> None:
        """Add a batch: ``peaks`` (N, K) peak activation of each channel per image."""
        values = np.concatenate([self.values, np.asarray(peaks, dtype=np.float64).T], axis=1)
        indices = np.concatenate(
            [self.indices, np.broadcast_to(np.asarray(image_indices)[None, :],
                                           (self.n_channels, len(image_indices)))], axis=1)
        # Sort by value descending, then by image index ascending (stable tie-break).
        order = np.lexsort((indices, -values), axis=1)[:, :self.k]
        self.values = np.take_along_axis(values, order, axis=1)
        self.indices = np.take_along_axis(indices, order, axis=1)

    def state(self) -> dict[str, np.ndarray]:
        return {"values": self.values, "indices": self.indices}

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.values, self.indices = arrays["values"], arrays["indices"]

    def merge(self, other: TopImages) -> None:
        """Keep the top ``k`` of both (same tie rule as :meth:`update`: any merge order)."""
        values = np.concatenate([self.values, other.values], axis=1)
        indices = np.concatenate([self.indices, other.indices], axis=1)
        order = np.lexsort((indices, -values), axis=1)[:, :self.k]
        self.values = np.take_along_axis(values, order, axis=1)
        self.indices = np.take_along_axis(indices, order, axis=1)


@dataclass
class LabelResponses:
    """Each channel's peak response split by what the face shows, for AUCs, streamed.

    Histograms on per-channel bins (memory independent of the number of images) of the
    peak response for every (channel, AU, absent/present) and every (channel, expression).

    Attributes
    ----------
    edges
        (K, n_bins + 1) bin edges per channel; use fine bins (the AUC counts pairs within
        one bin as ties).
    n_aus, n_classes
        Sizes of the AU and expression axes.
    """

    edges: np.ndarray
    n_aus: int
    n_classes: int
    au_counts: np.ndarray = field(init=False)
    class_counts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        k, bins = self.edges.shape[0], self.edges.shape[1] - 1
        self.au_counts = np.zeros((2, k, self.n_aus, bins))  # absent, present
        self.class_counts = np.zeros((k, self.n_classes, bins))

    def update(self, peaks: np.ndarray, presence: np.ndarray, classes: np.ndarray) -> None:
        """Add a batch.

        Parameters
        ----------
        peaks
            (N, K) peak response of each channel.
        presence
            (N, A) 1.0 present, 0.0 absent, NaN unknown (:func:`interp_fer.labels.au_presence`).
        classes
            (N,) expression index, -1 when unlabelled.
        """
        peaks = np.asarray(peaks, dtype=np.float64)
        finite = np.isfinite(peaks)
        index = bin_index(self.edges, np.where(finite, peaks, 0.0))  # (N, K)
        k, bins = index.shape[1], self.edges.shape[1] - 1
        slot = np.arange(k)[None, :] * bins + index  # (N, K)
        for side in (0, 1):
            weight = (presence == side)[:, None, :] & finite[:, :, None]  # (N, K, A)
            target = (slot[:, :, None] * self.n_aus
                      + np.arange(self.n_aus)[None, None, :]).ravel()
            counts = np.bincount(target, weights=weight.ravel().astype(np.float64),
                                 minlength=k * bins * self.n_aus)
            self.au_counts[side] += counts.reshape(k, bins, self.n_aus).transpose(0, 2, 1)
        labelled = (classes >= 0) & (classes < self.n_classes)
        for c in range(self.n_classes):
            rows = labelled & (classes == c)
            if rows.any():
                counts = np.bincount(slot[rows][finite[rows]], minlength=k * bins)
                self.class_counts[:, c] += counts.reshape(k, bins)

    def au_auc(self) -> np.ndarray:
        """(K, A) AUC of the peak response for "AU present vs absent" (NaN: one side empty)."""
        return histogram_auc(self.au_counts[1], self.au_counts[0])

    def expression_auc(self) -> np.ndarray:
        """(K, C) one-vs-rest AUC of the peak response for each expression."""
        total = self.class_counts.sum(axis=1, keepdims=True)
        return histogram_auc(self.class_counts, total - self.class_counts)

    def state(self) -> dict[str, np.ndarray]:
        return {"edges": self.edges, "au_counts": self.au_counts,
                "class_counts": self.class_counts}

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.edges, self.au_counts = arrays["edges"], arrays["au_counts"]
        self.class_counts = arrays["class_counts"]

    def merge(self, other: LabelResponses) -> None:
        """Add the histograms of ``other`` (same bins; another set of images)."""
        _same(self.edges, other.edges, "label-response bins")
        if other.au_counts is not None:  # None: summed elsewhere (integer counts, any order)
            self.au_counts += other.au_counts
            self.class_counts += other.class_counts


def _same(mine: np.ndarray, theirs: np.ndarray, what: str) -> None:
    # Sums on different bins or thresholds mean nothing together.
    if mine.shape != theirs.shape or not np.array_equal(mine, theirs):
        raise ValueError(f"cannot merge accumulators calibrated on different {what}")
