"""The windowed engine: an interpreter of the autograd graph that follows each seed's cone.

:func:`compile_plan` translates the graph between a layer and the input into steps, one
per node, each the ``apply`` of the node kind's handler (:mod:`.handlers`); None when some
node has no handler (the caller then runs the autograd engine). :func:`run_windowed` pushes
batches of seeds (image, channel, row, col) through the plan: each gradient is a window
around the seed's receptive-field cone (:mod:`.windows`) until it covers the whole map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import autograd_graph as graph
from .handlers import Apply, NodeContext, batchnorm_scale, handler_for, identity
from .windows import Win, accumulate, clean, fit, shift_axis

_CPU_TILE = 16 * 2**20  # bytes of the widest gradient of a CPU batch


@dataclass
class Step:
    """One node of a compiled plan: its ``apply`` and the child node of each result."""

    node: Any
    apply: Apply
    children: list[Any]  # one per output of apply; None = not on a path to the input


def compile_plan(nodes: list[Any], x: torch.Tensor, dtype: torch.dtype,
                 missing: list[str] | None = None) -> list[Step] | None:
    """Translate the graph into windowed steps, or None if some node is not supported.

    The steps compute in ``dtype`` whatever the dtype of the recorded forward pass; the
    kinds of unsupported nodes are appended to ``missing``.
    """
    relevant = set(nodes)
    try:
        edges = {node: [(child, i) if child in relevant else (None, i)
                        for child, i in graph.edges(node)] for node in nodes}
        folded = _fold_batchnorms(nodes, edges)
        steps = []
        for node in nodes:
            if graph.leaf_tensor(node) is x:
                continue
            shapes = [graph.input_shape(c, i) if c is not None else None for c, i in edges[node]]
            if node in folded and not isinstance(folded[node], torch.Tensor):
                apply = identity  # a BatchNorm folded into the convolution below it
            else:
                context = NodeContext(graph.node_kind(node), shapes, dtype, folded.get(node))
                apply = handler_for(node, context)
            if apply is None:
                if missing is not None:
                    missing.append(graph.node_kind(node))
                return None
            steps.append(Step(node, apply, [c for c, _ in edges[node]]))
    except (AttributeError, RuntimeError, TypeError, IndexError) as error:  # private API
        if missing is not None:
            missing.append(f"{type(error).__name__}: {error}")
        return None
    return steps


def _fold_batchnorms(nodes: list[Any], edges: dict[Any, list[tuple[Any, int]]]) -> dict[Any, Any]:
    """BatchNorm scales to fold into the convolution that feeds them (one pass fewer).

    Returns {batchnorm node: True, convolution node: scale (C,)} for each conv -> BN pair
    whose convolution output goes only to that BatchNorm.
    """
    parents: dict[Any, int] = {}
    for node in nodes:
        for child, _ in edges[node]:
            if child is not None:
                parents[child] = parents.get(child, 0) + 1
    folded: dict[Any, Any] = {}
    for node in nodes:
        if graph.node_kind(node) not in graph.BATCHNORM_KINDS:
            continue
        scale = batchnorm_scale(node)
        children = [child for child, _ in edges[node] if child is not None]
        if scale is None or len(children) != 1:
            continue
        child = children[0]
        if graph.node_kind(child) == "ConvolutionBackward0" and parents.get(child) == 1 \
                and not graph.conv_params(child).transposed:
            folded[node] = True
            folded[child] = scale.view(-1)
    return folded


def run_windowed(plan: list[Step], seeds: tuple[torch.Tensor, ...], input_shape: torch.Size,
                 max_memory: int, dtype: torch.dtype) -> torch.Tensor:
    """(S, c, H, W) maps of S seeds = (image, channel, row, col) tensors of the layer.

    ``input_shape``: the network input's (N, c, H, W); ``max_memory`` bounds the bytes of
    the widest gradient of a batch of seeds; ``dtype``: of the backward pass and the maps.
    """
    image, channel, row, col = seeds
    total = len(image)
    root = plan[0].node
    out_shape = graph.input_shape(root, 0)
    result = torch.empty(total, *input_shape[1:], device=image.device, dtype=dtype)
    # On CPU, batches whose widest gradient fits in cache run several times faster than big
    # ones (the element-wise passes are memory-bound); on GPU only max_memory bounds them.
    tile = max_memory // 4 if image.is_cuda else min(max_memory // 4, _CPU_TILE)
    batch = 64
    start = 0
    while start < total:
        stop = min(total, start + batch)
        maps, peak = _windowed_batch(plan, image[start:stop], channel[start:stop],
                                     row[start:stop], col[start:stop], out_shape, input_shape,
                                     dtype)
        result[start:stop] = maps
        start = stop
        per_seed = peak / max(1, len(maps))
        batch = int(max(1, min(8192, tile // max(1.0, per_seed))))
    return result


def _windowed_batch(plan, image, channel, row, col, out_shape, input_shape, dtype):
    b = len(image)
    data = torch.zeros(b, out_shape[1], 1, 1, device=image.device, dtype=dtype)
    data[torch.arange(b, device=image.device), channel, 0, 0] = 1
    off = torch.stack([row, col], dim=1).cpu().numpy().astype(np.int64)
    seed = fit(data, off, (False, False), out_shape[2:])
    seed.hot = channel
    pending: dict[Any, Win] = {plan[0].node: seed}
    extents: dict[Any, tuple[int, int]] = {}
    peak = seed.data.numel() * seed.data.element_size()
    result: Win | None = None
    for step in plan:
        win = pending.pop(step.node, None)
        if win is None:
            continue
        for child, grad in zip(step.children, step.apply(win, image), strict=False):
            if child is None or grad is None:
                continue
            peak = max(peak, grad.data.numel() * grad.data.element_size())
            if graph.leaf_tensor(child) is not None:
                result = grad if result is None else accumulate(result, grad, input_shape[2:])
                continue
            if child in pending:
                extent = extents.setdefault(child, tuple(graph.input_shape(child, 0)[2:]))
                pending[child] = accumulate(pending[child], grad, extent)
            else:
                pending[child] = grad
    if result is None:
        return torch.zeros(b, *input_shape[1:], device=image.device, dtype=dtype), peak
    result = clean(result)
    data = result.data  # full axes already span the input; place the windowed ones
    for axis in range(2):
        if not result.full[axis]:
            data = shift_axis(data, axis, -result.off[:, axis], input_shape[2 + axis])
    return data, peak
