"""keep_freed_memory: freed tensors' pages are reused instead of faulted in again."""

from __future__ import annotations

import platform
import resource
import sys

import pytest
import torch

from interp_fer import memory
from interp_fer.memory import keep_freed_memory, malloc_in_use

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


@pytest.mark.skipif(not GLIBC, reason="mallinfo2 exists in glibc only")
def test_malloc_in_use_sees_a_live_tensor():
    before = malloc_in_use()
    tensor = torch.ones(16 * 2**20 // 4)  # 16 MiB
    during = malloc_in_use()
    del tensor
    assert during - before >= 16 * 2**20
    assert malloc_in_use() < during


def test_returns_false_where_not_glibc(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    memory._libc_function.cache_clear()  # looked up once per process
    try:
        assert keep_freed_memory() is False
        assert malloc_in_use() is None
    finally:
        memory._libc_function.cache_clear()
