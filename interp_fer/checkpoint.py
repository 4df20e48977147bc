"""Checkpoints for long streaming passes: resume after a crash or ``kill -9``.

A checkpoint is one ``.npz`` file of named numpy arrays plus a JSON header holding the run's
*key* (a digest of every argument that changes the result) and a cursor (how many records
were consumed). It is written to a temporary file and renamed over the old one, so a process
killed at any instant leaves either the previous checkpoint or the new one, never half of
one. A checkpoint whose key differs from the current run's is ignored (and replaced): changing
an argument invalidates it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
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
    """

    path: Path
    key: str

    def __post_init__(self) -> None:
        self.path = Path(self.path)

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
        with open(partial, "wb") as handle:
            np.savez(handle, __header__=np.array(header), **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, self.path)

    def clear(self) -> None:
        """Remove the checkpoint (after the run's outputs are written)."""
        self.path.unlink(missing_ok=True)
