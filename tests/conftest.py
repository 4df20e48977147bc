"""Shared fixtures: zoo models, sample faces and the optional FER2013 test split.

FER2013 is found at ``$INTERP_FER_FER2013`` or ``../shared/data/fer2013`` beside the
repository; tests that need it are skipped when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def fer2013_root() -> Path | None:
    """The FER2013 test-split folder, or None when it is not on this machine."""
    candidate = Path(os.environ.get("INTERP_FER_FER2013", REPO.parent / "shared/data/fer2013"))
    return candidate if (candidate / "test_labels.csv").is_file() else None


@pytest.fixture(scope="session")
def fer2013() -> Path:
    root = fer2013_root()
    if root is None:
        pytest.skip("FER2013 test split not present (set INTERP_FER_FER2013)")
    return root


@pytest.fixture(scope="session")
def fer2013_optional() -> Path | None:
    """The FER2013 folder when present, else None (for tests that run either way)."""
    return fer2013_root()


@pytest.fixture(scope="session")
def mini_xception():
    from interp_fer import load_model

    return load_model("mini-xception")


@pytest.fixture(scope="session")
def pyemotion():
    from interp_fer import load_model

    return load_model("pyemotion")


@pytest.fixture(scope="session")
def sample_faces():
    from interp_fer.samples import load_sample_faces

    return load_sample_faces()
