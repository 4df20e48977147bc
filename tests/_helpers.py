"""Checks shared by several test modules (import as ``from _helpers import ...``)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable

import pytest
import torch
from torch import nn

from interp_fer.layers import resolve_layer

#: Captum's reference for each projection method.
CAPTUM = {"deconvnet": "NeuronDeconvolution", "guided_backprop": "NeuronGuidedBackprop"}


def captum_parity(module: nn.Module, x: torch.Tensor, result) -> int:
    """Assert each active unit's projection in ``result`` equals Captum's; return how many.

    The reference is a float64 copy of ``module``; the tolerance is 1e-5 of the map's max
    (as tests/test_projections.py).
    """
    import captum.attr

    method = getattr(captum.attr, CAPTUM[result.method])
    reference = copy.deepcopy(module).double()
    checked = 0
    for image in range(x.shape[0]):
        for slot, channel in enumerate(result.channels.tolist()):
            if not result.active[image, slot]:
                continue
            row, col = result.units[image, slot].tolist()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = method(reference, resolve_layer(reference, result.layer)).attribute(
                    x[image:image + 1].double(), neuron_selector=(channel, row, col))[0]
            error = (expected - result.maps[image, slot].double()).abs().max()
            assert error <= 1e-5 * expected.abs().max(), (result.layer, image, slot)
            checked += 1
    return checked


def broken(raw: dict, edit: Callable[[dict], object]) -> dict:
    """A deep copy of the parsed data file ``raw`` with ``edit`` applied (in place) to it."""
    data = copy.deepcopy(raw)
    edit(data)
    return data


def assert_rejected(error: type[Exception], build: Callable[[], object],
                    words: Iterable[str]) -> None:
    """Assert ``build()`` raises ``error`` and its message contains every one of ``words``."""
    with pytest.raises(error) as info:
        build()
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def kill_at_first_checkpoint(command: list[str], out, env: dict[str, str], cwd,
                             timeout: float = 300) -> None:
    """Start ``command`` (an ``interp-fer map`` run on ``out``) and ``kill -9`` it, with every
    process of its session (a local Dask cluster's too), once ``out/.checkpoint.npz`` exists.

    Asserts that the run checkpointed before it finished.
    """
    import os
    import signal
    import subprocess
    import time
    from pathlib import Path

    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, cwd=cwd, start_new_session=True)
    checkpoint = Path(out) / ".checkpoint.npz"
    deadline = time.time() + timeout
    while not checkpoint.exists() and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert checkpoint.exists(), "the run should have checkpointed before finishing"
