"""Giving freed memory back to the system, so that the daemon idles small.

Start-up (imports, config and credential checks) allocates and frees about a
megabyte of heap; glibc keeps freed pages for reuse, so without this the
daemon would sit on them while it waits weeks for the next renewal.
"""

from __future__ import annotations

import gc
import os


def release_free_memory() -> None:
    """Collect garbage, then, on glibc, return free heap pages (``malloc_trim(0)``)."""
    gc.collect()
    if not _is_glibc():
        return
    # Imported only here: ctypes costs ~0.3 MB; malloc_trim returns ~1 MB after start-up.
    import ctypes

    ctypes.CDLL(None).malloc_trim(0)


def _is_glibc() -> bool:
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):  # no confstr, or no such name: not glibc
        return False
    return version is not None and version.startswith("glibc")
