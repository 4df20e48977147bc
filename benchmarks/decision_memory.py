"""Memory and time of the decision read back from a feature store, as the number of faces grows.

The decision (:func:`interp_fer.decision.decide`) reads each face's region responses back from
``features.zarr`` in blocks of channels of at most ``--decision-memory`` bytes per task. This
benchmark writes synthetic stores of N faces (one layer of K channels, A AUs: the network's
in- and out-of-region responses, three random copies that set the bar and a tested fourth
copy, as the map job stores them; a third of the channels follow one AU), runs the detector
test of the network and of the tested copy over it with a fixed budget and with the whole
layer per task, and prints for each N:

* the peak memory the test allocated (tracemalloc: numpy arrays, Zarr chunks being read),
  and its ratio to the whole-layer run's;
* wall seconds (the channel-major copy the bounded run makes first included), and the
  whole-layer run's;
* whether both give the same tables (they must: the statistics are per column).

Synthetic responses are enough here: the decision's cost depends on the array shapes, not on
what the numbers mean (the real-data check of the same code is tests/test_decision.py and
``benchmarks/validate_fer2013.py``).

Run: ``python benchmarks/decision_memory.py [--faces 5000,20000,60000] [--channels 32]
[--aus 15] [--budget-mib 16]`` (about 5 minutes on a 2-core machine).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from interp_fer.decision import StoreSource, block_width, channel_blocks, channel_major_copies
from interp_fer.detectors import DetectorOptions, detector_tables
from interp_fer.feature_store import FeatureStore

NETWORKS = ("model", "control1", "control2", "control3", "control4")


def write_store(path: Path, n: int, k: int, a: int, seed: int = 0) -> np.ndarray:
    """A store of n faces as the map job writes it; returns the (n, a) activity."""
    rng = np.random.default_rng(seed)
    activity = rng.normal(size=(n, a))
    store = FeatureStore.open(path, f"bench-{n}", n, 64)
    layout = {f"{net}/layer/in": ((k, a), "float32") for net in NETWORKS}
    layout.update({"model/layer/out": ((k, a), "float32"),
                   "control4/layer/out": ((k, a), "float32")})
    store.ensure(layout)
    step = 4096
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        m = rows.stop - rows.start
        for name in layout:
            values = rng.normal(size=(m, k, a)).astype(np.float32)
            if name == "model/layer/in":
                values[:, : k // 3, 0] += 0.3 * activity[rows, :1].astype(np.float32)
            store.put(name, start, values)
    return activity


def run(store: FeatureStore, activity: np.ndarray, k: int, memory: int | None
        ) -> tuple[dict, float, int]:
    n, a = activity.shape
    blocks = channel_blocks(n, a, memory) if memory else None
    test_blocks = channel_blocks(n, 1, memory) if memory else None
    tracemalloc.start()
    start = time.perf_counter()
    if memory:  # as decide() does when a layer takes several blocks
        names = [f"{net}/layer/in" for net in NETWORKS] + ["model/layer/out",
                                                           "control4/layer/out"]
        channel_major_copies(store, names, block_width(n, a, memory), memory)
    tables = detector_tables(StoreSource(store, None), [("layer", k)], activity, np.arange(n),
                             tuple(range(1, a + 1)), tested=["model", "control4"],
                             bar=["control1", "control2", "control3"],
                             options=DetectorOptions(n_boot=50), blocks=blocks,
                             test_blocks=test_blocks,
                             memory=memory or 2**40)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return tables, seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", default="5000,20000,60000")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--aus", type=int, default=15)
    parser.add_argument("--budget-mib", type=float, default=16)
    args = parser.parse_args()
    k, a, budget = args.channels, args.aus, int(args.budget_mib * 2**20)
    print(f"one layer of {k} channels x {a} AUs; network + 3 bar copies + 1 tested copy; "
          f"budget {args.budget_mib:g} MiB per task")
    print(f"{'faces':>7} {'layer MiB':>9} {'blocks':>6} {'peak MiB':>9} {'whole MiB':>9} "
          f"{'ratio':>6} {'s':>6} {'whole s':>7} same")
    with tempfile.TemporaryDirectory() as folder:
        for n in (int(v) for v in args.faces.split(",")):
            path = Path(folder) / f"{n}.zarr"
            activity = write_store(path, n, k, a)
            store = FeatureStore.reopen(path)
            bounded, seconds, peak = run(store, activity, k, budget)
            whole, whole_seconds, whole_peak = run(store, activity, k, None)
            same = all(bounded[net][0].equals(whole[net][0]) for net in bounded)
            print(f"{n:>7} {n * k * a * 4 / 2**20:>9.1f} "
                  f"{len(channel_blocks(n, a, budget)(k)):>6} {peak / 2**20:>9.1f} "
                  f"{whole_peak / 2**20:>9.1f} {whole_peak / peak:>6.1f} {seconds:>6.1f} "
                  f"{whole_seconds:>7.1f} {same}")


if __name__ == "__main__":
    main()
