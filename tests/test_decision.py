"""The decision stage read back from the store in blocks of channels (interp_fer.decision).

The tables must not depend on the blocks nor on where the tasks run, and a task must hold one
block, not a layer: memory bounded whatever the number of faces.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from interp_fer.decision import StoredResponses, StoreSource, channel_blocks
from interp_fer.detectors import (
    ArraySource,
    DetectorOptions,
    LayerResponses,
    detector_tables,
    detector_test,
)
from interp_fer.feature_store import FeatureStore
from interp_fer.mapping import ResponseStore


def _layers(rng, n, k, a, activity, strength=0.6):
    x_in = rng.normal(size=(n, k, a)).astype(np.float32)
    x_in[:, : k // 3, 1] += strength * activity[:, 1:2].astype(np.float32)
    x_out = rng.normal(size=(n, k, a)).astype(np.float32)
    return x_in, x_out


def _store(path, arrays, chunk):
    """A feature store at ``path`` holding ``arrays`` (name -> (N, ...) float32)."""
    n = len(next(iter(arrays.values())))
    store = FeatureStore.open(path, "test", n, chunk)
    store.ensure({name: (values.shape[1:], "float32") for name, values in arrays.items()})
    for name, values in arrays.items():
        store.write_all(name, values)
    return store


def test_channel_blocks_cover_every_channel_within_the_budget():
    blocks = channel_blocks(n_rows=1000, n_columns=10, memory=48 * 1000 * 10 * 3)
    assert blocks(7) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert channel_blocks(10**6, 15, memory=1)(2) == [slice(0, 1), slice(1, 2)]  # one channel
    with pytest.raises(ValueError, match="memory"):
        channel_blocks(10, 2, memory=0)


def test_blocks_do_not_change_the_tables():
    rng = np.random.default_rng(4)
    n, a = 600, 4
    activity = rng.normal(size=(n, a))
    model = [LayerResponses(name, *_layers(rng, n, k, a, activity)) for name, k in
             (("l1", 9), ("l2", 5))]
    copies = [[LayerResponses(r.layer, rng.normal(size=r.x_in.shape).astype(np.float32))
               for r in model] for _ in range(2)]
    options = DetectorOptions(n_boot=20, n_perm=300)
    whole, whole_pairs = detector_test(model, activity, np.arange(n), (1, 2, 4, 6), copies,
                                       options)
    source = ArraySource({"model": model, "control1": copies[0], "control2": copies[1]})
    for width in (1, 4):
        tables = detector_tables(source, [("l1", 9), ("l2", 5)], activity, np.arange(n),
                                 (1, 2, 4, 6), tested=["model"], bar=["control1", "control2"],
                                 options=options,
                                 blocks=lambda k, w=width: [slice(i, min(i + w, k))
                                                            for i in range(0, k, w)],
                                 memory=4096)  # permutations one or two at a time
        table, pairs = tables["model"]
        assert table.equals(whole) and pairs.equals(whole_pairs)
    assert whole["au"].notna().sum() >= 2  # the planted channels are found


def test_a_task_holds_one_block_not_the_layer(tmp_path):
    # 20,000 faces x 24 channels x 6 AUs: a layer is 11.5 MB per network as stored, twice that
    # as float64 ranks; the decision over a store with a 2 MB budget stays below one layer.
    rng = np.random.default_rng(5)
    n, k, a = 20_000, 24, 6
    activity = rng.normal(size=(n, a))
    x_in, x_out = _layers(rng, n, k, a, activity, strength=0.3)
    copies = [rng.normal(size=(n, k, a)).astype(np.float32) for _ in range(2)]
    store = _store(tmp_path / "f.zarr", {"model/l/in": x_in, "model/l/out": x_out,
                                         "control1/l/in": copies[0],
                                         "control2/l/in": copies[1]}, 256)
    options = DetectorOptions(n_boot=0, n_perm=200)
    memory = 2 * 2**20
    del x_out
    tracemalloc.start()
    tables = detector_tables(StoreSource(store, None), [("l", k)], activity, np.arange(n),
                             tuple(range(1, a + 1)), tested=["model"],
                             bar=["control1", "control2"], options=options,
                             blocks=channel_blocks(n, a, memory),
                             test_blocks=channel_blocks(n, 1, memory), memory=memory)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    layer_bytes = n * k * a * 4
    # One channel at a time: ~6 MiB here (chunks being read, ranks of one channel); the
    # layer at once: > 23 MiB for the float64 ranks of x_in alone.
    assert peak < layer_bytes, f"peak {peak / 2**20:.1f} MiB"
    reference, _ = detector_test(
        [LayerResponses("l", x_in, store.array("model/l/out"))], activity, np.arange(n),
        tuple(range(1, a + 1)), [[LayerResponses("l", c)] for c in copies], options)
    assert tables["model"][0].equals(reference)


def test_stored_responses_read_one_channel(tmp_path):
    rng = np.random.default_rng(6)
    values = rng.normal(size=(50, 3, 4)).astype(np.float32)
    store = _store(tmp_path / "f.zarr", {"model/l/in": values}, 16)
    memory = ResponseStore()
    memory.add("model/l/in", values)
    for backing in (store, memory):
        responses = StoredResponses(backing, ["l"], [0, 2])
        assert list(responses) == ["l"] and "l" in responses and "m" not in responses
        np.testing.assert_array_equal(responses["l"][:, 1], values[:, 1][:, [0, 2]])
        np.testing.assert_array_equal(np.asarray(responses["l"]), values[..., [0, 2]])


def test_channel_major_copies_read_like_the_store(tmp_path):
    from interp_fer.decision import channel_major_copies

    rng = np.random.default_rng(8)
    values = rng.normal(size=(300, 10, 4)).astype(np.float32)
    store = _store(tmp_path / "f.zarr", {"model/l/in": values}, 32)
    assert channel_major_copies(store, ["model/l/in"], width=3, memory=4096) == ["model/l/in"]
    assert (tmp_path / "f.zarr/by_channel/model/l/in/zarr.json").is_file()
    assert channel_major_copies(store, ["model/l/in"], width=3, memory=4096) == []  # reused
    source = StoreSource(store, [1, 3])
    np.testing.assert_array_equal(source.read("model", "l", "in", slice(2, 7)),
                                  values[:, 2:7][..., [1, 3]])
    assert source.store.array("model/l/in").shape == (300, 10, 4)  # the store is untouched


def test_an_in_memory_store_does_not_go_to_workers():
    import pickle

    with pytest.raises(TypeError, match="feature store"):
        pickle.dumps(StoreSource(ResponseStore(), None))


def test_the_decision_on_two_workers_gives_the_tables_of_one_process(fer2013, mini_xception,
                                                                     tmp_path):
    # A FER2013 share large enough for a real decision (a report half over min_report faces,
    # permutations, a control bar and a tested copy); on the workers with one channel per
    # task, here with the whole layer per task.
    pytest.importorskip("distributed")
    from interp_fer import open_dataset
    from interp_fer.distributed import Cluster
    from interp_fer.layer_mapping import MappingOptions
    from interp_fer.mapping import long_scores, map_dataset

    share = open_dataset(fer2013 / "test_labels.csv", class_names=mini_xception.class_names
                         ).subset(limit=96, stratify=True)
    run = dict(locate="rf-center", options=MappingOptions(n_boot=8, n_null=4, seed=1),
               controls=3, batch_size=32, progress=False)
    alone = map_dataset(mini_xception, share, ("conv2", "block2"), store=tmp_path / "a.zarr",
                        **run)
    assert not alone.run["detector"]["small_sample"]
    with Cluster.local(2, shard=1) as cluster:
        spread = map_dataset(mini_xception, share, ("conv2", "block2"), cluster=cluster,
                             store=tmp_path / "b.zarr", decision_memory=1, **run)
    assert spread.run["decision"]["where"] == "2 Dask workers"
    assert min(spread.run["decision"]["blocks_per_layer"].values()) > 1
    assert spread.run["decision"]["channel_major_layers"] == ["conv2", "block2"]
    assert spread.run["decision"]["channel_major_arrays_made"] == 2 * (4 + 3 + 1)
    assert alone.run["decision"]["channel_major_layers"] == []
    for mine, theirs in ((alone.mapping, spread.mapping), (alone.looks, spread.looks),
                         (alone.control_detectors, spread.control_detectors),
                         (long_scores(alone.scores), long_scores(spread.scores))):
        assert mine.to_csv(index=False) == theirs.to_csv(index=False)
