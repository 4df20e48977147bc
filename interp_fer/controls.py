"""Control networks for the AU <-> channel mapping (DESIGN.md, "Significance and stability").

Three controls tell a reader what the mapping can and cannot show:

* :func:`randomized_copy`: the model with its learned weights re-drawn (Adebayo et al.
  2018). Whatever the analysis "finds" there comes from the images and the architecture,
  not from training.
* :func:`planted_model`: channels built to respond to known AU regions; the mapping must
  recover exactly those AUs.
* :func:`no_preference_model`: channels whose response has the same distribution at every
  position of the face; the mapping must find nothing beyond its false discovery rate.

The last two run on real faces through the whole pipeline (landmarks, crops, receptive
fields, statistics): they are ``nn.Module`` s with the input size, preprocessing and class
names of the model they are built from.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from .models import FERModel, with_module


def randomized_copy(model: FERModel, seed: int = 0) -> FERModel:
    """A copy of ``model`` with every learned weight re-drawn at random (Adebayo et al. 2018).

    Convolutions and linear layers get Kaiming-normal weights and zero biases; BatchNorm
    layers become the identity (unit scale, zero shift and running statistics), so
    activations keep a sane range. The control answers: would the analysis "find" the same
    AU detectors in a network that learned nothing?
    """
    generator = torch.Generator().manual_seed(seed)
    module = copy.deepcopy(model.module).cpu()
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Conv2d | nn.Linear):
                fan_in = sub.weight[0].numel()
                sub.weight.copy_(torch.randn(sub.weight.shape, generator=generator)
                                 * np.sqrt(2.0 / fan_in))
                if sub.bias is not None:
                    sub.bias.zero_()
            elif isinstance(sub, nn.modules.batchnorm._BatchNorm):
                sub.reset_parameters()
                sub.reset_running_stats()
    module.to(model.device).eval()
    return with_module(model, module, name=f"{model.name} (randomized weights)")


class PlantedDetectors(nn.Module):
    """Channel ``k`` responds to a fixed spatial template plus a weak image term.

    ``detector`` output (the layer to map): ``strength * templates[k] + pixels @ mix[k]``,
    on the input grid (one unit per pixel). A linear head makes it a classifier, so it can
    stand wherever a FER model does.

    Parameters
    ----------
    templates
        (K, H, W) non-negative maps; where each channel should respond.
    in_channels
        Channels of the network input.
    n_classes
        Outputs of the head.
    strength
        Scale of the planted response against the image term (pixel values are O(1)).
    """

    def __init__(self, templates: torch.Tensor, in_channels: int, n_classes: int,
                 strength: float = 4.0) -> None:
        super().__init__()
        k = templates.shape[0]
        self.register_buffer("templates", strength * templates.float())
        self.mix = nn.Conv2d(in_channels, k, kernel_size=1)
        self.detector = nn.Identity()
        self.head = nn.Linear(k, n_classes)
        with torch.no_grad():
            self.mix.weight.fill_(0.1)
            self.mix.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.detector(self.mix(x) + self.templates)
        return self.head(maps.amax(dim=(2, 3)))


class NoSpatialPreference(nn.Module):
    """Channels whose response has the same distribution at every position.

    ``detector`` output: per image, a hash of the whole image seeds a pseudo-random field,
    uniform on (0, 1) and independent across positions and channels; a different image
    gives an unrelated field. Nothing about a position (an AU region included) makes a
    channel respond more there, on any face.

    Parameters
    ----------
    channels
        Channels of the ``detector`` layer.
    input_shape
        (C, H, W) of the network input.
    n_classes
        Outputs of the head.
    seed
        Seed of the hash's fixed random parameters.
    """

    def __init__(self, channels: int, input_shape: tuple[int, int, int], n_classes: int,
                 seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        c, h, w = input_shape
        self.register_buffer("projection", torch.randn(c, h, w, generator=generator))
        self.register_buffer("frequency", 1.0 + 99.0 * torch.rand(channels, h, w,
                                                                  generator=generator))
        self.register_buffer("phase", 2 * np.pi * torch.rand(channels, h, w, generator=generator))
        # A 1x1 convolution with zero weight keeps the layer's receptive field defined (one
        # pixel per unit) without letting the image's local content in.
        self.local = nn.Conv2d(c, channels, kernel_size=1)
        self.detector = nn.Identity()
        self.head = nn.Linear(channels, n_classes)
        with torch.no_grad():
            self.local.weight.zero_()
            self.local.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x * self.projection).sum(dim=(1, 2, 3))  # one number per image
        angle = key[:, None, None, None] * self.frequency + self.phase
        noise = torch.frac(torch.sin(angle).abs() * 43758.5453)
        maps = self.detector(self.local(x) + noise)
        return self.head(maps.amax(dim=(2, 3)))


def mean_region_templates(landmarks: np.ndarray, aus: list[int], size: tuple[int, int]
                          ) -> np.ndarray:
    """Share of faces whose AU region covers each pixel: (A, H, W) in [0, 1].

    Parameters
    ----------
    landmarks
        (N, 68, 2) landmarks (x, y) on the network input grid
        (:func:`interp_fer.mapping.input_landmarks`).
    aus
        AU numbers.
    size
        (H, W) of the network input.
    """
    from .au_regions import load_au_regions

    regions = load_au_regions()
    total = np.zeros((len(aus), *size))
    for points in landmarks:
        masks = regions.masks(points, size, aus=list(aus))
        total += np.stack([masks[f"AU{au:02d}"] for au in aus])
    return total / max(len(landmarks), 1)


def planted_model(model: FERModel, templates: np.ndarray) -> FERModel:
    """``model``'s preprocessing around :class:`PlantedDetectors` (layer ``"detector"``)."""
    module = PlantedDetectors(torch.as_tensor(templates), model.preprocess.channels,
                              len(model.class_names))
    module.to(model.device).eval()
    planted = with_module(model, module, name=f"planted detectors ({model.name} input)")
    planted.stages = ("detector",)
    return planted


def no_preference_model(model: FERModel, channels: int = 8, seed: int = 0) -> FERModel:
    """``model``'s preprocessing around :class:`NoSpatialPreference` (layer ``"detector"``)."""
    shape = (model.preprocess.channels, *model.input_size)
    module = NoSpatialPreference(channels, shape, len(model.class_names), seed)
    module.to(model.device).eval()
    control = with_module(model, module, name=f"no spatial preference ({model.name} input)")
    control.stages = ("detector",)
    return control
