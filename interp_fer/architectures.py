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


# ImageNet-style RGB networks (the seed work fine-tunes these on expression datasets).
# Their module structure is torchvision's (``features.N`` / ``classifier.N`` for VGG,
# ``conv1 ... layer4.B.conv2 ... fc`` for ResNet), so a state_dict fine-tuned with torchvision
# loads unchanged; torchvision itself is not needed (it does not import beside this torch).
# Every ReLU is its own non-in-place module, so the projection rules see each one.

#: ImageNet normalisation (on the [0, 1] scale) that these networks expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_VGG16_CONFIG = (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M")


class VGG16(nn.Module):
    """VGG-16 (configuration D; Simonyan & Zisserman 2015), torchvision layout, no batch norm.

    Input: N x 3 x S x S RGB, ImageNet normalisation (:data:`IMAGENET_MEAN`/:data:`IMAGENET_STD`
    after scaling to [0, 1]); S = 224 for the published networks. Output: N x ``num_classes``
    logits.

    Parameters
    ----------
    num_classes
        Output classes (7 for FER2013).
    width
        Channels of the first stage (64 in VGG-16); the stages have 1, 2, 4, 8, 8 times it.
    hidden
        Units of the two hidden fully connected layers (default 64 x ``width``: 4096).
    input_size
        Side of the square input, in pixels (recorded for :func:`interp_fer.load_model`).
    in_channels
        Input channels.
    dropout
        Dropout probability of the classifier (inactive in eval mode).

    Attributes
    ----------
    default_stages
        The last ReLU of each of the five stages (before each max-pool):
        ``features.3, .8, .15, .22, .29`` (conv1_2, conv2_2, conv3_3, conv4_3, conv5_3).
    """

    default_stages = ("features.3", "features.8", "features.15", "features.22", "features.29")

    def __init__(self, num_classes: int = 7, width: int = 64, hidden: int | None = None,
                 input_size: int = 224, in_channels: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for entry in _VGG16_CONFIG:
            if entry == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(previous, entry * width, 3, padding=1), nn.ReLU()]
                previous = entry * width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        hidden = hidden or 64 * width
        self.classifier = nn.Sequential(
            nn.Linear(previous * 7 * 7, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        self.input_chw = (in_channels, input_size, input_size)
        self.normalisation = (IMAGENET_MEAN, IMAGENET_STD) if in_channels == 3 else (0.5, 0.5)
        _init_imagenet_style(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with batch norm, identity or 1x1 shortcut.

    ``relu1``/``relu2`` are separate modules (torchvision reuses one ``relu``; a module called
    twice would make its output ambiguous for hooks). The block output is ``relu2``'s.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + shortcut)


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016), torchvision layout (state_dict keys load unchanged).

    Input: N x 3 x S x S RGB, ImageNet normalisation; S = 224 for the published networks.
    Output: N x ``num_classes`` logits.

    Parameters
    ----------
    num_classes
        Output classes (7 for FER2013).
    width
        Channels of the first stage (64 in ResNet-18); the stages have 1, 2, 4, 8 times it.
    input_size
        Side of the square input, in pixels (recorded for :func:`interp_fer.load_model`).
    in_channels
        Input channels.

    Attributes
    ----------
    default_stages
        The stem's ReLU and the output of each of the four stages:
        ``relu, layer1, layer2, layer3, layer4``.
    """

    default_stages = ("relu", "layer1", "layer2", "layer3", "layer4")

    def __init__(self, num_classes: int = 7, width: int = 64, input_size: int = 224,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        previous = width
        for index, (multiple, stride) in enumerate(((1, 1), (2, 2), (4, 2), (8, 2)), start=1):
            blocks = nn.Sequential(BasicBlock(previous, multiple * width, stride),
                                   BasicBlock(multiple * width, multiple * width))
            self.add_module(f"layer{index}", blocks)
            previous = multiple * width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(previous, num_classes)
        self.input_chw = (in_channels, input_size, input_size)
        self.normalisation = (IMAGENET_MEAN, IMAGENET_STD) if in_channels == 3 else (0.5, 0.5)
        _init_imagenet_style(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def _init_imagenet_style(network: nn.Module) -> None:
    # torchvision's initialisation (Kaiming for convolutions, N(0, 0.01) for linear layers):
    # random-weight experiments then see activations of the usual scale at every depth.
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)


RGB_ARCHITECTURES = {"vgg16": VGG16, "resnet18": ResNet18}
