"""Deconvnet and guided-backprop projections of every channel's maximum, and extremum points.

For image i and channel k of a layer, the *projection* is the input-space map obtained by
seeding the backward pass with 1 at the channel's arg-max unit (first maximum in row-major
order, as ``torch.argmax`` on the flattened map) and 0 elsewhere, and propagating it with the
deconvnet rules (Zeiler & Fergus 2014): transposed convolutions, max-pool switches from the
forward pass, and ``relu`` applied to the backward signal at every ``nn.ReLU``. Guided backprop
also multiplies by the forward ReLU mask. Each map equals what Captum's
``NeuronDeconvolution(module, layer).attribute(x, neuron_selector=(k, row, col))`` (or
``NeuronGuidedBackprop``) returns for that image, computed in eval mode on a float64 copy of
the network and image (to ~1e-6 of the map's maximum: the backward pass runs in float32).

Why it is fast: the deconvnet rule ``relu(grad)`` does not depend on the forward pass, so every
(image, channel) seed of a batch can go backward *together* after one forward pass, sharing
that image's pooling switches (and ReLU masks for guided backprop). The backward pass is run by
a small interpreter of the autograd graph that keeps, for each seed, only a window around its
receptive-field cone (a 3x3 unit needs a 3x3 window, not the whole image) and switches to whole
maps once the cone covers them. Graphs with operations it does not know run through
``torch.autograd.grad(..., is_grads_batched=True)`` instead: same maps, full-size.

The network runs in eval mode (BatchNorm running statistics, no dropout, each image on its
own); every submodule's ``training`` flag is restored afterwards. Rules are never silent:
every operation between the input and the layer has a defined rule (recorded per layer in
:attr:`Projections.rules`) or the call is refused. ReLUs must be ``nn.ReLU`` (or ``nn.ReLU6``)
modules, in-place is fine: a ReLU applied functionally raises
:class:`~interp_fer.hooks.FunctionalReLUError`, and other nonlinearities (Tanh, LeakyReLU, ELU,
GELU, PReLU, clamp, ``torch.maximum``, ``x * (x > 0)`` ...) raise
:class:`~interp_fer.hooks.RuleError` naming the layer, rather than silently becoming a plain
gradient. BatchNorm without running statistics projects each image on its own; TorchScript
models are refused (they run no hooks).

Precision: the arg-max units, max-pool switches and guided-backprop masks are decided by a
float64 forward pass (``forward_dtype``) wherever float32 could decide otherwise, so that
near-ties do not depend on the CPU's float32 kernels nor on the other images of the batch; the
windowed backward pass runs in the module's dtype. :attr:`Projections.switch_margins` says how
near each map came to a different switch.

One known difference from Captum: Captum rewrites the gradient of a ReLU's *input tensor*, so
where that tensor also feeds another operation (``y = conv(x); out = relu(y) + y``) Captum
applies the rule to the summed gradient of both uses, whereas here it applies to the ReLU's
share only, as the deconvnet defines it. No zoo model has such a pattern.

Coordinates: (row, col) in the pixel grid of the *preprocessed* network input (the tensor
given to the network, e.g. 64x64 for mini-Xception), pixel ``i`` covering ``[i - 0.5, i + 0.5)``;
rows grow downwards. Map them to an original image with the preprocessing's resize factor.

Package layout (``docs/projection_engine.md`` says how to extend it):

* :mod:`.api`: :class:`Projections`, :func:`deconvnet`, :func:`guided_backprop`,
  :func:`project`, the engine choice and the fallback message;
* :mod:`.autograd_engine`: batched ``torch.autograd.grad``, any graph;
* :mod:`.windowed_engine`: the interpreter of the autograd graph; :mod:`.handlers`: one
  handler per node kind, in a registry, with the contract handlers keep; :mod:`.windows`:
  the window algebra;
* :mod:`.margins`: max-pool switch margins; :mod:`.extremum`: extremum points,
  receptive-field centres and their agreement.
"""

from .api import ILL_CONDITIONED_MARGIN, Engine, Projections, deconvnet, guided_backprop, project
from .extremum import Agreement, ExtremumMethod, extremum_points, rf_agreement, rf_centres

__all__ = [
    "ILL_CONDITIONED_MARGIN", "Agreement", "Engine", "ExtremumMethod", "Projections",
    "deconvnet", "extremum_points", "guided_backprop", "project", "rf_agreement", "rf_centres",
]
