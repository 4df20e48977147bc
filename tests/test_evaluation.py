"""evaluate(): a network with a known answer, skips, JSON, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from interp_fer.cli import main
from interp_fer.data import open_dataset
from interp_fer.evaluation import evaluate
from interp_fer.models import FERModel
from interp_fer.preprocessing import Preprocessor


class BrightnessNet(nn.Module):
    """Class 0 for dark images, 1 for bright ones: the right answer is known for any input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3))
        return torch.stack([-mean, mean], dim=1)


def _write(folder, name, value):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((10, 10), value, np.uint8)).save(folder / name)


def test_known_confusion(tmp_path):
    for i, value in enumerate((10, 20, 240)):
        _write(tmp_path / "dark", f"{i}.png", value)
    for i, value in enumerate((250, 5)):
        _write(tmp_path / "bright", f"{i}.png", value)
    (tmp_path / "bright" / "corrupt.png").write_bytes(b"nope")
    model = FERModel(BrightnessNet(), Preprocessor((8, 8), mean=0.5, std=0.5), ("dark", "bright"))
    result = evaluate(model, open_dataset(tmp_path, class_names=model.class_names), progress=False)
    assert result.confusion == [[2, 1], [1, 1]]
    assert result.accuracy == 3 / 5
    assert result.per_class["dark"] == {"accuracy": 2 / 3, "n": 3}
    assert result.n_skipped == 1 and list(result.skipped) == ["unreadable: UnidentifiedImageError"]
    path = tmp_path / "result.json"
    result.to_json(path)
    payload = json.loads(path.read_text())
    for key in ("accuracy", "n_images", "n_skipped", "per_class", "confusion"):
        assert key in payload


def test_cli_evaluate_on_samples(tmp_path, capsys):
    out = tmp_path / "eval.json"
    figure = tmp_path / "confusion.png"
    assert main(["evaluate", "--json", str(out), "--figure", str(figure), "--quiet"]) == 0
    payload = json.loads(out.read_text())
    assert payload["n_images"] == 4 and payload["n_skipped"] == 3  # 3 unlabelled samples
    assert payload["skipped"] == {"no label": 3}
    assert figure.stat().st_size > 10_000
    assert "top-1 accuracy" in capsys.readouterr().out


def test_cli_layers_and_errors(capsys):
    assert main(["layers", "--model", "pyemotion", "--stages-only"]) == 0
    text = capsys.readouterr().out
    assert "conv_4" in text and "256x6x6" in text and "conv_4.1" not in text
    assert main(["layers", "--model", "/no/such/model.pt"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_stratified_limit(tmp_path, capsys):
    for i in range(4):
        _write(tmp_path / "faces" / "angry", f"{i}.png", 40 * i)
    for i in range(2):
        _write(tmp_path / "faces" / "happy", f"{i}.png", 200 + 10 * i)
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--data", str(tmp_path / "faces"), "--limit", "3", "--stratify",
                 "--json", str(out), "--quiet"]) == 0
    per_class = json.loads(out.read_text())["per_class"]
    assert per_class["angry"]["n"] == 2 and per_class["happy"]["n"] == 1
    # The bundled samples include unlabelled faces: a stratified subset is refused, by name.
    assert main(["evaluate", "--limit", "2", "--stratify", "--quiet"]) == 2
    assert "no expression label" in capsys.readouterr().err


# -- datasets as they come, and several datasets in one call (real faces) ------------------------

#: Sample faces saved under the folder names other datasets use (aliases of the model's
#: classes), plus a class the 7-class model lacks.
ALIAS_FOLDERS = {"happy": "happiness", "angry": "anger", "surprise": "surprised",
                 "disgust": "disgusted", "single_face": "contempt"}


def _alias_folders(root):
    from interp_fer.samples import sample_face

    for sample, folder in ALIAS_FOLDERS.items():
        (root / folder).mkdir(parents=True)
        Image.fromarray(sample_face(sample)).save(root / folder / f"{sample}.png")
    return root


def _fer_share(fer2013, path, every=120):
    """A labels CSV of every ``every``-th FER2013 test image, absolute paths, alias names."""
    import csv

    alias = {"angry": "anger", "happy": "happiness", "sad": "sadness", "fear": "fearful"}
    with open(fer2013 / "test_labels.csv") as handle:
        rows = list(csv.DictReader(handle))[::every]
    lines = ["path,label_name,usage"]
    for row in rows:
        name = alias.get(row["label_name"], row["label_name"])
        lines.append(f"{fer2013 / row['path']},{name},{row['usage']}")
    path.write_text("\n".join(lines) + "\n")
    return path, rows


def test_alias_folders_and_a_missing_class(tmp_path, mini_xception, sample_faces):
    """Folders named anger/happiness/... are the model's angry/happy/...; contempt is skipped
    and counted by name; every image gets the prediction it gets as a sample face."""
    dataset = open_dataset(_alias_folders(tmp_path / "faces"),
                           class_names=mini_xception.class_names)
    result = evaluate(mini_xception, dataset, progress=False)
    assert result.n_images == 4 and result.n_skipped == 1
    assert result.skipped_classes == {"contempt": 1}
    assert result.skipped == {"class 'contempt' is not one of the model's classes": 1}
    assert result.crop == "none"
    for name in ("happy", "angry", "surprise", "disgust"):
        assert result.per_class[name]["n"] == 1
    samples = evaluate(mini_xception, sample_faces, progress=False)
    for name in ("happy", "angry", "surprise", "disgust"):
        assert result.per_class[name] == samples.per_class[name]
    assert result.confusion == samples.confusion


def test_per_class_comparison_table():
    from interp_fer.evaluation import Evaluation, comparison

    a = Evaluation(0.5, 2, 0, {"x": {"accuracy": 1.0, "n": 1}, "y": {"accuracy": 0.0, "n": 1}},
                   [[1, 0], [1, 0]], ["x", "y"])
    b = Evaluation(1.0, 1, 0, {"x": {"accuracy": 1.0, "n": 1},
                               "y": {"accuracy": float("nan"), "n": 0}},
                   [[1, 0], [0, 0]], ["x", "y"])
    table = comparison({"A": a, "B": b})
    assert table == {"x": {"A": 1.0, "B": 1.0}, "y": {"A": 0.0, "B": None},
                     "all": {"A": 0.5, "B": 1.0}}


def test_cli_evaluates_several_datasets(tmp_path, capsys, fer2013_optional):
    """Sample faces, alias-named folders of them and (when present) a FER2013 share in one
    call: one result per dataset, the per-class table, crop recorded, the comparison figure."""
    faces = _alias_folders(tmp_path / "faces")
    args = ["evaluate", "--data", "samples", "--data", str(faces)]
    fer_rows = []
    if fer2013_optional is not None:
        share, fer_rows = _fer_share(fer2013_optional, tmp_path / "fer_share.csv")
        args += ["--data", str(share)]
    out, figure = tmp_path / "eval.json", tmp_path / "by_dataset.png"
    assert main([*args, "--json", str(out), "--figure", str(figure), "--quiet"]) == 0
    payload = json.loads(out.read_text())
    assert payload["model"] == "mini-xception" and payload["crop"] == "auto"  # the default
    datasets = payload["datasets"]
    assert list(datasets) == args[2::2]
    assert datasets["samples"]["n_images"] == 4
    assert datasets[str(faces)]["skipped_classes"] == {"contempt": 1}
    assert datasets[str(faces)]["per_class"] == {
        name: stats for name, stats in datasets["samples"]["per_class"].items()}
    table = payload["per_class_accuracy"]
    assert set(table) == {*datasets["samples"]["class_names"], "all"}
    assert table["neutral"]["samples"] is None  # no neutral sample face: n/a, not 0
    if fer_rows:
        fer = datasets[str(share)]
        assert fer["n_images"] == len(fer_rows) and fer["n_skipped"] == 0
        for name in ("angry", "happy", "sad", "fear"):  # written as aliases in the CSV
            expected = sum(r["label_name"] == name for r in fer_rows)
            assert fer["per_class"][name]["n"] == expected > 0
        assert 0.3 < fer["accuracy"] < 0.9  # mini-Xception: ~66 % on FER2013 test
    assert figure.stat().st_size > 10_000
    text = capsys.readouterr().out
    assert "per-class accuracy (%) by dataset" in text and "crop: auto" in text
    assert main(["evaluate", "--data", "samples", "--data", "samples", "--quiet"]) == 2


def test_dataset_comparison_figure_leaves_missing_classes_blank():
    from interp_fer.figures import plot_dataset_comparison

    per_class = {"A": {"happy": {"accuracy": 0.5, "n": 2}, "sad": {"accuracy": 1.0, "n": 1}},
                 "B": {"happy": {"accuracy": 1.0, "n": 3}, "sad": {"accuracy": None, "n": 0}}}
    figure = plot_dataset_comparison(per_class, title="t")
    ax = figure.axes[0]
    heights = [round(p.get_height(), 3) for p in ax.patches]
    assert heights == [0.5, 1.0, 1.0, 0.0]  # A: happy, sad; B: happy, sad (no bar)
    assert [t.get_text() for t in ax.texts] == ["n=2", "n=1", "n=3", "n=0"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["A (3 images)",
                                                                  "B (3 images)"]
    with pytest.raises(ValueError, match="at least one dataset"):
        plot_dataset_comparison({})
