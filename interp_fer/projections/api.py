"""The projection API: :func:`deconvnet`, :func:`guided_backprop`, :func:`project`.

One forward pass per chunk of images picks each channel's arg-max unit and records the
autograd graph; the rules are checked (:func:`interp_fer.hooks.check_rules`); then the
windowed engine (:mod:`.windowed_engine`) runs the backward pass when every node of the
graph has a handler, the autograd engine (:mod:`.autograd_engine`) otherwise (said once per
network and layer). See :mod:`interp_fer.projections` for the definitions.
"""

from __future__ import annotations

import math
import sys
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..autograd_graph import BATCHNORM_KINDS, batchnorm_params, graph_nodes, node_kind
from ..hooks import HookSet, Rule, check_rules, refuse_torchscript, relu_rule
from ..layers import ReceptiveField, receptive_field, resolve_layer
from .autograd_engine import run_autograd
from .margins import ILL_CONDITIONED_MARGIN, switch_margins
from .windowed_engine import compile_plan, run_windowed

Engine = Literal["auto", "windowed", "autograd"]
__all__ = ["ILL_CONDITIONED_MARGIN", "Engine", "Projections", "deconvnet", "guided_backprop",
           "project"]


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
    if len(images) > 1 and any(node_kind(node) in BATCHNORM_KINDS
                               and bool(batchnorm_params(node).training) for node in nodes):
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
    margins = switch_margins(nodes, activation.grad_fn, (h, w), units, active)
    clear = torch.ones(n, dtype=torch.bool)
    if check:
        clear = _clear_decisions(flat, active, margins)
    todo = active & clear.to(active.device)[:, None]
    maps = x.new_zeros(n, len(index), *x.shape[1:], dtype=dtype).detach()
    missing: list[str] = []
    plan = None if engine == "autograd" else compile_plan(nodes, x, dtype, missing)
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
            maps[image, slot] = run_windowed(plan, seeds, x.shape, max_memory, dtype)
        else:
            run_autograd(activation, x, index, units, todo, maps, max_memory)
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
    """``stacklevel`` of the first frame outside this package: warnings point at the user."""
    package = __name__.rpartition(".")[0]
    level, frame = 1, sys._getframe(1)
    while frame is not None and (frame.f_globals.get("__name__") or "").startswith(package):
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
