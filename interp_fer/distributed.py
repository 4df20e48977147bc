"""The map job's pass over the faces on Dask workers (one machine or many).

:func:`interp_fer.mapping.stream_layers` cuts the faces into chunks of ``batch_size`` images
(the chunks of the :mod:`interp_fer.feature_store`). With a :class:`Cluster`, *shards* of
``shard`` consecutive chunks go to the workers; each worker runs the forward passes of the
network and its random-weights copies, the region responses and the extremum points of its
chunks, writes their rows to the shared feature store (each chunk is its own set of files)
and returns, per chunk, the chunk's own accumulators (:meth:`interp_fer.layer_mapping.
LayerMapping.empty`, filled with that chunk only). The client merges them strictly in chunk
order, so every running sum gets the same additions in the same order as in one process
(the histogram counts, integer-valued and so exact in any order, are summed per shard on the
worker and sent once, as compressed integers: most of an accumulator's bytes):
``mapping.csv`` and ``scores.csv`` are byte-identical whatever the number of workers and the
shard size. The decision then reads the store.

Faults: a worker that dies mid-shard loses only its task, which the scheduler gives to
another worker (writes are idempotent: the same rows, the same values). A client that dies
resumes from its checkpoint: chunks merged before it are not recomputed.

Dask is imported here only (``import interp_fer`` does not import it); it comes with the
``distributed`` extra (``pip install interp_fer[distributed]``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


class Cluster:
    """A Dask client that runs the map pass: a local cluster or an existing scheduler.

    Parameters
    ----------
    client
        A :class:`distributed.Client`.
    shard
        Chunks (batches of ``batch_size`` faces) per task.
    owned
        A cluster this object started and closes (:meth:`local`).
    """

    def __init__(self, client: Any, shard: int = 4, owned: Any = None) -> None:
        if shard < 1:
            raise ValueError(f"shard must be >= 1 chunk, not {shard}")
        self.client, self.shard, self._owned = client, shard, owned
        #: Apply :func:`interp_fer.memory.keep_freed_memory` on the workers before a pass.
        self.keep_freed_memory = True

    @classmethod
    def local(cls, workers: int, shard: int = 4, threads: int = 1) -> Cluster:
        """Start a ``LocalCluster`` of ``workers`` processes with ``threads`` threads each."""
        if workers < 1:
            raise ValueError(f"--workers must be >= 1, not {workers}")
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                               dashboard_address=None)
        return cls(Client(cluster), shard, owned=cluster)

    @classmethod
    def connect(cls, address: str, shard: int = 4, timeout: float = 30.0) -> Cluster:
        """Connect to a running ``dask scheduler`` at ``address`` (``tcp://host:8786``)."""
        from distributed import Client

        try:
            client = Client(address, timeout=timeout)
        except OSError as error:
            raise ConnectionError(f"--scheduler {address}: no Dask scheduler answered "
                                  f"({error})") from error
        return cls(client, shard)

    @property
    def n_workers(self) -> int:
        """Workers the scheduler knows now."""
        return len(self.client.scheduler_info()["workers"])

    def close(self) -> None:
        """Close the client (and the local cluster when this object started it)."""
        self.client.close()
        if self._owned is not None:
            self._owned.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, job: Any, stream: Any, start: int, checkpoint: Any, bar: Any) -> None:
        """Run chunks ``start ..`` of ``job`` on the workers and merge them into ``stream``.

        Parameters
        ----------
        job
            The pass (:class:`interp_fer.mapping._MapPass`).
        stream
            The :class:`interp_fer.mapping.Stream` holding chunks ``< start`` (calibrated,
            possibly restored from a checkpoint), over a feature store.
        start
            First chunk to compute.
        checkpoint
            A :class:`interp_fer.checkpoint.Checkpoint` or None; saved when due, with the
            number of chunks merged.
        bar
            A tqdm progress bar (faces).
        """
        from distributed import as_completed

        from .mapping import Stream

        n_chunks = len(job.batches)
        path = str(stream.store.path)
        if self.keep_freed_memory:
            # As the CLI does for itself: the pass frees and reallocates MBs per batch, and
            # Dask's nanny asks malloc to trim eagerly (a worker was ~1.5x slower per batch).
            from .memory import keep_freed_memory

            self.client.run(keep_freed_memory)
        empties = {name: acc.empty() for name, acc in stream.accumulators.items()}
        [job_ref] = self.client.scatter([job], broadcast=True, hash=False)
        [empty_ref] = self.client.scatter([empties], broadcast=True, hash=False)
        shards = _shards(start, n_chunks, self.shard)
        # A window of tasks in flight: merged partials are dropped, so the client holds at
        # most `window` shards' accumulators whatever the number of faces.
        window = max(2, 2 * self.n_workers)
        running = as_completed()
        for numbers in _take(shards, window):
            running.add(self._submit(job_ref, empty_ref, path, numbers))
        pending: dict[int, Any] = {}
        shard_counts: dict[int, Any] = {}  # by the shard's last chunk
        cursor = start
        for future in running:
            counts, partials = future.result()
            for number, partial in partials:
                pending[number] = partial
            shard_counts[partials[-1][0]] = counts
            future.release()
            while cursor in pending:
                stream.merge(Stream.from_partial(pending.pop(cursor), stream.store))
                bar.update(len(job.batches[cursor]))
                # A shard's counts (integer sums: any order) join once all its chunks have,
                # so a checkpoint after `cursor` chunks holds exactly those chunks.
                # Checkpoints only there: between a shard's chunks its counts are missing.
                boundary = cursor in shard_counts
                if boundary:
                    _add_counts(stream, shard_counts.pop(cursor))
                cursor += 1
                if boundary and checkpoint is not None and cursor < n_chunks \
                        and checkpoint.due():
                    checkpoint.save(cursor, stream.state())
            for numbers in _take(shards, 1):
                running.add(self._submit(job_ref, empty_ref, path, numbers))
        if cursor != n_chunks:
            raise RuntimeError(f"{path}: merged {cursor} of {n_chunks} chunks; the workers "
                               "returned no result for the others")

    def _submit(self, job_ref: Any, empty_ref: Any, path: str, numbers: list[int]) -> Any:
        return self.client.submit(run_shard, job_ref, empty_ref, path, numbers, pure=False)


def run_shard(job: Any, empties: dict[str, Any], path: str, numbers: list[int]
              ) -> tuple[dict[str, list[Any]], list[tuple[int, dict[str, Any]]]]:
    """A worker's task: chunks ``numbers`` of ``job``, written to the store at ``path``.

    Returns
    -------
    counts
        Per layer, the histogram counts of the whole shard (peak histograms, and label
        histograms or None): integer sums, exact in any order, so summed here once rather
        than sent per chunk (they are most of an accumulator's bytes).
    partials
        Per chunk, ``(number, partial)``: its own accumulators without those counts,
        containment and agreement (:meth:`interp_fer.mapping.Stream.partial`), to be merged
        in chunk order (their floating-point sums depend on the order).
    """
    from .feature_store import FeatureStore
    from .mapping import _Clock

    store = FeatureStore.reopen(path)
    out = []
    counts: dict[str, list[Any]] = {}
    for number in numbers:
        part = job.empty_stream(empties, store)
        job.run_batch(number, part, _Clock())
        for name, acc in part.accumulators.items():
            mine = [acc.peaks.counts] + ([acc.labels.au_counts, acc.labels.class_counts]
                                         if acc.labels is not None else [])
            if name in counts:
                for total, add in zip(counts[name], mine, strict=True):
                    total += add
            else:
                counts[name] = mine
            acc.peaks.counts = None
            if acc.labels is not None:
                acc.labels.au_counts = acc.labels.class_counts = None
        out.append((number, part.partial()))
    return {name: [_pack(a) for a in arrays] for name, arrays in counts.items()}, out


def _pack(counts: np.ndarray) -> tuple[Any, ...]:
    """Integer counts as compressed uint32 (mostly zeros: a fraction of the float64 bytes)."""
    from numcodecs import Zstd

    if counts.size and (counts.max() >= 2**32 or counts.min() < 0
                        or not np.array_equal(counts, np.floor(counts))):
        return ("raw", counts)  # not small integers: send as they are
    return ("zstd", counts.shape, Zstd(level=1).encode(counts.astype(np.uint32)))


def _unpack(packed: tuple[Any, ...]) -> np.ndarray:
    from numcodecs import Zstd

    if packed[0] == "raw":
        return packed[1]
    return np.frombuffer(Zstd().decode(packed[2]), dtype=np.uint32).reshape(packed[1])


def _add_counts(stream: Any, counts: dict[str, list[Any]]) -> None:
    for name, packed in counts.items():
        arrays = [_unpack(p) for p in packed]
        acc = stream.accumulators[name]
        acc.peaks.counts += arrays[0]
        if acc.labels is not None:
            acc.labels.au_counts += arrays[1]
            acc.labels.class_counts += arrays[2]


def _shards(start: int, stop: int, size: int) -> Iterator[list[int]]:
    for first in range(start, stop, size):
        yield list(range(first, min(first + size, stop)))


def _take(items: Iterator[list[int]], n: int) -> list[list[int]]:
    out = []
    for _ in range(n):
        item = next(items, None)
        if item is None:
            break
        out.append(item)
    return out
