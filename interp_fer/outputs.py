"""Safe output files and folders: atomic writes, one run per folder, writability up front.

Every file a command writes goes through :func:`atomic_path` (or one of the ``write_*``
helpers built on it): the content is written to a temporary file in the same folder and
renamed over the target with :func:`os.replace`, so a reader never sees half a file and two
writers never interleave their bytes. The temporary file is removed on every exit path
(an exception, Ctrl-C, a SIGTERM turned into an exception by the CLI); after a ``kill -9``
it is left behind, named after the dead process, and :func:`remove_stale_temp_files`
(called when a folder is locked) removes it on the next run.

:class:`OutputLock` makes an output folder belong to one run at a time: a second run on the
same folder is refused with a message naming the first (pid, host, start time); the lock of
a process that no longer exists on this host is taken over with a warning.

:func:`check_writable_file` and :func:`check_writable_folder` prove, before any work, that an
output can be written, by creating and removing a probe file (``os.access`` alone says yes
to root on a read-only file system).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOCK_NAME = ".interp-fer.lock"

#: Temporary files of this module and of :mod:`interp_fer.checkpoint`:
#: ``.NAME.PID.tmp`` or ``.NAME.PID-RANDOM.tmp[.SUFFIX]``.
_TEMP = re.compile(r"^\..+\.(\d+)(?:-[0-9a-f]+)?\.tmp(?:\.[^.]+)?$")


class OutputError(OSError):
    """An output file or folder cannot be written, or the folder is in use by another run."""


class FolderInUseError(OutputError):
    """Another live run holds the output folder's lock."""


def _temp_name(path: Path) -> Path:
    # Keep the suffix last: matplotlib and pandas choose the format from it.
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``.

    Write the whole content to the yielded path inside the ``with`` block. When the block
    raises (Ctrl-C included) the temporary file is removed and ``path`` is left as it was.
    Parent folders are created.

    Examples
    --------
    >>> with atomic_path("out/table.csv") as tmp:            # doctest: +SKIP
    ...     frame.to_csv(tmp, index=False)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _temp_name(path)
    try:
        yield partial
        if not partial.exists():
            raise OutputError(f"{path}: nothing was written to the temporary file {partial.name}")
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Atomically write ``data`` to ``path``; returns the path."""
    with atomic_path(path) as partial:
        partial.write_bytes(data)
    return Path(path)


def write_text(text: str, path: str | os.PathLike, encoding: str = "utf-8") -> Path:
    """Atomically write ``text`` to ``path``; returns the path."""
    with atomic_path(path) as partial:
        partial.write_text(text, encoding=encoding)
    return Path(path)


def write_csv(frame: Any, path: str | os.PathLike, **options: Any) -> Path:
    """Atomically write a pandas DataFrame as CSV (``index=False`` unless given)."""
    options.setdefault("index", False)
    with atomic_path(path) as partial:
        frame.to_csv(partial, **options)
    return Path(path)


def write_json(value: Any, path: str | os.PathLike, **options: Any) -> Path:
    """Atomically write ``value`` as JSON (``indent=2`` unless given; ``json.dump`` options)."""
    options.setdefault("indent", 2)
    return write_text(json.dumps(value, **options) + "\n", path)


def save_figure(figure: Any, path: str | os.PathLike, **options: Any) -> Path:
    """Atomically save a matplotlib figure; the format comes from ``path``'s suffix."""
    path = Path(path)
    if path.suffix:
        options.setdefault("format", path.suffix[1:].lower())
    with atomic_path(path) as partial:
        figure.savefig(partial, **options)
    return path


def _probe(folder: Path, what: str) -> None:
    try:
        handle, name = _mkstemp(folder)
    except OSError as error:
        raise OutputError(f"{what}: cannot write in {folder} ({_reason(error)})") from error
    os.close(handle)
    os.unlink(name)


def _mkstemp(folder: Path) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(prefix=f".probe.{os.getpid()}-", suffix=".tmp", dir=folder)


def _reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


def check_writable_file(path: str | os.PathLike) -> Path:
    """Check, before any work, that the file ``path`` can be written (parents are created).

    Raises
    ------
    OutputError
        When ``path`` is a folder, its parent cannot be created, or nothing can be written
        there (read-only file system, permissions, a parent that is a file).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name")
    _make_folder(path.parent, str(path))
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{path}: exists and is not writable")
    _probe(path.parent, str(path))
    return path


def check_writable_folder(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` if needed and check, before any work, that it is writable.

    Raises
    ------
    OutputError
        When it cannot be created (a parent is a file, permissions, read-only file system)
        or nothing can be written in it.
    """
    path = Path(path).expanduser()
    _make_folder(path, str(path))
    _probe(path, str(path))
    return path


def _make_folder(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as error:
        raise OutputError(f"{what}: {folder} exists and is not a folder") from error
    except OSError as error:
        if error.errno == errno.ENOTDIR:
            raise OutputError(f"{what}: a parent of {folder} is a file, not a folder") from error
        raise OutputError(f"{what}: cannot create {folder} ({_reason(error)})") from error
    if not folder.is_dir():
        raise OutputError(f"{what}: {folder} exists and is not a folder")


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (True when it exists but is not ours)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove temporary files left in ``folder`` by processes that no longer exist.

    Only names written by this module and :mod:`interp_fer.checkpoint` are considered
    (``.NAME.PID[-RANDOM].tmp[.SUFFIX]``); the files of live processes are kept.

    Returns
    -------
    list of pathlib.Path
        The files removed.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMP.match(entry.name)
        if match and entry.is_file() and not pid_alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    return removed


class OutputLock:
    """Exclusive use of an output folder by one run (a context manager).

    The lock is the file ``FOLDER/.interp-fer.lock`` holding the owner's pid, host, start time
    and command, created atomically (written aside, then hard-linked into place, which fails
    when the file exists). Acquiring also removes temporary files of dead processes.

    Parameters
    ----------
    folder
        The output folder (created if needed).
    command
        What the run is, for the message another run gets (e.g. ``"interp-fer map ..."``).

    Raises
    ------
    FolderInUseError
        On entry, when a live process (or one on another host) holds the lock.
    """

    def __init__(self, folder: str | os.PathLike, command: str = "") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command
        self.held = False

    def _owner(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> OutputLock:
        """Take the lock (see the class); returns self."""
        _make_folder(self.folder, str(self.folder))
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": self.command}
        for _ in range(5):
            if self._link(me):
                self.held = True
                remove_stale_temp_files(self.folder)
                return self
            owner = self._owner()
            if owner is None:
                continue  # released between our attempt and our look: try again
            if not self._stale(owner):
                raise FolderInUseError(
                    f"{self.folder} is in use by another run (pid {owner.get('pid')} on "
                    f"{owner.get('host')}, started {owner.get('started')}"
                    + (f": {owner['command']}" if owner.get("command") else "")
                    + f"); wait for it or choose another output folder (remove {self.path} "
                    "only if that run is gone)")
            warnings.warn(f"{self.folder}: taking over the lock of a run that is gone "
                          f"(pid {owner.get('pid')}, started {owner.get('started')})",
                          stacklevel=2)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        raise FolderInUseError(f"{self.folder}: could not take the lock {self.path}")

    def _link(self, me: dict[str, Any]) -> bool:
        aside = _temp_name(self.path)
        try:
            aside.write_text(json.dumps(me))
            try:
                os.link(aside, self.path)
            except FileExistsError:
                return False
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                aside.unlink()

    @staticmethod
    def _stale(owner: dict[str, Any]) -> bool:
        if not owner:
            return True  # an unreadable lock file was not written by a run of ours
        if owner.get("host") != socket.gethostname():
            return False  # cannot tell whether a process on another machine lives
        return not pid_alive(int(owner.get("pid", -1)))

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.held and (self._owner() or {}).get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.held = False

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
