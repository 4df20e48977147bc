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
from functools import cached_property

import numpy as np

from .layers import ReceptiveField


@dataclass(frozen=True)
class SparseMasks:
    """Many boolean masks on one grid, stored as (mask, position) pairs.

    The mapping's null replicates are thousands of small regions per batch; as pairs they
    cost memory in proportion to their total area, not to their number times the grid.

    Attributes
    ----------
    n_masks
        Number of masks (some may be empty).
    shape
        (H, W) of the grid.
    mask
        (P,) int64 mask index of every member (in no particular order).
    position
        (P,) int64 flat position ``row * W + col`` of every member, unique within a mask.
    """

    n_masks: int
    shape: tuple[int, int]
    mask: np.ndarray
    position: np.ndarray

    @classmethod
    def from_dense(cls, masks: np.ndarray) -> SparseMasks:
        """From (..., H, W) boolean masks (leading axes flattened in C order)."""
        masks = np.asarray(masks, dtype=bool)
        shape = masks.shape[-2:]
        flat = masks.reshape(-1, shape[0] * shape[1])
        mask, position = np.nonzero(flat)
        return cls(len(flat), tuple(shape), mask.astype(np.int64), position.astype(np.int64))

    def dense(self) -> np.ndarray:
        """(n_masks, H, W) boolean."""
        out = np.zeros((self.n_masks, self.shape[0] * self.shape[1]), dtype=bool)
        out[self.mask, self.position] = True
        return out.reshape(self.n_masks, *self.shape)


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

    @cached_property
    def _pixel_cells(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per input pixel: the cell centred on it (or -1) and the cell whose footprint holds it.

        None when the footprints do not tile the image or two cells share a centre pixel (the
        dense :meth:`cells_in` then handles the grid).
        """
        height, width = self.image_shape
        h, w = self.shape
        rows, cols, inside = self.centre_pixels()
        centre_of = np.full(height * width, -1, dtype=np.int64)
        cell = np.arange(h * w).reshape(h, w)
        flat = (rows[:, None] * width + cols[None, :])[inside]
        if len(np.unique(flat)) != len(flat):
            return None
        centre_of[flat] = cell[inside]
        row_lo, row_hi, col_lo, col_hi = self.footprint

        def owner(lo: np.ndarray, hi: np.ndarray, limit: int) -> np.ndarray | None:
            count = np.zeros(limit, dtype=np.int64)
            index = np.zeros(limit, dtype=np.int64)
            for i, (a, b) in enumerate(zip(lo, hi, strict=True)):
                count[a:b] += 1
                index[a:b] = i
            return index if (count == 1).all() else None

        row_owner = owner(row_lo, row_hi, height)
        col_owner = owner(col_lo, col_hi, width)
        if row_owner is None or col_owner is None:
            return None
        footprint_of = (row_owner[:, None] * w + col_owner[None, :]).ravel()
        return centre_of, footprint_of

    def cell_masks(self, pixels: SparseMasks) -> SparseMasks:
        """:meth:`cells_in` for sparse masks: the same rule, cost in proportion to their area.

        Parameters
        ----------
        pixels
            Masks on the input grid (``shape == image_shape``).

        Returns
        -------
        SparseMasks
            The cells of each mask on the (h, w) grid, in the same mask order.
        """
        if tuple(pixels.shape) != tuple(self.image_shape):
            raise ValueError(f"masks on a {pixels.shape} grid, cells expect {self.image_shape}")
        lookup = self._pixel_cells
        if lookup is None:
            return SparseMasks.from_dense(self.cells_in(pixels.dense()))
        centre_of, footprint_of = lookup
        centre = centre_of[pixels.position]
        hit = centre >= 0
        mask, cell = pixels.mask[hit], centre[hit]
        has_centre = np.bincount(mask, minlength=pixels.n_masks) > 0
        # A mask without any cell centre takes every cell its pixels' footprints belong to.
        fallback = ~has_centre[pixels.mask]
        size = self.shape[0] * self.shape[1]
        keys = np.unique(pixels.mask[fallback] * size + footprint_of[pixels.position[fallback]])
        return SparseMasks(pixels.n_masks, tuple(self.shape), np.concatenate([mask, keys // size]),
                           np.concatenate([cell, keys % size]))

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
