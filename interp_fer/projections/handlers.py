"""Handlers of the windowed engine: the backward pass of one kind of autograd node on windows.

The windowed engine (:mod:`interp_fer.projections.windowed_engine`) runs the backward pass
of a projection as a small interpreter of the autograd graph. For every node between the
layer and the input it asks the registry :data:`HANDLERS`, keyed by the node's kind (its type
name, what ``node.name()`` says: ``"ConvolutionBackward0"``,
``"MaxPool2DWithIndicesBackward0"`` ...), for a handler. A node kind without a handler, or a
handler that returns None, makes the graph *not windowable*: ``engine="auto"`` then runs the
autograd engine (same maps, whole-map memory, typically 3-10x slower) and says so once per
network and layer; ``engine="windowed"`` raises.

Contract
--------
A handler is registered with ``@register("KindBackward0", ...)`` and called once per node
when the graph is compiled (once per forward pass)::

    handler(node, context: NodeContext) -> Apply | None

It receives

* ``node``: the autograd node. Read its forward arguments through
  :mod:`interp_fer.autograd_graph` (``conv_params``, ``pool_params``, ``pad_params``,
  ``batchnorm_params``, ``input_shape`` ...), never through private attributes here;
* ``context.shapes``: per edge of the node (one per forward input, in
  ``autograd_graph.edges(node)`` order), the (N, C, h, w) shape of that input, i.e. of the
  map the gradient returned for that edge covers; None for an edge that carries no gradient
  to the network input (its result is ignored). Shapes are 4-D (other nodes are refused
  before any handler is asked);
* ``context.dtype``: the dtype the backward pass computes in (the module's own), whatever the
  dtype of the recorded forward pass (float64 when it decides the switches);
* ``context.scale``: (C_out,) per-output-channel factor that a BatchNorm right after this
  node folded into it (only for convolutions; None otherwise).

It returns None when it cannot compute this node exactly (an option it does not implement,
e.g. an average pool's ``ceil_mode`` windows): never an approximation. Otherwise it returns
``apply(win: Win, img: Tensor) -> list[Win | None]``, called for every batch of seeds:
``win`` is the gradient at the node's output for B seeds (:class:`~.windows.Win`), ``img``
(B,) long the image of each seed (on the device). Everything that does not depend on the
window (weights, kernels, per-image tensors in channels-last layout) is prepared in the
handler, not in ``apply``.

Invariants every ``apply`` keeps (the engine relies on them, and nothing checks them at run
time: the parity tests against autograd and Captum do):

1. **One result per edge, in the input map's grid.** The list has one entry per edge of the
   node (None: no gradient for that input). Each :class:`~.windows.Win` lies in the grid of
   that input's map: ``off`` (B, 2) is the (row, col) of ``data[b, :, 0, 0]`` in that map's
   pixel units and may be *virtual* (outside the map); an axis whose window reaches the map's
   size is *full* (offset 0, size exactly the map's). :func:`~.windows.fit` turns a computed
   block with virtual offsets into such a window.
2. **Values outside the map.** Positions of a window outside its map hold zero, or values
   that belong to no position when ``win.dirty`` is set. A handler that moves values between
   positions (convolution, pooling, folding a padding back, a crop of a larger map) calls
   :func:`~.windows.clean` first; element-wise handlers may pass dirty windows through. A
   returned window that may hold such values says so in ``dirty`` (``fit`` does).
3. **No writes to shared data.** ``win.data`` may also be held by another pending gradient
   (``win.shared``: both branches of an addition): then it is never modified in place. An
   unshared one may be (one memory pass fewer). Returning the same tensor for two edges
   marks both results ``shared``.
4. **Seeds are independent.** The B rows are seeds of any images and channels in one batch:
   nothing mixes rows. Per-image forward tensors (max-pool switches, guided-backprop masks)
   are read at each seed's image and window (:func:`~.windows.gather_window` on a tensor
   made with :func:`~.windows.channels_last_source`), so the maps do not depend on which
   other images or seeds share the batch.
5. **The rule, not an approximation, in** ``context.dtype``. The result equals autograd's
   gradient of the node, except at the rule's ReLUs (:func:`interp_fer.hooks.relu_rule`);
   saved weights and scales are cast to ``context.dtype``. ``win.hot`` (B,) marks a 1x1
   seed window that is zero but for one channel; keep it only while that stays true
   (``dataclasses.replace`` copies it), build a fresh :class:`~.windows.Win` otherwise.

Whether an operation is *allowed* between the input and a layer is decided before, by the
projection rules (:func:`interp_fer.hooks.check_rules`); a handler only makes an allowed node
fast. ``docs/projection_engine.md`` walks through adding one (the average pool below).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..autograd_graph import (
    BATCHNORM_KINDS,
    add_alpha,
    batchnorm_params,
    cat_dim,
    conv_params,
    edges,
    input_shape,
    pad_params,
    pool_params,
)
from ..hooks import RULE_RELU_KIND, guided_mask, is_rule_node
from .windows import Win, channels_last_source, clean, fit, fold_axis, gather_window

Apply = Callable[[Win, torch.Tensor], list[Win | None]]


@dataclass(frozen=True)
class NodeContext:
    """What a handler gets besides the node (see the module docstring)."""

    kind: str
    shapes: list[tuple[int, ...] | None]
    dtype: torch.dtype
    scale: torch.Tensor | None = None


Handler = Callable[[Any, NodeContext], Apply | None]
# Node kind -> handler; filled by @register below (and by extensions importing this module).
HANDLERS: dict[str, Handler] = {}


def register(*kinds: str) -> Callable[[Handler], Handler]:
    """Decorator: make ``handler`` the windowed backward of the autograd node ``kinds``.

    Raises ``ValueError`` when a kind already has a handler (two would silently shadow).
    """
    def decorate(handler: Handler) -> Handler:
        for kind in kinds:
            if kind in HANDLERS and HANDLERS[kind] is not handler:
                raise ValueError(f"autograd node kind {kind!r} already has a windowed handler "
                                 f"({HANDLERS[kind].__name__})")
            HANDLERS[kind] = handler
        return handler
    return decorate


def handler_for(node: Any, context: NodeContext) -> Apply | None:
    """The ``apply`` of ``node``, or None when the windowed engine cannot run it."""
    if any(len(shape) != 4 for shape in context.shapes if shape is not None):
        return None
    handler = HANDLERS.get(context.kind)
    return None if handler is None else handler(node, context)


def identity(win: Win, img: torch.Tensor) -> list[Win | None]:
    """The gradient passes unchanged (also a BatchNorm folded into its convolution)."""
    return [win]


@register("CloneBackward0", "AliasBackward0")
def clone(node: Any, context: NodeContext) -> Apply | None:
    """A copy of the tensor: the gradient passes unchanged."""
    return identity


@register("AddBackward0", "SubBackward0")
def add(node: Any, context: NodeContext) -> Apply | None:
    """``a + alpha * b``: the same window to both inputs (shared), scaled for ``b``."""
    out = input_shape(node, 0)
    if any(tuple(shape) != out for shape in context.shapes if shape is not None):
        return None  # broadcasting
    alpha = add_alpha(node) * (-1 if context.kind == "SubBackward0" else 1)
    if alpha == 1:
        return lambda win, img: [replace(win, shared=True), replace(win, shared=True)]
    return lambda win, img: [win, replace(win, data=win.data * alpha, shared=False)]


@register(RULE_RELU_KIND)
def rule_relu(node: Any, context: NodeContext) -> Apply | None:
    """An ``nn.ReLU`` hooked by :func:`interp_fer.hooks.relu_rule`: relu of the signal
    (deconvnet), times the forward mask read at each seed's image and window (guided)."""
    if not is_rule_node(node):
        return None
    if not node.guided:
        return lambda win, img: [replace(win, data=_relu(win), shared=False)]
    (saved,) = node.saved_tensors
    positive = channels_last_source(guided_mask(saved, node.upper))

    def guided(win: Win, img: torch.Tensor) -> list[Win | None]:
        mask = gather_window(positive, img, win).permute(0, 3, 1, 2)
        return [replace(win, data=_relu(win).mul_(mask), shared=False)]

    return guided


@register("CatBackward0")
def concatenate(node: Any, context: NodeContext) -> Apply | None:
    """Concatenation along channels: each input gets its channels of the window.

    The parts are views of the window's data (disjoint channels, so in-place work on one
    leaves the others alone; shared if the window is). Spatial concatenation is refused.
    """
    sizes = [None if child is None else input_shape(child, index)
             for child, index in edges(node)]
    if any(size is None or len(size) != 4 for size in sizes) or cat_dim(node) % 4 != 1:
        return None  # an input without a recorded shape, or not along channels
    counts = [size[1] for size in sizes]
    if sum(counts) != input_shape(node, 0)[1]:
        return None
    starts = np.cumsum([0, *counts[:-1]]).tolist()
    wanted = [shape is not None for shape in context.shapes]

    def split(win: Win, img: torch.Tensor) -> list[Win | None]:
        # hot is dropped: a part may hold no seed channel at all.
        return [Win(win.data.narrow(1, start, count), win.off, win.full, dirty=win.dirty,
                    shared=win.shared) if keep else None
                for start, count, keep in zip(starts, counts, wanted, strict=True)]

    return split


def _relu(win: Win) -> torch.Tensor:
    # In place where no other gradient holds the data: one memory pass fewer.
    return torch.relu(win.data) if win.shared else win.data.relu_()


@register("ConvolutionBackward0")
def convolution(node: Any, context: NodeContext) -> Apply | None:
    """Transposed convolution of the window (a folded BatchNorm scales the kernels first)."""
    shape, scale, dtype = context.shapes[0], context.scale, context.dtype
    params = conv_params(node)
    if shape is None or params.transposed or len(params.stride) != 2:
        return None
    weight = params.weight
    if scale is not None:  # BatchNorm after this convolution, folded into its output channels
        weight = weight * scale.view(-1, 1, 1, 1)
    weight = weight.to(dtype)
    stride, padding, dilation, groups = params.stride, params.padding, params.dilation, \
        params.groups
    kernel = tuple(weight.shape[2:])
    extent = shape[2:]
    reach = [dilation[a] * (kernel[a] - 1) for a in range(2)]
    flipped = None
    if stride == (1, 1):
        # A stride-1 transposed convolution is a convolution with the kernel flipped and its
        # in/out channels swapped per group: the forward kernels are much faster on CPU.
        out_channels, in_per_group = weight.shape[:2]
        flipped = (weight.view(groups, out_channels // groups, in_per_group, *kernel)
                   .transpose(1, 2).reshape(groups * in_per_group, out_channels // groups, *kernel)
                   .flip(-1, -2).contiguous())

    # A 1x1 stride-1 convolution moves nothing between positions: values outside the map
    # stay outside, so a dirty window need not be cleaned first (its output is marked dirty).
    pointwise = kernel == (1, 1) and stride == (1, 1) and padding == (0, 0)

    def conv(win: Win, img: torch.Tensor) -> list[Win | None]:
        if not pointwise:
            win = clean(win)
        if win.hot is not None and groups == 1 and dilation == (1, 1):
            # A single unit (the seed): its transposed convolution is a copy of its kernel.
            value = win.data.flatten(1).gather(1, win.hot[:, None])
            out = weight.index_select(0, win.hot) * value[:, :, None, None]
            off = win.off * np.array(stride) - np.array(padding)
            return [fit(out.contiguous(memory_format=torch.channels_last), off, win.full,
                         extent)]
        if all(win.full) and flipped is not None and not win.shared \
                and all(reach[a] >= padding[a] for a in range(2)):
            uncropped = _uncropped(win.data)
            if uncropped is not None:
                # A crop of a larger map (the padding of a max-pool): convolve the whole map
                # with its margin zeroed and crop the result, rather than copy the crop.
                base, top, left = uncropped
                pads = tuple(reach[a] - padding[a] for a in range(2))
                out = _conv(base, flipped, pads, dilation, groups)
                return [Win(out[:, :, top:top + extent[0], left:left + extent[1]], win.off,
                             win.full)]
        data = win.data.contiguous(memory_format=torch.channels_last)
        if all(win.full):
            # Whole maps: the convolution crops the padding itself.
            if flipped is not None and all(reach[a] >= padding[a] for a in range(2)):
                pads = tuple(reach[a] - padding[a] for a in range(2))
                out = _conv(data, flipped, pads, dilation, groups)
                if tuple(out.shape[2:]) == tuple(extent):
                    return [Win(out, win.off, win.full)]
            sizes = [(data.shape[2 + a] - 1) * stride[a] - 2 * padding[a] + reach[a] + 1
                     for a in range(2)]
            extra = [extent[a] - sizes[a] for a in range(2)]
            if all(0 <= e < max(stride[a], dilation[a]) for a, e in enumerate(extra)):
                out = F.conv_transpose2d(data, weight, None, stride, padding, extra, groups,
                                         dilation)
                return [Win(out, win.off, win.full)]
        if flipped is not None:
            out = _conv(data, flipped, tuple(reach), dilation, groups)
        else:
            out = F.conv_transpose2d(data, weight, None, stride, 0, 0, groups, dilation)
        off = win.off * np.array(stride) - np.array(padding)
        out = fit(out, off, win.full, extent)
        if pointwise and win.dirty is None:
            out.dirty = None  # zeros outside the map stay zeros
        return [out]

    return conv


def _uncropped(data: torch.Tensor) -> tuple[torch.Tensor, int, int] | None:
    """The channels-last map that ``data`` is a spatial crop of, its margin zeroed in place.

    Returns (base, top, left) with ``data == base[:, :, top:top + h, left:left + w]`` and
    ``base`` zero elsewhere, or None when ``data`` is not such a crop. Only for data that no
    other gradient holds (the margin is overwritten).
    """
    base = data._base
    if base is None or data.is_contiguous(memory_format=torch.channels_last) \
            or base.ndim != 4 or base.shape[:2] != data.shape[:2] \
            or not base.is_contiguous(memory_format=torch.channels_last) \
            or base.stride() != data.stride():
        return None
    delta = data.storage_offset() - base.storage_offset()
    row = base.stride(2)
    top, left = delta // row, (delta % row) // base.stride(3)
    h, w = data.shape[2:]
    if delta < 0 or delta % base.stride(3) or top + h > base.shape[2] or left + w > base.shape[3]:
        return None
    base[:, :, :top].zero_()
    base[:, :, top + h:].zero_()
    base[:, :, :, :left].zero_()
    base[:, :, :, left + w:].zero_()
    return base, top, left


def _conv(data: torch.Tensor, weight: torch.Tensor, padding: tuple[int, ...],
          dilation: tuple[int, ...], groups: int) -> torch.Tensor:
    """Stride-1 convolution; one output channel (a gray input) as depthwise + channel sum.

    oneDNN's kernels are slow with a single output channel; the depthwise form is ~3x faster.
    """
    if weight.shape[0] == 1 and groups == 1 and weight.shape[1] > 1:
        spread = F.conv2d(data, weight.view(weight.shape[1], 1, *weight.shape[2:]), None, 1,
                          padding, dilation, weight.shape[1])
        return spread.sum(dim=1, keepdim=True)
    return F.conv2d(data, weight, None, 1, padding, dilation, groups)


@register("MaxPool2DWithIndicesBackward0")
def max_pool(node: Any, context: NodeContext) -> Apply | None:
    """Each value goes to its window's switch (the forward pass's arg-max position)."""
    shape = context.shapes[0]
    params = pool_params(node)
    if shape is None or params.indices is None:
        return None
    indices = channels_last_source(params.indices)  # (N, h, w, C) flat input positions
    kernel, stride, padding, dilation = params.kernel, params.stride, params.padding, \
        params.dilation
    ceil_mode = params.ceil_mode
    extent = shape[2:]
    packed: dict[int, torch.Tensor] = {}  # window width -> switches within their windows

    def switches_in_windows(width: int) -> torch.Tensor:
        # Each switch as row * width + col from the origin of its pooling window: a window of
        # seeds then costs a gather and an add rather than a division per element. Made the
        # first time a window of that width needs it (whole maps read ``indices`` directly).
        if width not in packed:
            h, w = indices.shape[1:3]
            rows = indices // extent[1] - (torch.arange(h, device=indices.device) * stride[0]
                                           - padding[0])[:, None, None]
            cols = indices % extent[1] - (torch.arange(w, device=indices.device) * stride[1]
                                          - padding[1])[:, None]
            packed[width] = rows * width + cols
        return packed[width]

    def pool(win: Win, img: torch.Tensor) -> list[Win | None]:
        win = clean(win)
        b, c, sh, sw = win.data.shape
        if all(win.full):
            # Whole maps: the native max-pool backward (a parallel scatter of each value to
            # its switch), run on channels-last tensors, is twice as fast as scatter_add_.
            like = torch.empty((b, c, *extent), dtype=win.data.dtype, device=win.data.device,
                               memory_format=torch.channels_last)
            out = torch.ops.aten.max_pool2d_with_indices_backward(
                win.data.contiguous(memory_format=torch.channels_last), like, kernel, stride,
                padding, dilation, ceil_mode, gather_window(indices, img, win).permute(0, 3, 1, 2))
            return [Win(out, win.off, (True, True))]
        sizes, offs, full, shifts = [], [], [], []
        for a, size in enumerate((sh, sw)):
            span = (size - 1) * stride[a] + dilation[a] * (kernel[a] - 1) + 1
            whole = win.full[a] or span >= extent[a]
            full.append(whole)
            sizes.append(extent[a] if whole else span)
            offs.append(np.zeros(b, np.int64) if whole
                        else win.off[:, a] * stride[a] - padding[a])
            # Window origin of the seed's first unit, in the coordinates of the result.
            shifts.append(win.off[:, a] * stride[a] - padding[a] - offs[-1])
        off = np.stack(offs, axis=1)
        device = win.data.device
        grid = ((torch.arange(sh, device=device) * (stride[0] * sizes[1]))[:, None]
                + torch.arange(sw, device=device) * stride[1])
        start = torch.from_numpy(shifts[0] * sizes[1] + shifts[1]).to(device)
        flat = gather_window(switches_in_windows(sizes[1]), img, win) \
            + (grid[None, :, :, None] + start[:, None, None, None])
        if any(full):  # window positions outside the map (values 0) may point anywhere
            flat = flat.clamp_(0, sizes[0] * sizes[1] - 1)
            # Scatter in channels-last layout: the result feeds a convolution that wants it.
            values = win.data.permute(0, 2, 3, 1).reshape(b, sh * sw, c)
            out = values.new_zeros(b, sizes[0] * sizes[1], c)
            out.scatter_add_(1, flat.reshape(b, sh * sw, c), values)
            out = out.view(b, sizes[0], sizes[1], c).permute(0, 3, 1, 2)
        else:  # the window is a small map of its own, pooled without padding
            like = torch.empty((b, c, *sizes), dtype=win.data.dtype, device=device,
                               memory_format=torch.channels_last)
            out = torch.ops.aten.max_pool2d_with_indices_backward(
                win.data.contiguous(memory_format=torch.channels_last), like, kernel, stride,
                (0, 0), dilation, False, flat.permute(0, 3, 1, 2))
        return [Win(out, off, (full[0], full[1]))]

    return pool


def batchnorm_scale(node: Any) -> torch.Tensor | None:
    """(1, C, 1, 1) gradient scale of an eval-mode BatchNorm; None in training mode."""
    params = batchnorm_params(node)
    if params.training is None or params.training:
        return None  # batch statistics mix the images of a batch
    if params.running_var is None:
        return None
    scale = torch.rsqrt(params.running_var + params.eps)
    if params.weight is not None:
        scale = scale * params.weight
    return scale.view(1, -1, 1, 1)


@register(*BATCHNORM_KINDS)
def batchnorm(node: Any, context: NodeContext) -> Apply | None:
    """Eval-mode BatchNorm: a per-channel scale (running statistics); refused in training."""
    scale = batchnorm_scale(node)
    if scale is None:
        return None
    scale = scale.to(context.dtype)
    return lambda win, img: [replace(win, data=win.data * scale)]


@register("ConstantPadNdBackward0")
def constant_pad(node: Any, context: NodeContext) -> Apply | None:
    """A crop of the window (negative pads: a larger input map, so clean first)."""
    shape = context.shapes[0]
    pad = pad_params(node).pad
    if shape is None or len(pad) > 4 and any(pad[4:]):
        return None
    left = pad[0]
    top = pad[2] if len(pad) > 2 else 0
    before = np.array([top, left])
    extent = shape[2:]

    def crop(win: Win, img: torch.Tensor) -> list[Win | None]:
        if min(pad) < 0:  # the input map is larger: positions outside the output matter
            win = clean(win)
        out = fit(win.data, win.off - before, win.full, extent)
        if win.dirty is not None and out.dirty is None and not all(out.full):
            out.dirty = (extent[0], extent[1])
        if out.data.shape[2:] == (1, 1):
            out.hot = win.hot
        out.shared = win.shared  # a crop is a view of the same data
        return [out]

    return crop


@register("ReflectionPad2DBackward0", "ReplicationPad2DBackward0")
def fold_pad(node: Any, context: NodeContext) -> Apply | None:
    """Reflection / replication padding: the border's gradient folds back onto the map."""
    shape = context.shapes[0]
    if shape is None:
        return None
    params = pad_params(node)
    reflect = params.mode == "reflect"
    left, right, top, bottom = params.pad
    extent = shape[2:]

    def fold(win: Win, img: torch.Tensor) -> list[Win | None]:
        for axis, before, after in ((0, top, bottom), (1, left, right)):
            win = fold_axis(win, axis, before, after, extent[axis], reflect)
        return [replace(win, dirty=None)]  # each axis zeroed what lies outside the map

    return fold



@register("AvgPool2DBackward0")
def avg_pool(node: Any, context: NodeContext) -> Apply | None:
    """Each value spreads evenly over its pooling window, divided by the window's divisor.

    A transposed depthwise convolution with a kernel of ones. The divisor is
    ``divisor_override``, or kh * kw, or (``count_include_pad=False`` with padding) the
    number of the window's positions inside the input map. ``ceil_mode`` windows that
    ``floor`` would not make (cut at the border) are not implemented: refused.
    """
    shape = context.shapes[0]
    if shape is None:
        return None
    params = pool_params(node)
    kernel, stride, padding = params.kernel, params.stride, params.padding
    extent, out_extent = shape[2:], input_shape(node, 0)[2:]
    floor = [(extent[a] + 2 * padding[a] - kernel[a]) // stride[a] + 1 for a in range(2)]
    if list(out_extent) != floor or params.dilation != (1, 1):
        return None  # ceil_mode's extra windows
    device = params.source.device if params.source is not None else torch.device("cpu")
    counted = params.divisor_override is None and not params.count_include_pad and any(padding)
    divisor = 1 if counted else params.divisor_override or kernel[0] * kernel[1]
    weight = torch.full((shape[1], 1, *kernel), 1 / divisor, dtype=context.dtype, device=device)

    def counts(win: Win) -> torch.Tensor:
        # (B, 1, sh, sw): positions of each window inside the input map (>= 1: virtual
        # positions outside the output map hold zeros after clean()).
        per_axis = []
        for a in range(2):
            start = (win.off[:, a:a + 1] + np.arange(win.data.shape[2 + a])) * stride[a] \
                - padding[a]
            inside = np.minimum(start + kernel[a], extent[a]) - np.maximum(start, 0)
            per_axis.append(np.maximum(inside, 1))
        table = per_axis[0][:, :, None] * per_axis[1][:, None, :]
        return torch.from_numpy(table[:, None]).to(win.data.device, win.data.dtype)

    def pool(win: Win, img: torch.Tensor) -> list[Win | None]:
        win = clean(win)
        data = win.data / counts(win) if counted else win.data
        out = F.conv_transpose2d(data, weight, None, stride, 0, 0, shape[1])
        return [fit(out, win.off * np.array(stride) - np.array(padding), win.full, extent)]

    return pool
