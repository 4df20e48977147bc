"""The one reader of PyTorch's autograd graph: node kinds, edges and saved forward arguments.

Receptive fields (:mod:`interp_fer.layers`), projection rules (:mod:`interp_fer.hooks`) and
the windowed projection engine (:mod:`interp_fer.projections`) all read the graph that a
forward pass records. What they need from a node lives in private attributes
(``_saved_stride``, ``_saved_pad``, ``_input_metadata``, ``next_functions`` ...) whose
spelling and encoding change between torch versions (negative pads come back as unsigned
64-bit integers, a max-pool's stride is empty when it equals the kernel, 2-D pools may keep
one value per axis or one for both). Every such read is here, once, and returns plain
dataclasses in the form the rest of the toolkit uses: (rows, cols) pairs, signed pads.

A *node* is an autograd node (a tensor's ``grad_fn``); its *kind* is its type name, e.g.
``"ConvolutionBackward0"``; its *edges* are ``(child node, output index)`` pairs, one per
forward input, ``(None, 0)`` for inputs that need no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

BATCHNORM_KINDS = frozenset({"NativeBatchNormBackward0", "CudnnBatchNormBackward0"})
PAD_KINDS = {"ConstantPadNdBackward0": "constant", "ReflectionPad2DBackward0": "reflect",
             "ReplicationPad2DBackward0": "replicate"}


@dataclass(frozen=True)
class ConvParams:
    """Forward arguments of a convolution node (``ConvolutionBackward0``).

    ``weight`` is (C_out, C_in / groups, kh, kw) for a 2-D convolution (as saved, detached);
    ``stride``, ``padding`` and ``dilation`` have one value per spatial axis.
    """

    weight: torch.Tensor
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    transposed: bool


@dataclass(frozen=True)
class PoolParams:
    """Forward arguments of a 2-D max- or average-pool node, each as (rows, cols).

    ``indices`` (max pool only): (N, C, ho, wo) flat input positions of the switches;
    ``source``: the saved (N, C, h, w) input, when the node keeps it.
    """

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    ceil_mode: bool
    count_include_pad: bool = True
    divisor_override: int | None = None
    indices: torch.Tensor | None = None
    source: torch.Tensor | None = None


@dataclass(frozen=True)
class PadParams:
    """A padding node: ``pad`` = (left, right, top, bottom, ...) as signed integers.

    Negative values are crops. ``mode``: ``"constant"``, ``"reflect"`` or ``"replicate"``.
    """

    mode: str
    pad: tuple[int, ...]


@dataclass(frozen=True)
class BatchNormParams:
    """A BatchNorm node: ``training`` (None when the node does not say), ``eps``, and the
    running variance and affine weight, (C,) each (None when absent)."""

    training: bool | None
    eps: float
    running_var: torch.Tensor | None
    weight: torch.Tensor | None


def node_kind(node: Any) -> str:
    """Type name of an autograd node, e.g. ``"ConvolutionBackward0"`` (what ``name()`` says
    for built-in nodes; custom Functions give their backward class's name)."""
    return type(node).__name__


def edges(node: Any) -> list[tuple[Any, int]]:
    """``(child node or None, output index)`` per forward input of ``node``, in order."""
    return [(child, int(index)) for child, index in node.next_functions]


def children(node: Any) -> list[Any]:
    """The child nodes of ``node`` that carry gradient (edges without None)."""
    return [child for child, _ in node.next_functions if child is not None]


def leaf_tensor(node: Any) -> torch.Tensor | None:
    """The tensor an ``AccumulateGrad`` node writes its gradient to; None for other nodes."""
    return getattr(node, "variable", None)


def input_shapes(node: Any) -> list[tuple[int, ...]]:
    """Shape of each gradient ``node`` receives (its forward outputs), in order."""
    return [tuple(meta.shape) for meta in getattr(node, "_input_metadata", ())]


def input_shape(node: Any, index: int = 0) -> tuple[int, ...]:
    """Shape of the ``index``-th forward output of ``node`` (the map its gradient covers)."""
    return tuple(node._input_metadata[index].shape)


def add_alpha(node: Any) -> float:
    """The ``alpha`` of an ``AddBackward0`` / ``SubBackward0`` node (``a + alpha * b``)."""
    return float(node._saved_alpha)


def saved_operands(node: Any) -> list[torch.Tensor]:
    """The saved tensor operands (``other``, ``self``) of a multiplication or division node."""
    found = (getattr(node, name, None) for name in ("_saved_other", "_saved_self"))
    return [value for value in found if isinstance(value, torch.Tensor)]


def cat_dim(node: Any) -> int:
    """The dimension a ``CatBackward0`` node concatenated along (as given: may be negative)."""
    return int(node._saved_dim)


def conv_params(node: Any) -> ConvParams:
    """Forward arguments of a ``ConvolutionBackward0`` node."""
    return ConvParams(node._saved_weight.detach(), tuple(int(v) for v in node._saved_stride),
                      tuple(int(v) for v in node._saved_padding),
                      tuple(int(v) for v in node._saved_dilation), int(node._saved_groups),
                      bool(node._saved_transposed))


def _pair(values: Sequence[Any]) -> tuple[int, int]:
    values = tuple(int(v) for v in values)
    return (values[0], values[-1])


def pool_params(node: Any) -> PoolParams:
    """Forward arguments of a ``MaxPool2DWithIndicesBackward0`` or ``AvgPool2DBackward0`` node.

    An empty stride (the default) is the kernel; a pool without dilation has (1, 1).
    """
    kernel = _pair(node._saved_kernel_size)
    stride = _pair(node._saved_stride or kernel)
    dilation = _pair(getattr(node, "_saved_dilation", (1, 1)))
    override = getattr(node, "_saved_divisor_override", None)
    indices = getattr(node, "_saved_result1", None)
    source = getattr(node, "_saved_self", None)
    return PoolParams(
        kernel, stride, _pair(node._saved_padding), dilation, bool(node._saved_ceil_mode),
        bool(getattr(node, "_saved_count_include_pad", True)),
        None if override is None else int(override),
        None if indices is None else indices.detach(),
        None if source is None else source.detach())


def pad_params(node: Any) -> PadParams:
    """Pads of a ``ConstantPadNdBackward0``, ``ReflectionPad2DBackward0`` or
    ``ReplicationPad2DBackward0`` node, as signed integers (left, right, top, bottom, ...)."""
    mode = PAD_KINDS[node_kind(node)]
    values = node._saved_pad if mode == "constant" else node._saved_padding
    # Negative pads (crops) come back as unsigned 64-bit integers.
    return PadParams(mode, tuple(int(v) - 2**64 if int(v) >= 2**63 else int(v) for v in values))


def batchnorm_params(node: Any) -> BatchNormParams:
    """Saved state of a BatchNorm node (``NativeBatchNormBackward0`` and the cuDNN one)."""
    training = getattr(node, "_saved_training", None)
    eps = getattr(node, "_saved_eps", getattr(node, "_saved_epsilon", 1e-5))
    var = getattr(node, "_saved_running_var", None)
    weight = getattr(node, "_saved_weight", None)
    return BatchNormParams(None if training is None else bool(training), float(eps),
                           None if var is None else var.detach(),
                           None if weight is None else weight.detach())


def graph_nodes(root: Any, leaf: torch.Tensor | None = None) -> list[Any]:
    """Autograd nodes reachable from ``root`` (a grad_fn), in topological order (root first).

    With ``leaf``, only the nodes from which ``leaf`` (a tensor requiring grad) can be
    reached: the part of the graph that carries gradient to it.
    """
    if root is None:
        return []
    below: dict[Any, list[Any]] = {}
    reaches: dict[Any, bool] = {}
    postorder: list[Any] = []
    # Iterative depth-first search: deep networks would overflow Python's recursion limit.
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            reaches[node] = leaf is None or leaf_tensor(node) is leaf or any(
                reaches[child] for child in below[node])
            postorder.append(node)
            continue
        if node in below:
            continue
        below[node] = children(node)
        stack.append((node, True))
        stack.extend((child, False) for child in below[node] if child not in below)
    return [node for node in reversed(postorder) if reaches[node]]


def largest_map(root: Any) -> int:
    """Largest per-image size (elements) of any gradient in the graph below ``root``."""
    largest = 1
    for node in graph_nodes(root):
        for shape in input_shapes(node):
            largest = max(largest, math.prod(shape[1:]))
    return largest
