"""Keep glibc from handing a training step's memory back to the kernel (CPU training).

A CPU training step allocates and frees the same large buffers every time (the PTB LSTM
recipe's logits and their gradients are 11 MiB each). glibc serves such buffers from its heap
once its dynamic mmap threshold has grown past them, but trims the top of the heap whenever
more than twice that threshold lies free there, so a step can return ~20 MiB to the kernel
and page-fault it back in on the next one: measured ~5,000 minor faults per step on that
recipe and 12-25% of a training run, varying with the order in which tensors are freed. Fixing both
thresholds keeps those pages in the process, as jemalloc and tcmalloc do (which PyTorch's own
CPU launcher preloads for this reason). Memory the process once held is not returned until it
exits, exactly as PyTorch's CUDA caching allocator behaves on GPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

import torch

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit: larger buffers are mmapped
TRIM_THRESHOLD = 2**30  # free heap top kept before glibc trims it

_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_heap_memory(device: torch.device) -> bool:
    """For training on `device`: if it is the CPU, set glibc's trim and mmap thresholds so
    freed step buffers are reused, not re-faulted.

    Does nothing (returns False) for other devices, off glibc, under a preloaded allocator, or
    when the user has set any of glibc's MALLOC_*_ variables themselves: their choice wins.
    """
    if device.type != "cpu" or platform.libc_ver()[0] != "glibc":
        return False
    preloaded = "malloc" in os.environ.get("LD_PRELOAD", "")  # jemalloc, tcmalloc, mimalloc
    if preloaded or any(name in os.environ for name in _USER_SETTINGS):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
