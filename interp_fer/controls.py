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
import hashlib

import numpy as np
import torch
from torch import nn

from .models import FERModel, with_module


def randomized_copy(model: FERModel, seed: int = 0) -> FERModel:
    """A copy of ``model`` with *every* parameter re-drawn at random (Adebayo et al. 2018).

    Each parameter tensor is replaced, whatever module holds it (convolutions of any kind,
    linear layers, normalisation affine terms, PReLU slopes, custom ``nn.Parameter`` s):

    * tensors of two or more dimensions (weights): Kaiming normal, ``N(0, 2 / fan_in)``
      (fan_in = elements of one output slice), which keeps activations in range through
      ReLU stacks;
    * one-dimensional tensors (biases, normalisation scales and shifts, slopes): drawn
      uniformly in ``mean +- spread``, where mean and spread are those of the trained tensor
      (for a bias near 0 that is a small symmetric draw; for a BatchNorm scale near 1 a
      draw around 1), so no channel is switched off or blown up by the redraw;
    * normalisation buffers (running mean / variance) are reset to 0 / 1.

    The control answers: would the analysis "find" the same AU detectors in a network that
    learned nothing? The draw is a function of ``seed`` and the parameter's name only.
    """
    module = copy.deepcopy(model.module).cpu()
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            generator = torch.Generator().manual_seed(
                int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:7], "big"))
            parameter.copy_(_redrawn(parameter, generator))
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._NormBase) and sub.track_running_stats:
                sub.reset_running_stats()
    module.to(model.device).eval()
    return with_module(model, module, name=f"{model.name} (randomized weights)")


def _redrawn(parameter: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    shape, dtype = parameter.shape, parameter.dtype
    if parameter.dim() >= 2:
        fan_in = max(parameter[0].numel(), 1)
        return (torch.randn(shape, generator=generator, dtype=torch.float64)
                * np.sqrt(2.0 / fan_in)).to(dtype)
    values = parameter.detach().double()
    mean = float(values.mean()) if values.numel() else 0.0
    spread = float((values - mean).abs().max()) if values.numel() > 1 else 0.0
    spread = max(spread, 1e-2 * max(abs(mean), 1.0))
    draw = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1
    return (mean + spread * draw).to(dtype)


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


class PlantedActivityDetectors(nn.Module):
    """Channels built to *detect* AUs: their response inside an AU's region follows its activity.

    A known-truth control for the detector test (DESIGN.md, "Controls and validation"). For
    every face it was built for, channel ``k``'s map at layer ``detector`` is
    ``strength * z_k(face) * region_k(face) + noise``: ``z_k`` the face's standardised
    activity of the channel's AU (from the same landmarks the mapping uses), ``region_k`` that
    AU's region on that face, ``noise`` uniform on (0, 1) and independent across positions.
    Layer ``coarse`` is the same maps max-pooled by ``pool``: at that resolution some regions
    nest (AU25's cells inside AU23's), which the test must still tell apart by activity.

    The network recognises a face by a digest of its (preprocessed) input, so it answers
    only for the faces it was built for; any other input (e.g. the probes that measure layer
    shapes and receptive fields) gets all-zero maps.

    Parameters
    ----------
    inputs
        (N, C, H, W) the preprocessed faces, exactly as the mapping will feed them.
    maps
        (N, K, H, W) the planted responses of those faces.
    n_classes
        Outputs of the head (so it stands wherever a FER model does).
    pool
        Pooling of the ``coarse`` layer.
    """

    def __init__(self, inputs: torch.Tensor, maps: torch.Tensor, n_classes: int,
                 pool: int = 8) -> None:
        super().__init__()
        self._rows = {self.digest(x): i for i, x in enumerate(inputs)}
        self.register_buffer("maps", maps.float())
        self.gate = nn.Conv2d(inputs.shape[1], maps.shape[1], kernel_size=1)
        self.detector = nn.Identity()
        self.coarse = nn.MaxPool2d(pool)
        self.head = nn.Linear(maps.shape[1], n_classes)
        with torch.no_grad():
            # The 1x1 convolution keeps the receptive field defined (one pixel per unit)
            # without letting image content in.
            self.gate.weight.zero_()
            self.gate.bias.zero_()

    @staticmethod
    def digest(x: torch.Tensor) -> str:
        """Key of one preprocessed face (its float32 values, rounded to 1e-4)."""
        values = torch.round(x.detach().float().cpu() * 1e4).to(torch.int64).numpy()
        return hashlib.sha256(values.tobytes()).hexdigest()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        planted = torch.zeros((len(x), *self.maps.shape[1:]), dtype=x.dtype, device=x.device)
        for i, face in enumerate(x):
            row = self._rows.get(self.digest(face))
            if row is not None:
                planted[i] = self.maps[row]
        maps = self.detector(self.gate(x) + planted)
        return self.head(self.coarse(maps).amax(dim=(2, 3)))


def planted_activity_model(model: FERModel, inputs: torch.Tensor, regions: np.ndarray,
                           activity: np.ndarray, strength: float = 3.0, seed: int = 0
                           ) -> FERModel:
    """``model``'s preprocessing around :class:`PlantedActivityDetectors`.

    Parameters
    ----------
    model
        Gives preprocessing, input size and class names.
    inputs
        (N, C, H, W) preprocessed faces.
    regions
        (N, K, H, W) boolean: the region of channel k's AU on each face.
    activity
        (N, K) the activity of channel k's AU on each face.
    strength
        Scale of the planted response (noise is uniform on (0, 1)).
    seed
        Seed of the noise.
    """
    rng = np.random.default_rng(seed)
    z = (activity - activity.mean(axis=0)) / np.where(activity.std(axis=0) > 0,
                                                      activity.std(axis=0), 1.0)
    noise = rng.random(regions.shape)
    maps = strength * (z[:, :, None, None] + 2.0) * regions + noise
    module = PlantedActivityDetectors(inputs, torch.as_tensor(maps), len(model.class_names))
    module.to(model.device).eval()
    planted = with_module(model, module, name=f"planted AU detectors ({model.name} input)")
    planted.stages = ("detector", "coarse")
    return planted


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
