"""The per-image feature store (Zarr): same results as in memory, mergeable batches, resume."""

from __future__ import annotations

import numpy as np
import pytest

from interp_fer.feature_store import FeatureStore
from interp_fer.layer_mapping import MappingOptions
from interp_fer.mapping import (
    _MapPass,
    long_scores,
    map_dataset,
    prepare_faces,
    stream_layers,
)

LAYERS = ("conv2", "block2")
OPTIONS = MappingOptions(n_boot=8, n_null=4, seed=3)
RUN = dict(locate="rf-center", options=OPTIONS, controls=2, batch_size=2, progress=False)


def _tables(result):
    return result.mapping.to_csv(index=False), long_scores(result.scores).to_csv(index=False)


@pytest.fixture(scope="module")
def in_memory(mini_xception, sample_faces):
    return map_dataset(mini_xception, sample_faces, LAYERS, **RUN)


def test_store_run_gives_the_in_memory_tables_and_holds_every_feature(
        mini_xception, sample_faces, in_memory, tmp_path):
    result = map_dataset(mini_xception, sample_faces, LAYERS, store=tmp_path / "f.zarr", **RUN)
    assert _tables(result) == _tables(in_memory)
    store = FeatureStore.reopen(tmp_path / "f.zarr")
    n = len(in_memory.activity)
    assert store.n_rows == n and store.chunk == 2 and store.complete().all()
    for name in LAYERS:
        np.testing.assert_array_equal(result.responses[name], in_memory.responses[name])
        x_in = store.array(f"model/{name}/in")
        assert x_in.shape[0] == n and np.isfinite(x_in).any()
        # The last copy is tested like the network (in and out); the others set the bar (in).
        assert store.array(f"control2/{name}/out").shape == x_in.shape
        assert store.array(f"control1/{name}/in").shape == x_in.shape
        with pytest.raises(KeyError):
            store.array(f"control1/{name}/out")
        points = store.array(f"model/{name}/points")
        assert points.shape == (n, x_in.shape[1], 2) and np.isfinite(points).all()
        assert store.array(f"model/{name}/active").dtype == bool
    np.testing.assert_array_equal(store.array("index"), in_memory.activity["index"])
    tested = [c for c in in_memory.activity.columns if c.startswith("AU")]
    np.testing.assert_array_equal(store.array("activity"), in_memory.activity[tested].to_numpy())
    attrs = store.attrs
    assert len(attrs["landmark_status"]) == len(sample_faces)
    statuses = [attrs["status_codes"][c] for c in attrs["landmark_status"]]
    assert statuses == list(in_memory.landmarks["status"].astype(str))


def test_batches_accumulated_apart_and_merged_in_order_equal_one_pass(
        mini_xception, sample_faces, tmp_path):
    faceset = prepare_faces(mini_xception, sample_faces, progress=False)
    one = stream_layers(mini_xception, sample_faces, faceset, LAYERS, locate="rf-center",
                        options=OPTIONS, batch_size=2, progress=False)
    job = _MapPass(mini_xception, sample_faces, faceset, LAYERS, (), "rf-center", OPTIONS, 2,
                   False)
    calibrated = job.calibrate()
    store = FeatureStore.open(tmp_path / "f.zarr", "k", len(faceset.faces), 2)
    job.prepare_store(store)
    parts = []
    for number in reversed(range(len(job.batches))):  # any order of computing ...
        part = job.empty_stream(calibrated, store)
        job.run_batch(number, part, _no_clock)
        parts.append((number, part))
    merged = job.empty_stream(calibrated, store)
    for _, part in sorted(parts, key=lambda item: item[0]):  # ... merged in batch order
        merged.merge(part)
    expected = one.state()
    got = merged.state()
    assert {k for k in expected if not k.startswith("store/")} == set(got)
    for key, value in got.items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)
    for name in LAYERS:
        np.testing.assert_array_equal(store.array(f"model/{name}/in"),
                                      one.store.array(f"model/{name}/in"))


def _no_clock(phase):
    from contextlib import nullcontext

    return nullcontext()


def test_merge_refuses_other_calibrations(mini_xception, sample_faces):
    faceset = prepare_faces(mini_xception, sample_faces, progress=False)
    job = _MapPass(mini_xception, sample_faces, faceset, ("conv2",), (), "rf-center", OPTIONS,
                   2, False)
    acc = job.calibrate()["conv2"]
    other = acc.empty()
    other.peaks.edges = other.peaks.edges + 1.0
    with pytest.raises(ValueError, match="histogram bins"):
        acc.merge(other)


def test_killed_run_resumes_from_the_store(mini_xception, sample_faces, in_memory, tmp_path,
                                           monkeypatch):
    ran: list[int] = []
    original = _MapPass.run_batch

    def counted(self, number, stream, clock):
        ran.append(number)
        if killed and len(ran) == 3:
            raise KeyboardInterrupt  # the run dies during its third batch
        original(self, number, stream, clock)

    monkeypatch.setattr(_MapPass, "run_batch", counted)
    args = dict(store=tmp_path / "f.zarr", checkpoint=tmp_path / "c.npz",
                checkpoint_interval=1e-6, **RUN)
    killed = True
    with pytest.raises(KeyboardInterrupt):
        map_dataset(mini_xception, sample_faces, LAYERS, **args)
    assert list(FeatureStore.reopen(tmp_path / "f.zarr").complete()) == [True, True, False, False]
    killed, ran[:] = False, []
    result = map_dataset(mini_xception, sample_faces, LAYERS, **args)
    assert ran == [2, 3]  # the two complete chunks were skipped
    assert _tables(result) == _tables(in_memory)


def test_a_store_of_another_run_is_replaced(tmp_path):
    first = FeatureStore.open(tmp_path / "f.zarr", "run-a", 5, 2)
    first.ensure({"x": ((3,), "float32")})
    first.put("x", 0, np.ones((2, 3)))
    first.mark_complete(0)
    again = FeatureStore.open(tmp_path / "f.zarr", "run-a", 5, 2)
    assert again.complete().tolist() == [True, False, False]
    np.testing.assert_array_equal(again.array("x")[:2], 1.0)
    other = FeatureStore.open(tmp_path / "f.zarr", "run-b", 5, 2)
    assert not other.complete().any() and "x" not in other
    other.ensure({"y": ((3,), "float32")})
    with pytest.raises(ValueError, match="this run needs"):
        other.ensure({"y": ((4,), "float32")})
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "data.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a feature store"):
        FeatureStore.open(tmp_path / "plain", "run-a", 5, 2)


def test_the_package_and_the_cli_do_not_import_dask():
    import subprocess
    import sys

    code = ("import sys, interp_fer, interp_fer.cli, interp_fer.mapping, "
            "interp_fer.feature_store; print(sorted(m for m in ('dask', 'distributed', 'zarr') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_reading_some_columns_of_the_last_axis(tmp_path):
    store = FeatureStore.open(tmp_path / "f.zarr", "run", 5, 2)
    store.ensure({"x": ((3, 4), "float32")})
    values = np.arange(60, dtype=np.float32).reshape(5, 3, 4)
    store.put("x", 0, values[:2])
    store.put("x", 2, values[2:])
    np.testing.assert_array_equal(store.array("x", columns=[3, 0]), values[:, :, [3, 0]])
    np.testing.assert_array_equal(store.array("x"), values)


def _store(tmp_path, n_rows=10, chunk=2):
    return FeatureStore.open(tmp_path / "f.zarr", "key", n_rows, chunk)


def test_a_partial_round_trips_exactly_and_atomically(tmp_path):
    store = _store(tmp_path)
    rng = np.random.default_rng(0)
    arrays = {"acc/conv2/peaks.moments": rng.normal(size=(2, 3, 4)),
              "acc/conv2/top.indices": np.arange(6, dtype=np.int64).reshape(2, 3),
              "containment/conv2": np.eye(3, dtype=np.int64), "flag": np.array(True)}
    assert store.partial(3) is None and store.partial_numbers() == set()
    store.put_partial(3, arrays)
    back = store.partial(3)
    assert sorted(back) == sorted(arrays)
    for name, values in arrays.items():
        assert back[name].dtype == values.dtype
        assert back[name].tobytes() == values.tobytes(), name  # bit for bit
    # No temporary file is left, and a killed writer's temporary file is not a partial.
    folder = tmp_path / "f.zarr" / "partials"
    assert sorted(f.name for f in folder.iterdir()) == ["00000003.npz", "zarr.json"]
    (folder / ".00000004.npz.999999-abcd.tmp.npz").write_bytes(b"half a file")
    assert store.partial_numbers() == {3} and store.partial(4) is None
    # A file cut short (a copy interrupted, a full disk) reads as no partial.
    (folder / "00000002.npz").write_bytes((folder / "00000003.npz").read_bytes()[:100])
    assert store.partial(2) is None


def test_partials_refuse_objects_and_chunks_outside_the_store(tmp_path):
    store = _store(tmp_path)
    with pytest.raises(TypeError, match="partial 1: array names holds Python objects"):
        store.put_partial(1, {"names": np.array(["a", None], dtype=object)})
    assert store.partial(1) is None
    with pytest.raises(IndexError, match="no chunk 5 .the store has 5"):
        store.put_partial(5, {"x": np.zeros(2)})


def test_dropping_partials_below_a_cursor_and_all(tmp_path):
    store = _store(tmp_path)
    for number in range(5):
        store.put_partial(number, {"x": np.full(3, number)})
    store.drop_partials(below=3)
    assert store.partial_numbers() == {3, 4}
    assert store.partial(4)["x"].tolist() == [4, 4, 4]
    store.drop_partials()
    assert store.partial_numbers() == set()
    assert not (tmp_path / "f.zarr" / "partials").exists()


def test_the_store_stays_a_zarr_group_with_partials(tmp_path):
    import warnings

    store = _store(tmp_path)
    store.ensure({"x": ((2,), "float32")})
    store.put("x", 0, np.ones((10, 2)))
    store.put_partial(0, {"x": np.zeros(1)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zarr warns of folders it does not know
        reopened = FeatureStore.open(tmp_path / "f.zarr", "key", 10, 2)
        assert sorted(reopened._group.keys()) == ["complete", "partials", "x"]
    np.testing.assert_array_equal(reopened.array("x"), np.ones((10, 2)))
    assert reopened.partial_numbers() == {0}
    # A store of another run goes with its partials.
    FeatureStore.open(tmp_path / "f.zarr", "another key", 10, 2)
    assert reopened.partial_numbers() == set()
