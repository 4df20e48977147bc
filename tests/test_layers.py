"""Layer listing and receptive fields, checked against hand arithmetic and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from interp_fer.layers import format_layer_table, layer_table, receptive_field, resolve_layer


def _plain_net() -> nn.Module:
    # conv3 (pad 1) -> conv3 stride 2 (no pad) -> maxpool 2 -> conv 5 dilation 2
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(),
        nn.Conv2d(2, 2, 3, stride=2), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2, 2, 5, dilation=2, padding=1), nn.ReLU(),
    ).eval()


def test_receptive_field_by_hand():
    net = _plain_net()
    shape = (1, 64, 64)
    # Hand arithmetic (size, jump, offset of unit 0's centre):
    # conv3 p1: (3, 1, 0); conv3 s2: (5, 2, 1); pool2: (7, 4, 2); conv5 d2 p1: (7+8*4, 4, 2+(4-1)*4)
    expected = {"1": (3, 1, 0), "3": (5, 2, 1), "4": (7, 4, 2), "6": (39, 4, 14)}
    for layer, (size, stride, offset) in expected.items():
        field = receptive_field(net, layer, shape)
        assert (field.rows.size, field.rows.stride, field.rows.offset) == (size, stride, offset)
        assert field.cols == field.rows


def test_receptive_field_contains_gradient_support():
    # The gradient of a unit w.r.t. the input is zero outside its window: check with
    # positive weights (so no ReLU kills the signal) that the support equals the window.
    torch.manual_seed(0)
    net = _plain_net()
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.uniform_(module.weight, 0.1, 1.0)
            nn.init.constant_(module.bias, 0.1)
    shape = (1, 64, 64)
    field = receptive_field(net, "6", shape)
    x = torch.rand(1, *shape, requires_grad=True)
    out = net(x)
    row, col = 3, 4
    out[0, 0, row, col].backward()
    support = x.grad[0, 0].abs() > 0
    rows = torch.nonzero(support.any(dim=1)).flatten()
    cols = torch.nonzero(support.any(dim=0)).flatten()
    centre_row, centre_col = field.centre(row, col)
    half = (field.rows.size - 1) / 2
    assert rows.min() >= centre_row - half and rows.max() <= centre_row + half
    assert cols.min() >= centre_col - half and cols.max() <= centre_col + half


def test_zoo_stage_fields(mini_xception, pyemotion):
    fields = {row.name: row.receptive_field for row in
              layer_table(mini_xception.module, (1, 64, 64), mini_xception.stages)}
    assert fields["conv2"].rows.size == 5
    assert fields["block1"].rows.size == 11 and fields["block1"].rows.stride == 2
    # block3 pools 15 -> 8 with 'same' padding of one row on each side.
    assert fields["block3"].rows.offset == 5 and fields["block3"].rows.stride == 8
    assert fields["block4"].rows.size == 95
    assert fields["pool"] is None  # global pooling: not spatial
    py = receptive_field(pyemotion, "conv_4")
    assert (py.rows.size, py.rows.stride, py.rows.offset) == (17, 8, 0)


def test_unknown_geometry_is_none_not_wrong():
    class Upsampler(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3)
            self.up = nn.Upsample(scale_factor=2)

        def forward(self, x):
            return self.up(self.conv(x))

    with pytest.raises(ValueError, match="receptive field unknown"):
        receptive_field(Upsampler(), "up", (1, 16, 16))


def test_resolve_layer_suggests_names(pyemotion):
    assert resolve_layer(pyemotion.module, "conv_2.1") is pyemotion.module.conv_2[1]
    with pytest.raises(KeyError, match="did you mean conv_2"):
        resolve_layer(pyemotion.module, "conv2")


def test_table_lists_shapes_and_restores_training_flag(pyemotion):
    pyemotion.module.train()
    try:
        table = layer_table(pyemotion.module, (1, 48, 48), pyemotion.stages)
        assert pyemotion.module.training
    finally:
        pyemotion.module.eval()
    shapes = {row.name: row.output_shape for row in table}
    assert shapes["conv_3"] == (128, 12, 12) and shapes["linear"] == (7,)
    text = format_layer_table(table)
    assert "conv_4" in text and "RF size" in text


def test_negative_constant_padding_offsets_by_hand():
    # A crop of one pixel per side, then a 3x3 convolution: unit 0 sees input pixels 1..3,
    # centre 2 (the unsigned-integer pad once gave -1.8e19).
    net = nn.Sequential(nn.ConstantPad2d(-1, 0.0), nn.Conv2d(1, 1, 3), nn.ReLU()).eval()
    field = receptive_field(net, "1", (1, 12, 12))
    assert (field.rows.size, field.rows.stride, field.rows.offset) == (3, 1, 2)
    assert field.cols == field.rows
    mixed = nn.Sequential(nn.ConstantPad2d((2, -1, -3, 0), 0.0), nn.Conv2d(1, 1, 3)).eval()
    field = receptive_field(mixed, "1", (1, 12, 12))
    assert (field.rows.offset, field.cols.offset) == (4, -1)  # top crop 3, left pad 2


def test_average_pool_field_and_graph_reader_by_hand():
    from interp_fer.autograd_graph import node_kind, pad_params, pool_params
    from interp_fer.layers import module_default_stages

    # conv3 -> avgpool 3 stride 2 pad 1 (padding not counted: the weights change, not the
    # window) -> avgpool 2 (stride = kernel): (3, 1, 1) -> (3 + 2, 2, 1 + (1 - 1)) ->
    # (5 + 2, 4, 1 + 0.5 * 2).
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(),
                        nn.AvgPool2d(3, 2, 1, count_include_pad=False), nn.AvgPool2d(2),
                        nn.ConstantPad2d((1, -2, 0, 3), 0.0)).eval()
    expected = {"2": (5, 2, 1), "3": (7, 4, 2)}
    for layer, axis in expected.items():
        field = receptive_field(net, layer, (1, 20, 20))
        assert (field.rows.size, field.rows.stride, field.rows.offset) == axis
        assert field.cols == field.rows
    x = torch.zeros(1, 1, 20, 20, requires_grad=True)
    node = net(x).grad_fn  # the pad, then the second pool below it
    assert node_kind(node) == "ConstantPadNdBackward0"
    assert pad_params(node).pad == (1, -2, 0, 3)  # signed, not uint64
    pool = pool_params(node.next_functions[0][0])
    assert (pool.kernel, pool.stride, pool.padding, pool.dilation) == ((2, 2),) * 2 + ((0, 0),
                                                                                  (1, 1))
    first = pool_params(node.next_functions[0][0].next_functions[0][0])
    assert (first.kernel, first.stride, first.padding) == ((3, 3), (2, 2), (1, 1))
    assert not first.count_include_pad and first.divisor_override is None
    # Default stages from a bare module and input shape (no FERModel, no import of models).
    assert module_default_stages(net, (1, 20, 20)) == ("1",)


def test_layer_outputs_restores_each_modules_own_training_flag():
    from interp_fer.layers import layer_outputs

    net = _plain_net().train()
    net[2].eval()  # a frozen layer in a network being trained
    flags = [m.training for m in net.modules()]
    outputs = layer_outputs(net, ["1", "4"], torch.randn(1, 1, 64, 64))
    assert set(outputs) == {"1", "4"}
    assert [m.training for m in net.modules()] == flags


def test_torchscript_modules_refused_with_one_message():
    from interp_fer.layers import layer_outputs

    scripted = torch.jit.script(_plain_net())
    with pytest.raises(TypeError, match="TorchScript.*eager nn.Module"):
        layer_outputs(scripted, ["1"], torch.randn(1, 1, 64, 64))
    with pytest.raises(TypeError, match="TorchScript"):
        receptive_field(scripted, "1", (1, 64, 64))
