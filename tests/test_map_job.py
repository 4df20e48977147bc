"""The `map` job end to end on the sample faces: files, determinism, resume after kill -9."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from _helpers import kill_at_first_checkpoint

from interp_fer.mapping import MAPPING_COLUMNS

ARGS = ["--layers", "conv2,block2", "--n-boot", "8", "--n-null", "4", "--batch-size", "2",
        "--locate", "rf-center", "--seed", "3", "--quiet"]


def _map(out, *extra):
    command = [sys.executable, "-m", "interp_fer.cli", "map", "--out", str(out), *ARGS, *extra]
    # Run outside the checkout so that the installed package, not the source tree, is used.
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          cwd=Path(out).parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, sample_faces):
    out = tmp_path_factory.mktemp("map") / "reference"
    _map(out)
    return out


def test_outputs(reference_run):
    mapping = pd.read_csv(reference_run / "mapping.csv")
    assert list(mapping.columns[:len(MAPPING_COLUMNS)]) == MAPPING_COLUMNS
    assert set(mapping["layer"]) == {"conv2", "block2"}
    assert len(mapping) == 8 + 32
    scores = pd.read_csv(reference_run / "scores.csv")
    assert list(scores.columns) == ["layer", "channel", "au", "measure", "value"]
    assert {"distance", "p_value", "q_value", "hit_rate", "iou", "ks", "cohen_d", "partial",
            "effect_select", "effect", "control_bar"} <= set(scores["measure"])
    activity = pd.read_csv(reference_run / "activity.csv")
    assert len(activity) == 7 and {"AU1", "AU12", "AU25"} <= set(activity.columns)
    assert (reference_run / "looks_at.csv").is_file()
    assert (reference_run / "control_mapping.csv").is_file()
    run = json.loads((reference_run / "run.json").read_text())
    assert run["seed"] == 3 and run["layers"] == ["conv2", "block2"]
    assert sum(run["landmark_status"].values()) == run["data"]["n_images"] == 7
    assert "torch" in run["versions"]
    assert run["activity"]["sources"]["AU12"] == "landmarks"
    assert run["detector"]["small_sample"] and run["detector"]["control_detectors"] == 0
    report = (reference_run / "report.html").read_text()
    assert report.startswith("<!DOCTYPE html>") and "data:image/png;base64," in report
    assert 'id="mapping"' in report


@pytest.mark.parametrize("interval", ["0.001", "60"])
def test_resume_after_kill_gives_identical_files(reference_run, tmp_path, interval):
    # 0.001 s: a checkpoint after every batch, killed mid-pass; 60 s (the default): a run
    # shorter than one interval still checkpoints at the end of its pass, before the
    # decision and the report, and resumes from there.
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "interp_fer.cli", "map", "--out", str(out), *ARGS]
    env = dict(os.environ, INTERP_FER_CHECKPOINT_INTERVAL=interval)
    kill_at_first_checkpoint(command, out, env, tmp_path)
    checkpoint = out / ".checkpoint.npz"
    _map(out)
    for name in ("mapping.csv", "scores.csv"):
        assert (out / name).read_bytes() == (reference_run / name).read_bytes(), name
    assert not checkpoint.exists()


def test_changing_an_argument_invalidates_the_checkpoint(tmp_path):
    from interp_fer.checkpoint import Checkpoint

    out = tmp_path / "other"
    out.mkdir()
    stale = Checkpoint(out / ".checkpoint.npz", "a key of another run")
    stale.save(3, {"conv2/n_images": __import__("numpy").array(999)})
    _map(out, "--seed", "4")
    run = json.loads((out / "run.json").read_text())
    assert run["seed"] == 4
    mapping = pd.read_csv(out / "mapping.csv")
    assert (mapping["n_images"] == 7).all()


def test_a_second_map_on_the_same_out_is_refused_and_the_first_finishes(reference_run,
                                                                      tmp_path):
    out = tmp_path / "shared"
    command = [sys.executable, "-m", "interp_fer.cli", "map", "--out", str(out), *ARGS]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, cwd=tmp_path)
    lock = out / ".interp-fer.lock"
    deadline = time.time() + 300
    while not lock.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert lock.exists(), "the first run should hold the folder's lock"
    second = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert second.returncode == 1
    assert f"in use by another run (pid {first.pid}" in second.stderr
    assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    for name in ("mapping.csv", "scores.csv"):
        assert (out / name).read_bytes() == (reference_run / name).read_bytes(), name
    assert not lock.exists()
