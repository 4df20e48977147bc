"""Captum menu behind one interface: parity, targets, layout, hooks, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum import attr
from torch import nn

from interp_fer.attributions import (
    METHODS,
    ChannelMax,
    ClassTarget,
    attribute,
    display_scale,
)
from interp_fer.hooks import FunctionalReLUError
from interp_fer.projections import deconvnet, guided_backprop


def small_classifier(seed: int = 0, inplace: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential()
    net.add_module("conv1", nn.Conv2d(1, 4, 3, padding=1))
    net.add_module("bn1", nn.BatchNorm2d(4))
    net.add_module("relu1", nn.ReLU(inplace=inplace))
    net.add_module("pool", nn.MaxPool2d(2))
    net.add_module("conv2", nn.Conv2d(4, 6, 3, padding=1))
    net.add_module("relu2", nn.ReLU(inplace=inplace))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(6 * 6 * 6, 3))
    net.bn1.running_var.uniform_(0.5, 2.0)
    net.bn1.running_mean.uniform_(-0.3, 0.3)
    return net.eval()


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(3, 1, 12, 12, generator=torch.Generator().manual_seed(7))


def captum(cls, net, x, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(net).attribute(x.clone(), **kwargs)


@pytest.mark.parametrize(("method", "cls", "options"), [
    ("saliency", attr.Saliency, {}),
    ("saliency", attr.Saliency, {"abs": False}),
    ("integrated_gradients", attr.IntegratedGradients, {"n_steps": 8}),
    ("guided_backprop", attr.GuidedBackprop, {}),
    ("deconvolution", attr.Deconvolution, {}),
    ("occlusion", attr.Occlusion, {"sliding_window_shapes": (1, 3, 3), "strides": (1, 2, 2)}),
])
@pytest.mark.parametrize("target", [1, [2, 0, 1]])
def test_class_target_matches_captum(batch, method, cls, options, target):
    net = small_classifier()
    result = attribute(net, batch, target, method, **options)
    expected = captum(cls, net, batch, target=target, **options)
    assert result.shape == batch.shape
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-6)


def test_gradcam_is_upsampled_captum(batch):
    net = small_classifier()
    result = attribute(net, batch, ClassTarget(2), "gradcam", layer="conv2")
    cam = captum(lambda model: attr.LayerGradCam(model, net.conv2), net, batch, target=2)
    expected = F.interpolate(cam, size=(12, 12), mode="bilinear", align_corners=False)
    assert result.shape == batch.shape
    torch.testing.assert_close(result, expected)


def test_every_method_same_layout_for_rgb_and_channel_target():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2)).eval()
    x = torch.randn(2, 3, 10, 10)
    for method in METHODS:
        for target in (0, ChannelMax("2", 3)):
            result = attribute(net, x, target, method, layer="2")
            assert result.shape == (2, 3, 10, 10), (method, target)
            assert torch.isfinite(result).all()


@pytest.mark.parametrize(("method", "projection"), [("deconvolution", deconvnet),
                                                    ("guided_backprop", guided_backprop)])
def test_channel_max_target_reproduces_projections(batch, method, projection):
    net = small_classifier()
    for channel in range(6):
        result = attribute(net, batch, ChannelMax("relu2", channel), method)
        maps = projection(net, batch, "relu2", [channel])
        active = maps.active[:, 0]
        scale = maps.maps.abs().amax() + 1e-12
        assert ((result[active] - maps.maps[active, 0]).abs() <= 1e-5 * scale).all()


def test_hand_network_saliency_analytic():
    # tests/ is on sys.path under pytest (no package): share the hand-weighted network.
    from test_projections import HAND_RELU2, HAND_X, hand_net

    net = hand_net()
    # Plain gradient of relu2's first (tied) maximum: channel 0 brings 2 * W0 at (1,1), and
    # channel 1, which the deconvnet ReLU rule drops, brings -1 * W1, i.e. -1 at (1,1).
    expected = torch.tensor([[0.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, -2, 0], [0, 0, 0, 0]])
    result = attribute(net, HAND_X, ChannelMax("relu2", 0), "saliency", abs=False)
    torch.testing.assert_close(result[0, 0], expected)
    deconv = attribute(net, HAND_X, ChannelMax("relu2", 0), "deconvolution")
    torch.testing.assert_close(deconv[0, 0], HAND_RELU2)


def test_callable_target(batch):
    net = small_classifier()
    result = attribute(net, batch, lambda logits: logits[:, 0] - logits[:, 1], "saliency",
                       abs=False)
    difference = attribute(net, batch, 0, "saliency", abs=False) - \
        attribute(net, batch, 1, "saliency", abs=False)
    torch.testing.assert_close(result, difference)
    with pytest.raises(ValueError, match="one value per image"):
        attribute(net, batch, lambda logits: logits, "saliency")


class FunctionalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 10 * 10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def all_hooks(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in module.modules())


@pytest.mark.parametrize("method", ["guided_backprop", "deconvolution"])
def test_functional_relu_is_an_error_for_relu_rules(batch, method):
    net = FunctionalNet().eval()
    with pytest.raises(FunctionalReLUError, match="functionally"):
        attribute(net, batch, 0, method)
    assert all_hooks(net) == 0
    attribute(net, batch, 0, "saliency")  # a plain gradient is what saliency means


def test_hooks_removed_and_flags_restored_after_error(batch):
    net = small_classifier()
    net.train()
    net.bn1.eval()
    flags = [m.training for m in net.modules()]
    with pytest.raises(ValueError, match="one value per image"):
        attribute(net, batch, lambda logits: logits.sum(), "guided_backprop")
    with pytest.raises(KeyError):
        attribute(net, batch, ChannelMax("nope", 0), "saliency")
    assert all_hooks(net) == 0
    assert [m.training for m in net.modules()] == flags


def test_training_model_explained_in_eval_mode(batch):
    net = small_classifier()
    expected = attribute(net, batch, 1, "guided_backprop")
    net.train()
    mean = net.bn1.running_mean.clone()
    torch.testing.assert_close(attribute(net, batch, 1, "guided_backprop"), expected)
    assert net.training and torch.equal(net.bn1.running_mean, mean)


def test_argument_errors(batch):
    net = small_classifier()
    with pytest.raises(ValueError, match="unknown method"):
        attribute(net, batch, 0, "lime")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layer="):
        attribute(net, batch, 0, "gradcam")
    with pytest.raises(TypeError, match="unsupported target"):
        attribute(net, batch, 1.5, "saliency")  # type: ignore[arg-type]


def test_display_scale():
    maps = torch.zeros(2, 5, 5)
    maps[0, 1, 1] = -4.0
    maps[0, 2, 2] = 2.0
    signed = display_scale(maps, percentile=100)
    assert signed.dtype == np.float32 and signed.shape == (2, 5, 5)
    assert signed[0, 1, 1] == -1.0 and signed[0, 2, 2] == 0.5
    assert not signed[1].any()  # all-zero map stays zero
    assert display_scale(maps, signed=False, percentile=100)[0, 1, 1] == 1.0
