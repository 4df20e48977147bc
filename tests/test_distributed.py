"""The map pass on a 2-worker Dask LocalCluster: identical files, a killed worker, a killed client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed")

from _helpers import kill_at_first_checkpoint  # noqa: E402

from interp_fer.checkpoint import Checkpoint  # noqa: E402
from interp_fer.distributed import Cluster, worker_device, worker_rank  # noqa: E402
from interp_fer.feature_store import FeatureStore  # noqa: E402
from interp_fer.layer_mapping import MappingOptions  # noqa: E402
from interp_fer.mapping import long_scores, map_dataset  # noqa: E402

LAYERS = ("conv2", "block2")
OPTIONS = MappingOptions(n_boot=8, n_null=4, seed=3)


def _run(batch_size):
    return dict(locate="rf-center", options=OPTIONS, controls=2, batch_size=batch_size,
                progress=False)


def _tables(result):
    return result.mapping.to_csv(index=False), long_scores(result.scores).to_csv(index=False)


@pytest.fixture(scope="module")
def cluster():
    with Cluster.local(2) as running:
        yield running


@pytest.mark.parametrize("shard", [1, 3])
def test_two_workers_give_the_single_process_tables(mini_xception, sample_faces, cluster,
                                                    tmp_path, shard):
    alone = map_dataset(mini_xception, sample_faces, LAYERS, **_run(2))
    cluster.shard = shard
    spread = map_dataset(mini_xception, sample_faces, LAYERS, store=tmp_path / "f.zarr",
                         cluster=cluster, **_run(2))
    assert _tables(spread) == _tables(alone)
    store = FeatureStore.reopen(tmp_path / "f.zarr")
    assert store.complete().all() and store.partial_numbers() == set()
    # No CUDA here: "auto" ran every worker on the CPU, and run.json says so.
    assert spread.run["distributed"] == {"shard": shard, "device": "auto",
                                         "workers": {"0": "cpu", "1": "cpu"}}


def test_a_worker_killed_mid_run_changes_nothing(mini_xception, sample_faces, cluster,
                                                 tmp_path):
    cluster.shard = 1
    alone = map_dataset(mini_xception, sample_faces, LAYERS, **_run(1))
    pids = list(cluster.client.run(os.getpid).values())
    path = tmp_path / "f.zarr"
    seen: dict[str, int] = {}

    def kill_when_a_chunk_is_written():
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                done = FeatureStore.reopen(path).complete()
            except Exception:  # not created yet
                time.sleep(0.01)
                continue
            if done.any():
                seen["complete_at_kill"] = int(done.sum())
                os.kill(pids[0], signal.SIGKILL)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_when_a_chunk_is_written)
    killer.start()
    spread = map_dataset(mini_xception, sample_faces, LAYERS, store=path, cluster=cluster,
                         **_run(1))
    killer.join()
    assert 0 < seen["complete_at_kill"] < len(alone.activity)  # killed mid-run
    assert _tables(spread) == _tables(alone)
    deadline = time.time() + 60  # the nanny restarts the killed worker
    while cluster.n_workers < 2 and time.time() < deadline:
        time.sleep(0.2)


class _ClientDied(Exception):
    """The client's end, simulated right after it saved a checkpoint."""


def _wait_for_tasks(client, timeout=120.0):
    deadline = time.time() + timeout
    while any(state.status == "pending" for state in list(client.futures.values())):
        assert time.time() < deadline, "the workers did not finish their tasks"
        time.sleep(0.05)


def _cursor(path):
    import json

    with np.load(path) as archive:
        return json.loads(str(archive["__header__"]))["cursor"]


def _die_after_checkpoint(model, faces, cluster, path, saved, monkeypatch):
    """A distributed map whose client dies right after its first checkpoint at cursor >= 2,
    once the tasks in flight have finished (their chunks and partials written): a
    deterministic ``kill -9`` of the client."""
    save = Checkpoint.save

    def save_then_die(self, cursor, arrays):
        save(self, cursor, arrays)
        if cursor >= 2:
            _wait_for_tasks(cluster.client)
            raise _ClientDied(cursor)

    with monkeypatch.context() as patch:
        patch.setattr(Checkpoint, "save", save_then_die)
        with pytest.raises(_ClientDied):
            map_dataset(model, faces, LAYERS, store=path, cluster=cluster, checkpoint=saved,
                        checkpoint_interval=1e-6, **_run(1))


def test_a_resumed_client_merges_written_chunks_instead_of_computing_them(
        mini_xception, sample_faces, cluster, tmp_path, monkeypatch):
    cluster.shard = 1
    alone = map_dataset(mini_xception, sample_faces, LAYERS, **_run(1))
    path, saved = tmp_path / "f.zarr", tmp_path / "checkpoint.npz"
    _die_after_checkpoint(mini_xception, sample_faces, cluster, path, saved, monkeypatch)
    store = FeatureStore.reopen(path)
    start, n_chunks = _cursor(saved), store.n_chunks
    # How many tasks the client submitted before it died depends on the order results came
    # in: the last chunk's partial goes (its writer killed before the rename), so at least
    # one chunk is left to compute.
    (path / "partials" / f"{n_chunks - 1:08d}.npz").unlink(missing_ok=True)
    written = {int(n) for n in np.flatnonzero(store.complete())} & store.partial_numbers()
    ahead = {n for n in written if n >= start}
    assert start == 2 and ahead, "chunks should be written beyond the checkpoint"
    assert len(ahead) < n_chunks - start, "some chunks should be left to compute"

    spread = map_dataset(mini_xception, sample_faces, LAYERS, store=path, cluster=cluster,
                         checkpoint=saved, **_run(1))
    assert _tables(spread) == _tables(alone)
    # Only the chunks without a partial went to the workers.
    assert cluster.submitted == [n for n in range(start, n_chunks) if n not in ahead]
    assert store.partial_numbers() == set() and not saved.exists()


def test_a_resumed_client_computes_chunks_whose_partial_is_missing_or_cut(
        mini_xception, sample_faces, cluster, tmp_path, monkeypatch):
    cluster.shard = 2  # shards of 2; the 4 tasks in flight cover all 7 chunks
    alone = map_dataset(mini_xception, sample_faces, LAYERS, **_run(1))
    path, saved = tmp_path / "f.zarr", tmp_path / "checkpoint.npz"
    _die_after_checkpoint(mini_xception, sample_faces, cluster, path, saved, monkeypatch)
    store = FeatureStore.reopen(path)
    assert _cursor(saved) == 2 and store.complete().all()
    assert store.partial_numbers() >= {2, 3, 4, 5, 6}
    folder = path / "partials"
    (folder / "00000004.npz").unlink()  # killed before its partial was renamed into place
    cut = folder / "00000005.npz"
    cut.write_bytes(cut.read_bytes()[:1000])  # unreadable: computed again
    spread = map_dataset(mini_xception, sample_faces, LAYERS, store=path, cluster=cluster,
                         checkpoint=saved, **_run(1))
    assert _tables(spread) == _tables(alone)
    assert cluster.submitted == [4, 5]
    assert store.partial_numbers() == set()


def test_a_shard_writes_each_chunk_with_its_partial_and_returns_its_counts(
        mini_xception, sample_faces, tmp_path):
    from contextlib import nullcontext

    from interp_fer.distributed import _COUNTS, _unpack_counts, run_shard
    from interp_fer.mapping import _MapPass, prepare_faces

    faceset = prepare_faces(mini_xception, sample_faces, progress=False)
    job = _MapPass(mini_xception, sample_faces, faceset, LAYERS, (), "rf-center", OPTIONS, 2,
                   True)  # labelled: the label histograms' counts too
    calibrated = job.calibrate()
    store = FeatureStore.open(tmp_path / "f.zarr", "k", len(faceset.faces), 2)
    job.prepare_store(store)
    # Here, not on a Dask worker: the task runs as "local" on the CPU.
    worker, device, numbers, counts = run_shard(job, calibrated, str(store.path), [1, 2])
    assert (worker, device, numbers) == ("local", "cpu", [1, 2])
    assert store.complete().tolist() == [False, True, True, False]
    assert store.partial_numbers() == {1, 2}
    totals = {}
    scratch = FeatureStore.open(tmp_path / "g.zarr", "k", len(faceset.faces), 2)
    job.prepare_store(scratch)
    for number in (1, 2):  # each partial holds exactly the chunk computed alone
        alone = job.empty_stream(calibrated, scratch)
        job.run_batch(number, alone, lambda phase: nullcontext())
        expected = {k: v for k, v in alone.state().items() if not k.startswith("store/")}
        saved = _unpack_counts(store.partial(number))
        assert set(saved) == set(expected)
        for key, value in expected.items():
            assert np.array_equal(saved[key], value), (number, key)
            if key.endswith(_COUNTS):
                totals[key] = totals.get(key, 0) + value
    # The shard's counts are the sum of its chunks' (all three kinds of histogram counts).
    back = _unpack_counts(counts)
    assert len(back) == 3 * len(LAYERS) and set(back) == set(totals)
    for key, value in back.items():
        assert np.array_equal(value, totals[key]), key


def test_worker_device_choices():
    assert worker_device("cpu", 4, 1) == "cpu"
    assert worker_device("auto", 0, 3) == "cpu"
    # Worker i of a machine takes GPU i mod n; one visible GPU (CUDA_VISIBLE_DEVICES) is it.
    assert [worker_device("auto", 2, rank) for rank in range(5)] == \
        ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert [worker_device("cuda", 3, rank) for rank in (0, 4, 8)] == ["cuda:0", "cuda:1", "cuda:2"]
    assert worker_device("cuda", 1, 5) == "cuda:0"
    assert worker_device("cuda:1", 2, 0) == "cuda:1"
    for requested, n_cuda, rank, words in [
            ("cuda", 0, 0, "--device cuda: torch sees no CUDA device"),
            ("cuda:0", 0, 1, "--device cuda:0: torch sees no CUDA device"),
            ("cuda:2", 2, 0, "--device cuda:2: torch sees 2 CUDA device"),
            ("mps", 0, 0, "choose auto, cpu, cuda or cuda:N"),
            ("gpu", 1, 0, "choose auto, cpu, cuda or cuda:N"),
            ("auto", 1, -1, "worker rank must be >= 0")]:
        with pytest.raises(ValueError, match=words):
            worker_device(requested, n_cuda, rank)


def test_worker_rank_from_names_or_positions():
    assert [worker_rank(name) for name in (0, "1", "gpu-node-3")] == [0, 1, 3]
    # Named after its address (dask worker without --name): position on its machine.
    addresses = ["tcp://10.0.0.1:40001", "tcp://10.0.0.1:39999"]
    assert [worker_rank(a, addresses) for a in addresses] == [1, 0]
    assert worker_rank("tcp://10.0.0.1:50000", addresses) == 2  # one that joined later


def test_cuda_workers_are_refused_without_cuda(mini_xception, sample_faces, cluster,
                                               tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="device 'gpu' for the Dask workers"):
        Cluster(cluster.client, device="gpu")
    cluster.device = "cuda"
    try:
        with pytest.raises(RuntimeError, match=r"Dask worker \d: --device cuda: torch sees "
                                               "no CUDA device"):
            map_dataset(mini_xception, sample_faces, LAYERS, store=tmp_path / "f.zarr",
                        cluster=cluster, **_run(4))
    finally:
        cluster.device = "auto"
    assert not FeatureStore.reopen(tmp_path / "f.zarr").complete().any()  # refused first


ARGS = ["--layers", "conv2,block2", "--n-boot", "8", "--n-null", "4", "--batch-size", "1",
        "--locate", "rf-center", "--seed", "3", "--controls", "2", "--dossiers", "0", "--quiet"]


def _map(out, *extra, env=None):
    command = [sys.executable, "-m", "interp_fer.cli", "map", "--out", str(out), *ARGS, *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          cwd=Path(out).parent, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_killed_client_resumes_from_the_store(sample_faces, tmp_path):
    reference = tmp_path / "reference"
    _map(reference)
    out = tmp_path / "killed"
    env = dict(os.environ, INTERP_FER_CHECKPOINT_INTERVAL="0.001")
    command = [sys.executable, "-m", "interp_fer.cli", "map", "--out", str(out), *ARGS,
               "--workers", "2"]
    # Killed with its whole session, so that its local cluster's processes go too.
    kill_at_first_checkpoint(command, out, env, tmp_path)
    checkpoint = out / ".checkpoint.npz"
    done_before = FeatureStore.reopen(out / "features.zarr").complete()
    assert done_before.any()
    _map(out, "--workers", "2", env=env)
    for name in ("mapping.csv", "scores.csv"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not checkpoint.exists()


def test_scheduler_and_workers_started_as_the_readme_says(tmp_path):
    import socket

    with socket.socket() as probe:  # a free port for this test's scheduler
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    bin_dir = Path(sys.executable).parent
    started = []
    try:
        started.append(subprocess.Popen([bin_dir / "dask", "scheduler", "--port", str(port),
                                         "--no-dashboard"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True))
        started.append(subprocess.Popen([bin_dir / "dask", "worker", address, "--nworkers", "2",
                                         "--nthreads", "1", "--no-dashboard"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True))
        reference = tmp_path / "reference"
        _map(reference, "--batch-size", "2")
        _map(tmp_path / "scheduled", "--batch-size", "2", "--scheduler", address)
        for name in ("mapping.csv", "scores.csv"):
            assert (tmp_path / "scheduled" / name).read_bytes() == \
                (reference / name).read_bytes(), name
    finally:
        for process in reversed(started):
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)


def test_a_bad_scheduler_address_or_a_scheduler_without_workers_says_what_to_do():
    from distributed import LocalCluster

    with pytest.raises(ConnectionError, match="give tcp://HOST:8786"):
        Cluster.connect("http://127.0.0.1:8787", timeout=2)  # the dashboard's address
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as empty:
        with pytest.raises(ConnectionError, match="has no workers after 2 s; start some "
                                                  "with `dask worker"):
            Cluster.connect(empty.scheduler_address, timeout=2)
