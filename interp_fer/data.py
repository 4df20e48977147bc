"""Reading face images and their labels from the layouts FER researchers use.

:func:`open_dataset` recognises:

* a folder of class sub-folders (``root/happy/001.png``): labels from folder names;
* a flat folder of images (no labels);
* a FER2013 CSV (``emotion,pixels,Usage``, 48x48 pixels as space-separated numbers);
* a labels CSV (``path,label_index[,label_name][,usage][,AU columns]``, or ``label_name``
  without ``label_index``), paths relative to the CSV; AU columns are named like
  ``AU12``/``AU_12``/``au12`` and hold intensities, 0/1, yes/no, true/false or present/absent;
* a single image file.

Rows that cannot be trusted are refused, named and counted in :attr:`ImageDataset.rejected`
(``(key, "reason: detail")``), the same way for every command: a ``label_index`` and a
``label_name`` that name different classes, a path already listed (every row after the
first, conflicting or not), a label outside the classes (FER2013 ``emotion`` 9), a label or
AU cell that is not a number. The rest of the file is read.

Images come out as uint8 arrays, (H, W) for gray sources and (H, W, 3) for colour ones
(16-bit images are scaled to 8 bits, alpha is dropped). A file that cannot be read is not
fatal: its :class:`Sample` has ``image=None`` and ``error`` says why, and
:meth:`ImageDataset.batches` counts it in :attr:`ImageDataset.skipped`.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .labels import class_index, parse_au_value
from .preprocessing import to_uint8_range

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm", ".ppm"}
_AU_COLUMN = re.compile(r"^au[\s_-]?0*(\d+)$", re.IGNORECASE)


class DatasetError(ValueError):
    """The dataset as a whole cannot be read (missing path, unknown layout, bad CSV header)."""


class RejectedRowsWarning(UserWarning):
    """Some rows of a dataset file were refused (see :attr:`ImageDataset.rejected`)."""


class _RowError(ValueError):
    """One CSV row is refused; ``args[0]`` is ``"reason: detail"``."""


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


def stratified_counts(labels: list, total: int) -> dict:
    """Records to keep per group: ``total`` shared in proportion to the group sizes.

    ``labels`` holds one sortable group per record (a class index, or a ``(usage, class)``
    pair). Largest-remainder rounding (ties to the smaller group), so the counts sum to
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
    rejected
        ``(key, "reason: detail")`` of every row refused when the dataset was opened
        (conflicting or out-of-range labels, duplicate paths, bad AU cells); those rows are
        not in ``records``. :meth:`rejected_counts` counts them by reason.
    """

    records: list[Record]
    class_names: tuple[str, ...] = ()
    source: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labelled(self) -> bool:
        return any(record.label is not None for record in self.records)

    def rejected_counts(self) -> dict[str, int]:
        """Rows refused when opening, counted by reason (the text before the first ':')."""
        return dict(Counter(reason.split(":")[0] for _, reason in self.rejected))

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
        (when that is unique in the CSV). Records without a row keep what they had; records
        whose only row was refused (see :attr:`rejected`) are left out and named there.

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
        refused = {Path(key).resolve(): reason for key, reason in labelled.rejected}
        records, matched = [], 0
        rejected = list(self.rejected) + labelled.rejected
        for record in self.records:
            row = by_path.get(record.path.resolve()) if record.path is not None else None
            if row is None and record.path is not None and len(names.get(record.path.name,
                                                                         [])) == 1:
                row = names[record.path.name][0]
            if row is None and record.path is not None and record.path.resolve() in refused:
                continue  # its labels row was refused (already named in ``rejected``)
            if row is None:
                records.append(record)
                continue
            matched += 1
            records.append(replace(record, label=row.label, label_name=row.label_name,
                                   aus=row.aus))
        if not matched:
            raise DatasetError(f"{labels_csv}: none of its paths matches an image of "
                               f"{self.source}")
        return ImageDataset(records, labelled.class_names or self.class_names, self.source,
                            rejected=rejected)

    def subset(self, usage: str | None = None, limit: int | None = None, *,
               stratify: bool = False) -> ImageDataset:
        """A dataset restricted to one ``usage`` and/or ``limit`` records.

        Parameters
        ----------
        usage
            Keep only records of this split (e.g. ``"PublicTest"``).
        limit
            Number of records kept: the first ``limit`` in file order, or with ``stratify``
            the first ones of each (usage, class) group in proportion to the group sizes
            (largest-remainder rounding), so that a file sorted by expression and split (as
            FER2013's ``test_labels.csv``, PrivateTest before PublicTest in each class) keeps
            each expression's and each split's share. Records keep their file order.
        stratify
            Keep each (usage, class) share; needs ``limit`` and an expression label on every
            record.

        Raises
        ------
        ValueError
            ``stratify`` without ``limit``, or on records without expression labels.
        """
        records = [r for r in self.records if usage is None or r.usage == usage]
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1, not {limit}")
        if not stratify:
            return ImageDataset(records[:limit], self.class_names, self.source,
                                rejected=list(self.rejected))
        if limit is None:
            raise ValueError("stratify needs a limit (the number of records to keep)")
        unlabelled = sum(r.label is None and not r.label_name for r in records)
        if unlabelled:
            raise ValueError(f"{self.source}: {unlabelled} of {len(records)} records have no "
                             "expression label; a stratified subset needs one on every record")
        # a class the model lacks (contempt) has a name and no index: its own group
        groups = [(r.usage or "", -1 if r.label is None else r.label, r.label_name or "")
                  for r in records]
        quota = stratified_counts(groups, limit)
        kept = []
        for record, group in zip(records, groups, strict=True):
            if quota.get(group, 0) > 0:
                quota[group] -= 1
                kept.append(record)
        return ImageDataset(kept, self.class_names, self.source, rejected=list(self.rejected))

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

    def samples(self, progress: Callable[[int], object] | None = None) -> Iterator[Sample]:
        """Yield every sample in order, unreadable ones included (and recorded in ``skipped``).

        ``progress`` (e.g. a tqdm bar's ``update``) is called with 1 after each image is read.
        """
        self.skipped.clear()
        for record in self.records:
            sample = self.load(record)
            if sample.image is None:
                self.skipped.append((record.key, sample.error or "unreadable"))
            if progress is not None:
                progress(1)
            yield sample

    def __iter__(self) -> Iterator[Sample]:
        return self.samples()

    def batches(self, batch_size: int = 256,
                progress: Callable[[int], object] | None = None) -> Iterator[list[Sample]]:
        """Yield lists of readable samples; unreadable ones are recorded in ``skipped``.

        ``progress`` is called with 1 after each image is read (see :meth:`samples`).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        batch: list[Sample] = []
        for sample in self.samples(progress):
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


def _class_index(names: Sequence[str],
                 class_names: Sequence[str] | None) -> dict[str, int | None]:
    """Class index of each folder name (case and aliases ignored: ``anger`` is ``angry``);
    None for a folder whose class the model lacks (e.g. ``contempt`` for 7 classes)."""
    if class_names:
        index = {name: class_index(name, class_names) for name in names}
        if all(i is None for i in index.values()):
            raise DatasetError(f"class folders {list(names)} are not among the classes "
                               f"{list(class_names)} (nor their aliases)")
        return index
    return {name: i for i, name in enumerate(sorted(names))}


def _open_folder(root: Path, class_names: Sequence[str] | None) -> ImageDataset:
    subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    labelled = [p for p in subfolders if _image_files(p)]
    if labelled:
        index = _class_index([p.name for p in labelled], class_names)
        names = tuple(class_names) if class_names else tuple(sorted(index, key=index.get))
        # a folder of a class the model lacks keeps its name without an index: evaluate
        # counts it by name, the mapping still reads its EMFACS prototype
        records = [
            Record(str(path), path, label=index[folder.name],
                   label_name=folder.name if index[folder.name] is None
                   else names[index[folder.name]])
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
    records, rejected = [], []
    for number, row in enumerate(rows, start=2):
        key = f"{path}:{number}"
        try:
            label = _label_index(row.get("emotion"), "emotion", names)
        except _RowError as error:
            rejected.append((key, f"{error.args[0]} (row {number} of {path.name})"))
            continue
        records.append(Record(
            key, pixels=row.get("pixels") or "", label=label,
            label_name=names[label] if label is not None else None,
            usage=row.get("Usage") or row.get("usage") or None,
        ))
    return ImageDataset(records, names, str(path), rejected=rejected)


def _label_index(text: str | None, column: str, names: Sequence[str]) -> int | None:
    """A label cell as a class index (None when empty); refuses non-integers and
    indices outside ``names`` (when names are known)."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise _RowError(f"bad label: {column} {text!r} is not an integer") from None
    if not value.is_integer():
        raise _RowError(f"bad label: {column} {text!r} is not an integer")
    if names and not 0 <= value < len(names):
        raise _RowError(f"label out of range: {column} {int(value)} is not one of "
                        f"0-{len(names) - 1} ({', '.join(names)})")
    return int(value)


def _open_labels_csv(path: Path, rows: list[dict[str, str]], header: Sequence[str],
                     class_names: Sequence[str] | None) -> ImageDataset:
    au_columns = {column: int(m.group(1)) for column in header
                  if (m := _AU_COLUMN.match(column.strip()))}
    names = tuple(class_names) if class_names else _names_from_rows(rows)
    records, rejected = [], []
    first_row: dict[Path, tuple[int, tuple]] = {}
    for number, row in enumerate(rows, start=2):
        relative = (row.get("path") or "").strip()
        if not relative:
            raise DatasetError(f"{path}:{number}: empty path")
        image = path.parent / relative
        where = f"row {number} of {path.name}"
        try:
            label, label_name = _row_label(row, names)
            aus = _row_aus(row, au_columns)
        except _RowError as error:
            rejected.append((str(image), f"{error.args[0]} ({where})"))
            first_row.setdefault(image.resolve(), (number, ()))
            continue
        resolved = image.resolve()
        if resolved in first_row:
            first, first_labels = first_row[resolved]
            other = ", with other labels" if first_labels != (label, label_name, aus) else ""
            rejected.append((str(image), f"duplicate path: listed first on row {first}{other} "
                                         f"({where})"))
            continue
        first_row[resolved] = (number, (label, label_name, aus))
        records.append(Record(str(image), image, label=label, label_name=label_name,
                              usage=(row.get("usage") or "").strip() or None, aus=aus))
    return ImageDataset(records, names, str(path), rejected=rejected)


def _names_from_rows(rows: list[dict[str, str]]) -> tuple[str, ...]:
    """Class names of a labels CSV opened without the model's: index -> the name most rows
    give it; with ``label_name`` only, the sorted names (as class folders are)."""
    votes: dict[int, Counter[str]] = {}
    bare: set[str] = set()
    for row in rows:
        name = (row.get("label_name") or "").strip()
        index = (row.get("label_index") or "").strip()
        if index.isdigit():
            votes.setdefault(int(index), Counter())
            if name:
                votes[int(index)][name] += 1
        elif name:
            bare.add(name)
    if any(votes.values()):
        return tuple(votes[i].most_common(1)[0][0] if votes.get(i) else str(i)
                     for i in range(max(votes) + 1))
    return tuple(sorted(bare, key=str.lower))


def _row_label(row: dict[str, str], names: Sequence[str]) -> tuple[int | None, str | None]:
    """``(label, label_name)`` of a labels-CSV row, its name resolved among ``names``.

    The index comes from ``label_index``, else from ``label_name`` (case and aliases
    ignored, :func:`interp_fer.labels.class_index`); both given must name the same class.
    A name alone that is not among the classes (e.g. contempt for a 7-class model) is kept
    without an index (its EMFACS prototype still gives AU presence).
    """
    index = _label_index(row.get("label_index"), "label_index", names)
    name = (row.get("label_name") or "").strip() or None
    from_name = class_index(name, names) if names else None
    if index is not None and name is not None and names and from_name != index:
        other = "not one of the classes" if from_name is None else f"class {from_name}"
        raise _RowError(f"conflicting labels: label_index {index} is {names[index]!r}, "
                        f"label_name {name!r} is {other}")
    label = index if index is not None else from_name
    return label, names[label] if label is not None and names else name


def _row_aus(row: dict[str, str], au_columns: dict[str, int]) -> dict[int, float] | None:
    if not au_columns:
        return None
    aus = {}
    for column, au in au_columns.items():
        try:
            value = parse_au_value(row.get(column) or "")
        except ValueError as error:
            raise _RowError(f"bad AU value: column {column}: {error}") from None
        if value is not None:
            aus[au] = value
    return aus


def _warn_rejected(dataset: ImageDataset) -> ImageDataset:
    if dataset.rejected:
        counts = ", ".join(f"{n} {reason}" for reason, n in dataset.rejected_counts().items())
        first = dataset.rejected[0]
        warnings.warn(f"{dataset.source}: {len(dataset.rejected)} rows refused ({counts}); "
                      f"first: {first[0]}: {first[1]} (all in ImageDataset.rejected)",
                      RejectedRowsWarning, stacklevel=3)
    return dataset


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
            return _warn_rejected(_open_fer2013_csv(path, rows, class_names))
        if "path" in header:
            return _warn_rejected(_open_labels_csv(path, rows, header, class_names))
        raise DatasetError(f"{path}: unknown CSV layout (header {header}); expected "
                           "'emotion,pixels,Usage' (FER2013) or 'path,label_index,...'")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return ImageDataset([Record(str(path), path)], tuple(class_names or ()), str(path))
    raise DatasetError(f"{path}: not a folder, CSV or image file")
