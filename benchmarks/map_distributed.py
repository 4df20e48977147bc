"""Wall time of the map pass in one process and on 1 and 2 local Dask workers; per-chunk cost.

Maps a FER2013 test-split share (default 256 faces, every expression in its share) with
mini-Xception, every convolutional stage, ``--locate rf-center`` and the CLI's defaults
(n_boot 50, n_null 20, 4 random-weights copies, batches of 64), with the per-image features
in a Zarr store:

* wall seconds of the whole ``map_dataset`` (pass + decision) in this process and on a
  ``LocalCluster`` of 1 and 2 workers (cluster start-up printed apart), and whether the
  tables are byte-identical to the one-process run;
* per chunk (one batch): compute seconds on a worker (saving its partial included), the
  bytes of its partial (the chunk's accumulators, histogram counts compressed), which the
  worker writes and the client reads back, the client's seconds to read and merge a chunk,
  and the store's bytes;
* the store's size per 1,000 faces;
* an estimate for 10^6 faces on N machines of C cores from those figures (the client merges
  chunks one after the other, which bounds the speed-up).

Landmarks are computed (or read from the cache) before the timings, so every run times the
same work. Run: ``python benchmarks/map_distributed.py [--limit N] [--workers 1,2]
[--layers conv2,block2] [--fer2013 PATH]`` (about 3 minutes on a 2-core machine).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fer2013", type=Path, default=Path(os.environ.get(
        "INTERP_FER_FER2013", REPO.parent / "shared/data/fer2013")))
    parser.add_argument("--limit", type=int, default=256)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--layers", help="comma-separated (default: every stage)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-boot", type=int, default=50)
    parser.add_argument("--n-null", type=int, default=20)
    parser.add_argument("--controls", type=int, default=4)
    parser.add_argument("--shard", type=int, default=2,
                        help="chunks per task (default 2)")
    args = parser.parse_args()
    labels = args.fer2013 / "test_labels.csv"
    if not labels.is_file():
        raise SystemExit(f"FER2013 test split not found at {args.fer2013}")

    import numpy as np
    from tqdm.auto import tqdm

    from interp_fer import load_model, open_dataset
    from interp_fer.controls import randomized_copy
    from interp_fer.distributed import Cluster, _Merger, run_shard
    from interp_fer.feature_store import FeatureStore
    from interp_fer.layer_mapping import MappingOptions
    from interp_fer.mapping import _MapPass, long_scores, map_dataset, prepare_faces
    from interp_fer.memory import keep_freed_memory

    keep_freed_memory()  # as `interp-fer map` does (and Cluster.run on its workers)
    model = load_model("mini-xception")
    dataset = open_dataset(labels, class_names=model.class_names).subset(limit=args.limit,
                                                                           stratify=True)
    layers = tuple(args.layers.split(",")) if args.layers else tuple(model.stages)
    options = MappingOptions(n_boot=args.n_boot, n_null=args.n_null)
    run = dict(locate="rf-center", options=options, controls=args.controls,
               batch_size=args.batch_size, progress=False)
    faceset = prepare_faces(model, dataset, progress=False)  # warms the landmark cache
    n = len(faceset.faces)
    print(f"mini-Xception, {n} FER2013 faces, layers {', '.join(layers)}, rf-center, "
          f"n_boot {args.n_boot}, n_null {args.n_null}, {args.controls} random copies, "
          f"batches of {args.batch_size}, {os.cpu_count()} CPU cores")

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        alone = map_dataset(model, dataset, layers, store=Path(tmp) / "one.zarr", **run)
        one = time.perf_counter() - start
        tables = (alone.mapping.to_csv(index=False), long_scores(alone.scores).to_csv(index=False))
        store = FeatureStore.reopen(Path(tmp) / "one.zarr")
        size = store.nbytes_stored()
        print(f"one process: {one:.1f} s ({n / one:.1f} faces/s); pass "
              f"{sum(v for k, v in alone.run['seconds'].items() if k != 'landmarks'):.1f} s "
              f"of which decision {alone.run['seconds'].get('decision', 0):.1f} s")
        print(f"store: {size / 2**20:.1f} MiB for {n} faces = "
              f"{size / n * 1000 / 2**20:.1f} MiB per 1,000 faces "
              f"({size / store.n_chunks / 2**20:.2f} MiB per chunk)")

        # One chunk as a worker computes it: seconds, its partial's bytes, merge seconds.
        controls = [randomized_copy(model, seed=options.seed + 1 + i)
                    for i in range(args.controls)]
        job = _MapPass(model, dataset, faceset, layers, controls, "rf-center", options,
                       args.batch_size, False)
        calibrated = job.calibrate()
        scratch = FeatureStore.open(Path(tmp) / "scratch.zarr", "bench", n, args.batch_size)
        job.prepare_store(scratch)
        start = time.perf_counter()
        *_, shard_counts = run_shard(job, calibrated, str(scratch.path), [0])
        chunk_seconds = time.perf_counter() - start
        per_chunk = (scratch.path / "partials" / "00000000.npz").stat().st_size
        saved = scratch.partial(0)
        counts = sum(v.nbytes for k, v in saved.items() if k.startswith("zstd/"))
        # Uncompressed uint32 bounds the counts of a chunk of denser histograms.
        bound = sum(4 * int(np.prod(v)) for k, v in saved.items() if k.startswith("shape/"))
        seconds = {}
        for case in ("alone", "with counts", "resumed"):  # the client's side of Cluster.run
            merger = _Merger(job, job.empty_stream(calibrated, scratch), calibrated, None,
                             tqdm(disable=True), 0, {0} if case == "resumed" else set())
            merger.ready.add(0)
            if case == "with counts":
                merger.shard_counts[0] = shard_counts
            start = time.perf_counter()
            merger.advance()
            seconds[case] = time.perf_counter() - start
        add_counts = max(0.0, seconds["with counts"] - seconds["alone"])
        merge_seconds = seconds["alone"] + add_counts / args.shard
        print(f"per chunk ({args.batch_size} faces): compute {chunk_seconds:.2f} s on one "
              f"core; partial written {per_chunk / 2**20:.2f} MiB, of which histogram counts "
              f"{counts / 2**20:.2f} MiB compressed (at most {bound / 2**20:.0f} MiB), read "
              f"back without them; client: read and merge {seconds['alone'] * 1000:.0f} ms "
              f"per chunk, add a shard's counts {add_counts * 1000:.0f} ms (once per shard), "
              f"a resumed chunk read and merged with its counts {seconds['resumed'] * 1000:.0f}"
              " ms")

        walls = {}
        for workers in (int(w) for w in args.workers.split(",")):
            start = time.perf_counter()
            with Cluster.local(workers, shard=args.shard) as cluster:
                up = time.perf_counter() - start
                start = time.perf_counter()
                spread = map_dataset(model, dataset, layers, store=Path(tmp) / f"w{workers}.zarr",
                                     cluster=cluster, **run)
                walls[workers] = time.perf_counter() - start
            same = (spread.mapping.to_csv(index=False),
                    long_scores(spread.scores).to_csv(index=False)) == tables
            print(f"{workers} worker(s): {walls[workers]:.1f} s (+{up:.1f} s cluster start); "
                  f"tables identical to one process: {same}")

    faces = 1_000_000
    chunks = faces / args.batch_size
    per_face = chunk_seconds / args.batch_size
    merge = chunks * merge_seconds
    volume = chunks * per_chunk  # written; read back less the counts
    print(f"estimate for 10^6 faces (landmarks not included; shards of {args.shard} "
          f"chunks): compute {faces * per_face / 3600:.1f} core-hours; client merge "
          f"{merge / 3600:.2f} h (serial, reading the partials included); partials written "
          f"(read back without their counts) "
          f"{volume / 2**30:.0f} GiB ({volume / 1e9 / 3600:.2f} h at 1 GB/s); "
          f"store {size / n * faces / 2**30:.0f} GiB")
    for machines, cores in ((1, 16), (4, 16), (16, 16)):
        hours = max(faces * per_face / (machines * cores), merge + volume / 1e9) / 3600
        print(f"  {machines} machine(s) x {cores} cores: about {hours:.1f} h")


if __name__ == "__main__":
    main()
