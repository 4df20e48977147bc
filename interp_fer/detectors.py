"""The detector test: does channel k *detect* AU a? (DESIGN.md, "The detector test").

The question of what a channel *detects*, kept apart from where it looks
(:mod:`interp_fer.layer_mapping`, :func:`interp_fer.mapping.looks_at_table`). Everything here works on plain arrays of per-image
responses, so it knows nothing about networks, dlib or images:

``x_in``  (N, K, A)
    channel k's peak response inside region a on image i (``r_in`` of
    :func:`interp_fer.accumulators.region_peaks`);
``x_out`` (N, K, A)
    its peak on the rest of the face;
``activity`` (N, A)
    how active AU a is on image i (landmark proxies, :mod:`interp_fer.au_activity`, or the
    user's AU labels, 0/1 or intensity).

Two association measures, per (k, a) and on one set of images:

* ``effect`` (the statistic): Spearman's rho between ``x_in[:, k, a]`` and AU a's activity,
  for every kind of activity (0/1 codes, intensities, landmark proxies): does the response at
  the AU's place rise with the AU?
* ``partial`` (reported beside it): the correlation between the in-minus-out rank contrast
  (``x_in`` rank minus ``x_out`` rank, standardised) and AU a's activity rank with every
  *other* AU's activity rank partialled out (linear regression on ranks).

The decision (:func:`detector_test`):

1. **Cross-fitting.** Images are split in two halves by a per-image draw (order- and
   batch-independent). On the *selection* half each channel gets its candidate AU; every
   number reported for the pair comes from the other, *report*, half, so the choice does not
   inflate it.
2. **The candidate AU** is the one the channel follows most *beyond what random filters of
   the same layer follow*: the largest ``effect - control_bar`` on the selection half. Some
   AUs change the image so much (an open mouth, AU25) that any edge filter follows them; the
   bar puts every AU on the same footing ("more than with any other AU").
3. **Significance.** On the report half, rows of the activity matrix are permuted together
   (AU co-occurrence kept) and ``effect`` recomputed: exact Monte-Carlo permutation p-values,
   ``(1 + #{effect_perm >= effect}) / (1 + n_perm)``, one-sided (a detector's response
   *rises* with the AU), with ``n_perm`` large enough that the smallest possible p is below
   half the smallest Benjamini-Hochberg threshold of the family. BH runs over every tested
   pair of the run (one candidate per channel). No tail is fitted.
4. **Control.** ``control_bar``: the largest ``effect`` at that (layer, AU) over every
   channel of several copies of the network with every parameter re-drawn
   (:func:`interp_fer.controls.randomized_copy`), on the same report images. A detector must
   exceed it. One copy is not enough: the largest of one copy's channels is itself noisy,
   and a second copy beat it for 7-16 % of its channels on FER2013 (mini-Xception, 2,000
   faces); with three copies pooled, 1.6-2.3 %.
5. **Specificity against the rest of the face.** The response inside the region must follow
   the AU more than the channel's peak elsewhere on the face does (``effect > out_effect``):
   a channel that brightens everywhere on smiles is not a detector of the lip corners.

A channel is mapped to its candidate AU when all of 3-5 hold and the report half has at least
``min_report`` faces; otherwise ``au`` is empty and the candidate's numbers are still reported.

What the error rates are (a referee's reading, stated so that no one over-reads them): the
Benjamini-Hochberg FDR controls the *association* claims (3). The bar (4) is a separate
criterion with an error rate of its own: a network exchangeable with the copies (a further
random copy) holds the largest channel of a (layer, AU) with probability 1 / (C + 1) for C
copies, so a random network tested this way keeps about (layers x AUs) / (C + 1) detections
whatever ``alpha`` is (measured: 6 of 256 channels on FER2013 with C = 3; a simulation of 2
layers x 6 AUs gave 3.5 on average). More copies lower it. The numbers of a detected channel are
computed on the half that decided it, so among detectors they are conditional on passing.

Why ``partial`` is reported and not required (measured, DESIGN.md asks for specificity given
co-occurring AUs): landmark proxies of neighbouring AUs are strongly collinear (AU12 with
AU6, AU20 and AU25; AU25, AU26 and AU27), and partialling all other AUs out removes nearly
everything a channel follows. On 2,000 FER2013 faces the block4 channels of mini-Xception
that follow AU12 most (``effect`` 0.43-0.54, "happy" AUC up to 0.88) have a ``partial`` of
-0.10 to 0.08, the same as random networks' channels (-0.05 to 0.10); a rule on ``partial``
mapped no more channels in the trained network than in random ones. Step 2 (the bar) is
what keeps AUs apart in the decision; ``partial`` lets a reader check a pair.

``auc`` is the AUC of the in-region response for 0/1 activity and ``(1 + rho) / 2``, an
AUC-like number, for continuous activity, with a percentile bootstrap interval over report
images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

from .statistics import benjamini_hochberg


@dataclass
class DetectorOptions:
    """Choices of the detector test (all recorded in ``run.json``).

    Attributes
    ----------
    alpha
        False discovery rate (Benjamini-Hochberg over every tested pair of the run).
    n_perm
        Permutations; ``None`` picks ``max(1000, ceil(2 m / alpha))`` for m tested pairs, so
        the p-value floor ``1 / (n_perm + 1)`` is below half the smallest BH threshold.
    n_boot
        Bootstrap replicates of the effect-size interval.
    confidence
        Level of that interval.
    control_quantile
        Which quantile of the random-weights channels' ``effect`` (same layer, same AU, every
        control copy pooled) a channel must exceed; 1.0 = the largest.
    min_report
        Report halves with fewer images are flagged ``small_sample`` and map nothing: with
        so few faces the numbers are not evidence (a permutation p-value can still reach
        its floor from about 8 faces on).
    seed
        Seed of the half split, the permutations and the bootstrap.
    """

    alpha: float = 0.05
    n_perm: int | None = None
    n_boot: int = 200
    confidence: float = 0.95
    control_quantile: float = 1.0
    min_report: int = 30
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), not {self.alpha}")
        if self.n_perm is not None and self.n_perm < 1:
            raise ValueError(f"n_perm must be >= 1, not {self.n_perm}")
        if self.n_boot < 0:
            raise ValueError(f"n_boot must be >= 0, not {self.n_boot}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), not {self.confidence}")
        if not 0 <= self.control_quantile <= 1:
            raise ValueError(f"control_quantile must be in [0, 1], not {self.control_quantile}")

    def permutations_for(self, m: int) -> int:
        """Permutations for a family of ``m`` tested pairs."""
        if self.n_perm is not None:
            return self.n_perm
        return max(1000, int(np.ceil(2 * max(m, 1) / self.alpha)))


def selection_half(image_ids: np.ndarray, seed: int) -> np.ndarray:
    """(N,) boolean: True for images of the selection half, False for the report half.

    Each image's side is a function of ``(seed, image id)`` alone, so it does not depend on
    the order of the images, on batches or on which other images are in the run.
    """
    ids = np.asarray(image_ids, dtype=np.uint64)
    # SplitMix64 of (seed, id): a well-mixed 64-bit hash, vectorised (wrapping arithmetic).
    with np.errstate(over="ignore"):
        z = ids * np.uint64(0x9E3779B97F4A7C15) \
            + np.uint64(seed & 0xFFFFFFFF) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(63)) == 0


def standard_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks along axis 0 (ties averaged), centred and scaled to unit mean square.

    A constant column becomes all zeros.
    """
    ranks = stats.rankdata(values, axis=0).astype(np.float64)
    ranks -= ranks.mean(axis=0, keepdims=True)
    scale = np.sqrt((ranks ** 2).mean(axis=0, keepdims=True))
    return np.divide(ranks, scale, out=np.zeros_like(ranks), where=scale > 0)


def _precision(z: np.ndarray) -> np.ndarray:
    """Inverse correlation of the standardised activity ranks (pseudo-inverse, ridge 1e-6)."""
    a = z.shape[1]
    sigma = z.T @ z / len(z)
    # A constant activity column has zero variance: keep it out of the inverse.
    live = np.diag(sigma) > 0
    omega = np.zeros((a, a))
    if live.any():
        sub = sigma[np.ix_(live, live)] + 1e-6 * np.eye(int(live.sum()))
        omega[np.ix_(live, live)] = np.linalg.pinv(sub)
    return omega


def _partial_from(c: np.ndarray, omega: np.ndarray, au: np.ndarray) -> np.ndarray:
    """Partial correlation of e with activity ``au`` given the other activities.

    ``c[..., :]`` is corr(e, z_b) for every activity b (e and z standardised); with the
    precision ``omega`` of z, the partial correlation of e and z_a given z_{-a} is
    ``(omega c)_a / sqrt(s omega_aa + (omega c)_a^2)``, ``s = 1 - c' omega c`` (the Schur
    complement of the joint correlation matrix of (e, z)).
    """
    w = c @ omega  # omega is symmetric
    s = 1.0 - (c * w).sum(axis=-1)
    wa = np.take_along_axis(w, au[..., None], axis=-1)[..., 0]
    denom = np.sqrt(np.clip(s, 0, None) * omega[au, au] + wa ** 2)
    return np.divide(wa, denom, out=np.full_like(wa, np.nan), where=denom > 0)


def partial_association(x_in: np.ndarray, x_out: np.ndarray, activity: np.ndarray) -> np.ndarray:
    """``partial(k, a)`` for every channel and AU on one set of images.

    Parameters
    ----------
    x_in, x_out
        (N, K, A) in-region and out-of-region peak responses.
    activity
        (N, A) AU activity.

    Returns
    -------
    numpy.ndarray
        (K, A) partial rank correlations in [-1, 1] (NaN where undefined, e.g. a constant
        response).
    """
    n, k, a = x_in.shape
    if n < 3:
        return np.full((k, a), np.nan)
    e = _in_residuals(x_in, x_out)  # (N, K, A)
    z = standard_ranks(activity)
    omega = _precision(z)
    c = np.einsum("nka,nb->kab", e, z) / n  # (K, A, A)
    out = _partial_from(c, omega, np.broadcast_to(np.arange(a), (k, a)))
    out[~np.any(e != 0, axis=0)] = np.nan
    return out


def _in_residuals(x_in: np.ndarray, x_out: np.ndarray) -> np.ndarray:
    """The in-minus-out rank contrast, standardised: (N, K, A)."""
    n, k, a = x_in.shape
    contrast = standard_ranks(x_in.reshape(n, -1)) - standard_ranks(x_out.reshape(n, -1))
    contrast -= contrast.mean(axis=0, keepdims=True)
    scale = np.sqrt((contrast ** 2).mean(axis=0, keepdims=True))
    return np.divide(contrast, scale, out=np.zeros_like(contrast), where=scale > 1e-9
                     ).reshape(n, k, a)


def rank_effect(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each column pair (rank-biserial 2 AUC - 1 when y is 0/1).

    Parameters
    ----------
    x, y
        (N, M) arrays; column j of x against column j of y. A column of y with exactly two
        distinct values is taken as binary (absent / present).

    Returns
    -------
    numpy.ndarray
        (M,) effects in [-1, 1], NaN where a column is constant.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(x)
    rx = standard_ranks(x)
    low, high = y.min(axis=0), y.max(axis=0)
    binary = ((y == low) | (y == high)).all(axis=0) & (high > low)
    out = (rx * standard_ranks(y)).mean(axis=0)
    if binary.any():
        raw = stats.rankdata(x[:, binary], axis=0)
        positive = y[:, binary] == high[binary]
        n1 = positive.sum(axis=0)
        n0 = n - n1
        auc = ((raw * positive).sum(axis=0) - n1 * (n1 + 1) / 2) / (n1 * n0)
        out[binary] = 2 * auc - 1
    constant = ~(rx != 0).any(axis=0) | (high == low)
    out[constant] = np.nan
    return out


def effects(x: np.ndarray, activity: np.ndarray) -> np.ndarray:
    """``effect(k, a)``: Spearman's rho of every channel's response against every AU.

    One statistic for every AU, 0/1 codes, intensities and landmark proxies alike, so that
    AUs compete on one scale for a channel's candidate (the rank-biserial correlation of a
    0/1 column is larger than its Spearman's rho by a factor that depends on the AU's
    prevalence). It is also what the permutation test orders.

    Parameters
    ----------
    x
        (N, K, A) responses (e.g. in-region peaks).
    activity
        (N, A) AU activity.

    Returns
    -------
    numpy.ndarray
        (K, A) in [-1, 1]; NaN where a response or an activity is constant.
    """
    n, k, a = x.shape
    if n < 3:
        return np.full((k, a), np.nan)
    rx = standard_ranks(np.asarray(x, dtype=np.float64).reshape(n, k * a)).reshape(n, k, a)
    ry = standard_ranks(np.asarray(activity, dtype=np.float64))
    out = np.einsum("nka,na->ka", rx, ry) / n
    constant = ~(rx != 0).any(axis=0) | ~(ry != 0).any(axis=0)[None, :]
    out[constant] = np.nan
    return out


def permutation_p_values(e: np.ndarray, au: np.ndarray, activity: np.ndarray, n_perm: int,
                         seed: int | Sequence[int], chunk: int = 128) -> np.ndarray:
    """One-sided permutation p-values of each tested pair's ``effect``.

    Parameters
    ----------
    e
        (N, J) responses of the tested pairs (one column per pair).
    au
        (J,) the activity column each pair is tested against.
    activity
        (N, A) activity; its rows are permuted together, so co-occurrence is kept.
    n_perm
        Number of random permutations.
    seed
        Seed of the permutations.

    Returns
    -------
    numpy.ndarray
        (J,) ``(1 + #{statistic_perm >= statistic}) / (1 + n_perm)``; NaN for a constant
        column. The statistic is the correlation of ranks, an increasing function of the
        ``effect`` under permutation (for 0/1 activity the number of positives is fixed, so
        the rank-biserial correlation and the rank correlation order permutations alike).
    """
    n = len(e)
    ranks = standard_ranks(np.asarray(e, dtype=np.float64))
    z = standard_ranks(np.asarray(activity, dtype=np.float64)).astype(np.float32)
    observed = (ranks * z[:, au]).mean(axis=0)
    et = np.ascontiguousarray(ranks.T, dtype=np.float32)  # (J, N)
    rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), 0x9E47])
    exceed = np.zeros(len(au), dtype=np.int64)
    done = 0
    while done < n_perm:
        p = min(chunk, n_perm - done)
        order = np.argsort(rng.random((p, n)), axis=1)
        c = np.matmul(et, z[order]) / n  # (P, J, A), BLAS per permutation
        null = np.take_along_axis(c, np.broadcast_to(au, c.shape[:2])[..., None], axis=2)[..., 0]
        # float32 sums: a tolerance so that permutations equal to the observed order count.
        exceed += (null >= observed[None] - 1e-5).sum(axis=0)
        done += p
    out = (1 + exceed) / (1 + n_perm)
    out[~(ranks != 0).any(axis=0)] = np.nan
    return out


def _bootstrap_interval(x: np.ndarray, y: np.ndarray, n_boot: int, confidence: float,
                        seed: int) -> tuple[np.ndarray, np.ndarray]:
    m = x.shape[1]
    if n_boot == 0 or len(x) < 3:
        return np.full(m, np.nan), np.full(m, np.nan)
    rng = np.random.default_rng([seed, 0xB007])
    draws = np.empty((n_boot, m))
    for b in range(n_boot):
        rows = rng.integers(0, len(x), len(x))
        draws[b] = rank_effect(x[rows], y[rows])
    tail = (1 - confidence) / 2
    low, high = np.full(m, np.nan), np.full(m, np.nan)
    finite = np.isfinite(draws).any(axis=0)  # a constant column has no interval
    if finite.any():
        low[finite], high[finite] = np.nanquantile(draws[:, finite], [tail, 1 - tail], axis=0)
    return low, high


@dataclass
class LayerResponses:
    """Per-image responses of one layer of one network, for the detector test.

    Attributes
    ----------
    layer
        Layer name.
    x_in, x_out
        (N, K, A) in-region and out-of-region peak responses, rows in image order. A control
        copy that only sets the bar needs no ``x_out`` (None).
    """

    layer: str
    x_in: np.ndarray
    x_out: np.ndarray | None = None


def detector_test(layers: list[LayerResponses], activity: np.ndarray, image_ids: np.ndarray,
                  aus: tuple[int, ...],
                  controls: Sequence[list[LayerResponses]] | None = None,
                  options: DetectorOptions | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Which channel detects which AU, for every layer of one network.

    Parameters
    ----------
    layers
        Per layer, the network's responses (same images, same AUs).
    activity
        (N, A) AU activity of those images (finite).
    image_ids
        (N,) stable ids (dataset positions) that fix each image's half.
    aus
        The A AU numbers.
    controls
        Random-weights copies of the network: for each, the same layers on the same images.
        Without them no control bar applies and ``control_bar`` is NaN (say so when
        reporting).
    options
        :class:`DetectorOptions`.

    Returns
    -------
    detectors
        One row per (layer, channel): ``au`` (Int64, empty unless every criterion holds),
        ``candidate_au``, ``effect``, ``auc``, ``auc_low``, ``auc_high``, ``out_effect``,
        ``partial`` (all on the report half), ``effect_select``, ``p_value``, ``q_value``,
        ``control_bar``, ``beats_control``, ``specific``, ``n_select``, ``n_report``,
        ``small_sample``.
    pairs
        One row per (layer, channel, AU): ``effect_select``, and on the report half
        ``effect``, ``out_effect``, ``partial`` and ``control_bar``, for every pair.
    """
    options = options or DetectorOptions()
    activity = np.asarray(activity, dtype=np.float64)
    if not np.isfinite(activity).all():
        raise ValueError("activity must be finite for every image given to the detector test")
    controls = list(controls or [])
    select = selection_half(image_ids, options.seed)
    report = ~select
    a = len(aus)
    frames, pair_frames, tested = [], [], []
    for number, responses in enumerate(layers):
        if responses.x_out is None:
            raise ValueError(f"layer {responses.layer!r}: the tested network needs x_out")
        x_in, x_out = _filled(responses.x_in), _filled(responses.x_out)
        k = x_in.shape[1]
        e_select = effects(x_in[select], activity[select])
        e_report = effects(x_in[report], activity[report])
        out_report = effects(x_out[report], activity[report])
        partial = partial_association(x_in[report], x_out[report], activity[report])
        bar_select, bar_report = _bars(controls, number, responses.layer, select, report,
                                       activity, options.control_quantile, a)
        # With controls, an AU without a bar (every control channel constant there) cannot be
        # a candidate: it would compete with no bar at all.
        bar_for_choice = bar_select if controls else np.zeros(a)
        excess = np.where(np.isfinite(e_select) & np.isfinite(bar_for_choice),
                          e_select - bar_for_choice, -np.inf)
        candidate = excess.argmax(axis=1)
        channels = np.arange(k)
        x_rep = x_in[report][:, channels, candidate]
        y_rep = activity[report][:, candidate]
        low, high = _bootstrap_interval(x_rep, y_rep, options.n_boot, options.confidence,
                                        options.seed + number)
        effect = e_report[channels, candidate]
        tested.append((sum(len(f) for f in frames), x_rep, candidate, number))
        frames.append(pd.DataFrame({
            "layer": responses.layer, "channel": channels,
            "candidate_au": np.asarray(aus)[candidate], "effect": effect,
            "auc": (1 + rank_effect(x_rep, y_rep)) / 2, "auc_low": np.clip((1 + low) / 2, 0, 1),
            "auc_high": np.clip((1 + high) / 2, 0, 1),
            "out_effect": out_report[channels, candidate],
            "partial": partial[channels, candidate],
            "effect_select": e_select[channels, candidate],
            "control_bar": bar_report[candidate],
            "n_select": int(select.sum()), "n_report": int(report.sum())}))
        ch_grid, au_grid = np.meshgrid(channels, np.arange(a), indexing="ij")
        pair_frames.append(pd.DataFrame({
            "layer": responses.layer, "channel": ch_grid.ravel(),
            "au": np.asarray(aus)[au_grid.ravel()], "effect_select": e_select.ravel(),
            "effect": e_report.ravel(), "out_effect": out_report.ravel(),
            "partial": partial.ravel(),
            "control_bar": np.broadcast_to(bar_report, (k, a)).ravel()}))
    table = pd.concat(frames, ignore_index=True)
    table["p_value"] = np.nan
    m = int(np.isfinite(table["effect"]).sum())
    n_perm = options.permutations_for(m)
    if report.sum() >= 3:
        p_values = np.full(len(table), np.nan)
        for start, x_rep, candidate, number in tested:
            p_values[start:start + len(candidate)] = permutation_p_values(
                x_rep, candidate, activity[report], n_perm, (options.seed, number))
        table["p_value"] = p_values
    table["q_value"] = benjamini_hochberg(table["p_value"].to_numpy(dtype=float))
    with np.errstate(invalid="ignore"):
        table["beats_control"] = table["effect"] > table["control_bar"]
        if not controls:  # no control run: no bar to clear (the run says so)
            table["beats_control"] = True
        table["specific"] = table["effect"] > table["out_effect"]
    table["small_sample"] = table["n_report"] < options.min_report
    detected = (table["q_value"] <= options.alpha) & table["beats_control"] & \
        table["specific"] & ~table["small_sample"]
    table["au"] = pd.array(np.where(detected, table["candidate_au"], pd.NA), dtype="Int64")
    table.attrs.update(n_perm=n_perm, options=asdict(options), controls=len(controls))
    columns = ["layer", "channel", "au", "candidate_au", "effect", "auc", "auc_low", "auc_high",
               "out_effect", "partial", "effect_select", "p_value", "q_value", "control_bar",
               "beats_control", "specific", "n_select", "n_report", "small_sample"]
    return table[columns], pd.concat(pair_frames, ignore_index=True)


def _bars(controls: list[list[LayerResponses]], number: int, layer: str, select: np.ndarray,
          report: np.ndarray, activity: np.ndarray, quantile: float, a: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """Per AU, the control bar on each half: a quantile of every control channel's effect."""
    if not controls:
        return np.full(a, np.nan), np.full(a, np.nan)
    halves = []
    for rows in (select, report):
        pooled = []
        for copy in controls:
            c = copy[number]
            if c.layer != layer:
                raise ValueError(f"control layer {c.layer!r} does not match {layer!r}")
            pooled.append(effects(_filled(c.x_in)[rows], activity[rows]))
        values = np.concatenate(pooled, axis=0)  # (copies x K, A)
        bar = np.full(a, np.nan)
        for j in range(a):
            finite = values[:, j][np.isfinite(values[:, j])]
            if len(finite):
                bar[j] = np.quantile(finite, quantile)
        halves.append(bar)
    return halves[0], halves[1]


def _filled(x: np.ndarray) -> np.ndarray:
    # A region without cells (clipped off the image) has no response: the lowest value of
    # the channel stands in, so ranks put it last and nothing is dropped silently (the run
    # counts clipped regions).
    # float32 as stored: ranks do not need more, and a whole layer's responses stay small.
    x = np.asarray(x, dtype=np.float32)
    finite = np.isfinite(x)
    if finite.all():
        return x
    low = np.nanmin(np.where(finite, x, np.nan), axis=(0, 2), keepdims=True)
    return np.where(finite, x, np.nan_to_num(low, nan=0.0) - 1.0).astype(np.float32)
