"""Layer names, output shapes and receptive fields of a network.

A *layer name* is a dotted module path as in ``module.named_modules()`` (``"block2"``,
``"conv_3"``, ``"block2.sep1.depthwise"``); every part of the toolkit uses these names.

Receptive fields are computed, not typed in: one forward pass records the autograd graph from
the input to each layer's output, and the graph is walked with the arithmetic of each
spatial operation (convolution, pooling, padding), per axis:

* ``size``: side of the input window one output unit sees, in input pixels;
* ``stride``: input pixels between neighbouring output units (the *jump*);
* ``offset``: input coordinate of the centre of unit 0's window, in pixel-index units
  (pixel ``i`` covers ``[i - 0.5, i + 0.5)``), so unit ``u`` is centred on
  ``offset + u * stride``. Negative offsets mean padding.

Where branches meet (residual adds), the window is the union of the branches' windows.
Operations the walker does not know (e.g. interpolation, adaptive pooling) make the receptive
field unknown (``None``) rather than wrong.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .autograd_graph import conv_params, edges, leaf_tensor, node_kind, pad_params, pool_params
from .hooks import refuse_torchscript

if TYPE_CHECKING:  # pragma: no cover
    from .models import FERModel


@dataclass(frozen=True)
class AxisField:
    """Receptive-field geometry along one axis (see the module docstring)."""

    size: float
    stride: float
    offset: float

    def window(self) -> tuple[float, float]:
        """(first, last) input pixel index covered by unit 0 (may be negative: padding)."""
        half = (self.size - 1) / 2
        return self.offset - half, self.offset + half


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of a layer's units: one :class:`AxisField` for rows, one for columns."""

    rows: AxisField
    cols: AxisField

    def centre(self, row: float, col: float) -> tuple[float, float]:
        """Input-pixel (row, col) of the centre of the window of unit (row, col)."""
        return (self.rows.offset + row * self.rows.stride,
                self.cols.offset + col * self.cols.stride)


@dataclass(frozen=True)
class LayerInfo:
    """One row of a layer listing."""

    name: str
    kind: str
    output_shape: tuple[int, ...]
    receptive_field: ReceptiveField | None
    is_stage: bool


_IDENTITY_OPS = {
    "ReluBackward0", "ReluBackward1", "NativeBatchNormBackward0", "CudnnBatchNormBackward0",
    "AddBackward0", "SubBackward0", "MulBackward0", "DivBackward0", "SigmoidBackward0",
    "TanhBackward0", "LeakyReluBackward0", "LeakyReluBackward1", "EluBackward0",
    "HardtanhBackward0", "GeluBackward0", "SiluBackward0", "CloneBackward0",
    "ThresholdBackward0", "ThresholdBackward1", "ToCopyBackward0", "MaximumBackward0",
    "MinimumBackward0", "ClampBackward1", "ClampMinBackward0", "NegBackward0",
    "CatBackward0", "AliasBackward0", "NativeDropoutBackward0", "PreluKernelBackward0",
    "SoftplusBackward0", "ExpandBackward0",
    "_RuleReLUBackward",  # an nn.ReLU whose backward a projection rule replaced (hooks.py)
}

_Axis = tuple[float, float, float]  # (size, stride, offset)


def _conv_like(axis: _Axis, kernel: int, stride: int, padding: int, dilation: int) -> _Axis:
    size, jump, offset = axis
    effective = dilation * (kernel - 1) + 1
    return (size + (effective - 1) * jump, jump * stride,
            offset + ((effective - 1) / 2 - padding) * jump)


def _pad(axis: _Axis, before: int) -> _Axis:
    size, jump, offset = axis
    return size, jump, offset - before * jump


def _step(fn, inputs: list[tuple[_Axis, _Axis] | None]) -> tuple[_Axis, _Axis] | None:
    known = [field for field in inputs if field is not None]
    if not known:
        return None
    name = node_kind(fn)
    if name in _IDENTITY_OPS:
        # Union of the branches' windows: the largest one, assuming aligned centres.
        return max(known, key=lambda field: field[0][0] * field[1][0])
    if len(known) != 1:
        return None
    rows, cols = known[0]
    if name == "ConvolutionBackward0":
        conv = conv_params(fn)
        if conv.transposed:
            return None
        weight = conv.weight.shape
        stride, padding, dilation = conv.stride, conv.padding, conv.dilation
        return (_conv_like(rows, weight[-2], stride[0], padding[0], dilation[0]),
                _conv_like(cols, weight[-1], stride[1], padding[1], dilation[1]))
    if name in ("MaxPool2DWithIndicesBackward0", "AvgPool2DBackward0"):
        # Average pools: ceil_mode, count_include_pad and divisor_override change the
        # weights, not the window.
        pool = pool_params(fn)
        return (_conv_like(rows, pool.kernel[0], pool.stride[0], pool.padding[0],
                           pool.dilation[0]),
                _conv_like(cols, pool.kernel[1], pool.stride[1], pool.padding[1],
                           pool.dilation[1]))
    if name in ("ConstantPadNdBackward0", "ReflectionPad2DBackward0", "ReplicationPad2DBackward0"):
        pad = pad_params(fn).pad  # (left, right, top, bottom, ...), signed
        return _pad(rows, pad[2] if len(pad) > 2 else 0), _pad(cols, pad[0])
    return None


def _trace(output: torch.Tensor, source: torch.Tensor) -> ReceptiveField | None:
    return trace_from_node(output.grad_fn, source)


def trace_from_node(root: object, source: object) -> ReceptiveField | None:
    """Receptive field of the units of ``root``'s output in the map of ``source``.

    Parameters
    ----------
    root
        Autograd node (``grad_fn``) of a layer's (N, C, h, w) output.
    source
        A leaf tensor (the network input), or an autograd node inside the graph: the field is
        then in the grid of that node's *output* (e.g. a max-pool's output map).

    Returns
    -------
    ReceptiveField or None
        None when the path contains an operation without known geometry.
    """
    memo: dict[object, tuple[_Axis, _Axis] | None] = {}
    identity: tuple[_Axis, _Axis] = ((1.0, 1.0, 0.0), (1.0, 1.0, 0.0))
    # Iterative post-order walk: deep networks would overflow Python's recursion limit.
    stack: list[tuple[object, bool]] = [(root, False)]
    while stack:
        fn, finished = stack.pop()
        if fn is None or (fn in memo and not finished):
            continue
        if fn is source:
            memo[fn] = identity
        elif node_kind(fn) == "AccumulateGrad":
            memo[fn] = identity if leaf_tensor(fn) is source else None
        elif finished:
            memo[fn] = _step(fn, [memo.get(child) for child, _ in edges(fn)])
        else:
            stack.append((fn, True))
            stack.extend((child, False) for child, _ in edges(fn)
                         if child is not None and child not in memo)
    field = memo.get(root)
    if field is None:
        return None
    return ReceptiveField(AxisField(*field[0]), AxisField(*field[1]))


def resolve_layer(module: nn.Module, layer: str | nn.Module) -> nn.Module:
    """Return the submodule called ``layer`` (a dotted path), with a helpful error.

    Parameters
    ----------
    module
        The network.
    layer
        Layer name as listed by :func:`list_layers`, or the submodule itself.
    """
    if isinstance(layer, nn.Module):
        return layer
    modules = dict(module.named_modules())
    if layer in modules and layer != "":
        return modules[layer]
    import difflib

    close = difflib.get_close_matches(layer, [n for n in modules if n], n=5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise KeyError(f"no layer named {layer!r} in {type(module).__name__}{hint} "
                   "(`interp-fer layers --model M` lists them)")


def layer_outputs(module: nn.Module, names: Iterable[str], inputs: torch.Tensor, *,
                  grad: bool = False) -> dict[str, torch.Tensor]:
    """Outputs of the named layers for one forward pass, in eval mode.

    Parameters
    ----------
    module
        The network; every submodule's ``training`` flag is restored afterwards (a mixed
        train/eval state survives), and the hooks are removed even when the forward raises.
    names
        Layer names (dotted paths).
    inputs
        (N, c, H, W) network input.
    grad
        Record the autograd graph (needed to trace receptive fields); otherwise the pass runs
        in inference mode.

    Returns
    -------
    dict
        Layer name -> its output tensor (layers whose output is not a tensor are left out).
    """
    refuse_torchscript(module, "layer_outputs")
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    # Each submodule's own flag: a network may be partly in training mode on purpose.
    flags = [(sub, sub.training) for sub in module.modules()]
    try:
        for name in names:
            def hook(_module, _inputs, output, name=name):
                if isinstance(output, torch.Tensor):
                    outputs[name] = output
            handles.append(resolve_layer(module, name).register_forward_hook(hook))
        module.eval()
        with torch.enable_grad() if grad else torch.inference_mode():
            module(inputs)
    finally:
        for handle in handles:
            handle.remove()
        for sub, flag in flags:
            sub.training = flag
    return outputs


def layer_table(
    module: nn.Module, input_shape: tuple[int, int, int], stages: Iterable[str] = ()
) -> list[LayerInfo]:
    """List every named layer with output shape and (for spatial outputs) receptive field.

    Parameters
    ----------
    module
        The network.
    input_shape
        (channels, height, width) of one input.
    stages
        Names flagged as convolutional stages in the listing.

    Returns
    -------
    list of LayerInfo
        In ``named_modules()`` order; the root module is left out.
    """
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    example = torch.zeros(1, *input_shape, device=device, requires_grad=True)
    names = [name for name, _ in module.named_modules() if name]
    outputs = layer_outputs(module, names, example, grad=True)
    stage_set = set(stages)
    modules = dict(module.named_modules())
    table = []
    for name in names:
        output = outputs.get(name)
        if output is None:
            continue
        field = _trace(output, example) if output.ndim == 4 and output.grad_fn else None
        table.append(LayerInfo(name, type(modules[name]).__name__, tuple(output.shape[1:]),
                               field, name in stage_set))
    return table


def receptive_field(model: FERModel | nn.Module, layer: str,
                    input_shape: tuple[int, int, int] | None = None) -> ReceptiveField:
    """Receptive field of the units of ``layer``.

    Parameters
    ----------
    model
        A :class:`~interp_fer.models.FERModel` or an ``nn.Module`` (then give ``input_shape``).
    layer
        Layer name.
    input_shape
        (channels, height, width); taken from the FERModel when omitted.

    Raises
    ------
    ValueError
        When the layer's output is not spatial or contains an operation with unknown geometry.
    """
    module, shape = _module_and_shape(model, input_shape)
    resolve_layer(module, layer)
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    example = torch.zeros(1, *shape, device=device, requires_grad=True)
    output = layer_outputs(module, [layer], example, grad=True)[layer]
    field = _trace(output, example) if output.ndim == 4 and output.grad_fn else None
    if field is None:
        raise ValueError(f"layer {layer!r}: receptive field unknown (output shape "
                         f"{tuple(output.shape)}, or an operation without known geometry)")
    return field


def _module_and_shape(model, input_shape):
    # A FERModel is read by its attributes (layers does not import models: no import cycle).
    if isinstance(model, nn.Module):
        if input_shape is None:
            raise ValueError("input_shape=(channels, height, width) is needed for a bare "
                             "nn.Module")
        return model, input_shape
    return model.module, input_shape or _input_shape(model)


def _input_shape(model: FERModel) -> tuple[int, int, int]:
    return (model.preprocess.channels, *model.input_size)


# Activation modules whose outputs are the default stages (projections then refuse the ones
# without a deconvnet rule, with a message, rather than analyse pre-activation convolutions).
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.PReLU, nn.GELU, nn.SiLU, nn.Tanh,
                nn.Sigmoid, nn.Hardtanh, nn.Mish, nn.Hardswish, nn.Softplus, nn.CELU, nn.SELU)


def default_stages(model: FERModel) -> tuple[str, ...]:
    """Layers analysed when the user names none (see :func:`module_default_stages`)."""
    return module_default_stages(model.module, _input_shape(model))


def module_default_stages(module: nn.Module, input_shape: tuple[int, int, int]
                          ) -> tuple[str, ...]:
    """Layers analysed when the user names none: spatial outputs of activation modules.

    Falls back to every ``nn.Conv2d`` when the network applies its activations functionally.
    A network class that declares ``default_stages`` (the bundled architectures) gets those,
    so a state_dict checkpoint of a zoo architecture is analysed as the zoo model is.

    Parameters
    ----------
    module
        The network.
    input_shape
        (channels, height, width) of one preprocessed input.
    """
    declared = getattr(type(module), "default_stages", None)
    if declared:
        return tuple(declared)
    try:
        table = layer_table(module, input_shape)
    except Exception:  # TorchScript modules and exotic forwards: no automatic stages
        return ()
    modules = dict(module.named_modules())
    stages = [row.name for row in table
              if len(row.output_shape) == 3 and isinstance(modules[row.name], _ACTIVATIONS)]
    if not stages:
        stages = [row.name for row in table
                  if len(row.output_shape) == 3 and isinstance(modules[row.name], nn.Conv2d)]
    return tuple(stages)


def format_layer_table(table: list[LayerInfo]) -> str:
    """Render :func:`layer_table` as aligned text (the ``interp-fer layers`` output)."""
    header = ("layer", "type", "output (c, h, w)", "RF size", "RF stride", "RF offset", "stage")
    rows = [header]
    for info in table:
        field = info.receptive_field
        rows.append((
            info.name, info.kind, "x".join(str(s) for s in info.output_shape),
            _pair(field.rows.size, field.cols.size) if field else "-",
            _pair(field.rows.stride, field.cols.stride) if field else "-",
            _pair(field.rows.offset, field.cols.offset) if field else "-",
            "*" if info.is_stage else "",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def _pair(a: float, b: float) -> str:
    def fmt(v: float) -> str:
        return str(int(v)) if float(v).is_integer() else f"{v:g}"
    return fmt(a) if a == b else f"{fmt(a)}x{fmt(b)}"
