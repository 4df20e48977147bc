"""Network architectures of the zoo models, written in PyTorch.

The weights come from published distribution files (see :mod:`interp_fer.zoo`); only the
architectures live here. Module names are chosen so that the dotted paths of
``named_modules()`` are the layer names used everywhere in the toolkit
(``interp-fer layers --model M`` lists them).

Every activation is an ``nn.ReLU`` module (never functional, never in place) so that hook
based attribution (deconvnet, guided backprop) sees each one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

KERAS_BN_EPSILON = 1e-3


class SamePadMaxPool2d(nn.Module):
    """Max-pooling with TensorFlow/Keras ``padding='same'`` semantics.

    TensorFlow pads so that ``out = ceil(in / stride)`` and, when the total padding is odd,
    puts the extra row/column at the bottom/right; PyTorch's symmetric ``padding`` cannot
    express that, so the input is padded explicitly with ``-inf`` (never selected by the max)
    before an unpadded :class:`torch.nn.MaxPool2d`.

    Parameters
    ----------
    kernel_size, stride
        Pooling window and stride (square).
    """

    def __init__(self, kernel_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.pool = nn.MaxPool2d(kernel_size, stride)

    def _pads(self, size: int) -> tuple[int, int]:
        out = math.ceil(size / self.stride)
        total = max((out - 1) * self.stride + self.kernel_size - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self._pads(x.shape[-2])
        left, right = self._pads(x.shape[-1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return self.pool(x)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding='same'"


class SeparableConv2d(nn.Module):
    """Keras ``SeparableConv2D`` (depth multiplier 1, 'same' padding, no bias).

    A depthwise 3x3 convolution followed by a pointwise 1x1 convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(
            in_channels, in_channels, kernel_size, padding=kernel_size // 2,
            groups=in_channels, bias=False,
        )
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class ConvBNReLU(nn.Module):
    """Unpadded 3x3 convolution (no bias), BatchNorm and ReLU: the mini-Xception stem."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=KERAS_BN_EPSILON)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class XceptionBlock(nn.Module):
    """Residual block of mini-Xception.

    Main path: separable conv, BN, ReLU, separable conv, BN, 'same' 3x3/2 max-pool.
    Shortcut: 1x1/2 convolution and BN. The block's output is their sum (no ReLU after it,
    as in the original).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.sep1 = SeparableConv2d(in_channels, out_channels)
        self.bn1 = nn.BatchNorm2d(out_channels, eps=KERAS_BN_EPSILON)
        self.relu = nn.ReLU()
        self.sep2 = SeparableConv2d(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=KERAS_BN_EPSILON)
        self.pool = SamePadMaxPool2d(3, 2)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(out_channels, eps=KERAS_BN_EPSILON)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = self.pool(self.bn2(self.sep2(self.relu(self.bn1(self.sep1(x))))))
        return main + self.shortcut_bn(self.shortcut(x))


class MiniXception(nn.Module):
    """mini-Xception (Arriaga, Valdenegro-Toro & Ploeger 2017), FER2013 variant.

    Input: N x 1 x 64 x 64, pixels scaled to [-1, 1]. Output: N x 7 logits (the original
    applies a softmax after global average pooling; here the softmax is left to the caller).

    Parameters
    ----------
    num_classes
        Number of output classes.
    in_channels
        Input channels (1 for the published model).
    widths
        Output channels of the four residual blocks.
    """

    #: Layers analysed by default (:func:`interp_fer.layers.default_stages`), whether the
    #: network comes from the zoo or from a state_dict checkpoint.
    default_stages = ("conv1", "conv2", "block1", "block2", "block3", "block4")

    def __init__(
        self,
        num_classes: int = 7,
        in_channels: int = 1,
        widths: tuple[int, ...] = (16, 32, 64, 128),
    ) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(in_channels, 8)
        self.conv2 = ConvBNReLU(8, 8)
        blocks = []
        previous = 8
        for width in widths:
            blocks.append(XceptionBlock(previous, width))
            previous = width
        self.block1, self.block2, self.block3, self.block4 = blocks
        self.classifier = nn.Conv2d(previous, num_classes, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.conv1(x))
        x = self.block4(self.block3(self.block2(self.block1(x))))
        return self.pool(self.classifier(x)).flatten(1)


def _reflect_conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    # Same child order as PyEmotion's NetworkV2 so that its state_dict keys load unchanged.
    return nn.Sequential(
        nn.ReflectionPad2d(1),
        nn.Conv2d(in_channels, out_channels, 3, stride=stride),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class PyEmotionNet(nn.Module):
    """NetworkV2 of PyEmotion 1.0.0: four reflection-padded conv blocks and two linear layers.

    Input: N x 1 x 48 x 48, pixels scaled to [-1, 1]. Output: N x 7 logits (the published
    network ends with a Sigmoid, dropped here: it is monotonic, so the predicted class is
    unchanged).

    Parameters
    ----------
    num_classes
        Number of output classes.
    in_channels
        Input channels (1 for the published model).
    width
        Channels of the first block; the next ones double it.
    input_size
        Side of the square input, which fixes the first linear layer's size.
    """

    #: Layers analysed by default, from the zoo or from a state_dict checkpoint.
    default_stages = ("conv_1", "conv_2", "conv_3", "conv_4")

    def __init__(
        self, num_classes: int = 7, in_channels: int = 1, width: int = 32, input_size: int = 48
    ) -> None:
        super().__init__()
        self.conv_1 = _reflect_conv_block(in_channels, width, 1)
        self.conv_2 = _reflect_conv_block(width, 2 * width, 2)
        self.conv_3 = _reflect_conv_block(2 * width, 4 * width, 2)
        self.conv_4 = _reflect_conv_block(4 * width, 8 * width, 2)
        side = input_size
        for _ in range(3):
            side = (side - 1) // 2 + 1
        self.linear = nn.Sequential(
            nn.Linear(8 * width * side * side, 256),
            nn.ReLU(),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_4(self.conv_3(self.conv_2(self.conv_1(x))))
        return self.linear(x.flatten(1))
