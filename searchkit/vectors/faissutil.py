"""FAISS plumbing the index kinds share: the lazy import, thread counts for small jobs, silenced
C++ stdout, id selectors, query checks and result rows (numpy in, numpy out)."""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

from ..errors import UsageError, require


def load_faiss():
    return require("faiss", "faiss-cpu")


class threads_for:
    """Run FAISS single-threaded for small jobs: OpenMP's thread barriers cost far more than
    they save on a few thousand vectors, and on a busy machine each one can wait a scheduler
    slice (measured: 20x slower training of a small IVF-PQ on a loaded 2-core machine)."""

    def __init__(self, work: float, threshold: float = 4e6):
        self.single = work < threshold

    def __enter__(self):
        if self.single:
            faiss = load_faiss()
            self.before = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.single:
            load_faiss().omp_set_num_threads(self.before)


@contextlib.contextmanager
def quiet_stdout():
    """Silence FAISS' C++ printf()s (on-disk lists report resizes and relocations on stdout,
    which would corrupt `--json` output): fd 1 goes to /dev/null for the duration."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):  # no real stdout (e.g. captured by a test runner)
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


# -- selectors ----------------------------------------------------------------------------------
class Selector:
    """A FAISS IDSelector over sorted int64 ids that keeps its buffers alive while in use."""

    def __init__(self, allowed: np.ndarray):
        faiss = load_faiss()
        self.allowed = allowed
        top = int(allowed[-1]) if len(allowed) else 0
        if top < 64 * len(allowed) + (1 << 24):  # dense ids (SQLite rowids are): a bitmap
            self.bitmap = np.zeros(top // 8 + 1, dtype=np.uint8)
            np.bitwise_or.at(self.bitmap, allowed >> 3, (1 << (allowed & 7)).astype(np.uint8))
            self.sel = faiss.IDSelectorBitmap(len(self.bitmap), faiss.swig_ptr(self.bitmap))
        else:
            self.sel = faiss.IDSelectorBatch(len(allowed), faiss.swig_ptr(allowed))


def prep_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if q.shape[1] != dim:
        raise UsageError(f"query vectors have dimension {q.shape[1]}, the index {dim}")
    return q


def no_results(nq: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)


def topk_rows(D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by score (desc), -1 ids last, keep k."""
    D = np.where(I < 0, -np.inf, D)
    order = np.argsort(-D, axis=1, kind="stable")[:, :k]
    D2 = np.take_along_axis(D, order, 1)
    I2 = np.take_along_axis(I, order, 1)
    return np.where(I2 < 0, -np.inf, D2).astype(np.float32), I2


def trim_columns(D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop trailing columns where every row has no result."""
    valid = (I >= 0).any(axis=0)
    keep = int(valid.nonzero()[0][-1]) + 1 if valid.any() else 0
    return D[:, :keep], I[:, :keep]


def on_disk_lists(index) -> bool:
    """Whether `index` is an IVF index whose inverted lists live in an .ivfdata file."""
    faiss = load_faiss()
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        return False
    return isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)


def no_prefetch(index) -> None:
    """On-disk lists prefetch the probed lists with a pool of threads per query: 2.7 ms p50
    instead of 0.05 ms on a warm page cache (measured, 20k x 32-d, nprobe 16). The kernel's
    read-ahead on the memory map does that job; turn it off."""
    if on_disk_lists(index):
        load_faiss().downcast_InvertedLists(load_faiss().extract_index_ivf(index).invlists).prefetch_nthread = 0
