"""Projections of one face (:mod:`interp_fer.projections`): the ``interp-fer project`` grid."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from ._style import STYLE, TWO_COLUMNS, _draw_projection, _gray_faces, _network_input, new_figure

if TYPE_CHECKING:  # annotations only: figures must not import torch at module level
    import os

    import torch

    from ..models import FERModel


def project_figure(
    model: FERModel,
    image: np.ndarray | str | os.PathLike | torch.Tensor,
    layer: str,
    channels: Sequence[int] | None = None,
    method: str = "deconvnet",
    *,
    max_channels: int = 15,
    columns: int = 6,
    width: float = TWO_COLUMNS,
) -> Figure:
    """Grid of one face and the projections of a layer's channels, with extremum points.

    The first panel is the network input (the preprocessed face, gray); each other panel is
    one channel's projection of its arg-max unit (:func:`interp_fer.projections.project`),
    in a diverging map centred on zero and scaled per panel for display (over the face,
    which shows through where the projection is weak), with the extremum
    point (energy centroid of the top 1 % pixels, ``+``) and the arg-max unit's
    receptive-field centre (``o``) when known. Inactive channels are left blank.

    Parameters
    ----------
    model
        A :class:`~interp_fer.models.FERModel`.
    image
        A raw image (array, or path to a file), or an already preprocessed (c, H, W) /
        (1, c, H, W) tensor.
    layer
        Layer name.
    channels
        Channels to show; default: the ``max_channels`` with the largest maximum activation.
    method
        ``"deconvnet"`` or ``"guided_backprop"``.
    max_channels, columns, width
        Panel count when ``channels`` is None, grid columns, figure width (inches).
    """
    import matplotlib
    import torch

    from ..attributions import display_scale
    from ..projections import extremum_points, project, rf_centres

    inputs = _network_input(model, image)
    if channels is None:
        result = project(model.module, inputs, layer, method=method)
        order = torch.argsort(result.values[0], descending=True, stable=True)[:max_channels]
        channels = sorted(int(result.channels[i]) for i in order)
    result = project(model.module, inputs, layer, list(channels), method=method)
    points = extremum_points(result)[0].numpy()
    centres = rf_centres(result)[0].numpy() if result.receptive_field is not None else None
    maps = display_scale(result.maps[0].sum(dim=1))  # (K, H, W), input channels summed
    face = _gray_faces(model, inputs)[0]
    count = len(channels) + 1
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    with matplotlib.rc_context(STYLE):
        figure = new_figure(width, width / columns * rows * 1.12)
        axes = figure.subplots(rows, columns, squeeze=False).ravel()
        for ax in axes:
            ax.set_axis_off()
        axes[0].imshow(face, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        axes[0].set_title(f"input ({layer})")
        for k, ax in enumerate(axes[1:count]):
            ax.set_title(f"ch {channels[k]}  {float(result.values[0, k]):.2g}", fontsize=7)
            if not bool(result.active[0, k]):
                ax.text(0.5, 0.5, "inactive", ha="center", va="center",
                        transform=ax.transAxes, fontsize=7)
                continue
            _draw_projection(ax, face, maps[k], points[k],
                             None if centres is None else centres[k])
    return figure
