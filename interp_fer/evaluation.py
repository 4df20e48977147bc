"""Classification accuracy of a FER model on a labelled dataset.

:func:`evaluate` streams the dataset in batches, so memory does not grow with its size.
Images whose label is not among the model's classes, unlabelled images and unreadable files
are counted, with reasons, rather than silently dropped. Labels are matched to the model's
classes by name with the aliases of :mod:`interp_fer.labels` (``anger`` is ``angry``,
``happiness`` is ``happy``); a class the model lacks (``contempt`` for a 7-class model) is
skipped and counted by name (:attr:`Evaluation.skipped_classes`).

Cross-dataset evaluation (a model trained on one dataset, tested on others) is one
:func:`evaluate` per dataset; :func:`comparison` puts their per-class accuracies side by side
and :func:`interp_fer.figures.plot_dataset_comparison` draws them.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from .data import ImageDataset
from .labels import class_index
from .models import FERModel

#: How the images were framed before the network saw them (recorded in every result;
#: :mod:`interp_fer.face_crops`).
CROP_MODES = ("none", "face", "auto")


@dataclass
class Evaluation:
    """Result of :func:`evaluate`.

    Attributes
    ----------
    accuracy
        Top-1 accuracy over evaluated images (fraction in [0, 1]).
    n_images
        Images evaluated (readable and labelled).
    n_skipped
        Images not evaluated, for any reason.
    per_class
        Class name -> {"accuracy", "n"} (accuracy = recall of that class; NaN when n = 0).
    confusion
        (n_classes, n_classes) counts, rows = true, columns = predicted.
    class_names
        Class order of ``confusion``.
    by_usage
        Split name (e.g. ``PublicTest``) -> {"accuracy", "n"}, when the dataset has splits.
    skipped
        Reason -> count.
    skipped_examples
        Up to 20 ``(key, reason)`` pairs per reason, for the report.
    skipped_classes
        Class name -> images skipped because the model lacks that class (e.g. ``contempt``).
    crop
        How images were framed before the forward pass (:data:`CROP_MODES`): ``"none"`` is
        the whole image resized to the network input.
    crop_decisions
        What the face pipeline did with the evaluated images: ``"whole"``, ``"registered"``
        (fed as they are), ``"aligned"`` (aligned and cropped) or ``"no_face"`` (fed whole)
        -> count (:func:`interp_fer.face_crops.choose_crop`).
    several_faces
        Evaluated images in which several faces were found (the chosen one was scored).
    """

    accuracy: float
    n_images: int
    n_skipped: int
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]
    class_names: list[str]
    by_usage: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[tuple[str, str]] = field(default_factory=list)
    skipped_classes: dict[str, int] = field(default_factory=dict)
    crop: str = "none"
    crop_decisions: dict[str, int] = field(default_factory=dict)
    several_faces: int = 0
    model: str = ""
    data: str = ""

    def to_dict(self) -> dict:
        """Every field, JSON-ready (NaN as None)."""
        return _nan_to_none(asdict(self))

    def to_json(self, path: str | os.PathLike) -> None:
        """Write every field as JSON (NaN written as null)."""
        with open(path, "w") as handle:
            json.dump(self.to_dict(), handle, indent=2, allow_nan=False)

    def summary(self) -> str:
        """Plain-text summary: accuracy, per-class table, splits, confusion and skips."""
        decisions = ", ".join(f"{k} {v}" for k, v in sorted(self.crop_decisions.items()))
        several = f"; {self.several_faces} with several faces" if self.several_faces else ""
        crop = f"{self.crop}: {decisions}{several}" if decisions and self.crop != "none" \
            else self.crop
        lines = [f"model {self.model} on {self.data} (crop: {crop})",
                 f"top-1 accuracy: {100 * self.accuracy:.2f} % of {self.n_images} images"
                 f" ({self.n_skipped} skipped)" if self.n_images else
                 f"no image evaluated: none has a readable image and a label among the "
                 f"model's classes ({self.n_skipped} skipped)"]
        for usage, stats in sorted(self.by_usage.items()):
            lines.append(f"  {usage}: {100 * stats['accuracy']:.2f} % of {int(stats['n'])}")
        lines.append("per class (recall):")
        for name, stats in self.per_class.items():
            value = "   n/a" if np.isnan(stats["accuracy"]) else f"{100 * stats['accuracy']:6.2f}"
            lines.append(f"  {name:<12} {value} %  n={int(stats['n'])}")
        width = max(len(n) for n in self.class_names)
        lines.append("confusion (rows true, columns predicted):")
        lines.append(" " * (width + 2) + " ".join(f"{n[:8]:>8}" for n in self.class_names))
        for name, row in zip(self.class_names, self.confusion, strict=True):
            lines.append(f"  {name:<{width}}" + " ".join(f"{v:>8}" for v in row))
        for reason, count in self.skipped.items():
            lines.append(f"skipped {count}: {reason}")
        return "\n".join(lines)


def _nan_to_none(value):
    # JSON has no NaN: classes absent from the data get null accuracies.
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(item) for item in value]
    if isinstance(value, float) and value != value:
        return None
    return value


def _label_index(record, model: FERModel) -> int | None:
    """The model's index of a record's class: by name (aliases resolved), else by index."""
    if record.label_name:
        return class_index(record.label_name, model.class_names)
    if record.label is not None and 0 <= record.label < len(model.class_names):
        return record.label
    return None


def comparison(results: dict[str, Evaluation]) -> dict[str, dict[str, float | None]]:
    """Per-class accuracy (recall) of several evaluations side by side.

    Parameters
    ----------
    results
        Dataset name -> its :class:`Evaluation` (same model).

    Returns
    -------
    dict
        Class name -> {dataset name: accuracy in [0, 1], or None when the dataset has no image
        of that class}, in the model's class order, plus ``"all"`` (top-1 accuracy).
    """
    classes: list[str] = []
    for result in results.values():
        classes += [c for c in result.class_names if c not in classes]
    table: dict[str, dict[str, float | None]] = {}
    for name in classes:
        table[name] = {}
        for data, result in results.items():
            value = result.per_class.get(name, {}).get("accuracy", float("nan"))
            table[name][data] = None if value != value else float(value)
    table["all"] = {data: None if r.accuracy != r.accuracy else float(r.accuracy)
                    for data, r in results.items()}
    return table


def evaluate(
    model: FERModel,
    dataset: ImageDataset,
    *,
    batch_size: int = 256,
    progress: bool = True,
    crop: str = "none",
) -> Evaluation:
    """Top-1 accuracy, per-class accuracy and confusion matrix of ``model`` on ``dataset``.

    Labels are matched to the model's classes by name when the dataset names them (so a
    dataset with another class order is still scored correctly), else by index.

    Parameters
    ----------
    model
        The network and its preprocessing.
    dataset
        A labelled dataset (:func:`interp_fer.data.open_dataset`).
    batch_size
        Images per forward pass.
    progress
        Show a progress bar (tqdm; works in notebooks too).
    crop
        How images are framed before the network sees them (:data:`CROP_MODES`, recorded in
        the result): ``"none"`` feeds them whole; ``"face"`` aligns and crops every face with
        the model's framing; ``"auto"`` feeds registered face crops as they are and aligns and
        crops the rest (:mod:`interp_fer.face_crops`; the detector runs only on images larger
        than registered 48 px crops).
    """
    from tqdm.auto import tqdm

    from .face_crops import FacePipeline

    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}, not {crop!r}")
    pipeline = FacePipeline(crop, model.input_size)
    decisions: Counter[str] = Counter()
    several = 0

    n_classes = len(model.class_names)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    usage_hits: Counter[str] = Counter()
    usage_total: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    examples: list[tuple[str, str]] = []
    per_reason: Counter[str] = Counter()
    missing_classes: Counter[str] = Counter()

    def skip(key: str, reason: str) -> None:
        skipped[reason] += 1
        per_reason[reason] += 1
        if per_reason[reason] <= 20:
            examples.append((key, reason))

    bar = tqdm(total=len(dataset), desc=f"evaluate {model.name}", unit="img", disable=not progress)
    for batch in dataset.batches(batch_size, progress=bar.update):  # moves per image read
        keep, targets = [], []
        for sample in batch:
            target = _label_index(sample.record, model)
            if target is None:
                record = sample.record
                if record.label is None and not record.label_name:
                    why = "no label"
                else:
                    name = str(record.label_name or record.label)
                    missing_classes[name] += 1
                    why = f"class {name!r} is not one of the model's classes"
                skip(sample.key, why)
            else:
                keep.append(sample)
                targets.append(target)
        if keep:
            images = [s.image for s in keep]
            if crop != "none":
                crops = pipeline.crops(images)
                decisions.update(c.decision for c in crops)
                several += sum(c.status == "several_faces" for c in crops)
                images = [c.crop.apply(image) for c, image in zip(crops, images, strict=True)]
            else:
                decisions["whole"] += len(images)
            predicted = model.logits(images, batch_size=batch_size).argmax(axis=1)
            np.add.at(confusion, (np.asarray(targets), predicted), 1)
            for sample, target, guess in zip(keep, targets, predicted, strict=True):
                if sample.record.usage:
                    usage_total[sample.record.usage] += 1
                    usage_hits[sample.record.usage] += int(target == guess)
    for key, reason in dataset.skipped:
        skip(key, f"unreadable: {reason.split(':')[0]}")
    bar.close()

    n_images = int(confusion.sum())
    totals = confusion.sum(axis=1)
    per_class = {
        name: {"accuracy": float(confusion[i, i] / totals[i]) if totals[i] else float("nan"),
               "n": int(totals[i])}
        for i, name in enumerate(model.class_names)
    }
    return Evaluation(
        accuracy=float(np.trace(confusion) / n_images) if n_images else float("nan"),
        n_images=n_images,
        n_skipped=int(sum(skipped.values())),
        per_class=per_class,
        confusion=confusion.tolist(),
        class_names=list(model.class_names),
        by_usage={u: {"accuracy": usage_hits[u] / usage_total[u], "n": usage_total[u]}
                  for u in usage_total},
        skipped=dict(skipped),
        skipped_examples=examples,
        skipped_classes=dict(missing_classes),
        crop=crop,
        crop_decisions=dict(decisions),
        several_faces=several,
        model=model.name,
        data=dataset.source,
    )


def saliency_weighted_inputs(module: nn.Module, inputs: torch.Tensor,
                             mean: float | tuple[float, ...] = 0.0,
                             std: float | tuple[float, ...] = 1.0) -> torch.Tensor:
    """Preprocessed images multiplied by their normalised saliency map (the seed work's input).

    For each image, the saliency map is ``max_c |d logit_k / d x_c|`` for the class ``k`` the
    network predicts on the plain image, divided by its maximum (so it lies in [0, 1]); the
    image's pixels (on the [0, 1] scale, ``x * std + mean``) are multiplied by it and
    normalised again.

    Parameters
    ----------
    module
        The network (``nn.Module``) taking preprocessed (N, c, H, W) input.
    inputs
        Preprocessed images, (N, c, H, W) float tensor.
    mean, std
        The preprocessing's normalisation (a float or one value per channel).

    Returns
    -------
    torch.Tensor
        (N, c, H, W) weighted, preprocessed images, detached.
    """
    with torch.inference_mode(False), torch.enable_grad():
        x = inputs.clone().requires_grad_(True)   # a clone: inputs may be inference tensors
        logits = module(x)
        top = logits.argmax(dim=1, keepdim=True)
        (grad,) = torch.autograd.grad(logits.gather(1, top).sum(), x)
    saliency = grad.abs().amax(dim=1, keepdim=True)
    peak = saliency.flatten(1).amax(dim=1).clamp_min(torch.finfo(saliency.dtype).tiny)
    saliency = saliency / peak.view(-1, 1, 1, 1)
    shape = (1, -1, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=inputs.dtype, device=inputs.device).reshape(shape)
    std_t = torch.as_tensor(std, dtype=inputs.dtype, device=inputs.device).reshape(shape)
    pixels = inputs.detach() * std_t + mean_t
    return ((pixels * saliency - mean_t) / std_t).detach()


class SaliencyWeighted(nn.Module):
    """``network`` applied to saliency-weighted inputs (see :func:`saliency_weighted_inputs`).

    Parameters
    ----------
    network
        The network taking preprocessed input.
    mean, std
        Its preprocessing's normalisation.
    """

    def __init__(self, network: nn.Module, mean: float | tuple[float, ...] = 0.0,
                 std: float | tuple[float, ...] = 1.0) -> None:
        super().__init__()
        self.network = network
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(saliency_weighted_inputs(self.network, x, self.mean, self.std))


def saliency_weighted(model: FERModel) -> FERModel:
    """A copy of ``model`` whose network sees each image multiplied by its saliency map.

    Evaluating it (:func:`evaluate`, ``interp-fer evaluate --saliency-weighted``) scores the
    network on saliency-weighted inputs (see :func:`saliency_weighted_inputs`); the saliency
    is computed per image with one extra forward and backward pass.
    """
    from dataclasses import replace

    network = SaliencyWeighted(model.module, model.preprocess.mean, model.preprocess.std)
    return replace(model, module=network, name=f"{model.name} (saliency-weighted)",
                   metadata={**model.metadata, "saliency_weighted": True})
