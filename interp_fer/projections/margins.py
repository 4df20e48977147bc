"""Switch margins: how close each projection came to a different max-pool switch.

See :attr:`interp_fer.projections.Projections.switch_margins` for the definition.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..autograd_graph import node_kind, pool_params
from ..layers import ReceptiveField, trace_from_node

# Relative max-pool switch margin under which float32 arithmetic may flip a switch (see
# Projections.switch_margins). Measured on the zoo and the sample faces: float32 activations
# differ from float64 ones by 2e-7 to 3e-6 of their channel's maximum, and the switch that
# float32 Captum flipped (mini-Xception block2's pool, "surprise" face: wrong maps, up to
# 1e-1 of their maximum, for block3 and block4 units) had a margin of 8e-8. A conservative flag:
# a deep unit's cone holds thousands of windows, so most deep maps fall below it.
ILL_CONDITIONED_MARGIN = 1e-5


def switch_margins(nodes: list[Any], root: Any, extent: tuple[int, int], units: torch.Tensor,
                   active: torch.Tensor) -> torch.Tensor:
    """(N, K) float64 smallest relative switch margin in each seed's cone (CPU tensor).

    ``root``: the layer output's grad_fn; ``extent``: its (h, w); ``units``: (N, K, 2).
    """
    n, k = units.shape[:2]
    margin = torch.full((n, k), math.inf, dtype=torch.float64)
    units = units.cpu()
    image = torch.arange(n)[:, None].expand(n, k)
    for node in nodes:
        if node_kind(node) != "MaxPool2DWithIndicesBackward0":
            continue
        windows = _pool_window_margins(node).cpu()  # (N, ho, wo)
        field = trace_from_node(root, node)
        cone = _cone_minimum(windows, field, extent)
        if cone is None:  # unknown geometry: every window of the map
            here = windows.flatten(1).amin(1)[:, None].expand(n, k)
        else:
            here = cone[image, units[..., 0], units[..., 1]]
        margin = torch.minimum(margin, here)
    return margin.masked_fill(~active.cpu(), math.nan)


def _pool_window_margins(node: Any, budget: int = 32 * 2**20) -> torch.Tensor:
    """(N, ho, wo) float64: per output position, the smallest relative gap over channels.

    The gap of a window is its largest minus its second-largest value, over the largest
    |window maximum| of the (image, channel) map; inf for exact ties and windows with one
    value.
    """
    params = pool_params(node)
    x = params.source
    kernel, stride, padding, dilation = params.kernel, params.stride, params.padding, \
        params.dilation
    ho, wo = params.indices.shape[2:]
    n, c, h, w = x.shape
    if kernel[0] * kernel[1] < 2:
        return torch.full((n, ho, wo), math.inf, dtype=torch.float64, device=x.device)
    span = [dilation[a] * (kernel[a] - 1) + 1 for a in range(2)]
    after = [max(0, (size - 1) * stride[a] + span[a] - padding[a] - length)
             for a, (size, length) in enumerate(((ho, h), (wo, w)))]
    out = []
    step = max(1, budget // max(1, c * ho * wo * 8 * 4))
    for part in x.split(step):
        # max and min are exact: the gaps of a float32 pass need no float64 copy.
        part = part if part.dtype in (torch.float64, torch.float32) else part.float()
        padded = part
        if any(padding) or any(after):
            padded = F.pad(part, (padding[1], after[1], padding[0], after[0]), value=-math.inf)
        # Running largest and second largest over the window's k*k strided views: max and
        # min are exact, and an exact tie leaves a gap of 0.
        top = second = None
        for i in range(kernel[0]):
            for j in range(kernel[1]):
                rows = slice(i * dilation[0], i * dilation[0] + (ho - 1) * stride[0] + 1,
                             stride[0])
                cols = slice(j * dilation[1], j * dilation[1] + (wo - 1) * stride[1] + 1,
                             stride[1])
                value = padded[:, :, rows, cols]
                if top is None:
                    top, second = value, torch.full_like(value, -math.inf)
                else:
                    second = torch.maximum(second, torch.minimum(top, value))
                    top = torch.maximum(top, value)
        # The scale: the largest |window maximum| of the (image, channel) map; a max-pool's
        # own -inf padding (Keras 'same') is no value.
        scale = top.abs().nan_to_num(posinf=0.0).amax(dim=(2, 3), keepdim=True)
        gap = top - second
        relative = torch.where(gap == 0, math.inf,
                               gap / scale.clamp_min(torch.finfo(part.dtype).tiny))  # inf-inf: nan
        out.append(relative.nan_to_num(nan=math.inf).amin(dim=1).double())
    return torch.cat(out)


def _cone_minimum(windows: torch.Tensor, field: ReceptiveField | None,
                  extent: tuple[int, ...]) -> torch.Tensor | None:
    """(N, h, w): minimum of ``windows`` (N, ho, wo) over each layer unit's cone.

    ``field`` maps the layer's units (grid ``extent`` = (h, w)) onto the pool's output grid.
    None when the geometry is unknown or not on the integer grid.
    """
    if field is None:
        return None
    sizes, strides, firsts = [], [], []
    for axis in (field.rows, field.cols):
        first = axis.offset - (axis.size - 1) / 2
        if not (float(axis.size).is_integer() and float(axis.stride).is_integer()
                and float(first).is_integer()) or axis.stride < 1:
            return None
        sizes.append(int(axis.size))
        strides.append(int(axis.stride))
        firsts.append(int(first))
    pads = []
    for a in range(2):
        before = max(0, -firsts[a])
        stop = firsts[a] + (extent[a] - 1) * strides[a] + sizes[a]
        pads.append((before, max(0, stop - windows.shape[1 + a])))
    padded = F.pad(windows[:, None], (*pads[1], *pads[0]), value=math.inf)
    start = [firsts[a] + pads[a][0] for a in range(2)]
    padded = padded[:, :, start[0]:, start[1]:]
    low = -F.max_pool2d(-padded, tuple(sizes), tuple(strides))
    return low[:, 0, :extent[0], :extent[1]]
