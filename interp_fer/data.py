"""Reading face images and their labels from the layouts FER researchers use.

:func:`open_dataset` recognises:

* a folder of class sub-folders (``root/happy/001.png``): labels from folder names;
* a flat folder of images (no labels);
* a FER2013 CSV (``emotion,pixels,Usage``, 48x48 pixels as space-separated numbers);
* a labels CSV (``path,label_index[,label_name][,usage][,AU columns]``), paths relative to
  the CSV; AU columns are named like ``AU12``/``AU_12``/``au12`` and hold 0/1 or intensities;
* a single image file.

Images come out as uint8 arrays, (H, W) for gray sources and (H, W, 3) for colour ones
(16-bit images are scaled to 8 bits, alpha is dropped). A file that cannot be read is not
fatal: its :class:`Sample` has ``image=None`` and ``error`` says why, and
:meth:`ImageDataset.batches` counts it in :attr:`ImageDataset.skipped`.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .preprocessing import to_uint8_range

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm", ".ppm"}
_AU_COLUMN = re.compile(r"^au[\s_-]?0*(\d+)$", re.IGNORECASE)


class DatasetError(ValueError):
    """The dataset as a whole cannot be read (missing path, unknown layout, bad CSV header)."""


@dataclass
class Record:
    """Where one image is and what is known about it, before it is read.

    Attributes
    ----------
    key
        A unique name: the file path, or ``"file.csv:ROW"`` for CSV pixel rows.
    path
        Image file, or None for images stored in a CSV.
    pixels
        The CSV pixel string, for FER2013 CSV rows.
    label, label_name
        Class index and name, when labelled.
    usage
        Split name (e.g. ``PublicTest``), when given.
    aus
        AU number -> value, when AU columns are given.
    """

    key: str
    path: Path | None = None
    pixels: str | None = None
    label: int | None = None
    label_name: str | None = None
    usage: str | None = None
    aus: dict[int, float] | None = None


@dataclass
class Sample:
    """A read image with its record; ``image`` is None (and ``error`` set) if unreadable."""

    record: Record
    image: np.ndarray | None
    error: str | None = None

    @property
    def key(self) -> str:
        return self.record.key


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as uint8, (H, W) for gray sources or (H, W, 3) for colour ones.

    Handles 1-bit, 8-bit and 16-bit gray, palette, RGB, RGBA/LA (alpha dropped) and CMYK.

    Raises
    ------
    OSError, ValueError
        When the file is missing, truncated or not an image.
    """
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        mode = image.mode
        if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
            array = np.asarray(image, dtype=np.uint16)
        elif mode in ("I", "F"):
            array = np.asarray(image).astype(np.float64)
            top = 65535.0 if array.max(initial=0) > 255 else 255.0
            array = np.clip(array, 0, top) * (255.0 / top)
        elif mode in ("1", "L", "LA"):
            array = np.asarray(image.convert("L"))
        else:
            array = np.asarray(image.convert("RGB"))
    return np.rint(to_uint8_range(array)).astype(np.uint8) if array.dtype != np.uint8 else array


def stratified_counts(labels: list[int], total: int) -> dict[int, int]:
    """Records to keep per class: ``total`` shared in proportion to the class sizes.

    Largest-remainder rounding (ties to the smaller class index), so the counts sum to
    ``min(total, len(labels))`` and each differs from its exact share by less than one.
    """
    sizes: dict[int, int] = {}
    for label in labels:
        sizes[label] = sizes.get(label, 0) + 1
    total = max(0, min(int(total), len(labels)))
    exact = {label: total * size / len(labels) for label, size in sizes.items()} if labels else {}
    counts = {label: int(share) for label, share in exact.items()}
    order = sorted(exact, key=lambda label: (-(exact[label] - counts[label]), label))
    for label in order[:total - sum(counts.values())]:
        counts[label] += 1
    return counts


def fer2013_pixels(pixels: str) -> np.ndarray:
    """Decode one FER2013 CSV ``pixels`` cell into a (48, 48) uint8 image."""
    values = np.array(pixels.split(), dtype=np.float64)
    side = int(round(np.sqrt(values.size)))
    if side * side != values.size or values.size == 0:
        raise ValueError(f"{values.size} pixel values do not form a square image")
    if values.min() < 0 or values.max() > 255:
        raise ValueError("pixel values outside 0-255")
    return values.reshape(side, side).astype(np.uint8)


@dataclass
class ImageDataset:
    """Images and labels, read lazily.

    Attributes
    ----------
    records
        One per image, in a stable order.
    class_names
        Label names by index, when the dataset is labelled (else empty).
    source
        The path the dataset was opened from.
    skipped
        ``(key, reason)`` of every unreadable image met by :meth:`batches` / :meth:`samples`.
    """

    records: list[Record]
    class_names: tuple[str, ...] = ()
    source: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labelled(self) -> bool:
        return any(record.label is not None for record in self.records)

    @property
    def au_numbers(self) -> list[int]:
        """AU numbers present as columns (empty without AU labels)."""
        found = set()
        for record in self.records:
            if record.aus:
                found.update(record.aus)
        return sorted(found)

    def with_labels(self, labels_csv: str | os.PathLike) -> ImageDataset:
        """These images with the labels of a labels CSV (``path,label_index|label_name,...``).

        Each record is matched to a CSV row by its resolved path, else by its file name
        (when that is unique in the CSV). Records without a row keep what they had.

        Raises
        ------
        DatasetError
            When the CSV is not a labels CSV or matches none of the images.
        """
        labelled = open_dataset(labels_csv, class_names=self.class_names or None)
        if any(r.path is None for r in labelled.records):
            raise DatasetError(f"{labels_csv}: expected a labels CSV with a 'path' column")
        by_path = {r.path.resolve(): r for r in labelled.records}
        names: dict[str, list[Record]] = {}
        for r in labelled.records:
            names.setdefault(r.path.name, []).append(r)
        records, matched = [], 0
        for record in self.records:
            row = by_path.get(record.path.resolve()) if record.path is not None else None
            if row is None and record.path is not None and len(names.get(record.path.name,
                                                                         [])) == 1:
                row = names[record.path.name][0]
            if row is None:
                records.append(record)
                continue
            matched += 1
            records.append(replace(record, label=row.label, label_name=row.label_name,
                                   aus=row.aus))
        if not matched:
            raise DatasetError(f"{labels_csv}: none of its paths matches an image of "
                               f"{self.source}")
        return ImageDataset(records, labelled.class_names or self.class_names, self.source)

    def subset(self, usage: str | None = None, limit: int | None = None, *,
               stratify: bool = False) -> ImageDataset:
        """A dataset restricted to one ``usage`` and/or ``limit`` records.

        Parameters
        ----------
        usage
            Keep only records of this split (e.g. ``"PublicTest"``).
        limit
            Number of records kept: the first ``limit`` in file order, or with ``stratify``
            the first ones of each class in proportion to the class sizes (largest-remainder
            rounding), so that a file sorted by expression (as FER2013's test split is) does
            not give a single class. Records keep their file order.
        stratify
            Keep each class's share; needs ``limit`` and an expression label on every record.

        Raises
        ------
        ValueError
            ``stratify`` without ``limit``, or on records without expression labels.
        """
        records = [r for r in self.records if usage is None or r.usage == usage]
        if not stratify:
            return ImageDataset(records[:limit], self.class_names, self.source)
        if limit is None:
            raise ValueError("stratify needs a limit (the number of records to keep)")
        unlabelled = sum(r.label is None for r in records)
        if unlabelled:
            raise ValueError(f"{self.source}: {unlabelled} of {len(records)} records have no "
                             "expression label; a stratified subset needs one on every record")
        quota = stratified_counts([r.label for r in records], limit)
        kept = []
        for record in records:
            if quota.get(record.label, 0) > 0:
                quota[record.label] -= 1
                kept.append(record)
        return ImageDataset(kept, self.class_names, self.source)

    def load(self, record: Record) -> Sample:
        """Read one record's image; errors are returned in the sample, not raised."""
        try:
            if record.pixels is not None:
                image = fer2013_pixels(record.pixels)
            else:
                image = read_image(record.path)
        except Exception as error:  # any decoder failure makes this one image unreadable
            return Sample(record, None, f"{type(error).__name__}: {error}")
        return Sample(record, image)

    def samples(self) -> Iterator[Sample]:
        """Yield every sample in order, unreadable ones included (and recorded in ``skipped``)."""
        self.skipped.clear()
        for record in self.records:
            sample = self.load(record)
            if sample.image is None:
                self.skipped.append((record.key, sample.error or "unreadable"))
            yield sample

    def __iter__(self) -> Iterator[Sample]:
        return self.samples()

    def batches(self, batch_size: int = 256) -> Iterator[list[Sample]]:
        """Yield lists of readable samples; unreadable ones are recorded in ``skipped``."""
        batch: list[Sample] = []
        for sample in self.samples():
            if sample.image is None:
                continue
            batch.append(sample)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_index(names: Sequence[str], class_names: Sequence[str] | None) -> dict[str, int]:
    if class_names:
        lookup = {name.lower(): i for i, name in enumerate(class_names)}
        unknown = [name for name in names if name.lower() not in lookup]
        if unknown:
            raise DatasetError(f"class folders {unknown} are not among the classes "
                               f"{list(class_names)}")
        return {name: lookup[name.lower()] for name in names}
    return {name: i for i, name in enumerate(sorted(names))}


def _open_folder(root: Path, class_names: Sequence[str] | None) -> ImageDataset:
    subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    labelled = [p for p in subfolders if _image_files(p)]
    if labelled:
        index = _class_index([p.name for p in labelled], class_names)
        names = tuple(class_names) if class_names else tuple(sorted(index, key=index.get))
        records = [
            Record(str(path), path, label=index[folder.name], label_name=names[index[folder.name]])
            for folder in labelled for path in _image_files(folder)
        ]
        return ImageDataset(records, names, str(root))
    files = _image_files(root)
    if not files:
        raise DatasetError(f"{root}: no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))} "
                           "files, directly or in class sub-folders)")
    return ImageDataset([Record(str(p), p) for p in files], tuple(class_names or ()), str(root))


def _open_fer2013_csv(path: Path, rows: list[dict[str, str]],
                      class_names: Sequence[str] | None) -> ImageDataset:
    from .zoo import FER2013_CLASSES

    names = tuple(class_names or FER2013_CLASSES)
    records = []
    for number, row in enumerate(rows, start=2):
        label = int(row["emotion"]) if row.get("emotion", "").strip() else None
        records.append(Record(
            f"{path}:{number}", pixels=row["pixels"], label=label,
            label_name=names[label] if label is not None and label < len(names) else None,
            usage=row.get("Usage") or row.get("usage") or None,
        ))
    return ImageDataset(records, names, str(path))


def _open_labels_csv(path: Path, rows: list[dict[str, str]], header: Sequence[str],
                     class_names: Sequence[str] | None) -> ImageDataset:
    au_columns = {column: int(m.group(1)) for column in header
                  if (m := _AU_COLUMN.match(column.strip()))}
    names_by_index: dict[int, str] = {}
    records = []
    for number, row in enumerate(rows, start=2):
        relative = (row.get("path") or "").strip()
        if not relative:
            raise DatasetError(f"{path}:{number}: empty path")
        label = row.get("label_index", "").strip()
        label_name = (row.get("label_name") or "").strip() or None
        label_value = int(label) if label else None
        if label_value is not None and label_name:
            names_by_index.setdefault(label_value, label_name)
        aus = None
        if au_columns:
            aus = {au: float(row[column]) for column, au in au_columns.items()
                   if (row.get(column) or "").strip() != ""}
        records.append(Record(str(path.parent / relative), path.parent / relative,
                              label=label_value, label_name=label_name,
                              usage=(row.get("usage") or "").strip() or None, aus=aus))
    if class_names:
        names = tuple(class_names)
    elif names_by_index:
        names = tuple(names_by_index.get(i, str(i)) for i in range(max(names_by_index) + 1))
    else:
        names = ()
    for record in records:
        if record.label is not None and record.label_name is None and record.label < len(names):
            record.label_name = names[record.label]
    return ImageDataset(records, names, str(path))


def open_dataset(path: str | os.PathLike, *,
                 class_names: Sequence[str] | None = None) -> ImageDataset:
    """Open a dataset of face images in any supported layout (see the module docstring).

    Parameters
    ----------
    path
        Folder, CSV file or image file.
    class_names
        Class names in the model's output order. For class folders they fix the label index
        of each folder (matched case-insensitively); for CSVs they name the indices.

    Returns
    -------
    ImageDataset

    Raises
    ------
    DatasetError
        When the path does not exist or its layout is not recognised.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    if path.is_dir():
        return _open_folder(path, class_names)
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = list(reader)
        if {"emotion", "pixels"} <= set(header):
            return _open_fer2013_csv(path, rows, class_names)
        if "path" in header:
            return _open_labels_csv(path, rows, header, class_names)
        raise DatasetError(f"{path}: unknown CSV layout (header {header}); expected "
                           "'emotion,pixels,Usage' (FER2013) or 'path,label_index,...'")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return ImageDataset([Record(str(path), path)], tuple(class_names or ()), str(path))
    raise DatasetError(f"{path}: not a folder, CSV or image file")
