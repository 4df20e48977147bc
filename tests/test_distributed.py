"""The map pass on a 2-worker Dask LocalCluster: identical files, a killed worker, a killed client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("distributed")

from _helpers import kill_at_first_checkpoint  # noqa: E402

from interp_fer.distributed import Cluster  # noqa: E402
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
    assert FeatureStore.reopen(tmp_path / "f.zarr").complete().all()


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
