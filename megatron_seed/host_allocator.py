"""Keep freed host memory in glibc's heap, so a CPU training step does not page-fault.

glibc's malloc serves large blocks (above ``M_MMAP_THRESHOLD``: 128 KiB, raised on the fly
up to 32 MiB) with fresh ``mmap`` pages and returns the top of the heap to the OS once
more than ``M_TRIM_THRESHOLD`` is free. A training or generation step on CPU frees and
re-allocates the same activation sizes every step, so with the defaults most steps pay
a page fault and a kernel zeroing for each 4 KiB of many large fresh tensors: up to a
quarter of an MoE layer's forward+backward time on CPU (``benchmarks/bench_moe_layer.py``
measures it). PyTorch's CPU performance guide answers this with tcmalloc or jemalloc
preloaded; :func:`keep_freed_memory_in_heap` gets the same effect from glibc itself with
``mallopt``: every block comes from the heap and freed memory stays there for reuse.

The cost: the process keeps its peak heap for its lifetime (a trainer reaches that peak
every step anyway). Set ``MEGATRON_SEED_HOST_ALLOCATOR=default`` to keep glibc's defaults;
with another allocator preloaded (tcmalloc, jemalloc) glibc's settings are simply unused.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV_VAR = "MEGATRON_SEED_HOST_ALLOCATOR"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# 1 GiB: blocks up to this size come from the heap; more than this free at its top is trimmed
_KEEP_BYTES = 1 << 30


def keep_freed_memory_in_heap() -> bool:
    """Raise glibc's mmap and trim thresholds to 1 GiB; True when they were applied.

    A no-op (False) off Linux/glibc or when ``MEGATRON_SEED_HOST_ALLOCATOR=default``.
    """
    if os.environ.get(ENV_VAR, "") == "default" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):  # musl and other libcs have no mallopt
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
