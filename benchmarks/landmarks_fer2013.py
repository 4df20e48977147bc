"""Landmark throughput on the FER2013 test split (7,178 grey 48 x 48 PNGs).

Prints faces per second (wall clock, reading the PNGs included) and the share of images per
status and path. Target: >= 400 faces/s on a 2-core machine with ``--workers 2``.

Run: ``python benchmarks/landmarks_fer2013.py [--fer2013 PATH] [--workers N] [--limit N]
[--cache]`` (``--cache`` runs twice through a fresh cache to show the second-run speed-up).
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from interp_fer.faces import LandmarkSettings, landmarks_table

REPO = Path(__file__).resolve().parents[1]


def read_split(root: Path, limit: int | None) -> list[tuple[str, Path]]:
    with open(root / "test_labels.csv") as handle:
        rows = [row["path"] for row in csv.DictReader(handle)]
    return [(p, root / p) for p in rows[:limit]]


def images(items: list[tuple[str, Path]]):
    """Yield (key, uint8 array or None) as the CLI does: decoding is part of the timing."""
    from PIL import Image

    for key, path in items:
        try:
            with Image.open(path) as im:
                yield key, np.asarray(im.convert("L"))
        except OSError as exc:
            yield key, None, f"{type(exc).__name__}: {exc}"


def report(table, seconds: float, label: str) -> None:
    n = len(table)
    print(f"{label}: {n} images in {seconds:.2f} s = {n / seconds:.0f} faces/s")
    for status, count in table["status"].value_counts().items():
        print(f"  status {status:13s} {count:6d}  {100 * count / n:5.1f} %")
    for path, count in table["path"].value_counts().items():
        print(f"  path   {path:13s} {count:6d}  {100 * count / n:5.1f} %")
    iod = table["iod"].dropna()
    print(f"  IOD median {iod.median():.1f} px (10-90 %: {iod.quantile(0.1):.1f}-"
          f"{iod.quantile(0.9):.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get("INTERP_FER_FER2013", REPO.parent / "shared/data/fer2013")
    parser.add_argument("--fer2013", type=Path, default=Path(default))
    parser.add_argument("--workers", type=int, default=None, help="default: all cores")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--cache", action="store_true",
                        help="run twice through a fresh cache (second run = cache hits)")
    parser.add_argument("--out", type=Path, default=None, help="write the table as CSV")
    args = parser.parse_args()
    if not (args.fer2013 / "test_labels.csv").is_file():
        raise SystemExit(f"FER2013 test split not found at {args.fer2013}")
    items = read_split(args.fer2013, args.limit)
    print(f"{len(items)} images, workers={args.workers or os.cpu_count()}, "
          f"settings={LandmarkSettings()}")

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "landmarks.sqlite" if args.cache else False
        t0 = time.perf_counter()
        table = landmarks_table(images(items), total=len(items), workers=args.workers,
                                cache=cache, progress=False)
        report(table, time.perf_counter() - t0, "first run" if args.cache else "run")
        if args.cache:
            t0 = time.perf_counter()
            again = landmarks_table(images(items), total=len(items), workers=args.workers,
                                    cache=cache, progress=False)
            report(again, time.perf_counter() - t0, "second run (cached)")
    if args.out:
        from interp_fer.faces import write_landmarks

        print("wrote", write_landmarks(table, args.out))


if __name__ == "__main__":
    main()
