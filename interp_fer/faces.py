"""Faces and dlib 68-point landmarks, including small pre-cropped faces (FER2013, 48 px).

Conventions
-----------
* Images are numpy ``uint8`` arrays, ``(H, W)`` grey or ``(H, W, 3)`` RGB.
* Landmarks are ``float64`` arrays of shape ``(68, 2)`` in ``(x, y)`` pixel coordinates of the
  image that was given, iBUG 300-W order (0-based: jaw 0-16, brows 17-26, nose 27-35,
  eyes 36-47, mouth 48-67). Integer coordinates are pixel centres (dlib's convention):
  pixel ``image[r, c]`` has its centre at ``x = c, y = r``.
* Face boxes are ``(left, top, right, bottom)`` in the same frame.

Two ways to find a face
-----------------------
*Photos* (``precropped=False``): dlib's detector (HOG by default, or the MMOD CNN) on the image,
with dlib's pyramid upsampling chosen by image size (:func:`upsample_plan`, the rule below), and
the MMOD CNN detector as a fallback when HOG finds nothing (``cnn_fallback``). Every face found is
counted (``n_faces``); one of them is chosen by ``choose`` (``"largest"`` box or the most
``"central"`` one), and when several were found the status says so (``several_faces``) instead of
``detected``, so a group photo never passes silently for a one-face image.

Upsampling rule (photos, ``upsample=None``). dlib's HOG window is 80 x 80 px and each upsampling
step halves the smallest face it can see (about 40 px after one step, 20 px after two), at four
times the pixels. Measured on 68-point annotated photos (``benchmarks/landmark_quality.py``):
one step is needed for small faces *and* for semi-profile faces in large photos (a 1920 x 1080
still: without it HOG misses the annotated face and finds only the other person), but one step
alone can lose a clear 86 px face in a 1,024 px portrait that the plain pass finds. Hence:

* larger side below :data:`LARGE_PHOTO_SIDE` (1,000 px): one pass at upsample 1; when it finds
  nothing and the larger side is at most 512 px, a pass at upsample 2 (faces of ~20 px);
* larger side of 1,000 px or more: a pass at upsample 0 *and* one at upsample 1, their boxes
  merged (a box overlapping a kept one by IoU > 0.5 is the same face), the second pass only
  while the upsampled image stays within :data:`UPSAMPLE_PIXEL_BUDGET` pixels;
* an explicit ``upsample=N`` runs that single pass.

When HOG finds nothing, the CNN detector runs on the photo shrunk to at most
:data:`CNN_MAX_SIDE` px (upsample 1 below 400 px). Its boxes frame faces differently from the
HOG boxes the landmark model was trained on, so they are re-estimated from the landmarks
(:func:`box_from_landmarks`, ``refine_fallback`` times), as the fallback box is. The fallback
costs about 0.5-3 s per photo where it runs (one core), and nothing elsewhere.

Faces the image border cuts (tight crops, a chin below a 128 px CK+-style crop) are landmarked
on a copy with the border pixels repeated outwards (``pad_edges``), not on dlib's black, and
the table counts the points that still fall outside the image (``n_outside``,
:func:`landmarks_outside`) so that regions built on them can be treated with care.

*Registered face crops* (``precropped=True``; ``"auto"`` picks it for images whose smaller side
is at most :data:`AUTO_PRECROPPED_MAX_SIDE` px, e.g. FER2013's 48 x 48): the crop is enlarged
(bicubic, integer factor) until its smaller side reaches ``crop_min_side`` (dlib's HOG window
is 80 px: a 48 px face is invisible to it otherwise), the detector runs on that, and a
detection counts only if its box overlaps the box expected for such crops. When nothing is
detected, the landmarks are predicted in that fixed box (``fallback_box``, calibrated on
FER2013), then the box is re-estimated from those landmarks the way dlib's detector would have
drawn it (:func:`box_from_landmarks`) and the landmarks predicted again (``refine_fallback``
times). ``landmarks/README.md`` ("How good the 48 px path is") gives the calibration and the
measured errors. Each result says which path was used.

Every image gets a :class:`FaceLandmarks` whose status is one of :data:`STATUSES`:
``detected`` (one face found), ``several_faces`` (several found; the landmarks are those of the
face ``choose`` picked), ``fallback_box``, ``no_face``, ``unreadable`` (no pixels), ``invalid``
(wrong shape or dtype) or ``error`` (dlib failed; the message says why). Nothing is dropped silently
and one bad image never stops a run.

The landmark predictor
----------------------
dlib's ``shape_predictor_68_face_landmarks.dat`` (Kazemi & Sullivan 2014 regression-tree
cascade) is evaluated by :class:`ShapePredictor`, a vectorised numpy port of dlib's
``shape_predictor::operator()`` that reads the same model file. It reproduces dlib's landmarks
exactly (same pixels sampled, same trees, float32 accumulation in the same order; tested),
except that it returns sub-pixel coordinates where dlib rounds to whole pixels, and it
landmarks a batch of faces at once (about 3x faster than dlib's build here, which matters for
the 400 faces/s target). ``backend="dlib"`` uses dlib's own predictor instead.
"""

from __future__ import annotations

import hashlib
import importlib.util  # noqa: F401  (faces.importlib.util.find_spec: model_path looks through it)
import json
import logging
import math
import multiprocessing as mp
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

# The landmark model's location lives with the predictor (re-exported here).
from .shape_predictor import MODEL_PACKAGE, PREDICTOR_FILE, ShapePredictor, model_path

log = logging.getLogger(__name__)

N_LANDMARKS = 68

#: Smaller image side (pixels) up to which ``precropped="auto"`` treats an image as a registered
#: face crop: dlib's HOG detector cannot see faces smaller than about 80 px without help.
AUTO_PRECROPPED_MAX_SIDE = 96

#: Face box expected in a FER2013-style crop, as fractions ``(left, top, right, bottom)`` of the
#: crop (edge coordinates: 0 = the crop's left/top edge, 1 = its right/bottom edge). Medians of
#: the HOG detector's boxes over the 5,177 FER2013 test images where it found a face (crops
#: enlarged x2, bicubic, no box filter). ``benchmarks/landmark_quality.py --calibrate`` redoes
#: it; ``landmarks/README.md`` gives the spread.
FER2013_FACE_BOX = (0.0677, 0.1719, 0.9740, 0.9740)

#: dlib HOG face box from landmarks: centre = landmark centroid + ``offset`` x r, side = ``side``
#: x r, where r is the RMS distance of the 68 points from their centroid. Medians over the
#: 5,177 FER2013 test faces where the HOG detector succeeds (``benchmarks/landmark_quality.py``);
#: used to re-centre the fallback box on the face it found (``refine_fallback``).
BOX_FROM_LANDMARKS = {"offset": (0.017, -0.092), "side": 2.787}

#: Bump when the pipeline changes its output: it is part of the cache key, so stale cached
#: landmarks are never returned.
PIPELINE_VERSION = 2

STATUSES = ("detected", "several_faces", "fallback_box", "no_face", "unreadable", "invalid",
            "error")
#: Statuses that come with landmarks.
FACE_STATUSES = ("detected", "several_faces", "fallback_box")

#: Photos whose larger side reaches this many pixels get a plain (upsample 0) HOG pass beside
#: the upsampled one (:func:`upsample_plan`).
LARGE_PHOTO_SIDE = 1000
#: Most pixels an upsampled HOG pass may scan in a large photo (4 x a 1920 x 1080 frame fits).
UPSAMPLE_PIXEL_BUDGET = 9_000_000
#: The CNN fallback runs on the photo shrunk to at most this larger side (it costs ~7 s per
#: megapixel on one core).
CNN_MAX_SIDE = 800
#: Two boxes of different HOG passes overlapping by more than this IoU are the same face.
SAME_FACE_IOU = 0.5
#: ``pad_edges``: the border is repeated outwards until the face box grown by this fraction of
#: its side on every side lies inside the image (the landmark model's feature pixels reach
#: about that far beyond the box).
PAD_MARGIN = 0.5

CNN_DETECTOR_FILE = "mmod_human_face_detector.dat"


# --------------------------------------------------------------------------------------------
# Geometry helpers on landmark arrays
# --------------------------------------------------------------------------------------------


def eye_centres(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres of the two eyes: means of points 36-41 and 42-47.

    Parameters
    ----------
    landmarks
        ``(..., 68, 2)`` array.

    Returns
    -------
    (left, right)
        ``(..., 2)`` arrays; "left" is the eye on the image's left (the subject's right eye).
    """
    lm = np.asarray(landmarks, dtype=float)
    return lm[..., 36:42, :].mean(axis=-2), lm[..., 42:48, :].mean(axis=-2)


def inter_ocular_distance(landmarks: np.ndarray) -> np.ndarray:
    """Distance between the eye centres (IOD), in the landmarks' units.

    Parameters
    ----------
    landmarks
        ``(..., 68, 2)`` array.

    Returns
    -------
    numpy.ndarray
        ``(...)`` array (0-d for one face).
    """
    left, right = eye_centres(landmarks)
    return np.linalg.norm(right - left, axis=-1)


def outer_eye_distance(landmarks: np.ndarray) -> np.ndarray:
    """Distance between the outer eye corners (points 36 and 45), the 300-W normaliser.

    Parameters
    ----------
    landmarks
        ``(..., 68, 2)`` array.

    Returns
    -------
    numpy.ndarray
        ``(...)`` array; about 1.4 x :func:`inter_ocular_distance` on frontal faces.
    """
    lm = np.asarray(landmarks, dtype=float)
    return np.linalg.norm(lm[..., 45, :] - lm[..., 36, :], axis=-1)


def landmark_error(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    normalise: Literal["outer_corners", "eye_centres"] = "outer_corners",
) -> np.ndarray:
    """Normalised mean error (NME): mean point-to-point distance over the 68 points divided by
    the reference's inter-ocular distance.

    Parameters
    ----------
    pred, ref
        ``(..., 68, 2)`` arrays in the same pixel frame.
    normalise
        ``"outer_corners"``: the distance between the reference's outer eye corners (points 36
        and 45), the usual 300-W "inter-ocular" NME; ``"eye_centres"``: between the eye centres
        (:func:`inter_ocular_distance`, the toolkit's IOD), which gives numbers about 1.4 x
        larger (the unit of the older figures in ``landmarks/README.md``).

    Returns
    -------
    numpy.ndarray
        ``(...)`` errors as fractions of that distance.
    """
    pred = np.asarray(pred, dtype=float)
    ref = np.asarray(ref, dtype=float)
    if normalise == "outer_corners":
        scale = outer_eye_distance(ref)
    elif normalise == "eye_centres":
        scale = inter_ocular_distance(ref)
    else:
        raise ValueError("normalise must be 'outer_corners' or 'eye_centres', "
                         f"not {normalise!r}")
    return np.linalg.norm(pred - ref, axis=-1).mean(axis=-1) / scale


def landmarks_outside(landmarks: np.ndarray, height: int, width: int) -> np.ndarray:
    """How many of the 68 points of each face fall outside the image.

    A point is outside when it lies beyond the image's outer pixel edges (``x < -0.5`` or
    ``x > width - 0.5``, same for ``y``): e.g. the chin (point 8) of a tight crop that cuts it.
    Regions built on such points are clipped at the border.

    Parameters
    ----------
    landmarks
        ``(..., 68, 2)`` ``(x, y)`` pixel coordinates; NaN rows count 0.
    height, width
        Image size in pixels.

    Returns
    -------
    numpy.ndarray
        ``(...)`` int counts.
    """
    lm = np.asarray(landmarks, dtype=float)
    x, y = lm[..., 0], lm[..., 1]
    with np.errstate(invalid="ignore"):
        out = (x < -0.5) | (x > width - 0.5) | (y < -0.5) | (y > height - 0.5)
    return out.sum(axis=-1)


def upsample_plan(height: int, width: int,
                  upsample: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """HOG upsampling passes for a photo (the rule in the module docstring).

    Parameters
    ----------
    height, width
        Photo size in pixels.
    upsample
        An explicit number of upsampling steps (one pass), or ``None`` for the rule.

    Returns
    -------
    (always, if_none)
        Steps of the passes always run (their boxes merged), and of the passes run only when
        those find nothing.
    """
    if upsample is not None:
        return (int(upsample),), ()
    side = max(height, width)
    if side < LARGE_PHOTO_SIDE:
        return (1,), ((2,) if side <= 512 else ())
    if 4 * height * width <= UPSAMPLE_PIXEL_BUDGET:
        return (0, 1), ()
    return (0,), ()


def choose_faces(boxes: Sequence[Sequence[float]], height: int, width: int,
                 rule: Literal["largest", "central"] = "largest") -> list[int]:
    """Order face boxes by preference: the first is the face a one-face command uses.

    Parameters
    ----------
    boxes
        ``(left, top, right, bottom)`` boxes in pixels.
    height, width
        Image size in pixels.
    rule
        ``"largest"``: by box area, largest first; ``"central"``: by the distance of the box
        centre from the image centre, nearest first (ties: larger first).

    Returns
    -------
    list of int
        Indices into ``boxes``.
    """
    b = np.asarray(boxes, dtype=float).reshape(-1, 4)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    if rule == "largest":
        return [int(i) for i in np.lexsort((np.arange(len(b)), -area))]
    if rule == "central":
        cx = (b[:, 0] + b[:, 2]) / 2 - (width - 1) / 2
        cy = (b[:, 1] + b[:, 3]) / 2 - (height - 1) / 2
        # distances rounded to 1 % of the diagonal, so near-equal ones fall back to size
        dist = np.round(np.hypot(cx, cy) / math.hypot(height, width), 2)
        return [int(i) for i in np.lexsort((np.arange(len(b)), -area, dist))]
    raise ValueError(f"rule must be 'largest' or 'central', not {rule!r}")


def _mirror_index() -> tuple[int, ...]:
    """iBUG 68 index of each point's left/right counterpart (see :data:`MIRROR_INDEX`)."""
    pairs = [(i, 16 - i) for i in range(17)]                      # jaw
    pairs += [(17 + i, 26 - i) for i in range(10)]                # brows
    pairs += [(i, i) for i in range(27, 31)]                      # nose bridge
    pairs += [(31 + i, 35 - i) for i in range(5)]                 # nostrils
    pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
    pairs += [(48 + i, 54 - i) for i in range(7)]                 # upper outer lip
    pairs += [(55 + i, 59 - i) for i in range(5)]                 # lower outer lip
    pairs += [(60 + i, 64 - i) for i in range(5)]                 # upper inner lip
    pairs += [(65, 67), (66, 66), (67, 65)]                       # lower inner lip
    index = [-1] * N_LANDMARKS
    for a, b in pairs:
        index[a], index[b] = b, a
    return tuple(index)


#: ``MIRROR_INDEX[i]`` is the point that plays point ``i``'s role in the horizontally mirrored
#: face (36, the outer corner of the image-left eye, becomes 45, and so on).
MIRROR_INDEX = _mirror_index()


def mirror_landmarks(landmarks: np.ndarray, width: float) -> np.ndarray:
    """Landmarks of the horizontally flipped image ``image[:, ::-1]``.

    Parameters
    ----------
    landmarks
        ``(..., 68, 2)`` ``(x, y)`` pixel coordinates.
    width
        Image width in pixels (pixel ``c`` becomes ``width - 1 - c``).

    Returns
    -------
    numpy.ndarray
        ``(..., 68, 2)``, re-indexed so that each point keeps its anatomical role.
    """
    lm = np.asarray(landmarks, dtype=float)[..., MIRROR_INDEX, :].copy()
    lm[..., 0] = (width - 1) - lm[..., 0]
    return lm


def box_from_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """The square face box dlib's HOG detector would give for these landmarks.

    Parameters
    ----------
    landmarks
        ``(..., 68, 2)`` ``(x, y)`` pixel coordinates.

    Returns
    -------
    numpy.ndarray
        ``(..., 4)`` boxes ``(left, top, right, bottom)`` (see :data:`BOX_FROM_LANDMARKS`).
    """
    lm = np.asarray(landmarks, dtype=float)
    centroid = lm.mean(axis=-2)
    r = np.sqrt(((lm - centroid[..., None, :]) ** 2).sum(axis=-1).mean(axis=-1))[..., None]
    centre = centroid + np.asarray(BOX_FROM_LANDMARKS["offset"]) * r
    half = BOX_FROM_LANDMARKS["side"] * r / 2
    return np.concatenate([centre - half, centre + half], axis=-1)


def fraction_box_to_pixels(
    fractions: Sequence[float], height: int, width: int
) -> tuple[float, float, float, float]:
    """Convert a box in crop fractions (edge coordinates) to pixel coordinates.

    Parameters
    ----------
    fractions
        ``(left, top, right, bottom)``; 0 is the crop's left/top edge, 1 its right/bottom edge.
    height, width
        Crop size in pixels.

    Returns
    -------
    tuple
        ``(left, top, right, bottom)`` in pixel coordinates (pixel centres at integers).
    """
    f0, f1, f2, f3 = fractions
    return (f0 * width - 0.5, f1 * height - 0.5, f2 * width - 0.5, f3 * height - 0.5)


def pixel_box_to_fractions(
    box: Sequence[float], height: int, width: int
) -> tuple[float, float, float, float]:
    """Inverse of :func:`fraction_box_to_pixels`."""
    b0, b1, b2, b3 = box
    return ((b0 + 0.5) / width, (b1 + 0.5) / height, (b2 + 0.5) / width, (b3 + 0.5) / height)


def _area(box: Sequence[float]) -> float:
    return float((box[2] - box[0]) * (box[3] - box[1]))


def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``(left, top, right, bottom)`` boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union)


def _resize(image: np.ndarray, scale: int) -> np.ndarray:
    """Integer-factor bicubic enlargement (PIL samples at pixel centres)."""
    if scale == 1:
        return image
    from PIL import Image

    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((w * scale, h * scale),
                                                    Image.Resampling.BICUBIC))


def _pad_for_box(image: np.ndarray, box: Sequence[float],
                 margin: float = PAD_MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """The image with its border pixels repeated outwards so that ``box`` grown by ``margin``
    x its side on every side lies inside, and the ``(dx, dy)`` shift of coordinates.

    dlib's landmark model reads pixels outside the image as black; a face the border cuts
    (a tight crop) is then pulled inwards. Replicated border pixels are a better guess.
    """
    h, w = image.shape[:2]
    side = max(box[2] - box[0], box[3] - box[1])
    grow = margin * side
    need = [box[0] - grow, box[1] - grow, (w - 1) - (box[2] + grow), (h - 1) - (box[3] + grow)]
    left, top, right, bottom = (max(0, math.ceil(-v)) for v in need)
    if not (left or top or right or bottom):
        return image, np.zeros(2)
    widths = ((top, bottom), (left, right)) + ((0, 0),) * (image.ndim - 2)
    return np.pad(image, widths, mode="edge"), np.array([left, top], dtype=float)


def _shrink(image: np.ndarray, factor: float) -> np.ndarray:
    """Area-averaged reduction by ``factor`` < 1 (pixel size ``round(side * factor)``)."""
    from PIL import Image

    h, w = image.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def _to_original(xy: np.ndarray, scale: float) -> np.ndarray:
    """Map pixel coordinates of an image enlarged by ``scale`` back to the original.

    The centre of enlarged pixel ``i`` lies at original coordinate ``(i + 0.5) / scale - 0.5``.
    """
    return (np.asarray(xy, dtype=float) + 0.5) / scale - 0.5


def _to_scaled(xy: np.ndarray | Sequence[float], scale: float) -> np.ndarray:
    """Inverse of :func:`_to_original`."""
    return (np.asarray(xy, dtype=float) + 0.5) * scale - 0.5


# --------------------------------------------------------------------------------------------
# Settings and results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LandmarkSettings:
    """How faces are found and landmarked. All fields are part of the cache key.

    Attributes
    ----------
    detector
        ``"hog"`` (dlib's frontal HOG + linear SVM detector, fast) or ``"cnn"`` (dlib's MMOD
        CNN ``mmod_human_face_detector.dat``; more tolerant of pose, ~100x slower on a CPU).
    faces
        ``"largest"`` (one face per image: the first by ``choose``, the largest box by default)
        or ``"all"`` (every face, in ``choose`` order).
    choose
        Which face comes first when several are found: ``"largest"`` box or the most
        ``"central"`` one (:func:`choose_faces`). Either way ``n_faces`` counts them and the
        status is ``several_faces``.
    precropped
        ``True`` for registered face crops (enlargement, expected-box check, fallback box),
        ``False`` for photos, ``"auto"`` to decide per image by its size.
    upsample
        dlib pyramid upsampling steps for photos; ``None``: the rule of :func:`upsample_plan`
        (module docstring).
    cnn_fallback
        Photos: when the HOG detector finds nothing, run dlib's MMOD CNN detector (on the
        photo shrunk to at most :data:`CNN_MAX_SIDE` px; 0.5-3 s per such photo).
    several_min_score
        Faces other than the chosen one count (``n_faces``, status ``several_faces``) when
        their detector score reaches this, or when their box is at least as large as the chosen
        face's. Upsampled HOG passes add weak detections on hands or textures (scores
        0.02-0.12 on the sample photos) while second people score 0.2-2.6 (one exception
        measured: a clear 86 px face at 0.07 beside a false one at 0.93, both kept: the chosen
        face always counts). ``faces="all"`` still returns every box.
    pad_edges
        Landmark faces near the image border on a copy whose border pixels are repeated
        outwards (:data:`PAD_MARGIN`), instead of the black dlib reads outside the image.
        Measured (``benchmarks/landmark_quality.py --table``): on 48 px crops of sample faces
        against their full-resolution landmarks, mean NME 0.019 -> 0.015 with FER2013's
        framing and 0.074 -> 0.034 on crops 1.5x tighter (chin cut; share above 0.08 NME
        30 % -> 0 %); on FER2013 crops made 1.5x tighter, against the landmarks of the
        original crop, the share above 0.08 falls from 60 % to 34 %.
    crop_min_side
        Pre-cropped images are enlarged (bicubic, integer factor) until their smaller side
        reaches this many pixels, before detection and landmarking.
    threshold
        Detector score threshold (HOG: SVM margin, dlib's default 0; CNN: confidence).
    min_box_iou
        Pre-cropped mode: a detection counts only when its box overlaps the expected box
        (``fallback_box``) by at least this IoU; this rejects detections of background texture.
    fallback_box
        Pre-cropped mode: the face box as fractions ``(left, top, right, bottom)`` of the crop,
        used when nothing is detected; ``None`` disables the fallback (status ``no_face``).
    refine_fallback
        After landmarking in a box the HOG detector did not draw (the pre-cropped fallback box,
        or a CNN detection), re-estimate the box from the landmarks (:func:`box_from_landmarks`)
        and landmark again, this many times. The fixed box fits the average crop; re-centring
        it on the face found halves the 90th percentile of the error (``landmarks/README.md``);
        CNN boxes sit higher and tighter than the HOG boxes the landmark model expects.
    backend
        Landmark predictor: ``"numpy"`` (:class:`ShapePredictor`, sub-pixel, batched) or
        ``"dlib"`` (dlib's own, whole-pixel output).
    """

    detector: Literal["hog", "cnn"] = "hog"
    faces: Literal["largest", "all"] = "largest"
    choose: Literal["largest", "central"] = "largest"
    precropped: bool | Literal["auto"] = "auto"
    upsample: int | None = None
    cnn_fallback: bool = True
    several_min_score: float = 0.3
    pad_edges: bool = True
    crop_min_side: int = 96
    threshold: float = 0.0
    min_box_iou: float = 0.3
    fallback_box: tuple[float, float, float, float] | None = FER2013_FACE_BOX
    refine_fallback: int = 2
    backend: Literal["numpy", "dlib"] = "numpy"

    def __post_init__(self) -> None:
        choices = {"detector": ("hog", "cnn"), "faces": ("largest", "all"),
                   "choose": ("largest", "central"), "cnn_fallback": (True, False),
                   "pad_edges": (True, False),
                   "precropped": (True, False, "auto"), "backend": ("numpy", "dlib")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {getattr(self, name)!r}")
        if self.upsample is not None and self.upsample < 0:
            raise ValueError(f"upsample must be >= 0 or None, not {self.upsample}")
        if self.refine_fallback < 0:
            raise ValueError(f"refine_fallback must be >= 0, not {self.refine_fallback}")
        if self.crop_min_side < 1:
            raise ValueError(f"crop_min_side must be >= 1, not {self.crop_min_side}")
        if self.fallback_box is not None:
            box = tuple(float(v) for v in self.fallback_box)
            if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
                raise ValueError("fallback_box must be (left, top, right, bottom) fractions "
                                 f"with left < right and top < bottom, not {self.fallback_box!r}")
            object.__setattr__(self, "fallback_box", box)

    def fingerprint(self) -> str:
        """Hash of these settings, the model versions and the pipeline version."""
        import dlib

        payload = {"settings": asdict(self), "pipeline": PIPELINE_VERSION,
                   "box_from_landmarks": BOX_FROM_LANDMARKS,
                   "dlib": dlib.__version__, "models": f"{MODEL_PACKAGE}-0.3.0"}
        text = json.dumps(payload, sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


@dataclass(frozen=True)
class FaceLandmarks:
    """One face (or the reason there is none) in one image.

    Attributes
    ----------
    status
        One of :data:`STATUSES`.
    landmarks
        ``(68, 2)`` float64 ``(x, y)`` pixel coordinates, or ``None`` without a face.
    box
        Face box ``(left, top, right, bottom)`` in pixels, or ``None``.
    path
        How the box was found: ``"hog"``, ``"cnn"``, ``"fallback_box"`` or ``"none"``.
    scale
        Factor by which the image was enlarged before detection (1 for photos).
    score
        Detector score of the face (NaN for the fallback box).
    n_faces
        Faces found in the image: the chosen one and the others scoring at least
        ``several_min_score`` or larger than it (0 for the fallback box).
    face_index
        Rank of this face by the ``choose`` rule (0 = the face a one-face command uses).
    message
        Why there is no face, for ``no_face``/``unreadable``/``invalid``/``error``.
    """

    status: str
    landmarks: np.ndarray | None = None
    box: tuple[float, float, float, float] | None = None
    path: str = "none"
    scale: float = 1.0
    score: float = math.nan
    n_faces: int = 0
    face_index: int = 0
    message: str = ""

    @property
    def ok(self) -> bool:
        """Whether landmarks are available."""
        return self.landmarks is not None

    @property
    def iod(self) -> float:
        """Inter-ocular distance in pixels (NaN without landmarks)."""
        return math.nan if self.landmarks is None else float(inter_ocular_distance(self.landmarks))


def _check_image(image: Any) -> tuple[np.ndarray | None, str, str]:
    """Return (C-contiguous image, status, message); status is "" when the image is usable."""
    if image is None:
        return None, "unreadable", "no pixels (the image could not be read)"
    if not isinstance(image, np.ndarray):
        return None, "invalid", f"expected a numpy array, got {type(image).__name__}"
    if image.dtype != np.uint8:
        return None, "invalid", f"expected dtype uint8, got {image.dtype}"
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        return None, "invalid", f"expected shape (H, W) or (H, W, 3), got {image.shape}"
    if min(image.shape[:2]) < 8:
        return None, "invalid", f"image too small to hold a face: {image.shape}"
    return np.ascontiguousarray(image), "", ""


# --------------------------------------------------------------------------------------------
# The detector (holds dlib's models)
# --------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    """A face box waiting for the batched landmark predictor."""

    work: np.ndarray
    box: tuple[float, float, float, float]  # original pixel frame
    work_box: tuple[float, float, float, float]  # pixel frame of ``work``
    scale: int
    status: str
    path: str
    score: float
    n_faces: int
    face_index: int


class LandmarkDetector:
    """Face detector + 68-point landmark predictor; models load lazily, once per instance.

    Parameters
    ----------
    settings
        A :class:`LandmarkSettings`; keyword arguments override its fields.

    Examples
    --------
    >>> from skimage import data
    >>> face = LandmarkDetector()(data.astronaut())
    >>> face.status, face.landmarks.shape
    ('detected', (68, 2))
    """

    def __init__(self, settings: LandmarkSettings | None = None, **overrides: Any) -> None:
        settings = settings or LandmarkSettings()
        self.settings = replace(settings, **overrides) if overrides else settings
        self._detector: Any = None
        self._cnn: Any = None
        self._predictor: Any = None

    @property
    def predictor(self) -> Any:
        """The landmark predictor (:class:`ShapePredictor` or dlib's), loaded on first use."""
        if self._predictor is None:
            if self.settings.backend == "dlib":
                import dlib

                self._predictor = dlib.shape_predictor(str(model_path(PREDICTOR_FILE)))
            else:
                self._predictor = ShapePredictor.load()
        return self._predictor

    @property
    def detector(self) -> Any:
        """dlib's face detector (HOG or CNN per the settings), loaded on first use."""
        if self._detector is None:
            import dlib

            if self.settings.detector == "cnn":
                self._detector = self.cnn_detector
            else:
                self._detector = dlib.get_frontal_face_detector()
        return self._detector

    @property
    def cnn_detector(self) -> Any:
        """dlib's MMOD CNN face detector (primary or fallback), loaded on first use."""
        if self._cnn is None:
            import dlib

            self._cnn = dlib.cnn_face_detection_model_v1(str(model_path(CNN_DETECTOR_FILE)))
        return self._cnn

    def __call__(self, image: np.ndarray | None) -> FaceLandmarks:
        """Landmarks of the largest face of one image (never raises on bad input)."""
        return self.detect(image)[0]

    def detect(self, image: np.ndarray | None) -> list[FaceLandmarks]:
        """Faces and landmarks of one image; see :meth:`detect_many`."""
        return self.detect_many([image])[0]

    def detect_many(self, images: Sequence[np.ndarray | None]) -> list[list[FaceLandmarks]]:
        """Faces and landmarks of several images (landmarks are predicted as one batch).

        Parameters
        ----------
        images
            ``(H, W)`` or ``(H, W, 3)`` uint8 arrays; ``None`` for unreadable files.

        Returns
        -------
        list of list of FaceLandmarks
            One list per image, never empty: with ``faces="largest"`` exactly one entry; with
            ``"all"`` one per face, largest first (or one entry saying why there is none).
        """
        results: list[list[FaceLandmarks]] = [[] for _ in images]
        pending: list[tuple[int, _Pending]] = []
        for i, image in enumerate(images):
            img, status, message = _check_image(image)
            if img is None:
                results[i] = [FaceLandmarks(status=status, message=message)]
                continue
            try:
                found = self._find_boxes(img)
            except Exception as exc:  # dlib raises RuntimeError on odd inputs: keep going
                log.warning("face detection failed: %s", exc)
                results[i] = [FaceLandmarks("error", message=f"{type(exc).__name__}: {exc}")]
                continue
            if isinstance(found, FaceLandmarks):
                results[i] = [found]
            else:
                pending.extend((i, p) for p in found)
        if pending:
            self._landmark(pending, results)
        return results

    def is_precropped(self, image: np.ndarray) -> bool:
        """Whether ``image`` is handled as a registered face crop under these settings."""
        if self.settings.precropped == "auto":
            return min(image.shape[:2]) <= AUTO_PRECROPPED_MAX_SIDE
        return bool(self.settings.precropped)

    def landmarks_in_boxes(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Landmarks predicted in given face boxes of one image (no detection).

        Parameters
        ----------
        image
            ``(H, W)`` or ``(H, W, 3)`` uint8.
        boxes
            ``(N, 4)`` boxes ``(left, top, right, bottom)`` in pixels of ``image``.

        Returns
        -------
        numpy.ndarray
            ``(N, 68, 2)`` float64 ``(x, y)``.
        """
        img, status, message = _check_image(image)
        if img is None:
            raise ValueError(f"cannot landmark this image: {message}")
        boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
        return self._predict([img] * len(boxes), boxes)

    # -- internals ---------------------------------------------------------------------------

    def _raw_detections(self, image: np.ndarray, upsample: int,
                        cnn: bool = False) -> list[tuple[tuple, float]]:
        """Detector boxes ``((l, t, r, b), score)`` in the pixel frame of ``image``."""
        s = self.settings
        if cnn or s.detector == "cnn":
            found = [((d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()),
                      float(d.confidence)) for d in self.cnn_detector(image, upsample)]
            return [(b, c) for b, c in found if c >= s.threshold]
        rects, scores, _ = self.detector.run(image, upsample, s.threshold)
        return [((r.left(), r.top(), r.right(), r.bottom()), float(c))
                for r, c in zip(rects, scores, strict=True)]

    def _photo_detections(self, img: np.ndarray) -> tuple[list[tuple[tuple, float]], str]:
        """Boxes in a photo by the upsampling rule, then the CNN fallback; and the path."""
        s = self.settings
        h, w = img.shape[:2]
        always, if_none = upsample_plan(h, w, s.upsample)
        raw: list[tuple[tuple, float]] = []
        for steps in always:
            for box, score in self._raw_detections(img, steps):
                if all(_box_iou(box, kept) <= SAME_FACE_IOU for kept, _ in raw):
                    raw.append((box, score))
        for steps in if_none:
            if raw:
                break
            raw = self._raw_detections(img, steps)
        if raw or s.detector == "cnn" or not s.cnn_fallback:
            return raw, s.detector
        # MMOD is slow: run it on a shrunk copy, and map its boxes back
        shrink = min(1.0, CNN_MAX_SIDE / max(h, w))
        small = img if shrink == 1 else _shrink(img, shrink)
        found = self._raw_detections(small, int(max(small.shape[:2]) < 400), cnn=True)
        return [(tuple(float(v) for v in _to_original(b, shrink)), c) for b, c in found], "cnn"

    def _find_boxes(self, img: np.ndarray) -> list[_Pending] | FaceLandmarks:
        """Face boxes to landmark, or the final result when there is nothing to landmark."""
        s = self.settings
        h, w = img.shape[:2]
        precropped = self.is_precropped(img)
        if precropped:
            scale = max(1, math.ceil(s.crop_min_side / min(h, w)))
            work = _resize(img, scale)
            raw, path = self._raw_detections(work, 0), s.detector
        else:
            scale, work = 1, img
            raw, path = self._photo_detections(img)
        boxes = [(tuple(float(v) for v in _to_original(b, scale)), b, score) for b, score in raw]
        expected = None
        if precropped and s.fallback_box is not None:
            expected = fraction_box_to_pixels(s.fallback_box, h, w)
            boxes = [bs for bs in boxes if _box_iou(bs[0], expected) >= s.min_box_iou]
        if boxes:
            boxes = [boxes[i] for i in choose_faces([b for b, _, _ in boxes], h, w, s.choose)]
        # the chosen face, and every other one the detector is confident about or that is at
        # least as large as the chosen one (with choose="central" a larger face passed over
        # is never silent)
        n = min(len(boxes), 1) + sum(
            sc >= s.several_min_score or _area(b) >= _area(boxes[0][0])
            for b, _, sc in boxes[1:])
        if s.faces == "largest":
            boxes = boxes[:1]
        if boxes:
            status = "several_faces" if n > 1 and s.faces == "largest" else "detected"
            return [_Pending(work, b, wb, scale, status, path, sc, n, i)
                    for i, (b, wb, sc) in enumerate(boxes)]
        if expected is not None:
            work_box = tuple(float(v) for v in _to_scaled(expected, scale))
            return [_Pending(work, expected, work_box, scale, "fallback_box", "fallback_box",
                             math.nan, 0, 0)]
        return FaceLandmarks("no_face", scale=float(scale), message="no face found by the detector")

    def _predict(self, works: list[np.ndarray], work_boxes: np.ndarray) -> np.ndarray:
        if self.settings.backend == "dlib":
            import dlib

            out = []
            for work, box in zip(works, work_boxes, strict=True):
                shape = self.predictor(work, dlib.rectangle(*(int(round(v)) for v in box)))
                out.append([(p.x, p.y) for p in shape.parts()])
            return np.array(out, dtype=float).reshape(-1, N_LANDMARKS, 2)
        return self.predictor.predict(works, work_boxes)

    def _landmark(self, pending: list[tuple[int, _Pending]],
                  results: list[list[FaceLandmarks]]) -> None:
        works = [p.work for _, p in pending]
        work_boxes = np.array([p.work_box for _, p in pending], dtype=float)
        shifts = np.zeros((len(pending), 2))
        if self.settings.pad_edges:
            for r, box in enumerate(work_boxes):
                works[r], shifts[r] = _pad_for_box(works[r], box)
            work_boxes += np.concatenate([shifts, shifts], axis=1)
        try:
            xy = self._predict(works, work_boxes)
            # boxes the HOG detector did not draw are re-estimated from the landmarks
            fallback = np.array([p.path in ("fallback_box", "cnn") for _, p in pending])
            for _ in range(self.settings.refine_fallback if fallback.any() else 0):
                rows = np.flatnonzero(fallback)
                work_boxes[rows] = box_from_landmarks(xy[rows])
                xy[rows] = self._predict([works[r] for r in rows], work_boxes[rows])
        except Exception as exc:  # keep the batch: redo one by one to isolate the culprit
            if len(pending) > 1:
                for item in pending:
                    self._landmark([item], results)
                return
            i, _ = pending[0]
            results[i] = [FaceLandmarks("error", message=f"{type(exc).__name__}: {exc}")]
            return
        xy = xy - shifts[:, None, :]
        work_boxes -= np.concatenate([shifts, shifts], axis=1)
        for (i, p), lm, wb in zip(pending, xy, work_boxes, strict=True):
            lm = _to_original(lm, p.scale) if p.scale != 1 else lm
            box = tuple(float(v) for v in _to_original(wb, p.scale))
            results[i].append(FaceLandmarks(p.status, lm, box, p.path, float(p.scale),
                                            p.score, p.n_faces, p.face_index))


# --------------------------------------------------------------------------------------------
# Landmark cache (SQLite under cache_dir("landmarks"))
# --------------------------------------------------------------------------------------------


def image_digest(image: np.ndarray) -> str:
    """Content hash of an image array (shape, dtype and pixels)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.shape}{image.dtype}".encode())
    h.update(np.ascontiguousarray(image).data)
    return h.hexdigest()


class LandmarkCache:
    """Landmarks keyed by (image content hash, settings fingerprint), in one SQLite file.

    Parameters
    ----------
    path
        Database file; default ``cache_dir("landmarks") / "landmarks.sqlite"``.
    """

    _SCHEMA = """CREATE TABLE IF NOT EXISTS faces (
        image TEXT, settings TEXT, face INTEGER, status TEXT, path TEXT, scale REAL,
        score REAL, n_faces INTEGER, box BLOB, landmarks BLOB, message TEXT,
        PRIMARY KEY (image, settings, face)) WITHOUT ROWID"""
    #: statuses worth caching (the others are not computed from pixels, or may be transient)
    CACHED = ("detected", "fallback_box", "no_face")

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        if path is None:
            from .paths import cache_dir

            path = cache_dir("landmarks") / "landmarks.sqlite"
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
        self._db.execute(self._SCHEMA)
        self._db.commit()

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def __enter__(self) -> LandmarkCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_many(self, digests: Sequence[str], settings: str) -> dict[str, list[FaceLandmarks]]:
        """Cached results for the given image digests (missing ones are absent)."""
        found: dict[str, list[FaceLandmarks]] = {}
        unique = list(dict.fromkeys(digests))
        for a in range(0, len(unique), 500):  # SQLite bounds the number of parameters
            part = unique[a : a + 500]
            marks = ",".join("?" * len(part))
            rows = self._db.execute(
                f"SELECT image, face, status, path, scale, score, n_faces, box, landmarks, "
                f"message FROM faces WHERE settings = ? AND image IN ({marks}) ORDER BY face",
                [settings, *part])
            for image, face, status, path, scale, score, n, box, lm, message in rows:
                landmarks = None if lm is None else np.frombuffer(lm, "<f8").reshape(-1, 2).copy()
                box_t = None if box is None else tuple(float(v) for v in np.frombuffer(box, "<f8"))
                found.setdefault(image, []).append(FaceLandmarks(
                    status, landmarks, box_t, path, scale,
                    math.nan if score is None else score, n, face, message))
        return found

    def put_many(self, entries: Iterable[tuple[str, list[FaceLandmarks]]], settings: str) -> None:
        """Store results (one transaction; statuses outside :attr:`CACHED` are skipped)."""
        rows = []
        for digest, faces in entries:
            if not faces or faces[0].status not in self.CACHED:
                continue
            for f in faces:
                rows.append((
                    digest, settings, f.face_index, f.status, f.path, f.scale,
                    None if math.isnan(f.score) else f.score, f.n_faces,
                    None if f.box is None else np.asarray(f.box, "<f8").tobytes(),
                    None if f.landmarks is None else np.asarray(f.landmarks, "<f8").tobytes(),
                    f.message))
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO faces VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                                 rows)


# --------------------------------------------------------------------------------------------
# Many images -> one table
# --------------------------------------------------------------------------------------------

_WORKER: LandmarkDetector | None = None
#: Images per worker task: large enough for the batched predictor to amortise its per-level
#: numpy overhead, small enough to balance two workers.
_TASK = 128


def _worker_init(settings: LandmarkSettings) -> None:
    """Pool initialiser: one detector (models loaded once) per worker process."""
    global _WORKER
    _WORKER = LandmarkDetector(settings)
    _WORKER.predictor  # noqa: B018 - load the models now, not inside the first task
    _WORKER.detector  # noqa: B018


def _worker_run(images: list[np.ndarray | None]) -> list[list[FaceLandmarks]]:
    assert _WORKER is not None, "worker used without _worker_init"
    return _WORKER.detect_many(images)


def landmark_columns() -> list[str]:
    """Names of the 136 landmark columns: ``x0..x67`` then ``y0..y67``."""
    return [f"x{i}" for i in range(N_LANDMARKS)] + [f"y{i}" for i in range(N_LANDMARKS)]


def _rows_to_frame(keys: list[str], faces: list[FaceLandmarks],
                   sizes: list[tuple[int, int] | None], choose: str = "largest") -> Any:
    import pandas as pd

    n = len(faces)
    lm = np.full((n, N_LANDMARKS, 2), np.nan)
    box = np.full((n, 4), np.nan)
    for r, f in enumerate(faces):
        if f.landmarks is not None:
            lm[r] = f.landmarks
        if f.box is not None:
            box[r] = f.box
    meta = pd.DataFrame({
        "key": keys,
        "status": [f.status for f in faces],
        "path": [f.path for f in faces],
        "scale": np.array([f.scale for f in faces], dtype=float),
        "face_index": np.array([f.face_index for f in faces], dtype=int),
        "n_faces": np.array([f.n_faces for f in faces], dtype=int),
        "chosen_by": [choose if f.status in ("detected", "several_faces") else ""
                      for f in faces],
        "score": np.array([f.score for f in faces], dtype=float),
        "box_left": box[:, 0], "box_top": box[:, 1],
        "box_right": box[:, 2], "box_bottom": box[:, 3],
        "iod": inter_ocular_distance(lm),
        "n_outside": np.array([0 if size is None else int(landmarks_outside(lm[r], *size))
                               for r, size in enumerate(sizes)], dtype=int),
        "message": [f.message for f in faces],
    })
    coords = pd.DataFrame(np.concatenate([lm[..., 0], lm[..., 1]], axis=1),
                          columns=landmark_columns())
    return pd.concat([meta, coords], axis=1)


def _blocks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    block: list[Any] = []
    for item in items:
        block.append(item)
        if len(block) == size:
            yield block
            block = []
    if block:
        yield block


def landmarks_table(
    images: Iterable[tuple[str, np.ndarray | None] | tuple[str, np.ndarray | None, str | None]],
    *,
    settings: LandmarkSettings | None = None,
    workers: int | None = None,
    cache: bool | str | os.PathLike = True,
    progress: bool = True,
    total: int | None = None,
    **overrides: Any,
) -> Any:
    """Landmarks of many images as a table, in parallel, with a cache.

    Parameters
    ----------
    images
        ``(key, image)`` pairs (or ``(key, image, error)`` triples, e.g. from
        :class:`interp_fer.data.ImageDataset`); ``image`` is a uint8 ``(H, W)`` or
        ``(H, W, 3)`` array, or ``None`` for an unreadable file (``error`` says why).
    settings
        :class:`LandmarkSettings`; keyword arguments (``detector=``, ``faces=``,
        ``precropped=``, ...) override its fields.
    workers
        Worker processes (each loads the models once); default: every CPU core, at most 8.
        1, or fewer than 256 images left to compute, runs in this process.
    cache
        ``True``: reuse and extend the cache under ``cache_dir("landmarks")``; a path: that
        SQLite file; ``False``: no cache.
    progress
        Show a tqdm progress bar.
    total
        Number of images, for the progress bar when ``images`` has no length.

    Returns
    -------
    pandas.DataFrame
        One row per image (per face with ``faces="all"``), in input order: ``key``,
        ``status`` (:data:`STATUSES`; ``several_faces`` when the detector found more than one
        face and one was chosen), ``path`` (``hog``/``cnn``/``fallback_box``/``none``),
        ``scale``, ``face_index``, ``n_faces`` (faces found in the image), ``chosen_by`` (the
        ``choose`` rule that ordered the faces; empty without a detection), ``score``,
        ``box_left``, ``box_top``, ``box_right``, ``box_bottom``, ``iod`` (pixels, between the
        eye centres), ``n_outside`` (landmarks outside the image, :func:`landmarks_outside`),
        ``message``, then ``x0..x67``, ``y0..y67`` (pixels of the given image; NaN without a
        face).
    """
    from tqdm.auto import tqdm

    settings = settings or LandmarkSettings()
    if overrides:
        settings = replace(settings, **overrides)
    fingerprint = settings.fingerprint()
    if total is None and hasattr(images, "__len__"):
        total = len(images)  # type: ignore[arg-type]
    # each worker holds its own models (~70 MB): all cores, but no more than 8 by default
    workers = max(1, workers if workers is not None else min(8, os.cpu_count() or 1))
    store = None
    if cache:
        store = LandmarkCache(None if cache is True else cache)

    keys: list[str] = []
    faces: list[FaceLandmarks] = []
    sizes: list[tuple[int, int] | None] = []
    local: LandmarkDetector | None = None
    pool = None
    bar = tqdm(total=total, disable=not progress, unit="img", desc="landmarks")
    try:
        for block in _blocks(images, 2048):
            block_keys, block_imgs, block_msgs = [], [], []
            for item in block:
                block_keys.append(str(item[0]))
                block_imgs.append(item[1])
                block_msgs.append(item[2] if len(item) > 2 else None)
            computed: dict[int, list[FaceLandmarks]] = {}
            digests: list[str | None] = []
            for i, im in enumerate(block_imgs):  # bad input needs no detector (nor cache)
                checked, status, message = _check_image(im)
                if checked is None:
                    computed[i] = [FaceLandmarks(status=status, message=message)]
                    digests.append(None)
                else:
                    block_imgs[i] = checked
                    digests.append(image_digest(checked))
            known = store.get_many([d for d in digests if d], fingerprint) if store else {}
            todo = [i for i, d in enumerate(digests) if d is not None and d not in known]
            if len(todo) >= 2 * _TASK and workers > 1:
                if pool is None:
                    if settings.backend == "numpy":
                        ShapePredictor.load()  # convert the model once, before the workers
                    pool = _make_pool(workers, settings)
                chunks = [todo[a : a + _TASK] for a in range(0, len(todo), _TASK)]
                for chunk, res in zip(chunks, pool.map(
                        _worker_run, [[block_imgs[i] for i in c] for c in chunks]), strict=True):
                    computed.update(zip(chunk, res, strict=True))
                    bar.update(len(chunk))
            elif todo:
                local = local or LandmarkDetector(settings)
                res = local.detect_many([block_imgs[i] for i in todo])
                computed.update(zip(todo, res, strict=True))
                bar.update(len(todo))
            bar.update(len(block) - len(todo))
            if store:
                store.put_many(((digests[i], computed[i]) for i in todo), fingerprint)
            for i, key in enumerate(block_keys):
                result = computed.get(i) or known[digests[i]]  # type: ignore[index]
                if block_msgs[i] and result[0].status == "unreadable":
                    result = [replace(result[0], message=str(block_msgs[i]))]
                keys.extend([key] * len(result))
                faces.extend(result)
                size = None if digests[i] is None else block_imgs[i].shape[:2]
                sizes.extend([size] * len(result))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
        if store is not None:
            store.close()
    table = _rows_to_frame(keys, faces, sizes, settings.choose)
    table.attrs["landmark_settings"] = asdict(settings)
    return table


def _make_pool(workers: int, settings: LandmarkSettings) -> Any:
    """Process pool whose workers each hold one :class:`LandmarkDetector`."""
    # fork where it exists: workers start at once and, unlike spawn/forkserver, do not re-run
    # the caller's script (which would recurse without an ``if __name__ == "__main__"`` guard).
    # Workers only run numpy and dlib, so threads inherited from e.g. torch are not touched.
    # An executor, not mp.Pool: a worker that dies (e.g. a crash inside dlib) raises
    # BrokenProcessPool here instead of leaving the caller waiting forever.
    from concurrent.futures import ProcessPoolExecutor

    method = "fork" if "fork" in mp.get_all_start_methods() else None
    return ProcessPoolExecutor(workers, mp_context=mp.get_context(method),
                               initializer=_worker_init, initargs=(settings,))


def landmarks_array(table: Any) -> np.ndarray:
    """The ``(N, 68, 2)`` landmark array of a :func:`landmarks_table` table (NaN = no face)."""
    x = table[[f"x{i}" for i in range(N_LANDMARKS)]].to_numpy(dtype=float)
    y = table[[f"y{i}" for i in range(N_LANDMARKS)]].to_numpy(dtype=float)
    return np.stack([x, y], axis=-1)


def write_landmarks(table: Any, path: str | os.PathLike) -> Path:
    """Write a :func:`landmarks_table` table to CSV (coordinates to 1/1000 pixel).

    Parameters
    ----------
    table
        The table.
    path
        Output ``.csv`` file; parent folders are created.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    table.to_csv(partial, index=False, float_format="%.3f")
    os.replace(partial, path)  # never leave half a CSV behind
    return path


def read_landmarks(path: str | os.PathLike) -> Any:
    """Read a CSV written by :func:`write_landmarks` back into a table."""
    import pandas as pd

    table = pd.read_csv(path, dtype={"key": str, "message": str, "chosen_by": str})
    for column in ("message", "chosen_by"):
        if column in table:  # tables written before chosen_by existed lack it
            table[column] = table[column].fillna("")
    return table
