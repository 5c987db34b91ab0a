"""Host memory of CPU ranks: freed buffers go back to the operating system.

ZeRO-3 gathers and frees every weight of the base once or twice a step. glibc's malloc serves a request above
its mmap threshold with its own mapping, returned at free, but it raises that threshold to the size of each such
block freed (up to 32 MB), so from then on gathers of up to 32 MB come from the heap, and the heap keeps what is
freed in it. On large:llama's 16 MB attention weights that is about 2 GB of resident memory per rank that no tensor
uses (docs/memory.md). Fixing the threshold stops the rise.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3
"""mallopt's parameter number (glibc malloc.h); setting it also turns the dynamic threshold off."""
MMAP_THRESHOLD_BYTES = 128 * 1024
"""glibc's initial threshold: larger blocks are mapped on their own and unmapped when freed."""


def return_freed_memory() -> bool:
    """Keep large host allocations out of the heap for the rest of the process; False where malloc is not
    glibc's (nothing changes there)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
