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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
from scipy import stats

from .statistics import benjamini_hochberg, by_column


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
    ranks = by_column(stats.rankdata(values, axis=0))  # (..., N): every column alone
    ranks -= ranks.mean(axis=-1, keepdims=True)
    scale = np.sqrt((ranks ** 2).mean(axis=-1, keepdims=True))
    out = np.divide(ranks, scale, out=np.zeros_like(ranks), where=scale > 0)
    return np.moveaxis(out, -1, 0)


def _column_mean(values: np.ndarray) -> np.ndarray:
    """Mean along axis 0, every column on its own (see :func:`interp_fer.statistics.by_column`)."""
    return by_column(values).mean(axis=-1)


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
    c = np.stack([_column_mean(e * z[:, b, None, None]) for b in range(a)], axis=-1)  # (K, A, A)
    out = _partial_from(c, omega, np.broadcast_to(np.arange(a), (k, a)))
    out[~np.any(e != 0, axis=0)] = np.nan
    return out


def _in_residuals(x_in: np.ndarray, x_out: np.ndarray) -> np.ndarray:
    """The in-minus-out rank contrast, standardised: (N, K, A)."""
    n, k, a = x_in.shape
    contrast = by_column(standard_ranks(x_in.reshape(n, -1))
                         - standard_ranks(x_out.reshape(n, -1)))  # (K A, N)
    contrast -= contrast.mean(axis=-1, keepdims=True)
    scale = np.sqrt((contrast ** 2).mean(axis=-1, keepdims=True))
    out = np.divide(contrast, scale, out=np.zeros_like(contrast), where=scale > 1e-9)
    return np.moveaxis(out, -1, 0).reshape(n, k, a)


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
    out = _column_mean(rx * standard_ranks(y))
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
    out = _column_mean(rx * ry[:, None, :])
    constant = ~(rx != 0).any(axis=0) | ~(ry != 0).any(axis=0)[None, :]
    out[constant] = np.nan
    return out


def permutation_p_values(e: np.ndarray, au: np.ndarray, activity: np.ndarray, n_perm: int,
                         seed: int | Sequence[int], memory: int = 64 * 2**20) -> np.ndarray:
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
    memory
        Bytes for a batch of permutations (about 20 per image and permutation); the
        permutations, and so the p-values, do not depend on it.

    Returns
    -------
    numpy.ndarray
        (J,) ``(1 + #{statistic_perm >= statistic}) / (1 + n_perm)``; NaN for a constant
        column. The statistic is the correlation of ranks, an increasing function of the
        ``effect`` under permutation (for 0/1 activity the number of positives is fixed, so
        the rank-biserial correlation and the rank correlation order permutations alike).
    """
    n = len(e)
    au = np.asarray(au)
    ranks = standard_ranks(np.asarray(e, dtype=np.float64))
    z = standard_ranks(np.asarray(activity, dtype=np.float64)).astype(np.float32)
    observed = _column_mean(ranks * z[:, au])
    ranks32 = ranks.astype(np.float32)
    groups = [(u, np.flatnonzero(au == u)) for u in np.unique(au)]
    rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), 0x9E47])
    # The generator fills (p, n) draws row after row, so batches of any size give the same
    # permutations.
    batch = int(np.clip(memory // (20 * max(n, 1)), 1, 256))
    exceed = np.zeros(len(au), dtype=np.int64)
    done = 0
    while done < n_perm:
        p = min(batch, n_perm - done)
        order = np.argsort(rng.random((p, n)), axis=1)
        for u, columns in groups:
            null = z[order, u] @ ranks32[:, columns] / n  # (P, J_u): one BLAS product per AU
            # float32 sums: a tolerance so that permutations equal to the observed order count.
            exceed[columns] += (null >= observed[columns] - 1e-5).sum(axis=0)
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


class ResponseSource(Protocol):
    """Where the detector test reads responses: blocks of channels of one network's layer.

    :func:`detector_tables` never holds more than one block per task, so a source backed by
    a chunked store (:class:`interp_fer.decision.StoreSource`) bounds the memory of the test
    whatever the number of images.
    """

    def read(self, network: str, layer: str, kind: str, channels: slice) -> np.ndarray:
        """(N, k, A) ``kind`` (``"in"`` or ``"out"``) responses of channels ``channels``."""
        ...


class ArraySource:
    """A :class:`ResponseSource` over arrays in memory (network name -> layers)."""

    def __init__(self, networks: Mapping[str, Sequence[LayerResponses]]) -> None:
        self._layers = {(net, r.layer): r for net, layers in networks.items() for r in layers}

    def read(self, network: str, layer: str, kind: str, channels: slice) -> np.ndarray:
        responses = self._layers[network, layer]
        values = responses.x_in if kind == "in" else responses.x_out
        if values is None:
            raise ValueError(f"{network} layer {layer!r}: no x_out (a tested network needs it)")
        return values[:, channels]


#: ``run(task, calls, shared)`` -> ``[task(*call, **shared) for call in calls]``, in order:
#: how the tasks of :func:`detector_tables` are executed (here, or on Dask workers).
Runner = Callable[[Callable[..., Any], list[tuple[Any, ...]], dict[str, Any]], list[Any]]


def run_here(task: Callable[..., Any], calls: list[tuple[Any, ...]], shared: dict[str, Any]
             ) -> list[Any]:
    """The default :data:`Runner`: every task in this process, in order."""
    return [task(*call, **shared) for call in calls]


def detector_test(layers: list[LayerResponses], activity: np.ndarray, image_ids: np.ndarray,
                  aus: tuple[int, ...],
                  controls: Sequence[list[LayerResponses]] | None = None,
                  options: DetectorOptions | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Which channel detects which AU, for every layer of one network (arrays in memory).

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
    controls = list(controls or [])
    for responses in layers:
        if responses.x_out is None:
            raise ValueError(f"layer {responses.layer!r}: the tested network needs x_out")
    for copy in controls:
        for responses, c in zip(layers, copy, strict=True):
            if c.layer != responses.layer:
                raise ValueError(f"control layer {c.layer!r} does not match {responses.layer!r}")
    networks = {"model": layers, **{f"control{i + 1}": c for i, c in enumerate(controls)}}
    tables = detector_tables(ArraySource(networks),
                             [(r.layer, r.x_in.shape[1]) for r in layers], activity, image_ids,
                             aus, tested=["model"], bar=list(networks)[1:], options=options)
    return tables["model"]


def detector_tables(source: ResponseSource, layers: Sequence[tuple[str, int]],
                    activity: np.ndarray, image_ids: np.ndarray, aus: tuple[int, ...], *,
                    tested: Sequence[str], bar: Sequence[str],
                    options: DetectorOptions | None = None,
                    blocks: Callable[[int], list[slice]] | None = None,
                    test_blocks: Callable[[int], list[slice]] | None = None,
                    run: Runner = run_here, memory: int = 64 * 2**20
                    ) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """The detector test of several networks against one control bar, block by block.

    Every step works on one block of a layer's channels at a time (three passes over the
    responses: the halves' effects of every network, then the tested networks' candidate
    rows, then their permutation tests), so the memory of a task is that of one block; the
    tables do not depend on how the channels are cut into blocks nor on where the tasks run.

    Parameters
    ----------
    source
        The responses (:class:`ResponseSource`); networks are named ``"model"``,
        ``"control1"``, ...
    layers
        ``(name, channels)`` of each layer, in order (the order sets per-layer seeds).
    activity, image_ids, aus
        As in :func:`detector_test`.
    tested
        Networks whose channels are tested (each needs ``"out"`` responses).
    bar
        Networks that set the control bar (pooled); empty for no bar.
    options
        :class:`DetectorOptions`.
    blocks
        ``blocks(channels)`` -> slices of channels, one task each; default one block per layer.
    test_blocks
        The same for the permutation tests, which hold one response per channel and face
        (a task reads its channels by ``blocks``): wider blocks share the permutations'
        cost; default one block per layer.
    run
        How tasks are executed (:data:`Runner`); default here, in order.
    memory
        Bytes a task may use for a batch of permutations (:func:`permutation_p_values`).

    Returns
    -------
    dict
        Per tested network, ``(detectors, pairs)`` as :func:`detector_test` returns them.
    """
    options = options or DetectorOptions()
    activity = np.asarray(activity, dtype=np.float64)
    if not np.isfinite(activity).all():
        raise ValueError("activity must be finite for every image given to the detector test")
    blocks = blocks or _whole
    test_blocks = test_blocks or _whole
    select = selection_half(image_ids, options.seed)
    shared = {"source": source, "activity": activity, "select": select}
    a = len(aus)

    networks = list(dict.fromkeys([*tested, *bar]))
    calls = [(net, name, block) for net in networks for name, k in layers for block in blocks(k)]
    halves: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {}
    for (net, name, _), result in zip(calls, run(half_effects, calls, shared), strict=True):
        halves.setdefault((net, name), []).append(result)
    effect = {key: (np.concatenate([s for s, _ in parts]), np.concatenate([r for _, r in parts]))
              for key, parts in halves.items()}

    bars = {name: control_bars([effect[net, name] for net in bar], options.control_quantile, a)
            for name, _ in layers}
    out = {}
    for net in tested:
        choice = {name: candidates(effect[net, name][0], bars[name][0], bool(bar))
                  for name, _ in layers}
        m = sum(int(np.isfinite(effect[net, name][1][np.arange(len(c)), c]).sum())
                for name, c in choice.items())
        n_perm = options.permutations_for(m)
        calls = [(net, name, number, block, choice[name][block], effect[net, name][0][block],
                  effect[net, name][1][block], bars[name][1])
                 for number, (name, k) in enumerate(layers) for block in blocks(k)]
        parts = run(candidate_rows, calls, {**shared, "aus": tuple(aus), "options": options})
        table = pd.concat([rows for rows, _ in parts], ignore_index=True)
        calls = [(net, name, number, [_overlap(b, wide) for b in blocks(k)
                                      if _overlap(b, wide) is not None],
                  choice[name][wide], n_perm)
                 for number, (name, k) in enumerate(layers) for wide in test_blocks(k)]
        p_values = run(candidate_p_values, calls, {**shared, "options": options,
                                                   "memory": memory})
        table["p_value"] = np.concatenate(p_values)
        out[net] = _decided(table, pd.concat([pairs for _, pairs in parts], ignore_index=True),
                            options, n_perm, len(bar))
    return out


def _whole(channels: int) -> list[slice]:
    return [slice(0, channels)]


def _overlap(a: slice, b: slice) -> slice | None:
    start, stop = max(a.start, b.start), min(a.stop, b.stop)
    return slice(start, stop) if start < stop else None


def half_effects(network: str, layer: str, channels: slice, *, source: ResponseSource,
                 activity: np.ndarray, select: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``effect`` of a block of channels on the selection and on the report half.

    Returns
    -------
    tuple of numpy.ndarray
        (k, A) effects on the selection half, then on the report half.
    """
    x_in = _filled(source.read(network, layer, "in", channels))
    return (effects(x_in[select], activity[select]),
            effects(x_in[~select], activity[~select]))


def control_bars(halves: Sequence[tuple[np.ndarray, np.ndarray]], quantile: float, a: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per AU, the control bar on each half: a quantile of every control channel's effect.

    Parameters
    ----------
    halves
        Per control network, its (K, A) effects on the selection and on the report half.
    quantile
        :attr:`DetectorOptions.control_quantile`.
    a
        Number of AUs.

    Returns
    -------
    tuple of numpy.ndarray
        (A,) bars on the selection half and on the report half (NaN without controls, or
        where every control channel is constant).
    """
    if not halves:
        return np.full(a, np.nan), np.full(a, np.nan)
    out = []
    for side in (0, 1):
        values = np.concatenate([h[side] for h in halves], axis=0)  # (copies x K, A)
        bar = np.full(a, np.nan)
        for j in range(a):
            finite = values[:, j][np.isfinite(values[:, j])]
            if len(finite):
                bar[j] = np.quantile(finite, quantile)
        out.append(bar)
    return out[0], out[1]


def candidates(e_select: np.ndarray, bar_select: np.ndarray, with_controls: bool) -> np.ndarray:
    """(K,) each channel's candidate AU: the largest ``effect - control_bar`` (selection half).

    With controls, an AU without a bar (every control channel constant there) cannot be a
    candidate: it would compete with no bar at all.
    """
    bar = bar_select if with_controls else np.zeros(e_select.shape[1])
    excess = np.where(np.isfinite(e_select) & np.isfinite(bar), e_select - bar, -np.inf)
    return excess.argmax(axis=1)


def candidate_rows(network: str, layer: str, number: int, channels: slice,
                   candidate: np.ndarray, e_select: np.ndarray, e_report: np.ndarray,
                   bar_report: np.ndarray, *, source: ResponseSource,
                   activity: np.ndarray, select: np.ndarray, aus: tuple[int, ...],
                   options: DetectorOptions) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The report-half numbers of a block of channels and their candidate AUs.

    ``number`` is the layer's position (it seeds the bootstrap, so that layers get different
    draws and blocks of one layer the same ones).

    Returns
    -------
    rows, pairs
        The block's rows of :func:`detector_test`'s tables before the permutation test and
        the decision (no ``p_value`` nor ``q_value`` yet).
    """
    report = ~select
    x_in = _filled(source.read(network, layer, "in", channels))
    x_out = _filled(source.read(network, layer, "out", channels))
    a = len(aus)
    local = np.arange(x_in.shape[1])
    first = channels.start or 0
    out_report = effects(x_out[report], activity[report])
    partial = partial_association(x_in[report], x_out[report], activity[report])
    x_rep = x_in[report][:, local, candidate]
    y_rep = activity[report][:, candidate]
    low, high = _bootstrap_interval(x_rep, y_rep, options.n_boot, options.confidence,
                                    options.seed + number)
    rows = pd.DataFrame({
        "layer": layer, "channel": first + local,
        "candidate_au": np.asarray(aus)[candidate], "effect": e_report[local, candidate],
        "auc": (1 + rank_effect(x_rep, y_rep)) / 2, "auc_low": np.clip((1 + low) / 2, 0, 1),
        "auc_high": np.clip((1 + high) / 2, 0, 1),
        "out_effect": out_report[local, candidate], "partial": partial[local, candidate],
        "effect_select": e_select[local, candidate],
        "control_bar": bar_report[candidate],
        "n_select": int(select.sum()), "n_report": int(report.sum())})
    ch_grid, au_grid = np.meshgrid(first + local, np.arange(a), indexing="ij")
    pairs = pd.DataFrame({
        "layer": layer, "channel": ch_grid.ravel(), "au": np.asarray(aus)[au_grid.ravel()],
        "effect_select": e_select.ravel(), "effect": e_report.ravel(),
        "out_effect": out_report.ravel(), "partial": partial.ravel(),
        "control_bar": np.broadcast_to(bar_report, (len(local), a)).ravel()})
    return rows, pairs


def candidate_p_values(network: str, layer: str, number: int, reads: list[slice],
                       candidate: np.ndarray, n_perm: int, *, source: ResponseSource,
                       activity: np.ndarray, select: np.ndarray, options: DetectorOptions,
                       memory: int = 64 * 2**20) -> np.ndarray:
    """Permutation p-values of consecutive channels and their candidate AUs (report half).

    Parameters
    ----------
    reads
        Consecutive slices of channels, read one at a time (only each channel's candidate
        column is kept).
    candidate
        Their candidate AUs (positions in the activity columns).
    n_perm
        Permutations (:meth:`DetectorOptions.permutations_for` of the whole network).

    Returns
    -------
    numpy.ndarray
        One p-value per channel (NaN with fewer than 3 report faces).
    """
    report = ~select
    if report.sum() < 3:
        return np.full(len(candidate), np.nan)
    first, columns = reads[0].start, []
    for channels in reads:
        x_in = _filled(source.read(network, layer, "in", channels))[report]
        own = candidate[channels.start - first:channels.stop - first]
        columns.append(x_in[:, np.arange(x_in.shape[1]), own])
    return permutation_p_values(np.concatenate(columns, axis=1), candidate, activity[report],
                                n_perm, (options.seed, number), memory)


def _decided(table: pd.DataFrame, pairs: pd.DataFrame, options: DetectorOptions, n_perm: int,
             n_controls: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """BH over every tested pair of the network, then the decision per channel."""
    table["q_value"] = benjamini_hochberg(table["p_value"].to_numpy(dtype=float))
    with np.errstate(invalid="ignore"):
        table["beats_control"] = table["effect"] > table["control_bar"]
        if not n_controls:  # no control run: no bar to clear (the run says so)
            table["beats_control"] = True
        table["specific"] = table["effect"] > table["out_effect"]
    table["small_sample"] = table["n_report"] < options.min_report
    detected = (table["q_value"] <= options.alpha) & table["beats_control"] & \
        table["specific"] & ~table["small_sample"]
    table["au"] = pd.array(np.where(detected, table["candidate_au"], pd.NA), dtype="Int64")
    table.attrs.update(n_perm=n_perm, options=asdict(options), controls=n_controls)
    columns = ["layer", "channel", "au", "candidate_au", "effect", "auc", "auc_low", "auc_high",
               "out_effect", "partial", "effect_select", "p_value", "q_value", "control_bar",
               "beats_control", "specific", "n_select", "n_report", "small_sample"]
    return table[columns], pairs


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
