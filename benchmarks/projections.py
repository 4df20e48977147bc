"""Projection engine against a Captum ``NeuronDeconvolution`` loop, on both zoo models.

For every conv stage of mini-xception and pyemotion: projections per second of
:func:`interp_fer.projections.deconvnet` (all channels of all images, one call) and of a
Captum loop (one ``attribute`` call per (image, channel), timed on a sample of pairs spread
over images and channels), their ratio, the engine's peak memory (CUDA allocator peak, or on
CPU the growth of the bytes malloc has in use), and the
largest difference between the engine's map and Captum's run in float64 on a float64 copy of
the network and input, relative to each map's max |value| (must stay below 1e-5; Captum's own
float32 maps are no reference: near-tied max-pool switches flip in float32 from one CPU to
the next). Only active (image, channel) pairs count: an inactive channel's map is zeros in both.

Ill-conditioning: ``min margin`` is the smallest max-pool switch margin of the stage's maps
(:attr:`interp_fer.projections.Projections.switch_margins`), ``<thr`` the share of maps below
:data:`~interp_fer.projections.ILL_CONDITIONED_MARGIN`, and ``f32 off`` how many of the checked
maps Captum's float32 run got wrong (more than 1e-4 of the max away from float64), with how
many of those the margin flagged.

Both sides are timed at their best (engine: best of ``--repeats`` calls; Captum: its fastest
call) so that a busy shared machine penalises neither.

What bounds the engine: ``MFLOP/proj`` is the convolution arithmetic it runs per projection
(counted with ``torch.utils.flop_counter``; for a full-image cone this is one backward pass
over the network below the layer), and ``GFLOP/s`` the rate it runs it at; for a stage below the target it also prints the rate the engine's
convolutions alone would allow (CPU profiler), were every other cost free. The header gives
the rate of one large dense channels-last convolution on this machine, a practical ceiling
for the engine's (smaller, partly depthwise) convolutions; a stage whose target needs more
than that ceiling cannot meet it on this hardware.

The benchmark, like the ``interp-fer`` CLI, keeps freed memory for reuse
(:func:`interp_fer.memory.keep_freed_memory`); ``--no-keep-memory`` measures without.

Run: ``python benchmarks/projections.py [--images 16] [--captum-pairs 48] [--device cuda]``.
Exits with status 1 when a map disagrees with Captum.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import math
import os
import sys
import threading
import time
import warnings

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from interp_fer.layers import resolve_layer
from interp_fer.memory import keep_freed_memory, malloc_in_use
from interp_fer.models import load_model
from interp_fer.projections import ILL_CONDITIONED_MARGIN
from interp_fer.projections import deconvnet as deconvnet_engine
from interp_fer.samples import SAMPLE_FACES, sample_face

TARGET_RATIO = 50.0
TOLERANCE = 1e-5


def faces(count: int) -> list[np.ndarray]:
    """Real sample faces and their mirror images, repeated up to ``count``."""
    base = [sample_face(name) for name in SAMPLE_FACES]
    pool = base + [face[:, ::-1].copy() for face in base]
    return [pool[i % len(pool)] for i in range(count)]


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or on CPU the growth of the bytes in use.

    On CPU the sampler (every millisecond) reads glibc's ``mallinfo2`` (bytes allocated and
    not freed), which still sees the working set when freed memory is kept for reuse; without
    glibc it falls back to the resident set, a lower bound.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = _in_use()
        self._top = self._base
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self._top = max(self._top, _in_use())
            time.sleep(0.001)

    def __exit__(self, *exc_info: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._running = False
            self._thread.join()
            self.peak = max(self._top, _in_use()) - self._base


def _in_use() -> int:
    """Bytes malloc has handed out and not taken back (heap and mmap), else the RSS."""
    in_use = malloc_in_use()
    return _rss() if in_use is None else in_use


def _rss() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: no sampling, report 0
        return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


FORWARD_DTYPES = {"float64": torch.float64, "none": None}


def bench_stage(model, inputs: torch.Tensor, stage: str, captum_pairs: int,
                repeats: int, forward_dtype: torch.dtype | None = torch.float64
                ) -> dict[str, float]:
    """Engine and Captum timings for one stage (see the module docstring)."""
    from captum.attr import NeuronDeconvolution

    module, device = model.module, model.device
    deconvnet = functools.partial(deconvnet_engine, forward_dtype=forward_dtype)
    deconvnet(module, inputs[:2], stage)  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        _sync(device)
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            result = deconvnet(module, inputs, stage)
            _sync(device)
            times.append(time.perf_counter() - start)
    engine_time = min(times)
    active = result.active.nonzero().tolist()
    pick = np.linspace(0, len(active) - 1, min(captum_pairs, len(active))).round().astype(int)
    pairs = [active[i] for i in dict.fromkeys(pick.tolist())]
    reference = NeuronDeconvolution(module, resolve_layer(module, stage))
    module64 = copy.deepcopy(module).double()
    exact = NeuronDeconvolution(module64, resolve_layer(module64, stage))
    calls, worst, float32_off, flagged = [], 0.0, 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum warns on every call
        reference.attribute(inputs[:1], neuron_selector=(0, 0, 0))  # warm-up
        for image, slot in pairs:
            row, col = result.units[image, slot].tolist()
            channel = int(result.channels[slot])
            _sync(device)
            start = time.perf_counter()
            expected = reference.attribute(inputs[image:image + 1],
                                           neuron_selector=(channel, row, col))[0]
            _sync(device)
            calls.append(time.perf_counter() - start)
            truth = exact.attribute(inputs[image:image + 1].double(),
                                    neuron_selector=(channel, row, col))[0]
            scale = truth.abs().max().clamp_min(torch.finfo(truth.dtype).tiny)
            error = ((truth - result.maps[image, slot].double()).abs().max() / scale).item()
            worst = max(worst, error)
            if ((truth - expected.double()).abs().max() / scale).item() > 1e-4:
                float32_off += 1
                flagged += bool(result.switch_margins[image, slot] < ILL_CONDITIONED_MARGIN)
    engine_rate = len(active) / engine_time
    captum_rate = 1.0 / min(calls)  # best case, like the engine's best of --repeats
    with FlopCounterMode(display=False) as counter:
        deconvnet(module, inputs, stage)
    mflop = counter.get_total_flops() / max(1, len(active)) / 1e6
    margins = result.switch_margins[result.active]
    return {
        "margin": float(margins.min()) if len(margins) else math.inf,
        "below": float((margins < ILL_CONDITIONED_MARGIN).double().mean()) if len(margins)
        else 0.0,
        "float32_off": float32_off, "flagged": flagged,
        "channels": result.maps.shape[1], "active": len(active), "engine": engine_rate,
        "captum": captum_rate, "ratio": engine_rate / captum_rate,
        "memory": memory.peak / 2**20, "error": worst, "checked": len(pairs),
        "mflop": mflop, "gflops": engine_rate * mflop / 1e3,
        "conv_bound": len(active) / convolution_seconds(module, inputs, stage, device,
                                                              deconvnet),
    }


def convolution_seconds(module, inputs: torch.Tensor, stage: str, device: torch.device,
                        deconvnet=deconvnet_engine) -> float:
    """Seconds one engine call spends inside convolution kernels (CPU profiler; NaN on GPU).

    ``active / seconds`` bounds the engine's rate were every other cost (scatters, ReLUs,
    copies, Python) free.
    """
    if device.type != "cpu":
        return float("nan")
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        deconvnet(module, inputs, stage)
    return sum(event.self_cpu_time_total for event in prof.key_averages()
               if "convolution" in event.key) / 1e6


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def dense_convolution_rate(device: torch.device, repeats: int = 5) -> float:
    """GFLOP/s of one large channels-last 3x3 convolution (64 x 16 x 60 x 60, 16 -> 16)."""
    x = torch.randn(64, 16, 60, 60, device=device).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(16, 16, 3, 3, device=device)
    torch.nn.functional.conv2d(x, weight, padding=1)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.nn.functional.conv2d(x, weight, padding=1)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * 64 * 60 * 60 * 16 * 16 * 9 / best / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="images per stage")
    parser.add_argument("--captum-pairs", type=int, default=48,
                        help="(image, channel) pairs timed and checked with Captum per stage")
    parser.add_argument("--repeats", type=int, default=3, help="engine runs (best is kept)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--models", nargs="+", default=["mini-xception", "pyemotion"])
    parser.add_argument("--forward-dtype", choices=("float64", "none"), default="float64",
                        help="forward_dtype of the engine (none: the module's own float32, "
                             "the engine before switches were decided in float64)")
    parser.add_argument("--no-keep-memory", action="store_true",
                        help="leave glibc's malloc settings alone (see interp_fer.memory)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = False if args.no_keep_memory else keep_freed_memory()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    ceiling = dense_convolution_rate(device)
    print(f"device: {name}; torch {torch.__version__}; {args.images} images per stage; "
          f"freed memory kept: {'yes' if kept else 'no'}; forward_dtype: {args.forward_dtype}")
    print(f"dense 3x3 convolution (64x16x60x60, 16->16, channels-last): {ceiling:.0f} GFLOP/s")
    header = (f"{'model':<14}{'stage':<8}{'K':>5}{'active':>8}{'engine/s':>11}{'captum/s':>10}"
              f"{'ratio':>8}{'peak MiB':>10}{'max err':>10}{'MFLOP/proj':>12}{'GFLOP/s':>9}"
              f"{'min margin':>12}{'<thr':>6}{'f32 off':>9}")
    print(header)
    print("-" * len(header))
    failures, short = 0, []
    for model_name in args.models:
        model = load_model(model_name, device=device)
        inputs = model.preprocess(faces(args.images)).to(device)
        for stage in model.stages:
            row = bench_stage(model, inputs, stage, args.captum_pairs, args.repeats,
                              FORWARD_DTYPES[args.forward_dtype])
            failures += row["error"] > TOLERANCE
            if row["ratio"] < TARGET_RATIO:
                short.append((model_name, stage, row))
            print(f"{model_name:<14}{stage:<8}{row['channels']:>5}{row['active']:>8}"
                  f"{row['engine']:>11.0f}{row['captum']:>10.1f}{row['ratio']:>7.0f}x"
                  f"{row['memory']:>10.1f}{row['error']:>10.1e}{row['mflop']:>12.2f}"
                  f"{row['gflops']:>9.1f}{row['margin']:>12.1e}{row['below']:>6.0%}"
                  f"{row['float32_off']:>5}/{row['flagged']:<3}", flush=True)
    print(f"switch margins below {ILL_CONDITIONED_MARGIN:g} count as ill-conditioned (<thr); "
          "f32 off: maps float32 Captum got wrong / of them flagged")
    print(f"maps agree with float64 Captum (<= {TOLERANCE:g} of each map's max): "
          f"{'yes' if not failures else f'NO ({failures} stages)'}; "
          f"stages below {TARGET_RATIO:g}x: {len(short)}")
    for model_name, stage, row in short:
        needed = TARGET_RATIO * row["captum"] * row["mflop"] / 1e3
        print(f"  {model_name} {stage}: {TARGET_RATIO:g}x needs {TARGET_RATIO * row['captum']:.0f}"
              f" proj/s x {row['mflop']:.1f} MFLOP = {needed:.0f} GFLOP/s of convolution "
              f"({needed / ceiling:.1f}x this machine's dense-convolution rate); the engine "
              f"runs {row['gflops']:.0f}, and its convolutions alone, at the rate they run "
              f"here, allow at most {row['conv_bound']:.0f} proj/s "
              f"({row['conv_bound'] / row['captum']:.0f}x)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
