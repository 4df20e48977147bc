"""Hook ownership for attribution: one context manager owns every hook it registers.

:class:`HookSet` registers forward (pre-)hooks, can switch a network to eval mode, and on exit
removes every hook and restores each submodule's ``training`` flag, also when the body raises.
:func:`relu_rule` makes every ``nn.ReLU`` module of a network apply the deconvnet or guided
backprop rule in the backward pass; :func:`check_module_relus` finds ReLUs applied
functionally (``torch.relu``, ``F.relu``, ``Tensor.relu_``), which no module hook can reach.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

Rule = Literal["deconvnet", "guided_backprop"]

# Autograd node types that a ReLU leaves behind (out-of-place and in-place).
RELU_NODES = frozenset({"ReluBackward0", "ReluBackward1"})


class FunctionalReLUError(RuntimeError):
    """The network applies ReLU without an ``nn.ReLU`` module, so the rule cannot be applied."""


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
    """

    generate_vmap_rule = True  # lets seeds go backward batched (is_grads_batched)

    @staticmethod
    def forward(x: torch.Tensor, guided: bool) -> torch.Tensor:
        return torch.relu(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, bool], output: torch.Tensor) -> None:
        x, guided = inputs
        ctx.guided = guided
        if guided:
            ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = torch.relu(grad)
        if ctx.guided:
            (x,) = ctx.saved_tensors
            grad = grad * (x > 0)
        return grad, None


def is_rule_node(node: object) -> bool:
    """Whether an autograd node is the backward of a ReLU replaced by :func:`relu_rule`."""
    return isinstance(node, _RuleReLU._backward_cls)


def relu_rule(hooks: HookSet, root: nn.Module, rule: Rule) -> int:
    """Make every ``nn.ReLU`` in ``root`` use ``rule`` in the backward pass.

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
        return _RuleReLU.apply(stash[id(module)].pop(), guided)

    count = 0
    for module in root.modules():
        if isinstance(module, nn.ReLU):  # as Captum: subclasses too
            hooks.forward_pre(module, pre)
            hooks.forward(module, post)
            count += 1
    return count


def graph_nodes(root: Any, leaf: torch.Tensor | None = None) -> list[Any]:
    """Autograd nodes reachable from ``root`` (a grad_fn), in topological order (root first).

    With ``leaf``, only the nodes from which ``leaf`` (a tensor requiring grad) can be
    reached: the part of the graph that carries gradient to it.
    """
    if root is None:
        return []
    children: dict[Any, list[Any]] = {}
    reaches: dict[Any, bool] = {}
    postorder: list[Any] = []
    # Iterative depth-first search: deep networks would overflow Python's recursion limit.
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            reaches[node] = leaf is None or getattr(node, "variable", None) is leaf or any(
                reaches[child] for child in children[node])
            postorder.append(node)
            continue
        if node in children:
            continue
        children[node] = [child for child, _ in node.next_functions if child is not None]
        stack.append((node, True))
        stack.extend((child, False) for child in children[node] if child not in children)
    return [node for node in reversed(postorder) if reaches[node]]


def count_relu_nodes(root: Any, leaf: torch.Tensor | None = None,
                     exclude: set[Any] | None = None) -> int:
    """Number of ReLU autograd nodes between ``leaf`` and ``root`` not in ``exclude``."""
    exclude = exclude or set()
    return sum(1 for node in graph_nodes(root, leaf)
               if type(node).__name__ in RELU_NODES and node not in exclude)


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
