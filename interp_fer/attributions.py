"""Captum attribution methods behind one call, for a class or a channel-max target.

:func:`attribute` runs one of :data:`METHODS` on a batch of preprocessed images and returns
raw attributions (N, c, H, W), in the layout of the input, whatever the method:

============================  =============================================================
``"saliency"``                Captum ``Saliency`` (default ``abs=True``: |gradient|)
``"integrated_gradients"``    Captum ``IntegratedGradients`` (baseline 0 = mid-gray for the
                              zoo models, whose pixels are scaled to [-1, 1])
``"guided_backprop"``         Captum ``GuidedBackprop``
``"deconvolution"``           Captum ``Deconvolution``
``"gradcam"``                 Captum ``LayerGradCam`` on ``layer``, bilinearly upsampled to
                              the input and repeated over its channels
``"occlusion"``               Captum ``Occlusion`` (baseline 0; window ~1/8 of the side)
============================  =============================================================

A *target* says which scalar per image is explained: a class (int, one int per image, or
:class:`ClassTarget`), the maximum of one channel of a layer (:class:`ChannelMax`), or any
callable mapping the network output (N, n_classes) to (N,). Values are raw: no per-image
scaling, so magnitudes stay comparable across images and methods; :func:`display_scale`
normalises for display only.

Every method runs the network in eval mode and restores each submodule's ``training`` flag;
hooks live only for the call, also when it raises. Guided backprop and deconvolution raise
:class:`~interp_fer.hooks.FunctionalReLUError` when the network applies a ReLU functionally,
instead of silently returning a plain gradient for it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .hooks import HookSet, check_module_relus
from .layers import resolve_layer

Method = Literal["saliency", "integrated_gradients", "guided_backprop", "deconvolution",
                 "gradcam", "occlusion"]
METHODS: tuple[str, ...] = ("saliency", "integrated_gradients", "guided_backprop",
                            "deconvolution", "gradcam", "occlusion")


def _network_and_inputs(model: Any, inputs: Any, crop: str = "none") -> tuple[nn.Module, Any]:
    """The ``nn.Module`` of ``model`` (itself or a FERModel's) and tensor inputs."""
    from .models import FERModel

    if isinstance(model, FERModel):
        if not isinstance(inputs, torch.Tensor):
            images = list(inputs)
            if crop != "none":
                from .face_crops import FacePipeline

                images = FacePipeline(crop, model.input_size)(images)
            inputs = model.preprocess(images).to(model.device)
        return model.module, inputs
    if not isinstance(model, nn.Module):
        raise TypeError(f"attribute needs an nn.Module or a FERModel, not {type(model).__name__}")
    return model, inputs


class ClassTarget:
    """Target: the logit of a class (one index for all images, or one per image).

    Parameters
    ----------
    index
        Class index, or a sequence of N indices.
    """

    def __init__(self, index: int | Sequence[int] | torch.Tensor) -> None:
        self.index = index

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        """(N, n_classes) network output -> (N,) selected logits."""
        if isinstance(self.index, int):
            return output[:, self.index]
        index = torch.as_tensor(self.index, device=output.device).long().view(-1, 1)
        return output.gather(1, index.expand(output.shape[0], 1) if index.numel() == 1
                             else index)[:, 0]

    def __repr__(self) -> str:
        return f"ClassTarget({self.index!r})"


class ChannelMax:
    """Target: the maximum of channel ``channel`` of ``layer`` (value of its arg-max unit).

    The arg-max unit is the first maximum in row-major order, as in
    :func:`interp_fer.projections.deconvnet`, so the gradient flows from that unit alone and
    guided backprop / deconvolution with this target reproduce the projections.

    Parameters
    ----------
    layer
        Layer name (dotted path) or submodule; its output must be (N, C, h, w).
    channel
        Channel index.
    """

    def __init__(self, layer: str | nn.Module, channel: int) -> None:
        self.layer = layer
        self.channel = int(channel)

    def of(self, activation: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) layer output -> (N,) value of the channel's arg-max unit."""
        flat = activation[:, self.channel].flatten(1)
        return flat.gather(1, flat.detach().argmax(dim=1, keepdim=True))[:, 0]

    def __repr__(self) -> str:
        return f"ChannelMax({self.layer!r}, {self.channel})"


Target = int | Sequence[int] | torch.Tensor | ClassTarget | ChannelMax | Callable[
    [torch.Tensor], torch.Tensor]


class _Explained(nn.Module):
    """The network followed by its target.

    Class targets are left to Captum (it repeats them over the internal batches of
    integrated gradients and occlusion), so forward returns the logits and
    :attr:`captum_target` holds the indices. Other targets are applied here: forward returns
    one value per image. Captum's ReLU hooks reach the network's ``nn.ReLU`` modules through
    this wrapper. A :class:`ChannelMax` reads the layer's output through a hook of ``hooks``.
    """

    def __init__(self, network: nn.Module, target: Target, hooks: HookSet) -> None:
        super().__init__()
        self.network = network
        self.captum_target: int | list[int] | None = None
        self._select: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._activation: list[torch.Tensor] = []
        if isinstance(target, ClassTarget):
            target = target.index
        if isinstance(target, ChannelMax):
            layer = resolve_layer(network, target.layer)
            hooks.forward(layer, lambda _m, _i, out: self._activation.append(out))
            self._select = self._channel_max(target)
        elif isinstance(target, (int, np.integer)):
            self.captum_target = int(target)
        elif isinstance(target, (Sequence, torch.Tensor, np.ndarray)):
            self.captum_target = [int(i) for i in torch.as_tensor(target).flatten().tolist()]
        elif callable(target):
            self._select = target
        else:
            raise TypeError(f"unsupported target {target!r}: give a class index, a sequence "
                            "of indices, ClassTarget, ChannelMax or a callable")

    def _channel_max(self, target: ChannelMax) -> Callable[[torch.Tensor], torch.Tensor]:
        def select(_output: torch.Tensor) -> torch.Tensor:
            activation = self._activation.pop()
            self._activation.clear()
            if activation.ndim != 4:
                raise ValueError(f"layer {target.layer!r} must output (N, C, h, w) for "
                                 f"ChannelMax, got {tuple(activation.shape)}")
            return target.of(activation)

        return select

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.network(x)
        if self._select is None:
            return output
        values = self._select(output)
        if values.ndim != 1 or values.shape[0] != x.shape[0]:
            raise ValueError(f"the target must give one value per image, (N,) = "
                             f"({x.shape[0]},); got {tuple(values.shape)}")
        return values


def attribute(
    module: nn.Module | Any,
    inputs: torch.Tensor | Sequence[np.ndarray],
    target: Target,
    method: Method = "saliency",
    *,
    layer: str | nn.Module | None = None,
    crop: str = "none",
    **options: Any,
) -> torch.Tensor:
    """Attribution of ``target`` to the input pixels with one of :data:`METHODS`.

    Parameters
    ----------
    module
        The network, taking preprocessed (N, c, H, W) input, or a loaded
        :class:`interp_fer.models.FERModel` (its network is used).
    inputs
        Preprocessed images, (N, c, H, W) float; with a ``FERModel``, also raw face images
        (a sequence of uint8 (H, W) or (H, W, 3) arrays), preprocessed by the model.
    target
        A class index, one index per image, :class:`ClassTarget`, :class:`ChannelMax`, or a
        callable from the network output (N, n_classes) to (N,).
    method
        One of :data:`METHODS`.
    layer
        For ``"gradcam"``: the convolutional layer whose activations are weighted.
    crop
        With a ``FERModel`` and raw images: ``"none"`` feeds them whole; ``"auto"`` or
        ``"face"`` passes photos through the face pipeline first (:mod:`interp_fer.face_crops`),
        so the attributions are on the aligned face crop the network saw.
    **options
        Passed to the Captum ``attribute`` call (e.g. ``abs=False`` for saliency,
        ``n_steps``, ``baselines``, ``internal_batch_size`` for integrated gradients,
        ``sliding_window_shapes``, ``strides`` for occlusion, ``relu_attributions`` for
        Grad-CAM).

    Returns
    -------
    torch.Tensor
        (N, c, H, W) raw attributions, detached, on the inputs' device.

    Raises
    ------
    interp_fer.hooks.FunctionalReLUError
        For guided backprop / deconvolution when a ReLU is not an ``nn.ReLU`` module.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    module, inputs = _network_and_inputs(module, inputs, crop)
    if not isinstance(inputs, torch.Tensor) or inputs.ndim != 4:
        raise ValueError("inputs must be a preprocessed (N, c, H, W) tensor")
    if method == "gradcam" and layer is None:
        raise ValueError("method='gradcam' needs layer= (a convolutional layer name)")
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else inputs.device
    x = inputs.detach().to(device)
    with HookSet(module) as hooks:
        hooks.eval()
        explained = _Explained(module, target, hooks)
        if method in ("guided_backprop", "deconvolution"):
            check_module_relus(explained, x, method)
        with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Setting backward hooks")
            warnings.filterwarnings("ignore", message="Input Tensor .* did not already require")
            options.setdefault("target", explained.captum_target)
            result = _run(method, explained, x.clone(), layer, options)
    return result.detach().to(inputs.device)


def _run(method: str, explained: _Explained, x: torch.Tensor, layer: str | nn.Module | None,
         options: dict[str, Any]) -> torch.Tensor:
    from captum import attr

    if method == "saliency":
        return attr.Saliency(explained).attribute(x, **options)
    if method == "integrated_gradients":
        return attr.IntegratedGradients(explained).attribute(x, **options)
    if method == "guided_backprop":
        return attr.GuidedBackprop(explained).attribute(x, **options)
    if method == "deconvolution":
        return attr.Deconvolution(explained).attribute(x, **options)
    if method == "gradcam":
        cam = attr.LayerGradCam(explained, resolve_layer(explained.network, layer))
        heat = cam.attribute(x, **options)
        heat = F.interpolate(heat, size=x.shape[2:], mode="bilinear", align_corners=False)
        return heat.expand(-1, x.shape[1], -1, -1).contiguous()
    side = max(3, round(min(x.shape[2:]) / 8))
    options.setdefault("sliding_window_shapes", (x.shape[1], side, side))
    options.setdefault("strides", (x.shape[1], max(1, side // 2), max(1, side // 2)))
    # Captum runs one occluded copy per forward pass by default; batching them changes
    # nothing but the time (about 10x on the zoo models).
    options.setdefault("perturbations_per_eval", 64)
    with torch.no_grad():
        return attr.Occlusion(explained).attribute(x, **options)


def display_scale(attributions: torch.Tensor | np.ndarray, *, signed: bool = True,
                  percentile: float = 99.5) -> np.ndarray:
    """Scale attribution maps to [-1, 1] (signed) or [0, 1] for display, per map.

    Parameters
    ----------
    attributions
        (..., H, W) maps; the leading axes index separate maps.
    signed
        Keep the sign (divide by the percentile of |value|) or show |value|.
    percentile
        Percentile of |value| mapped to 1, so a few extreme pixels do not wash out the map.

    Returns
    -------
    numpy.ndarray
        Same shape, float32, clipped to the display range; all-zero maps stay zero.
    """
    values = attributions.detach().cpu().numpy() if isinstance(attributions, torch.Tensor) \
        else np.asarray(attributions)
    values = values.astype(np.float32)
    flat = np.abs(values.reshape(*values.shape[:-2], -1))
    scale = np.percentile(flat, percentile, axis=-1)[..., None, None] if flat.size else 1.0
    scale = np.where(scale > 0, scale, 1.0)
    scaled = values / scale
    return np.clip(scaled, -1, 1) if signed else np.clip(np.abs(scaled), 0, 1)
