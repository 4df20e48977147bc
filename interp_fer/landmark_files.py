"""Reading the reviewed JSON data files shipped in ``interp_fer.landmarks``.

The AU regions, sham regions and AU activity proxies are hand-reviewed JSON files that are
validated on load. This module reads one (the packaged copy or a user's file) and builds the
validated object, with every error prefixed by the file it came from.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

DATA_PACKAGE = "interp_fer.landmarks"

T = TypeVar("T")


def _packaged(filename: str) -> Any:
    from importlib.resources import files

    try:
        return files(DATA_PACKAGE).joinpath(filename)
    except ModuleNotFoundError:
        # A source checkout that is not installed: setup.cfg maps the top-level landmarks/
        # folder to interp_fer.landmarks only in installed (or editable) packages.
        return Path(__file__).resolve().parents[1] / "landmarks" / filename


def load_data_file(path: str | Path | None, filename: str, build: Callable[[Any], T],
                   what: str, error: type[Exception]) -> T:
    """Parse a reviewed JSON file and build its validated object.

    Parameters
    ----------
    path
        A user's file, or ``None`` for the packaged ``interp_fer.landmarks/<filename>``.
    filename
        The packaged file's name (used only when ``path`` is ``None``).
    build
        Validates the parsed JSON and returns the object; raises ``error`` when invalid.
    what
        What the file holds, for the read error (e.g. ``"AU region data"``).
    error
        The exception type raised for unreadable or invalid data.

    Returns
    -------
    T
        What ``build`` returns.

    Raises
    ------
    error
        ``"<file>: cannot read <what>: ..."`` when the file cannot be read or parsed,
        ``"<file>: <problem>"`` when ``build`` rejects it.
    """
    if path is None:
        resource, label = _packaged(filename), f"{DATA_PACKAGE}/{filename}"
    else:
        resource = Path(path)
        label = str(resource)
    try:
        data = json.loads(resource.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise error(f"{label}: cannot read {what}: {exc}") from exc
    try:
        return build(data)
    except error as exc:
        raise error(f"{label}: {exc}") from exc
