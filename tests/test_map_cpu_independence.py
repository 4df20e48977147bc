"""The map job's files do not depend on the CPU's instruction set (oneDNN kernels).

oneDNN picks float32 kernels by instruction set; in float32 the AVX2 and AVX-512 runs of one
map job differed in the last digits of their statistics (responses differed by up to 1e-6,
and 3e-4 in random copies). The pass's forward passes run in float64 (``--forward-dtype``), so
the files are byte-identical. On a CPU without AVX-512 both runs use the same kernels and the
test shows nothing (it still must pass).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _map(out, fer2013, isa):
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    env.update({"OMP_NUM_THREADS": "1", **({"ONEDNN_MAX_CPU_ISA": isa} if isa else {})})
    subprocess.run([sys.executable, "-m", "interp_fer.cli", "map", "--model", "mini-xception",
                    "--data", str(fer2013 / "test_labels.csv"), "--limit", "40", "--stratify",
                    "--layers", "block2,block4", "--controls", "2", "--locate", "rf-center",
                    "--n-boot", "4", "--n-null", "2", "--quiet", "--out", str(out)],
                   env=env, check=True, capture_output=True, timeout=600)


@pytest.mark.parametrize("isa", ["AVX2"])
def test_map_files_are_the_same_under_avx2_and_the_default(fer2013, tmp_path, isa):
    _map(tmp_path / "default", fer2013, None)
    _map(tmp_path / isa, fer2013, isa)
    for name in ("mapping.csv", "scores.csv", "looks_at.csv", "control_mapping.csv"):
        assert (tmp_path / isa / name).read_bytes() == \
            (tmp_path / "default" / name).read_bytes(), name
