"""Projection engine against a Captum ``NeuronDeconvolution`` loop on the RGB ImageNet-style
networks (VGG-16, ResNet-18 of :mod:`interp_fer.architectures`), random weights.

The measurement is :func:`bench_stage` of ``benchmarks/projections.py`` (the zoo benchmark),
run on every default stage of each network: engine projections per second (all channels of
all images in one call), a Captum loop's rate (its fastest ``attribute`` call), their ratio,
peak memory, and the largest difference from Captum run in float64, relative to each map's
max (must stay below 1e-5). Random weights (torchvision's initialisation, fixed seed) give
the same arithmetic as trained ones; what they change is which units win the arg-max.

Run: ``python benchmarks/projections_rgb.py [--width 64] [--input-size 224] [--images 8]
[--captum-pairs 24] [--device cuda]``. The published sizes (width 64, 224 px) take minutes on
a CPU; ``--width 16 --input-size 112`` is a quick look. Exits with status 1 when a map
disagrees with Captum.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

from interp_fer.memory import keep_freed_memory
from interp_fer.models import rgb_model


def _zoo_benchmark():
    # benchmarks/ is not a package: load the zoo benchmark's module by path.
    path = Path(__file__).resolve().parent / "projections.py"
    spec = importlib.util.spec_from_file_location("bench_projections", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet18"])
    parser.add_argument("--width", type=int, default=64, help="first-stage channels (64: published)")
    parser.add_argument("--input-size", type=int, default=224, help="input side in pixels")
    parser.add_argument("--images", type=int, default=8, help="images per stage")
    parser.add_argument("--captum-pairs", type=int, default=24,
                        help="(image, channel) pairs timed and checked with Captum per stage")
    parser.add_argument("--repeats", type=int, default=2, help="engine runs (best is kept)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    bench = _zoo_benchmark()
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = keep_freed_memory()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; width {args.width}, "
          f"{args.input_size} px RGB, {args.images} images per stage; freed memory kept: "
          f"{'yes' if kept else 'no'}")
    header = (f"{'model':<10}{'stage':<13}{'K':>5}{'active':>8}{'engine/s':>11}{'captum/s':>10}"
              f"{'ratio':>8}{'peak MiB':>10}{'max err':>10}")
    print(header)
    print("-" * len(header))
    failures = 0
    for model_name in args.models:
        model = rgb_model(model_name, width=args.width, input_size=args.input_size, device=device)
        inputs = model.preprocess(bench.faces(args.images)).to(device)
        for stage in model.stages:
            row = bench.bench_stage(model, inputs, stage, args.captum_pairs, args.repeats)
            failures += row["error"] > bench.TOLERANCE
            print(f"{model_name:<10}{stage:<13}{row['channels']:>5}{row['active']:>8}"
                  f"{row['engine']:>11.0f}{row['captum']:>10.1f}{row['ratio']:>7.0f}x"
                  f"{row['memory']:>10.1f}{row['error']:>10.1e}", flush=True)
    print(f"maps agree with float64 Captum (<= {bench.TOLERANCE:g} of each map's max): "
          f"{'yes' if not failures else f'NO ({failures} stages)'}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
