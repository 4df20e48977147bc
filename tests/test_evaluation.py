"""evaluate(): a network with a known answer, skips, JSON, and the CLI."""

from __future__ import annotations

import json

import numpy as np
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
