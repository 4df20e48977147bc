"""Bad inputs and faults, tried as a user would: every case ends in a named, counted skip or
in one line on stderr with a documented exit status (issue 15), and never corrupts an output.

The CLI runs in-process through ``interp_fer.cli.main`` (argparse errors raise SystemExit),
or as ``python -m interp_fer.cli`` where a second process or a signal is the point.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from interp_fer.cli import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, main
from interp_fer.data import open_dataset
from interp_fer.outputs import (
    LOCK_NAME,
    FolderInUseError,
    OutputError,
    OutputLock,
    atomic_path,
    check_writable_file,
    check_writable_folder,
    pid_alive,
    remove_stale_temp_files,
    save_figure,
    write_csv,
    write_json,
    write_text,
)

FER2013 = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``interp-fer ARGV`` in-process: (exit status, stdout, stderr)."""
    try:
        status = main(list(argv))
    except SystemExit as exit_:  # argparse
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def error_line(err: str, command: str) -> str:
    """The one error line of a failed command (warnings may precede it)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines()
             if line.strip() and not line.startswith(f"interp-fer {command}: warning:")]
    assert len(lines) == 1 and lines[0].startswith(f"interp-fer {command}: "), err
    return lines[0]


@pytest.fixture(scope="module")
def faces_dir(sample_faces) -> Path:
    return Path(sample_faces.source).parent


@pytest.fixture()
def a_file(tmp_path) -> Path:
    """A regular file: any path under it cannot be created, even by root."""
    path = tmp_path / "plain_file"
    path.write_text("not a folder")
    return path


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


# --------------------------------------------------------------------------------------------
# 1. Options: refused when parsed, with argparse's message naming the option (status 2).
# --------------------------------------------------------------------------------------------

OUT = "/nonexistent-never-created"

BAD_OPTIONS = [
    (["map", "--out", OUT, "--alpha", "2"], "--alpha", "between 0 and 1"),
    (["map", "--out", OUT, "--alpha", "0"], "--alpha", "between 0 and 1"),
    (["map", "--out", OUT, "--n-null", "0"], "--n-null", ">= 1"),
    (["map", "--out", OUT, "--n-boot", "0"], "--n-boot", ">= 1"),
    (["map", "--out", OUT, "--batch-size", "0"], "--batch-size", ">= 1"),
    (["map", "--out", OUT, "--limit", "0"], "--limit", ">= 1"),
    (["map", "--out", OUT, "--seed", "-1"], "--seed", ">= 0"),
    (["map", "--out", OUT, "--dossiers", "-2"], "--dossiers", ">= 0"),
    (["map", "--out", OUT, "--aus", "12,x"], "--aus", "list of integers"),
    (["map", "--out", OUT, "--aus", "12,12"], "--aus", "twice"),
    (["map", "--out", OUT, "--layers", "block1,,block2"], "--layers", "empty name"),
    (["map", "--out", OUT, "--stratify"], "--stratify", "needs --limit"),
    (["evaluate", "--batch-size", "0"], "--batch-size", ">= 1"),
    (["evaluate", "--limit", "-3"], "--limit", ">= 1"),
    (["evaluate", "--limit", "many"], "--limit", "not an integer"),
    (["evaluate", "--device", "gpu7"], "--device", "not a torch device"),
    (["evaluate", "--arch-kwargs", "{nope"], "--arch-kwargs", "not valid JSON"),
    (["evaluate", "--arch-kwargs", "[1]"], "--arch-kwargs", "JSON object"),
    (["evaluate", "--std", "0"], "--std", "> 0"),
    (["evaluate", "--mean", "nan"], "--mean", "finite"),
    (["evaluate", "--mean", "0.5", "0.5"], "--mean", "one value or 1"),
    (["evaluate", "--input-size", "48", "48", "3"], "--input-size", "height and width"),
    (["project", "--image", "x.png", "--layer", "block1", "--out", "p.png",
      "--channels", "5,x"], "--channels", "list of integers"),
    (["project", "--image", "x.png", "--layer", "block1", "--out", "p.png",
      "--max-channels", "0"], "--max-channels", ">= 1"),
    (["landmarks", "--out", "l.csv", "--workers", "0"], "--workers", ">= 1"),
]


@pytest.mark.parametrize(("argv", "option", "why"), BAD_OPTIONS,
                         ids=[" ".join(case[0][:1] + case[0][-2:]) for case in BAD_OPTIONS])
def test_bad_option_values_are_refused_when_parsed(capsys, argv, option, why):
    status, _, err = run(capsys, *argv)
    assert status == EXIT_USAGE
    assert f"argument {option}" in err and why in err, err
    assert not Path(OUT).exists()


def test_shard_without_a_cluster_is_refused(capsys, tmp_path):
    status, _, err = run(capsys, "map", "--data", "samples", "--out", str(tmp_path / "o"),
                         "--shard", "2")
    assert status == EXIT_USAGE
    assert "--shard sets the batches per Dask task: it needs --workers or --scheduler" \
        in error_line(err, "map")
    assert not (tmp_path / "o").exists()


def test_every_option_has_help_text():
    from interp_fer.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps them here
    missing = [f"{name} {action.option_strings[0]}" for name, sub in commands.items()
               for action in sub._actions
               if action.option_strings and not action.help]
    assert missing == []
    device = next(a for a in commands["map"]._actions if a.dest == "device")
    assert device.default == "auto" and "cuda when available" in device.help
    assert "exit status" in parser.format_help() and "130" in parser.format_help()


# --------------------------------------------------------------------------------------------
# 2. Values that need the model or the data: one line, status 2, before any work.
# --------------------------------------------------------------------------------------------

def test_project_channels_outside_the_layer(capsys, faces_dir, tmp_path):
    status, _, err = run(capsys, "project", "--image", str(faces_dir / "happy.jpg"),
                         "--layer", "block1", "--channels", "5,999",
                         "--out", str(tmp_path / "p.png"))
    assert status == EXIT_USAGE
    assert "--channels 999: layer block1 has channels 0-15" in error_line(err, "project")
    assert not (tmp_path / "p.png").exists()


def test_project_writes_its_figure_atomically(capsys, faces_dir, tmp_path):
    status, _, _ = run(capsys, "project", "--image", str(faces_dir / "happy.jpg"),
                       "--layer", "conv1", "--channels", "0,7", "--out",
                       str(tmp_path / "p.png"))
    assert status == 0 and (tmp_path / "p.png").stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]


@pytest.mark.parametrize("argv", [
    ["project", "--image", "{happy}", "--layer", "blokc1", "--out", "{tmp}/p.png"],
    ["map", "--layers", "conv1,blokc1", "--out", "{tmp}/run"],
    ["layers", "--model", "no-such-zoo-model"],
], ids=["project-layer", "map-layers", "unknown-zoo-name"])
def test_unknown_layers_and_models_are_named(capsys, faces_dir, tmp_path, argv):
    argv = [a.format(happy=faces_dir / "happy.jpg", tmp=tmp_path) for a in argv]
    status, _, err = run(capsys, *argv)
    assert status == EXIT_USAGE
    line = error_line(err, argv[0])
    assert "blokc1" in line or "no-such-zoo-model" in line
    assert not (tmp_path / "run").exists()  # refused before writing: no empty folder left


def test_map_unknown_au_is_refused_before_any_work(capsys, tmp_path):
    status, _, err = run(capsys, "map", "--aus", "12,99", "--out", str(tmp_path / "run"))
    assert status == EXIT_USAGE
    assert "--aus 99: no region defined" in error_line(err, "map")


def test_evaluate_on_an_unlabelled_folder_says_so(capsys, tmp_path):
    for i in range(3):
        _png(tmp_path / "flat" / f"{i}.png", np.full((48, 48), 60 * i, np.uint8))
    status, out, err = run(capsys, "evaluate", "--data", str(tmp_path / "flat"), "--quiet")
    assert status == EXIT_USAGE
    assert "no image has an expression label" in error_line(err, "evaluate")
    assert "nan" not in out + err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(capsys):
    status, _, err = run(capsys, "layers", "--device", "cuda")
    assert status == EXIT_USAGE
    assert "CUDA is not available" in error_line(err, "layers")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_with_workers_leaves_cuda_to_the_workers():
    # The client only calibrates; each worker resolves --device (and refuses cuda without one).
    from interp_fer.cli import UsageError, _client_device, build_parser

    parser = build_parser()
    spread = parser.parse_args(["map", "--data", "x", "--out", "y", "--workers", "2",
                                "--device", "cuda"])
    assert _client_device(spread) == "cpu"
    alone = parser.parse_args(["map", "--data", "x", "--out", "y", "--device", "cuda"])
    with pytest.raises(UsageError, match="CUDA is not available"):
        _client_device(alone)


def test_device_auto_is_cpu_without_cuda_and_the_default():
    from interp_fer.cli import _resolve_device, build_parser

    args = build_parser().parse_args(["layers"])
    assert args.device == "auto"
    assert _resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------
# 3. Models: every broken file is one named error (these already held; keep them held).
# --------------------------------------------------------------------------------------------

PYEMOTION = "interp_fer.architectures:PyEmotionNet"


class _Evil:
    """A pickle that would create a file when loaded: it must never be executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _model_file(kind: str, folder: Path) -> tuple[Path, list[str], str]:
    """A broken model file of ``kind``: (path, extra CLI options, expected message part)."""
    from interp_fer.zoo import zoo_state_dict

    state = {k: v.clone() for k, v in zoo_state_dict("pyemotion").items()}
    path = folder / f"{kind}.pt"
    arch = ["--architecture", PYEMOTION]
    if kind == "nan-weights":
        state["conv_1.1.weight"][0, 0, 0, 0] = float("nan")
        torch.save(state, path)
        return path, arch, "non-finite"
    if kind == "inf-weights":
        state["linear.0.bias"][3] = float("inf")
        torch.save(state, path)
        return path, arch, "non-finite"
    if kind == "missing-key":
        del state["conv_2.1.weight"]
        torch.save(state, path)
        return path, arch, "conv_2.1.weight"
    if kind == "shape-mismatch":
        state["conv_3.1.weight"] = state["conv_3.1.weight"][:, :5]
        torch.save(state, path)
        return path, arch, "conv_3.1.weight"
    if kind == "truncated-torchscript":
        whole = folder / "whole.ts"
        torch.jit.save(torch.jit.script(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())),
                       whole)
        path = folder / "truncated.ts"
        path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
        return path, [], "truncated.ts"
    if kind == "malicious-pickle":
        path.write_bytes(pickle.dumps(_Evil(folder / "PWNED"), protocol=2))
        return path, [], "allow"
    if kind == "missing-file":
        return folder / "nowhere.pt", arch, "no such file"
    raise AssertionError(kind)


MODEL_KINDS = ["nan-weights", "inf-weights", "missing-key", "shape-mismatch",
               "truncated-torchscript", "malicious-pickle", "missing-file"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_broken_model_files_are_one_named_error(capsys, tmp_path, kind):
    path, extra, expected = _model_file(kind, tmp_path)
    status, _, err = run(capsys, "layers", "--model", str(path), *extra)
    assert status == EXIT_USAGE
    line = error_line(err, "layers")
    assert path.name in line and expected in line, line
    assert not (tmp_path / "PWNED").exists()  # nothing from the pickle was executed


@pytest.fixture(scope="module")
def torchscript_model(tmp_path_factory, mini_xception) -> Path:
    import warnings

    path = tmp_path_factory.mktemp("ts") / "mini_xception.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation and tracer warnings
        traced = torch.jit.trace(mini_xception.module.eval(), torch.zeros(1, 1, 64, 64))
        torch.jit.save(traced, path)
    return path


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("command", [
    ["layers"],
    ["project", "--image", "{happy}", "--layer", "block1", "--out", "{tmp}/p.png"],
    ["map", "--layers", "block1", "--out", "{tmp}/run"],
])
def test_torchscript_in_hooking_commands_is_one_line(capsys, faces_dir, tmp_path,
                                                     torchscript_model, command):
    argv = [a.format(happy=faces_dir / "happy.jpg", tmp=tmp_path) for a in command]
    status, _, err = run(capsys, *argv, "--model", str(torchscript_model),
                         "--input-size", "64")
    assert status == EXIT_USAGE
    line = error_line(err, argv[0])
    assert "TorchScript" in line and "--architecture" in line


def test_state_dict_of_mini_xception_gets_the_zoo_stages(tmp_path, mini_xception):
    from interp_fer import load_model

    path = tmp_path / "mx.pt"
    torch.save(mini_xception.module.state_dict(), path)
    loaded = load_model(path, architecture="interp_fer.architectures:MiniXception",
                        input_size=64, mean=0.5, std=0.5)
    assert loaded.stages == mini_xception.stages
    assert loaded.stages[2] == "block1"


def test_attribute_takes_a_loaded_model(mini_xception, sample_faces):
    from interp_fer.attributions import attribute

    images = [s.image for s in list(sample_faces.samples())[:2]]
    inputs = mini_xception.preprocess(images)
    from_model = attribute(mini_xception, images, 3, "saliency")
    from_module = attribute(mini_xception.module, inputs, 3, "saliency")
    assert from_model.shape == (2, 1, 64, 64)
    torch.testing.assert_close(from_model, from_module, rtol=0, atol=0)
    with pytest.raises(TypeError, match="nn.Module or a FERModel"):
        attribute("mini-xception", inputs, 3)


# --------------------------------------------------------------------------------------------
# 4. Images: unreadable ones are named, counted and skipped; the run goes on.
# --------------------------------------------------------------------------------------------

@pytest.fixture()
def broken_images(tmp_path, faces_dir) -> Path:
    """Class folders with good faces and every kind of bad image file."""
    root = tmp_path / "faces"
    (root / "happy").mkdir(parents=True)
    (root / "angry").mkdir(parents=True)
    shutil.copy(faces_dir / "happy.jpg", root / "happy" / "good.jpg")
    shutil.copy(faces_dir / "angry.jpg", root / "angry" / "good.jpg")
    (root / "happy" / "zero_bytes.png").write_bytes(b"")
    data = (faces_dir / "angry.jpg").read_bytes()
    (root / "angry" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "angry" / "text.png").write_text("not an image")
    _png(root / "happy" / "one_pixel.png", np.array([[128]], np.uint8))
    _png(root / "angry" / "no_face.png", np.full((64, 64), 90, np.uint8))
    return root


def test_evaluate_counts_unreadable_images_by_reason(capsys, broken_images, tmp_path):
    out = tmp_path / "e.json"
    status, stdout, _ = run(capsys, "evaluate", "--data", str(broken_images), "--json",
                            str(out), "--quiet")
    assert status == 0
    import json

    payload = json.loads(out.read_text())
    assert payload["n_images"] == 4  # two faces, the 1x1 image, the blank image
    assert payload["n_skipped"] == 3
    assert sum(n for reason, n in payload["skipped"].items()
               if reason.startswith("unreadable")) == 3
    assert "inputs: 7; 4 processed, 3 skipped (unreadable: " in stdout


def test_landmarks_names_every_bad_image(capsys, broken_images, tmp_path):
    import pandas as pd

    out = tmp_path / "marks.csv"
    status, stdout, _ = run(capsys, "landmarks", "--data", str(broken_images), "--out",
                            str(out), "--no-cache", "--workers", "1", "--quiet")
    assert status == 0
    table = pd.read_csv(out)
    status_of = dict(zip(table["key"].map(lambda k: Path(k).name), table["status"],
                         strict=False))
    assert status_of["zero_bytes.png"] == "unreadable"
    assert status_of["truncated.jpg"] == "unreadable"
    assert status_of["text.png"] == "unreadable"
    assert status_of["good.jpg"] == "detected"
    assert "inputs: 7; " in stdout and "skipped" in stdout and "unreadable: 3" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces", "marks.csv"]


@pytest.mark.parametrize(("command", "name"), [
    ("project", "zero_bytes.png"), ("project", "truncated.jpg"),
    ("au-regions", "truncated.jpg"), ("au-regions", "zero_bytes.png"),
    ("project", "missing.png"),
])
def test_one_bad_image_is_one_line(capsys, broken_images, tmp_path, command, name):
    image = next(iter(broken_images.rglob(name)), broken_images / name)
    extra = ["--layer", "block1"] if command == "project" else []
    status, _, err = run(capsys, command, "--image", str(image), *extra,
                         "--out", str(tmp_path / "fig.png"))
    assert status == EXIT_USAGE
    line = error_line(err, command)
    assert f"--image {image}" in line
    assert not (tmp_path / "fig.png").exists()


def test_debug_adds_the_traceback(capsys, broken_images, tmp_path):
    image = broken_images / "happy" / "zero_bytes.png"
    status, _, err = run(capsys, "--debug", "au-regions", "--image", str(image),
                         "--out", str(tmp_path / "fig.png"))
    assert status == EXIT_USAGE and "Traceback" in err
    status, _, err = run(capsys, "au-regions", "--debug", "--image", str(image),
                         "--out", str(tmp_path / "fig.png"))
    assert status == EXIT_USAGE and "Traceback" in err


# --------------------------------------------------------------------------------------------
# 5. Labels: refused or skipped per row with a reason, the same in every command.
# --------------------------------------------------------------------------------------------

@pytest.fixture()
def labelled_faces(tmp_path, faces_dir) -> Path:
    """The sample faces with a labels CSV holding one of each bad row."""
    folder = tmp_path / "labelled"
    folder.mkdir()
    for name in ("happy.jpg", "angry.jpg", "surprise.jpg", "disgust.jpg", "single_face.jpg"):
        shutil.copy(faces_dir / name, folder / name)
    (folder / "labels.csv").write_text(textwrap.dedent("""\
        path,label_index,label_name,AU12
        happy.jpg,3,happy,yes
        angry.jpg,3,sad,0
        surprise.jpg,5,surprise,Absent
        surprise.jpg,5,surprise,0
        happy.jpg,4,sad,1
        disgust.jpg,1,disgust,maybe
        single_face.jpg,9,,
        missing.jpg,6,neutral,no
    """))
    return folder


EXPECTED_REFUSED = {"conflicting labels": 1, "duplicate path": 2, "bad AU value": 1,
                    "label out of range": 1}


def test_labels_csv_rows_refused_with_reasons(labelled_faces):
    with pytest.warns(UserWarning, match="5 rows refused"):
        dataset = open_dataset(labelled_faces / "labels.csv", class_names=FER2013)
    assert dataset.rejected_counts() == EXPECTED_REFUSED
    reasons = dict(dataset.rejected)
    assert "label_index 3 is 'happy', label_name 'sad'" in reasons[str(labelled_faces /
                                                                        "angry.jpg")]
    assert "row 8 of labels.csv" in reasons[str(labelled_faces / "single_face.jpg")]
    assert "column AU12: 'maybe'" in reasons[str(labelled_faces / "disgust.jpg")]
    duplicates = [r for _, r in dataset.rejected if r.startswith("duplicate path")]
    assert any("with other labels" in r for r in duplicates)  # happy.jpg as 4/sad
    assert any("with other labels" not in r for r in duplicates)  # surprise.jpg, same label
    kept = {Path(r.key).name: (r.label, r.aus) for r in dataset.records}
    assert kept == {"happy.jpg": (3, {12: 1.0}), "surprise.jpg": (5, {12: 0.0}),
                    "missing.jpg": (6, {12: 0.0})}


def test_evaluate_reports_refused_rows_and_missing_files(capsys, labelled_faces, tmp_path):
    import json

    out = tmp_path / "e.json"
    status, stdout, _ = run(capsys, "evaluate", "--data", str(labelled_faces / "labels.csv"),
                            "--json", str(out), "--quiet")
    assert status == 0
    payload = json.loads(out.read_text())
    assert payload["n_images"] == 2 and payload["skipped"] == {
        "unreadable: FileNotFoundError": 1}
    assert stdout.splitlines()[-2].startswith("inputs: 8; 2 processed, 6 skipped (")
    for reason, count in EXPECTED_REFUSED.items():
        assert f"{reason}: {count}" in stdout


def test_with_labels_applies_the_same_rule(labelled_faces):
    folder = open_dataset(labelled_faces, class_names=FER2013)
    with pytest.warns(UserWarning, match="rows refused"):
        dataset = folder.with_labels(labelled_faces / "labels.csv")
    assert dataset.rejected_counts() == EXPECTED_REFUSED
    names = {Path(r.key).name: r.label for r in dataset.records}
    # angry (conflict), disgust (bad AU) and single_face (out of range) lose their only row
    assert names == {"happy.jpg": 3, "surprise.jpg": 5}


def test_fer2013_emotion_out_of_range_is_skipped_and_counted(tmp_path, capsys):
    pixels = " ".join(["128"] * 48 * 48)
    csv = tmp_path / "fer.csv"
    csv.write_text("emotion,pixels,Usage\n" + f"3,{pixels},PublicTest\n"
                   f"9,{pixels},PublicTest\n" + f"x,{pixels},PublicTest\n"
                   f"0,{pixels},PublicTest\n")
    with pytest.warns(UserWarning, match="2 rows refused"):
        dataset = open_dataset(csv)
    assert [r.label for r in dataset.records] == [3, 0]
    assert dataset.rejected_counts() == {"label out of range": 1, "bad label": 1}
    status, stdout, _ = run(capsys, "evaluate", "--data", str(csv), "--quiet")
    assert status == 0
    assert "inputs: 4; 2 processed, 2 skipped (" in stdout
    assert "label out of range: 1" in stdout and "bad label: 1" in stdout


@pytest.mark.parametrize(("cell", "value"), [
    ("1", 1.0), ("0", 0.0), ("2.5", 2.5), ("yes", 1.0), ("NO", 0.0), ("True", 1.0),
    ("false", 0.0), ("Present", 1.0), ("absent", 0.0), ("", None), (" 3 ", 3.0),
])
def test_au_cells(cell, value):
    from interp_fer.labels import parse_au_value

    assert parse_au_value(cell) == value


@pytest.mark.parametrize("cell", ["maybe", "1,5", "y"])
def test_bad_au_cells(cell):
    from interp_fer.labels import parse_au_value

    with pytest.raises(ValueError, match="not a number, 0/1, yes/no"):
        parse_au_value(cell)


# --------------------------------------------------------------------------------------------
# 6. Outputs: writable before any work, atomic, one run per folder.
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["map", "--out", "{blocked}/run", "--data", "/no/such/data"],
    ["evaluate", "--json", "{blocked}/e.json", "--data", "/no/such/data"],
    ["evaluate", "--figure", "{blocked}/c.png", "--data", "/no/such/data"],
    ["project", "--out", "{blocked}/p.png", "--image", "/no/such.png", "--layer", "block1"],
    ["landmarks", "--out", "{blocked}/l.csv", "--data", "/no/such/data"],
    ["au-regions", "--out", "{blocked}/r.png", "--image", "/no/such.png"],
], ids=["map", "evaluate-json", "evaluate-figure", "project", "landmarks", "au-regions"])
def test_unwritable_output_is_refused_before_any_work(capsys, a_file, argv):
    # The data/image do not exist either: the output must be checked first (status 1, about
    # the output), not after reading anything (status 2, about the input).
    argv = [a.format(blocked=a_file) for a in argv]
    status, _, err = run(capsys, *argv)
    assert status == EXIT_FAILURE
    line = error_line(err, argv[0])
    assert str(a_file) in line and "not a folder" in line and "/no/such" not in line


def test_check_writable(tmp_path, a_file):
    assert check_writable_folder(tmp_path / "new" / "deep").is_dir()
    assert check_writable_file(tmp_path / "sub" / "x.csv").parent.is_dir()
    with pytest.raises(OutputError, match="is a folder"):
        check_writable_file(tmp_path)
    with pytest.raises(OutputError, match="not a folder"):
        check_writable_folder(a_file)
    with pytest.raises(OutputError, match="a parent of .* is a file"):
        check_writable_folder(a_file / "below")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "plain_file", "sub"]


def test_atomic_writes_keep_the_old_file_on_failure(tmp_path):
    import pandas as pd

    target = tmp_path / "scores.csv"
    write_csv(pd.DataFrame({"a": [1, 2]}), target)
    before = target.read_bytes()
    for error in (RuntimeError("disk on fire"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with atomic_path(target) as partial:
                partial.write_text("half a fi")
                raise error
        assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv"]
    write_json({"x": [1, 2]}, tmp_path / "run.json")
    write_text("hello", tmp_path / "a.txt")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure()
    save_figure(figure, tmp_path / "f.pdf")
    save_figure(figure, tmp_path / "f.png", dpi=50)
    plt.close(figure)
    assert (tmp_path / "f.pdf").read_bytes()[:4] == b"%PDF"
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "f.pdf", "f.png", "run.json",
                                                          "scores.csv"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not pid_alive(child.pid)
    return child.pid


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path):
    dead = _dead_pid()
    stale = [tmp_path / f".scores.csv.{dead}-0a1b2c3d.tmp.csv",
             tmp_path / f"..checkpoint.npz.{dead}.tmp"]
    mine = tmp_path / f".scores.csv.{os.getpid()}-0a1b2c3d.tmp.csv"
    other = tmp_path / "notes.tmp"
    for path in [*stale, mine, other]:
        path.write_text("x")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other.name])


_HOLDER = textwrap.dedent("""
    import sys
    import pandas as pd
    from interp_fer.outputs import OutputLock, write_csv
    with OutputLock(sys.argv[1], "holder run"):
        write_csv(pd.DataFrame({"channel": range(5)}), sys.argv[1] + "/mapping.csv")
        print("ready", flush=True)
        sys.stdin.read()  # hold the folder until the test closes stdin
""")


def test_second_run_on_the_same_out_is_refused(capsys, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "ready"
        before = (out / "mapping.csv").read_bytes()
        status, _, err = run(capsys, "map", "--out", str(out), "--layers", "conv1",
                             "--locate", "rf-center", "--n-null", "2", "--n-boot", "2",
                             "--quiet")
        assert status == EXIT_FAILURE
        line = error_line(err, "map")
        assert f"in use by another run (pid {holder.pid} on {socket.gethostname()}" in line
        assert "holder run" in line
        assert (out / "mapping.csv").read_bytes() == before
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "mapping.csv"]
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not (out / LOCK_NAME).exists()  # released by its owner


def test_lock_of_a_killed_run_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == "ready"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    (out / f".scores.csv.{holder.pid}-00000000.tmp.csv").write_text("left by kill -9")
    with pytest.warns(UserWarning, match=f"taking over the lock .*pid {holder.pid}"):
        with OutputLock(out, "second"):
            assert f'"pid": {os.getpid()}' in (out / LOCK_NAME).read_text()
            assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "mapping.csv"]
            with pytest.raises(FolderInUseError, match=f"pid {os.getpid()}"):
                OutputLock(out).acquire()
    assert not (out / LOCK_NAME).exists()


def test_lock_of_another_host_is_respected(tmp_path):
    (tmp_path / LOCK_NAME).write_text('{"pid": 1, "host": "elsewhere", "started": "then"}')
    with pytest.raises(FolderInUseError, match="pid 1 on elsewhere, started then"):
        OutputLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).exists()


def test_lock_released_on_interrupt(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with OutputLock(tmp_path):
            raise KeyboardInterrupt
    assert not (tmp_path / LOCK_NAME).exists()


# --------------------------------------------------------------------------------------------
# 7. Interrupted runs: one line, status 130 (Ctrl-C) or 143 (SIGTERM), nothing half-written.
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_csv(tmp_path_factory) -> Path:
    """A FER2013-layout CSV long enough that evaluate runs for a while."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("long") / "fer.csv"
    with open(path, "w") as handle:
        handle.write("emotion,pixels,Usage\n")
        for i in range(6000):
            pixels = " ".join(map(str, rng.integers(0, 256, 48 * 48)))
            handle.write(f"{i % 7},{pixels},PublicTest\n")
    return path


@pytest.mark.parametrize(("sig", "status", "word"), [
    (signal.SIGINT, EXIT_INTERRUPTED, "interrupted"),
    (signal.SIGTERM, EXIT_TERMINATED, "terminated"),
])
def test_interrupted_run_is_one_line_and_leaves_no_file(tmp_path, long_csv, sig, status, word):
    out = tmp_path / "out"
    out.mkdir()
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        child = subprocess.Popen(
            [sys.executable, "-m", "interp_fer.cli", "evaluate", "--data", str(long_csv),
             "--json", str(out / "e.json"), "--batch-size", "64"],
            stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path,
            env=dict(os.environ, OMP_NUM_THREADS="1"))
        deadline = time.time() + 120
        while "img" not in log.read_text() and time.time() < deadline:
            time.sleep(0.1)
        assert child.poll() is None, log.read_text()
        os.kill(child.pid, sig)
        code = child.wait(timeout=60)
    text = log.read_text()
    assert code == status, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    # tqdm redraws its bar with "\r": every other line is the bar, the message is last
    messages = [line for line in text.splitlines() if line.strip() and "img" not in line]
    assert messages == [f"interp-fer evaluate: {word}"], text[-3000:]
    assert list(out.iterdir()) == []


# --------------------------------------------------------------------------------------------
# 8. Checkpoint files do not outlive the process.
# --------------------------------------------------------------------------------------------

def test_checkpoint_temp_file_removed_when_save_fails(tmp_path, monkeypatch):
    from interp_fer.checkpoint import Checkpoint

    checkpoint = Checkpoint(tmp_path / ".checkpoint.npz", "k")
    checkpoint.save(1, {"a": np.arange(3)})

    def interrupted(handle, **arrays):
        handle.write(b"PK partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(2, {"a": np.arange(4)})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [".checkpoint.npz"]
    assert checkpoint.load()[0] == 1


def test_checkpoint_removes_temp_files_of_dead_processes(tmp_path):
    from interp_fer.checkpoint import Checkpoint

    dead = _dead_pid()
    # Checkpoint.save writes ".NAME.PID.tmp": "..checkpoint.npz.PID.tmp" for map's file
    stale = tmp_path / f"..checkpoint.npz.{dead}.tmp"
    live = tmp_path / f"..checkpoint.npz.{os.getpid()}.tmp"
    stale.write_bytes(b"x" * 1000)
    live.write_bytes(b"x")
    Checkpoint(tmp_path / ".checkpoint.npz", "k")
    assert not stale.exists() and live.exists()


def test_checkpoint_due_every_interval(tmp_path):
    from interp_fer.checkpoint import Checkpoint

    checkpoint = Checkpoint(tmp_path / "c.npz", "k", interval=60.0)
    start = time.monotonic()
    assert not checkpoint.due(start + 1)
    assert checkpoint.due(start + 60.5)
    checkpoint.save(1, {"a": np.zeros(2)})
    assert not checkpoint.due()
    assert checkpoint.due(time.monotonic() + 61)
    with pytest.raises(ValueError, match="interval"):
        Checkpoint(tmp_path / "c.npz", "k", interval=0)


def test_large_atomic_write_appears_only_when_complete(tmp_path):
    # A large atomic write through a file object: the target appears only when complete.
    data = os.urandom(3_000_000)
    with atomic_path(tmp_path / "big.bin") as partial:
        with open(partial, "wb") as handle:
            for start in range(0, len(data), 65536):
                handle.write(data[start:start + 65536])
                assert not (tmp_path / "big.bin").exists()
    assert (tmp_path / "big.bin").read_bytes() == data
