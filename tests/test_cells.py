"""Pixel masks to feature-map cells: centre rule, footprint fallback, zoo geometry."""

from __future__ import annotations

import numpy as np

from interp_fer.cells import CellGrid
from interp_fer.layers import AxisField, ReceptiveField


def _grid(stride: float, offset: float, size: int, image: int) -> CellGrid:
    axis = AxisField(size=2 * stride + 1, stride=stride, offset=offset)
    n = int(np.ceil((image - offset) / stride))
    return CellGrid.from_field(ReceptiveField(axis, axis), (n, n), (image, image))


def test_centre_rule_on_identity_grid():
    grid = _grid(1, 0, 3, 8)
    mask = np.zeros((8, 8), bool)
    mask[2:4, 5] = True
    np.testing.assert_array_equal(grid.cells_in(mask), mask)


def test_stride_4_centres():
    grid = _grid(4, 1.5, 9, 16)  # cells centred on 1.5, 5.5, 9.5, 13.5
    mask = np.zeros((16, 16), bool)
    mask[0:3, 0:3] = True  # contains pixel (2, 2) = floor(1.5 + 0.5)
    cells = grid.cells_in(mask)
    assert cells[0, 0] and cells.sum() == 1


def test_small_region_falls_back_to_overlapping_cells():
    grid = _grid(8, 3.5, 17, 32)  # centres 3.5, 11.5, 19.5, 27.5; footprints [0,8), [8,16) ...
    mask = np.zeros((32, 32), bool)
    mask[7:9, 15:17] = True  # no centre pixel inside, straddles four footprints
    cells = grid.cells_in(mask)
    expected = np.zeros((4, 4), bool)
    expected[0:2, 1:3] = True
    np.testing.assert_array_equal(cells, expected)


def test_batched_masks_and_empty_mask():
    grid = _grid(2, 0.5, 5, 8)
    masks = np.zeros((2, 3, 8, 8), bool)
    masks[0, 1, 4:6, 4:6] = True
    cells = grid.cells_in(masks)
    assert cells.shape == (2, 3, 4, 4)
    assert cells[0, 1].sum() == 1 and cells[0, 1, 2, 2]
    assert not cells[1].any()  # an empty region has no cells at all


def test_zoo_block4_covers_the_image(mini_xception):
    from interp_fer.layers import receptive_field

    field = receptive_field(mini_xception, "block4")
    grid = CellGrid.from_field(field, (4, 4), (64, 64))
    np.testing.assert_allclose(grid.centre_rows, [13, 29, 45, 61])
    # Footprints tile the image: every pixel has a nearest cell.
    covered = np.zeros((64, 64), bool)
    row_lo, row_hi, col_lo, col_hi = grid.footprint
    for i in range(4):
        for j in range(4):
            covered[row_lo[i]:row_hi[i], col_lo[j]:col_hi[j]] = True
    assert covered.all()


def test_sparse_cells_match_dense_rule():
    # Random blobs of every size on grids of several strides, including regions smaller
    # than a cell (footprint fallback) and empty ones.
    from interp_fer.cells import SparseMasks

    rng = np.random.default_rng(0)
    masks = np.zeros((40, 32, 32), bool)
    for i, mask in enumerate(masks[1:], start=1):
        r, c = rng.integers(0, 30, 2)
        size = 1 + i % 9
        mask[r:r + size, c:c + rng.integers(1, 10)] = True
    for stride, offset in [(1, 0), (2, 0.5), (4, 1.5), (8, 3.5)]:
        grid = _grid(stride, offset, 2 * stride + 1, 32)
        sparse = grid.cell_masks(SparseMasks.from_dense(masks))
        np.testing.assert_array_equal(sparse.dense(), grid.cells_in(masks))
