"""The detector test on synthetic responses with known answers (interp_fer.detectors)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from interp_fer.detectors import (
    DetectorOptions,
    LayerResponses,
    detector_test,
    effects,
    partial_association,
    permutation_p_values,
    rank_effect,
    selection_half,
)


def _explicit_partial(x_in, x_out, activity, a):
    """Residual regression on ranks, written out: the definition the fast formula implements."""
    n = len(x_in)
    rx, ro = stats.rankdata(x_in), stats.rankdata(x_out)
    z = stats.rankdata(activity, axis=0)
    e = (rx - rx.mean()) / rx.std() - (ro - ro.mean()) / ro.std()  # in-minus-out contrast
    others = np.column_stack([np.ones(n), np.delete(z, a, axis=1)])
    r1 = e - others @ np.linalg.lstsq(others, e, rcond=None)[0]
    r2 = z[:, a] - others @ np.linalg.lstsq(others, z[:, a], rcond=None)[0]
    return np.corrcoef(r1, r2)[0, 1]


def test_partial_association_equals_residual_regression():
    rng = np.random.default_rng(0)
    n, k, a = 300, 3, 4
    activity = rng.normal(size=(n, a))
    activity[:, 1] += activity[:, 0]
    x_in, x_out = rng.normal(size=(n, k, a)), rng.normal(size=(n, k, a))
    x_in[:, 0, 0] += activity[:, 0]
    got = partial_association(x_in, x_out, activity)
    for kk in range(k):
        for aa in range(a):
            want = _explicit_partial(x_in[:, kk, aa], x_out[:, kk, aa], activity, aa)
            assert abs(got[kk, aa] - want) < 1e-6


def test_co_occurring_au_is_not_credited():
    # AU0 and AU1 co-occur (r ~ 0.9); the channel follows AU0 only. Its marginal association
    # with AU1 is strong, its partial association given AU0 is not.
    rng = np.random.default_rng(1)
    n = 2000
    a0 = rng.normal(size=n)
    activity = np.column_stack([a0, a0 + 0.45 * rng.normal(size=n), rng.normal(size=n)])
    x_in = rng.normal(size=(n, 1, 3))
    x_in[:, 0, :] += 0.8 * a0[:, None]  # the same response at every region
    x_out = rng.normal(size=(n, 1, 3))
    partial = partial_association(x_in, x_out, activity)[0]
    assert rank_effect(x_in[:, 0, 1:2], activity[:, 1:2])[0] > 0.4
    assert partial[0] > 0.15 and abs(partial[1]) < 0.06 and abs(partial[2]) < 0.08


def test_global_response_is_not_specific():
    # The channel brightens everywhere with AU0, more so outside the region: it is not a
    # detector of AU0's region.
    rng = np.random.default_rng(2)
    n = 1200
    activity = rng.normal(size=(n, 2))
    common = activity[:, :1, None]
    x_in = common + 0.6 * rng.normal(size=(n, 1, 2))
    x_out = common + 0.3 * rng.normal(size=(n, 1, 2))
    table, _ = detector_test([LayerResponses("l", x_in, x_out)], activity, np.arange(n), (1, 2),
                             options=DetectorOptions(n_boot=0, n_perm=200))
    assert table["q_value"].iloc[0] < 0.01 and not table["specific"].iloc[0]
    assert table["au"].isna().all()


def test_null_p_values_are_calibrated():
    # No association at all: over 60 simulated layers the one-sided permutation p-values of
    # the selected pairs (chosen on the other half) are uniform (Kolmogorov-Smirnov, and the
    # share below 0.05).
    rng = np.random.default_rng(3)
    activity = rng.normal(size=(240, 4))
    activity[:, 1] += activity[:, 0]
    p = []
    for seed in range(60):
        r = np.random.default_rng(100 + seed)
        x_in, x_out = r.normal(size=(240, 4, 4)), r.normal(size=(240, 4, 4))
        table, _ = detector_test([LayerResponses("l", x_in, x_out)], activity, np.arange(240),
                                 (1, 2, 4, 5), options=DetectorOptions(n_boot=0, n_perm=400,
                                                                       seed=seed))
        p.extend(table["p_value"])
    p = np.asarray(p)
    assert stats.kstest(p, "uniform").pvalue > 0.01
    assert abs((p <= 0.05).mean() - 0.05) < 0.035


def test_permutation_p_value_floor_and_strong_effect():
    rng = np.random.default_rng(4)
    n = 400
    activity = rng.normal(size=(n, 3))
    e = np.column_stack([activity[:, 0] + 0.2 * rng.normal(size=n), rng.normal(size=n)])
    p = permutation_p_values(e, np.array([0, 1]), activity, 99, seed=0)
    assert p[0] == pytest.approx(1 / 100)
    assert p[1] > 0.02
    # The same statistic for 0/1 activity: its order is the AUC's.
    binary = (activity > 0).astype(float)
    p = permutation_p_values(e, np.array([0, 1]), binary, 99, seed=0)
    assert p[0] == pytest.approx(1 / 100)


def test_planted_detectors_found_and_null_channels_not():
    rng = np.random.default_rng(5)
    n, k, a = 800, 6, 5
    activity = rng.normal(size=(n, a))
    x_in, x_out = rng.normal(size=(n, k, a)), rng.normal(size=(n, k, a))
    for channel, au in [(0, 0), (1, 3), (2, 4)]:
        x_in[:, channel, au] += 0.7 * activity[:, au]
    table, pairs = detector_test([LayerResponses("l", x_in, x_out)], activity, np.arange(n),
                                 (1, 2, 4, 12, 25), options=DetectorOptions(n_boot=50))
    assert list(table["au"].iloc[:3]) == [1, 12, 25]
    assert table["au"].iloc[3:].isna().all()
    assert (table["auc_low"].iloc[:3] > 0.6).all()
    assert len(pairs) == k * a
    np.testing.assert_allclose(table["effect"], pairs.set_index(["channel", "au"]).loc[
        list(zip(table["channel"], table["candidate_au"], strict=True)), "effect"])


def test_control_bar_blocks_what_random_channels_also_show():
    # Every channel of the "controls" follows AU0 as strongly as the network's channels: it
    # is then no evidence that training made them detectors.
    rng = np.random.default_rng(6)
    n, k, a = 800, 4, 3
    activity = rng.normal(size=(n, a))

    def responses(strength, au=0):
        x_in, x_out = rng.normal(size=(n, k, a)), rng.normal(size=(n, k, a))
        x_in[:, :, au] += strength * activity[:, au:au + 1]
        return LayerResponses("l", x_in, x_out)

    network = responses(0.6)
    alone, _ = detector_test([network], activity, np.arange(n), (1, 2, 4),
                             options=DetectorOptions(n_boot=0))
    controlled, _ = detector_test([network], activity, np.arange(n), (1, 2, 4),
                                  controls=[[responses(0.8)], [responses(0.7)]],
                                  options=DetectorOptions(n_boot=0))
    assert (alone["au"] == 1).sum() >= 3
    assert controlled["au"].isna().all()
    followed = controlled[controlled["candidate_au"] == 1]
    assert not followed["beats_control"].any()


def test_candidate_is_the_au_followed_beyond_what_random_filters_follow():
    # Every random filter follows AU0 (an "easy" AU, like an open mouth) at 0.6; the channel
    # follows AU0 at 0.7 and AU1 at 0.5, where random filters follow nothing. Its AU is AU1.
    rng = np.random.default_rng(8)
    n, a = 1600, 3
    activity = rng.normal(size=(n, a))

    def layer(strengths, k):
        x_in, x_out = rng.normal(size=(n, k, a)), rng.normal(size=(n, k, a))
        for au, strength in strengths.items():
            x_in[:, :, au] += strength * activity[:, au:au + 1]
        return [LayerResponses("l", x_in, x_out)]

    table, _ = detector_test(layer({0: 0.7, 1: 0.5}, 1), activity, np.arange(n), (25, 12, 4),
                             controls=[layer({0: 0.6}, 8), layer({0: 0.6}, 8)],
                             options=DetectorOptions(n_boot=0))
    assert table["candidate_au"].iloc[0] == 12 and table["au"].iloc[0] == 12


def test_halves_do_not_depend_on_order_or_company():
    ids = np.arange(5000)
    half = selection_half(ids, seed=3)
    assert 0.45 < half.mean() < 0.55
    order = np.random.default_rng(0).permutation(ids)
    assert np.array_equal(selection_half(order, 3), half[order])
    assert np.array_equal(selection_half(ids[100:200], 3), half[100:200])
    assert not np.array_equal(selection_half(ids, 4), half)


def test_effects_match_scipy():
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(300, 2, 2)), rng.normal(size=(300, 2))
    y[:, 1] = y[:, 1] > 0
    got = effects(x, y)
    # Spearman's rho for every kind of activity, 0/1 columns included (one scale for all AUs).
    assert got[1, 0] == pytest.approx(stats.spearmanr(x[:, 1, 0], y[:, 0]).statistic, abs=1e-12)
    assert got[0, 1] == pytest.approx(stats.spearmanr(x[:, 0, 1], y[:, 1]).statistic, abs=1e-12)


def test_small_samples_and_missing_bars_detect_nothing():
    rng = np.random.default_rng(10)
    n, a = 40, 2
    activity = rng.normal(size=(n, a))
    x_in, x_out = rng.normal(size=(n, 1, a)), rng.normal(size=(n, 1, a))
    x_in[:, 0, 0] += 3 * activity[:, 0]
    network = [LayerResponses("l", x_in, x_out)]
    table, _ = detector_test(network, activity, np.arange(n), (1, 2),
                             options=DetectorOptions(n_boot=0, n_perm=500, min_report=30))
    assert table["small_sample"].all() and table["q_value"].iloc[0] < 0.01
    assert table["au"].isna().all()  # strong, significant, but too few faces to be evidence
    # Controls whose channels are constant at AU1: no bar there, so AU1 cannot be chosen.
    constant = [LayerResponses("l", np.zeros((n, 3, a)))]
    table, _ = detector_test(network, activity, np.arange(n), (1, 2), controls=[constant],
                             options=DetectorOptions(n_boot=0, n_perm=200, min_report=5))
    assert table["au"].isna().all() and not table["beats_control"].any()


def test_effect_is_rank_biserial_for_binary_activity():
    rng = np.random.default_rng(7)
    y = (rng.random(500) < 0.3).astype(float)
    x = y + rng.normal(size=500)
    effect = rank_effect(x[:, None], y[:, None])[0]
    auc = stats.mannwhitneyu(x[y == 1], x[y == 0]).statistic / ((y == 1).sum() * (y == 0).sum())
    assert (1 + effect) / 2 == pytest.approx(auc, abs=1e-12)


def test_options_are_validated():
    with pytest.raises(ValueError, match="alpha"):
        DetectorOptions(alpha=2)
    with pytest.raises(ValueError, match="n_perm"):
        DetectorOptions(n_perm=0)
    assert DetectorOptions(alpha=0.05).permutations_for(500) == 20000
    with pytest.raises(ValueError, match="finite"):
        detector_test([LayerResponses("l", np.zeros((4, 1, 1)), np.zeros((4, 1, 1)))],
                      np.full((4, 1), np.nan), np.arange(4), (1,))
