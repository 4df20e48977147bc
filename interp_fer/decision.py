"""Stage 3 of the map job: the detector test, ``looks_at`` and the tables, from the stored features.

:func:`interp_fer.mapping.stream_layers` leaves every face's region responses in a store
(the chunked Zarr :class:`interp_fer.feature_store.FeatureStore`, or
:class:`interp_fer.mapping.ResponseStore` in memory). :func:`decide` reads them back in
*blocks of channels*: a task holds one block of one layer (every face, the block's channels,
the tested AUs), never a whole layer, so its memory is set by ``memory`` (bytes), not by the
number of faces. The statistics are column-wise (ranks, permutations and bootstrap draws are
per channel and AU, with per-layer seeds), so the tables do not depend on the blocks nor on
where the tasks run: here in order, or on the Dask workers of a
:class:`interp_fer.distributed.Cluster` (tasks read the store themselves; the client gets
(K, A) effect matrices and table rows back).

The test runs in three passes over the responses (:func:`interp_fer.detectors.
detector_tables`): the halves' effects of the network and every random-weights copy (the
control bar needs the largest over a layer's channels), the candidate rows of the network and
of the tested copy, and their permutation tests (one response per channel and face, in wider
blocks, so that the permutations are drawn once per layer). ``looks_at`` is one more pass over
the network's AU and sham responses. A layer that takes several blocks is first copied
channel-major (:func:`channel_major_copies`), so that each block reads its own chunks.

The smallest block is one channel: (N, 1, A) responses of N faces, i.e. about
``BYTES_PER_VALUE * N * A`` bytes (~0.7 GB for 10^6 faces and 15 AUs); a budget below that
runs one channel per task.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .detectors import DetectorOptions, Runner, detector_tables, run_here
from .feature_store import FeatureStore, channel_block
from .statistics import signed_distance

if TYPE_CHECKING:
    from .mapping import FaceSet, Stream

#: Columns of ``mapping.csv`` (one row per layer and channel).
MAPPING_COLUMNS = [
    "layer", "channel", "au", "candidate_au", "auc", "auc_low", "auc_high", "effect",
    "partial", "out_effect", "p_value", "q_value", "control_bar", "beats_control", "specific",
    "small_sample", "n_report", "looks_at", "looks_at_distance", "looks_at_resolvable",
    "looks_at_shares_cells_with", "hit_rate", "chance_rate", "iou", "n_images",
]
#: Bytes a task holds per stored float32 value of its block (the block, its ranks in float64
#: for the two halves and the contrasts of ``partial``): 31-35 measured with tracemalloc on
#: 20,000 faces, with a margin (tests/test_decision.py checks a bounded run).
BYTES_PER_VALUE = 48
#: Default memory of one decision task.
DEFAULT_MEMORY = 1 << 30


def channel_blocks(n_rows: int, n_columns: int, memory: int = DEFAULT_MEMORY
                   ) -> Callable[[int], list[slice]]:
    """How a layer's channels are cut into blocks of at most ``memory`` bytes per task.

    Parameters
    ----------
    n_rows
        Faces N.
    n_columns
        Values per channel and face (AUs, or AUs and sham regions).
    memory
        Bytes per task (at least one channel per block whatever it is).

    Returns
    -------
    callable
        ``blocks(channels)`` -> consecutive slices covering ``range(channels)``.
    """
    width = block_width(n_rows, n_columns, memory)

    def blocks(channels: int) -> list[slice]:
        return [slice(i, min(i + width, channels)) for i in range(0, channels, width)]

    return blocks


def block_width(n_rows: int, n_columns: int, memory: int = DEFAULT_MEMORY) -> int:
    """Channels per block of :func:`channel_blocks` (at least one)."""
    if memory < 1:
        raise ValueError(f"memory must be a positive number of bytes, not {memory}")
    return max(1, int(memory // (BYTES_PER_VALUE * max(n_rows, 1) * max(n_columns, 1))))


class StoreSource:
    """The responses of a run's store, for :func:`interp_fer.detectors.detector_tables`.

    Parameters
    ----------
    store
        A :class:`interp_fer.feature_store.FeatureStore` or an in-memory
        :class:`interp_fer.mapping.ResponseStore` (both have ``block``).
    columns
        Positions of the tested AUs in the stored AU axis (None: all).

    A source over a feature store pickles as its path, so Dask workers open the store
    themselves; one over an in-memory store is for this process only.
    """

    def __init__(self, store: Any, columns: Sequence[int] | None) -> None:
        self.store = store
        self.columns = None if columns is None else list(columns)
        self._copies: dict[str, Any] = {}

    def read(self, network: str, layer: str, kind: str, channels: slice) -> np.ndarray:
        name = f"{network}/{layer}/{kind}"
        copy = self._copy(name)
        if copy is None:
            return self.store.block(name, channels, self.columns)
        return channel_block(copy, channels, self.columns)

    def _copy(self, name: str) -> Any:
        """The channel-major copy of ``name`` (:func:`channel_major_copies`), if complete."""
        if name not in self._copies:
            self._copies[name] = _open_copy(self.store, name)
        return self._copies[name]

    def __getstate__(self) -> dict[str, Any]:
        path = getattr(self.store, "path", None)
        if path is None:
            raise TypeError("responses held in memory cannot go to other processes: give the "
                            "run a feature store (map_dataset(store=...))")
        return {"path": str(path), "columns": self.columns}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.store = FeatureStore.reopen(state["path"])
        self.columns = state["columns"]
        self._copies = {}


#: Folder, inside a feature store, of the decision's channel-major copies.
BY_CHANNEL = "by_channel"


def _open_copy(store: Any, name: str) -> Any:
    path = getattr(store, "path", None)
    if path is None or not (Path(path) / BY_CHANNEL / name / "zarr.json").is_file():
        return None
    import zarr

    array = zarr.open_array(str(Path(path) / BY_CHANNEL / name), mode="r")
    return array if array.attrs.get("complete") else None


def channel_major_copies(store: Any, names: Sequence[str], width: int, memory: int,
                         client: Any = None) -> list[str]:
    """Copy arrays of a feature store into chunks of ``width`` channels (``by_channel/``).

    The pass writes one chunk per batch of faces holding every channel, so reading a block
    of channels would decompress the whole array once per block: K times over for blocks of
    one channel. One rechunking pass (:func:`dask.array.rechunk`, on the cluster's workers
    with ``client``) costs one read and one write; each block then reads its own chunks.
    Chunks hold up to ``memory / 8`` bytes. A complete copy (flagged) is reused.

    Returns
    -------
    list of str
        The names copied now (not those reused).
    """
    import dask
    import dask.array as da
    import zarr

    made = []
    for name in names:
        if _open_copy(store, name) is not None:
            continue
        source = store.dask_array(name)
        n, k, a = source.shape
        rows = int(np.clip(memory // (8 * 4 * width * a), 64, n))
        target = zarr.open_array(str(Path(store.path) / BY_CHANNEL / name), mode="w",
                                 shape=source.shape, chunks=(rows, min(width, k), a),
                                 dtype=source.dtype, fill_value=np.nan)
        # Dask's rechunking plans intermediate chunks of up to array.chunk-size: keep them
        # to the same size as the copy's chunks.
        with dask.config.set({"array.chunk-size": f"{max(memory // 8, 1 << 20)}B"}):
            job = da.store(source.rechunk((rows, min(width, k), a)), target, lock=False,
                           compute=False)
        if client is not None:
            client.compute(job).result()
        else:
            job.compute(scheduler="threads")
        target.attrs["complete"] = True
        made.append(name)
    return made


def dask_runner(client: Any) -> Runner:
    """A :data:`interp_fer.detectors.Runner` that runs tasks on a Dask client's workers.

    The shared arguments (activity, halves, the store's path, ...) are sent to every worker
    once; results come back in the order of the calls.
    """
    def run(task: Callable[..., Any], calls: list[tuple[Any, ...]], shared: dict[str, Any]
            ) -> list[Any]:
        refs = {name: client.scatter([value], broadcast=True, hash=False)[0]
                for name, value in shared.items()}
        futures = [client.submit(task, *call, **refs, pure=False) for call in calls]
        return client.gather(futures)

    return run


class StoredResponses(Mapping):
    """Per layer, each face's in-region responses (N, K, A) of the tested AUs, read on demand.

    ``responses[layer][:, k]`` reads channel k alone (N, A), so plotting one channel of a
    run with a million faces does not load the layer (from the decision's channel-major
    copy where it made one). ``numpy.asarray(responses[layer])`` reads the whole layer.
    """

    def __init__(self, store: Any, layers: Sequence[str], columns: Sequence[int]) -> None:
        self._source, self._layers = StoreSource(store, columns), tuple(layers)

    def __getitem__(self, layer: str) -> _LayerView:
        if layer not in self._layers:
            raise KeyError(layer)
        return _LayerView(self._source, layer)

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)


class _LayerView:
    """One layer's stored responses; indexing ``[:, k]`` reads one channel."""

    def __init__(self, source: StoreSource, layer: str) -> None:
        self._source, self._layer = source, layer

    def __getitem__(self, key: Any) -> np.ndarray:
        if (isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None)
                and isinstance(key[1], (int, np.integer))):
            k = int(key[1])
            return self._source.read("model", self._layer, "in", slice(k, k + 1))[:, 0]
        return np.asarray(self)[key]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        values = self._source.read("model", self._layer, "in", slice(None))
        return values if dtype is None else values.astype(dtype)


def _looks_block(layer: str, channels: slice, *, source: StoreSource, names: Sequence[str],
                 distance: str) -> pd.DataFrame:
    """D of a block of channels for every AU and sham region (rows by region, then channel)."""
    def read(kind: str) -> np.ndarray:
        return np.concatenate([source.read("model", layer, kind, channels),
                               source.read("model", layer, f"sham_{kind}", channels)], axis=2)

    x_in, x_out = read("in"), read("out")
    k = x_in.shape[1]
    frames = []
    for j, name in enumerate(names):
        # A region without cells on a face (clipped) has no response in any channel: the
        # faces kept are the same for every block.
        rows = np.isfinite(x_in[:, :, j]).all(axis=1) & np.isfinite(x_out[:, :, j]).all(axis=1)
        d = signed_distance(x_in[rows, :, j], x_out[rows, :, j], distance) if rows.sum() > 1 \
            else np.full(k, np.nan)
        frames.append(pd.DataFrame({"layer": layer, "channel": np.arange(channels.start,
                                                                          channels.start + k),
                                    "region": name, "sham": name.startswith("sham"),
                                    "distance": d, "n_images": int(rows.sum())}))
    return pd.concat(frames, ignore_index=True)


def looks_at_table(stream: Stream, layers: Sequence[str], aus: tuple[int, ...],
                   sham_names: Sequence[str], distance: str = "wasserstein", *,
                   memory: int = DEFAULT_MEMORY, run: Runner = run_here) -> pd.DataFrame:
    """D of every channel for every AU and sham region (where it looks), exact from samples.

    One row per (layer, channel, region): ``region`` (``AU12``, ``sham_cheek``), ``sham``,
    ``distance`` (:func:`interp_fer.statistics.signed_distance` between the per-image peak
    inside the region and the peak on the rest of the face; faces where the region has no
    cell are left out) and ``n_images``. Rows by layer, then region, then channel.
    ``memory`` and ``run`` as in :func:`decide`.
    """
    names = [f"AU{a}" for a in aus] + list(sham_names)
    blocks = _looks_blocks(stream.store.n_rows, len(names), memory)
    calls = [(name, block) for name in layers
             for block in blocks(stream.accumulators[name].top.n_channels)]
    parts = run(_looks_block, calls, {"source": StoreSource(stream.store, None), "names": names,
                                      "distance": distance})
    table = pd.concat(parts, ignore_index=True)
    order = pd.DataFrame({"layer": pd.Categorical(table["layer"], categories=list(layers)),
                          "region": pd.Categorical(table["region"], categories=names),
                          "channel": table["channel"]})
    return table.loc[order.sort_values(["layer", "region", "channel"], kind="stable").index
                     ].reset_index(drop=True)


def _looks_blocks(n_rows: int, n_regions: int, memory: int) -> Callable[[int], list[slice]]:
    # looks_at reads every AU and sham region, in and out: two values per region.
    return channel_blocks(n_rows, 2 * n_regions, memory)


def _copy_wide_layers(store: Any, wide: Sequence[tuple[str, int]], controls: int, width: int,
                      memory: int, cluster: Any) -> list[str]:
    """Channel-major copies of the stored arrays of layers that take several blocks."""
    if not wide:
        return []  # one block a layer reads each array once
    networks = ["model"] + [f"control{i + 1}" for i in range(controls)]
    names = [f"{net}/{layer}/{kind}" for layer, _ in wide for net in networks
             for kind in ("in", "out", "sham_in", "sham_out")]
    return channel_major_copies(store, [n for n in names if n in store], width, memory,
                                cluster.client if cluster is not None else None)


def _looks_at(looks: pd.DataFrame, containment: dict[str, np.ndarray], n_faces: int
              ) -> pd.DataFrame:
    """Per (layer, channel): the region of largest D, and whether it is resolvable there."""
    rows = []
    for (layer, channel), part in looks.groupby(["layer", "channel"], sort=False):
        names = list(part["region"])
        d = part["distance"].to_numpy(dtype=float)
        if not np.isfinite(d).any():
            rows.append({"layer": layer, "channel": channel, "looks_at": None,
                         "looks_at_distance": np.nan, "looks_at_resolvable": False,
                         "looks_at_shares_cells_with": ""})
            continue
        w = int(np.nanargmax(d))
        counts = containment.get(layer)
        shared = []
        if counts is not None:
            # Region w cannot be told from region j at this layer when, on most faces, the
            # cells of one lie inside the cells of the other.
            nested = (counts[w] > n_faces / 2) | (counts[:, w] > n_faces / 2)
            shared = [names[j] for j in np.flatnonzero(nested) if j != w]
        rows.append({"layer": layer, "channel": channel, "looks_at": names[w],
                     "looks_at_distance": d[w], "looks_at_resolvable": not shared,
                     "looks_at_shares_cells_with": ";".join(shared)})
    return pd.DataFrame(rows)


def decide(stream: Stream, faceset: FaceSet, layers: Sequence[str], *,
           detector: DetectorOptions, distance: str = "wasserstein", controls: int = 4,
           memory: int = DEFAULT_MEMORY, cluster: Any = None
           ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame | None,
                      dict[str, Any]]:
    """Stage 3 of :func:`interp_fer.mapping.map_dataset`: the detector test, ``looks_at``, tables.

    Parameters
    ----------
    stream
        What :func:`interp_fer.mapping.stream_layers` accumulated (its store holds the
        per-face responses).
    faceset
        The faces (:func:`interp_fer.mapping.prepare_faces`): AUs, activity, ids.
    layers
        Layer names.
    detector
        :class:`interp_fer.detectors.DetectorOptions`.
    distance
        The D of ``looks_at``.
    controls
        Random-weights copies in the store (``control1`` ...): with two or more, all but the
        last set the bar and the last is tested against it like the network.
    memory
        Bytes per task (:func:`channel_blocks`); the tables do not depend on it.
    cluster
        A :class:`interp_fer.distributed.Cluster`: tasks run on its workers, which read the
        feature store themselves. None runs them here.

    Returns
    -------
    mapping, scores, looks, control_detectors, summary
        :attr:`interp_fer.mapping.MappingResult.mapping`, ``.scores``, ``.looks``,
        ``.control_detectors``, and the numbers ``run.json`` reports (``detector``,
        ``looks_at`` and ``decision`` sections).
    """
    from .au_regions import load_sham_regions

    run = dask_runner(cluster.client) if cluster is not None else run_here
    aus, tested = faceset.aus, faceset.tested
    shams = load_sham_regions()
    columns = [aus.index(a) for a in tested]
    summary: dict[str, Any] = {}
    channels = [(name, stream.accumulators[name].top.n_channels) for name in layers]
    n_faces = len(faceset.faces)
    blocks = channel_blocks(n_faces, max(len(tested), 1), memory)
    n_regions = len(aus) + len(shams.names)
    looks_blocks = _looks_blocks(n_faces, n_regions, memory)  # the narrowest blocks
    start = time.perf_counter()
    wide = [(n, k) for n, k in channels if len(looks_blocks(k)) > 1] \
        if hasattr(stream.store, "path") else []
    width = min((looks_blocks(k)[0].stop for _, k in wide), default=1)
    copied = _copy_wide_layers(stream.store, wide, controls, width, memory, cluster)
    summary["decision"] = {
        "memory_per_task_mib": round(memory / 2**20, 1),
        "blocks_per_layer": {name: len(blocks(k)) for name, k in channels},
        "looks_at_blocks_per_layer": {name: len(looks_blocks(k)) for name, k in channels},
        "channel_major_layers": [name for name, _ in wide],
        "channel_major_arrays_made": len(copied),
        "copy_seconds": round(time.perf_counter() - start, 1),
        "where": f"{len(cluster.client.scheduler_info()['workers'])} Dask workers"
        if cluster is not None else "this process"}
    if tested:
        # With two or more copies, all but the last set the bar; the last is tested against
        # it like the network, to show what the test finds in a network that learned nothing.
        copies = [f"control{i + 1}" for i in range(controls)]
        bar, check = (copies[:-1], copies[-1]) if controls >= 2 else (copies, None)
        tables = detector_tables(StoreSource(stream.store, columns), channels,
                                 faceset.activity, faceset.indices, tested,
                                 tested=["model"] + ([check] if check else []), bar=bar,
                                 options=detector, blocks=blocks,
                                 test_blocks=channel_blocks(len(faceset.faces), 1, memory),
                                 run=run, memory=memory)
        detectors, pairs = tables["model"]
        control_detectors = tables[check][0] if check else None
        summary["detector"] = {
            "tested_aus": list(tested), "n_perm": detectors.attrs["n_perm"],
            "n_select": int(detectors["n_select"].iloc[0]),
            "n_report": int(detectors["n_report"].iloc[0]),
            "small_sample": bool(detectors["small_sample"].iloc[0]),
            "detectors": int(detectors["au"].notna().sum()),
            "control_detectors": None if control_detectors is None
            else int(control_detectors["au"].notna().sum()),
            "channels": len(detectors),
            "control": f"{len(bar)} randomized copies (every parameter re-drawn) set the bar"
            + ("; one more is tested against it" if check is not None else "")
            if controls else "none (no control bar applied)",
        }
    else:
        detectors = pd.DataFrame({"layer": [name for name, k in channels for _ in range(k)]})
        detectors["channel"] = detectors.groupby("layer").cumcount()
        detectors["au"] = pd.array([pd.NA] * len(detectors), dtype="Int64")
        pairs, control_detectors = None, None
        summary["detector"] = {"tested_aus": [], "detectors": 0,
                               "note": "no AU has an activity source: nothing was tested"}

    scores = pd.concat([stream.accumulators[name].scores() for name in layers],
                       ignore_index=True)
    if pairs is not None:
        scores = scores.merge(pairs, on=["layer", "channel", "au"], how="left")
    looks = looks_at_table(stream, layers, aus, shams.names, distance, memory=memory, run=run)
    looking = _looks_at(looks, stream.containment, len(faceset.faces))
    sham_rate = float(looking["looks_at"].dropna().str.startswith("sham").mean()) \
        if looking["looks_at"].notna().any() else np.nan
    summary["looks_at"] = {
        "sham_rate": sham_rate, "sham_share": len(shams.names) / n_regions,
        "unresolvable": int((~looking["looks_at_resolvable"]).sum()),
        "note": "share of channels whose largest D is at a sham region, against the share "
                "of regions that are shams (what a sham wins by chance)",
    }
    mapping = detectors.merge(looking, on=["layer", "channel"], how="left")
    measures = scores.assign(looks_at=[f"AU{a}" for a in scores["au"]])
    keep = ["hit_rate", "chance_rate", "iou"]
    mapping = mapping.merge(measures[["layer", "channel", "looks_at", *keep]],
                            on=["layer", "channel", "looks_at"], how="left")
    mapping["n_images"] = len(faceset.faces)
    if "label_auc" in scores:
        label = scores[["layer", "channel", "au", "label_auc"]].rename(
            columns={"au": "candidate_au"})
        mapping = mapping.merge(label, on=["layer", "channel", "candidate_au"], how="left")
    present = [c for c in MAPPING_COLUMNS if c in mapping]
    extra = [c for c in ("label_auc",) if c in mapping]
    return mapping[[*present, *extra]], scores, looks, control_detectors, summary
