"""Turning images into the float tensor a FER network takes.

A model's preprocessing is a separate callable (:class:`Preprocessor`) so that attribution and
projection code works on the exact tensor the network sees, and so that images can be
prepared once and reused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# ITU-R BT.601 luma, as used by Pillow's "L" mode and OpenCV's RGB2GRAY.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def to_uint8_range(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as float32 on the 0-255 scale, with 1 or 3 channels last.

    Accepts (H, W), (H, W, 1), (H, W, 3) and (H, W, 4) arrays of uint8, uint16 (scaled by
    255/65535), bool, or float (taken to be on the 0-255 scale already when its maximum
    exceeds 1, else on 0-1). An alpha channel is dropped.

    Parameters
    ----------
    image
        One image.

    Returns
    -------
    numpy.ndarray
        float32, shape (H, W) or (H, W, 3), values in [0, 255].
    """
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32)
    if array.dtype == np.uint16:
        return array.astype(np.float32) * (255.0 / 65535.0)
    if array.dtype == bool:
        return array.astype(np.float32) * 255.0
    if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ValueError("image has non-finite pixel values")
        return array * 255.0 if array.max(initial=0.0) <= 1.0 else np.clip(array, 0, 255)
    raise ValueError(f"unsupported image dtype {array.dtype}")


def to_gray(image: np.ndarray) -> np.ndarray:
    """Convert an (H, W, 3) float image to (H, W) with BT.601 luma; (H, W) passes through."""
    if image.ndim == 2:
        return image
    return image @ LUMA_WEIGHTS


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Convert an (H, W) float image to (H, W, 3) by repetition; (H, W, 3) passes through."""
    if image.ndim == 3:
        return image
    return np.repeat(image[:, :, None], 3, axis=2)


@dataclass(frozen=True)
class Preprocessor:
    """Images in, network input out: colour conversion, resize, scaling and normalisation.

    ``x = (pixel / 255 - mean) / std`` after conversion to gray (BT.601) or RGB and a
    bilinear resize to ``size`` (half-pixel centres, antialiased when shrinking).

    Attributes
    ----------
    size
        (height, width) of the network input, in pixels.
    grayscale
        One input channel when true, three (RGB) otherwise.
    mean, std
        Per-channel normalisation on the [0, 1] scale (a float applies to every channel).

    Examples
    --------
    >>> import numpy as np
    >>> prep = Preprocessor(size=(48, 48), grayscale=True, mean=0.5, std=0.5)
    >>> prep([np.full((96, 96), 255, np.uint8)]).shape
    torch.Size([1, 1, 48, 48])
    """

    size: tuple[int, int]
    grayscale: bool = True
    mean: float | tuple[float, ...] = 0.0
    std: float | tuple[float, ...] = 1.0

    @property
    def channels(self) -> int:
        return 1 if self.grayscale else 3

    def image_tensor(self, image: np.ndarray) -> torch.Tensor:
        """Convert one image to a (c, H, W) float tensor on the 0-255 scale, not resized."""
        array = to_uint8_range(image)
        array = to_gray(array) if self.grayscale else to_rgb(array)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """Scale an (N, c, H, W) batch on the 0-255 scale to the network's input range."""
        mean = torch.as_tensor(self.mean, dtype=batch.dtype).reshape(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=batch.dtype).reshape(-1, 1, 1)
        return (batch / 255.0 - mean) / std

    def resize(self, tensor: torch.Tensor) -> torch.Tensor:
        """Resize a (c, h, w) tensor to ``size`` (bilinear, half-pixel centres)."""
        if tuple(tensor.shape[-2:]) == tuple(self.size):
            return tensor
        return F.interpolate(
            tensor[None], size=self.size, mode="bilinear", align_corners=False, antialias=True
        )[0]

    def __call__(self, images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """Preprocess one image or a sequence of images of any sizes.

        Parameters
        ----------
        images
            An (H, W[, C]) array, or a sequence of such arrays (each may differ in size), or
            an (N, H, W[, C]) array.

        Returns
        -------
        torch.Tensor
            float32 of shape (N, c, H, W), c = 1 (gray) or 3 (RGB).
        """
        if isinstance(images, np.ndarray) and (
            images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (1, 3, 4))
        ):
            images = [images]
        tensors = [self.resize(self.image_tensor(image)) for image in images]
        if not tensors:
            raise ValueError("no images to preprocess")
        return self.normalise(torch.stack(tensors))

    def to_pixels(self, batch: torch.Tensor) -> np.ndarray:
        """Invert :meth:`normalise`: (N, c, H, W) network input -> (N, H, W[, 3]) uint8 images."""
        mean = torch.as_tensor(self.mean, dtype=batch.dtype).reshape(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=batch.dtype).reshape(-1, 1, 1)
        pixels = ((batch.detach().cpu() * std + mean) * 255.0).round().clamp(0, 255)
        array = pixels.to(torch.uint8).numpy()
        return array[:, 0] if self.grayscale else array.transpose(0, 2, 3, 1)


@dataclass(frozen=True)
class Crop:
    """A rectangle of an image, possibly rotated, that becomes the network input after resizing.

    The rectangle has ``height`` x ``width`` pixels of the original image's scale. Unrotated
    (``angle == 0``) its pixel ``(r, c)`` is the image's pixel ``(top + r, left + c)``. Rotated,
    it turns by ``angle`` about its centre ``(left + (width - 1) / 2, top + (height - 1) / 2)``:
    its x axis points along ``(cos angle, sin angle)`` in the image (y down), so a face whose eye
    line is tilted by ``angle`` comes out level (:mod:`interp_fer.face_crops`).

    Attributes
    ----------
    top, left, height, width
        Integer pixel bounds in the original image before rotation (may extend past its
        borders; the outside is filled by edge replication).
    angle
        Rotation in degrees, clockwise on screen (image y points down); 0 for a plain crop.
    """

    top: int
    left: int
    height: int
    width: int
    angle: float = 0.0

    @classmethod
    def whole(cls, shape: tuple[int, ...]) -> Crop:
        """The whole image of shape (H, W[, C])."""
        return cls(0, 0, int(shape[0]), int(shape[1]))

    @classmethod
    def around(cls, box: tuple[float, float, float, float], margin: float = 0.3) -> Crop:
        """A square crop centred on a face box ``(left, top, right, bottom)`` in pixels,
        enlarged by ``margin`` times the box's larger side on every side."""
        left, top, right, bottom = box
        side = max(right - left, bottom - top) * (1 + 2 * margin)
        centre_x, centre_y = (left + right) / 2, (top + bottom) / 2
        size = max(int(round(side)), 1)
        return cls(int(round(centre_y - size / 2)), int(round(centre_x - size / 2)), size, size)

    @property
    def centre(self) -> np.ndarray:
        """(x, y) of the crop's centre in the original image (pixel centres at integers)."""
        return np.array([self.left + (self.width - 1) / 2, self.top + (self.height - 1) / 2])

    def _rotation(self) -> np.ndarray:
        theta = np.deg2rad(self.angle)
        return np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])

    def to_crop(self, xy: np.ndarray) -> np.ndarray:
        """Map (..., 2) (x, y) of the original image to (x, y) pixel coordinates of the crop."""
        xy = np.asarray(xy, dtype=np.float64)
        if self.angle == 0:
            return xy - np.array([self.left, self.top], dtype=np.float64)
        inner = np.array([(self.width - 1) / 2, (self.height - 1) / 2])
        # row vectors: p_crop = R^T (xy - centre) + inner
        return (xy - self.centre) @ self._rotation() + inner

    def from_crop(self, xy: np.ndarray) -> np.ndarray:
        """Map (..., 2) (x, y) pixel coordinates of the crop back to the original image."""
        xy = np.asarray(xy, dtype=np.float64)
        if self.angle == 0:
            return xy + np.array([self.left, self.top], dtype=np.float64)
        inner = np.array([(self.width - 1) / 2, (self.height - 1) / 2])
        return (xy - inner) @ self._rotation().T + self.centre

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Cut the crop out of an (H, W[, C]) image, replicating edges beyond its borders.

        A rotated crop is sampled bilinearly at the original scale (the network's resize comes
        after); the result keeps the image's dtype (uint8 values are rounded).
        """
        if self.angle != 0:
            return self._apply_rotated(image)
        height, width = image.shape[:2]
        pad = [(max(0, -self.top), max(0, self.top + self.height - height)),
               (max(0, -self.left), max(0, self.left + self.width - width))]
        pad += [(0, 0)] * (image.ndim - 2)
        padded = np.pad(image, pad, mode="edge") if any(p != (0, 0) for p in pad) else image
        top, left = self.top + pad[0][0], self.left + pad[1][0]
        return padded[top:top + self.height, left:left + self.width]

    def _apply_rotated(self, image: np.ndarray) -> np.ndarray:
        from scipy.ndimage import map_coordinates

        rows, cols = np.mgrid[0:self.height, 0:self.width]
        source = self.from_crop(np.stack([cols, rows], axis=-1).astype(np.float64))
        coords = [source[..., 1], source[..., 0]]  # (row, col) order for scipy
        array = np.asarray(image)
        planes = [array] if array.ndim == 2 else [array[..., k] for k in range(array.shape[2])]
        out = [map_coordinates(p.astype(np.float64), coords, order=1, mode="nearest")
               for p in planes]
        result = out[0] if array.ndim == 2 else np.stack(out, axis=-1)
        if np.issubdtype(array.dtype, np.integer):
            info = np.iinfo(array.dtype)
            result = np.clip(np.round(result), info.min, info.max)
        return result.astype(array.dtype)

    def to_input(self, xy: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Map (x, y) pixel coordinates of the original image to the network input grid.

        Pixel centres sit at integers and resizing uses half-pixel centres, so with ``(x', y')``
        the point in the crop's own pixel frame (:meth:`to_crop`; ``x - left`` unrotated),
        ``u = (x' + 0.5) * W_in / width - 0.5`` (and likewise for y).

        Parameters
        ----------
        xy
            (..., 2) coordinates (x, y) in the original image.
        size
            (H_in, W_in) of the network input.
        """
        scale = np.array([size[1] / self.width, size[0] / self.height])
        return (self.to_crop(xy) + 0.5) * scale - 0.5
