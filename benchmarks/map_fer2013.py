"""Wall time and peak memory of the `map` job on the FER2013 test split.

Maps every convolutional stage of mini-Xception on ../shared/data/fer2013 (7,178 images) and
prints the wall time of each phase and the peak resident memory of this process and of its
landmark workers. Target (issue 5): <= 10 min wall and <= 2 GB peak RSS on a 2-core machine
with deconvnet location.

Run: ``python benchmarks/map_fer2013.py [--fer2013 PATH] [--limit N] [--locate deconv|rf-center]
[--n-null N] [--n-boot N] [--no-keep-memory]``. ``--limit`` maps N images only, each
expression in its share (the time printed is then also extrapolated linearly to the whole
split, as a rough guide).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fer2013", type=Path, default=Path(os.environ.get(
        "INTERP_FER_FER2013", REPO.parent / "shared/data/fer2013")))
    parser.add_argument("--limit", type=int)
    parser.add_argument("--locate", choices=("deconv", "rf-center"), default="deconv")
    parser.add_argument("--n-null", type=int, default=20)
    parser.add_argument("--n-boot", type=int, default=50)
    parser.add_argument("--model", default="mini-xception")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warm-landmarks", action="store_true",
                        help="reuse the landmark cache (default: time the landmark pass too)")
    parser.add_argument("--no-keep-memory", action="store_true",
                        help="leave glibc's malloc settings alone (the CLI changes them)")
    args = parser.parse_args()
    labels = args.fer2013 / "test_labels.csv"
    if not labels.is_file():
        raise SystemExit(f"FER2013 test split not found at {args.fer2013}")

    from interp_fer import load_model, open_dataset
    from interp_fer.layer_mapping import MappingOptions
    from interp_fer.mapping import map_dataset
    from interp_fer.memory import keep_freed_memory

    if not args.no_keep_memory:
        keep_freed_memory()  # as `interp-fer map` does

    model = load_model(args.model)
    dataset = open_dataset(labels, class_names=model.class_names)
    if args.limit:
        # Every expression in its share: the file is sorted by expression.
        dataset = dataset.subset(limit=args.limit, stratify=True)
    options = MappingOptions(n_null=args.n_null, n_boot=args.n_boot)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.warm_landmarks:
            # The model is loaded: from here on the cache only serves landmarks, so an empty
            # one makes the run pay for its landmark pass, as a first run does.
            os.environ["INTERP_FER_CACHE"] = str(Path(tmp) / "cache")
        start = time.perf_counter()
        result = map_dataset(model, dataset, locate=args.locate, options=options,
                             batch_size=args.batch_size,
                             checkpoint=Path(tmp) / "checkpoint.npz", progress=True)
        result.save(tmp)
        wall = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    n = len(dataset)
    print(f"{model.name}: {n} images, layers {', '.join(result.run['layers'])}, "
          f"locate={args.locate}, n_null={args.n_null}, n_boot={args.n_boot}")
    print(f"wall {wall:.1f} s ({n / wall:.1f} images/s)"
          + (f"; whole split (7,178) extrapolated: {wall * 7178 / n / 60:.1f} min"
             if n < 7178 else ""))
    print("phases (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result.run["seconds"].items()))
    print(f"peak RSS: this process {own:.0f} MiB, largest landmark worker {children:.0f} MiB")
    print(f"landmark status: {result.run['landmark_status']}")
    if n == 7178:
        peak = max(own, children)
        print(f"targets: wall <= 10 min: {'yes' if wall <= 600 else 'no'} ({wall / 60:.1f} min); "
              f"peak RSS <= 2 GB: {'yes' if peak <= 2048 else 'no'} ({peak:.0f} MiB)")
    mapped = int(result.mapping["au"].notna().sum())
    print(f"channels mapped: {mapped} of {len(result.mapping)}")


if __name__ == "__main__":
    main()
