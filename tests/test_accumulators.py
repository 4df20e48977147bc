"""Accumulators: peaks by hand, histogram distances vs exact ones, bootstrap determinism."""

from __future__ import annotations

import numpy as np
import torch

from interp_fer.accumulators import PeakHistograms, channel_edges, poisson_weights, region_peaks
from interp_fer.cells import SparseMasks
from interp_fer.statistics import signed_distance


def test_region_peaks_by_hand():
    acts = torch.arange(16.0).reshape(1, 1, 4, 4)
    face = torch.zeros(1, 4, 4, dtype=torch.bool)
    face[0, 1:, :3] = True  # rows 1-3, cols 0-2
    regions = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    regions[0, 0, 1, 0] = True  # value 4
    regions[0, 1, 0, 3] = True  # value 3, outside the face but still the region's cell
    r_in, r_out = region_peaks(acts, SparseMasks.from_dense(regions.numpy()), face)
    assert r_in.tolist() == [[[4.0, 3.0]]]
    assert r_out.tolist() == [[[14.0, 14.0]]]  # best face cell outside each region: (3, 2)
    empty = torch.zeros_like(regions)
    assert torch.isnan(region_peaks(acts, SparseMasks.from_dense(empty.numpy()), face)[0]).all()


def test_histogram_accumulation_matches_exact_distance():
    rng = np.random.default_rng(0)
    n, k, a = 600, 3, 2
    r_in = rng.normal(1.0, 1.0, (n, k, a)) + np.array([0.0, 1.0])[None, None, :]
    r_out = rng.normal(0.0, 1.0, (n, k, a))
    edges = channel_edges(np.concatenate([r_in, r_out]).reshape(-1, k, a).max(axis=2), 256)
    hist = PeakHistograms(edges, n_aus=a, n_boot=0, n_null=0)
    for start in range(0, n, 128):  # batch boundaries must not matter
        hist.update(r_in[start:start + 128], r_out[start:start + 128], np.zeros((0, 0)))
    approx = hist.distances()[0]
    exact = signed_distance(r_in, r_out)
    np.testing.assert_allclose(approx, exact, atol=0.06)
    assert (approx[:, 1] > approx[:, 0]).all()


def test_bootstrap_weights_are_deterministic_per_image():
    whole = poisson_weights(7, np.arange(10), 5)
    parts = np.concatenate([poisson_weights(7, np.arange(4), 5),
                            poisson_weights(7, np.arange(4, 10), 5)])
    np.testing.assert_array_equal(whole, parts)
    assert not np.array_equal(whole, poisson_weights(8, np.arange(10), 5))
    assert abs(poisson_weights(0, np.arange(2000), 1).mean() - 1.0) < 0.1


def test_nan_images_are_left_out():
    edges = channel_edges(np.array([[0.0], [1.0]]), 8)
    hist = PeakHistograms(edges, n_aus=1, n_boot=0, n_null=0)
    hist.update(np.array([[[0.5]], [[np.nan]]]), np.array([[[0.2]], [[0.3]]]), np.zeros((2, 0)))
    assert hist.moments[0, 0, 0, 0, 0] == 1 and hist.moments[1, 0, 0, 0, 0] == 2


def test_pointing_by_hand():
    from interp_fer.accumulators import PointingAccumulator, distance_maps

    regions = np.zeros((1, 2, 20, 20), bool)
    regions[0, 0, 5:8, 5:8] = True
    regions[0, 1, 15:18, 15:18] = True
    faces = np.ones((1, 20, 20), bool)
    points = np.array([[[6.0, 6.0], [7.0, 10.0]]])  # channel 0 inside AU 0; channel 1 3 px right
    pointing = PointingAccumulator(n_channels=2, n_aus=2, tolerance=0.1)
    pointing.update(points, np.ones((1, 2), bool), distance_maps(regions), faces,
                    iod=np.array([20.0]))
    np.testing.assert_array_equal(pointing.hit_rate, [[1, 0], [0, 0]])
    np.testing.assert_allclose(pointing.mean_distance[1, 0], 3 / 20)
    # within 2 px (0.1 IOD) of a 3x3 square: the square (9), four 3x2 side strips (24) and,
    # at each corner, only the diagonal neighbour (sqrt 2; sqrt 5 and sqrt 8 are > 2): 37 px.
    np.testing.assert_allclose(pointing.chance_rate, [37 / 400, 37 / 400])


def test_dissection_iou_by_hand():
    from interp_fer.accumulators import DissectionIoU

    acts = torch.zeros(1, 1, 8, 8)
    acts[0, 0, 2:4, 2:4] = 5.0
    regions = np.zeros((1, 2, 8, 8), bool)
    regions[0, 0, 2:4, 2:6] = True  # contains the 2x2 hot square: IoU 4 / 8
    regions[0, 1, 6:8, 6:8] = True  # disjoint: IoU 0
    iou = DissectionIoU(np.array([1.0]), n_aus=2)
    iou.update(acts, regions)
    np.testing.assert_allclose(iou.iou, [[0.5, 0.0]])


def test_top_images_independent_of_batching():
    from interp_fer.accumulators import TopImages

    peaks = np.random.default_rng(0).normal(size=(50, 3))
    peaks[10, 0] = peaks[20, 0] = 9.0  # a tie: the earlier image wins
    whole = TopImages(3, k=4)
    whole.update(np.arange(50), peaks)
    parts = TopImages(3, k=4)
    for start in range(0, 50, 7):
        parts.update(np.arange(start, min(start + 7, 50)), peaks[start:start + 7])
    np.testing.assert_array_equal(whole.indices, parts.indices)
    assert list(whole.indices[0, :2]) == [10, 20]
    np.testing.assert_array_equal(whole.indices[1], np.argsort(-peaks[:, 1], kind="stable")[:4])


def test_region_peaks_match_the_dense_definition():
    # Random maps, regions of every size (empty, one cell, most of the face) and a face
    # smaller than the grid: the fast path and its dense fallback must both be exact.
    generator = torch.Generator().manual_seed(0)
    # Grids of 81 and 49 cells take the fine and the coarse path.
    for side, top in [(9, 1), (9, 4), (9, 81), (7, 32)]:
        acts = torch.randn(3, 5, side, side, generator=generator)
        face = torch.zeros(3, side, side, dtype=torch.bool)
        face[:, 1:side - 1, 1:side - 1] = True
        regions = torch.rand(3, 6, side, side, generator=generator) < torch.tensor(
            [0.0, 0.02, 0.1, 0.5, 0.9, 1.0])[None, :, None, None]
        r_in, r_out = region_peaks(acts, SparseMasks.from_dense(regions.numpy()), face, top=top)
        for i in range(3):
            for j in range(6):
                for c in range(5):
                    inside = acts[i, c][regions[i, j]]
                    outside = acts[i, c][face[i] & ~regions[i, j]]
                    want_in = inside.max() if len(inside) else torch.tensor(float("nan"))
                    want_out = outside.max() if len(outside) else torch.tensor(float("nan"))
                    torch.testing.assert_close(r_in[i, c, j], want_in, equal_nan=True)
                    torch.testing.assert_close(r_out[i, c, j], want_out, equal_nan=True)


def test_bilinear_matrix_matches_interpolate():
    from interp_fer.accumulators import bilinear_matrix

    generator = torch.Generator().manual_seed(0)
    for h, w, size in [(4, 4, (64, 64)), (15, 15, (64, 64)), (62, 62, (64, 64)), (3, 5, (7, 11))]:
        x = torch.randn(2, 3, h, w, generator=generator)
        want = torch.nn.functional.interpolate(x, size=size, mode="bilinear",
                                               align_corners=False)
        got = bilinear_matrix(size[0], h) @ x @ bilinear_matrix(size[1], w).T
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
