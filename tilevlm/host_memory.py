"""Keep freed host memory in the process, so CPU steps stop paying page faults on fresh memory.

torch's CPU tensors come from the C library's `malloc`. glibc serves every large block (above
its mmap threshold, at most 32 MiB) with a fresh `mmap` and unmaps it on `free`; a training step
allocates and frees gigabytes of such blocks (activations, gradients), so the kernel zero-fills
and maps every page again on first touch, every step. On a 2-core VM that is a fifth to a third
of a CPU training step (docs/performance.md has the A/B). With mmap off and trimming off, freed
blocks stay in malloc's heap and the next step reuses pages that are already mapped.

The price: the process keeps its peak heap until it exits (its resident memory does not shrink
after a large free), which is what a training or generation process wants. Set
TILEVLM_SYSTEM_MALLOC=1 to leave the C library's defaults alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

OPT_OUT_ENV = "TILEVLM_SYSTEM_MALLOC"
# glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Tell glibc to serve large blocks from its heap and never trim it; True when it took.

    A no-op (False) off Linux, on C libraries without glibc's `mallopt` semantics, and with
    TILEVLM_SYSTEM_MALLOC set. Safe to call more than once."""
    if os.environ.get(OPT_OUT_ENV, "") not in ("", "0") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        mallopt, version = libc.mallopt, libc.gnu_get_libc_version
    except (OSError, AttributeError):  # not glibc (musl has no gnu_get_libc_version)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # -1 disables trimming altogether (mallopt(3)); mallopt returns 1 on success
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
    version.restype = ctypes.c_char_p
    log.debug("glibc %s: large blocks from the heap, no trimming: %s",
              version().decode(), "on" if ok else "refused")
    return ok
