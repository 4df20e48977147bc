"""Checkpoints for long streaming passes: resume after a crash or ``kill -9``.

A checkpoint is one ``.npz`` file of named numpy arrays plus a JSON header holding the run's
*key* (a digest of every argument that changes the result) and a cursor (how many records
were consumed). It is written to a temporary file and renamed over the old one, so a process
killed at any instant leaves either the previous checkpoint or the new one, never half of
one. A checkpoint whose key differs from the current run's is ignored (and replaced): changing
an argument invalidates it.

The temporary file is removed on every exit path of :meth:`Checkpoint.save` (an exception or
Ctrl-C while writing); after a ``kill -9`` it stays, named after the dead process, and the next
:class:`Checkpoint` on that path removes it. :meth:`Checkpoint.due` is a time-based policy:
a checkpoint is due every ``interval`` seconds of the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1


def run_key(arguments: Mapping[str, Any]) -> str:
    """Digest of the arguments that determine a run's result (JSON-serialisable values)."""
    text = json.dumps(arguments, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Checkpoint:
    """One resumable state file.

    Attributes
    ----------
    path
        The ``.npz`` file.
    key
        :func:`run_key` of the current run's arguments.
    interval
        Seconds between checkpoints for :meth:`due` (default one minute).
    """

    path: Path
    key: str
    interval: float = 60.0
    _last: float = field(default_factory=time.monotonic, init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.interval <= 0:
            raise ValueError(f"checkpoint interval must be > 0 seconds, not {self.interval}")
        self.remove_stale_temp_files()

    def remove_stale_temp_files(self) -> list[Path]:
        """Remove this checkpoint's temporary files left by dead processes (``kill -9``)."""
        from .outputs import pid_alive

        removed = []
        prefix = f".{self.path.name}."
        if not self.path.parent.is_dir():
            return removed
        for entry in self.path.parent.glob(f"{prefix}*.tmp"):
            pid = entry.name[len(prefix):-len(".tmp")]
            if pid.isdigit() and not pid_alive(int(pid)):
                entry.unlink(missing_ok=True)
                removed.append(entry)
        return removed

    def due(self, now: float | None = None) -> bool:
        """True when ``interval`` seconds have passed since the last save (or since creation).

        ``now`` is a :func:`time.monotonic` reading (default: the current one).
        """
        now = time.monotonic() if now is None else now
        return now - self._last >= self.interval

    def load(self) -> tuple[int, dict[str, np.ndarray]] | None:
        """Return ``(cursor, arrays)`` of a checkpoint made by the same run, else None."""
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as archive:
                header = json.loads(str(archive["__header__"]))
                if header.get("key") != self.key or header.get("format") != FORMAT:
                    return None
                arrays = {name: archive[name] for name in archive.files if name != "__header__"}
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            return None  # unreadable or foreign: start again rather than fail
        return int(header["cursor"]), arrays

    def save(self, cursor: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Atomically replace the checkpoint with ``arrays`` after ``cursor`` records."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = json.dumps({"key": self.key, "cursor": int(cursor), "format": FORMAT})
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(partial, "wb") as handle:
                np.savez(handle, __header__=np.array(header), **arrays)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, self.path)
        finally:  # an error or Ctrl-C while writing must not leave the partial file behind
            partial.unlink(missing_ok=True)
        self._last = time.monotonic()

    def clear(self) -> None:
        """Remove the checkpoint (after the run's outputs are written)."""
        self.path.unlink(missing_ok=True)
