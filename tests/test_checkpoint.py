"""Checkpoints: resume with the same key, ignore another run's, survive a kill mid-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np

from interp_fer.checkpoint import Checkpoint, run_key


def test_round_trip_and_key_invalidation(tmp_path):
    key = run_key({"model": "m", "layers": ["a"], "seed": 0})
    checkpoint = Checkpoint(tmp_path / "state.npz", key)
    assert checkpoint.load() is None
    checkpoint.save(42, {"hist": np.arange(6).reshape(2, 3)})
    cursor, arrays = checkpoint.load()
    assert cursor == 42
    np.testing.assert_array_equal(arrays["hist"], np.arange(6).reshape(2, 3))
    other = Checkpoint(tmp_path / "state.npz", run_key({"model": "m", "layers": ["a"], "seed": 1}))
    assert other.load() is None
    checkpoint.clear()
    assert not (tmp_path / "state.npz").exists()


def test_garbage_file_is_ignored(tmp_path):
    (tmp_path / "state.npz").write_bytes(b"garbage")
    assert Checkpoint(tmp_path / "state.npz", "k").load() is None


def test_kill_9_leaves_a_complete_checkpoint(tmp_path):
    # A child saves checkpoints in a loop; SIGKILL it at an arbitrary moment and check that
    # what is on disk is always one complete, consistent checkpoint.
    script = textwrap.dedent(f"""
        import numpy as np
        from interp_fer.checkpoint import Checkpoint
        checkpoint = Checkpoint({str(tmp_path / 'state.npz')!r}, "k")
        cursor = 0
        while True:
            cursor += 1
            checkpoint.save(cursor, {{"values": np.full(200_000, cursor, dtype=np.int64)}})
            print(cursor, flush=True)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for _ in range(5):
        child.stdout.readline()
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    cursor, arrays = Checkpoint(tmp_path / "state.npz", "k").load()
    assert cursor >= 5
    assert (arrays["values"] == cursor).all()
