"""From pixel-space masks to a layer's feature-map cells.

A cell (unit position) of a layer is *in* a pixel-space region when the centre of its
receptive field falls inside the region. At coarse layers a region can be smaller than the
spacing of the cells and contain no centre at all; then the cells whose footprint (the
stride x stride square around the centre, i.e. the part of the image the cell is the
nearest unit for) overlaps the region count instead (DESIGN.md, "Distance function").

Coordinates: masks are (row, col) arrays on the network input's pixel grid, pixel ``i``
covering ``[i - 0.5, i + 0.5)``; receptive-field centres use the same convention
(:class:`interp_fer.layers.ReceptiveField`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layers import ReceptiveField


@dataclass(frozen=True)
class CellGrid:
    """Geometry of a layer's cells on the input pixel grid.

    Attributes
    ----------
    shape
        (h, w) of the feature map.
    image_shape
        (H, W) of the network input.
    centre_rows, centre_cols
        (h,) and (w,) receptive-field centres in input pixels.
    footprint
        (row_lo, row_hi, col_lo, col_hi) integer pixel bounds (half-open) of each cell's
        footprint, each (h,) or (w,): the pixels it is the nearest unit for, so the
        footprints tile the image.
    """

    shape: tuple[int, int]
    image_shape: tuple[int, int]
    centre_rows: np.ndarray
    centre_cols: np.ndarray
    footprint: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

    @classmethod
    def from_field(cls, field: ReceptiveField, shape: tuple[int, int],
                   image_shape: tuple[int, int]) -> CellGrid:
        """Cell geometry of a (h, w) feature map whose units have receptive field ``field``."""
        rows, cols = field.centre(np.arange(shape[0]), np.arange(shape[1]))

        def bounds(centres: np.ndarray, stride: float, limit: int) -> tuple[np.ndarray, np.ndarray]:
            lo = np.ceil(centres - stride / 2.0).astype(np.int64)
            hi = np.ceil(centres + stride / 2.0).astype(np.int64)
            # The border cells are the nearest units for the image's edges too.
            lo[0], hi[-1] = 0, limit
            return np.clip(lo, 0, limit), np.clip(np.maximum(hi, lo + 1), 0, limit)

        row_lo, row_hi = bounds(rows, field.rows.stride, image_shape[0])
        col_lo, col_hi = bounds(cols, field.cols.stride, image_shape[1])
        return cls(tuple(shape), tuple(image_shape), rows, cols, (row_lo, row_hi, col_lo, col_hi))

    def centre_pixels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Integer (row, col) pixel of every cell's centre, and whether it is on the image."""
        rows = np.floor(self.centre_rows + 0.5).astype(np.int64)
        cols = np.floor(self.centre_cols + 0.5).astype(np.int64)
        inside = ((rows >= 0) & (rows < self.image_shape[0]))[:, None] & \
                 ((cols >= 0) & (cols < self.image_shape[1]))[None, :]
        return rows, cols, inside

    def cells_in(self, masks: np.ndarray) -> np.ndarray:
        """Cells belonging to each pixel-space mask (centre rule, footprint fallback).

        Parameters
        ----------
        masks
            (..., H, W) boolean masks on the input grid.

        Returns
        -------
        numpy.ndarray
            (..., h, w) boolean.
        """
        masks = np.asarray(masks, dtype=bool)
        rows, cols, inside = self.centre_pixels()
        safe_rows = np.clip(rows, 0, self.image_shape[0] - 1)
        safe_cols = np.clip(cols, 0, self.image_shape[1] - 1)
        by_centre = masks[..., safe_rows[:, None], safe_cols[None, :]] & inside
        empty = ~by_centre.any(axis=(-2, -1))
        if empty.any():
            by_centre[empty] = self.overlapping(masks[empty])
        return by_centre

    def overlapping(self, masks: np.ndarray) -> np.ndarray:
        """Cells whose footprint contains at least one pixel of each mask, (..., h, w)."""
        masks = np.asarray(masks, dtype=bool)
        integral = np.zeros((*masks.shape[:-2], masks.shape[-2] + 1, masks.shape[-1] + 1),
                            dtype=np.int32)
        integral[..., 1:, 1:] = masks.cumsum(axis=-2, dtype=np.int32).cumsum(axis=-1, dtype=np.int32)
        row_lo, row_hi, col_lo, col_hi = self.footprint
        r0, r1 = row_lo[:, None], row_hi[:, None]
        c0, c1 = col_lo[None, :], col_hi[None, :]
        total = (integral[..., r1, c1] - integral[..., r0, c1]
                 - integral[..., r1, c0] + integral[..., r0, c0])
        return total > 0
