"""The autograd engine: projections of any graph by batched ``torch.autograd.grad``.

One row of seeds per channel goes backward through every image at once
(``is_grads_batched=True``), the ReLU rules applied by the hooks of
:func:`interp_fer.hooks.relu_rule`. Whole maps at every node: slower than the windowed engine
(:mod:`.windowed_engine`) and heavier in memory, but it runs every operation autograd knows.
"""

from __future__ import annotations

import torch

from ..autograd_graph import largest_map


def run_autograd(activation: torch.Tensor, x: torch.Tensor, index: torch.Tensor,
                 units: torch.Tensor, active: torch.Tensor, maps: torch.Tensor,
                 max_memory: int) -> None:
    """Fill ``maps`` (N, K, c, H, W) with the gradients of the seeded units, in place.

    ``activation``: the layer's (N, C, h, w) output, recorded from ``x``; ``index``: (K,)
    channels; ``units``: (N, K, 2) arg-max (row, col); ``active``: (N, K) bool, the seeds to
    run (other maps are left as they are); ``max_memory``: bytes per batch of seed rows.
    """
    n = activation.shape[0]
    # A row of seeds goes backward through every image: budget the largest map, 4 copies.
    per_row = 4 * n * largest_map(activation.grad_fn) * activation.element_size()
    rows = max(1, min(len(index), max_memory // max(1, per_row)))
    for start in range(0, len(index), rows):
        slots = torch.arange(start, min(start + rows, len(index)), device=x.device)
        seeds = activation.new_zeros(len(slots), *activation.shape)
        row, image = active[:, slots].T.nonzero(as_tuple=True)
        slot = slots[row]
        seeds[row, image, index[slot], units[image, slot, 0], units[image, slot, 1]] = 1
        with torch.enable_grad():
            (grads,) = torch.autograd.grad(activation, x, seeds, retain_graph=True,
                                           is_grads_batched=True)
        maps[:, slots] = (grads.transpose(0, 1) * active[:, slots, None, None, None]).to(maps.dtype)
