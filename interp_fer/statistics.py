"""Distribution distances, multiple-testing control and random region placement.

The building blocks of the AU <-> channel mapping (DESIGN.md, "Distance function" and
"Significance and stability"), as small functions on plain arrays. Nothing here knows about
networks or faces.

Distances compare the per-image peak response of a channel *inside* an AU region (``r_in``)
with its peak response *elsewhere on the face* (``r_out``). All are signed so that a positive
value means "responds more inside the region":

* ``"wasserstein"`` (default): ``sign(mean_in - mean_out) * W1(r_in, r_out) / s_pooled``,
  with ``s_pooled = sqrt((var_in + var_out) / 2)`` (sample variances). Scale-free, so channels
  with different activation ranges are comparable;
* ``"ks"``: ``sign(mean_in - mean_out) * sup |F_in - F_out|`` (two-sample KS statistic);
* ``"cohen_d"``: ``(mean_in - mean_out) / s_pooled``.

They are computed either from samples (:func:`signed_distance`, exact) or from histograms on
shared bins (:func:`histogram_distance`), which is what the streaming accumulator keeps so that
memory does not grow with the number of images; the histogram W1 differs from the exact one by
at most one bin width.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

METHODS = ("wasserstein", "ks", "cohen_d")


def _pooled_sd(var_in: np.ndarray, var_out: np.ndarray) -> np.ndarray:
    return np.sqrt((var_in + var_out) / 2.0)


def _scale_free(raw: np.ndarray, scale: np.ndarray) -> np.ndarray:
    # A channel constant over all images has no scale: it is at distance 0, not NaN/inf.
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(scale > 0, raw / np.where(scale > 0, scale, 1.0), 0.0)


def signed_distance(inside: np.ndarray, outside: np.ndarray, method: str = "wasserstein") -> np.ndarray:
    """Signed, scale-free distance between two samples, along axis 0.

    Parameters
    ----------
    inside, outside
        (n_images, ...) arrays of per-image responses (same trailing shape; the number of
        images may differ).
    method
        ``"wasserstein"``, ``"ks"`` or ``"cohen_d"`` (see the module docstring).

    Returns
    -------
    numpy.ndarray
        Shape ``inside.shape[1:]``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown distance {method!r}; choose from {', '.join(METHODS)}")
    inside = np.asarray(inside, dtype=np.float64)
    outside = np.asarray(outside, dtype=np.float64)
    if len(inside) < 2 or len(outside) < 2:
        raise ValueError("need at least two images on each side")
    # Each column reduced on its own, contiguous: a channel's D does not depend on which other
    # channels are computed with it (the decision cuts layers into blocks of channels).
    ins, outs = by_column(inside), by_column(outside)
    difference = ins.mean(axis=-1) - outs.mean(axis=-1)
    scale = _pooled_sd(ins.var(axis=-1, ddof=1), outs.var(axis=-1, ddof=1))
    if method == "cohen_d":
        return _scale_free(difference, scale)
    a = np.sort(ins, axis=-1)
    b = np.sort(outs, axis=-1)
    if method == "ks":
        raw = _ks_sorted(np.moveaxis(a, -1, 0), np.moveaxis(b, -1, 0))
        return np.sign(difference) * raw
    if a.shape[-1] == b.shape[-1]:
        raw = np.abs(a - b).mean(axis=-1)  # W1 between equal-size samples: matched quantiles
    else:
        flat_a = a.reshape(-1, a.shape[-1])
        flat_b = b.reshape(-1, b.shape[-1])
        raw = np.array([stats.wasserstein_distance(flat_a[j], flat_b[j])
                        for j in range(flat_a.shape[0])]).reshape(a.shape[:-1])
    return np.sign(difference) * _scale_free(raw, scale)


def by_column(values: np.ndarray) -> np.ndarray:
    """``values`` (n, ...) with axis 0 moved last and made contiguous: (..., n).

    Reductions over the last axis then treat every column alone (numpy sums a contiguous
    row pairwise, and a strided axis 0 sequentially), so a column's mean does not depend on
    how many other columns share the array: statistics computed on blocks of channels equal
    those computed on the whole layer, bit for bit.
    """
    return np.ascontiguousarray(np.moveaxis(np.asarray(values, dtype=np.float64), 0, -1))


def _ks_sorted(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    flat_a = a.reshape(len(a), -1)
    flat_b = b.reshape(len(b), -1)
    result = np.empty(flat_a.shape[1])
    for j in range(flat_a.shape[1]):
        grid = np.concatenate([flat_a[:, j], flat_b[:, j]])
        cdf_a = np.searchsorted(flat_a[:, j], grid, side="right") / len(flat_a)
        cdf_b = np.searchsorted(flat_b[:, j], grid, side="right") / len(flat_b)
        result[j] = np.abs(cdf_a - cdf_b).max()
    return result.reshape(a.shape[1:])


def histogram_distance(
    hist_in: np.ndarray,
    hist_out: np.ndarray,
    edges: np.ndarray,
    moments_in: tuple[np.ndarray, np.ndarray, np.ndarray],
    moments_out: tuple[np.ndarray, np.ndarray, np.ndarray],
    method: str = "wasserstein",
) -> np.ndarray:
    """Signed, scale-free distance from (weighted) histograms on shared bins.

    Parameters
    ----------
    hist_in, hist_out
        (..., n_bins) weights per bin.
    edges
        (..., n_bins + 1) bin edges (broadcast against the histograms).
    moments_in, moments_out
        ``(weight, sum, sum_of_squares)`` of the exact values, each (...): means and variances
        come from these, not from the binned values.
    method
        As in :func:`signed_distance`.

    Returns
    -------
    numpy.ndarray
        Shape ``hist_in.shape[:-1]``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown distance {method!r}; choose from {', '.join(METHODS)}")
    mean_in, var_in = weighted_moments(*moments_in)
    mean_out, var_out = weighted_moments(*moments_out)
    difference = mean_in - mean_out
    scale = _pooled_sd(var_in, var_out)
    if method == "cohen_d":
        return _scale_free(difference, scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        cdf_in = np.cumsum(hist_in, axis=-1) / hist_in.sum(axis=-1, keepdims=True)
        cdf_out = np.cumsum(hist_out, axis=-1) / hist_out.sum(axis=-1, keepdims=True)
    gap = np.nan_to_num(np.abs(cdf_in - cdf_out))
    if method == "ks":
        return np.sign(difference) * gap.max(axis=-1)
    widths = np.diff(edges, axis=-1)
    return np.sign(difference) * _scale_free((gap * widths).sum(axis=-1), scale)


def weighted_moments(weight: np.ndarray, total: np.ndarray, squares: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased (frequency-weighted) variance from running sums.

    Parameters
    ----------
    weight, total, squares
        Sum of weights, of weighted values and of weighted squared values.
    """
    weight = np.asarray(weight, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(weight > 0, total / np.where(weight > 0, weight, 1), 0.0)
        var = np.where(weight > 1, (squares - weight * mean**2) / np.where(weight > 1, weight - 1, 1), 0.0)
    return mean, np.maximum(var, 0.0)


def histogram_auc(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """Area under the ROC curve from histograms on shared bins (ties count one half).

    Equals the Mann-Whitney U statistic divided by ``n_pos * n_neg`` (what
    ``scipy.stats.mannwhitneyu`` gives on the raw values) when every bin holds one value;
    pairs that share a bin count as ties.

    Parameters
    ----------
    positive, negative
        (..., n_bins) counts of the positive and negative cases.

    Returns
    -------
    numpy.ndarray
        (...) P(positive > negative) + P(tie) / 2; NaN where either side is empty.
    """
    positive = np.asarray(positive, dtype=np.float64)
    negative = np.asarray(negative, dtype=np.float64)
    below = np.cumsum(negative, axis=-1) - negative  # negatives in lower bins
    pairs = (positive * (below + 0.5 * negative)).sum(axis=-1)
    total = positive.sum(axis=-1) * negative.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, pairs / np.where(total > 0, total, 1.0), np.nan)


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values over every entry of ``p_values`` (NaN entries stay NaN)."""
    p = np.asarray(p_values, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        q[finite] = stats.false_discovery_control(np.clip(p[finite], 0, 1), method="bh")
    return q


def placement_offsets(region: np.ndarray, face: np.ndarray) -> np.ndarray:
    """Every translation that keeps ``region`` entirely inside ``face``.

    Parameters
    ----------
    region, face
        (H, W) boolean masks on the same pixel grid.

    Returns
    -------
    numpy.ndarray
        (n, 2) integer (d_row, d_col) shifts, row-major order of the moved region's corner;
        empty when the region fits nowhere.
    """
    return placement_offsets_many(np.asarray(region)[None], np.asarray(face)[None])[0]


def placement_offsets_many(regions: np.ndarray, faces: np.ndarray) -> list[np.ndarray]:
    """:func:`placement_offsets` for M (region, face) pairs at once.

    Parameters
    ----------
    regions, faces
        (M, H, W) boolean masks; ``faces`` may also be (H, W) or broadcast over M.

    Returns
    -------
    list of numpy.ndarray
        M arrays of (n, 2) shifts.
    """
    regions = np.asarray(regions, dtype=bool)
    m, height, width = regions.shape
    outside = ~np.broadcast_to(np.asarray(faces, dtype=bool), regions.shape)
    boxes, patches = [], np.zeros(regions.shape, dtype=np.float64)
    for i, region in enumerate(regions):
        rows, cols = np.nonzero(region)
        if rows.size == 0:
            boxes.append(None)
            continue
        top, left, bottom, right = rows.min(), cols.min(), rows.max() + 1, cols.max() + 1
        patches[i, :bottom - top, :right - left] = region[top:bottom, left:right]
        boxes.append((top, left, bottom - top, right - left))
    # Region pixels that would land outside the face, for every corner (r, c) of the patch:
    # a correlation, done for all pairs in one batched FFT. Corners that keep the patch on
    # the grid (r <= H - h, c <= W - w) never wrap around, so no padding is needed.
    spill = np.fft.irfft2(np.fft.rfft2(outside.astype(np.float64))
                          * np.conj(np.fft.rfft2(patches)), s=(height, width))
    out = []
    for i, box in enumerate(boxes):
        if box is None:
            out.append(np.zeros((0, 2), dtype=np.int64))
            continue
        top, left, h, w = box
        corner_rows, corner_cols = np.nonzero(spill[i, :height - h + 1, :width - w + 1] < 0.5)
        out.append(np.stack([corner_rows - top, corner_cols - left], axis=1).astype(np.int64))
    return out


def random_offsets(offsets: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` shifts drawn uniformly, with replacement, among the valid ``offsets``.

    The null of the mapping's significance test moves each region (same shape and size) to
    random places inside its face (:func:`placement_offsets`): it keeps the region's area
    and shape, so area effects cancel, and it works on aligned datasets where all faces
    look alike.

    Parameters
    ----------
    offsets
        (n_valid, 2) valid shifts of a region (:func:`placement_offsets`).
    n
        Shifts to draw.
    rng
        Random generator.

    Returns
    -------
    numpy.ndarray
        (n, 2) integer (d_row, d_col).

    Raises
    ------
    ValueError
        When there is no valid shift (the region fits nowhere inside the face).
    """
    if len(offsets) == 0:
        raise ValueError("the region does not fit inside the face at any position")
    return offsets[rng.integers(0, len(offsets), size=n)]


def empirical_p_value(observed: np.ndarray, null: np.ndarray) -> np.ndarray:
    """One-sided permutation p-value ``(1 + #{null >= observed}) / (1 + n_null)``.

    Parameters
    ----------
    observed
        (...) statistics.
    null
        (n_null, ...) statistics under the null.
    """
    null = np.asarray(null)
    return (1.0 + (null >= np.asarray(observed)[None]).sum(axis=0)) / (1.0 + len(null))


def normal_tail_p_value(observed: np.ndarray, null: np.ndarray) -> np.ndarray:
    """One-sided p-value of ``observed`` under a normal null estimated from its replicates.

    With ``m`` replicates of estimated mean and SD, a new draw from the same normal follows
    ``mean + sd * sqrt(1 + 1/m) * t(m - 1)`` (the predictive distribution), so the tail is
    Student's t rather than the normal: with m = 20 a normal tail rejects 3.5 times too often
    at p = 1e-3 (measured), and worse further out, where Benjamini-Hochberg over thousands of
    (channel, AU) pairs decides. Resolves p-values below ``1 / m``; :func:`empirical_p_value` is reported
    beside it as a check.

    Parameters
    ----------
    observed
        (...) statistics.
    null
        (m, ...) statistics under the null, m >= 2.
    """
    null = np.asarray(null, dtype=np.float64)
    m = len(null)
    if m < 2:
        raise ValueError("the normal null needs at least 2 replicates")
    mean = null.mean(axis=0)
    scale = null.std(axis=0, ddof=1) * np.sqrt(1.0 + 1.0 / m)
    observed = np.asarray(observed, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(scale > 0, (observed - mean) / np.where(scale > 0, scale, 1.0),
                     np.where(observed > mean, np.inf, 0.0))
    return stats.t.sf(t, df=m - 1)
