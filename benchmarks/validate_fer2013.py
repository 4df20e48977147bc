"""Validation of the detector test on the FER2013 test split, expression labels held out.

The mapping runs with AU activity from landmarks only (``activity="landmarks"``, no labels),
so FER2013's expression labels are never seen by it. Then, on the *report* half of the faces:

1. **Detectors predict expressions.** Each channel detected as an AU12 detector should
   respond more on "happy" faces, and AU25/26/27 detectors on "surprise" faces (EMFACS
   prototypes). Its one-vs-rest AUC (the channel's in-region response at its AU) is printed
   beside the same AUC for every channel of its layer (median; the share of channels the
   detector beats) and for the channels of a random-weights copy that did not set the control
   bar, at the same layer and AU (median and maximum).
2. **Proxies separate expressions.** For each landmark proxy, the AUC separating faces whose
   expression's EMFACS prototype contains the AU from the others.

It prints both tables and the detector counts of the network and of its control.

Run: ``python benchmarks/validate_fer2013.py [--fer2013 PATH] [--limit N] [--model NAME]
[--layers a,b]``. Without ``--limit`` it maps the whole split (7,178 faces).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
TARGETS = {12: ("happy",), 25: ("surprise",), 26: ("surprise",), 27: ("surprise",)}


def one_vs_rest_auc(values: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """AUC of each column of ``values`` (N, M) for the boolean ``positive`` (N,)."""
    from scipy import stats

    ranks = stats.rankdata(values, axis=0)
    n1, n0 = positive.sum(), (~positive).sum()
    return (ranks[positive].sum(axis=0) - n1 * (n1 + 1) / 2) / (n1 * n0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fer2013", type=Path, default=Path(os.environ.get(
        "INTERP_FER_FER2013", REPO.parent / "shared/data/fer2013")))
    parser.add_argument("--limit", type=int)
    parser.add_argument("--model", default="mini-xception")
    parser.add_argument("--layers", help="comma-separated layers (default: every stage)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decision-memory", type=float, default=1024, metavar="MIB",
                        help="memory per task of the decision (default: %(default)s)")
    args = parser.parse_args()
    labels_csv = args.fer2013 / "test_labels.csv"
    if not labels_csv.is_file():
        raise SystemExit(f"FER2013 test split not found at {args.fer2013}")

    from interp_fer import load_model, open_dataset
    from interp_fer.au_activity import au_activity
    from interp_fer.controls import randomized_copy
    from interp_fer.detectors import DetectorOptions, selection_half
    from interp_fer.feature_store import FeatureStore
    from interp_fer.labels import EMFACS_PROTOTYPES
    from interp_fer.layer_mapping import MappingOptions
    from interp_fer.mapping import decide, prepare_faces, stream_layers
    from interp_fer.memory import keep_freed_memory

    keep_freed_memory()
    model = load_model(args.model)
    dataset = open_dataset(labels_csv, class_names=model.class_names)
    if args.limit:
        dataset = dataset.subset(limit=args.limit, stratify=True)
    layers = args.layers.split(",") if args.layers else list(model.stages)
    start = time.perf_counter()
    faceset = prepare_faces(model, dataset, activity="landmarks", progress=False)
    copies = 4  # as `interp-fer map`: three set the control bar, the fourth is tested against it
    controls = [randomized_copy(model, seed=args.seed + 1 + i) for i in range(copies)]
    # The per-face features go to a Zarr store, as in `interp-fer map`: the decision reads
    # them back in blocks of --decision-memory.
    folder = tempfile.TemporaryDirectory()
    store = FeatureStore.open(Path(folder.name) / "features.zarr", "validate",
                              len(faceset.faces), 64)
    stream = stream_layers(model, dataset, faceset, layers, controls=controls, locate="rf-center",
                           options=MappingOptions(n_null=2, n_boot=2, seed=args.seed),
                           labelled=False, progress=True, store=store)
    pass_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    decision_start = time.perf_counter()
    mapping, _, _, control_mapping, summary = decide(
        stream, faceset, layers, detector=DetectorOptions(seed=args.seed), controls=copies,
        memory=int(args.decision_memory * 2**20))
    wall = time.perf_counter() - start
    print(f"decision: {time.perf_counter() - decision_start:.0f} s, blocks per layer "
          f"{summary['decision']['blocks_per_layer']}; peak RSS after the pass "
          f"{pass_rss:.0f} MiB, after the decision "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")

    expressions = np.array([r.label_name for r in faceset.records], dtype=object)
    report = ~selection_half(faceset.indices, args.seed)
    tested = list(faceset.tested)
    d = summary["detector"]
    print(f"{args.model} on {len(faceset.faces)} FER2013 faces ({report.sum()} in the report "
          f"half), layers {', '.join(layers)}; wall {wall / 60:.1f} min")
    print(f"detectors: trained {d['detectors']} of {d['channels']}; random-weights copy "
          f"{d['control_detectors']} of {d['channels']} (tested against the bar of the other "
          f"{copies - 1} copies)")
    for name, table in (("trained", mapping), ("random", control_mapping)):
        counts = table["au"].value_counts().sort_index()
        print(f"detected AUs ({name}):", ", ".join(f"AU{int(a)}: {int(n)}"
                                                   for a, n in counts.items()) or "none")

    rows = []
    for au, targets in TARGETS.items():
        if au not in tested:
            continue
        positive = np.isin(expressions[report], targets)
        for layer in layers:
            x = stream.store.array(f"model/{layer}/in")[report][:, :, faceset.aus.index(au)]
            # The copy that did not set the bar: an independent random network.
            c = stream.store.array(f"control{copies}/{layer}/in")[report][
                :, :, faceset.aus.index(au)]
            auc_all = one_vs_rest_auc(np.nan_to_num(x, nan=-np.inf), positive)
            auc_random = one_vs_rest_auc(np.nan_to_num(c, nan=-np.inf), positive)
            detected = mapping[(mapping["layer"] == layer) & (mapping["au"] == au)]
            for channel in detected["channel"]:
                rows.append({"AU": au, "expression": "/".join(targets), "layer": layer,
                             "channel": int(channel), "auc": auc_all[channel],
                             "layer_median": np.median(auc_all),
                             "beats_share": float(np.mean(auc_all < auc_all[channel])),
                             "random_median": np.median(auc_random),
                             "random_max": auc_random.max()})
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 160)
    print("\n1. detectors predict the expressions whose prototype has their AU "
          "(report half, one-vs-rest AUC)")
    if table.empty:
        print("   no detector of AU12, AU25, AU26 or AU27")
    else:
        print(table.round(3).to_string(index=False))
        better = (table["auc"] > table["random_max"]).mean()
        print(f"   detectors above every random channel of their layer: {100 * better:.0f} %; "
              f"median AUC {table['auc'].median():.3f} vs layer median "
              f"{table['layer_median'].median():.3f} vs random median "
              f"{table['random_median'].median():.3f}")

    print("\n2. landmark proxies separate the expressions whose EMFACS prototype has the AU")
    values = au_activity(np.stack([f.landmarks for f in faceset.faces]), tested)
    proxy_rows = []
    for j, au in enumerate(tested):
        holding = [e for e, aus in EMFACS_PROTOTYPES.items() if au in aus]
        positive = np.isin(expressions, holding)
        if positive.any() and (~positive).any():
            proxy_rows.append({"AU": au, "expressions": "/".join(holding),
                               "auc": float(one_vs_rest_auc(values[:, j:j + 1], positive)[0]),
                               "n_positive": int(positive.sum())})
    print(pd.DataFrame(proxy_rows).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
