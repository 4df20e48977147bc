"""A planted layer is mapped right; a layer without spatial preference is not mapped."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interp_fer.cells import CellGrid
from interp_fer.layer_mapping import FaceGeometry, LayerMapping, MappingOptions
from interp_fer.layers import AxisField, ReceptiveField
from interp_fer.statistics import benjamini_hochberg

SIZE = 32
CORNERS = [(6, 6), (6, 20), (20, 13)]  # top-left of three 5x5 "AU" squares


def _batch(rng, n, planted):
    """Synthetic faces whose regions jitter by up to 2 px, and matching feature maps."""
    regions = np.zeros((n, 3, SIZE, SIZE), bool)
    face = np.zeros((n, SIZE, SIZE), bool)
    face[:, 2:30, 2:30] = True
    acts = rng.gamma(2.0, 0.5, (n, 4, SIZE, SIZE)).astype(np.float32)
    for i in range(n):
        dr, dc = rng.integers(-2, 3, 2)
        for j, (r, c) in enumerate(CORNERS):
            regions[i, j, r + dr:r + dr + 5, c + dc:c + dc + 5] = True
            if planted:
                acts[i, j][regions[i, j]] += 5.0  # channel j detects AU j
    points = np.zeros((n, 4, 2))
    for i in range(n):
        for k in range(4):
            points[i, k] = np.unravel_index(acts[i, k].argmax(), (SIZE, SIZE))
    geometry = FaceGeometry(regions, face, np.full(n, 16.0))
    return torch.from_numpy(acts), geometry, points


def _run(planted, seed=0, n_batches=4, n=40):
    rng = np.random.default_rng(seed)
    axis = AxisField(1, 1, 0)
    grid = CellGrid.from_field(ReceptiveField(axis, axis), (SIZE, SIZE), (SIZE, SIZE))
    options = MappingOptions(n_boot=20, n_null=8, seed=seed)
    mapping = None
    for b in range(n_batches):
        acts, geometry, points = _batch(rng, n, planted)
        if mapping is None:
            mapping = LayerMapping.calibrate("synthetic", grid, (1, 2, 4), acts, options)
        mapping.update(np.arange(b * n, (b + 1) * n), acts, geometry, points,
                       np.ones((n, 4), bool))
    return mapping.scores()


def test_planted_channels_are_mapped_to_their_regions():
    scores = _run(planted=True)
    scores["q_value"] = benjamini_hochberg(scores["p_value"].to_numpy())
    for channel, au in enumerate((1, 2, 4)):
        rows = scores[scores.channel == channel].set_index("au")
        assert rows["distance"].idxmax() == au
        # Empirical p-value (no fitted tail): at its floor 1 / (1 + n_null), every placement
        # of the region elsewhere on the face gives a smaller D.
        assert rows.loc[au, "p_value"] == pytest.approx(1 / 9)
        assert rows.loc[au, "ci_low"] > 0
        assert rows.loc[au, "stability"] >= 0.9
        assert rows.loc[au, "hit_rate"] > 0.9 > rows.loc[au, "chance_rate"]
        assert rows.loc[au, "iou"] > 0.3
    noise = scores[scores.channel == 3]
    assert (noise["hit_rate"] < 0.5).all()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_spatial_preference_gives_no_mapping(seed):
    scores = _run(planted=False, seed=seed)
    q = benjamini_hochberg(scores["p_value"].to_numpy())
    # FDR 5 %: with no true effect, any discovery is false; allow at most one per run.
    assert (q < 0.05).sum() <= 1
