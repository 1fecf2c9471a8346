"""What this process may use of the machine, and what else runs on it."""

from __future__ import annotations

import os


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (a temporary file's writer, say)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


#: allocations at least this big get their own mmap, returned to the OS when freed (glibc)
MMAP_THRESHOLD = 1 << 20


def bound_heap_growth() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD for this process (False elsewhere).

    glibc raises the threshold after each large mmapped block is freed, up to 32 MB, so the
    large temporaries of building an ONNX Runtime session then land on the heap and stay there:
    the same ViT-B-32 session peaked at either 445 or 607-625 MB from run to run (six fresh
    processes), and at 445 MB every time with the threshold fixed (MALLOC_MMAP_THRESHOLD_ has
    the same effect). Called by the command line only: a library should not set its host's
    allocator."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_MMAP_THRESHOLD = -3
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
