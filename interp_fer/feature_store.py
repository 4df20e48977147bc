"""Per-image features of a mapping run in a chunked on-disk store (Zarr), for any number of images.

The detector test ranks and permutes images, so it needs every image's responses, not a
summary. :class:`FeatureStore` keeps them on disk under the run's output folder
(``features.zarr``), one Zarr array per quantity, chunked along images:

``model/{layer}/in``, ``model/{layer}/out``  (N, K, A) float32
    each channel's peak response inside each AU region and on the rest of the face;
``model/{layer}/sham_in``, ``model/{layer}/sham_out``  (N, K, S) float32
    the same for the sham regions;
``control{i}/{layer}/in``, ``control{i}/{layer}/out``  (N, K, A) float32
    the same for the i-th random-weights copy;
``model/{layer}/points``  (N, K, 2) float32, ``model/{layer}/active``  (N, K) bool
    each channel's extremum point (row, col, input pixels) and whether it responds at all;
``index`` (N,) int64, ``landmarks`` (N, 68, 2) float32, ``activity`` (N, T) float64
    the face's dataset position, its landmarks on the network input grid and its AU activity;
attributes ``landmark_status`` (one code per *dataset* image, usable or not) and ``status_codes``
    every image's landmark status; also ``layers``, ``aus``, ``tested`` and ``shams``.

Rows are the mapped faces in dataset order. A *chunk* is ``chunk`` consecutive rows (one
batch of the pass); the ``complete`` array holds one flag per chunk, written only after every
array's rows of that chunk are, so a killed writer leaves its chunk incomplete and a resumed
run skips exactly the complete ones. Each chunk of each array is its own file, so processes
writing different chunks never touch the same file.

A distributed run (:mod:`interp_fer.distributed`) also keeps, per chunk, the chunk's own
accumulators (its *partial*, ``partials/{number:08d}.npz``, numeric arrays only), written
atomically before the chunk's flag, so a resumed client merges a complete chunk from its
partial instead of computing it again; they are deleted once merged and checkpointed.

The store belongs to one run: its ``key`` attribute (:func:`interp_fer.checkpoint.run_key`
of the arguments, weights and data) must match, or :meth:`FeatureStore.open` starts it afresh.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

#: File name of the store inside a run's output folder.
STORE_NAME = "features.zarr"
#: Subfolder (an empty Zarr group) of a distributed run's per-chunk partial accumulators.
PARTIALS = "partials"


def channel_block(array: Any, channels: slice, columns: list[int] | None = None) -> np.ndarray:
    """Every row of a (N, K, ...) Zarr array's ``channels``, only ``columns`` of its last axis."""
    last = slice(None) if columns is None else np.asarray(columns, dtype=np.int64)
    return np.asarray(array.oindex[(slice(None), channels, last)])


class FeatureStore:
    """Chunked per-image arrays of one mapping run (``features.zarr``).

    Same reading interface as :class:`interp_fer.mapping.ResponseStore` (:meth:`array`,
    :meth:`put`), so :func:`interp_fer.mapping.decide` reads either.

    Use :meth:`open` (create or reuse) rather than the constructor.
    """

    def __init__(self, path: Path, group: Any) -> None:
        self.path = path
        self._group = group

    @classmethod
    def open(cls, path: str | os.PathLike, key: str, n_rows: int, chunk: int) -> FeatureStore:
        """Open the store at ``path`` for a run, reusing it when it belongs to the same run.

        Parameters
        ----------
        path
            The ``.zarr`` folder.
        key
            The run's identity (:func:`interp_fer.checkpoint.run_key`); a store with another
            key, row count or chunk size is deleted and created afresh.
        n_rows
            Number of mapped faces N.
        chunk
            Rows per chunk (the pass's batch size).
        """
        import zarr

        if n_rows < 1 or chunk < 1:
            raise ValueError(f"{path}: a feature store needs n_rows >= 1 and chunk >= 1, "
                             f"not {n_rows} and {chunk}")
        path = Path(path)
        if path.exists():
            try:
                group = zarr.open_group(str(path), mode="r+")
                attrs = dict(group.attrs)
            except Exception:  # not a Zarr group (or a broken one): start afresh
                attrs = {}
            if (attrs.get("key"), attrs.get("n_rows"), attrs.get("chunk")) == (key, n_rows, chunk):
                return cls(path, group)
            if not (path / "zarr.json").is_file():
                raise FileExistsError(f"{path} exists and is not a feature store: remove it or "
                                      "choose another output folder")
            shutil.rmtree(path)
        group = zarr.open_group(str(path), mode="w")
        n_chunks = -(-n_rows // chunk)
        group.create_array("complete", shape=(n_chunks,), chunks=(1,), dtype="bool",
                           fill_value=False)
        group.attrs.update({"key": key, "n_rows": n_rows, "chunk": chunk})
        return cls(path, group)

    @classmethod
    def reopen(cls, path: str | os.PathLike) -> FeatureStore:
        """Open an existing store for writing chunks (a worker of a distributed run)."""
        import zarr

        return cls(Path(path), zarr.open_group(str(path), mode="r+"))

    # -- layout -------------------------------------------------------------------------

    @property
    def n_rows(self) -> int:
        """Number of rows (mapped faces)."""
        return int(self._group.attrs["n_rows"])

    @property
    def chunk(self) -> int:
        """Rows per chunk."""
        return int(self._group.attrs["chunk"])

    @property
    def n_chunks(self) -> int:
        """Number of chunks."""
        return -(-self.n_rows // self.chunk)

    def rows(self, number: int) -> slice:
        """The rows of chunk ``number``."""
        return slice(number * self.chunk, min((number + 1) * self.chunk, self.n_rows))

    def ensure(self, layout: Mapping[str, tuple[tuple[int, ...], str]]) -> None:
        """Create the arrays of ``layout`` (name -> (shape after the row axis, dtype)).

        Arrays that exist already are kept when their shape and dtype match; a mismatch is an
        error (the key should have changed).
        """
        for name, (trailing, dtype) in layout.items():
            shape = (self.n_rows, *trailing)
            if name in self._group:
                existing = self._group[name]
                if tuple(existing.shape) != shape or np.dtype(existing.dtype) != np.dtype(dtype):
                    raise ValueError(f"{self.path}: array {name} is {existing.shape} "
                                     f"{existing.dtype}, this run needs {shape} {dtype}")
                continue
            fill = np.nan if np.dtype(dtype).kind == "f" else 0
            self._group.create_array(name, shape=shape, chunks=(self.chunk, *trailing),
                                     dtype=dtype, fill_value=fill)

    # -- writing ------------------------------------------------------------------------

    def put(self, name: str, start: int, values: np.ndarray) -> None:
        """Write rows ``start ..`` of array ``name`` (created by :meth:`ensure`)."""
        if name not in self._group:
            raise KeyError(f"{self.path}: no array {name} (not in the run's layout)")
        target = self._group[name]
        target[start:start + len(values)] = np.asarray(values, dtype=target.dtype)

    def write_all(self, name: str, values: np.ndarray) -> None:
        """Write every row of ``name`` at once (per-face arrays known before the pass)."""
        self.put(name, 0, values)

    def mark_complete(self, number: int) -> None:
        """Flag chunk ``number`` as fully written (call after every array's rows are)."""
        self._group["complete"][number] = True

    def complete(self) -> np.ndarray:
        """(n_chunks,) boolean: which chunks are fully written."""
        return np.asarray(self._group["complete"][:], dtype=bool)

    def set_attrs(self, **values: Any) -> None:
        """Store JSON-serialisable attributes (e.g. the landmark status codes)."""
        self._group.attrs.update(values)

    @property
    def attrs(self) -> dict[str, Any]:
        """The store's attributes."""
        return dict(self._group.attrs)

    # -- per-chunk partial accumulators of a distributed run ------------------------------

    def _partials(self) -> Path:
        folder = self.path / PARTIALS
        if not (folder / "zarr.json").is_file():
            # An empty Zarr group, so that Zarr lists it as one (not as a foreign folder).
            self._group.require_group(PARTIALS)
        return folder

    def _partial_path(self, number: int) -> Path:
        if not 0 <= number < self.n_chunks:
            raise IndexError(f"{self.path}: no chunk {number} (the store has {self.n_chunks})")
        return self.path / PARTIALS / f"{number:08d}.npz"

    def put_partial(self, number: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Save chunk ``number``'s partial accumulators (numeric arrays; no pickles).

        Written to a temporary file and renamed, so a reader sees the whole file or none:
        call it before :meth:`mark_complete`, and a complete chunk with a partial can be
        merged without being recomputed.
        """
        from .outputs import atomic_path

        path = self._partial_path(number)
        values = {name: np.asarray(v) for name, v in arrays.items()}
        for name, v in values.items():
            if v.dtype.hasobject:
                raise TypeError(f"{self.path}: partial {number}: array {name} holds Python "
                                "objects; a partial stores numeric arrays only")
        self._partials()
        with atomic_path(path) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, **values)

    def partial(self, number: int, skip: tuple[str, ...] = ()) -> dict[str, np.ndarray] | None:
        """Chunk ``number``'s partial (:meth:`put_partial`), or None when there is none or it
        cannot be read (the chunk is then computed again).

        ``skip``: arrays whose names start with one of these are not read.
        """
        path = self._partial_path(number)
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files
                        if not name.startswith(skip)}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            return None

    def partial_numbers(self) -> set[int]:
        """The chunks that have a partial on disk."""
        folder = self.path / PARTIALS
        if not folder.is_dir():
            return set()
        return {int(f.stem) for f in folder.glob("*.npz") if f.stem.isdigit()}

    def drop_partials(self, below: int | None = None) -> None:
        """Delete the partials of chunks ``< below`` (merged and checkpointed); with no
        ``below``, the whole folder, temporary files of killed writers included (call it
        only when no worker writes any more: at the end of the pass)."""
        folder = self.path / PARTIALS
        if below is None:
            shutil.rmtree(folder, ignore_errors=True)
            return
        for number in self.partial_numbers():
            if number < below:
                (folder / f"{number:08d}.npz").unlink(missing_ok=True)

    # -- reading ------------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self._group

    def array(self, name: str, columns: list[int] | None = None) -> np.ndarray:
        """Every row of ``name`` as a numpy array (read chunk by chunk).

        ``columns``: only these positions of the last axis (e.g. the tested AUs), read
        without the others ever being in memory.
        """
        if name not in self._group:
            raise KeyError(f"{self.path}: no array {name}")
        target = self._group[name]
        if columns is None:
            return np.asarray(target[:])
        index = (slice(None),) * (target.ndim - 1) + (np.asarray(columns, dtype=np.int64),)
        return np.asarray(target.oindex[index])

    def block(self, name: str, channels: slice, columns: list[int] | None = None) -> np.ndarray:
        """Every row of channels ``channels`` (axis 1) of ``name``, only ``columns`` of its
        last axis: (N, k, len(columns)), read chunk by chunk without the other channels
        staying in memory (the decision's blocks, :mod:`interp_fer.decision`)."""
        if name not in self._group:
            raise KeyError(f"{self.path}: no array {name}")
        return channel_block(self._group[name], channels, columns)

    def dask_array(self, name: str) -> Any:
        """``name`` as a dask array with the store's chunks (dask is imported here only)."""
        import dask.array as da

        return da.from_zarr(self._group[name])

    def nbytes_stored(self) -> int:
        """Bytes the store takes on disk."""
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    # -- the ResponseStore interface of a checkpoint (the data is on disk, not in it) ----

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        if arrays:
            raise ValueError(f"{self.path}: the checkpoint holds in-memory responses; it "
                             "belongs to a run without a feature store")
