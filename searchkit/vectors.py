"""FAISS vector indexes: exact inner product over explicit ids (the SQLite row ids).

Rows are L2-normalized, so inner product is cosine similarity. One index per item kind
(image, text) keeps kind-restricted search exact and cheap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import CorruptIndexError, require
from .fsutil import atomic_write_bytes


def _faiss():
    return require("faiss", "faiss-cpu")


class FlatVectors:
    """Exact inner-product search (IndexIDMap2 over IndexFlatIP) keyed by int64 ids."""

    kind = "flat"

    def __init__(self, dim: int, index=None):
        faiss = _faiss()
        self.dim = dim
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(
                np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)
            )

    def remove(self, ids) -> None:
        ids = np.asarray(list(ids), dtype=np.int64)
        if len(ids):
            self.index.remove_ids(_faiss().IDSelectorBatch(ids))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of shape (nq, k'), k' = min(k, len(self)); best first."""
        k = min(int(k), len(self))
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if k <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        return self.index.search(q, k)

    def ids(self) -> np.ndarray:
        faiss = _faiss()
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(path, _faiss().serialize_index(self.index).tobytes())

    @classmethod
    def load(cls, path: str | Path, dim: int) -> FlatVectors:
        faiss = _faiss()
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            raise CorruptIndexError(f"cannot read vector index {path}: {str(e).splitlines()[0]}") from e
        if index.d != dim:
            raise CorruptIndexError(f"vector index {path} has dimension {index.d}, expected {dim}")
        return cls(dim, index)

    @classmethod
    def build(cls, dim: int, ids: np.ndarray, vectors: np.ndarray) -> FlatVectors:
        v = cls(dim)
        v.add(ids, vectors)
        return v
