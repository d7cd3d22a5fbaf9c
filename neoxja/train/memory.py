"""Keep freed memory inside the training process, so that a step does not fault its pages in afresh.

glibc's malloc serves a block above its mmap threshold (128 KiB, rising on its own to at most 32 MiB) with a
fresh `mmap` and hands it back to the kernel when it is freed. A training step allocates and frees gigabytes
in such blocks (activations, the bf16 copies of the weights that autocast makes, gradients, the embedding's
dense gradient), so every step touches every one of those pages for the first time again, and the kernel
zero-fills each on a page fault. At the 2.7B width with 4 layers, batch 2 x 256, on a 2-core Xeon VM, that
was a third of a float32 step (7.7 -> 5.2 s) and 40% of a bf16 autocast one (3.1 -> 1.9 s):
`benchmarks/bench_bf16.py` measures it.

`retain_freed_memory()` raises glibc's mmap threshold and trim threshold to 2 GiB (`mallopt`), so blocks come
from the heap and freed ones stay there for the next step, as PyTorch's CUDA caching allocator keeps GPU
memory (Intel's recipes get the same from jemalloc or tcmalloc by LD_PRELOAD). The cost: the process keeps
its peak heap rather than returning it between steps, which a training process reaches every step anyway.

`neoxja train` calls it once at start (not at import); a library user's process is left alone. Elsewhere
than glibc (musl, macOS, Windows) it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["retain_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_LIMIT = 2**31 - 1  # mallopt takes an int: blocks above 2 GiB are still mapped and unmapped


def retain_freed_memory() -> bool:
    """Make glibc keep freed blocks below 2 GiB for reuse; True if it took effect, False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 -- glibc only: other C libraries' mallopt means other things
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, _LIMIT) == 1 and mallopt(_M_TRIM_THRESHOLD, _LIMIT) == 1
