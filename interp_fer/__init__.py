"""interp_fer: interpretability for facial-expression-recognition CNNs.

The pipeline, one module per stage:

``models`` (load_model, FERModel) -> ``data`` (open_dataset) -> ``faces`` (dlib landmarks)
-> ``au_regions`` / ``au_activity`` -> ``projections`` -> mapping statistics (``detectors``:
does a channel detect an AU; ``layer_mapping``: where it looks) -> ``figures`` / reports ->
``cli``.

Heavy modules are imported lazily, so ``import interp_fer`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "models",
    "FERModel": "models",
    "ModelLoadError": "models",
    "open_dataset": "data",
    "read_image": "data",
    "evaluate": "evaluation",
    "Evaluation": "evaluation",
    "layer_table": "layers",
    "receptive_field": "layers",
    "load_sample_faces": "samples",
    "sample_face": "samples",
    "zoo_names": "zoo",
    "deconvnet": "projections",
    "guided_backprop": "projections",
    "extremum_points": "projections",
    "attribute": "attributions",
    "load_au_regions": "au_regions",
    "load_sham_regions": "au_regions",
    "au_activity": "au_activity",
    "detector_test": "detectors",
    "LandmarkDetector": "faces",
    "landmarks_table": "faces",
    "map_dataset": "mapping",
    "headline": "mapping",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'interp_fer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
