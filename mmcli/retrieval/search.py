"""Searching an index: exact (NumPy, blockwise) or FAISS, behind one small interface."""

from __future__ import annotations

from typing import Any

from mmcli.retrieval import faiss_index as ann
from mmcli.retrieval import index as ix


class _Exact:
    """Exact inner-product search (:func:`~mmcli.retrieval.index.search_exact`)."""

    def __init__(self, index: ix.Index):
        self.index = index

    def __call__(self, queries, k: int):
        return ix.search_exact(self.index, queries, k)

    def describe(self) -> dict[str, Any]:
        """What ran, for the results."""
        return {"method": "exact"}


class _Faiss:
    """FAISS search, loading the index's cached FAISS file or building (and tuning) one."""

    def __init__(self, index: ix.Index, max_memory: int | None = None):
        self.fi = ann.load_or_build_faiss(index, max_memory=max_memory)

    def __call__(self, queries, k: int):
        return ann.search_faiss(self.fi, queries, k)

    def describe(self) -> dict[str, Any]:
        """What ran, for the results (the build's recall check, ``built`` when it was just built)."""
        return {
            "method": f"faiss {self.fi.kind}",
            "params": self.fi.params,
            "recall_at_10": self.fi.recall_at_10,
            "built": self.fi.built,
            "build_seconds": round(self.fi.build_seconds, 1),
            "path": self.fi.path,
        }


def make_searcher(index: ix.Index, use_faiss: bool, max_memory: int | None = None):
    """Exact search, or FAISS when asked or above :data:`mmcli.retrieval.faiss_index.FAISS_AUTO_THRESHOLD`
    rows (a saved FAISS file, else one built under ``max_memory`` bytes: :mod:`mmcli.retrieval.index_plan`)."""
    if use_faiss or len(index) > ann.FAISS_AUTO_THRESHOLD:
        return _Faiss(index, max_memory)
    return _Exact(index)
