"""Hook ownership for attribution: one context manager owns every hook it registers.

:class:`HookSet` registers forward (pre-)hooks, can switch a network to eval mode, and on exit
removes every hook and restores each submodule's ``training`` flag, also when the body raises.
:func:`relu_rule` makes every ``nn.ReLU`` (and ``nn.ReLU6``) module of a network apply the
deconvnet or guided backprop rule in the backward pass; :func:`check_module_relus` finds ReLUs
applied functionally (``torch.relu``, ``F.relu``, ``Tensor.relu_``), which no module hook can
reach. :func:`check_rules` goes through every operation between the input and a layer: each
one has a defined backward rule (:func:`rule_of`) or is refused with :class:`RuleError`, so no
nonlinearity silently turns a projection into a plain gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .autograd_graph import (
    BATCHNORM_KINDS,
    batchnorm_params,
    children,
    graph_nodes,
    input_shape,
    leaf_tensor,
    node_kind,
    saved_operands,
)

Rule = Literal["deconvnet", "guided_backprop"]

# Autograd node types that a ReLU leaves behind (out-of-place and in-place).
RELU_NODES = frozenset({"ReluBackward0", "ReluBackward1"})


class FunctionalReLUError(RuntimeError):
    """The network applies ReLU without an ``nn.ReLU`` module, so the rule cannot be applied."""


class RuleError(ValueError):
    """An operation between the input and a layer has no deconvnet / guided-backprop rule."""


class HookSet:
    """Context manager that owns hooks and restores training flags on exit.

    Parameters
    ----------
    root
        The network; :meth:`eval` records the ``training`` flag of every submodule.

    Examples
    --------
    >>> with HookSet(net) as hooks:                                   # doctest: +SKIP
    ...     hooks.eval()
    ...     hooks.forward(net.conv1, lambda m, i, o: print(o.shape))
    ...     net(x)
    """

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self._handles: list[RemovableHandle] = []
        self._flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def forward(self, module: nn.Module, hook: Callable[..., Any]) -> None:
        """Register ``hook(module, inputs, output)``; it may return a replacement output."""
        self._handles.append(module.register_forward_hook(hook))

    def forward_pre(self, module: nn.Module, hook: Callable[..., Any]) -> None:
        """Register ``hook(module, inputs)``; it may return replacement inputs."""
        self._handles.append(module.register_forward_pre_hook(hook))

    def eval(self) -> None:
        """Put the whole network in eval mode (BatchNorm running statistics, no dropout).

        Every submodule's flag is restored on exit, so a mixed train/eval state survives.
        """
        if not self._flags:
            self._flags = [(m, m.training) for m in self.root.modules()]
        self.root.eval()

    def close(self) -> None:
        """Remove every hook and restore the training flags (idempotent)."""
        while self._handles:
            self._handles.pop().remove()
        for module, flag in self._flags:
            module.training = flag
        self._flags = []


class _RuleReLU(torch.autograd.Function):
    """ReLU whose backward is the deconvnet or guided-backprop rule.

    deconvnet: ``relu(grad)`` (independent of the forward input);
    guided backprop: ``relu(grad) * (input > 0)``. Same rules as Captum's ReLU hooks.
    With ``upper`` (``nn.ReLU6``: 6) the forward clamps at ``upper`` too and guided backprop
    masks with ``0 < input < upper`` (where ReLU6's own gradient is 1); deconvnet's rule is
    the same as for ReLU.
    """

    generate_vmap_rule = True  # lets seeds go backward batched (is_grads_batched)

    @staticmethod
    def forward(x: torch.Tensor, guided: bool, upper: float | None = None) -> torch.Tensor:
        return torch.relu(x) if upper is None else x.clamp(0, upper)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, guided, upper = inputs
        ctx.guided = guided
        ctx.upper = upper
        if guided:
            ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = torch.relu(grad)
        if ctx.guided:
            (x,) = ctx.saved_tensors
            grad = grad * guided_mask(x, ctx.upper)
        return grad, None, None


def guided_mask(x: torch.Tensor, upper: float | None) -> torch.Tensor:
    """Guided backprop's forward mask: ``x > 0`` (and ``x < upper`` for a capped ReLU)."""
    mask = x > 0
    return mask if upper is None else mask & (x < upper)


# Kind (type name) of the autograd node that a ReLU hooked by relu_rule leaves behind.
RULE_RELU_KIND = _RuleReLU._backward_cls.__name__


def is_rule_node(node: object) -> bool:
    """Whether an autograd node is the backward of a ReLU replaced by :func:`relu_rule`."""
    return isinstance(node, _RuleReLU._backward_cls)


def relu_rule(hooks: HookSet, root: nn.Module, rule: Rule) -> int:
    """Make every ``nn.ReLU`` (and ``nn.ReLU6``) in ``root`` use ``rule`` in the backward pass.

    The module's own output is replaced by :class:`_RuleReLU` applied to its *input*; an
    in-place ReLU works on a clone so that the input keeps its value and history (as in
    Captum). Returns the number of ReLU modules hooked.
    """
    guided = rule == "guided_backprop"
    stash: dict[int, list[torch.Tensor]] = {}

    def pre(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        stash.setdefault(id(module), []).append(inputs[0])
        if getattr(module, "inplace", False):
            return (inputs[0].clone(), *inputs[1:])
        return None

    def post(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        upper = 6.0 if isinstance(module, nn.ReLU6) else None
        return _RuleReLU.apply(stash[id(module)].pop(), guided, upper)

    count = 0
    for module in root.modules():
        if isinstance(module, (nn.ReLU, nn.ReLU6)):  # as Captum: subclasses too
            hooks.forward_pre(module, pre)
            hooks.forward(module, post)
            count += 1
    return count


def count_relu_nodes(root: Any, leaf: torch.Tensor | None = None,
                     exclude: set[Any] | None = None) -> int:
    """Number of ReLU autograd nodes between ``leaf`` and ``root`` not in ``exclude``."""
    exclude = exclude or set()
    return sum(1 for node in graph_nodes(root, leaf)
               if node_kind(node) in RELU_NODES and node not in exclude)


def raise_functional_relus(count: int, where: str, rule: str) -> None:
    """Raise :class:`FunctionalReLUError` when ``count`` > 0."""
    if count:
        raise FunctionalReLUError(
            f"{count} ReLU operation(s) between the input and {where} are applied "
            "functionally (torch.relu, F.relu, Tensor.relu_ ...), not by nn.ReLU modules; "
            f"{rule} can only change the backward pass of nn.ReLU modules, and would "
            "silently treat these as a plain gradient (Captum does). Replace them with "
            "nn.ReLU modules (in-place ones are fine)."
        )


def check_module_relus(module: nn.Module, inputs: torch.Tensor, rule: str = "this method",
                       output: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Raise :class:`FunctionalReLUError` if ``module`` applies any ReLU functionally.

    One forward pass on ``inputs`` records the autograd node of every ``nn.ReLU`` module's
    output; any other ReLU node on a path from the input to the output is functional.

    Parameters
    ----------
    module
        The network (left in its training mode; hooks removed on return).
    inputs
        A preprocessed batch (N, c, H, W); one image is enough.
    rule
        Method name for the error message.
    output
        Maps the network output to the tensor whose graph is checked (default: identity).
    """
    hooked: set[Any] = set()
    x = inputs.detach()[:1].clone().requires_grad_(True)
    with HookSet(module) as hooks:
        for sub in module.modules():
            if isinstance(sub, nn.ReLU):
                hooks.forward(sub, lambda m, i, o: hooked.add(o.grad_fn))
        with torch.enable_grad():
            result = module(x)
    if output is not None:
        result = output(result)
    raise_functional_relus(count_relu_nodes(result.grad_fn, x, hooked), "the output", rule)


# --------------------------------------------------------------------------------------------
# Rules per operation: what deconvnet and guided backprop do at each node of the graph.

# Operations whose backward pass does not depend on the forward values (linear maps), or only
# through max-pool switches, which deconvnet and guided backprop take from the forward pass.
LINEAR_NODES = frozenset({
    "ConvolutionBackward0", "AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1",
    "RsubBackward1", "MulBackward1", "DivBackward1", "NegBackward0", "CloneBackward0",
    "AliasBackward0", "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0",
    "PermuteBackward0", "TransposeBackward0", "TBackward0", "ExpandBackward0",
    "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "SqueezeBackward3",
    "UnsqueezeBackward0", "SliceBackward0", "SelectBackward0", "IndexBackward0",
    "NarrowBackward0", "SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0",
    "StackBackward0", "CatBackward0", "ConstantPadNdBackward0", "ReflectionPad1DBackward0",
    "ReflectionPad2DBackward0", "ReplicationPad1DBackward0", "ReplicationPad2DBackward0",
    "MaxPool2DWithIndicesBackward0", "AdaptiveMaxPool2DBackward0", "AvgPool2DBackward0",
    "AdaptiveAvgPool2DBackward0", "MeanBackward0", "MeanBackward1", "SumBackward0",
    "SumBackward1", "UpsampleNearest2DBackward0", "UpsampleNearest2DBackward1",
    "UpsampleBilinear2DBackward0", "UpsampleBilinear2DBackward1", "ToCopyBackward0",
    "AddmmBackward0", "MmBackward0", "LinearBackward0", "PixelShuffleBackward0",
    "PixelUnshuffleBackward0", "RollBackward0", "FlipBackward0", "RepeatBackward0",
    "AsStridedBackward0", "CopySlices", "NativeDropoutBackward0", "ConvolutionBackwardBackward0",
})
# Normalisations with statistics of each image (and channel group): the plain gradient,
# which keeps the images of a batch apart.
PER_IMAGE_NODES = frozenset({"NativeGroupNormBackward0", "NativeLayerNormBackward0"})
BATCHNORM_NODES = BATCHNORM_KINDS
# Nonlinearities deconvnet and guided backprop are not defined for: names for the message.
NONLINEAR_NAMES = {
    "TanhBackward0": "tanh", "SigmoidBackward0": "sigmoid", "LeakyReluBackward0": "LeakyReLU",
    "LeakyReluBackward1": "LeakyReLU", "EluBackward0": "ELU", "EluBackward1": "ELU",
    "GeluBackward0": "GELU", "SiluBackward0": "SiLU", "MishBackward0": "Mish",
    "HardtanhBackward0": "hardtanh (F.relu6, clamp-like)", "HardswishBackward0": "hardswish",
    "HardsigmoidBackward0": "hardsigmoid", "ClampBackward1": "clamp",
    "ClampMinBackward0": "clamp(min=...)", "ClampMaxBackward0": "clamp(max=...)",
    "MaximumBackward0": "torch.maximum", "MinimumBackward0": "torch.minimum",
    "PreluKernelBackward0": "PReLU", "PreluBackward0": "PReLU", "SoftplusBackward0": "softplus",
    "ThresholdBackward0": "threshold", "ThresholdBackward1": "threshold",
    "MulBackward0": "a multiplication by a value of the data (e.g. x * (x > 0))",
    "DivBackward0": "a division by a value of the data", "SoftmaxBackward0": "softmax",
    "LogSoftmaxBackward0": "log-softmax", "ExpBackward0": "exp", "LogBackward0": "log",
    "PowBackward0": "pow", "SqrtBackward0": "sqrt", "AbsBackward0": "abs",
    "WhereBackward0": "torch.where",
}

_RULE_TEXT = {
    ("ReLU", "deconvnet"): "deconvnet ReLU rule: relu of the backward signal",
    ("ReLU", "guided_backprop"): "guided backprop: relu of the backward signal x (input > 0)",
    ("ReLU6", "deconvnet"): "deconvnet ReLU rule: relu of the backward signal (as nn.ReLU)",
    ("ReLU6", "guided_backprop"):
        "guided backprop: relu of the backward signal x (0 < input < 6)",
}


def _multiplies_data(node: Any) -> bool:
    """Whether a MulBackward0/DivBackward0 scales by data-dependent values.

    Both factors carrying gradient, or a constant factor of the output's full shape (nothing
    broadcast: a mask computed from the data, like ``x * (x > 0)``), count as data; a
    broadcast constant (per-channel scale, a scalar tensor) is linear.
    """
    if len(children(node)) > 1:
        return True
    out = input_shape(node, 0)
    return any(value.numel() == math.prod(out) > 1 for value in saved_operands(node))


def rule_of(node: Any, rule: str) -> str | None:
    """What ``rule`` ("deconvnet" / "guided_backprop") does at an autograd node, in words.

    None when the node is a nonlinearity (or an operation) the rule is not defined for.
    """
    kind = node_kind(node)
    if is_rule_node(node):
        relu = "ReLU6" if getattr(node, "upper", None) is not None else "ReLU"
        return _RULE_TEXT[(relu, rule)]
    if kind in ("MulBackward0", "DivBackward0"):
        return None if _multiplies_data(node) else "gradient (scaling by a constant)"
    if kind == "ConvolutionBackward0":
        return "transposed convolution"
    if kind in ("MaxPool2DWithIndicesBackward0", "AdaptiveMaxPool2DBackward0"):
        return "max-pool switches of the forward pass"
    if kind in BATCHNORM_NODES:
        if bool(batchnorm_params(node).training):
            return "gradient through batch statistics (each image projected on its own)"
        return "BatchNorm scale (running statistics)"
    if "Pad" in kind:
        return "padding: gradient of padded positions folded back (reflect/replicate) or dropped"
    if kind in PER_IMAGE_NODES:
        return "gradient (per-image normalisation statistics)"
    if kind in LINEAR_NODES:
        return "gradient (linear)"
    return None


def check_rules(nodes: list[Any], rule: str, names: dict[Any, str],
                modules: dict[str, nn.Module], where: str) -> dict[str, str]:
    """The rule applied at each named layer on the path, or :class:`RuleError`.

    Parameters
    ----------
    nodes
        Autograd nodes between the input and the layer (``graph_nodes(root, x)``).
    rule
        ``"deconvnet"`` or ``"guided_backprop"``.
    names
        Autograd node -> name of the module whose output it is (leaf modules).
    modules
        Layer name -> module, for the messages.
    where
        The layer, for the messages (e.g. ``"layer 'block4'"``).

    Returns
    -------
    dict
        Layer name -> rule in words, for the modules whose output lies on the path.

    Raises
    ------
    FunctionalReLUError
        ReLUs applied functionally (``F.relu``): their rule cannot be applied.
    RuleError
        Any other operation without a rule: the message names the layer (or says that the
        operation is functional) and the user's choices.
    """
    relus = sum(1 for node in nodes if node_kind(node) in RELU_NODES)
    raise_functional_relus(relus, where, rule)
    rules: dict[str, str] = {}
    refused: list[str] = []
    for node in nodes:
        if leaf_tensor(node) is not None:
            continue
        text = rule_of(node, rule)
        name = names.get(node)
        if text is None:
            kind = node_kind(node)
            what = NONLINEAR_NAMES.get(kind, f"an operation without a rule ({kind})")
            if name is not None:
                refused.append(f"layer {name!r} is {type(modules[name]).__name__} ({what})")
            else:
                refused.append(f"{what} is applied functionally in forward() ({kind})")
        elif name is not None:
            rules.setdefault(name, text)
    if refused:
        method = "deconvnet" if rule == "deconvnet" else "guided backprop"
        raise RuleError(
            f"{method} is defined for ReLU networks (nn.ReLU / nn.ReLU6 modules); between the "
            f"input and {where}: " + "; ".join(dict.fromkeys(refused)) + ". Choices: project "
            "a layer below it, use the plain gradient (interp_fer.attributions.attribute(..., "
            "method='saliency')), locate units by receptive field (`interp-fer map --locate "
            "rf-center`), or replace the activation with nn.ReLU and retrain.")
    return dict(reversed(list(rules.items())))  # input first


def refuse_torchscript(module: nn.Module, what: str) -> None:
    """Raise a clear ``TypeError`` for TorchScript modules, which run no Python hooks."""
    if any(isinstance(sub, torch.jit.ScriptModule) for sub in module.modules()):
        raise TypeError(
            f"{what} needs forward hooks, which TorchScript modules do not run: "
            f"{type(module).__name__} is (or contains) a TorchScript module. Load the eager "
            "nn.Module instead: its state_dict with the architecture's class "
            "(interp_fer.load_model(weights, architecture='module:Class'), or "
            "`--model weights.pt --architecture module:Class`).")
