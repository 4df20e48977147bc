"""keep_freed_memory: freed tensors' pages are reused instead of faulted in again."""

from __future__ import annotations

import platform
import resource
import sys

import pytest
import torch

from interp_fer.memory import keep_freed_memory

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="the setting exists in glibc's malloc only")
def test_freed_tensors_are_reused_without_page_faults():
    assert keep_freed_memory() is True
    shape = (64, 16, 64, 64)  # 16 MiB: above glibc's default mmap threshold
    for _ in range(12):  # the first allocations grow the heap
        torch.ones(shape)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.ones(shape)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # Fresh pages would cost 16 MiB / 4 KiB = 4,096 faults per tensor (82,000 in all).
    assert faults < 2_000


def test_returns_false_where_not_glibc(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert keep_freed_memory() is False
