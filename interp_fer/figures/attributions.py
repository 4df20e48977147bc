"""Attribution methods side by side (:mod:`interp_fer.attributions`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure

from ._style import (
    DIVERGING,
    SEQUENTIAL,
    STYLE,
    TWO_COLUMNS,
    _gray_faces,
    _network_input,
    new_figure,
)

if TYPE_CHECKING:  # annotations only: figures must not import torch at module level
    import os

    import torch

    from ..models import FERModel

METHOD_TITLES = {
    "saliency": "saliency",
    "integrated_gradients": "integrated gradients",
    "guided_backprop": "guided backprop",
    "deconvolution": "deconvolution",
    "gradcam": "Grad-CAM",
    "occlusion": "occlusion",
}


def _target_title(model: FERModel, inputs: torch.Tensor, target: Any) -> str:
    """What is explained: a class with its predicted probability, or another target."""
    import torch

    if isinstance(target, (int, np.integer)):
        with torch.no_grad():
            probability = torch.softmax(model.module(inputs.to(model.device)), dim=1)
        return f"{model.class_names[int(target)]}, p = {float(probability[0, int(target)]):.2f}"
    return repr(target)


def plot_attribution_comparison(
    model: FERModel,
    image: np.ndarray | str | os.PathLike | torch.Tensor,
    target: Any,
    methods: Sequence[str] | None = None,
    *,
    layer: str | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    columns: int | None = None,
    width: float = TWO_COLUMNS,
) -> Figure:
    """Attribution methods side by side on one face (:func:`interp_fer.attributions.attribute`).

    The first panel is the network input; then one panel per method, its map summed over
    input channels and scaled for display only (:func:`~interp_fer.attributions.display_scale`:
    the 99.5th percentile of |value| maps to 1, the value given in the panel title as
    "1 = ..."), so the raw magnitudes stay readable. Signed maps use :data:`DIVERGING` over
    [-1, 1], non-negative ones (saliency's |gradient|) :data:`SEQUENTIAL` over [0, 1], both
    over the face.

    Parameters
    ----------
    model
        The network.
    image
        A raw image (array or file), or a preprocessed (c, H, W) / (1, c, H, W) tensor.
    target
        What to explain: a class index or name, or any target of
        :func:`~interp_fer.attributions.attribute` (``ChannelMax(layer, k)``, ...).
    methods
        Names from :data:`interp_fer.attributions.METHODS`; default all of them.
    layer
        Layer of ``"gradcam"``; default the model's last convolutional stage.
    options
        Keyword arguments per method, e.g. ``{"integrated_gradients": {"n_steps": 32}}``.
    columns
        Panels per row; default 4 (the input and three methods).
    width
        Figure width in inches.
    """
    import matplotlib

    from ..attributions import METHODS, attribute, display_scale

    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if isinstance(target, str):
        if target not in model.class_names:
            raise ValueError(f"unknown class {target!r}; classes: {', '.join(model.class_names)}")
        target = model.class_names.index(target)
    if "gradcam" in methods and layer is None:
        if not model.stages:
            raise ValueError("method 'gradcam' needs layer= (the model names no stages)")
        layer = model.stages[-1]
    inputs = _network_input(model, image).to(model.device)
    settings = options or {}
    raw = {m: attribute(model.module, inputs, target, m, layer=layer if m == "gradcam" else None,
                        **settings.get(m, {}))[0] for m in methods}
    # Grad-CAM repeats one map over the input channels: summing would count it c times.
    maps = {m: (a[0] if m == "gradcam" else a.sum(dim=0)).cpu().numpy() for m, a in raw.items()}
    face = _gray_faces(model, inputs)[0]
    count = len(methods) + 1
    columns = max(1, min(columns or 4, count))
    rows = -(-count // columns)
    with matplotlib.rc_context(STYLE):
        figure = new_figure(width, rows * (width - 1.2) / columns + 0.4 * rows)
        axes = figure.subplots(rows, columns, squeeze=False)
        for ax in axes.ravel():
            ax.set_axis_off()
        flat = axes.ravel()
        flat[0].imshow(face, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        flat[0].set_title(f"input\n{_target_title(model, inputs, target)}", fontsize=7)
        colour_sources: dict[bool, Any] = {}
        for ax, method in zip(flat[1:], methods, strict=False):
            values = maps[method]
            signed = bool((values < 0).any())
            scaled = display_scale(values, signed=signed)
            scale = float(np.percentile(np.abs(values), 99.5))
            ax.imshow(face, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            colour_sources[signed] = ax.imshow(
                scaled, cmap=DIVERGING if signed else SEQUENTIAL, vmin=-1 if signed else 0,
                vmax=1, alpha=np.clip(2 * np.abs(scaled), 0, 1), interpolation="nearest")
            ax.set_title(f"{METHOD_TITLES[method]}\n1 = {scale:.2g}", fontsize=7)
        for signed, source in sorted(colour_sources.items()):
            figure.colorbar(source, ax=axes, shrink=0.7, ticks=[-1, 0, 1] if signed else [0, 1],
                            label="signed" if signed else "magnitude")
    return figure
