"""Figures for papers: each function returns a :class:`matplotlib.figure.Figure`.

One module per kind of figure, everything importable from here:

* :mod:`~interp_fer.figures.evaluation`: the confusion matrix (:func:`plot_confusion_matrix`)
  and per-class accuracy across datasets (:func:`plot_dataset_comparison`);
* :mod:`~interp_fer.figures.faces`: landmarks and AU regions on a face
  (:func:`plot_landmarks`, :func:`plot_au_regions`, :func:`au_regions_figure`);
* :mod:`~interp_fer.figures.activity`: AU activity proxies on a face (:func:`plot_activity`)
  and the sham regions beside the AU regions (:func:`plot_sham_regions`);
* :mod:`~interp_fer.figures.projections`: one face and the projections of a layer's channels
  (:func:`project_figure`, the ``interp-fer project`` grid);
* :mod:`~interp_fer.figures.mapping`: the figures of a mapping run (the faces it saw; where
  channels look, :func:`plot_distance_heatmap`; which channel detects which AU, the detector
  test's ``effect`` beside each AU's ``control_bar``, :func:`plot_detector_heatmap`;
  :func:`plot_channel_faces`, :func:`plot_au_projection_grid`);
* :mod:`~interp_fer.figures.dossier`: one channel's dossier (:func:`plot_channel_dossier`,
  with :func:`activity_responses` and :func:`plot_activity_response`, the response against
  the AU's activity, ``effect`` per AU against its control bar, and
  :func:`expression_responses`);
* :mod:`~interp_fer.figures.attributions`: attribution methods side by side
  (:func:`plot_attribution_comparison`).

Conventions shared by every function here (the style lives in ``_style``):

* no pyplot: figures are plain :class:`~matplotlib.figure.Figure` objects, built inside
  ``matplotlib.rc_context(STYLE)``, so nothing changes the caller's matplotlib state;
* colour-blind-safe colours: :data:`SEQUENTIAL` (viridis) for magnitudes, :data:`DIVERGING`
  (blue-red, centred on zero) for signed values, :data:`OKABE_ITO` for categories;
* a ``width`` argument in inches, :data:`ONE_COLUMN` (3.5) or :data:`TWO_COLUMNS` (7.2), with
  fonts sized to stay readable at that width (DejaVu Sans, shipped with matplotlib, so a
  figure looks the same on every machine);
* vector friendly: text stays text (TrueType embedded in PDF, real text in SVG) and images
  are drawn with ``interpolation="nearest"`` so a pixel stays a pixel when zoomed.
  :func:`save_figure` writes PDF and PNG at once, in that style.

Coordinates on faces are those of the preprocessed network input (e.g. 64 x 64 for
mini-Xception): projections and extremum points are ``(row, col)``, landmarks ``(x, y)``.

The figures of a mapping run (:func:`plot_au_projection_grid`, :func:`plot_channel_dossier`)
read the faces the run saw through :func:`top_faces` / :func:`mapped_faces`, which re-cut each
image with the crop the run recorded, so what is drawn is exactly what the network was fed.
"""

from __future__ import annotations

from ._style import (
    DIVERGING,
    OKABE_ITO,
    ONE_COLUMN,
    SEQUENTIAL,
    STYLE,
    TWO_COLUMNS,
    new_figure,
    save_figure,
)
from .activity import plot_activity, plot_sham_regions
from .attributions import METHOD_TITLES, plot_attribution_comparison
from .dossier import (
    ActivityResponses,
    ExpressionResponses,
    activity_responses,
    expression_responses,
    plot_activity_response,
    plot_channel_dossier,
)
from .evaluation import plot_confusion_matrix, plot_dataset_comparison
from .faces import au_regions_figure, plot_au_regions, plot_landmarks
from .mapping import (
    MappedFaces,
    grid_channels,
    mapped_faces,
    plot_au_projection_grid,
    plot_channel_faces,
    plot_detector_heatmap,
    plot_distance_heatmap,
    top_faces,
)
from .projections import project_figure

__all__ = [
    "DIVERGING",
    "METHOD_TITLES",
    "OKABE_ITO",
    "ONE_COLUMN",
    "SEQUENTIAL",
    "STYLE",
    "TWO_COLUMNS",
    "ActivityResponses",
    "ExpressionResponses",
    "MappedFaces",
    "activity_responses",
    "au_regions_figure",
    "expression_responses",
    "grid_channels",
    "mapped_faces",
    "new_figure",
    "plot_activity",
    "plot_activity_response",
    "plot_attribution_comparison",
    "plot_au_projection_grid",
    "plot_au_regions",
    "plot_channel_dossier",
    "plot_channel_faces",
    "plot_confusion_matrix",
    "plot_dataset_comparison",
    "plot_detector_heatmap",
    "plot_distance_heatmap",
    "plot_landmarks",
    "plot_sham_regions",
    "project_figure",
    "save_figure",
    "top_faces",
]
