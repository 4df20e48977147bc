"""Deconvnet and guided-backprop projections of every channel's maximum, and extremum points.

For image i and channel k of a layer, the *projection* is the input-space map obtained by
seeding the backward pass with 1 at the channel's arg-max unit (first maximum in row-major
order, as ``torch.argmax`` on the flattened map) and 0 elsewhere, and propagating it with the
deconvnet rules (Zeiler & Fergus 2014): transposed convolutions, max-pool switches from the
forward pass, and ``relu`` applied to the backward signal at every ``nn.ReLU``. Guided backprop
also multiplies by the forward ReLU mask. Each map equals what Captum's
``NeuronDeconvolution(module, layer).attribute(x, neuron_selector=(k, row, col))`` (or
``NeuronGuidedBackprop``) returns for that image, computed in eval mode on a float64 copy of
the network and image (to ~1e-6 of the map's maximum: the backward pass runs in float32).

Why it is fast: the deconvnet rule ``relu(grad)`` does not depend on the forward pass, so every
(image, channel) seed of a batch can go backward *together* after one forward pass, sharing
that image's pooling switches (and ReLU masks for guided backprop). The backward pass is run by
a small interpreter of the autograd graph that keeps, for each seed, only a window around its
receptive-field cone (a 3x3 unit needs a 3x3 window, not the whole image) and switches to whole
maps once the cone covers them. Graphs with operations it does not know run through
``torch.autograd.grad(..., is_grads_batched=True)`` instead: same maps, full-size.

The network runs in eval mode (BatchNorm running statistics, no dropout, each image on its
own); every submodule's ``training`` flag is restored afterwards. Rules are never silent:
every operation between the input and the layer has a defined rule (recorded per layer in
:attr:`Projections.rules`) or the call is refused. ReLUs must be ``nn.ReLU`` (or ``nn.ReLU6``)
modules, in-place is fine: a ReLU applied functionally raises
:class:`~interp_fer.hooks.FunctionalReLUError`, and other nonlinearities (Tanh, LeakyReLU, ELU,
GELU, PReLU, clamp, ``torch.maximum``, ``x * (x > 0)`` ...) raise
:class:`~interp_fer.hooks.RuleError` naming the layer, rather than silently becoming a plain
gradient. BatchNorm without running statistics projects each image on its own; TorchScript
models are refused (they run no hooks).

Precision: the arg-max units, max-pool switches and guided-backprop masks are decided by a
float64 forward pass (``forward_dtype``) wherever float32 could decide otherwise, so that
near-ties do not depend on the CPU's float32 kernels nor on the other images of the batch; the
windowed backward pass runs in the module's dtype. :attr:`Projections.switch_margins` says how
near each map came to a different switch.

One known difference from Captum: Captum rewrites the gradient of a ReLU's *input tensor*, so
where that tensor also feeds another operation (``y = conv(x); out = relu(y) + y``) Captum
applies the rule to the summed gradient of both uses, whereas here it applies to the ReLU's
share only, as the deconvnet defines it. No zoo model has such a pattern.

Coordinates: (row, col) in the pixel grid of the *preprocessed* network input (the tensor
given to the network, e.g. 64x64 for mini-Xception), pixel ``i`` covering ``[i - 0.5, i + 0.5)``;
rows grow downwards. Map them to an original image with the preprocessing's resize factor.
"""

from __future__ import annotations

import math
import sys
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..hooks import (
    BATCHNORM_NODES,
    HookSet,
    Rule,
    check_rules,
    graph_nodes,
    guided_mask,
    is_rule_node,
    refuse_torchscript,
    relu_rule,
)
from ..layers import ReceptiveField, receptive_field, resolve_layer, trace_from_node

Engine = Literal["auto", "windowed", "autograd"]
# Relative max-pool switch margin under which float32 arithmetic may flip a switch (see
# Projections.switch_margins). Measured on the zoo and the sample faces: float32 activations
# differ from float64 ones by 2e-7 to 3e-6 of their channel's maximum, and the switch that
# float32 Captum flipped (mini-Xception block2's pool, "surprise" face: wrong maps, up to
# 1e-1 of their maximum, for block3 and block4 units) had a margin of 8e-8. A conservative flag:
# a deep unit's cone holds thousands of windows, so most deep maps fall below it.
ILL_CONDITIONED_MARGIN = 1e-5
_CPU_TILE = 16 * 2**20  # bytes of the widest gradient of a CPU batch
ExtremumMethod = Literal["centroid", "argmax", "rf"]


@dataclass
class Projections:
    """Projections of the arg-max unit of chosen channels of one layer, for a batch of images.

    Attributes
    ----------
    maps
        (N, K, c, H, W) float: projection of channel ``channels[j]`` of image ``i`` onto the
        preprocessed input; zeros where ``active`` is False.
    units
        (N, K, 2) long: (row, col) of each channel's maximum in the layer's output map.
    values
        (N, K) float: that maximum activation.
    active
        (N, K) bool: the maximum is positive. An inactive channel does not respond to the
        image; projecting an arbitrary unit of it would be meaningless, so its map is zeros.
    channels
        (K,) long: channel indices of the layer, in the order of the K axis.
    layer
        Layer name (dotted path).
    method
        ``"deconvnet"`` or ``"guided_backprop"``.
    receptive_field
        Geometry of the layer's units in input pixels (None when unknown).
    switch_margins
        (N, K) float64: how close the map came to a different max-pool switch. For every
        max-pool window whose output lies in the seed unit's receptive-field cone (all
        channels), the gap between the largest and the second-largest value of the window,
        divided by the largest |window maximum| of that image's channel (the pool's output
        map); the
        smallest such gap over every max-pool between the input and the layer. Windows whose
        two largest values are exactly equal (e.g. zeros after a ReLU) are left out: the
        first-index rule breaks them alike in every precision. ``inf`` when the path has no
        max-pool window with a runner-up; NaN for inactive channels. Measured on the pass
        that decided the switches (float64 wherever float32 was not clear, see
        ``forward_dtype``; a float32 pass's margins are good to a few % of themselves). A
        margin below :data:`ILL_CONDITIONED_MARGIN` means that float32 arithmetic (a
        float32 reference, another CPU, another batch) may pick a different switch and a
        visibly different map; this result does not, as its switches are float64's. The
        cone is rectangular and spans all channels, so this is a lower bound.
    rules
        Layer name -> the rule applied at that module's output, in words, for every module
        between the input and the layer (input first), e.g. ``{"conv1": "transposed
        convolution", "act1": "deconvnet ReLU rule: relu of the backward signal", ...}``.
    """

    maps: torch.Tensor
    units: torch.Tensor
    values: torch.Tensor
    active: torch.Tensor
    channels: torch.Tensor
    layer: str
    method: str
    receptive_field: ReceptiveField | None = None
    switch_margins: torch.Tensor | None = None
    rules: dict[str, str] = field(default_factory=dict)


def deconvnet(
    module: nn.Module,
    inputs: torch.Tensor,
    layer: str | nn.Module,
    channels: int | Sequence[int] | torch.Tensor | None = None,
    *,
    image_batch: int = 64,
    max_memory: int = 512 * 2**20,
    engine: Engine = "auto",
    forward_dtype: torch.dtype | None = torch.float64,
) -> Projections:
    """Deconvnet projection of each channel's arg-max unit, for every image of a batch.

    Parameters
    ----------
    module
        The network (every ReLU must be an ``nn.ReLU`` module, in-place ones included). It is
        run in eval mode; every submodule's ``training`` flag is restored afterwards.
    inputs
        Preprocessed images, (N, c, H, W) float, on any device (the work runs on the
        module's device; results come back on the inputs' device).
    layer
        Layer name (dotted path of ``named_modules()``) or the submodule itself; its output
        must be a (N, C, h, w) tensor.
    channels
        Channel indices (default: all), in the order of the result's K axis.
    image_batch
        Images per forward pass.
    max_memory
        Bytes of working memory per backward batch of seeds (bounds peak memory).
    engine
        ``"windowed"`` (receptive-field windows), ``"autograd"`` (batched autograd, whole
        maps) or ``"auto"`` (windowed when the graph has only operations it knows).
    forward_dtype
        Precision of the forward pass that picks each channel's arg-max unit, the max-pool
        switches and the guided-backprop ReLU masks (default float64: near-tied switches
        then do not depend on the CPU's float32 kernels, nor on which other images share
        the batch). Deconvnet first runs the module's own dtype and keeps the decisions of
        each image whose arg-max units and switches all win by more than 1e-4 (relative;
        float32 errors are ~1e-6), recomputing only the other images in ``forward_dtype``;
        guided backprop (ReLU masks) always runs it. The windowed engine's backward pass runs
        in the module's dtype; the autograd engine runs entirely in the forward pass's dtype.
        None: the module's dtype only (faster on shallow layers; near-ties then depend on the
        CPU and the batch).

    Returns
    -------
    Projections

    Raises
    ------
    interp_fer.hooks.FunctionalReLUError
        When a ReLU between the input and the layer is not an ``nn.ReLU`` module.
    interp_fer.hooks.RuleError
        When another operation between the input and the layer has no rule (Tanh,
        LeakyReLU, ELU, GELU, PReLU, clamp, ``torch.maximum``, ``x * (x > 0)`` ...): the
        message names the layer and the choices. ``nn.ReLU6`` modules get the ReLU rule
        (guided backprop masks with ``0 < input < 6``); BatchNorm without running statistics
        projects each image on its own; GroupNorm and LayerNorm pass the plain gradient.
    TypeError
        For TorchScript modules (they run no Python hooks).

    Notes
    -----
    When the windowed engine does not know an operation of the graph, ``engine="auto"``
    runs the autograd engine and says so once per network and layer (``RuntimeWarning``).
    """
    return project(module, inputs, layer, channels, method="deconvnet", image_batch=image_batch,
                   max_memory=max_memory, engine=engine, forward_dtype=forward_dtype)


def guided_backprop(
    module: nn.Module,
    inputs: torch.Tensor,
    layer: str | nn.Module,
    channels: int | Sequence[int] | torch.Tensor | None = None,
    *,
    image_batch: int = 64,
    max_memory: int = 512 * 2**20,
    engine: Engine = "auto",
    forward_dtype: torch.dtype | None = torch.float64,
) -> Projections:
    """Guided-backprop projection of each channel's arg-max unit (see :func:`deconvnet`)."""
    return project(module, inputs, layer, channels, method="guided_backprop",
                   image_batch=image_batch, max_memory=max_memory, engine=engine,
                   forward_dtype=forward_dtype)


def project(
    module: nn.Module,
    inputs: torch.Tensor,
    layer: str | nn.Module,
    channels: int | Sequence[int] | torch.Tensor | None = None,
    *,
    method: Rule = "deconvnet",
    image_batch: int = 64,
    max_memory: int = 512 * 2**20,
    engine: Engine = "auto",
    forward_dtype: torch.dtype | None = torch.float64,
) -> Projections:
    """Projections with ``method`` = ``"deconvnet"`` or ``"guided_backprop"``.

    See :func:`deconvnet` for the parameters.
    """
    if method not in ("deconvnet", "guided_backprop"):
        raise ValueError(f"method must be 'deconvnet' or 'guided_backprop', not {method!r}")
    if engine not in ("auto", "windowed", "autograd"):
        raise ValueError(f"engine must be 'auto', 'windowed' or 'autograd', not {engine!r}")
    if not isinstance(inputs, torch.Tensor) or inputs.ndim != 4:
        raise ValueError("inputs must be a preprocessed (N, c, H, W) tensor; use "
                         "FERModel.preprocess(images) to make one")
    refuse_torchscript(module, method.replace("_", " "))
    layer_module = resolve_layer(module, layer)
    name = _layer_name(module, layer_module, layer)
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else inputs.device
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() \
        else torch.float32
    field = _receptive_field(module, name, tuple(inputs.shape[1:]))
    parts = []
    # Work outside a caller's inference mode: the backward pass needs a recorded graph.
    with torch.inference_mode(False):
        state = _lazy_forward_state(module, dtype, forward_dtype)
        for chunk in inputs.split(max(1, image_batch)):
            parts.append(_project_chunk(module, layer_module, name, chunk.to(device, dtype),
                                        channels, method, max_memory, engine, state))
    result = Projections(
        *(torch.cat([part[i] for part in parts]).to(inputs.device) for i in range(4)),
        channels=parts[0][4], layer=name, method=method, receptive_field=field,
        switch_margins=torch.cat([part[5] for part in parts]).cpu(), rules=parts[0][6],
    )
    return result


def _lazy_forward_state(module: nn.Module, dtype: torch.dtype, forward_dtype: torch.dtype | None
                        ) -> Callable[[], dict[str, torch.Tensor] | None] | None:
    """A function returning :func:`_forward_state` (made on first call), or None if unneeded.

    Deconvnet often needs no pass in forward_dtype at all (see :func:`_project_chunk`).
    """
    if forward_dtype is not None and not (isinstance(forward_dtype, torch.dtype)
                                          and forward_dtype.is_floating_point):
        raise ValueError(f"forward_dtype must be a floating dtype or None, not {forward_dtype}")
    if forward_dtype is None or forward_dtype == dtype:
        return None
    made: list[dict[str, torch.Tensor] | None] = []

    def state() -> dict[str, torch.Tensor] | None:
        if not made:
            made.append(_forward_state(module, dtype, forward_dtype))
        return made[0]

    return state


def _forward_state(module: nn.Module, dtype: torch.dtype,
                   forward_dtype: torch.dtype | None) -> dict[str, torch.Tensor] | None:
    """The module's floating parameters and buffers in ``forward_dtype`` (None: as they are)."""
    if forward_dtype is None or forward_dtype == dtype:
        return None
    named = [*module.named_parameters(remove_duplicate=False),
             *module.named_buffers(remove_duplicate=False)]
    return {name: value.detach().to(forward_dtype) if value.is_floating_point() else value
            for name, value in named}


def _layer_name(module: nn.Module, layer_module: nn.Module, layer: str | nn.Module) -> str:
    if isinstance(layer, str):
        return layer
    for name, sub in module.named_modules():
        if sub is layer_module and name:
            return name
    raise KeyError(f"{type(layer).__name__} is not a submodule of {type(module).__name__}")


# Receptive fields depend on the architecture only: computed once per (network, layer, shape).
_FIELDS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, ReceptiveField | None]] = \
    weakref.WeakKeyDictionary()


def _receptive_field(module: nn.Module, name: str, shape: tuple[int, ...]) -> ReceptiveField | None:
    known = _FIELDS.setdefault(module, {})
    key = (name, shape)
    if key not in known:
        try:
            with HookSet(module) as hooks, torch.inference_mode(False):
                hooks.eval()  # the HookSet restores every submodule's training flag
                known[key] = receptive_field(module, name, shape)  # type: ignore[arg-type]
        except (ValueError, RuntimeError, TypeError):
            known[key] = None
    return known[key]


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the layer is needed."""


def _forward_to_layer(module: nn.Module, layer: nn.Module, hooks: HookSet, x: torch.Tensor,
                      name: str, state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    captured: list[torch.Tensor] = []

    def capture(_module: nn.Module, _inputs: Any, output: Any) -> None:
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output)
            raise ValueError(f"layer {name!r} must output a (N, C, h, w) tensor, got {shape}")
        # A clone, as Captum does: later in-place operations must not alter the seeded tensor.
        captured.append(output.clone())
        raise _StopForward

    hooks.forward(layer, capture)  # after the ReLU hooks: a ReLU layer's output is replaced
    with torch.inference_mode(False), torch.enable_grad():
        try:
            if state is None:
                module(x)
            else:  # the same module (and hooks), its parameters in the forward dtype
                torch.func.functional_call(module, state, (x,))
        except _StopForward:
            pass
    if not captured:
        raise ValueError(f"layer {name!r} was not called by the forward pass")
    activation = captured[0]
    if activation.grad_fn is None:
        raise ValueError(f"layer {name!r}: its output does not depend on the input")
    return activation


def _channel_index(channels: Any, n_channels: int) -> torch.Tensor:
    if channels is None:
        return torch.arange(n_channels)
    index = torch.as_tensor(channels, dtype=torch.long).flatten()
    if index.numel() == 0:
        raise ValueError("channels is empty")
    bad = index[(index < 0) | (index >= n_channels)]
    if bad.numel():
        raise IndexError(f"channels {bad.tolist()} out of range: the layer has {n_channels}")
    return index


# Relative gap under which a decision of a pass in the module's float32 (arg-max unit, max-pool
# switch) is recomputed in forward_dtype: 30x the largest float32 error of an activation seen on
# the zoo (3e-6 of its channel's maximum), so a float32 decision above it is float64's too.
_CLEAR_GAP = 1e-4


def _project_chunk(module: nn.Module, layer: nn.Module, name: str, images: torch.Tensor,
                   channels: Any, rule: Rule, max_memory: int, engine: Engine,
                   state: Callable[[], dict[str, torch.Tensor] | None] | None):
    """(maps, units, values, active, channels, margins, rules) of a chunk of images.

    With ``state`` (returns the parameters in forward_dtype), deconvnet first runs the module's own
    (faster) float32 pass: an image whose arg-max units and max-pool switches all win by
    more than :data:`_CLEAR_GAP` keeps that pass's decisions, which are then those of the
    float64 pass; the other images are projected again from a pass in forward_dtype.
    Guided backprop also depends on the sign of every ReLU input, so it always runs in
    forward_dtype.
    """
    seen = _UNCLEAR.setdefault(module, {})
    if state is None or rule != "deconvnet" or seen.get(name, False):
        return _project_pass(module, layer, name, images, channels, rule, max_memory, engine,
                             state() if state is not None else None)[:7]
    first = _project_pass(module, layer, name, images, channels, rule, max_memory, engine,
                          None, check=True)
    clear = first[7]
    # Deep layers' cones hold a near-tie in nearly every image: once no image of a chunk
    # was clear, later calls go straight to forward_dtype (the results are the same).
    seen[name] = not bool(clear.any()) and len(clear) > 1
    if bool(clear.all()):
        return first[:7]
    redo = (~clear).nonzero()[:, 0]
    second = _project_pass(module, layer, name, images[redo.to(images.device)], channels, rule,
                           max_memory, engine, state())
    merged = []
    for mine, again in zip(first[:4], second[:4], strict=True):
        mine = mine.clone()
        mine[redo.to(mine.device)] = again.to(mine.dtype)
        merged.append(mine)
    margins = first[5].clone()
    margins[redo.cpu()] = second[5]
    return (*merged, first[4], margins, second[6])


def _project_pass(module: nn.Module, layer: nn.Module, name: str, images: torch.Tensor,
                  channels: Any, rule: Rule, max_memory: int, engine: Engine,
                  state: dict[str, torch.Tensor] | None, check: bool = False):
    """One forward pass and the projections of its active units.

    With ``check``, also returns (N,) bool: the image's decisions are clear (see
    :func:`_project_chunk`); only those images' maps are computed.
    """
    dtype = images.dtype  # of the module: the windowed backward and the results
    if state is not None:
        try:
            x, activation, nodes, names = _forward_graph(module, layer, name, images, rule,
                                                         state)
        except RuntimeError as error:
            if not any(word in str(error) for word in ("Double", "dtype", "scalar type")):
                raise
            warnings.warn(f"{type(module).__name__}: the forward pass cannot run in float64 "
                          f"({error}); max-pool switches and arg-max units of layer {name!r} "
                          "come from a pass in the module's own dtype, so near-ties may "
                          "depend on the CPU and the batch", RuntimeWarning,
                          stacklevel=_caller_level())
            state = None
    if state is None:
        x, activation, nodes, names = _forward_graph(module, layer, name, images, rule, None)
    rules = check_rules(nodes, rule, names, dict(module.named_modules()), f"layer {name!r}")
    if len(images) > 1 and any(type(node).__name__ in BATCHNORM_NODES
                               and bool(node._saved_training) for node in nodes):
        # Batch statistics (BatchNorm without running statistics) would mix the images:
        # each image goes on its own, as a per-image reference computes it.
        parts = [_project_pass(module, layer, name, images[i:i + 1], channels, rule,
                               max_memory, engine, state, check) for i in range(len(images))]
        return (*(torch.cat([part[i] for part in parts]) for i in range(4)), parts[0][4],
                torch.cat([part[5] for part in parts]), parts[0][6],
                torch.cat([part[7] for part in parts]))
    n, n_channels, h, w = activation.shape
    index = _channel_index(channels, n_channels).to(activation.device)
    flat = activation.detach()[:, index].flatten(2)
    position = flat.argmax(dim=2)  # first maximum in row-major order, as Captum users pick
    values = flat.gather(2, position[..., None])[..., 0]
    units = torch.stack([position // w, position % w], dim=-1)
    active = values > 0
    margins = _switch_margins(nodes, activation.grad_fn, (h, w), units, active)
    clear = torch.ones(n, dtype=torch.bool)
    if check:
        clear = _clear_decisions(flat, active, margins)
    todo = active & clear.to(active.device)[:, None]
    maps = x.new_zeros(n, len(index), *x.shape[1:], dtype=dtype).detach()
    missing: list[str] = []
    plan = None if engine == "autograd" else _compile(nodes, x, dtype, missing)
    if plan is None and engine == "windowed":
        raise ValueError(f"layer {name!r}: the graph has operations the windowed engine does "
                         f"not support ({', '.join(missing)}); use engine='auto' or "
                         "'autograd'")
    if plan is None and engine == "auto":
        _say_fallback(module, name, missing)
    if plan is None and x.stride(1) < x.stride(2):  # channels-last strides, even for c = 1
        # Batched autograd (vmap) cannot query the layout of some operations' saved tensors
        # (GroupNorm): run the graph again from a contiguous input.
        x, activation, nodes, names = _forward_graph(module, layer, name, images, rule, state,
                                                     channels_last=False)
    image, slot = todo.nonzero(as_tuple=True)
    with torch.inference_mode(False), torch.no_grad():
        if plan is not None:
            seeds = (image, index[slot], units[image, slot, 0], units[image, slot, 1])
            maps[image, slot] = _run_windowed(plan, seeds, x.shape, max_memory, dtype)
        else:
            _run_autograd(activation, x, index, units, todo, maps, max_memory)
    return (maps.detach(), units, values.detach().to(dtype), active, index.cpu(), margins, rules,
            clear)


def _clear_decisions(flat: torch.Tensor, active: torch.Tensor,
                     margins: torch.Tensor) -> torch.Tensor:
    """(N,) bool: every active map's arg-max and switches win by more than _CLEAR_GAP.

    ``flat``: (N, K, h*w) activations of the chosen channels; ``margins``: (N, K) switch
    margins. The arg-max gap is the largest minus the second-largest activation over the
    largest; a tie, or a positive maximum that is tiny next to the image's others, is not
    clear.
    """
    values = flat.float()
    if values.shape[2] > 1:
        top = values.topk(2, dim=2).values
        gap = (top[..., 0] - top[..., 1]) / top[..., 0].abs().clamp_min(1e-30)
    else:
        top, gap = values, torch.full(values.shape[:2], math.inf, device=values.device)
    largest = top[..., 0].amax(dim=1, keepdim=True)
    faint = top[..., 0] <= _CLEAR_GAP * largest
    unclear = active & ((gap <= _CLEAR_GAP) | faint)
    unclear = unclear.cpu() | (active.cpu() & (margins <= _CLEAR_GAP))
    return ~unclear.any(dim=1)


def _caller_level() -> int:
    """``stacklevel`` of the first frame outside this module: warnings point at the user."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        level, frame = level + 1, frame.f_back
    return level


# Network -> {layer: no image of the last checked chunk had clear float32 decisions}.
_UNCLEAR: weakref.WeakKeyDictionary[nn.Module, dict[str, bool]] = weakref.WeakKeyDictionary()

# Networks (and their layers) already told that they run on the autograd engine.
_FALLBACKS: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


def _say_fallback(module: nn.Module, name: str, missing: list[str]) -> None:
    """Warn once per network and layer that the slower autograd engine runs."""
    told = _FALLBACKS.setdefault(module, set())
    if name in told:
        return
    told.add(name)
    warnings.warn(f"{type(module).__name__}, layer {name!r}: the windowed engine does not "
                  f"support {', '.join(missing) or 'this graph'}; projecting with the autograd "
                  "engine (whole maps, typically 3-10x slower). Pass engine='autograd' to "
                  "silence this.", RuntimeWarning, stacklevel=_caller_level())


def _forward_graph(module: nn.Module, layer: nn.Module, name: str, images: torch.Tensor,
                   rule: Rule, state: dict[str, torch.Tensor] | None, *,
                   channels_last: bool | None = None):
    """(x, layer output, graph nodes from the output to x, {node: module name}) of a pass.

    ``state``: parameters and buffers in the forward dtype (None: the module's own).
    """
    dtype = images.dtype
    if state is not None:
        dtype = next((v.dtype for v in state.values() if v.is_floating_point()), dtype)
    if channels_last is None:
        # Channels-last runs oneDNN's faster float32 CPU convolutions; float64 ones are
        # faster in the default layout.
        channels_last = dtype in (torch.float32, torch.bfloat16, torch.float16)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    names: dict[Any, str] = {}

    def remember(sub_name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.grad_fn is not None:
                names.setdefault(output.grad_fn, sub_name)  # innermost module first
        return hook

    with HookSet(module) as hooks:
        hooks.eval()
        relu_rule(hooks, module, rule)
        for sub_name, sub in module.named_modules():
            if sub_name:
                hooks.forward(sub, remember(sub_name))  # after the ReLU rule's hooks
        with torch.inference_mode(False):
            x = images.detach().to(dtype).clone(memory_format=layout).requires_grad_(True)
        activation = _forward_to_layer(module, layer, hooks, x, name, state)
    return x, activation, graph_nodes(activation.grad_fn, x), names


# --------------------------------------------------------------------------------------------
# Switch margins: how close each map came to a different max-pool switch (see Projections).


def _switch_margins(nodes: list[Any], root: Any, extent: tuple[int, int], units: torch.Tensor,
                    active: torch.Tensor) -> torch.Tensor:
    """(N, K) float64 smallest relative switch margin in each seed's cone (CPU tensor).

    ``root``: the layer output's grad_fn; ``extent``: its (h, w); ``units``: (N, K, 2).
    """
    n, k = units.shape[:2]
    margin = torch.full((n, k), math.inf, dtype=torch.float64)
    units = units.cpu()
    image = torch.arange(n)[:, None].expand(n, k)
    for node in nodes:
        if type(node).__name__ != "MaxPool2DWithIndicesBackward0":
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


def _pool_params(node: Any) -> tuple[tuple[int, int], ...]:
    """(kernel, stride, padding, dilation) of a max-pool node, each as (rows, cols)."""
    def pair(values: Any) -> tuple[int, int]:
        values = tuple(int(v) for v in values)
        return (values[0], values[-1])

    kernel = pair(node._saved_kernel_size)
    return kernel, pair(node._saved_stride or kernel), pair(node._saved_padding), \
        pair(node._saved_dilation)


def _pool_window_margins(node: Any, budget: int = 32 * 2**20) -> torch.Tensor:
    """(N, ho, wo) float64: per output position, the smallest relative gap over channels.

    The gap of a window is its largest minus its second-largest value, over the largest
    |window maximum| of the (image, channel) map; inf for exact ties and windows with one
    value.
    """
    x = node._saved_self.detach()
    kernel, stride, padding, dilation = _pool_params(node)
    ho, wo = node._saved_result1.shape[2:]
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


# --------------------------------------------------------------------------------------------
# Batched autograd engine (any graph): one row of seeds per channel, all images at once.


def _run_autograd(activation: torch.Tensor, x: torch.Tensor, index: torch.Tensor,
                  units: torch.Tensor, active: torch.Tensor, maps: torch.Tensor,
                  max_memory: int) -> None:
    n = activation.shape[0]
    # A row of seeds goes backward through every image: budget the largest map, 4 copies.
    per_row = 4 * n * _largest_map(activation.grad_fn) * activation.element_size()
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


def _largest_map(root: Any) -> int:
    largest = 1
    for node in graph_nodes(root):
        for meta in getattr(node, "_input_metadata", ()):
            largest = max(largest, math.prod(meta.shape[1:]))
    return largest


# --------------------------------------------------------------------------------------------
# Windowed engine: an interpreter of the autograd graph that follows each seed's cone.
#
# A gradient is a _Win: data (B, C, sh, sw) for B seeds, and per seed the (row, col) of
# data[..., 0, 0] in the node's map ("virtual": may lie outside the map; values there are 0,
# or to be zeroed, see _Win.dirty). An axis that covers the whole map is "full" (offset 0 for
# every seed, size = the map's). Seeds of any images share a batch: per-image tensors (pool
# switches, guided-backprop masks) are read at each seed's image and window.


@dataclass
class _Win:
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


def _clean(win: _Win) -> _Win:
    """Zero the window positions outside the map (see :attr:`_Win.dirty`)."""
    if win.dirty is None:
        return win
    inside = _inside(win, win.dirty)
    if inside is None:
        return replace(win, dirty=None)
    if win.shared:
        return replace(win, data=win.data * inside, dirty=None, shared=False)
    return replace(win, data=win.data.mul_(inside), dirty=None)


@dataclass
class _Step:
    node: Any
    apply: Callable[[_Win, torch.Tensor], list[_Win | None]]
    children: list[Any]  # one per output of apply; None = not on a path to the input


def _meta_shape(node: Any, index: int) -> tuple[int, ...]:
    return tuple(node._input_metadata[index].shape)


def _compile(nodes: list[Any], x: torch.Tensor, dtype: torch.dtype,
             missing: list[str] | None = None) -> list[_Step] | None:
    """Translate the graph into windowed steps, or None if some node is not supported.

    The steps compute in ``dtype`` whatever the dtype of the recorded forward pass; the
    kinds of unsupported nodes are appended to ``missing``.
    """
    relevant = set(nodes)
    try:
        edges = {node: [(child, i) if child in relevant else (None, i)
                        for child, i in node.next_functions] for node in nodes}
        folded = _fold_batchnorms(nodes, edges)
        steps = []
        for node in nodes:
            if getattr(node, "variable", None) is x:
                continue
            shapes = [_meta_shape(c, i) if c is not None else None for c, i in edges[node]]
            if node in folded and not isinstance(folded[node], torch.Tensor):
                apply = _identity  # a BatchNorm folded into the convolution below it
            else:
                apply = _handler(node, shapes, dtype, folded.get(node))
            if apply is None:
                if missing is not None:
                    missing.append(type(node).__name__)
                return None
            steps.append(_Step(node, apply, [c for c, _ in edges[node]]))
    except (AttributeError, RuntimeError, TypeError, IndexError) as error:  # private API
        if missing is not None:
            missing.append(f"{type(error).__name__}: {error}")
        return None
    return steps


def _identity(win: _Win, img: torch.Tensor) -> list[_Win | None]:
    return [win]


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
        if type(node).__name__ not in _BATCHNORMS:
            continue
        scale = _batchnorm_scale(node)
        children = [child for child, _ in edges[node] if child is not None]
        if scale is None or len(children) != 1:
            continue
        child = children[0]
        if type(child).__name__ == "ConvolutionBackward0" and parents.get(child) == 1 \
                and not child._saved_transposed:
            folded[node] = True
            folded[child] = scale.view(-1)
    return folded


_BATCHNORMS = ("NativeBatchNormBackward0", "CudnnBatchNormBackward0")


def _handler(node: Any, shapes: list[tuple[int, ...] | None], dtype: torch.dtype,
             scale: torch.Tensor | None = None):
    kind = type(node).__name__
    used = [s for s in shapes if s is not None]
    if any(len(s) != 4 for s in used):
        return None
    if kind in ("CloneBackward0", "AliasBackward0"):
        return _identity
    if kind in ("AddBackward0", "SubBackward0"):
        out = tuple(node._input_metadata[0].shape)
        if any(tuple(s) != out for s in used):
            return None  # broadcasting
        alpha = float(node._saved_alpha) * (-1 if kind == "SubBackward0" else 1)
        if alpha == 1:
            return lambda win, img: [replace(win, shared=True), replace(win, shared=True)]
        return lambda win, img: [win, replace(win, data=win.data * alpha, shared=False)]
    if is_rule_node(node):
        return _relu_handler(node)
    if kind == "ConvolutionBackward0":
        return _conv_handler(node, shapes[0], scale, dtype)
    if kind == "MaxPool2DWithIndicesBackward0":
        return _pool_handler(node, shapes[0])
    if kind in _BATCHNORMS:
        scale = _batchnorm_scale(node)
        if scale is None:
            return None
        scale = scale.to(dtype)
        return lambda win, img: [replace(win, data=win.data * scale)]
    if kind == "ConstantPadNdBackward0":
        return _constant_pad_handler(node, shapes[0])
    if kind in ("ReflectionPad2DBackward0", "ReplicationPad2DBackward0"):
        return _fold_pad_handler(node, shapes[0], kind.startswith("Reflection"))
    return None


def _relu_handler(node: Any):
    if not node.guided:
        return lambda win, img: [replace(win, data=_relu(win), shared=False)]
    (saved,) = node.saved_tensors
    positive = _channels_last_source(guided_mask(saved, node.upper))

    def guided(win: _Win, img: torch.Tensor) -> list[_Win | None]:
        mask = _gather_window(positive, img, win).permute(0, 3, 1, 2)
        return [replace(win, data=_relu(win).mul_(mask), shared=False)]

    return guided


def _relu(win: _Win) -> torch.Tensor:
    # In place where no other gradient holds the data: one memory pass fewer.
    return torch.relu(win.data) if win.shared else win.data.relu_()


def _conv_handler(node: Any, shape: tuple[int, ...] | None, scale: torch.Tensor | None,
                  dtype: torch.dtype):
    if shape is None or node._saved_transposed or len(node._saved_stride) != 2:
        return None
    weight = node._saved_weight.detach()
    if scale is not None:  # BatchNorm after this convolution, folded into its output channels
        weight = weight * scale.view(-1, 1, 1, 1)
    weight = weight.to(dtype)
    stride, padding = tuple(node._saved_stride), tuple(node._saved_padding)
    dilation, groups = tuple(node._saved_dilation), int(node._saved_groups)
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

    def conv(win: _Win, img: torch.Tensor) -> list[_Win | None]:
        if not pointwise:
            win = _clean(win)
        if win.hot is not None and groups == 1 and dilation == (1, 1):
            # A single unit (the seed): its transposed convolution is a copy of its kernel.
            value = win.data.flatten(1).gather(1, win.hot[:, None])
            out = weight.index_select(0, win.hot) * value[:, :, None, None]
            off = win.off * np.array(stride) - np.array(padding)
            return [_fit(out.contiguous(memory_format=torch.channels_last), off, win.full,
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
                return [_Win(out[:, :, top:top + extent[0], left:left + extent[1]], win.off,
                             win.full)]
        data = win.data.contiguous(memory_format=torch.channels_last)
        if all(win.full):
            # Whole maps: the convolution crops the padding itself.
            if flipped is not None and all(reach[a] >= padding[a] for a in range(2)):
                pads = tuple(reach[a] - padding[a] for a in range(2))
                out = _conv(data, flipped, pads, dilation, groups)
                if tuple(out.shape[2:]) == tuple(extent):
                    return [_Win(out, win.off, win.full)]
            sizes = [(data.shape[2 + a] - 1) * stride[a] - 2 * padding[a] + reach[a] + 1
                     for a in range(2)]
            extra = [extent[a] - sizes[a] for a in range(2)]
            if all(0 <= e < max(stride[a], dilation[a]) for a, e in enumerate(extra)):
                out = F.conv_transpose2d(data, weight, None, stride, padding, extra, groups,
                                         dilation)
                return [_Win(out, win.off, win.full)]
        if flipped is not None:
            out = _conv(data, flipped, tuple(reach), dilation, groups)
        else:
            out = F.conv_transpose2d(data, weight, None, stride, 0, 0, groups, dilation)
        off = win.off * np.array(stride) - np.array(padding)
        out = _fit(out, off, win.full, extent)
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


def _pool_handler(node: Any, shape: tuple[int, ...] | None):
    if shape is None:
        return None
    indices = _channels_last_source(node._saved_result1)  # (N, h, w, C) flat input positions
    kernel = tuple(node._saved_kernel_size) * (2 // len(node._saved_kernel_size))
    stride = tuple(node._saved_stride or kernel) * (2 // len(node._saved_stride or kernel))
    padding = tuple(node._saved_padding) * (2 // len(node._saved_padding))
    dilation = tuple(node._saved_dilation) * (2 // len(node._saved_dilation))
    ceil_mode = bool(node._saved_ceil_mode)
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

    def pool(win: _Win, img: torch.Tensor) -> list[_Win | None]:
        win = _clean(win)
        b, c, sh, sw = win.data.shape
        if all(win.full):
            # Whole maps: the native max-pool backward (a parallel scatter of each value to
            # its switch), run on channels-last tensors, is twice as fast as scatter_add_.
            like = torch.empty((b, c, *extent), dtype=win.data.dtype, device=win.data.device,
                               memory_format=torch.channels_last)
            out = torch.ops.aten.max_pool2d_with_indices_backward(
                win.data.contiguous(memory_format=torch.channels_last), like, kernel, stride,
                padding, dilation, ceil_mode, _gather_window(indices, img, win).permute(0, 3, 1, 2))
            return [_Win(out, win.off, (True, True))]
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
        flat = _gather_window(switches_in_windows(sizes[1]), img, win) \
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
        return [_Win(out, off, (full[0], full[1]))]

    return pool


def _channels_last_source(tensor: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> contiguous (N, h, w, C), the layout :func:`_gather_window` reads."""
    return tensor.detach().permute(0, 2, 3, 1).contiguous()


def _batchnorm_scale(node: Any) -> torch.Tensor | None:
    """(1, C, 1, 1) gradient scale of an eval-mode BatchNorm; None in training mode."""
    if bool(getattr(node, "_saved_training", True)):
        return None  # batch statistics mix the images of a batch
    eps = float(getattr(node, "_saved_eps", getattr(node, "_saved_epsilon", 1e-5)))
    var = node._saved_running_var
    if var is None:
        return None
    scale = torch.rsqrt(var.detach() + eps)
    if node._saved_weight is not None:
        scale = scale * node._saved_weight.detach()
    return scale.view(1, -1, 1, 1)


def _constant_pad_handler(node: Any, shape: tuple[int, ...] | None):
    # Negative pads (crops) come back as unsigned 64-bit integers.
    pad = tuple(int(v) - 2**64 if int(v) >= 2**63 else int(v) for v in node._saved_pad)
    if shape is None or len(pad) > 4 and any(pad[4:]):
        return None
    left = pad[0]
    top = pad[2] if len(pad) > 2 else 0
    before = np.array([top, left])
    extent = shape[2:]

    def crop(win: _Win, img: torch.Tensor) -> list[_Win | None]:
        if min(pad) < 0:  # the input map is larger: positions outside the output matter
            win = _clean(win)
        out = _fit(win.data, win.off - before, win.full, extent)
        if win.dirty is not None and out.dirty is None and not all(out.full):
            out.dirty = (extent[0], extent[1])
        if out.data.shape[2:] == (1, 1):
            out.hot = win.hot
        out.shared = win.shared  # a crop is a view of the same data
        return [out]

    return crop


def _fold_pad_handler(node: Any, shape: tuple[int, ...] | None, reflect: bool):
    if shape is None:
        return None
    left, right, top, bottom = tuple(node._saved_padding)
    extent = shape[2:]

    def fold(win: _Win, img: torch.Tensor) -> list[_Win | None]:
        for axis, before, after in ((0, top, bottom), (1, left, right)):
            win = _fold_axis(win, axis, before, after, extent[axis], reflect)
        return [replace(win, dirty=None)]  # each axis zeroed what lies outside the map

    return fold


# ---------------------------------------------------------------------------- window algebra


def _fit(data: torch.Tensor, off: np.ndarray, full: tuple[bool, bool],
         extent: Sequence[int]) -> _Win:
    """Bring data with virtual offsets into a node's map of size ``extent``.

    Axes that cover the map become full maps; others stay windows, marked dirty when some
    of their positions fall outside the map (see :func:`_clean`).
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
                data = _slice_axis(data, axis, -int(column[0]), extent[axis])
            else:
                data = _shift_axis(data, axis, -column, extent[axis])
            off[:, axis] = 0
            flags[axis] = True
        elif (column < 0).any() or (column + size > extent[axis]).any():
            dirty = True
    return _Win(data, off, (flags[0], flags[1]), dirty=(extent[0], extent[1]) if dirty else None)


def _slice_axis(data: torch.Tensor, axis: int, start: int, size: int) -> torch.Tensor:
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


def _shift_axis(data: torch.Tensor, axis: int, delta: np.ndarray, size: int) -> torch.Tensor:
    """result[b, ..., t] = data[b, ..., t + delta[b]] (zero outside), per-seed shifts."""
    if delta.min() == delta.max():
        return _slice_axis(data, axis, int(delta[0]), size)
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


def _gather_window(source: torch.Tensor, img: torch.Tensor, win: _Win) -> torch.Tensor:
    """Per-image tensor (N, h, w, C) read at each seed's window: (B, sh, sw, C)."""
    b, _, sh, sw = win.data.shape
    if all(win.full):
        return source.index_select(0, img)
    h, w = source.shape[1:3]
    rows = torch.from_numpy(np.clip(win.off[:, :1] + np.arange(sh), 0, h - 1)).to(img.device)
    cols = torch.from_numpy(np.clip(win.off[:, 1:] + np.arange(sw), 0, w - 1)).to(img.device)
    return source[img[:, None, None], rows[:, :, None], cols[:, None, :]]


def _inside(win: _Win, extent: Sequence[int]) -> torch.Tensor | None:
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


def _fold_axis(win: _Win, axis: int, before: int, after: int, extent: int,
               reflect: bool) -> _Win:
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
            whole = _shift_axis(win.data, axis, -win.off[:, axis], before + extent + after)
            off = win.off.copy()
            off[:, axis] = 0
            full = list(win.full)
            full[axis] = True
            return _fold_whole(_Win(whole, off, (full[0], full[1])), axis, before, after,
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
    return _Win(out, off, win.full)


def _fold_whole(win: _Win, axis: int, before: int, after: int, extent: int,
                reflect: bool) -> _Win:
    """:func:`_fold_axis` for a whole padded axis (size before + extent + after)."""
    dim = 2 + axis
    data = win.data
    out = data.narrow(dim, before, extent).clone()
    for x in range(-before, 0):
        target = -x if reflect else 0
        out.narrow(dim, target, 1).add_(data.narrow(dim, x + before, 1))
    for x in range(extent, extent + after):
        target = 2 * (extent - 1) - x if reflect else extent - 1
        out.narrow(dim, target, 1).add_(data.narrow(dim, x + before, 1))
    return _Win(out, win.off, win.full)


def _accumulate(a: _Win, b: _Win, extent: Sequence[int]) -> _Win:
    """Sum of two gradients of the same node (e.g. both branches of a residual block)."""
    if a.off.shape == b.off.shape and a.full == b.full and a.data.shape == b.data.shape \
            and (a.off == b.off).all():
        # Same window: what lies outside the map is summed with what lies outside the map.
        dirty = a.dirty or b.dirty
        if a.shared or a.data.data_ptr() == b.data.data_ptr():
            return _Win(a.data + b.data, a.off, a.full, dirty=dirty)
        return _Win(a.data.add_(b.data), a.off, a.full, dirty=dirty)
    a, b = _clean(a), _clean(b)
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
            data = _shift_axis(data, axis, off[:, axis] - win.off[:, axis], sizes[axis])
        total = data if total is None else total + data
    return _Win(total, off, (flags[0], flags[1]))


def _run_windowed(plan: list[_Step], seeds: tuple[torch.Tensor, ...], input_shape: torch.Size,
                  max_memory: int, dtype: torch.dtype) -> torch.Tensor:
    image, channel, row, col = seeds
    total = len(image)
    root = plan[0].node
    out_shape = _meta_shape(root, 0)
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
    seed = _fit(data, off, (False, False), out_shape[2:])
    seed.hot = channel
    pending: dict[Any, _Win] = {plan[0].node: seed}
    extents: dict[Any, tuple[int, int]] = {}
    peak = seed.data.numel() * seed.data.element_size()
    result: _Win | None = None
    for step in plan:
        win = pending.pop(step.node, None)
        if win is None:
            continue
        for child, grad in zip(step.children, step.apply(win, image), strict=False):
            if child is None or grad is None:
                continue
            peak = max(peak, grad.data.numel() * grad.data.element_size())
            if getattr(child, "variable", None) is not None:
                result = grad if result is None else _accumulate(result, grad, input_shape[2:])
                continue
            if child in pending:
                extent = extents.setdefault(child, tuple(_meta_shape(child, 0)[2:]))
                pending[child] = _accumulate(pending[child], grad, extent)
            else:
                pending[child] = grad
    if result is None:
        return torch.zeros(b, *input_shape[1:], device=image.device, dtype=dtype), peak
    result = _clean(result)
    data = result.data  # full axes already span the input; place the windowed ones
    for axis in range(2):
        if not result.full[axis]:
            data = _shift_axis(data, axis, -result.off[:, axis], input_shape[2 + axis])
    return data, peak


# --------------------------------------------------------------------------------------------
# Extremum points


def extremum_points(
    projections: Projections | torch.Tensor,
    method: ExtremumMethod = "centroid",
    *,
    top: float = 0.01,
) -> torch.Tensor:
    """Location of each projection in input pixels: (N, K, 2) float (row, col).

    Parameters
    ----------
    projections
        A :class:`Projections`, or maps (N, K, c, H, W) for ``"centroid"`` / ``"argmax"``.
    method
        ``"centroid"`` (default): energy-weighted centroid of e = sum over input channels of
        |map|, restricted to its strongest pixels: those with e >= the ``ceil(top * H * W)``-th
        largest value (ties included) and e > 0. ``"argmax"``: the pixel of largest e (first in
        row-major order). ``"rf"``: the receptive-field centre of the channel's arg-max unit
        (no projection needed; can lie outside the image for padded layers).
    top
        Share of the input pixels kept by ``"centroid"``.

    Returns
    -------
    torch.Tensor
        (N, K, 2) float64 (row, col) in the preprocessed input's pixel grid (pixel i covers
        [i - 0.5, i + 0.5)); NaN for inactive channels (all-zero maps).
    """
    if method == "rf":
        if not isinstance(projections, Projections) or projections.receptive_field is None:
            raise ValueError("method='rf' needs a Projections whose layer has a known "
                             "receptive field")
        return rf_centres(projections)
    maps = projections.maps if isinstance(projections, Projections) else projections
    if maps.ndim != 5:
        raise ValueError(f"maps must be (N, K, c, H, W), got {tuple(maps.shape)}")
    energy = maps.detach().abs().sum(dim=2)  # (N, K, H, W)
    n, k, h, w = energy.shape
    flat = energy.flatten(2)
    if method == "argmax":
        position = flat.argmax(dim=2)
        points = torch.stack([position // w, position % w], dim=-1).double()
    elif method == "centroid":
        if not 0 < top <= 1:
            raise ValueError(f"top must be in (0, 1], got {top}")
        points = _top_centroids(flat, max(1, math.ceil(top * h * w)), w)
    else:
        raise ValueError(f"method must be 'centroid', 'argmax' or 'rf', not {method!r}")
    empty = flat.amax(dim=2) <= 0
    return points.masked_fill(empty[..., None], float("nan")).cpu()


def _top_centroids(flat: torch.Tensor, keep: int, width: int) -> torch.Tensor:
    """(N, K, 2) float64 centroid of the positive values >= the ``keep``-th largest.

    Sums over the ``keep`` largest values only; rows where more values tie with the
    threshold (a positive one) are summed over their whole map.
    """
    values, index = flat.topk(keep, dim=2)
    weight = values.clamp_min(0).double()
    rows, cols = (index // width).double(), (index % width).double()
    points = torch.stack([(weight * rows).sum(2), (weight * cols).sum(2)], -1) \
        / weight.sum(2)[..., None]
    threshold = values[..., -1:]
    tied = (((flat >= threshold).sum(2) > keep) & (threshold[..., 0] > 0)).nonzero(as_tuple=True)
    if len(tied[0]):
        some = flat[tied].double()
        weight = torch.where(some >= threshold[tied].double(), some, 0.0)
        position = torch.arange(some.shape[1], device=flat.device)
        rows, cols = (position // width).double(), (position % width).double()
        points[tied] = torch.stack([(weight * rows).sum(1), (weight * cols).sum(1)], -1) \
            / weight.sum(1)[:, None]
    return points


def rf_centres(projections: Projections) -> torch.Tensor:
    """Receptive-field centre of each channel's arg-max unit: (N, K, 2) float64 (row, col)."""
    field = projections.receptive_field
    if field is None:
        raise ValueError(f"layer {projections.layer!r}: receptive field unknown")
    units = projections.units.double().cpu()
    rows, cols = field.centre(units[..., 0], units[..., 1])
    points = torch.stack([rows, cols], dim=-1)
    return points.masked_fill(~projections.active.cpu()[..., None], float("nan"))


@dataclass
class Agreement:
    """How often the receptive-field centre agrees with the projection's extremum point.

    Attributes
    ----------
    rate
        Share of active (image, channel) pairs whose two points are within ``threshold``.
    distances
        (N, K) Euclidean distance in input pixels (NaN for inactive channels).
    threshold
        Distance in input pixels under which the two points agree.
    count
        Number of active pairs the rate is computed on.
    """

    rate: float
    distances: torch.Tensor
    threshold: float
    count: int


def rf_agreement(projections: Projections, threshold: float | None = None, *,
                 method: ExtremumMethod = "centroid", top: float = 0.01) -> Agreement:
    """Share of (image, channel) pairs where the cheap receptive-field centre is right.

    Parameters
    ----------
    projections
        Result of :func:`deconvnet` (or :func:`guided_backprop`).
    threshold
        Agreement distance in input pixels (Euclidean, inclusive). Default: half the
        layer's receptive-field stride, at least 1 pixel, i.e. the projection's point lies in
        the feature-map cell that the arg-max unit stands for.
    method, top
        How the projection's point is computed (see :func:`extremum_points`).
    """
    field = projections.receptive_field
    if field is None:
        raise ValueError(f"layer {projections.layer!r}: receptive field unknown")
    if threshold is None:
        threshold = max(1.0, 0.5 * max(field.rows.stride, field.cols.stride))
    centre = rf_centres(projections)
    point = extremum_points(projections, method, top=top)
    distances = (centre - point).norm(dim=-1)
    known = ~torch.isnan(distances)
    count = int(known.sum())
    rate = float((distances[known] <= threshold).double().mean()) if count else float("nan")
    return Agreement(rate, distances, float(threshold), count)
