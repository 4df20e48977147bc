"""Projection engine: analytic answers, parity with Captum, robustness, hooks and leaks."""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import NeuronDeconvolution, NeuronGuidedBackprop
from torch import nn

from interp_fer.hooks import FunctionalReLUError, HookSet, RuleError
from interp_fer.layers import resolve_layer
from interp_fer.projections import (
    ILL_CONDITIONED_MARGIN,
    deconvnet,
    extremum_points,
    project,
    rf_agreement,
    rf_centres,
)

ENGINES = ("windowed", "autograd")
CAPTUM = {"deconvnet": NeuronDeconvolution, "guided_backprop": NeuronGuidedBackprop}


# ------------------------------------------------------------------------ hand-weighted net


def hand_net(inplace: bool = False) -> nn.Sequential:
    """conv 2x2 (1 -> 2) - ReLU - maxpool 2x2/1 - conv 1x1 (2 -> 1) - ReLU, weights by hand.

    conv1: W0 = [[1, 0], [0, -1]] (diagonal difference), W1 = [[1, 0], [0, 0]] (copy);
    conv2: 2 * channel 0 - 1 * channel 1.
    """
    net = nn.Sequential()
    net.add_module("conv1", nn.Conv2d(1, 2, 2, bias=False))
    net.add_module("relu1", nn.ReLU(inplace=inplace))
    net.add_module("pool", nn.MaxPool2d(2, stride=1))
    net.add_module("conv2", nn.Conv2d(2, 1, 1, bias=False))
    net.add_module("relu2", nn.ReLU(inplace=inplace))
    with torch.no_grad():
        net.conv1.weight.copy_(torch.tensor([[[[1.0, 0.0], [0.0, -1.0]]],
                                             [[[1.0, 0.0], [0.0, 0.0]]]]))
        net.conv2.weight.copy_(torch.tensor([2.0, -1.0]).view(1, 2, 1, 1))
    return net.eval()


# x11 = 3 is a bright dot, x33 = 1 a dimmer one.
HAND_X = torch.tensor([[0.0, 0, 0, 0], [0, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]).view(1, 1, 4, 4)
# By hand: conv1 ch0 = x[i,j] - x[i+1,j+1] = [[-3,0,0],[0,3,0],[0,0,-1]] -> relu: 3 at (1,1);
# conv1 ch1 = x[i,j] = [[0,0,0],[0,3,0],[0,0,0]]; every 2x2 pool window holds (1,1): both
# channels pool to 3 everywhere with switch (1,1); conv2 = 2*3 - 3 = 3 everywhere: a 4-way tie,
# so the arg-max unit is the first in row-major order, (0, 0).
# Deconvnet from relu2 (0,0): seed 1 -> conv2^T gives ch0: 2, ch1: -1 -> pool switches (1,1)
# -> relu of the backward signal kills ch1 -> conv1^T places 2 * W0 at (1,1).
HAND_RELU2 = torch.tensor([[0.0, 0, 0, 0], [0, 2, 0, 0], [0, 0, -2, 0], [0, 0, 0, 0]])
# From relu1: channel 0's max 3 at (1,1) projects W0 there; channel 1's projects W1 there.
HAND_RELU1 = torch.tensor([[[0.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 0], [0, 0, 0, 0]],
                           [[0.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", ["deconvnet", "guided_backprop"])
@pytest.mark.parametrize("inplace", [False, True])
def test_hand_network_analytic(engine, method, inplace):
    net = hand_net(inplace)
    result = project(net, HAND_X, "relu2", method=method, engine=engine)
    assert result.units.tolist() == [[[0, 0]]]  # first of the tied maxima
    assert result.values.tolist() == [[3.0]]
    assert result.active.tolist() == [[True]]
    torch.testing.assert_close(result.maps[0, 0, 0], HAND_RELU2)
    first = project(net, HAND_X, "relu1", method=method, engine=engine)
    assert first.units.tolist() == [[[1, 1], [1, 1]]]
    torch.testing.assert_close(first.maps[0, :, 0], HAND_RELU1)


def test_hand_network_extremum_points():
    result = deconvnet(hand_net(), HAND_X, "relu2")
    # |map| has 2 at (1,1) and (2,2): top 1 % of 16 pixels is one pixel, ties included.
    assert extremum_points(result).tolist() == [[[1.5, 1.5]]]
    assert extremum_points(result, "argmax").tolist() == [[[1.0, 1.0]]]
    # relu2 unit (0,0) sees input rows/cols 0..2 (2x2 conv then 2x2 pool): centre (1, 1).
    assert extremum_points(result, "rf").tolist() == [[[1.0, 1.0]]]
    agreement = rf_agreement(result, threshold=0.75)
    assert agreement.count == 1 and agreement.rate == 1.0
    assert agreement.distances.item() == pytest.approx(math.sqrt(0.5))
    assert rf_agreement(result, threshold=0.5).rate == 0.0
    assert rf_agreement(result).threshold == 1.0  # half of stride 1, at least one pixel


def test_inactive_channel_is_zero_and_nan():
    net = hand_net()
    x = torch.zeros_like(HAND_X)  # every unit is 0: the maximum is not positive
    result = deconvnet(net, x, "relu2")
    assert result.active.tolist() == [[False]]
    assert not result.maps.any()
    assert torch.isnan(extremum_points(result)).all()
    assert torch.isnan(rf_centres(result)).all()
    assert rf_agreement(result).count == 0


def test_extremum_centroid_uses_top_share():
    maps = torch.zeros(1, 1, 1, 10, 10)
    maps[0, 0, 0, 2, 3] = 5.0
    maps[0, 0, 0, 8, 8] = 1.0  # outside the top 1 % (one pixel of 100)
    assert extremum_points(maps).tolist() == [[[2.0, 3.0]]]
    # top 2 %: both pixels, weighted by energy.
    assert extremum_points(maps, top=0.02)[0, 0].tolist() == pytest.approx([3.0, 3.8333333])
    with pytest.raises(ValueError):
        extremum_points(maps, top=0)


def test_extremum_centroid_keeps_every_pixel_tied_with_the_threshold():
    maps = torch.zeros(2, 1, 1, 10, 10)
    maps[0, 0, 0, 1, 1] = maps[0, 0, 0, 1, 7] = maps[0, 0, 0, 9, 4] = 2.0  # three tied at the top
    maps[1, 0, 0, 4, 6] = 3.0
    maps[1, 0, 0, 5, 2] = -3.0  # |map| counts: a tie of two, whatever the sign
    points = extremum_points(maps)  # top 1 % of 100 pixels: one, plus its ties
    assert points[0, 0].tolist() == pytest.approx([11 / 3, 4.0])
    assert points[1, 0].tolist() == pytest.approx([4.5, 4.0])


# ------------------------------------------------------------------------ Captum parity


# The engine's float32 backward pass against a float64 reference: measured <= 6.5e-7 of each
# map's max on the zoo (rounding of the float32 transposed convolutions); 1e-5 leaves room for
# other CPUs' kernels. A float32 reference would not do: near-tied max-pool switches flip in
# float32 from one CPU to the next (a different map, up to 1e-1 of its max).
PARITY_TOLERANCE = 1e-5


def captum_map(method, module, layer, x, channel, row, col):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CAPTUM[method](module, resolve_layer(module, layer)).attribute(
            x, neuron_selector=(channel, row, col))[0]


def assert_matches_captum(module, x, result, slots=None):
    """Each active map equals Captum's, run in float64 on a float64 copy of the network and
    input, to PARITY_TOLERANCE of the map's max |value|."""
    reference = copy.deepcopy(module).double()
    checked = 0
    for image in range(x.shape[0]):
        for slot in slots if slots is not None else range(len(result.channels)):
            if not result.active[image, slot]:
                continue
            row, col = result.units[image, slot].tolist()
            expected = captum_map(result.method, reference, result.layer,
                                  x[image:image + 1].double(), int(result.channels[slot]),
                                  row, col)
            error = (expected - result.maps[image, slot].double()).abs().max()
            assert error <= PARITY_TOLERANCE * expected.abs().max(), \
                (result.layer, image, slot, float(error / expected.abs().max()))
            checked += 1
    assert checked


@pytest.fixture(scope="module")
def zoo():
    from interp_fer.models import load_model
    from interp_fer.samples import sample_face

    faces = [sample_face("happy"), sample_face("surprise")]
    models = {}
    for name in ("mini-xception", "pyemotion"):
        model = load_model(name)
        models[name] = (model, model.preprocess(faces))
    return models


ZOO_STAGES = [("mini-xception", s) for s in ("conv1", "conv2", "block1", "block2", "block3",
                                             "block4")] + \
             [("pyemotion", s) for s in ("conv_1", "conv_2", "conv_3", "conv_4")]


@pytest.mark.parametrize("method", ["deconvnet", "guided_backprop"])
@pytest.mark.parametrize(("name", "stage"), ZOO_STAGES)
def test_zoo_parity_with_captum(zoo, name, stage, method):
    model, x = zoo[name]
    assert stage in model.stages
    n_channels = _channels(model.module, stage, x)
    # Three channels spread over the layer (first, middle, last), both faces.
    channels = sorted({0, n_channels // 2, n_channels - 1})
    result = project(model.module, x, stage, channels, method=method)
    assert result.maps.shape == (2, len(channels), 1, *model.input_size)
    assert_matches_captum(model.module, x, result)


def _channels(module, layer, x):
    with torch.no_grad():
        outputs = []
        handle = resolve_layer(module, layer).register_forward_hook(
            lambda _m, _i, out: outputs.append(out.shape[1]))
        try:
            module(x[:1])
        finally:
            handle.remove()
    return outputs[0]


def test_zoo_engines_agree_and_channel_subset(zoo):
    model, x = zoo["mini-xception"]
    full = deconvnet(model.module, x, "block3")
    auto = deconvnet(model.module, x, "block3", channels=[40, 3], engine="autograd")
    assert auto.channels.tolist() == [40, 3]
    torch.testing.assert_close(auto.maps, full.maps[:, [40, 3]], rtol=0, atol=1e-5)
    assert torch.equal(auto.units, full.units[:, [40, 3]])


def test_zoo_rf_agreement_reports_rate(zoo):
    model, x = zoo["pyemotion"]
    result = deconvnet(model.module, x, "conv_3")
    agreement = rf_agreement(result)
    assert agreement.threshold == 2.0  # half the stride (4 px) of conv_3
    assert agreement.count == result.active.sum()
    assert 0.0 <= agreement.rate <= 1.0
    assert agreement.distances.shape == result.values.shape


def seventeen_faces():
    """17 real faces: the sample faces, their mirror images, three of them shifted."""
    from interp_fer.samples import SAMPLE_FACES, sample_face

    base = [sample_face(name) for name in SAMPLE_FACES]
    mirrored = [face[:, ::-1].copy() for face in base]
    shifted = [np.roll(face, (9, -7), axis=(0, 1)) for face in base[:3]]
    return (base + mirrored + shifted)[:17]


@pytest.fixture(scope="module")
def crowd():
    from interp_fer.models import load_model

    faces = seventeen_faces()
    assert len(faces) == 17
    return {name: (model := load_model(name), model.preprocess(faces))
            for name in ("mini-xception", "pyemotion")}


@pytest.mark.parametrize("method", ["deconvnet", "guided_backprop"])
@pytest.mark.parametrize(("name", "stage"), ZOO_STAGES)
def test_projection_does_not_depend_on_the_batch(crowd, name, stage, method):
    # One face alone, then at different places in batches of 3 and 17 other faces (and split
    # into image batches of 5): same arg-max units, maps, switch margins and extremum points.
    model, faces = crowd[name]
    face = 1  # the "happy" sample face
    channels = sorted({0, _channels(model.module, stage, faces) // 2, 5})
    alone = project(model.module, faces[face:face + 1], stage, channels, method=method)
    assert alone.active.any()
    batches = [(faces[[face, 0, 2]], 0), (faces[[3, 4, face]], 2), (faces, face)]
    for batch, where in batches:
        for image_batch in (64, 5):
            result = project(model.module, batch, stage, channels, method=method,
                             image_batch=image_batch)
            assert torch.equal(result.units[where], alone.units[0])
            assert torch.equal(result.active[where], alone.active[0])
            scale = alone.maps[0].flatten(1).abs().amax(1).clamp_min(1e-30)
            error = (result.maps[where] - alone.maps[0]).flatten(1).abs().amax(1)
            assert (error <= 1e-6 * scale).all(), (batch.shape[0], image_batch, error / scale)
            # Margins of clear decisions come from the float32 pass: a few % of themselves.
            torch.testing.assert_close(result.switch_margins[where], alone.switch_margins[0],
                                       rtol=0.05, atol=0, equal_nan=True)
            for how in ("centroid", "argmax", "rf"):
                torch.testing.assert_close(extremum_points(result, how)[where],
                                           extremum_points(alone, how)[0],
                                           rtol=0, atol=1e-6, equal_nan=True)


def test_switch_margins_known_answer():
    # A 2x2/2 max-pool straight on the input: window (0,0) holds 1 and 0.9 (gap 0.1), window
    # (0,1) holds 2 and zeros (gap 2), window (1,0) zeros only (an exact tie: not counted),
    # window (1,1) 2 and -1 (gap 3). The map's largest |value| is 2.
    x = torch.tensor([[1.0, 0.9, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0],
                      [0.0, 0.0, 2.0, 0.0], [0.0, 0.0, -1.0, 0.0]]).view(1, 1, 4, 4)
    pointwise = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(1, 1, 1, bias=False), nn.ReLU()).eval()
    whole = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(1, 1, 2, bias=False), nn.ReLU()).eval()
    with torch.no_grad():
        pointwise[1].weight.fill_(1.0)
        whole[1].weight.fill_(1.0)
    for engine in ENGINES:
        # 1x1 convolution: the arg-max unit (0, 1) sees pool window (0, 1) only.
        one = deconvnet(pointwise, x, "2", engine=engine)
        assert one.units.tolist() == [[[0, 1]]]
        assert one.switch_margins.tolist() == [[pytest.approx(2 / 2)]]
        # 2x2 convolution: the one unit sees every window; the smallest gap is 0.1.
        every = deconvnet(whole, x, "2", engine=engine)
        assert every.switch_margins.tolist() == [[pytest.approx(0.1 / 2)]]
    assert one.switch_margins.dtype == torch.float64
    # No max-pool on the path: inf; an inactive channel: NaN.
    assert deconvnet(hand_net(), HAND_X, "relu1").switch_margins.isinf().all()
    assert deconvnet(whole, -x.abs(), "2").switch_margins.isnan().all()


def test_switch_margins_flag_near_ties_of_real_faces(zoo):
    model, x = zoo["mini-xception"]
    shallow = deconvnet(model.module, x, "conv2")  # below every max-pool
    assert shallow.switch_margins.isinf().all()
    deep = deconvnet(model.module, x, "block4", channels=range(0, 128, 8))
    margins = deep.switch_margins[deep.active]
    assert ((margins > 0) & (margins < 1)).all()
    # block4's cones cover thousands of max-pool windows: on real faces some are near-ties.
    assert (margins < ILL_CONDITIONED_MARGIN).any()


def test_float64_switches_match_captum_in_float64_where_float32_does_not(zoo):
    # The forward pass runs in float64 (forward_dtype): the same switches as a float64
    # reference. In the module's own float32 the engine still runs, and still matches a
    # float64 reference wherever the float32 switches agree.
    model, x = zoo["mini-xception"]
    result = deconvnet(model.module, x, "block4", channels=[0, 44, 120])
    assert_matches_captum(model.module, x, result)
    float32 = deconvnet(model.module, x, "block4", channels=[0, 44, 120], forward_dtype=None)
    assert float32.maps.dtype == torch.float32 and float32.switch_margins.shape == (2, 3)
    with pytest.raises(ValueError, match="forward_dtype"):
        deconvnet(model.module, x, "block4", channels=0, forward_dtype=torch.int64)


ISA_SCRIPT = """
import copy, json, warnings, sys, torch
from captum.attr import NeuronDeconvolution, NeuronGuidedBackprop
from interp_fer import load_model
from interp_fer.layers import resolve_layer
from interp_fer.projections import project
from interp_fer.samples import sample_face

warnings.simplefilter("ignore")
torch.set_num_threads(1)
model = load_model("mini-xception")
x = model.preprocess([sample_face("happy"), sample_face("surprise"), sample_face("angry")])
reference = copy.deepcopy(model.module).double()
worst, batch = 0.0, 0.0
for method, captum in (("deconvnet", NeuronDeconvolution), ("guided_backprop",
                                                            NeuronGuidedBackprop)):
    result = project(model.module, x, "block4", [0, 44, 120], method=method)
    alone = project(model.module, x[1:2], "block4", [0, 44, 120], method=method)
    batch = max(batch, float((alone.maps[0] - result.maps[1]).abs().max()
                             / result.maps[1].abs().max()))
    assert torch.equal(alone.units[0], result.units[1])
    attribution = captum(reference, resolve_layer(reference, "block4"))
    for image in range(x.shape[0]):
        for slot, channel in enumerate(result.channels.tolist()):
            if not result.active[image, slot]:
                continue
            row, col = result.units[image, slot].tolist()
            expected = attribution.attribute(x[image:image + 1].double(),
                                             neuron_selector=(channel, row, col))[0]
            error = (expected - result.maps[image, slot].double()).abs().max()
            worst = max(worst, float(error / expected.abs().max()))
print(json.dumps({"isa": torch.backends.cpu.get_cpu_capability(), "worst": worst,
                  "batch": batch}))
"""


@pytest.mark.parametrize("isa", ["AVX512_CORE", "AVX2"])
def test_parity_holds_under_each_onednn_isa(isa):
    # oneDNN picks its float32 kernels by instruction set: a parity check in a fresh process
    # for each (a CPU without AVX-512 runs the AVX-512 case at its own best ISA).
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=isa, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", ISA_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["worst"] <= PARITY_TOLERANCE, measured
    assert measured["batch"] <= 1e-6, measured


# ------------------------------------------------------------------------ real-model shapes


class BasicBlock(nn.Module):
    """ResNet basic block: one in-place ReLU module used twice, residual add in place."""

    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.down = None
        if stride != 1:
            self.down = nn.Sequential(nn.Conv2d(channels, channels, 1, stride, bias=False),
                                      nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def tiny_resnet(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential()
    net.add_module("stem", nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6),
                                         nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)))
    net.add_module("layer1", BasicBlock(6))
    net.add_module("layer2", BasicBlock(6, stride=2))
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    return net.eval()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", ["deconvnet", "guided_backprop"])
@pytest.mark.parametrize("layer", ["stem", "layer1", "layer2", "layer2.conv1"])
def test_residual_inplace_parity_with_captum(engine, method, layer):
    net = tiny_resnet()
    x = torch.randn(2, 1, 17, 19, generator=torch.Generator().manual_seed(1))
    result = project(net, x, layer, method=method, engine=engine)
    assert_matches_captum(net, x, result)


def random_net(seed: int) -> tuple[nn.Module, torch.Tensor]:
    """Odd sizes, strides, dilation, groups, every padding kind, pooling with padding."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
        nn.ReplicationPad2d((1, 0, 2, 1)), nn.Conv2d(4, 4, 3, stride=2, groups=2), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        nn.ConstantPad2d((0, 1, 1, -1), -1.0), nn.Conv2d(4, 6, 3, dilation=2, padding=2),
        nn.BatchNorm2d(6), nn.ReLU(inplace=True),
    ).eval()
    return net, torch.randn(3, 2, 21 + seed, 18, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", ["deconvnet", "guided_backprop"])
def test_windowed_engine_matches_autograd(seed, method):
    net, x = random_net(seed)
    for layer in ("1", "4", "5", "9"):
        windowed = project(net, x, layer, method=method, engine="windowed")
        batched = project(net, x, layer, method=method, engine="autograd")
        assert torch.equal(windowed.units, batched.units)
        scale = batched.maps.flatten(2).abs().amax(-1, keepdim=True).clamp_min(1e-12)
        assert ((windowed.maps - batched.maps).flatten(2).abs() <= 1e-5 * scale).all()


@pytest.mark.parametrize("method", ["deconvnet", "guided_backprop"])
def test_pointwise_convolutions_on_windows_crossing_the_border(method):
    # Windows of units near the border stick out of the map; 1x1 convolutions carry what lies
    # outside unchanged (no cleaning), the 3x3 ones and the pooling must not spread it.
    torch.manual_seed(5)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 1), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(6, 5, 1), nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1), nn.Conv2d(5, 5, 1), nn.Conv2d(5, 4, 3, padding=1),
    ).eval()
    x = torch.randn(3, 1, 23, 20, generator=torch.Generator().manual_seed(6))
    for layer in ("5", "9"):
        windowed = project(net, x, layer, method=method, engine="windowed")
        batched = project(net, x, layer, method=method, engine="autograd")
        scale = batched.maps.flatten(2).abs().amax(-1, keepdim=True).clamp_min(1e-12)
        assert ((windowed.maps - batched.maps).flatten(2).abs() <= 1e-5 * scale).all()


class SiblingReLUs(nn.Module):
    """Both inputs of an addition are ReLU outputs: each branch must see the sum's gradient."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
        self.left = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(inplace=True))
        self.right = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())
        self.head = nn.Conv2d(4, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(self.left(x) + self.right(x))


@pytest.mark.parametrize("method", ["deconvnet", "guided_backprop"])
def test_gradient_shared_by_two_branches_is_not_modified_in_place(method):
    net = SiblingReLUs().eval()
    x = torch.randn(2, 1, 12, 13, generator=torch.Generator().manual_seed(4))
    windowed = project(net, x, "head", method=method, engine="windowed")
    batched = project(net, x, "head", method=method, engine="autograd")
    scale = batched.maps.flatten(2).abs().amax(-1, keepdim=True).clamp_min(1e-12)
    assert ((windowed.maps - batched.maps).flatten(2).abs() <= 1e-5 * scale).all()
    assert_matches_captum(net, x, windowed)


def test_random_net_parity_with_captum():
    net, x = random_net(0)
    assert_matches_captum(net, x[:1], deconvnet(net, x[:1], "9"))


def avg_pool_net(seed: int = 0) -> nn.Sequential:
    """conv-relu-avgpool-conv-relu, then every average-pool option the windowed engine runs."""
    torch.manual_seed(seed)
    net = nn.Sequential()
    net.add_module("conv1", nn.Conv2d(1, 4, 3, padding=1))
    net.add_module("relu1", nn.ReLU())
    net.add_module("pool1", nn.AvgPool2d(2))
    net.add_module("conv2", nn.Conv2d(4, 6, 3, padding=1))
    net.add_module("bn2", nn.BatchNorm2d(6))
    net.add_module("relu2", nn.ReLU(inplace=True))
    # Keras 'same' average pooling: the padding is not counted.
    net.add_module("pool2", nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False))
    net.add_module("conv3", nn.Conv2d(6, 5, 3))
    net.add_module("relu3", nn.ReLU())
    net.add_module("pool3", nn.AvgPool2d(3, stride=1, padding=1))  # padding counted
    net.add_module("conv4", nn.Conv2d(5, 4, 1))
    net.add_module("relu4", nn.ReLU())
    net.add_module("pool4", nn.AvgPool2d(2, stride=1, divisor_override=3))
    net.add_module("conv5", nn.Conv2d(4, 3, 2))
    net.add_module("relu5", nn.ReLU())
    net.bn2.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("method", ["deconvnet", "guided_backprop"])
def test_average_pooling_runs_windowed_with_parity(zoo, method):
    _, faces = zoo["pyemotion"]  # two real faces, 48 x 48 grey
    resnet = tiny_resnet()  # zoo-like: residual blocks behind an average-pooled stem
    resnet.stem[3] = nn.AvgPool2d(3, 2, 1, count_include_pad=False)
    cases = [(avg_pool_net(), faces, ("relu1", "relu2", "relu3", "relu4", "relu5")),
             (resnet, faces[:1, :, :31, :29], ("stem", "layer1", "layer2"))]
    for net, x, layers in cases:
        for layer in layers:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                windowed = project(net, x, layer, method=method)  # engine="auto"
            assert not [w for w in caught if "windowed engine" in str(w.message)], layer
            modules = dict(net.named_modules())
            pooled = [name for name in windowed.rules if isinstance(modules[name], nn.AvgPool2d)]
            assert pooled or layer == "relu1", layer
            batched = project(net, x, layer, method=method, engine="autograd")
            scale = batched.maps.flatten(2).abs().amax(-1, keepdim=True).clamp_min(1e-12)
            assert ((windowed.maps - batched.maps).flatten(2).abs() <= 1e-5 * scale).all(), layer
            channels = len(windowed.channels)
            assert_matches_captum(net, x, windowed, sorted({0, channels // 2, channels - 1}))
    # ceil_mode's border windows are not implemented: refused, not computed wrong.
    ceil = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AvgPool2d(2, ceil_mode=True),
                         nn.Conv2d(2, 2, 1), nn.ReLU()).eval()
    with pytest.raises(ValueError, match="AvgPool2DBackward0"):
        deconvnet(ceil, faces[:1, :, :11, :11], "4", engine="windowed")  # 9 -> 5, not 4


class TwoBranches(nn.Module):
    """Inception-style: a 3x3 branch and an average-pooled 1x1 branch, concatenated."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.dim = dim
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.left = nn.Sequential(nn.Conv2d(4, 3, 3, padding=1), nn.ReLU(inplace=True))
        self.right = nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False),
                                   nn.Conv2d(4, 2, 1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(5 if dim == 1 else 3, 4, 3, stride=2), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        right = self.right(x) if self.dim == 1 else self.left(x)
        return self.head(torch.cat([self.left(x), right], dim=self.dim))


@pytest.mark.parametrize("method", ["deconvnet", "guided_backprop"])
def test_channel_concatenation_runs_windowed_with_parity(zoo, method):
    from interp_fer.keras_import import keras_to_torch

    _, faces = zoo["pyemotion"]
    data = Path(__file__).resolve().parent / "data"
    keras = keras_to_torch(data / "keras_functional.keras")  # Concatenate, AveragePooling2D
    keras_x = torch.from_numpy(np.load(data / "keras_functional.npz")["inputs"][:2]).permute(
        0, 3, 1, 2).float()
    for net, x, layer in ((TwoBranches().eval(), faces[:, :, :20, :23], "head"),
                          (keras, keras_x, "head.relu")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            windowed = project(net, x, layer, method=method)  # engine="auto"
        assert not [w for w in caught if "windowed engine" in str(w.message)], layer
        batched = project(net, x, layer, method=method, engine="autograd")
        scale = batched.maps.flatten(2).abs().amax(-1, keepdim=True).clamp_min(1e-12)
        assert ((windowed.maps - batched.maps).flatten(2).abs() <= 1e-5 * scale).all(), layer
        channels = len(windowed.channels)
        assert_matches_captum(net, x, windowed, sorted({0, channels // 2, channels - 1}))
    # Concatenation along rows: not implemented, refused.
    with pytest.raises(ValueError, match="CatBackward0"):
        project(TwoBranches(dim=2).eval(), faces[:1, :, :12, :12], "head", method=method,
                engine="windowed")


def test_handler_registry_is_keyed_by_node_kind_and_refuses_a_second_handler():
    from interp_fer.projections.handlers import HANDLERS, register

    x = torch.zeros(1, 1, 6, 6, requires_grad=True)
    assert type(F.avg_pool2d(x, 2).grad_fn).__name__ in HANDLERS
    with pytest.raises(ValueError, match="ConvolutionBackward0.*convolution"):
        register("ConvolutionBackward0")(lambda node, context: None)
    assert HANDLERS["ConvolutionBackward0"].__name__ == "convolution"


def test_unsupported_operation_falls_back_to_autograd():
    class Upsampling(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3)
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(F.interpolate(self.conv(x), scale_factor=2.0))

    torch.manual_seed(0)
    net = Upsampling().eval()
    x = torch.randn(2, 1, 9, 9)
    result = deconvnet(net, x, "relu")
    assert_matches_captum(net, x, result)
    with pytest.raises(ValueError, match="windowed engine"):
        deconvnet(net, x, "relu", engine="windowed")


# ------------------------------------------------------------------------ robustness


class FunctionalReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3)
        self.conv2 = nn.Conv2d(3, 3, 3)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(F.relu(self.conv1(x))))


def all_hooks(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in module.modules())


@pytest.mark.parametrize("method", ["deconvnet", "guided_backprop"])
def test_functional_relu_raises_clear_error(method):
    net = FunctionalReLU().eval()
    with pytest.raises(FunctionalReLUError, match="1 ReLU operation.*nn.ReLU modules"):
        project(net, torch.randn(1, 1, 8, 8), "relu", method=method)
    assert all_hooks(net) == 0
    # Before the functional ReLU, there is nothing to complain about.
    project(net, torch.randn(1, 1, 8, 8), "conv1", method=method)


def test_hooks_removed_and_flags_restored_when_forward_raises():
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.relu = nn.ReLU(inplace=True)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.relu(self.conv(x))
            raise RuntimeError("boom")  # before the layer "bn" is reached

    net = Broken().train()
    net.conv.eval()
    flags = [m.training for m in net.modules()]
    with pytest.raises(RuntimeError, match="boom"):
        deconvnet(net, torch.randn(1, 1, 6, 6), "bn")
    assert all_hooks(net) == 0
    assert [m.training for m in net.modules()] == flags


def test_hooks_removed_when_layer_output_is_not_spatial():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)).eval()
    with pytest.raises(ValueError, match="must output a \\(N, C, h, w\\)"):
        deconvnet(net, torch.randn(1, 1, 4, 4), "3")
    assert all_hooks(net) == 0


def test_hookset_removes_everything_on_exception():
    net = tiny_resnet()
    net.train()
    with pytest.raises(KeyError), HookSet(net) as hooks:
        hooks.eval()
        hooks.forward(net.stem, lambda *a: None)
        hooks.forward_pre(net.layer1, lambda *a: None)
        assert all_hooks(net) == 2 and not net.training
        raise KeyError("inside")
    assert all_hooks(net) == 0
    assert all(m.training for m in net.modules())


def test_training_mode_gives_eval_result_and_flags_restored():
    net = tiny_resnet()
    x = torch.randn(2, 1, 16, 16)
    expected = deconvnet(net, x, "layer2")
    net.train()
    net.layer1.bn1.eval()  # mixed state must survive
    flags = [m.training for m in net.modules()]
    stats = net.layer1.bn2.running_mean.clone()
    result = deconvnet(net, x, "layer2")
    assert [m.training for m in net.modules()] == flags
    assert torch.equal(net.layer1.bn2.running_mean, stats)  # no BatchNorm update
    torch.testing.assert_close(result.maps, expected.maps)


def test_thousand_calls_leave_no_hook_and_no_growth():
    net = hand_net(inplace=True)
    x = HAND_X.repeat(2, 1, 1, 1)

    def live_tensors() -> int:
        gc.collect()
        with warnings.catch_warnings():  # isinstance() pokes deprecated torch objects
            warnings.simplefilter("ignore")
            return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))

    for _ in range(20):  # warm-up: caches, lazy imports
        deconvnet(net, x, "relu2")
    before = live_tensors()
    for i in range(1000):
        engine = "autograd" if i % 3 == 0 else "windowed"
        result = deconvnet(net, x, "relu2" if i % 2 else "relu1", engine=engine)
    del result
    assert all_hooks(net) == 0
    assert live_tensors() <= before + 5


def test_layer_and_channel_arguments():
    net = hand_net()
    by_module = deconvnet(net, HAND_X, net.relu1, channels=1)
    assert by_module.layer == "relu1" and by_module.channels.tolist() == [1]
    torch.testing.assert_close(by_module.maps[0, 0, 0], HAND_RELU1[1])
    with pytest.raises(KeyError, match="no layer named"):
        deconvnet(net, HAND_X, "relu3")
    with pytest.raises(IndexError, match="out of range"):
        deconvnet(net, HAND_X, "relu1", channels=[0, 2])
    with pytest.raises(ValueError, match="N, c, H, W"):
        deconvnet(net, HAND_X[0], "relu1")
    with pytest.raises(ValueError, match="method"):
        project(net, HAND_X, "relu1", method="gradient")  # type: ignore[arg-type]


def test_batches_of_images_and_memory_bound_give_same_maps():
    net = tiny_resnet()
    x = torch.randn(5, 1, 16, 16)
    whole = deconvnet(net, x, "layer2")
    pieces = deconvnet(net, x, "layer2", image_batch=2, max_memory=64 * 2**10)
    torch.testing.assert_close(pieces.maps, whole.maps, rtol=0, atol=1e-6)
    assert pieces.maps.dtype == torch.float32 and pieces.units.dtype == torch.long


def test_inference_mode_caller():
    net = hand_net()
    with torch.inference_mode():
        result = deconvnet(net, HAND_X, "relu2")
    torch.testing.assert_close(result.maps[0, 0, 0], HAND_RELU2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["deconvnet", "guided_backprop"])
def test_cuda_matches_cpu(method):
    net = tiny_resnet()
    x = torch.randn(2, 1, 16, 16)
    cpu = project(net, x, "layer2", method=method)
    gpu = project(net.cuda(), x.cuda(), "layer2", method=method)
    assert gpu.maps.is_cuda
    assert torch.equal(gpu.units.cpu(), cpu.units)
    torch.testing.assert_close(gpu.maps.cpu(), cpu.maps, rtol=0,
                               atol=1e-5 * float(cpu.maps.abs().max()))


def test_project_figure_grid(zoo, tmp_path):
    from interp_fer.figures import project_figure
    from interp_fer.samples import sample_face

    model, _ = zoo["pyemotion"]
    figure = project_figure(model, sample_face("happy"), "conv_2", channels=[0, 5, 9],
                            method="guided_backprop")
    images = [ax for ax in figure.axes if ax.images]
    assert len(images) == 4  # the face and three projections
    figure.savefig(tmp_path / "projections.pdf")
    default = project_figure(model, sample_face("happy"), "conv_1", max_channels=4)
    assert sum(1 for ax in default.axes if ax.images) == 5


# ------------------------------------------------------------------------ rules, never silent


class Activated(nn.Module):
    """conv - activation - conv; the activation a module or a functional operation."""

    def __init__(self, act: nn.Module | None = None, functional=None) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.conv1 = nn.Conv2d(1, 3, 3)
        self.act = act if act is not None else nn.Identity()
        self.functional = functional
        self.conv2 = nn.Conv2d(3, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv1(x))
        if self.functional is not None:
            y = self.functional(y)
        return self.conv2(y)


MODULE_ACTIVATIONS = {"Tanh": nn.Tanh(), "LeakyReLU": nn.LeakyReLU(0.1), "ELU": nn.ELU(),
                      "GELU": nn.GELU(), "PReLU": nn.PReLU(), "SiLU": nn.SiLU(),
                      "Sigmoid": nn.Sigmoid()}
FUNCTIONAL_ACTIVATIONS = {
    "clamp": lambda y: y.clamp(min=0),
    "torch.maximum": lambda y: torch.maximum(y, torch.zeros_like(y)),
    "multiplication by a value of the data": lambda y: y * (y > 0),
    "tanh": torch.tanh,
}


@pytest.mark.parametrize("method", ["deconvnet", "guided_backprop"])
@pytest.mark.parametrize("kind", sorted(MODULE_ACTIVATIONS))
def test_module_nonlinearities_are_refused_by_name(kind, method):
    net = Activated(MODULE_ACTIVATIONS[kind]).eval()
    x = torch.randn(2, 1, 9, 9, generator=torch.Generator().manual_seed(8))
    with pytest.raises(RuleError, match=f"layer 'act' is {kind}.*method='saliency'"):
        project(net, x, "conv2", method=method)
    assert all_hooks(net) == 0
    below = project(net, x, "conv1", method=method)  # nothing nonlinear below conv1
    assert below.rules == {"conv1": "transposed convolution"}


@pytest.mark.parametrize("method", ["deconvnet", "guided_backprop"])
@pytest.mark.parametrize("kind", sorted(FUNCTIONAL_ACTIVATIONS))
def test_functional_nonlinearities_are_refused(kind, method):
    net = Activated(functional=FUNCTIONAL_ACTIVATIONS[kind]).eval()
    x = torch.randn(1, 1, 9, 9, generator=torch.Generator().manual_seed(8))
    with pytest.raises(RuleError, match=f"{re.escape(kind)}.*applied functionally"):
        project(net, x, "conv2", method=method)


def test_constant_scaling_is_linear_not_refused():
    net = Activated(functional=lambda y: y * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
                    - 0.5).eval()
    x = torch.randn(2, 1, 9, 9, generator=torch.Generator().manual_seed(8))
    result = deconvnet(net, x, "conv2")
    assert_matches_captum(net, x, result)


@pytest.mark.parametrize("engine", ENGINES)
def test_relu6_rule_known_answer(engine):
    # x = [-1, 3, 8] -> 1x1 conv (weight 1) -> ReLU6 -> [0, 3, 6] -> (1, 3) conv of ones: 9.
    net = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.ReLU6(),
                        nn.Conv2d(1, 1, (1, 3), bias=False)).eval()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[2].weight.fill_(1.0)
    x = torch.tensor([-1.0, 3.0, 8.0]).view(1, 1, 1, 3)
    deconv = project(net, x, "2", method="deconvnet", engine=engine)
    guided = project(net, x, "2", method="guided_backprop", engine=engine)
    assert deconv.values.tolist() == [[9.0]]
    assert deconv.maps.flatten().tolist() == [1.0, 1.0, 1.0]  # relu of the signal only
    assert guided.maps.flatten().tolist() == [0.0, 1.0, 0.0]  # and 0 < input < 6
    assert deconv.rules["1"].startswith("deconvnet ReLU rule")
    assert "0 < input < 6" in guided.rules["1"]
    assert list(guided.rules) == ["0", "1", "2"]


def test_rules_recorded_for_zoo_layers(zoo):
    model, x = zoo["pyemotion"]
    result = deconvnet(model.module, x, "conv_2", channels=[0])
    assert list(result.rules) == ["conv_1.0", "conv_1.1", "conv_1.2", "conv_1.3", "conv_2.0",
                                  "conv_2.1", "conv_2.2", "conv_2.3"]  # input first
    assert result.rules["conv_2.0"].startswith("padding")  # ReflectionPad2d
    assert result.rules["conv_2.1"] == "transposed convolution"
    assert result.rules["conv_2.2"] == "BatchNorm scale (running statistics)"
    assert result.rules["conv_2.3"] == "deconvnet ReLU rule: relu of the backward signal"
    model, x = zoo["mini-xception"]
    guided = project(model.module, x, "block1", [0], method="guided_backprop")
    kinds = set(guided.rules.values())
    assert "max-pool switches of the forward pass" in kinds
    assert "guided backprop: relu of the backward signal x (input > 0)" in kinds


def group_norm_net() -> nn.Sequential:
    torch.manual_seed(9)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3), nn.ReLU()).eval()


@pytest.mark.parametrize("forward_dtype", [torch.float64, None])
def test_group_norm_projects_and_fallback_is_said_once(forward_dtype):
    net = group_norm_net()
    x = torch.randn(3, 1, 14, 14, generator=torch.Generator().manual_seed(10))
    with pytest.warns(RuntimeWarning, match="autograd engine") as told:
        result = deconvnet(net, x, "5", forward_dtype=forward_dtype)
    assert len(told) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call says nothing
        deconvnet(net, x, "5", forward_dtype=forward_dtype)
    assert result.rules["1"] == "gradient (per-image normalisation statistics)"
    assert_matches_captum(net, x, result)
    alone = deconvnet(net, x[2:], "5", engine="autograd", forward_dtype=forward_dtype)
    torch.testing.assert_close(alone.maps[0], result.maps[2], rtol=0,
                               atol=1e-6 * float(result.maps[2].abs().max()))


def test_batchnorm_without_running_statistics_projects_each_image_alone():
    torch.manual_seed(11)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                        nn.ReLU(), nn.Conv2d(4, 3, 3), nn.ReLU()).eval()
    x = torch.randn(3, 1, 12, 12, generator=torch.Generator().manual_seed(12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the autograd engine runs
        together = deconvnet(net, x, "4")
        for image in range(3):
            alone = deconvnet(net, x[image:image + 1], "4")
            assert torch.equal(alone.units[0], together.units[image])
            torch.testing.assert_close(alone.maps[0], together.maps[image], rtol=0,
                                       atol=1e-6 * float(alone.maps.abs().max()))
    assert "each image projected on its own" in together.rules["1"]
    assert_matches_captum(net, x, together)  # Captum also sees one image at a time


def test_torchscript_models_are_refused_clearly():
    scripted = torch.jit.script(hand_net())
    with pytest.raises(TypeError, match="TorchScript.*eager nn.Module"):
        deconvnet(scripted, HAND_X, "relu2")
