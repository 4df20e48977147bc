"""Loading trained FER networks: :func:`load_model` and the :class:`FERModel` it returns.

Sources, tried in this order:

1. a zoo name (``"mini-xception"``, ``"pyemotion"``; see :mod:`interp_fer.zoo`);
2. a Keras file (``.h5``/``.hdf5``/``.keras``, see :mod:`interp_fer.keras_import`) or an
   ONNX file (``.onnx``, see :mod:`interp_fer.onnx_import`), converted to a torch module
   (a final softmax is dropped so the network returns logits; input size and channels come
   from the file, normalisation from ``mean``/``std``);
3. a TorchScript file (``torch.jit.save``);
4. a state_dict checkpoint plus ``architecture="package.module:Class"`` and keyword arguments;
5. a whole pickled ``nn.Module``, only with ``allow_pickle=True``.

Checkpoints are read with ``torch.load(weights_only=True)``: unpickling a whole module runs
arbitrary code from the file, so it is never done unless asked for.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .architectures import IMAGENET_MEAN, IMAGENET_STD, RGB_ARCHITECTURES
from .preprocessing import Preprocessor
from .zoo import FER2013_CLASSES, ZOO, zoo_state_dict


class ModelLoadError(ValueError):
    """A model source could not be turned into a usable network; the message says why."""


@dataclass
class FERModel:
    """A trained FER network and everything needed to feed it.

    Attributes
    ----------
    module
        The network, in eval mode; takes an already preprocessed float tensor
        (N, c, H, W) and returns (N, n_classes) logits.
    preprocess
        Images in, network input out (see :class:`~interp_fer.preprocessing.Preprocessor`).
    class_names
        Names of the output classes, in output order.
    name
        A short name for reports (zoo name or file stem).
    stages
        Layer names of the convolutional stages analysed by default (forward order).
    source
        Where the model came from.
    """

    module: nn.Module
    preprocess: Preprocessor
    class_names: tuple[str, ...] = FER2013_CLASSES
    name: str = "model"
    stages: tuple[str, ...] = ()
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the network input, in pixels."""
        return self.preprocess.size

    @property
    def grayscale(self) -> bool:
        """Whether the network takes a single (gray) channel."""
        return self.preprocess.grayscale

    @property
    def device(self) -> torch.device:
        for tensor in self.module.parameters():
            return tensor.device
        return torch.device("cpu")

    def to(self, device: str | torch.device) -> FERModel:
        """Move the network to ``device`` (in place) and return self."""
        self.module.to(device)
        return self

    def logits(self, images: np.ndarray | Sequence[np.ndarray], batch_size: int = 256,
               crop: str = "none") -> np.ndarray:
        """Class logits for raw images, shape (N, n_classes), float32.

        ``crop``: ``"none"`` feeds each image whole (face crops such as FER2013's);
        ``"auto"`` or ``"face"`` passes photos through the face pipeline first (detect, choose,
        align on the eye line, crop with the model's framing: :mod:`interp_fer.face_crops`).
        """
        if crop != "none":
            from .face_crops import FacePipeline

            images = FacePipeline(crop, self.input_size)(list(images))
        batch = self.preprocess(images)
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(batch), batch_size):
                chunk = batch[start:start + batch_size].to(self.device)
                outputs.append(self.module(chunk).float().cpu())
        return torch.cat(outputs).numpy()

    def predict_proba(self, images: np.ndarray | Sequence[np.ndarray],
                      crop: str = "none") -> np.ndarray:
        """Class probabilities (softmax of the logits), shape (N, n_classes); ``crop`` as in
        :meth:`logits`."""
        return torch.softmax(torch.from_numpy(self.logits(images, crop=crop)), dim=1).numpy()

    def predict(self, images: np.ndarray | Sequence[np.ndarray], crop: str = "none") -> list[str]:
        """Predicted class name of each image; ``crop`` as in :meth:`logits`."""
        return [self.class_names[i] for i in self.logits(images, crop=crop).argmax(axis=1)]

    def __repr__(self) -> str:
        n_params = sum(p.numel() for p in self.module.parameters())
        colour = "gray" if self.grayscale else "RGB"
        return (
            f"FERModel(name={self.name!r}, input={self.input_size[0]}x{self.input_size[1]} "
            f"{colour}, classes={list(self.class_names)}, parameters={n_params:,}, "
            f"stages={list(self.stages)})"
        )


def check_finite(module: nn.Module, source: str) -> None:
    """Raise :class:`ModelLoadError` listing every parameter/buffer with NaN or inf values."""
    bad = [
        name for name, tensor in [*module.named_parameters(), *module.named_buffers()]
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if bad:
        raise ModelLoadError(f"{source}: non-finite weights (NaN or inf) in: {', '.join(bad)}")


def check_state_dict(module: nn.Module, state: Mapping[str, Any], source: str) -> None:
    """Raise :class:`ModelLoadError` listing every mismatch between ``state`` and ``module``.

    Reports, all at once: missing keys, unexpected keys, shape mismatches, non-tensor entries
    and tensors with NaN or inf.
    """
    expected = module.state_dict()
    problems = []
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    for key, value in state.items():
        if key not in expected:
            continue
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key}: not a tensor ({type(value).__name__})")
        elif value.shape != expected[key].shape:
            problems.append(
                f"shape mismatch for {key}: checkpoint {tuple(value.shape)}, "
                f"model {tuple(expected[key].shape)}"
            )
        elif value.is_floating_point() and not torch.isfinite(value).all():
            problems.append(f"non-finite values (NaN or inf) in {key}")
    if problems:
        raise ModelLoadError(f"{source}: the checkpoint does not fit the architecture:\n  - "
                             + "\n  - ".join(problems))


def import_architecture(spec: str, kwargs: Mapping[str, Any] | str | None = None) -> nn.Module:
    """Build an untrained network from ``"package.module:Class"`` and keyword arguments.

    Parameters
    ----------
    spec
        Import path and class (or factory function) name, separated by a colon.
    kwargs
        Keyword arguments, as a mapping or a JSON object string.
    """
    if ":" not in spec:
        raise ModelLoadError(f"architecture {spec!r} must look like 'package.module:Class'")
    module_name, _, attribute = spec.partition(":")
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as error:
            raise ModelLoadError(f"architecture arguments are not valid JSON: {error}") from error
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ModelLoadError("architecture arguments must be a JSON object (keyword arguments)")
    try:
        factory = getattr(_import_from_cwd_too(module_name), attribute)
    except ImportError as error:
        raise ModelLoadError(f"cannot import {module_name!r} for architecture {spec!r}: {error}") from error
    except AttributeError as error:
        raise ModelLoadError(f"{module_name!r} has no attribute {attribute!r}") from error
    try:
        network = factory(**dict(kwargs or {}))
    except TypeError as error:
        raise ModelLoadError(f"cannot build {spec} with arguments {dict(kwargs or {})}: {error}") from error
    if not isinstance(network, nn.Module):
        raise ModelLoadError(f"{spec} returned {type(network).__name__}, not a torch.nn.Module")
    return network


def _import_from_cwd_too(module_name: str) -> Any:
    """Import ``module_name``; when it is not found, look in the current folder as well.

    ``interp-fer`` is an installed script, so unlike ``python script.py`` its ``sys.path``
    lacks the folder it runs in; the folder is tried after everything else (an installed
    package of the same name wins) and only for this import.
    """
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        top = module_name.partition(".")[0]
        cwd = os.getcwd()
        if error.name != top or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        try:
            return importlib.import_module(module_name)
        finally:
            sys.path.remove(cwd)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _extract_state_dict(checkpoint: Any, source: str) -> Mapping[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping):
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return checkpoint
        for key in ("state_dict", "model_state_dict", "model", "network", "net"):
            if isinstance(checkpoint.get(key), Mapping):
                return checkpoint[key]
    raise ModelLoadError(
        f"{source}: no state_dict found (expected a mapping of tensors, or one under "
        f"'state_dict', 'model_state_dict', 'model', 'network' or 'net'); got "
        f"{type(checkpoint).__name__}"
        + (f" with keys {list(checkpoint)[:10]}" if isinstance(checkpoint, Mapping) else "")
    )


def _load_module_from_file(
    path: Path, architecture: str | None, arch_kwargs: Mapping[str, Any] | str | None,
    allow_pickle: bool, strict: bool,
) -> nn.Module:
    source = str(path)
    if not path.is_file():
        raise ModelLoadError(f"{source}: no such file (and not a zoo model: {', '.join(sorted(ZOO))})")
    if path.suffix.lower() in (".h5", ".hdf5", ".keras", ".onnx"):
        return _import_foreign(path)
    if _is_torchscript(path):
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as error:
            raise ModelLoadError(f"{source}: not a loadable TorchScript archive: {error}") from error
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, or a custom class in the pickle
        if not allow_pickle:
            if not zipfile.is_zipfile(path) and not _looks_like_pickle(path):
                raise ModelLoadError(f"{source}: not a PyTorch checkpoint ({error})") from error
            raise ModelLoadError(
                f"{source}: this file is not a plain state_dict; it holds pickled Python objects "
                "(likely a whole nn.Module), which can only be loaded by executing code from the "
                "file. That is unsafe for files you did not create. If you trust it, pass "
                "allow_pickle=True (CLI: --allow-pickle); better, save "
                "`model.state_dict()` and load it with architecture='package.module:Class'. "
                f"(safe loader said: {str(error).splitlines()[0]})"
            ) from error
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(checkpoint, nn.Module):  # only the allow_pickle path can return one
        return checkpoint
    state = _extract_state_dict(checkpoint, source)
    if architecture is None:
        raise ModelLoadError(
            f"{source} is a state_dict ({len(state)} tensors): give the architecture that it "
            "belongs to, e.g. architecture='mypackage.nets:MyNet' with arch_kwargs={...} "
            "(CLI: --architecture mypackage.nets:MyNet --arch-kwargs '{...}')"
        )
    network = import_architecture(architecture, arch_kwargs)
    if strict:
        check_state_dict(network, state, source)
        network.load_state_dict(state)
    else:
        network.load_state_dict(state, strict=False)
    return network


def _import_foreign(path: Path) -> nn.Module:
    # Keras and ONNX files become torch modules with a logits output and an ``input_chw``.
    if path.suffix.lower() == ".onnx":
        from .onnx_import import OnnxImportError, onnx_to_torch

        try:
            return onnx_to_torch(path, drop_final_softmax=True)
        except OnnxImportError as error:
            raise ModelLoadError(str(error)) from error
    from .keras_import import KerasImportError, keras_to_torch

    try:
        return keras_to_torch(path, drop_final_softmax=True)
    except KerasImportError as error:
        raise ModelLoadError(str(error)) from error


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(2)
    return head[:1] == b"\x80"


def load_model(
    source: str | os.PathLike,
    *,
    architecture: str | None = None,
    arch_kwargs: Mapping[str, Any] | str | None = None,
    class_names: Sequence[str] | None = None,
    input_size: int | tuple[int, int] | None = None,
    grayscale: bool | None = None,
    mean: float | tuple[float, ...] | None = None,
    std: float | tuple[float, ...] | None = None,
    stages: Sequence[str] | None = None,
    allow_pickle: bool = False,
    strict: bool = True,
    weights_file: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> FERModel:
    """Load a trained FER network with its preprocessing and class names.

    Parameters
    ----------
    source
        A zoo name (see :func:`interp_fer.zoo.zoo_names`) or a path to a Keras file
        (``.h5``/``.hdf5``/``.keras``), an ONNX file (``.onnx``), a TorchScript file, a
        state_dict checkpoint (with ``architecture``) or a pickled module (with
        ``allow_pickle``).
    architecture, arch_kwargs
        ``"package.module:Class"`` and its keyword arguments (mapping or JSON string), for
        state_dict checkpoints.
    class_names
        Output class names in order; default: the FER2013 order (angry, disgust, fear,
        happy, sad, surprise, neutral).
    input_size
        Network input side or (height, width) in pixels; default 48 (zoo: the model's own;
        Keras/ONNX files and the architectures of :mod:`interp_fer.architectures`: the input
        shape they record).
    grayscale
        One input channel (default) or RGB (default for Keras/ONNX files: from their input
        shape).
    mean, std
        Normalisation after scaling pixels to [0, 1]; default 0 and 1 (zoo: the model's own;
        :class:`~interp_fer.architectures.VGG16`/:class:`~interp_fer.architectures.ResNet18`:
        ImageNet's). Keras and ONNX files do not record their preprocessing: give it.
    stages
        Layer names analysed by default; default: every ReLU stage with a spatial output.
    allow_pickle
        Permit unpickling a whole module (executes code from the file).
    strict
        Require checkpoint keys and shapes to match the architecture exactly.
    weights_file
        For zoo models on machines without network: the distribution wheel or the weights
        file inside it.
    device
        Where to put the network.

    Returns
    -------
    FERModel
        In eval mode, on ``device``.

    Raises
    ------
    ModelLoadError
        With a message that names the file and every problem found.
    interp_fer.distributions.FetchError
        When zoo weights cannot be fetched.

    Examples
    --------
    >>> model = load_model("mini-xception")                      # doctest: +SKIP
    >>> model.predict(images)                                    # doctest: +SKIP
    """
    name = str(source)
    if name in ZOO:
        if any(v is not None for v in (input_size, grayscale, mean, std, architecture)):
            raise ModelLoadError(f"zoo model {name} has a fixed architecture and preprocessing")
        entry = ZOO[name]
        network = entry.build()
        state = zoo_state_dict(name, local_file=weights_file)
        check_state_dict(network, state, f"zoo model {name}")
        network.load_state_dict(state)
        prep = Preprocessor(entry.input_size, entry.grayscale, entry.mean, entry.std)
        model = FERModel(
            network, prep, entry.class_names, name, entry.stages, entry.reference,
            {"distribution": entry.distribution.requirement},
        )
    else:
        path = Path(source).expanduser()
        network = _load_module_from_file(path, architecture, arch_kwargs, allow_pickle, strict)
        check_finite(network, str(path))
        # Keras/ONNX imports and the RGB architectures know their input.
        chw = getattr(network, "input_chw", None)
        size = input_size if input_size is not None else (tuple(chw[1:]) if chw else 48)
        size = (size, size) if isinstance(size, int) else tuple(size)
        if grayscale is None and chw:
            grayscale = chw[0] == 1
        norm = getattr(network, "normalisation", None)  # e.g. ImageNet mean/std of VGG16
        if norm is not None and mean is None and std is None:
            mean, std = norm
        prep = Preprocessor(
            size, True if grayscale is None else grayscale,
            0.0 if mean is None else mean, 1.0 if std is None else std,
        )
        model = FERModel(network, prep, tuple(class_names or FER2013_CLASSES), path.stem,
                         (), str(path), {"architecture": architecture})
    if class_names is not None and name in ZOO:
        model.class_names = tuple(class_names)
    model.module.eval().to(device)
    if stages is not None:
        model.stages = tuple(stages)
    elif not model.stages:
        from .layers import module_default_stages

        model.stages = module_default_stages(model.module, (model.preprocess.channels,
                                                            *model.input_size))
    _check_class_count(model)
    return model


def _check_class_count(model: FERModel) -> None:
    probe = torch.zeros(1, model.preprocess.channels, *model.input_size, device=model.device)
    try:
        with torch.inference_mode():
            output = model.module(probe)
    except Exception as error:
        raise ModelLoadError(
            f"{model.source}: the network fails on a {model.preprocess.channels}x"
            f"{model.input_size[0]}x{model.input_size[1]} input ({error}); check input_size "
            "and grayscale"
        ) from error
    if not isinstance(output, torch.Tensor) or output.ndim != 2:
        raise ModelLoadError(
            f"{model.source}: expected (N, n_classes) logits, got "
            f"{tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__}"
        )
    if output.shape[1] != len(model.class_names):
        raise ModelLoadError(
            f"{model.source}: the network has {output.shape[1]} outputs but "
            f"{len(model.class_names)} class names were given: {list(model.class_names)}"
        )


def with_module(model: FERModel, module: nn.Module, name: str | None = None) -> FERModel:
    """Return a copy of ``model`` that wraps another network with the same preprocessing."""
    return replace(model, module=module, name=name or model.name)


def rgb_model(name: str = "resnet18", *, num_classes: int = 7, width: int = 64,
              input_size: int = 224, class_names: tuple[str, ...] | None = None,
              seed: int = 0, device: str | torch.device = "cpu") -> FERModel:
    """A randomly initialised VGG-16 or ResNet-18 as a FERModel, for random-weight experiments.

    Parameters
    ----------
    name
        ``"vgg16"`` or ``"resnet18"``.
    num_classes, width, input_size
        See :class:`VGG16` / :class:`ResNet18`.
    class_names
        Output class names (default: the FER2013 order when ``num_classes`` is 7, else
        ``class0 ...``).
    seed
        Seed of the initialisation (the same seed gives the same weights).
    device
        Where to put the network.

    Returns
    -------
    interp_fer.models.FERModel
        In eval mode, with RGB ImageNet preprocessing at ``input_size`` and the
        architecture's default stages. To load trained weights instead, use
        ``load_model(ckpt, architecture="interp_fer.architectures:VGG16", arch_kwargs=...)``.
    """
    if name not in RGB_ARCHITECTURES:
        raise ValueError(f"unknown RGB architecture {name!r}; choose from {', '.join(RGB_ARCHITECTURES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = RGB_ARCHITECTURES[name](num_classes=num_classes, width=width, input_size=input_size)
    if class_names is None:
        class_names = FER2013_CLASSES if num_classes == 7 else tuple(f"class{i}" for i in range(num_classes))
    prep = Preprocessor((input_size, input_size), False, IMAGENET_MEAN, IMAGENET_STD)
    model = FERModel(network.eval().to(device), prep, tuple(class_names), f"{name}-random-seed{seed}",
                     type(network).default_stages, f"random initialisation (seed {seed})",
                     {"architecture": f"interp_fer.architectures:{type(network).__name__}",
                      "arch_kwargs": {"num_classes": num_classes, "width": width, "input_size": input_size}})
    _check_class_count(model)
    return model
