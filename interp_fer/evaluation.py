"""Classification accuracy of a FER model on a labelled dataset.

:func:`evaluate` streams the dataset in batches, so memory does not grow with its size.
Images whose label is not among the model's classes, unlabelled images and unreadable files
are counted, with reasons, rather than silently dropped.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from .data import ImageDataset
from .models import FERModel


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
    model: str = ""
    data: str = ""

    def to_json(self, path: str | os.PathLike) -> None:
        """Write every field as JSON (NaN written as null)."""
        with open(path, "w") as handle:
            json.dump(_nan_to_none(asdict(self)), handle, indent=2, allow_nan=False)

    def summary(self) -> str:
        """Plain-text summary: accuracy, per-class table, splits, confusion and skips."""
        lines = [f"model {self.model} on {self.data}",
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
    names = [name.lower() for name in model.class_names]
    if record.label_name and record.label_name.lower() in names:
        return names.index(record.label_name.lower())
    if record.label is not None and 0 <= record.label < len(names) and not record.label_name:
        return record.label
    return None


def evaluate(
    model: FERModel,
    dataset: ImageDataset,
    *,
    batch_size: int = 256,
    progress: bool = True,
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
    """
    from tqdm.auto import tqdm

    n_classes = len(model.class_names)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    usage_hits: Counter[str] = Counter()
    usage_total: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    examples: list[tuple[str, str]] = []
    per_reason: Counter[str] = Counter()

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
                why = ("no label" if sample.record.label is None and not sample.record.label_name
                       else f"label {sample.record.label_name or sample.record.label!r} is not "
                       "one of the model's classes")
                skip(sample.key, why)
            else:
                keep.append(sample)
                targets.append(target)
        if keep:
            predicted = model.logits([s.image for s in keep], batch_size=batch_size).argmax(axis=1)
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
        model=model.name,
        data=dataset.source,
    )
