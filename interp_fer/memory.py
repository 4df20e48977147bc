"""Process-level memory tuning for long batched runs (an opt-in, for applications).

The projection engine and the mapping pass allocate and free tensors of several MB many times
per second. glibc's malloc serves allocations that large with ``mmap`` or returns freed heap
memory to the OS at once, so every new tensor starts on fresh pages, and the kernel faults and
zeroes each 4 KiB page again. Measured on the 2-core CI machine (mini-Xception block4, 16
images): ~150,000-450,000 page faults per call and a quarter to a third of the wall time;
with freed memory kept for reuse, none and the time back.

:func:`keep_freed_memory` changes a setting of the whole process, so the library never calls
it on its own: the ``interp-fer`` CLI and the benchmarks do, a notebook may.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LARGEST_MMAP_THRESHOLD = 32 * 2**20  # glibc's maximum on 64-bit systems


def keep_freed_memory(trim_threshold: int = 2**31 - 1) -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    Sets ``M_MMAP_THRESHOLD`` to 32 MiB (allocations below it come from the heap and are
    reused) and ``M_TRIM_THRESHOLD`` to ``trim_threshold`` bytes (free memory at the top of
    the heap is kept up to that amount). The resident set then stays near its peak until the
    process ends, which is what a long batched run wants anyway.

    Parameters
    ----------
    trim_threshold
        Bytes of free heap kept before malloc gives memory back (default: 2 GiB).

    Returns
    -------
    bool
        True when the settings were applied; False where the C library is not glibc (macOS,
        Windows, musl), which leaves the process unchanged.
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    applied = mallopt(_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD) == 1
    return mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and applied


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def malloc_in_use() -> int | None:
    """Bytes glibc's malloc has handed out and not taken back (heap and mmap), or None.

    Unlike the resident set, this still shows a working set growing and shrinking once freed
    memory is kept for reuse (:func:`keep_freed_memory`). None where the C library has no
    ``mallinfo2`` (not glibc, or glibc older than 2.33).
    """
    mallinfo2 = _libc_function("mallinfo2")
    if mallinfo2 is None:
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return info.uordblks + info.hblkhd


@functools.cache
def _libc_function(name: str):
    """A function of the process's C library on Linux, or None (looked up once)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
