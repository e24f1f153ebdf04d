"""``mmcli index build emb.npy --max-memory 4GB``: build an index's FAISS file ahead of time."""

from __future__ import annotations

import os
import resource
import sys
from typing import Any


def build(index_path: str, *, max_memory: str | None = None, kind: str = "auto") -> dict[str, Any]:
    """Build (or rebuild) the FAISS file of ``index_path`` under ``max_memory``; what was built."""
    from mmcli.retrieval import faiss_index as ann
    from mmcli.retrieval import index as ix
    from mmcli.retrieval.index_plan import default_budget, parse_memory

    budget = parse_memory(max_memory) if max_memory else default_budget()
    index = ix.open_index(index_path, items=False)
    fi = ann.build_faiss(index, kind=kind, path=index.path + ".faiss", max_memory=budget)
    return {
        "index": os.path.abspath(index.path),
        "faiss": os.path.abspath(fi.path),
        "rows": len(index),
        "dim": index.dim,
        "dtype": str(index.embeddings.dtype),
        "kind": fi.kind,
        "params": fi.params,
        "recall_at_10": fi.recall_at_10,
        "build_seconds": round(fi.build_seconds, 1),
        "file_bytes": os.path.getsize(fi.path),
        "lists_file": os.path.abspath(fi.path + ".ivfdata") if fi.params.get("on_disk") else None,
        "lists_file_bytes": os.path.getsize(fi.path + ".ivfdata") if fi.params.get("on_disk") else 0,
        "max_memory": budget,
        "peak_rss_bytes": _peak_rss(),
    }


def _peak_rss() -> int:
    """This process's peak resident size in bytes. On Linux, VmHWM: the peak of this program's own
    memory (ru_maxrss also counts the parent's pages a child held between fork and exec, so a
    build started by a large process reported that process's size)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
        return peak if sys.platform == "darwin" else peak * 1024
