"""Window algebra of the windowed projection engine: gradients that cover part of a map.

A gradient flowing back through the graph is a :class:`Win`: ``data`` (B, C, sh, sw) for B
seeds (any images), and per seed the (row, col) of ``data[..., 0, 0]`` in the grid of the
map it belongs to. Offsets are *virtual*: a window may stick out of its map; positions out
there hold 0, or values to be zeroed (:attr:`Win.dirty`, :func:`clean`). An axis that
covers the whole map is *full* (offset 0 for every seed, size = the map's). Per-image forward
tensors (pool switches, guided-backprop masks) are read at each seed's image and window with
:func:`gather_window`.

The functions here move, crop, pad and add windows; the handlers
(:mod:`interp_fer.projections.handlers`) build on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Win:
    """A gradient covering a window of a map, for a batch of seeds (see the module docstring).

    ``data``: (B, C, sh, sw); ``off``: (B, 2) int64 (row, col) of ``data[b, :, 0, 0]`` in the
    map's grid, virtual (may lie outside it); ``full``: per axis, the window is the whole map.
    """

    data: torch.Tensor
    off: np.ndarray  # (B, 2) int64
    full: tuple[bool, bool]
    hot: torch.Tensor | None = None  # (B,) channel: data is 1x1, zero but for that channel
    # Map size (h, w) outside which data may hold values that belong to no position: masking
    # is deferred to the steps that would spread them (convolution, pooling), since padding
    # and element-wise steps leave them in place or drop them.
    dirty: tuple[int, int] | None = None
    # data is also held by another pending gradient (both branches of an addition): it must
    # not be modified in place.
    shared: bool = False


def clean(win: Win) -> Win:
    """Zero the window positions outside the map (see :attr:`Win.dirty`)."""
    if win.dirty is None:
        return win
    inside = inside_mask(win, win.dirty)
    if inside is None:
        return replace(win, dirty=None)
    if win.shared:
        return replace(win, data=win.data * inside, dirty=None, shared=False)
    return replace(win, data=win.data.mul_(inside), dirty=None)


def fit(data: torch.Tensor, off: np.ndarray, full: tuple[bool, bool],
        extent: Sequence[int]) -> Win:
    """Bring data with virtual offsets into a node's map of size ``extent``.

    Axes that cover the map become full maps; others stay windows, marked dirty when some
    of their positions fall outside the map (see :func:`clean`).
    """
    off = off.copy()
    flags = list(full)
    dirty = False
    for axis in range(2):
        size = data.shape[2 + axis]
        column = off[:, axis]
        uniform = column.min() == column.max()
        if flags[axis] or size >= extent[axis]:
            if uniform:
                data = slice_axis(data, axis, -int(column[0]), extent[axis])
            else:
                data = shift_axis(data, axis, -column, extent[axis])
            off[:, axis] = 0
            flags[axis] = True
        elif (column < 0).any() or (column + size > extent[axis]).any():
            dirty = True
    return Win(data, off, (flags[0], flags[1]), dirty=(extent[0], extent[1]) if dirty else None)


def slice_axis(data: torch.Tensor, axis: int, start: int, size: int) -> torch.Tensor:
    """data[..., start:start + size] along ``axis`` (2 or 3 = axis + 2), zero-padded."""
    dim = 2 + axis
    length = data.shape[dim]
    before, after = max(0, -start), max(0, start + size - length)
    if before or after:
        pad = [0, 0, 0, 0]
        pad[2 * (1 - axis)], pad[2 * (1 - axis) + 1] = before, after
        data = F.pad(data, pad)
        start += before
    return data.narrow(dim, start, size)


def shift_axis(data: torch.Tensor, axis: int, delta: np.ndarray, size: int) -> torch.Tensor:
    """result[b, ..., t] = data[b, ..., t + delta[b]] (zero outside), per-seed shifts."""
    if delta.min() == delta.max():
        return slice_axis(data, axis, int(delta[0]), size)
    dim = 2 + axis
    length = data.shape[dim]
    source = np.arange(size)[None, :] + delta[:, None]
    source = torch.from_numpy(np.where((source >= 0) & (source < length), source, length))
    pad = [0, 0, 0, 0]
    pad[2 * (1 - axis) + 1] = 1  # a zero slot at index `length` for positions outside
    padded = F.pad(data, pad)
    seeds = torch.arange(len(delta), device=data.device)[:, None]
    # Advanced indexing on (seed, position) pairs: cheaper than gather's per-element index.
    moved = padded.movedim(dim, 1)[seeds, source.to(data.device)]
    return moved.movedim(1, dim)


def gather_window(source: torch.Tensor, img: torch.Tensor, win: Win) -> torch.Tensor:
    """Per-image tensor (N, h, w, C) read at each seed's window: (B, sh, sw, C)."""
    b, _, sh, sw = win.data.shape
    if all(win.full):
        return source.index_select(0, img)
    h, w = source.shape[1:3]
    rows = torch.from_numpy(np.clip(win.off[:, :1] + np.arange(sh), 0, h - 1)).to(img.device)
    cols = torch.from_numpy(np.clip(win.off[:, 1:] + np.arange(sw), 0, w - 1)).to(img.device)
    return source[img[:, None, None], rows[:, :, None], cols[:, None, :]]


def inside_mask(win: Win, extent: Sequence[int]) -> torch.Tensor | None:
    """(B, 1, sh, sw) 0/1 of the data's dtype: window positions inside a map of size ``extent``.

    None when every position is inside. Built in NumPy (a handful of small arrays) and sent to
    the device once; a float mask multiplies faster than a bool one.
    """
    within = None
    for axis in range(2):
        column, size = win.off[:, axis], win.data.shape[2 + axis]
        if win.full[axis] or ((column >= 0).all() and (column + size <= extent[axis]).all()):
            continue
        position = column[:, None] + np.arange(size)
        mask = (position >= 0) & (position < extent[axis])
        mask = mask[:, :, None] if axis == 0 else mask[:, None, :]
        within = mask if within is None else within & mask
    if within is None:
        return None
    within = np.broadcast_to(within, (len(win.off), *win.data.shape[2:]))[:, None]
    return torch.from_numpy(within.copy()).to(win.data.device, win.data.dtype)


def fold_axis(win: Win, axis: int, before: int, after: int, extent: int,
              reflect: bool) -> Win:
    """Backward of reflection/replication padding along one axis: fold the border back.

    Positions in the padding add their gradient to the input position they copy
    (reflection: -x and 2(E-1)-x; replication: 0 and E-1); the others keep theirs.
    """
    dim = 2 + axis
    size = win.data.shape[dim]
    column = win.off[:, axis] - before  # input coordinate of window position 0, per seed
    if win.full[axis]:
        return _fold_whole(win, axis, before, after, extent, reflect)
    outside = [*range(-before, 0), *range(extent, extent + after)]
    sources, targets = [], []
    for x in outside:
        target = (-x if x < 0 else 2 * (extent - 1) - x) if reflect else min(max(x, 0), extent - 1)
        source_index, target_index = x - column, target - column
        present = (source_index >= 0) & (source_index < size)
        if not present.any():
            continue
        if ((target_index < 0) | (target_index >= size))[present].any() or size >= extent:
            whole = shift_axis(win.data, axis, -win.off[:, axis], before + extent + after)
            off = win.off.copy()
            off[:, axis] = 0
            full = list(win.full)
            full[axis] = True
            return _fold_whole(Win(whole, off, (full[0], full[1])), axis, before, after,
                               extent, reflect)
        sources.append((np.clip(source_index, 0, size - 1), present))
        targets.append(np.clip(target_index, 0, size - 1))
    position = torch.from_numpy(column[:, None] + np.arange(size)).to(win.data.device)
    shape = [len(column), 1, 1, 1]
    shape[dim] = size
    inside = ((position >= 0) & (position < extent)).view(shape)
    out = win.data * inside
    for (source_index, present), target_index in zip(sources, targets, strict=True):
        slab_shape = list(win.data.shape)
        slab_shape[dim] = 1
        index_shape = [len(column), 1, 1, 1]
        pick = torch.from_numpy(source_index).to(out.device).view(index_shape).expand(slab_shape)
        slab = win.data.gather(dim, pick) * torch.from_numpy(present).to(out.device).view(
            index_shape)
        put = torch.from_numpy(target_index).to(out.device).view(index_shape).expand(slab_shape)
        out.scatter_add_(dim, put, slab)  # `out` is a fresh tensor
    off = win.off.copy()
    off[:, axis] = column
    return Win(out, off, win.full)


def _fold_whole(win: Win, axis: int, before: int, after: int, extent: int,
                reflect: bool) -> Win:
    """:func:`fold_axis` for a whole padded axis (size before + extent + after)."""
    dim = 2 + axis
    data = win.data
    out = data.narrow(dim, before, extent).clone()
    for x in range(-before, 0):
        target = -x if reflect else 0
        out.narrow(dim, target, 1).add_(data.narrow(dim, x + before, 1))
    for x in range(extent, extent + after):
        target = 2 * (extent - 1) - x if reflect else extent - 1
        out.narrow(dim, target, 1).add_(data.narrow(dim, x + before, 1))
    return Win(out, win.off, win.full)


def accumulate(a: Win, b: Win, extent: Sequence[int]) -> Win:
    """Sum of two gradients of the same node (e.g. both branches of a residual block)."""
    if a.off.shape == b.off.shape and a.full == b.full and a.data.shape == b.data.shape \
            and (a.off == b.off).all():
        # Same window: what lies outside the map is summed with what lies outside the map.
        dirty = a.dirty or b.dirty
        if a.shared or a.data.data_ptr() == b.data.data_ptr():
            return Win(a.data + b.data, a.off, a.full, dirty=dirty)
        return Win(a.data.add_(b.data), a.off, a.full, dirty=dirty)
    a, b = clean(a), clean(b)
    off = np.zeros_like(a.off)
    sizes, flags = [], []
    for axis in range(2):
        if a.full[axis] or b.full[axis]:
            sizes.append(extent[axis])
            flags.append(True)
            continue
        start = np.minimum(a.off[:, axis], b.off[:, axis])
        stop = np.maximum(a.off[:, axis] + a.data.shape[2 + axis],
                          b.off[:, axis] + b.data.shape[2 + axis])
        size = int((stop - start).max())
        if size >= extent[axis]:
            sizes.append(extent[axis])
            flags.append(True)
        else:
            off[:, axis] = start
            sizes.append(size)
            flags.append(False)
    total = None
    for win in (a, b):
        data = win.data
        for axis in range(2):
            data = shift_axis(data, axis, off[:, axis] - win.off[:, axis], sizes[axis])
        total = data if total is None else total + data
    return Win(total, off, (flags[0], flags[1]))



def channels_last_source(tensor: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> contiguous (N, h, w, C), the layout :func:`gather_window` reads."""
    return tensor.detach().permute(0, 2, 3, 1).contiguous()

