"""Handing memory back to the kernel while a large model is converted: pages of memory-mapped
checkpoint tensors that were read, and heap that tensors freed.

Both change how much memory the process holds, never a value.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterable

import torch

__all__ = ["release_freed", "release_pages"]


def release_pages(tensors: Iterable[torch.Tensor]) -> None:
    """Hand the pages of memory-mapped tensors back to the kernel (`madvise(MADV_DONTNEED)` on
    the whole pages inside each tensor), so that what was read from them stops counting in this
    process's memory.

    Only for tensors mapped from a file (`checkpoint.remap_state_dict`) that nothing wrote to
    and nothing still uses: their pages are the file's own, read from the file again if
    touched. (On anonymous memory the same call would zero them.) Where `madvise` is not
    available this does nothing.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    madvise = getattr(libc, "madvise", None)
    dontneed = getattr(mmap, "MADV_DONTNEED", None)
    if madvise is None or dontneed is None:
        return
    page = mmap.PAGESIZE
    for t in tensors:
        start = -(-t.data_ptr() // page) * page
        stop = (t.data_ptr() + t.nbytes) // page * page
        if stop > start:
            madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), dontneed)


def release_freed() -> None:
    """Return the memory freed so far to the kernel (glibc's `malloc_trim(0)`).

    Tensors of a few MB are allocated from malloc's heap, which keeps what they free until
    trimmed (docs/speed.md measures the effect on DeiT III huge). Does nothing without glibc.
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)
