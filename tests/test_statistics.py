"""Distances, q-values and random placement against known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from interp_fer.statistics import (
    benjamini_hochberg,
    empirical_p_value,
    histogram_distance,
    normal_tail_p_value,
    placement_offsets,
    placement_offsets_many,
    random_offsets,
    signed_distance,
)


def test_shifted_normal_distances_are_known():
    # Two unit-variance normals one SD apart: W1 = 1, d = 1, KS = 2*Phi(0.5) - 1 = 0.383.
    rng = np.random.default_rng(0)
    inside = rng.normal(1.0, 1.0, (20000, 3))
    outside = rng.normal(0.0, 1.0, (20000, 3))
    np.testing.assert_allclose(signed_distance(inside, outside), 1.0, atol=0.03)
    np.testing.assert_allclose(signed_distance(inside, outside, "cohen_d"), 1.0, atol=0.03)
    np.testing.assert_allclose(signed_distance(inside, outside, "ks"),
                               2 * stats.norm.cdf(0.5) - 1, atol=0.02)
    np.testing.assert_allclose(signed_distance(outside, inside), -1.0, atol=0.03)


def test_exact_wasserstein_matches_scipy():
    rng = np.random.default_rng(1)
    inside, outside = rng.gamma(2.0, size=(50, 2)), rng.gamma(1.0, size=(80, 2))
    scale = np.sqrt((inside.var(0, ddof=1) + outside.var(0, ddof=1)) / 2)
    expected = [stats.wasserstein_distance(inside[:, j], outside[:, j]) / scale[j] for j in range(2)]
    np.testing.assert_allclose(signed_distance(inside, outside), expected, rtol=1e-12)
    equal = rng.gamma(1.0, size=(50, 2))
    scale = np.sqrt((inside.var(0, ddof=1) + equal.var(0, ddof=1)) / 2)
    expected = [stats.wasserstein_distance(inside[:, j], equal[:, j]) / scale[j] for j in range(2)]
    np.testing.assert_allclose(signed_distance(inside, equal), expected, rtol=1e-12)


def test_constant_channel_is_at_distance_zero():
    assert signed_distance(np.ones((5, 1)), np.ones((5, 1)))[0] == 0.0


def test_histogram_distance_agrees_with_exact_within_a_bin():
    rng = np.random.default_rng(2)
    inside, outside = rng.normal(2, 1, 5000), rng.normal(0, 1.5, 5000)
    edges = np.linspace(-8, 10, 181)
    hist_in, _ = np.histogram(inside, edges)
    hist_out, _ = np.histogram(outside, edges)
    moments = [(len(x), x.sum(), (x**2).sum()) for x in (inside, outside)]
    for method in ("wasserstein", "ks", "cohen_d"):
        approx = histogram_distance(hist_in, hist_out, edges, *moments, method=method)
        exact = signed_distance(inside[:, None], outside[:, None], method)[0]
        assert abs(approx - exact) < 0.1 / 1.25 + 1e-9, method  # bin width / pooled sd


def test_benjamini_hochberg_by_hand():
    p = np.array([0.01, 0.04, 0.03, 0.5, np.nan])
    # sorted p .01 .03 .04 .5; p*m/rank = .04 .06 .0533 .5; running min from the top
    np.testing.assert_allclose(benjamini_hochberg(p)[:4], [0.04, 0.0533333, 0.0533333, 0.5], atol=1e-6)
    assert np.isnan(benjamini_hochberg(p)[4])


def test_placements_keep_shape_and_stay_in_face():
    face = np.zeros((20, 20), bool)
    face[2:18, 4:16] = True
    region = np.zeros_like(face)
    region[5:8, 6:10] = True  # 3 x 4
    offsets = placement_offsets(region, face)
    assert len(offsets) == (16 - 3 + 1) * (12 - 4 + 1)
    rows, cols = np.nonzero(region)
    drawn = random_offsets(offsets, 25, np.random.default_rng(0))
    assert drawn.shape == (25, 2)
    for d_row, d_col in drawn:
        assert face[rows + d_row, cols + d_col].all()
    assert len(placement_offsets(np.ones_like(face), face)) == 0
    with pytest.raises(ValueError, match="does not fit"):
        random_offsets(placement_offsets(np.ones_like(face), face), 1, np.random.default_rng(0))


def test_p_values():
    null = np.random.default_rng(3).normal(size=(999, 2))
    observed = np.array([0.0, 3.0])
    p_emp = empirical_p_value(observed, null)
    p_norm = normal_tail_p_value(observed, null)
    assert 0.4 < p_emp[0] < 0.6 and p_emp[1] < 0.01
    np.testing.assert_allclose(p_norm, stats.norm.sf(observed), atol=0.03)


def test_normal_tail_p_value_is_calibrated_with_few_replicates():
    # Under the null, P(p <= level) must be about `level` even with 20 replicates, in the far
    # tail too (a plain normal tail fitted to 20 draws rejects 3.5x too often at 1e-3).
    rng = np.random.default_rng(0)
    trials = 200_000
    null = rng.normal(size=(20, trials))
    observed = rng.normal(size=trials)
    p = normal_tail_p_value(observed, null)
    for level in (0.05, 0.01, 1e-3):
        assert abs((p <= level).mean() / level - 1) < 0.25, level


def test_batched_offsets_match_a_direct_check():
    rng = np.random.default_rng(2)
    face = np.zeros((24, 20), bool)
    face[3:22, 2:18] = True
    face[3:6, 2:6] = False  # not convex: a notch
    regions = np.zeros((5, 24, 20), bool)
    regions[0, 10:13, 8:11] = True
    regions[1, 4:9, 4:6] = True
    regions[2] = rng.random((24, 20)) < 0.02
    regions[4, 0:20, 0:20] = True  # fits nowhere; region 3 is empty
    for region, offsets in zip(regions, placement_offsets_many(regions, face), strict=True):
        rows, cols = np.nonzero(region)
        want = [(dr, dc) for dr in range(-24, 24) for dc in range(-20, 20)
                if rows.size and (rows + dr >= 0).all() and (rows + dr < 24).all()
                and (cols + dc >= 0).all() and (cols + dc < 20).all()
                and face[rows + dr, cols + dc].all()]
        assert sorted(map(tuple, offsets.tolist())) == sorted(want)
