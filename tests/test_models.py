"""load_model: every source kind, round trips, and a clear error for each failure."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from interp_fer import ModelLoadError, load_model

ARCH = "interp_fer.architectures:PyEmotionNet"


class TinyNet(nn.Module):
    """A small FER-shaped network used to build checkpoints of every kind."""

    def __init__(self, classes: int = 7, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


TINY = f"{__name__}:TinyNet"


@pytest.fixture()
def tiny_state(tmp_path):
    torch.manual_seed(0)
    net = TinyNet().eval()
    path = tmp_path / "tiny.pt"
    torch.save(net.state_dict(), path)
    return net, path


def _faces(n: int = 3, size: int = 48) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(n)]


def test_state_dict_round_trip_gives_identical_outputs(tmp_path, pyemotion):
    path = tmp_path / "pyemotion_state.pt"
    torch.save(pyemotion.module.state_dict(), path)
    reloaded = load_model(path, architecture=ARCH, arch_kwargs='{"num_classes": 7}',
                          input_size=48, mean=0.5, std=0.5)
    faces = _faces()
    np.testing.assert_array_equal(reloaded.logits(faces), pyemotion.logits(faces))
    assert reloaded.stages == ("conv_1.3", "conv_2.3", "conv_3.3", "conv_4.3")


@pytest.mark.filterwarnings("ignore:`torch.jit", "ignore::torch.jit.TracerWarning")
def test_torchscript_export_round_trip_gives_identical_outputs(tmp_path, mini_xception):
    example = torch.zeros(1, 1, 64, 64)
    path = tmp_path / "mini_xception.ts"
    torch.jit.save(torch.jit.trace(mini_xception.module, example), path)
    reloaded = load_model(path, input_size=64, mean=0.5, std=0.5)
    faces = _faces(size=64)
    np.testing.assert_array_equal(reloaded.logits(faces), mini_xception.logits(faces))


def test_checkpoint_nested_under_state_dict_key(tmp_path, tiny_state):
    net, _ = tiny_state
    path = tmp_path / "nested.pt"
    torch.save({"epoch": 3, "state_dict": net.state_dict()}, path)
    model = load_model(path, architecture=TINY)
    expected = net(model.preprocess(_faces())).detach().numpy()
    np.testing.assert_array_equal(model.logits(_faces()), expected)


def test_missing_and_unexpected_keys_are_listed(tmp_path, tiny_state):
    net, _ = tiny_state
    state = net.state_dict()
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "bad_keys.pt"
    torch.save(state, path)
    with pytest.raises(ModelLoadError) as error:
        load_model(path, architecture=TINY)
    message = str(error.value)
    assert "bad_keys.pt" in message
    assert "missing keys (1): fc.bias" in message
    assert "unexpected keys (1): extra.weight" in message


def test_shape_mismatch_is_listed(tmp_path, tiny_state):
    _, path = tiny_state
    with pytest.raises(ModelLoadError, match=r"shape mismatch for conv.weight: checkpoint "
                       r"\(4, 1, 3, 3\), model \(8, 1, 3, 3\)"):
        load_model(path, architecture=TINY, arch_kwargs={"width": 8})


def test_non_finite_weights_are_an_error(tmp_path, tiny_state):
    net, _ = tiny_state
    state = net.state_dict()
    state["fc.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match=r"non-finite values \(NaN or inf\) in fc.weight"):
        load_model(path, architecture=TINY)


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_non_finite_weights_in_torchscript(tmp_path):
    net = TinyNet().eval()
    with torch.no_grad():
        net.conv.bias[0] = float("inf")
    path = tmp_path / "inf.ts"
    torch.jit.save(torch.jit.script(net), path)
    with pytest.raises(ModelLoadError, match="non-finite weights .* conv.bias"):
        load_model(path)


def test_pickled_module_needs_explicit_opt_in(tmp_path):
    net = TinyNet().eval()
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    with pytest.raises(ModelLoadError) as error:
        load_model(path)
    message = str(error.value)
    assert "allow_pickle=True" in message and "--allow-pickle" in message
    assert "unsafe" in message and "executing code" in message
    model = load_model(path, allow_pickle=True)
    faces = _faces()
    np.testing.assert_array_equal(model.logits(faces),
                                  net(model.preprocess(faces)).detach().numpy())


def test_state_dict_without_architecture_says_what_to_pass(tiny_state):
    _, path = tiny_state
    with pytest.raises(ModelLoadError, match="give the architecture .* architecture="):
        load_model(path)


@pytest.mark.parametrize(("spec", "kwargs", "expected"), [
    ("no_colon_here", None, "must look like 'package.module:Class'"),
    ("no_such_package_xyz.nets:Net", None, "cannot import 'no_such_package_xyz.nets'"),
    ("interp_fer.architectures:NoSuchNet", None, "has no attribute 'NoSuchNet'"),
    ("interp_fer.zoo:zoo_names", None, "not a torch.nn.Module"),
    (TINY, "{not json", "not valid JSON"),
    (TINY, '[1, 2]', "must be a JSON object"),
    (TINY, '{"depth": 3}', "cannot build .* unexpected keyword argument 'depth'"),
])
def test_bad_architecture_specs(tiny_state, spec, kwargs, expected):
    _, path = tiny_state
    with pytest.raises(ModelLoadError, match=expected):
        load_model(path, architecture=spec, arch_kwargs=kwargs)


def test_missing_file_mentions_zoo(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file .*mini-xception"):
        load_model(tmp_path / "nope.pt")


def test_garbage_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(ModelLoadError, match="garbage.pt: not a PyTorch checkpoint"):
        load_model(path, architecture=TINY)


def test_arbitrary_pickle_is_refused_by_default(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(TinyNet(), protocol=2))
    with pytest.raises(ModelLoadError, match="allow_pickle=True"):
        load_model(path)


def test_class_names_must_match_outputs(tiny_state):
    _, path = tiny_state
    with pytest.raises(ModelLoadError, match="7 outputs but 3 class names"):
        load_model(path, architecture=TINY, class_names=["a", "b", "c"])


def test_wrong_input_size_is_reported(tmp_path, pyemotion):
    path = tmp_path / "pyemotion_state.pt"
    torch.save(pyemotion.module.state_dict(), path)
    with pytest.raises(ModelLoadError, match="fails on a 1x64x64 input"):
        load_model(path, architecture=ARCH, input_size=64)


def test_zoo_preprocessing_cannot_be_overridden():
    with pytest.raises(ModelLoadError, match="fixed architecture and preprocessing"):
        load_model("pyemotion", input_size=64)


def test_model_carries_preprocessing_and_classes(mini_xception):
    assert mini_xception.input_size == (64, 64)
    assert mini_xception.grayscale
    assert mini_xception.class_names[3] == "happy"
    assert not mini_xception.module.training
    batch = mini_xception.preprocess([np.full((100, 80, 3), 255, np.uint8)])
    assert batch.shape == (1, 1, 64, 64)
    torch.testing.assert_close(batch, torch.ones_like(batch))
    assert "mini-xception" in repr(mini_xception)
