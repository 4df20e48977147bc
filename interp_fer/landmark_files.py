"""Reading the reviewed JSON data files shipped in ``interp_fer.landmarks``.

The AU regions, sham regions and AU activity proxies are hand-reviewed JSON files that are
validated on load. This module reads one (the packaged copy or a user's file) and builds the
validated object, with every error prefixed by the file it came from.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

DATA_PACKAGE = "interp_fer.landmarks"

T = TypeVar("T")
E = TypeVar("E", bound=Exception)


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


# Checks the reviewed files share. Every error names the entry and the field:
# "<entry>: field '<field>': <problem>".


def field_error(error: type[E], entry: str, field: str, problem: str) -> E:
    """``error("<entry>: field '<field>': <problem>")``."""
    return error(f"{entry}: field '{field}': {problem}")


def check_fields(obj: Any, required: set[str], optional: set[str], entry: str, where: str, *,
                 error: type[Exception]) -> None:
    """Check that ``obj`` is a JSON object with every required field and no unknown one."""
    if not isinstance(obj, Mapping):
        raise field_error(error, entry, where, f"must be an object, got {type(obj).__name__}")
    missing = sorted(required - obj.keys())
    if missing:
        raise field_error(error, entry, where, f"missing {', '.join(missing)}")
    unknown = sorted(obj.keys() - required - optional)
    if unknown:
        raise field_error(error, entry, where, f"unknown field(s) {', '.join(unknown)}")


def check_au_key(key: str, seen: dict[int, str], *, error: type[Exception]) -> None:
    """Check an entry key is ``"AU" + number`` and no earlier key has its number (``seen``
    maps numbers to keys and gains this one)."""
    if not (key.startswith("AU") and key[2:].isdigit()):
        raise field_error(error, key, "(key)", "AU keys are 'AU' + number, e.g. 'AU01'")
    if int(key[2:]) in seen:
        raise field_error(error, key, "(key)", f"same AU number as {seen[int(key[2:])]}")
    seen[int(key[2:])] = key


def check_sources(sources: Any, known: Mapping[str, Any], entry: str, *,
                  error: type[Exception]) -> None:
    """Check an entry's ``sources`` is a non-empty list of keys of ``_meta.sources``."""
    if not isinstance(sources, list) or not sources:
        raise field_error(error, entry, "sources",
                          "must be a non-empty list of keys of _meta.sources")
    for s in sources:
        if s not in known:
            raise field_error(error, entry, "sources",
                              f"unknown source {s!r} (not in _meta.sources)")
