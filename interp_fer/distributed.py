"""The map job's pass over the faces on Dask workers (one machine or many).

:func:`interp_fer.mapping.stream_layers` cuts the faces into chunks of ``batch_size`` images
(the chunks of the :mod:`interp_fer.feature_store`). With a :class:`Cluster`, *shards* of
``shard`` chunks go to the workers; each worker runs the forward passes of the network and
its random-weights copies, the region responses and the extremum points of its chunks, and
writes, per chunk, its rows and its *partial*: the chunk's own accumulators
(:meth:`interp_fer.layer_mapping.LayerMapping.empty`, filled with that chunk only),
containment and agreement counts, saved atomically under ``features.zarr/partials/`` before
the chunk is flagged complete (:meth:`interp_fer.feature_store.FeatureStore.put_partial`).
The histogram counts, integer-valued, are saved as compressed integers (most of an
accumulator's bytes, mostly zeros). The client reads the partials back and merges them
strictly in chunk order, so every running sum gets the same additions in the same order as
in one process: ``mapping.csv`` and ``scores.csv`` are byte-identical whatever the number of
workers and the shard size. The counts, integers, are exact in any order: the worker also
sums them over its shard and sends that sum back, which the client adds once the shard's
chunks are merged (it reads a chunk's own counts only when resuming), so it decompresses and
adds them once per shard, not per chunk. The decision then reads the store.

Faults: a worker that dies mid-shard loses only its task, which the scheduler gives to
another worker (writes are idempotent: the same rows, the same values). A client that dies
resumes from its checkpoint (cursor *c*): chunks ``>= c`` that are complete *and* have a
partial are merged from disk, counts included, not recomputed; only the others go to the
workers. Checkpoints are taken where every merged chunk's counts are in (after a shard's last
chunk, or a resumed chunk). After each checkpoint the partials of the chunks before it are
deleted, and all of them at the end of the pass (a partial is ~24 MiB for a batch of 64 faces
and every mini-Xception stage, 9 MiB of it counts; disk holds the chunks of about one
checkpoint interval, more while a slow chunk holds the merge back). A client killed between
the end of the pass and the final checkpoint recomputes the chunks after the previous one.

The single-process pass keeps its in-memory accumulators and saves no partials: it never
has finished chunks ahead of its cursor except the one being written, so a kill loses at
most one checkpoint interval (default a minute); per-chunk files would cost every batch a
write for that.

Devices: ``device`` (``interp-fer map --device``) is resolved on each worker by
:func:`worker_device`: ``auto`` takes the worker's GPU when it has one, else the CPU;
``cuda`` refuses a worker without one, naming it. Worker *i* of a machine with *n* GPUs
takes GPU ``i mod n`` (:func:`worker_rank` says what *i* is); a worker whose
``CUDA_VISIBLE_DEVICES`` shows one GPU takes that one. Under dask-cuda, which rotates each
worker's ``CUDA_VISIBLE_DEVICES`` so that its own GPU comes first, give ``cuda:0``. The
networks go to the workers on the CPU and move to the worker's device once per worker
process; results come back as CPU numpy arrays. Results are byte-identical between runs on
the same kind of device; a GPU's floating-point rounding differs from a CPU's, so a run on
workers of both kinds warns (its files depend on which worker ran which chunk).
:attr:`Cluster.devices` (and ``run.json``'s ``distributed``) says which worker used what.

Dask is imported here only (``import interp_fer`` does not import it); it comes with the
``distributed`` extra (``pip install interp_fer[distributed]``).
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

#: The ``device`` choices of a distributed pass (besides an explicit ``cuda:N``).
DEVICES = ("auto", "cpu", "cuda")

#: Keys of a partial's histogram counts (integers held as float64): saved compressed.
_COUNTS = ("peaks.counts", "labels.au_counts", "labels.class_counts")
#: Name prefixes of the saved counts (:func:`_pack_counts`).
_PACKED = ("zstd/", "shape/", "raw/")

# Moving a worker's networks is done once per process; with several threads per worker
# two tasks may start together.
_MOVING = threading.Lock()


def worker_device(requested: str, n_cuda: int, worker_rank: int) -> str:
    """The torch device a worker runs the pass on.

    Parameters
    ----------
    requested
        ``"auto"`` (a CUDA device when the worker sees one, else the CPU), ``"cpu"``,
        ``"cuda"`` (one is required) or ``"cuda:N"`` (that one, on every worker).
    n_cuda
        CUDA devices the worker sees (``torch.cuda.device_count()``, which honours
        ``CUDA_VISIBLE_DEVICES``).
    worker_rank
        The worker's rank among the workers of its machine (:func:`worker_rank`).

    Returns
    -------
    str
        ``"cpu"`` or ``"cuda:i"`` with ``i = worker_rank mod n_cuda``.

    Raises
    ------
    ValueError
        An unknown choice, ``cuda`` without a CUDA device, ``cuda:N`` beyond the devices.
    """
    if worker_rank < 0:
        raise ValueError(f"worker rank must be >= 0, not {worker_rank}")
    explicit = re.fullmatch(r"cuda:(\d+)", requested)
    if requested not in DEVICES and explicit is None:
        raise ValueError(f"device {requested!r} for the Dask workers: choose auto, cpu, cuda "
                         "or cuda:N")
    if requested == "cpu" or (requested == "auto" and n_cuda == 0):
        return "cpu"
    if n_cuda == 0:
        raise ValueError(f"--device {requested}: torch sees no CUDA device here "
                         "(use --device auto or cpu)")
    if explicit is not None:
        if int(explicit.group(1)) >= n_cuda:
            raise ValueError(f"--device {requested}: torch sees {n_cuda} CUDA device(s) here")
        return requested
    return f"cuda:{worker_rank % n_cuda}"


def worker_rank(name: str | int, names_on_host: Iterable[str | int] = ()) -> int:
    """A worker's rank among the workers of its machine (which GPU it takes).

    The integer a worker's name ends with, when it has one: a ``LocalCluster`` names its
    workers ``0, 1, ...`` and ``dask worker --name NAME --nworkers N`` names them
    ``NAME-0 .. NAME-{N-1}``; the nanny restarts a killed worker under the same name, so
    the rank is stable. Otherwise (``dask worker`` without ``--name`` names a worker after
    its address) its position among ``names_on_host`` and itself, sorted as text.
    """
    text = str(name)
    if text.isdigit():
        return int(text)
    suffix = re.fullmatch(r".*-(\d+)", text)
    if suffix is not None:
        return int(suffix.group(1))
    return sorted({str(n) for n in names_on_host} | {text}).index(text)


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
    device
        Where each worker runs the networks: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``
        (:func:`worker_device`).

    Attributes
    ----------
    devices
        ``{worker name: device}`` of the last pass (every worker at its start, and any that
        ran a task).
    submitted
        The chunks the last pass sent to the workers (the others were merged from disk).
    """

    def __init__(self, client: Any, shard: int = 4, owned: Any = None,
                 device: str = "auto") -> None:
        if shard < 1:
            raise ValueError(f"shard must be >= 1 chunk, not {shard}")
        if device not in DEVICES and re.fullmatch(r"cuda:\d+", device) is None:
            # An unknown choice fails here, not on the workers.
            raise ValueError(f"device {device!r} for the Dask workers: choose auto, cpu, "
                             "cuda or cuda:N")
        self.client, self.shard, self._owned, self.device = client, shard, owned, device
        #: Apply :func:`interp_fer.memory.keep_freed_memory` on the workers before a pass.
        self.keep_freed_memory = True
        self.devices: dict[str, str] = {}
        self.submitted: list[int] = []

    @classmethod
    def local(cls, workers: int, shard: int = 4, threads: int = 1,
              device: str = "auto") -> Cluster:
        """Start a ``LocalCluster`` of ``workers`` processes with ``threads`` threads each."""
        if workers < 1:
            raise ValueError(f"--workers must be >= 1, not {workers}")
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                               dashboard_address=":0")  # a free port: never "8787 in use"
        return cls(Client(cluster), shard, owned=cluster, device=device)

    @classmethod
    def connect(cls, address: str, shard: int = 4, timeout: float = 30.0,
                device: str = "auto") -> Cluster:
        """Connect to a running ``dask scheduler`` at ``address`` (``tcp://host:8786``)."""
        from distributed import Client

        try:
            client = Client(address, timeout=timeout)
        except OSError as error:
            raise ConnectionError(f"--scheduler {address}: no Dask scheduler answered within "
                                  f"{timeout:.0f} s ({error}); start one with `dask scheduler` "
                                  "or check the address (tcp://HOST:8786)") from error
        except ValueError as error:  # e.g. the dashboard's http:// address
            raise ConnectionError(f"--scheduler {address}: not a scheduler address ({error}); "
                                  "give tcp://HOST:8786") from error
        try:
            client.wait_for_workers(1, timeout=timeout)
        except (TimeoutError, OSError) as error:
            client.close()
            raise ConnectionError(f"--scheduler {address}: the scheduler has no workers after "
                                  f"{timeout:.0f} s; start some with `dask worker {address}`"
                                  ) from error
        return cls(client, shard, device=device)

    @property
    def n_workers(self) -> int:
        """Workers the scheduler knows now."""
        return len(self.client.scheduler_info()["workers"])

    def record(self) -> dict[str, Any]:
        """What ``run.json`` says of the last pass: shard, device choice, device per worker."""
        return {"shard": self.shard, "device": self.device,
                "workers": dict(sorted(self.devices.items()))}

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

        Chunks the store holds complete with a partial (a killed client's) are merged from
        disk instead.

        Parameters
        ----------
        job
            The pass (:class:`interp_fer.mapping._MapPass`).
        stream
            The :class:`interp_fer.mapping.Stream` holding chunks ``< start`` (calibrated,
            possibly restored from a checkpoint), over a feature store.
        start
            First chunk to merge.
        checkpoint
            A :class:`interp_fer.checkpoint.Checkpoint` or None; saved when due, with the
            number of chunks merged.
        bar
            A tqdm progress bar (faces).
        """
        from distributed import as_completed

        store = stream.store
        n_chunks = len(job.batches)
        if self.keep_freed_memory:
            # As the CLI does for itself: the pass frees and reallocates MBs per batch, and
            # Dask's nanny asks malloc to trim eagerly (a worker was ~1.5x slower per batch).
            from .memory import keep_freed_memory

            self.client.run(keep_freed_memory)
        ranks = self._ranks()
        # Every worker resolves its device now, so a worker without CUDA under --device cuda
        # stops the pass before any work.
        self.devices = {str(name): device for name, device in
                        self.client.run(_device_of, self.device, ranks).values()}
        empties = {name: acc.empty() for name, acc in stream.accumulators.items()}
        job_ref, empty_ref = self._scatter_on_cpu(job, empties)
        complete = store.complete()
        saved = store.partial_numbers()
        on_disk = {n for n in range(start, n_chunks) if complete[n] and n in saved}
        self.submitted = []
        shards = _shards([n for n in range(start, n_chunks) if n not in on_disk], self.shard)

        def submit(numbers: list[int]) -> Any:
            self.submitted.extend(numbers)
            return self.client.submit(run_shard, job_ref, empty_ref, str(store.path), numbers,
                                      self.device, ranks, pure=False)

        # A window of tasks in flight; partials wait on disk, not in the client's memory.
        window = max(2, 2 * self.n_workers)
        running = as_completed([submit(numbers) for numbers in _take(shards, window)])
        merger = _Merger(job, stream, empties, checkpoint, bar, start, on_disk)
        for number in merger.advance():
            running.add(submit([number]))
        for future in running:
            worker, device, numbers, counts = future.result()
            future.release()
            self.devices[str(worker)] = device
            merger.ready.update(numbers)
            merger.shard_counts[numbers[-1]] = counts
            for number in merger.advance():
                running.add(submit([number]))
            for numbers in _take(shards, 1):
                running.add(submit(numbers))
        if merger.cursor != n_chunks:
            raise RuntimeError(f"{store.path}: merged {merger.cursor} of {n_chunks} chunks; "
                               "the workers returned no result for the others")
        store.drop_partials()
        if len({device.split(":")[0] for device in self.devices.values()}) > 1:
            warnings.warn(f"the Dask workers ran on different kinds of device ({self.devices}): "
                          "CPU and GPU round differently, so this run's files depend on which "
                          "worker computed which chunk; give --device cpu or cuda",
                          RuntimeWarning, stacklevel=2)

    def _ranks(self) -> dict[str, int]:
        """``{worker name: rank}`` for :func:`worker_device`, machine by machine."""
        by_host: dict[str, list[str]] = {}
        for info in self.client.scheduler_info()["workers"].values():
            by_host.setdefault(info["host"], []).append(str(info["name"]))
        return {name: worker_rank(name, names) for names in by_host.values() for name in names}

    def _scatter_on_cpu(self, job: Any, empties: dict[str, Any]) -> tuple[Any, Any]:
        # A worker without CUDA cannot unpickle CUDA tensors: send the networks on the CPU
        # (each worker moves them to its own device), then put the client's back.
        device = job.model.device
        job.to("cpu")
        try:
            [job_ref] = self.client.scatter([job], broadcast=True, hash=False)
            [empty_ref] = self.client.scatter([empties], broadcast=True, hash=False)
        finally:
            job.to(device)
        return job_ref, empty_ref


class _Merger:
    """Merges chunk partials into the stream in chunk order, from the store's files."""

    def __init__(self, job: Any, stream: Any, empties: dict[str, Any], checkpoint: Any,
                 bar: Any, start: int, on_disk: set[int]) -> None:
        self.job, self.stream, self.empties = job, stream, empties
        self.checkpoint, self.bar = checkpoint, bar
        self.cursor = start
        #: Chunks whose partial is on disk, waiting for the cursor.
        self.ready = set(on_disk)
        #: A computed shard's summed counts, by its last chunk (added once it is merged).
        self.shard_counts: dict[int, dict[str, np.ndarray]] = {}
        self._resumed = set(on_disk)
        empty = job.empty_stream(empties, stream.store).state()
        self._count_keys = [key for key in empty if key.endswith(_COUNTS)]

    def advance(self) -> list[int]:
        """Merge the ready chunks at the cursor; return resumed chunks to compute again
        (their partial could not be read)."""
        store, n_chunks = self.stream.store, len(self.job.batches)
        while self.cursor in self.ready:
            number = self.cursor
            resumed = number in self._resumed
            # A computed chunk's counts come with its shard's sum: not read here.
            arrays = store.partial(number, skip=() if resumed else _PACKED)
            if arrays is None:
                self.ready.discard(number)
                if number in self._resumed:  # a killed run's file, e.g. cut short
                    self._resumed.discard(number)
                    return [number]
                raise RuntimeError(f"{store.path}: chunk {number}'s partial accumulators "
                                   "could not be read back after a worker wrote them")
            arrays = _unpack_counts(arrays)
            if not resumed:
                arrays.update({key: None for key in self._count_keys})  # skipped by merge
            part = self.job.empty_stream(self.empties, store)
            part.restore(arrays)
            self.stream.merge(part)
            self.bar.update(len(self.job.batches[number]))
            self.ready.discard(number)
            self.cursor += 1
            # Every merged chunk's counts are in after a shard's last chunk (shards are runs
            # of consecutive chunks) or a resumed one: only there may a checkpoint be taken.
            boundary = resumed or number in self.shard_counts
            if number in self.shard_counts:
                _add_counts(self.stream, _unpack_counts(self.shard_counts.pop(number)))
            if boundary and self.checkpoint is not None and self.cursor < n_chunks \
                    and self.checkpoint.due():
                self.checkpoint.save(self.cursor, self.stream.state())
                store.drop_partials(below=self.cursor)
        return []


def run_shard(job: Any, empties: dict[str, Any], path: str, numbers: list[int],
              device: str = "auto", ranks: dict[str, int] | None = None
              ) -> tuple[str, str, list[int], dict[str, np.ndarray]]:
    """A worker's task: chunks ``numbers`` of ``job``, written to the store at ``path``.

    Each chunk's rows, then its partial (:meth:`interp_fer.mapping.Stream.state` of the
    chunk alone, histogram counts compressed), then its complete flag.

    Parameters
    ----------
    job, empties
        The pass and its calibrated empty accumulators.
    path
        The feature store.
    numbers
        Chunks to compute.
    device, ranks
        The pass's device choice and ``{worker name: rank}`` (:func:`worker_device`).

    Returns
    -------
    tuple
        ``(worker name, device used, numbers, counts)``: ``counts``, the histogram counts
        summed over the chunks (integers: exact in any order), compressed.
    """
    import torch

    from .feature_store import FeatureStore
    from .mapping import _Clock

    worker, used = _device_of(device, ranks or {})
    with _MOVING:  # once per worker process: the scattered pass stays in its memory
        if job.model.device != torch.device(used):
            job.to(used)
    store = FeatureStore.reopen(path)
    totals: dict[str, np.ndarray] = {}
    for number in numbers:
        part = job.empty_stream(empties, store)
        job.run_batch(number, part, _Clock(), complete=False)
        arrays = part.state()
        store.put_partial(number, _pack_counts(arrays))
        store.mark_complete(number)
        for key, values in arrays.items():
            if key.endswith(_COUNTS):
                if key in totals:
                    totals[key] += values
                else:
                    totals[key] = values  # the chunk's stream is dropped: no copy needed
    return worker, used, numbers, _pack_counts(totals)


def _device_of(requested: str, ranks: dict[str, int], dask_worker: Any = None
               ) -> tuple[str, str]:
    """``(worker name, device)`` of the worker this runs on (in a task or ``Client.run``)."""
    import torch

    if dask_worker is None:
        from distributed import get_worker

        try:
            dask_worker = get_worker()
        except ValueError:  # not on a Dask worker (run_shard called directly)
            dask_worker = None
    name = "local" if dask_worker is None else str(dask_worker.name)
    rank = ranks.get(name, worker_rank(name))
    try:
        return name, worker_device(requested, torch.cuda.device_count(), rank)
    except ValueError as error:
        raise RuntimeError(f"Dask worker {name}: {error}") from None


def _pack_counts(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Histogram counts as zstd-compressed uint32 bytes (``zstd/KEY`` and ``shape/KEY``).

    Mostly zeros: a fraction of the float64 bytes. Counts that are not integers in
    [0, 2**32) are kept as they are (``raw/KEY``); other arrays keep their names.
    """
    from numcodecs import Zstd

    out = {}
    for key, values in arrays.items():
        if not key.endswith(_COUNTS):
            out[key] = values
            continue
        with np.errstate(invalid="ignore"):
            small = values.astype(np.uint32)
        # One pass instead of min, max and floor: wrapped, cut or NaN values differ.
        if values.dtype == np.float64 and np.array_equal(small, values):
            out[f"zstd/{key}"] = np.frombuffer(Zstd(level=1).encode(small), dtype=np.uint8)
            out[f"shape/{key}"] = np.asarray(values.shape, dtype=np.int64)
        else:
            out[f"raw/{key}"] = values
    return out


def _unpack_counts(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of :func:`_pack_counts`; counts come back as uint32 (merged into float64
    sums, exactly, without a float64 copy)."""
    from numcodecs import Zstd

    out = {}
    for key, values in arrays.items():
        if key.startswith("zstd/"):
            name = key[len("zstd/"):]
            raw = np.frombuffer(Zstd().decode(values.tobytes()), dtype=np.uint32)
            out[name] = raw.reshape(tuple(arrays[f"shape/{name}"]))
        elif key.startswith("raw/"):
            out[key[len("raw/"):]] = values
        elif not key.startswith("shape/"):
            out[key] = values
    return out


def _add_counts(stream: Any, counts: dict[str, np.ndarray]) -> None:
    """Add a shard's summed counts (``acc/{layer}/{field}`` keys) to the stream's."""
    for key, values in counts.items():
        layer, field = key[len("acc/"):].rsplit("/", 1)
        owner, name = field.split(".")  # e.g. peaks.counts, labels.au_counts
        total = getattr(getattr(stream.accumulators[layer], owner), name)
        np.add(total, values, out=total)


def _shards(numbers: Sequence[int], size: int) -> Iterator[list[int]]:
    """Runs of at most ``size`` consecutive chunks (a gap, a resumed chunk, ends a run)."""
    shard: list[int] = []
    for number in numbers:
        if shard and (len(shard) == size or number != shard[-1] + 1):
            yield shard
            shard = []
        shard.append(number)
    if shard:
        yield shard


def _take(items: Iterator[list[int]], n: int) -> list[list[int]]:
    out = []
    for _ in range(n):
        item = next(items, None)
        if item is None:
            break
        out.append(item)
    return out
