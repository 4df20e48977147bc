"""Where interp_fer keeps what it downloads and caches.

One directory holds the zoo's converted weights, the sample faces and the landmark cache.
It is ``$INTERP_FER_CACHE`` when set, else ``$XDG_CACHE_HOME/interp_fer``, else
``~/.cache/interp_fer``. Nothing is created until something is written.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "INTERP_FER_CACHE"


def cache_dir(*parts: str) -> Path:
    """Return the cache directory (or a sub-directory of it), creating it.

    Parameters
    ----------
    *parts
        Optional sub-directory names, e.g. ``cache_dir("zoo")``.

    Returns
    -------
    pathlib.Path
        An existing directory.
    """
    root = os.environ.get(CACHE_ENV)
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "interp_fer"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
