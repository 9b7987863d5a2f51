"""Hand the C allocator's freed memory back to the OS between the phases of a merge (glibc's ``malloc_trim``).

torch's CPU tensors come from malloc. glibc keeps freed heap memory for reuse, and raises its mmap threshold after
each large free, so tensors of up to 32 MiB end up on that heap. A phase of a merge (statistics pass, matching,
curves) frees hundreds of MiB of tensors whose sizes the next phase rarely reuses, so without a trim the resident
memory of the next phase starts from the previous one's high-water mark. ``malloc_trim(0)`` returns every free page.
It is called once per phase, not per batch: a trim costs the page faults of touching that memory again.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    return getattr(ctypes.CDLL(None), "malloc_trim", None)  # the process's own C library; musl has none


def release_freed_memory() -> bool:
    """Return the C heap's free pages to the OS; False where the C library cannot (not glibc: nothing is done)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
