"""GPUs for FAISS when it has them (faiss-gpu): exact scans and k-means training go there; every
other path, and any GPU trouble, stays on the CPU."""

from __future__ import annotations

import logging
import os

from .faissutil import load_faiss

LOG = logging.getLogger(__name__)


def gpu_count() -> int:
    """CUDA GPUs usable by FAISS (0 with faiss-cpu, or with SEARCHKIT_DEVICE=cpu)."""
    if os.environ.get("SEARCHKIT_DEVICE", "").lower() == "cpu":
        return 0
    try:
        faiss = load_faiss()
        return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except Exception:
        return 0


def to_all_gpus(index, what: str):
    """A copy of `index` spread over every GPU, or None (no GPU, or it failed: `what` stays on CPU)."""
    if gpu_count() == 0:
        return None
    try:
        return load_faiss().index_cpu_to_all_gpus(index)
    except Exception as e:  # any GPU trouble: stay on the CPU
        LOG.debug("%s stays on CPU (%s)", what, e)
        return None
