"""Keras models as PyTorch modules, read with h5py/zipfile/json (no TensorFlow, no keras).

Files understood:

- ``.h5`` / ``.hdf5`` written by Keras 2 (``model.save``) or Keras 3 (its legacy HDF5 format):
  the architecture is the JSON attribute ``model_config``, the weights are under
  ``model_weights/<layer>/`` named by the ``weight_names`` attribute;
- ``.keras`` (Keras 3): a zip holding ``config.json`` and ``model.weights.h5``, whose weights
  sit at ``layers/<snake_case(class)>[_n]/vars/<i>`` in the order the layers are listed.

Supported layers (channels-last data, as Keras stores it; the converted network takes
channels-first N x C x H x W like every network in this toolkit): InputLayer, Conv2D,
SeparableConv2D, DepthwiseConv2D, BatchNormalization, Activation, ReLU, MaxPooling2D,
AveragePooling2D, GlobalAveragePooling2D, GlobalMaxPooling2D, ZeroPadding2D, Dropout,
SpatialDropout2D, Flatten, Dense, Add, Concatenate; Sequential and functional models.
Activations are modules (``nn.ReLU`` ...), so the projection rules of
:mod:`interp_fer.projections` see each one. Keras ``padding='same'`` puts the odd padding row
or column at the bottom/right; it is reproduced exactly (``-inf`` for max-pooling, excluded from
the count for average pooling, as TensorFlow does).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")

# Activations Keras names in a layer config -> a module factory (None: the identity).
_ACTIVATIONS: dict[str, Callable[[], nn.Module] | None] = {
    "linear": None,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "softplus": nn.Softplus,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "softmax": lambda: nn.Softmax(dim=1),
}

_PASS_THROUGH = {"Dropout", "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "ActivityRegularization"}


class KerasImportError(ValueError):
    """A Keras file could not be converted; the message names the file, layers and problem."""


# --------------------------------------------------------------------------------------------
# Reading the file: layer configs, graph edges and weights.
# --------------------------------------------------------------------------------------------

@dataclass
class KerasLayer:
    """One Keras layer: its class, config, inbound layer names and weights (Keras names)."""

    name: str
    kind: str
    config: dict[str, Any]
    inbound: list[str]
    weights: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class KerasFile:
    """What a Keras model file holds, independent of its on-disk layout.

    Attributes
    ----------
    layers
        Every layer, in the order the file lists them (a topological order).
    inputs, outputs
        Names of the model's input and output layers.
    input_shape
        Keras input shape without the batch axis, channels last (entries may be None).
    source
        File name, for messages.
    layout
        ``"keras2-h5"``, ``"keras3-h5"`` or ``"keras3-zip"``.
    """

    layers: list[KerasLayer]
    inputs: list[str]
    outputs: list[str]
    input_shape: tuple[int | None, ...] | None
    source: str
    layout: str

    def layer(self, name: str) -> KerasLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def consumers(self) -> dict[str, list[str]]:
        """Layer name -> names of the layers that take its output."""
        out: dict[str, list[str]] = {layer.name: [] for layer in self.layers}
        for layer in self.layers:
            for source in layer.inbound:
                out.setdefault(source, []).append(layer.name)
        return out


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _history(arg: Any) -> list[str]:
    # Keras 3 inbound args: keras-tensor dicts (possibly nested in lists) naming their layer.
    if isinstance(arg, dict):
        if arg.get("class_name") == "__keras_tensor__":
            return [arg["config"]["keras_history"][0]]
        return [name for value in arg.values() for name in _history(value)]
    if isinstance(arg, list | tuple):
        return [name for value in arg for name in _history(value)]
    return []


def _inbound(layer: Mapping[str, Any], source: str) -> list[str]:
    nodes = layer.get("inbound_nodes") or []
    if len(nodes) > 1:
        raise KerasImportError(
            f"{source}: layer {layer.get('name')!r} ({layer['class_name']}) is called "
            f"{len(nodes)} times (a shared layer); shared layers are not supported"
        )
    if not nodes:
        return []
    node = nodes[0]
    if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
        return _history(node.get("args", []))
    return [entry[0] for entry in node]  # Keras 2: [[name, node_index, tensor_index, kwargs]]


def _endpoints(value: Any) -> list[str]:
    # Keras 2: [[name, 0, 0], ...]; Keras 3: the same, or a single [name, 0, 0].
    if not value:
        return []
    if isinstance(value[0], str):
        return [value[0]]
    return [entry[0] for entry in value]


def _batch_shape(config: Mapping[str, Any]) -> tuple[int | None, ...] | None:
    for key in ("batch_shape", "batch_input_shape"):
        if config.get(key):
            return tuple(config[key][1:])
    return None


def _parse_config(model_config: Mapping[str, Any], source: str) -> tuple[list[KerasLayer], list[str], list[str], tuple | None]:
    kind = model_config.get("class_name")
    config = model_config.get("config")
    if kind == "Sequential":
        entries = config if isinstance(config, list) else config["layers"]
        layers: list[KerasLayer] = []
        input_shape = None
        for entry in entries:
            layer_config = entry["config"]
            name = entry.get("name") or layer_config["name"]
            if input_shape is None:
                input_shape = _batch_shape(layer_config)
            if entry["class_name"] == "InputLayer":
                layers.append(KerasLayer(name, "InputLayer", layer_config, []))
                continue
            if not layers:  # Keras 2: the first layer carries batch_input_shape
                layers.append(KerasLayer(f"{name}_input", "InputLayer", {}, []))
            layers.append(KerasLayer(name, entry["class_name"], layer_config, [layers[-1].name]))
        return layers, [layers[0].name], [layers[-1].name], input_shape
    if kind in ("Functional", "Model"):
        layers = [
            KerasLayer(entry.get("name") or entry["config"]["name"], entry["class_name"],
                       entry["config"], _inbound(entry, source))
            for entry in config["layers"]
        ]
        inputs = _endpoints(config.get("input_layers"))
        outputs = _endpoints(config.get("output_layers"))
        input_shape = None
        for layer in layers:
            if layer.name in inputs:
                input_shape = _batch_shape(layer.config)
        return layers, inputs, outputs, input_shape
    raise KerasImportError(f"{source}: top-level model class {kind!r} is not supported "
                           "(expected Sequential or a functional Model)")


def _h5_weights(group: Any, layer: str) -> dict[str, np.ndarray]:
    if layer not in group:
        return {}
    node = group[layer]
    out: dict[str, np.ndarray] = {}
    for raw in node.attrs.get("weight_names", []):
        name = _decode(raw)
        out[name.split("/")[-1].split(":")[0]] = np.asarray(node[name], np.float32)
    return out


def _snake_case(name: str) -> str:
    # keras.src.utils.naming.to_snake_case: the key .keras files store weights under.
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _keras3_variable_names(layer: KerasLayer) -> list[str]:
    # The order in which Keras 3 layers create their variables (vars/0, vars/1, ...).
    config, bias = layer.config, layer.config.get("use_bias", True)
    names = {
        "Conv2D": ["kernel"] + (["bias"] if bias else []),
        "DepthwiseConv2D": ["kernel"] + (["bias"] if bias else []),
        "SeparableConv2D": ["depthwise_kernel", "pointwise_kernel"] + (["bias"] if bias else []),
        "Dense": ["kernel"] + (["bias"] if bias else []),
        "BatchNormalization": (["gamma"] if config.get("scale", True) else [])
        + (["beta"] if config.get("center", True) else []) + ["moving_mean", "moving_variance"],
    }
    return names.get(layer.kind, [])


def read_keras_file(source: str | os.PathLike | bytes, name: str | None = None) -> KerasFile:
    """Read a Keras ``.h5``/``.hdf5``/``.keras`` file: layer configs, graph and weights.

    Parameters
    ----------
    source
        Path to the file, or its bytes.
    name
        Name used in messages when ``source`` is bytes.

    Returns
    -------
    KerasFile
        Weights as float32 NumPy arrays under their Keras names (``kernel``, ``bias``,
        ``gamma`` ...).

    Raises
    ------
    KerasImportError
        When the file is neither layout, or holds weights only.
    """
    import h5py

    label = name or (str(source) if not isinstance(source, bytes) else "<keras bytes>")
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = set(archive.namelist())
            if not {"config.json", "model.weights.h5"} <= members:
                raise KerasImportError(f"{label}: a zip without config.json and model.weights.h5 "
                                       "is not a .keras model file")
            model_config = json.loads(archive.read("config.json"))
            weights_bytes = archive.read("model.weights.h5")
        layers, inputs, outputs, input_shape = _parse_config(model_config, label)
        used: dict[str, int] = {}
        with h5py.File(io.BytesIO(weights_bytes), "r") as handle:
            for layer in layers:
                key = _snake_case(layer.kind)
                used[key] = used.get(key, -1) + 1
                path = f"layers/{key}" + (f"_{used[key]}" if used[key] else "") + "/vars"
                if path not in handle:
                    continue
                stored = handle[path]
                names = _keras3_variable_names(layer)
                if layer.kind not in _SUPPORTED:  # refused later, with every such layer named
                    names = [str(i) for i in range(len(stored))]
                if len(stored) != len(names):
                    raise KerasImportError(
                        f"{label}: layer {layer.name!r} ({layer.kind}) has {len(stored)} stored "
                        f"variables at {path}, expected {len(names)} ({', '.join(names) or 'none'})"
                    )
                layer.weights = {n: np.asarray(stored[str(i)], np.float32) for i, n in enumerate(names)}
        return KerasFile(layers, inputs, outputs, input_shape, label, "keras3-zip")
    try:
        handle = h5py.File(io.BytesIO(data), "r")
    except OSError as error:
        raise KerasImportError(f"{label}: neither an HDF5 nor a .keras (zip) file ({error})") from error
    with handle:
        if "model_config" not in handle.attrs:
            raise KerasImportError(
                f"{label}: this HDF5 file holds weights only (no 'model_config'; saved with "
                "save_weights?). Save the whole model with model.save(...) instead"
            )
        model_config = json.loads(_decode(handle.attrs["model_config"]))
        version = _decode(handle.attrs.get("keras_version", ""))
        layers, inputs, outputs, input_shape = _parse_config(model_config, label)
        group = handle["model_weights"] if "model_weights" in handle else handle
        for layer in layers:
            layer.weights = _h5_weights(group, layer.name)
    layout = "keras3-h5" if version.startswith("3") else "keras2-h5"
    return KerasFile(layers, inputs, outputs, input_shape, label, layout)


# --------------------------------------------------------------------------------------------
# Weight layouts: Keras (channels last) -> torch.
# --------------------------------------------------------------------------------------------

def keras_conv_kernel(kernel: np.ndarray) -> torch.Tensor:
    """Keras Conv2D kernel (kh, kw, in/groups, out) -> torch (out, in/groups, kh, kw)."""
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))


def keras_depthwise_kernel(kernel: np.ndarray) -> torch.Tensor:
    """Keras depthwise kernel (kh, kw, in, m) -> torch grouped conv (in*m, 1, kh, kw).

    Keras orders the outputs input-channel major (output c*m + j), as torch's groups do.
    """
    kh, kw, n_in, multiplier = kernel.shape
    out = kernel.transpose(2, 3, 0, 1).reshape(n_in * multiplier, 1, kh, kw)
    return torch.from_numpy(np.ascontiguousarray(out))


def keras_dense_after_flatten(kernel: np.ndarray, chw: tuple[int, int, int]) -> torch.Tensor:
    """Dense kernel (H*W*C, out) read after a channels-last Flatten -> torch (out, C*H*W).

    Keras flattens (H, W, C) maps, torch (C, H, W); reordering the kernel's rows lets the
    converted network use a plain ``nn.Flatten``.
    """
    c, h, w = chw
    out = kernel.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(kernel.shape[1], c * h * w)
    return torch.from_numpy(np.ascontiguousarray(out))


# --------------------------------------------------------------------------------------------
# Modules the plain torch layers do not cover.
# --------------------------------------------------------------------------------------------

class Add(nn.Module):
    """Sum of the inputs (Keras ``Add``)."""

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        total = inputs[0]
        for extra in inputs[1:]:
            total = total + extra
        return total


class Concatenate(nn.Module):
    """Concatenation along ``dim`` (Keras ``Concatenate``; channels are dim 1 here)."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.cat(inputs, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class ChannelsLastFlatten(nn.Module):
    """Flatten N x C x H x W in Keras's (H, W, C) order, for when no Dense follows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(1) if x.ndim == 4 else x.flatten(1)


class SameAvgPool2d(nn.Module):
    """Average pooling with asymmetric TensorFlow 'same' padding; padding is not counted."""

    def __init__(self, kernel_size: tuple[int, int], stride: tuple[int, int],
                 pads: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.pads = kernel_size, stride, pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = F.avg_pool2d(F.pad(x, self.pads), self.kernel_size, self.stride)
        ones = torch.ones((1, 1, *x.shape[-2:]), dtype=x.dtype, device=x.device)
        count = F.avg_pool2d(F.pad(ones, self.pads), self.kernel_size, self.stride)
        return total / count

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, pads(l,r,t,b)={self.pads}"


class GraphNetwork(nn.Module):
    """A converted network: named modules run in a fixed order on named values.

    The part Keras and ONNX conversions share. Each step ``(module, inputs, output)`` calls
    the child ``module`` on the values named ``inputs`` and stores the result as ``output``.

    Attributes
    ----------
    input_chw
        (channels, height, width) of the input.
    source
        The file it came from.
    """

    def __init__(self, steps: list[tuple[str, list[str], str]], input_name: str,
                 output_name: str, modules: Mapping[str, nn.Module],
                 input_chw: tuple[int, int, int], source: str) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        self._graph = list(steps)
        self._input = input_name
        self._output = output_name
        self.input_chw = input_chw
        self.source = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = {self._input: x}
        modules = dict(self.named_children())
        for name, inputs, output in self._graph:
            values[output] = modules[name](*[values[i] for i in inputs])
        return values[self._output]


class KerasNetwork(GraphNetwork):
    """A converted Keras model: one module per Keras layer, run in the file's layer order.

    Attributes
    ----------
    input_chw
        (channels, height, width) of the input, from the Keras input shape.
    layer_map
        Keras layer name -> module name in this network (sanitised), for layers with a module.
    source
        The file it came from.
    """

    def __init__(self, graph: list[tuple[str, list[str]]], input_name: str, output_name: str,
                 modules: Mapping[str, nn.Module], input_chw: tuple[int, int, int],
                 layer_map: Mapping[str, str], source: str) -> None:
        # A Keras layer's output is named after its module.
        super().__init__([(name, inputs, name) for name, inputs in graph], input_name,
                         output_name, modules, input_chw, source)
        self.layer_map = dict(layer_map)


# --------------------------------------------------------------------------------------------
# Conversion.
# --------------------------------------------------------------------------------------------

def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int | float) else (int(value[0]), int(value[1]))


def _same_pads(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
               dilation: tuple[int, int] = (1, 1)) -> tuple[int, int, int, int]:
    """TensorFlow 'same' padding as (left, right, top, bottom): the odd one bottom/right."""
    pads = []
    for n, k, s, d in zip(size, kernel, stride, dilation, strict=True):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return left, right, top, bottom


def _activation(spec: Any, layer: KerasLayer, source: str) -> nn.Module | None:
    # Built-in activations are strings ("relu"); some Keras 3 files serialise them as
    # {"class_name": "function", "config": "relu", ...}.
    name = spec
    if isinstance(spec, dict):
        config = spec.get("config")
        name = config if isinstance(config, str) else spec.get("registered_name") or spec.get("class_name")
    name = str(name).lower()
    if name not in _ACTIVATIONS:
        raise KerasImportError(
            f"{source}: layer {layer.name!r} ({layer.kind}) uses activation {name!r}; "
            f"supported: {', '.join(sorted(_ACTIVATIONS))}"
        )
    factory = _ACTIVATIONS[name]
    return factory() if factory is not None else None


def _relu_layer(layer: KerasLayer, source: str) -> nn.Module:
    config = layer.config
    max_value = config.get("max_value")
    slope = float(config.get("negative_slope", 0.0) or 0.0)
    threshold = float(config.get("threshold", 0.0) or 0.0)
    if threshold != 0.0 or (max_value is not None and slope != 0.0):
        raise KerasImportError(f"{source}: layer {layer.name!r} (ReLU) with threshold={threshold}, "
                               f"max_value={max_value}, negative_slope={slope} is not supported")
    if max_value is not None:
        if float(max_value) == 6.0:
            return nn.ReLU6()
        return nn.Hardtanh(0.0, float(max_value))
    if slope:
        return nn.LeakyReLU(slope)
    return nn.ReLU()


def _with_activation(core: OrderedDict, layer: KerasLayer, source: str) -> nn.Module:
    act = _activation(layer.config.get("activation", "linear"), layer, source)
    if act is not None:
        core[_activation_name(act)] = act
    if len(core) == 1:
        return next(iter(core.values()))
    return nn.Sequential(core)


def _activation_name(module: nn.Module) -> str:
    return {nn.ReLU: "relu", nn.Softmax: "softmax"}.get(type(module), type(module).__name__.lower())


def _conv2d(in_channels: int, out_channels: int, kernel: tuple[int, int], stride: tuple[int, int],
            dilation: tuple[int, int], groups: int, bias: bool, padding: str,
            size: tuple[int, int]) -> OrderedDict:
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    sym = (0, 0)
    if padding == "same":
        left, right, top, bottom = _same_pads(size, kernel, stride, dilation)
        if left == right and top == bottom:
            sym = (top, left)
        else:
            parts["pad"] = nn.ZeroPad2d((left, right, top, bottom))
    parts["conv"] = nn.Conv2d(in_channels, out_channels, kernel, stride, sym, dilation, groups, bias)
    return parts


def _pool(layer: KerasLayer, size: tuple[int, int], maximum: bool) -> nn.Module:
    config = layer.config
    kernel = _pair(config.get("pool_size", 2))
    stride = _pair(config.get("strides") or kernel)
    if config.get("padding", "valid") == "valid":
        return nn.MaxPool2d(kernel, stride) if maximum else nn.AvgPool2d(kernel, stride)
    left, right, top, bottom = _same_pads(size, kernel, stride)
    if left == right and top == bottom:
        if maximum:
            return nn.MaxPool2d(kernel, stride, (top, left))
        return nn.AvgPool2d(kernel, stride, (top, left), count_include_pad=False)
    if maximum:
        # -inf padding is never selected by the max, as in TensorFlow.
        return nn.Sequential(OrderedDict(
            pad=nn.ConstantPad2d((left, right, top, bottom), float("-inf")),
            pool=nn.MaxPool2d(kernel, stride),
        ))
    return SameAvgPool2d(kernel, stride, (left, right, top, bottom))


def _check_channels_last(layer: KerasLayer, source: str) -> None:
    if layer.config.get("data_format", "channels_last") not in (None, "channels_last"):
        raise KerasImportError(f"{source}: layer {layer.name!r} ({layer.kind}) uses "
                               f"data_format={layer.config['data_format']!r}; only channels_last "
                               "models are supported")


def _need(layer: KerasLayer, keys: tuple[str, ...], source: str) -> dict[str, np.ndarray]:
    missing = [key for key in keys if key not in layer.weights]
    if missing:
        raise KerasImportError(f"{source}: layer {layer.name!r} ({layer.kind}) lacks weights "
                               f"{missing}; found {sorted(layer.weights)}")
    return layer.weights


def _build(layer: KerasLayer, shapes: list[tuple[int, ...]], source: str,
           flattened_chw: tuple[int, int, int] | None = None, reordered: bool = False) -> nn.Module:
    """One Keras layer -> a torch module with its weights.

    ``shapes``: input shapes without the batch axis (channels first); ``flattened_chw``: for a
    Dense reading a channels-last Flatten, the map shape it flattened; ``reordered``: for a
    Flatten, whether its Dense readers were reordered (so a plain channels-first flatten fits).
    """
    config, kind = layer.config, layer.kind
    shape = shapes[0]
    if kind in ("Conv2D", "DepthwiseConv2D", "SeparableConv2D"):
        _check_channels_last(layer, source)
        kernel = _pair(config["kernel_size"])
        stride = _pair(config.get("strides", 1))
        dilation = _pair(config.get("dilation_rate", 1))
        bias = config.get("use_bias", True)
        padding = config.get("padding", "valid")
        in_channels, size = shape[0], shape[1:]
        if kind == "Conv2D":
            weights = _need(layer, ("kernel",), source)
            groups = int(config.get("groups", 1) or 1)
            parts = _conv2d(in_channels, int(config["filters"]), kernel, stride, dilation, groups,
                            bias, padding, size)
            parts["conv"].weight.data = keras_conv_kernel(weights["kernel"])
        elif kind == "DepthwiseConv2D":
            weights = _need(layer, (), source)
            kernel_array = weights.get("depthwise_kernel", weights.get("kernel"))
            if kernel_array is None:
                raise KerasImportError(f"{source}: layer {layer.name!r} (DepthwiseConv2D) has no kernel")
            multiplier = int(config.get("depth_multiplier", 1))
            parts = _conv2d(in_channels, in_channels * multiplier, kernel, stride, dilation,
                            in_channels, bias, padding, size)
            parts["conv"].weight.data = keras_depthwise_kernel(kernel_array)
        else:
            weights = _need(layer, ("depthwise_kernel", "pointwise_kernel"), source)
            multiplier = int(config.get("depth_multiplier", 1))
            parts = _conv2d(in_channels, in_channels * multiplier, kernel, stride, dilation,
                            in_channels, False, padding, size)
            parts["depthwise"] = parts.pop("conv")
            parts["depthwise"].weight.data = keras_depthwise_kernel(weights["depthwise_kernel"])
            parts["pointwise"] = nn.Conv2d(in_channels * multiplier, int(config["filters"]), 1, bias=bias)
            parts["pointwise"].weight.data = keras_conv_kernel(weights["pointwise_kernel"])
        last = next(reversed(parts.values()))
        if bias:
            last.bias.data = torch.from_numpy(_need(layer, ("bias",), source)["bias"])
        return _with_activation(parts, layer, source)
    if kind == "Dense":
        if len(shape) != 1:
            raise KerasImportError(f"{source}: layer {layer.name!r} (Dense) is applied to a "
                                   f"{len(shape) + 1}-D tensor; only Dense on flat vectors is supported")
        weights = _need(layer, ("kernel",), source)
        bias = config.get("use_bias", True)
        linear = nn.Linear(shape[0], int(config["units"]), bias=bias)
        linear.weight.data = (keras_dense_after_flatten(weights["kernel"], flattened_chw) if flattened_chw
                              else torch.from_numpy(np.ascontiguousarray(weights["kernel"].T)))
        if bias:
            linear.bias.data = torch.from_numpy(_need(layer, ("bias",), source)["bias"])
        return _with_activation(OrderedDict(linear=linear), layer, source)
    if kind == "BatchNormalization":
        axis = config.get("axis", -1)
        axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
        if axis not in (-1, len(shape)):
            raise KerasImportError(f"{source}: layer {layer.name!r} (BatchNormalization) normalises "
                                   f"axis {axis}; only the channel axis (-1) is supported")
        n = shape[0]
        weights = _need(layer, ("moving_mean", "moving_variance"), source)
        bn = (nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d)(n, eps=float(config.get("epsilon", 1e-3)))
        bn.weight.data = torch.from_numpy(weights["gamma"]) if "gamma" in weights else torch.ones(n)
        bn.bias.data = torch.from_numpy(weights["beta"]) if "beta" in weights else torch.zeros(n)
        bn.running_mean.data = torch.from_numpy(weights["moving_mean"])
        bn.running_var.data = torch.from_numpy(weights["moving_variance"])
        return bn
    if kind == "Activation":
        module = _activation(config.get("activation"), layer, source)
        return module if module is not None else nn.Identity()
    if kind == "ReLU":
        return _relu_layer(layer, source)
    if kind == "Softmax":
        return nn.Softmax(dim=1)
    if kind in ("MaxPooling2D", "AveragePooling2D"):
        _check_channels_last(layer, source)
        return _pool(layer, shape[1:], kind == "MaxPooling2D")
    if kind in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        _check_channels_last(layer, source)
        pool = nn.AdaptiveAvgPool2d(1) if kind == "GlobalAveragePooling2D" else nn.AdaptiveMaxPool2d(1)
        if config.get("keepdims", False):
            return pool
        return nn.Sequential(OrderedDict(pool=pool, flatten=nn.Flatten()))
    if kind == "ZeroPadding2D":
        _check_channels_last(layer, source)
        pad = config.get("padding", 1)
        if isinstance(pad, int):
            (top, bottom), (left, right) = (pad, pad), (pad, pad)
        else:
            (top, bottom), (left, right) = [(p, p) if isinstance(p, int) else tuple(p) for p in pad]
        return nn.ZeroPad2d((left, right, top, bottom))
    if kind in _PASS_THROUGH:
        return nn.Dropout(float(config.get("rate", 0.0))) if "Dropout" in kind else nn.Identity()
    if kind == "Flatten":
        if reordered or len(shape) == 1 or (len(shape) == 3 and shape[1:] == (1, 1)):
            return nn.Flatten()
        return ChannelsLastFlatten()
    if kind == "Add":
        return Add()
    if kind == "Concatenate":
        axis = int(config.get("axis", -1))
        rank = len(shape) + 1
        axis = axis % rank
        dim = 1 if axis == rank - 1 else (axis + 1 if rank == 4 else axis)
        return Concatenate(dim)
    raise AssertionError(kind)  # _SUPPORTED and _build disagree


_SUPPORTED = {
    "InputLayer", "Conv2D", "SeparableConv2D", "DepthwiseConv2D", "BatchNormalization",
    "Activation", "ReLU", "Softmax", "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D",
    "GlobalMaxPooling2D", "ZeroPadding2D", "Flatten", "Dense", "Add", "Concatenate", *_PASS_THROUGH,
}


def _module_names(layers: list[KerasLayer]) -> dict[str, str]:
    used: set[str] = set()
    names = {}
    for layer in layers:
        clean = re.sub(r"\W", "_", layer.name)
        if not clean or clean[0].isdigit():
            clean = f"layer_{clean}"
        if hasattr(nn.Module, clean) or clean.startswith("_"):
            clean = f"{clean}_"
        while clean in used:
            clean = f"{clean}_"
        used.add(clean)
        names[layer.name] = clean
    return names


def _dense_readers(model: KerasFile, flatten: str) -> list[str]:
    """The Dense layers reading ``flatten`` through pass-through layers, when they are all of
    its readers (then their kernels are reordered, see :func:`keras_dense_after_flatten`, and
    the Flatten stays a plain ``nn.Flatten``); otherwise an empty list."""
    kinds = {layer.name: layer.kind for layer in model.layers}
    consumers = model.consumers()
    frontier, dense = [flatten], []
    while frontier:
        name = frontier.pop()
        if name in model.outputs:
            return []
        for reader in consumers.get(name, []):
            if kinds[reader] == "Dense":
                dense.append(reader)
            elif kinds[reader] in _PASS_THROUGH:
                frontier.append(reader)
            else:
                return []
    return dense


def keras_to_torch(source: str | os.PathLike | bytes | KerasFile, *,
                   drop_final_softmax: bool = False) -> KerasNetwork:
    """Convert a Keras model file into a PyTorch module with the same outputs.

    Parameters
    ----------
    source
        A ``.h5``/``.hdf5``/``.keras`` path, its bytes, or a :class:`KerasFile`.
    drop_final_softmax
        Remove a softmax that produces the model's output (the network then returns logits,
        as :class:`~interp_fer.models.FERModel` expects).

    Returns
    -------
    KerasNetwork
        In eval mode; takes N x C x H x W float tensors. Module names are the Keras layer
        names with non-identifier characters replaced by ``_`` (see ``layer_map``); a layer
        with a fused activation becomes a ``Sequential`` (``conv``, ``relu`` ...) whose output
        is the Keras layer's output.

    Raises
    ------
    KerasImportError
        Listing every unsupported layer (name and class) at once, or naming the layer whose
        configuration or weights cannot be converted.
    """
    model = source if isinstance(source, KerasFile) else read_keras_file(source)
    label = model.source
    unsupported = [f"{layer.name} ({layer.kind})" for layer in model.layers if layer.kind not in _SUPPORTED]
    if unsupported:
        raise KerasImportError(
            f"{label}: {len(unsupported)} unsupported Keras layer(s): {', '.join(unsupported)}. "
            f"Supported: {', '.join(sorted(_SUPPORTED))}"
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise KerasImportError(f"{label}: models with one input and one output are supported; "
                               f"this one has inputs {model.inputs} and outputs {model.outputs}")
    shape = model.input_shape
    if shape is None or len(shape) != 3 or any(s is None for s in shape):
        raise KerasImportError(f"{label}: the input shape {shape} is not a fixed (height, width, "
                               "channels) image shape")
    height, width, channels = (int(s) for s in shape)
    names = _module_names(model.layers)
    modules: dict[str, nn.Module] = {}
    graph: list[tuple[str, list[str]]] = []
    input_name = names[model.inputs[0]]
    # Shapes are propagated by running each converted layer on a zero batch of one, so
    # 'same' padding and Flatten sizes are known when the next layer is built.
    values: dict[str, torch.Tensor] = {model.inputs[0]: torch.zeros(1, channels, height, width)}
    shapes = {model.inputs[0]: (channels, height, width)}
    dense_chw: dict[str, tuple[int, int, int]] = {}  # Dense after a Flatten -> its (C, H, W)
    with torch.no_grad():
        for layer in model.layers:
            if layer.kind == "InputLayer":
                continue
            missing = [name for name in layer.inbound if name not in values]
            if missing or not layer.inbound:
                raise KerasImportError(f"{label}: layer {layer.name!r} reads {missing or 'nothing'}, "
                                       "which is not computed before it")
            in_shapes = [shapes[i] for i in layer.inbound]
            reordered = False
            if layer.kind == "Flatten" and len(in_shapes[0]) == 3:
                dense = _dense_readers(model, layer.name)
                dense_chw.update({name: in_shapes[0] for name in dense})
                reordered = bool(dense)
            module = _build(layer, in_shapes, label, dense_chw.get(layer.name), reordered)
            module.eval()
            values[layer.name] = module(*[values[i] for i in layer.inbound])
            shapes[layer.name] = tuple(values[layer.name].shape[1:])
            modules[names[layer.name]] = module
            graph.append((names[layer.name], [names[i] for i in layer.inbound]))
    output = names[model.outputs[0]]
    if drop_final_softmax:
        _drop_softmax(modules, output)
    layer_map = {layer.name: names[layer.name] for layer in model.layers if names[layer.name] in modules}
    network = KerasNetwork(graph, input_name, output, modules, (channels, height, width), layer_map, label)
    return network.eval()


def _drop_softmax(modules: dict[str, nn.Module], output: str) -> None:
    module = modules[output]
    if isinstance(module, nn.Softmax):
        modules[output] = nn.Identity()
    elif isinstance(module, nn.Sequential) and isinstance(module[-1], nn.Softmax):
        parts = OrderedDict(list(module.named_children())[:-1])
        modules[output] = next(iter(parts.values())) if len(parts) == 1 else nn.Sequential(parts)


def is_keras_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a Keras model file by its suffix (``.h5``, ``.hdf5``, ``.keras``)."""
    return Path(path).suffix.lower() in KERAS_SUFFIXES
