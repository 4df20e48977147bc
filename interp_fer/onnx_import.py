"""ONNX models as PyTorch modules, built on the ``onnx`` package (no onnx2torch).

``onnx2torch`` imports torchvision when it is imported (its NMS and RoiAlign converters), and
torchvision does not import beside this project's torch; so this module converts the usual
CNN operator set itself: Conv, BatchNormalization, Relu, LeakyRelu, Sigmoid, Tanh, MaxPool,
AveragePool, GlobalAveragePool, GlobalMaxPool, Gemm, MatMul (with a constant matrix), Add,
Concat, Flatten, Reshape (to (N, -1)-like shapes), Pad, Dropout, Identity, Softmax, Constant.
Constant subgraphs (padding arithmetic, ``Shape``-based ``view(N, -1)`` targets) are folded at
conversion with onnx's reference evaluator.

Every operator becomes a module (``Relu`` an ``nn.ReLU``, never a functional call), so the
projection rules of :mod:`interp_fer.projections` see each activation. Module names come from
the node names: torch's exporter scopes them by module path (``/conv_1/conv_1.1/Conv``), and
the last scope (``conv_1.1``) becomes ``conv_1_1``.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .keras_import import Add, Concatenate, GraphNetwork, SameAvgPool2d


class OnnxImportError(ValueError):
    """An ONNX file could not be converted; the message names the file, nodes and problem."""


SUPPORTED_OPS = (
    "Add", "AveragePool", "BatchNormalization", "Concat", "Constant", "Conv", "Dropout",
    "Flatten", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "Identity", "LeakyRelu", "MatMul",
    "MaxPool", "Pad", "Relu", "Reshape", "Sigmoid", "Softmax", "Tanh",
)


class AddConstant(nn.Module):
    """``x + c`` for a constant tensor ``c`` (a bias the exporter kept apart)."""

    def __init__(self, constant: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("constant", constant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.constant


class Reshape(nn.Module):
    """Reshape keeping the batch axis: ``x.reshape(N, *shape)``."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape=(N, {', '.join(map(str, self.shape))})"


class OnnxNetwork(GraphNetwork):
    """A converted ONNX graph: one module per operator, run in the graph's node order.

    Attributes
    ----------
    input_chw
        (channels, height, width) of the input, from the graph's input type.
    node_map
        ONNX node name -> module name in this network.
    source
        The file it came from.
    """

    def __init__(self, graph: list[tuple[str, list[str], str]], input_name: str, output_name: str,
                 modules: Mapping[str, nn.Module], input_chw: tuple[int, int, int],
                 node_map: Mapping[str, str], source: str) -> None:
        super().__init__(graph, input_name, output_name, modules, input_chw, source)
        self.node_map = dict(node_map)


def _attributes(node: Any) -> dict[str, Any]:
    import onnx

    return {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}


def _symmetric(pads: list[int], spatial: int) -> tuple[int, ...] | None:
    begin, end = pads[:spatial], pads[spatial:]
    return tuple(begin) if begin == end else None


def _spatial_pads(attrs: Mapping[str, Any], size: tuple[int, ...], kernel: list[int],
                  stride: list[int], dilation: list[int], label: str) -> list[int]:
    """ONNX padding as [begin..., end...] per spatial axis, resolving ``auto_pad``."""
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    n = len(kernel)
    if auto in ("NOTSET", ""):
        return list(attrs.get("pads", [0] * (2 * n)))
    if auto == "VALID":
        return [0] * (2 * n)
    begin, end = [], []
    for length, k, s, d in zip(size, kernel, stride, dilation, strict=True):
        total = max((-(-length // s) - 1) * s + (k - 1) * d + 1 - length, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else large)
        end.append(large if auto == "SAME_UPPER" else small)
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise OnnxImportError(f"{label}: unknown auto_pad {auto!r}")
    return begin + end


def _torch_pad(pads: list[int]) -> tuple[int, int, int, int]:
    top, left, bottom, right = pads
    return left, right, top, bottom


def _const(name: str, constants: Mapping[str, np.ndarray], label: str, what: str) -> np.ndarray:
    if name not in constants:
        raise OnnxImportError(f"{label}: {what} ({name!r}) is computed in the graph; only constant "
                              "weights are supported")
    return constants[name]


def _build(node: Any, shapes: list[tuple[int, ...] | None], constants: Mapping[str, np.ndarray],
           label: str) -> tuple[nn.Module, list[int]]:
    """One ONNX node -> (module, indices of the node inputs the module takes)."""
    op, attrs = node.op_type, _attributes(node)
    inputs = list(node.input)
    first = [0]
    if op == "Conv":
        weight = _const(inputs[1], constants, label, "Conv weight")
        out_channels, in_per_group, *kernel = weight.shape
        n = len(kernel)
        if n != 2:
            raise OnnxImportError(f"{label}: {node.name} is a {n}-D convolution; only 2-D is supported")
        stride = list(attrs.get("strides", [1] * n))
        dilation = list(attrs.get("dilations", [1] * n))
        groups = int(attrs.get("group", 1))
        pads = _spatial_pads(attrs, shapes[0][1:], kernel, stride, dilation, f"{label}: {node.name}")
        bias = len(inputs) > 2 and inputs[2] != ""
        sym = _symmetric(pads, n)
        conv = nn.Conv2d(in_per_group * groups, out_channels, tuple(kernel), tuple(stride),
                         sym or 0, tuple(dilation), groups, bias)
        conv.weight.data = torch.from_numpy(weight.astype(np.float32))
        if bias:
            conv.bias.data = torch.from_numpy(_const(inputs[2], constants, label, "Conv bias").astype(np.float32))
        if sym is not None:
            return conv, first
        return nn.Sequential(OrderedDict(pad=nn.ZeroPad2d(_torch_pad(pads)), conv=conv)), first
    if op == "BatchNormalization":
        scale, bias, mean, var = (_const(i, constants, label, "BatchNormalization parameter").astype(np.float32)
                                  for i in inputs[1:5])
        rank = len(shapes[0]) + 1
        bn = (nn.BatchNorm2d if rank == 4 else nn.BatchNorm1d)(len(scale), eps=float(attrs.get("epsilon", 1e-5)))
        for tensor, value in ((bn.weight, scale), (bn.bias, bias), (bn.running_mean, mean), (bn.running_var, var)):
            tensor.data = torch.from_numpy(value)
        return bn, first
    if op == "Relu":
        return nn.ReLU(), first
    if op == "LeakyRelu":
        return nn.LeakyReLU(float(attrs.get("alpha", 0.01))), first
    if op == "Sigmoid":
        return nn.Sigmoid(), first
    if op == "Tanh":
        return nn.Tanh(), first
    if op == "Softmax":
        rank = len(shapes[0]) + 1
        axis = int(attrs.get("axis", -1)) % rank
        if rank != 2 and axis != 1:
            raise OnnxImportError(f"{label}: {node.name} is a softmax over axis {axis} of a "
                                  f"{rank}-D tensor; only class axes are supported")
        return nn.Softmax(dim=axis), first
    if op in ("MaxPool", "AveragePool"):
        kernel = list(attrs["kernel_shape"])
        n = len(kernel)
        stride = list(attrs.get("strides", [1] * n))
        dilation = list(attrs.get("dilations", [1] * n))
        ceil = bool(attrs.get("ceil_mode", 0))
        pads = _spatial_pads(attrs, shapes[0][1:], kernel, stride, dilation, f"{label}: {node.name}")
        sym = _symmetric(pads, n)
        if op == "MaxPool":
            if len(node.output) > 1 and node.output[1]:
                raise OnnxImportError(f"{label}: {node.name} (MaxPool) also outputs indices; not supported")
            pool = nn.MaxPool2d(tuple(kernel), tuple(stride), sym or 0, tuple(dilation), ceil_mode=ceil)
            if sym is not None:
                return pool, first
            return nn.Sequential(OrderedDict(
                pad=nn.ConstantPad2d(_torch_pad(pads), float("-inf")), pool=pool)), first
        include = bool(attrs.get("count_include_pad", 0))
        if sym is not None and all(2 * p <= k for p, k in zip(sym, kernel, strict=True)):
            return nn.AvgPool2d(tuple(kernel), tuple(stride), sym, ceil, count_include_pad=include), first
        if ceil:
            raise OnnxImportError(f"{label}: {node.name} (AveragePool) with asymmetric pads and "
                                  "ceil_mode is not supported")
        if include:
            return nn.Sequential(OrderedDict(pad=nn.ZeroPad2d(_torch_pad(pads)),
                                             pool=nn.AvgPool2d(tuple(kernel), tuple(stride)))), first
        return SameAvgPool2d(tuple(kernel), tuple(stride), _torch_pad(pads)), first
    if op == "GlobalAveragePool":
        return nn.AdaptiveAvgPool2d(1), first
    if op == "GlobalMaxPool":
        return nn.AdaptiveMaxPool2d(1), first
    if op == "Gemm":
        if attrs.get("transA", 0):
            raise OnnxImportError(f"{label}: {node.name} (Gemm) with transA=1 is not supported")
        weight = _const(inputs[1], constants, label, "Gemm matrix B").astype(np.float32)
        weight = weight if attrs.get("transB", 0) else weight.T
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        bias = len(inputs) > 2 and inputs[2] != ""
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
        linear.weight.data = torch.from_numpy(np.ascontiguousarray(alpha * weight))
        if bias:
            c = _const(inputs[2], constants, label, "Gemm bias C").astype(np.float32)
            linear.bias.data = torch.from_numpy(np.array(np.broadcast_to(beta * c, (weight.shape[0],))))
        return linear, first
    if op == "MatMul":
        weight = _const(inputs[1], constants, label, "MatMul matrix").astype(np.float32)
        if weight.ndim != 2:
            raise OnnxImportError(f"{label}: {node.name} (MatMul) needs a constant 2-D matrix")
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=False)
        linear.weight.data = torch.from_numpy(np.ascontiguousarray(weight.T))
        return linear, first
    if op == "Add":
        known = [i in constants for i in inputs]
        if not any(known):
            return Add(), [0, 1]
        constant = torch.from_numpy(np.asarray(constants[inputs[known.index(True)]], np.float32).copy())
        return AddConstant(constant), [known.index(False)]
    if op == "Concat":
        rank = len(shapes[0]) + 1
        return Concatenate(int(attrs["axis"]) % rank), list(range(len(inputs)))
    if op == "Flatten":
        axis = int(attrs.get("axis", 1))
        if axis != 1:
            raise OnnxImportError(f"{label}: {node.name} (Flatten) with axis={axis}; only axis 1 "
                                  "(keep the batch) is supported")
        return nn.Flatten(), first
    if op == "Reshape":
        target = [int(v) for v in _const(inputs[1], constants, label, "Reshape shape")]
        rest = target[1:]
        if len(rest) == 1 and (rest[0] == -1 or rest[0] == int(np.prod(shapes[0]))):
            return nn.Flatten(), first
        return Reshape(tuple(rest)), first
    if op == "Pad":
        mode = attrs.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        pads = (list(_const(inputs[1], constants, label, "Pad pads")) if len(inputs) > 1
                else list(attrs.get("pads", [])))
        value = 0.0
        if len(inputs) > 2 and inputs[2]:
            value = float(np.asarray(_const(inputs[2], constants, label, "Pad value")).reshape(-1)[0])
        if len(inputs) > 3 and inputs[3]:
            raise OnnxImportError(f"{label}: {node.name} (Pad) with axes is not supported")
        if len(pads) != 8 or any(int(p) != 0 for p in (pads[0], pads[1], pads[4], pads[5])):
            raise OnnxImportError(f"{label}: {node.name} (Pad) pads {pads}; only the two spatial "
                                  "axes of a 4-D tensor may be padded")
        spatial = _torch_pad([int(pads[2]), int(pads[3]), int(pads[6]), int(pads[7])])
        modes = {"constant": lambda: nn.ConstantPad2d(spatial, value), "reflect": lambda: nn.ReflectionPad2d(spatial),
                 "edge": lambda: nn.ReplicationPad2d(spatial)}
        if mode not in modes:
            raise OnnxImportError(f"{label}: {node.name} (Pad) mode {mode!r} is not supported")
        if mode == "constant" and value == 0.0:
            return nn.ZeroPad2d(spatial), first
        return modes[mode](), first
    if op == "Dropout":
        return nn.Identity(), first
    if op == "Identity":
        return nn.Identity(), first
    raise AssertionError(op)  # SUPPORTED_OPS and _build disagree


def _module_name(node: Any, index: int, used: set[str]) -> str:
    scopes = [part for part in node.name.split("/") if part]
    if len(scopes) >= 2:
        base = scopes[-2]
    else:
        base = (scopes[0] if scopes else f"{node.op_type}_{index}")
    base = re.sub(r"\W", "_", base)
    if not base or base[0].isdigit():
        base = f"n_{base}"
    if hasattr(nn.Module, base) or base.startswith("_"):
        base = f"{base}_"
    name = base
    if name in used:
        name = f"{base}_{node.op_type.lower()}"
    suffix = 1
    while name in used:
        suffix += 1
        name = f"{base}_{node.op_type.lower()}_{suffix}"
    used.add(name)
    return name


def onnx_to_torch(source: str | os.PathLike | bytes, *, drop_final_softmax: bool = False,
                  input_chw: tuple[int, int, int] | None = None) -> OnnxNetwork:
    """Convert an ONNX image classifier into a PyTorch module with the same outputs.

    Parameters
    ----------
    source
        Path to a ``.onnx`` file, or its bytes.
    drop_final_softmax
        Remove a Softmax (or a Softmax followed by Identity) that produces the output, so the
        network returns logits as :class:`~interp_fer.models.FERModel` expects.
    input_chw
        (channels, height, width) when the file's input has symbolic spatial dimensions.

    Returns
    -------
    OnnxNetwork
        In eval mode; takes N x C x H x W float tensors.

    Raises
    ------
    OnnxImportError
        Listing every unsupported node (name and operator) at once, or naming the node whose
        attributes or weights cannot be converted.
    """
    label = str(source) if not isinstance(source, bytes) else "<onnx bytes>"
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as error:
        raise OnnxImportError(f"{label}: reading ONNX files needs the 'onnx' package: "
                              "pip install 'interp_fer[onnx]' (or pip install onnx)") from error
    try:
        model = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(str(source))
    except Exception as error:  # DecodeError and friends: not a protobuf model
        raise OnnxImportError(f"{label}: not a readable ONNX model ({error})") from error
    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    folded = _constant_nodes(graph.node, set(constants))
    unsupported = [f"{node.name or '?'} ({node.op_type})" for index, node in enumerate(graph.node)
                   if node.op_type not in SUPPORTED_OPS and index not in folded]
    if unsupported:
        raise OnnxImportError(f"{label}: {len(unsupported)} unsupported ONNX node(s): "
                              f"{', '.join(unsupported)}. Supported: {', '.join(SUPPORTED_OPS)}")
    inputs = [value for value in graph.input if value.name not in constants]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise OnnxImportError(f"{label}: graphs with one input and one output are supported; this "
                              f"one has inputs {[v.name for v in inputs]} and outputs "
                              f"{[v.name for v in graph.output]}")
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in inputs[0].type.tensor_type.shape.dim]
    if input_chw is None:
        if len(dims) != 4 or any(d is None for d in dims[1:]):
            raise OnnxImportError(f"{label}: input {inputs[0].name!r} has shape {dims}; give "
                                  "input_chw=(channels, height, width)")
        input_chw = (int(dims[1]), int(dims[2]), int(dims[3]))
    input_name = inputs[0].name
    # Shapes are propagated by running each converted node on a zero batch of one, so 'auto_pad'
    # and Reshape sizes are known when the next node is built.
    values: dict[str, torch.Tensor] = {input_name: torch.zeros(1, *input_chw)}
    modules: dict[str, nn.Module] = {}
    steps: list[tuple[str, list[str], str]] = []
    node_map: dict[str, str] = {}
    used: set[str] = set()
    with torch.no_grad():
        for index, node in enumerate(graph.node):
            if node.op_type == "Constant":
                constants[node.output[0]] = numpy_helper.to_array(_attributes(node)["value"])
                continue
            if index in folded and node.op_type == "Shape":
                # The batch entry is the example's (1): only a Reshape's leading (batch)
                # entry may use it, and Reshape keeps the real batch there.
                constants[node.output[0]] = _shape(node, values, label)
                continue
            if index in folded:
                constants.update(_evaluate(node, constants, model))
                continue
            dynamic = [name for name in node.input if name and name not in constants]
            missing = [name for name in dynamic if name not in values]
            if missing or not dynamic:
                raise OnnxImportError(f"{label}: node {node.name!r} ({node.op_type}) reads "
                                      f"{missing or 'only constants'}; not supported")
            shapes = [tuple(values[name].shape[1:]) if name in values else None for name in node.input]
            module, taken = _build(node, shapes, constants, label)
            module.eval()
            args = [node.input[i] for i in taken]
            name = _module_name(node, index, used)
            values[node.output[0]] = module(*[values[a] for a in args])
            modules[name] = module
            steps.append((name, args, node.output[0]))
            node_map[node.name or name] = name
    output = graph.output[0].name
    if output not in values:
        raise OnnxImportError(f"{label}: the graph output {output!r} is a constant")
    if drop_final_softmax:
        _drop_softmax(steps, modules, output)
    network = OnnxNetwork(steps, input_name, output, modules, tuple(input_chw), node_map, label)
    return network.eval()


def _constant_nodes(nodes: Any, known: set[str]) -> set[int]:
    """Indices of the nodes computed once, at conversion: those whose inputs are all constants,
    and ``Shape`` nodes (their input's shape is known from the example batch).

    Exporters compute padding amounts and shapes with small constant subgraphs
    (ConstantOfShape, Slice, Transpose, Cast ...), and ``x.view(x.size(0), -1)`` with
    Shape -> Gather -> Unsqueeze -> Concat -> Reshape; folding them leaves only the network.
    """
    known = set(known)
    folded = set()
    for index, node in enumerate(nodes):
        if node.op_type == "Shape" or (node.op_type != "Constant" and node.input
                                       and all(name in known for name in node.input if name)):
            folded.add(index)
        elif node.op_type != "Constant":
            continue
        known.update(node.output)
    return folded


def _shape(node: Any, values: Mapping[str, torch.Tensor], label: str) -> np.ndarray:
    if node.input[0] not in values:
        raise OnnxImportError(f"{label}: node {node.name!r} (Shape) reads {node.input[0]!r}, "
                              "which is not computed before it")
    shape = np.asarray(values[node.input[0]].shape, np.int64)
    attrs = _attributes(node)
    return shape[attrs.get("start", 0):attrs.get("end", len(shape))]


def _evaluate(node: Any, constants: Mapping[str, np.ndarray], model: Any) -> dict[str, np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    opsets = {entry.domain: entry.version for entry in model.opset_import}
    evaluator = ReferenceEvaluator(node, opsets=opsets)
    results = evaluator.run(None, {name: constants[name] for name in node.input if name})
    return dict(zip(node.output, (np.asarray(r) for r in results), strict=True))


def _drop_softmax(steps: list[tuple[str, list[str], str]], modules: dict[str, nn.Module], output: str) -> None:
    producer = {out: (name, args) for name, args, out in steps}
    name, args = producer[output]
    while isinstance(modules[name], nn.Identity) and args[0] in producer:
        name, args = producer[args[0]]
    if isinstance(modules[name], nn.Softmax):
        modules[name] = nn.Identity()


def is_onnx_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an ONNX file by its suffix."""
    return Path(path).suffix.lower() == ".onnx"
