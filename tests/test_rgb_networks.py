"""RGB ImageNet-style networks (VGG-16, ResNet-18): load, layers, receptive fields, Captum
parity of every stage, attribution, a tiny mapping run; and --architecture from the current
folder."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch
from _helpers import captum_parity
from torch import nn

from interp_fer.architectures import IMAGENET_MEAN, IMAGENET_STD, VGG16, ResNet18
from interp_fer.layers import layer_outputs, receptive_field
from interp_fer.models import load_model, rgb_model
from interp_fer.projections import project
from interp_fer.samples import sample_face

SMALL = {"width": 8, "input_size": 64}
ARCHITECTURES = {"vgg16": "interp_fer.architectures:VGG16", "resnet18": "interp_fer.architectures:ResNet18"}


@pytest.fixture(scope="module")
def faces():
    return [sample_face("happy"), sample_face("surprise")]


@pytest.fixture(scope="module", params=["vgg16", "resnet18"])
def small(request):
    return rgb_model(request.param, seed=1, **SMALL)


@pytest.mark.parametrize("name", ["vgg16", "resnet18"])
def test_state_dict_loads_with_imagenet_preprocessing(name, tmp_path, faces):
    source = rgb_model(name, seed=3, **SMALL)
    checkpoint = tmp_path / f"{name}.pt"
    torch.save(source.module.state_dict(), checkpoint)
    model = load_model(checkpoint, architecture=ARCHITECTURES[name], arch_kwargs=SMALL)
    assert model.input_size == (64, 64) and not model.grayscale
    assert model.preprocess.mean == IMAGENET_MEAN and model.preprocess.std == IMAGENET_STD
    assert model.stages == type(source.module).default_stages
    np.testing.assert_array_equal(model.logits(faces), source.logits(faces))
    # The same seed gives the same network; another seed another one.
    np.testing.assert_array_equal(rgb_model(name, seed=3, **SMALL).logits(faces), source.logits(faces))
    assert not np.array_equal(rgb_model(name, seed=4, **SMALL).logits(faces), source.logits(faces))


def test_torchvision_state_dict_layout():
    # Keys (and their count) as torchvision's vgg16() / resnet18() have them, so checkpoints
    # fine-tuned with torchvision load unchanged.
    vgg = VGG16(width=8).state_dict()
    assert len(vgg) == 32
    assert {"features.0.weight", "features.28.bias", "classifier.0.weight", "classifier.6.weight"} <= set(vgg)
    assert vgg["classifier.0.weight"].shape == (512, 64 * 7 * 7)
    resnet = ResNet18(width=8).state_dict()
    assert len(resnet) == 122
    assert {"conv1.weight", "bn1.running_var", "layer2.0.downsample.0.weight",
            "layer4.1.bn2.num_batches_tracked", "fc.weight"} <= set(resnet)
    assert "layer1.0.downsample.0.weight" not in resnet


def test_224_pixel_networks_and_their_known_receptive_fields():
    vgg = rgb_model("vgg16", width=8)
    resnet = rgb_model("resnet18", width=8)
    assert vgg.input_size == resnet.input_size == (224, 224)
    # Published receptive fields: conv5_3 of VGG-16 196 px (stride 16), ResNet-18 435 px
    # (stride 32).
    field = receptive_field(vgg, "features.29")
    assert (field.rows.size, field.rows.stride) == (196, 16)
    field = receptive_field(resnet, "layer4")
    assert (field.rows.size, field.rows.stride) == (435, 32)
    assert vgg.logits([sample_face("happy")]).shape == resnet.logits([sample_face("happy")]).shape == (1, 7)


def test_layer_outputs_of_every_stage(small, faces):
    x = small.preprocess(faces)
    outputs = layer_outputs(small.module, small.stages, x)
    sides = [64, 32, 16, 8, 4] if isinstance(small.module, VGG16) else [32, 16, 8, 4, 2]
    widths = [8, 16, 32, 64, 64] if isinstance(small.module, VGG16) else [8, 8, 16, 32, 64]
    for stage, side, width in zip(small.stages, sides, widths, strict=True):
        assert outputs[stage].shape == (2, width, side, side), stage
        assert (outputs[stage] >= 0).all()          # every stage is a ReLU output


@pytest.mark.parametrize("method", ["deconvnet", "guided_backprop"])
def test_every_stage_projects_like_captum(small, faces, method):
    x = small.preprocess(faces)
    for stage in small.stages:
        n = layer_outputs(small.module, [stage], x[:1])[stage].shape[1]
        result = project(small.module, x, stage, sorted({0, n // 2, n - 1}), method=method)
        assert result.maps.shape[2:] == (3, 64, 64)
        assert captum_parity(small.module, x, result), stage


def test_attribution_methods(small, faces):
    from interp_fer.attributions import attribute

    saliency = attribute(small, faces, target=3, method="saliency")
    assert saliency.shape == (2, 3, 64, 64) and torch.isfinite(saliency).all()
    assert saliency.abs().sum() > 0
    last = small.stages[-1]
    gradcam = attribute(small, faces, target=3, method="gradcam", layer=last)
    assert gradcam.shape[0] == 2 and torch.isfinite(gradcam).all()


def test_tiny_mapping_run_completes(tmp_path):
    from interp_fer.data import ImageDataset
    from interp_fer.layer_mapping import MappingOptions
    from interp_fer.mapping import map_dataset
    from interp_fer.samples import load_sample_faces

    model = rgb_model("resnet18", seed=2, **SMALL)
    everything = load_sample_faces()
    dataset = ImageDataset(everything.records[:3], everything.class_names, everything.source)
    result = map_dataset(model, dataset, ["layer1", "layer2"], locate="rf-center",
                         options=MappingOptions(n_boot=4, n_null=2), controls=1, progress=False)
    assert set(result.scores["layer"]) == {"layer1", "layer2"}
    assert len(result.mapping) == 8 + 16
    result.save(tmp_path / "map")
    assert (tmp_path / "map").is_dir()


def test_architecture_module_in_the_current_folder(tmp_path, monkeypatch):
    # `interp-fer ... --architecture mynets:Net` run in the folder holding mynets.py.
    module_name = "interp_fer_test_local_nets"
    (tmp_path / f"{module_name}.py").write_text(textwrap.dedent("""
        from torch import nn

        class Net(nn.Module):
            def __init__(self, width=4):
                super().__init__()
                self.conv = nn.Conv2d(1, width, 3)
                self.relu = nn.ReLU()
                self.pool = nn.AdaptiveAvgPool2d(1)
                self.fc = nn.Linear(width, 7)

            def forward(self, x):
                return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, module_name, raising=False)
    from interp_fer.models import import_architecture

    network = import_architecture(f"{module_name}:Net", {"width": 4})
    torch.save(network.state_dict(), tmp_path / "net.pt")
    model = load_model("net.pt", architecture=f"{module_name}:Net", arch_kwargs='{"width": 4}')
    assert model.stages == ("relu",)
    assert str(tmp_path) not in sys.path          # the folder is added for the import only
    sys.modules.pop(module_name, None)
    from interp_fer.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="no_such_module_here"):
        import_architecture("no_such_module_here:Net")


def test_saliency_weighted_inputs_known_answer():
    # A linear network: the saliency of its top class is |w| everywhere, so the weighted
    # image is pixels * |w| / max|w| (on the [0, 1] scale), normalised again.
    from interp_fer.evaluation import saliency_weighted_inputs

    torch.manual_seed(0)
    network = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 2))
    x = torch.rand(4, 2, 3, 3) * 2 - 1
    mean, std = (0.4, 0.6), (0.2, 0.3)
    weighted = saliency_weighted_inputs(network, x, mean, std)
    with torch.no_grad():
        top = network(x).argmax(1)
    grad = network[1].weight[top].reshape(4, 2, 3, 3).abs().detach()
    saliency = grad.amax(1, keepdim=True) / grad.amax(1, keepdim=True).flatten(1).amax(1).view(4, 1, 1, 1)
    m, s = torch.tensor(mean).view(1, 2, 1, 1), torch.tensor(std).view(1, 2, 1, 1)
    expected = ((x * s + m) * saliency - m) / s
    torch.testing.assert_close(weighted, expected)


def test_saliency_weighted_evaluation_and_cli_flag(tmp_path, faces):
    import json

    from interp_fer.cli import main
    from interp_fer.data import ImageDataset
    from interp_fer.evaluation import evaluate, saliency_weighted
    from interp_fer.samples import load_sample_faces

    model = rgb_model("vgg16", seed=5, **SMALL)
    weighted = saliency_weighted(model)
    assert weighted.name.endswith("(saliency-weighted)") and model.module is weighted.module.network
    logits = weighted.logits(faces)                  # works under FERModel's inference mode
    assert logits.shape == (2, 7) and not np.allclose(logits, model.logits(faces))
    everything = load_sample_faces()
    dataset = ImageDataset(everything.records[:3], everything.class_names, everything.source)
    result = evaluate(weighted, dataset, progress=False)
    assert result.n_images == 3 and "saliency-weighted" in result.model
    # The CLI flag, on a zoo model and the sample faces.
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model", "pyemotion", "--saliency-weighted", "--limit", "3",
                 "--quiet", "--json", str(out)]) == 0
    assert "saliency-weighted" in json.loads(out.read_text())["model"]
