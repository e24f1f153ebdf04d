"""Approximate nearest-neighbour search over an embedding index with FAISS.

``build_faiss`` picks the index kind by size, tunes its search parameter on held-out rows
until recall@10 against exact search reaches the target, and saves it next to the ``.npy``;
``load_or_build_faiss`` reuses a saved one while the index it was built from is unchanged.
faiss is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmcli.errors import MmcliError
from mmcli.io import atomic_write, atomic_write_json
from mmcli.retrieval.index import (
    VERSION,
    Embeddings,
    Index,
    iter_row_blocks,
    query_matrix,
    read_sidecar,
    recall_at_k,
    search_exact,
)

FLAT_MAX_ROWS = 10_000
"""Below this many rows ``build_faiss(kind="auto")`` builds an exact ``IndexFlatIP``: a scan of
at most 20 MB (D=512) that needs no training. Above it IVF wins: at 10k×512 it answered in
0.4-0.6 ms/query against 3-24 ms for the flat scan, at 50k in 0.2 ms against 14-52 ms."""

FAISS_AUTO_THRESHOLD = 2_000_000
"""Above this many rows retrieval uses FAISS instead of :func:`search_exact`. Exact search
reads the whole matrix once per query batch: at 1M×512 float32 on two cores it took 20 ms/query
in batches of 100 and 120-150 ms for a single query (``tests/bench/retrieve_latency.py``), so
past 2M rows a single query stops feeling interactive, while IVF stays under 1 ms/query on
clustered data (on uniform random vectors, which have no near neighbours, no index helps)."""

RECALL_TARGET = 0.95
"""Recall@10 an approximate index must reach against exact search."""

_TUNE_RECALL = 0.96  # the target plus a margin for the error of a 200-query estimate
_RECALL_QUERIES = 200
_HNSW_M, _HNSW_EF_CONSTRUCTION = 32, 80
_FINGERPRINT_BYTES = 1 << 20


@dataclass
class FaissIndex:
    """A FAISS index over an :class:`Index`, with how it was made.

    ``kind`` is ``flat``, ``hnsw`` or ``ivf``; ``params`` the build and (tuned) search
    parameters; ``recall_at_10`` the recall against exact search measured at build time
    (see :func:`build_faiss`); ``held_out`` the rows added last, after tuning; ``built`` is
    False when it was loaded from ``path``.
    """

    index: Any
    kind: str
    params: dict
    recall_at_10: float | None
    held_out: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    path: str | None = None
    built: bool = True
    build_seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.index.ntotal)


def choose_faiss_kind(count: int) -> str:
    """The FAISS index ``kind="auto"`` builds for ``count`` rows: ``flat`` or ``ivf``.

    ``flat`` below :data:`FLAT_MAX_ROWS`, else ``ivf`` (IVFFlat, nlist = 4√N, nprobe tuned).
    Measured on 1M×512 float32, two shared cores, clustered synthetic data: IVF built in
    109 s and answered in 0.55 ms/query (one at a time) at recall@10 0.99; HNSW (M=32,
    efConstruction=80) took 412 s to build, needed efSearch=192 and answered in 1.05 ms/query
    at recall@10 0.96. ``hnsw`` stays available by name.
    """
    return "flat" if count < FLAT_MAX_ROWS else "ivf"


def build_faiss(
    index: Index, *, kind: str = "auto", path: str | None = None, tune_queries: np.ndarray | None = None
) -> FaissIndex:
    """Build a FAISS index over ``index``, tune its search parameter, and save it at ``path``.

    The search parameter (HNSW ``efSearch``, IVF ``nprobe``) is the smallest that reaches
    recall@10 ≥ 0.96 against exact search, and that recall is returned. It is measured with
    ``tune_queries`` (e.g. a sample of text embeddings for an image index) or else with 200
    indexed rows held out of the index until tuning is done: a row that is already in the
    index finds itself and its neighbours far too easily and overstates recall.
    """
    faiss = _import_faiss()
    kind = choose_faiss_kind(len(index)) if kind == "auto" else kind
    start = time.perf_counter()
    fi, params = _new_faiss_index(faiss, kind, index.embeddings)
    held_out = _held_out_rows(len(index)) if tune_queries is None else np.zeros(0, np.int64)
    _add_rows(fi, index.embeddings, skip=held_out)
    queries = query_matrix(index.embeddings[held_out] if tune_queries is None else tune_queries, index.dim)
    exact_ids = _exact_ids_without(index.embeddings, queries, 10, held_out)
    params, recall = _tune_search(faiss, fi, kind, params, queries, exact_ids, held_out)
    if held_out.size:
        fi.add(queries)
    result = FaissIndex(fi, kind, params, recall, held_out, path, True, time.perf_counter() - start)
    if path is not None:
        _save_faiss(faiss, result, index)
    return result


def load_or_build_faiss(
    index: Index, *, kind: str = "auto", path: str | None = None, tune_queries: np.ndarray | None = None
) -> FaissIndex:
    """The FAISS index saved next to ``index`` if it is of ``kind`` and fresh, else a new one.

    Saved as ``<index>.faiss`` plus ``<index>.faiss.json`` (kind, params, recall and a
    fingerprint of the .npy files: a rewritten index is detected and the FAISS one rebuilt).
    ``tune_queries`` is passed to :func:`build_faiss` when a build is needed.
    """
    path = path or index.path + ".faiss"
    kind = choose_faiss_kind(len(index)) if kind == "auto" else kind
    saved = _load_faiss(path, index, kind)
    return saved if saved is not None else build_faiss(index, kind=kind, path=path, tune_queries=tune_queries)


def search_faiss(fi: FaissIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of ``queries`` in ``fi``: ``(scores, ids)`` as :func:`search_exact` returns them.

    Rows an approximate search could not fill (tiny ``nprobe``) have id -1 and score -inf.
    """
    q = query_matrix(queries, fi.index.d)
    k = min(int(k), len(fi))
    if k <= 0:
        return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
    scores, labels = fi.index.search(q, k)
    ids = _label_rows(labels, fi.held_out, len(fi))
    return np.where(ids < 0, -np.inf, scores).astype(np.float32), ids


def _label_rows(labels: np.ndarray, held_out: np.ndarray, count: int) -> np.ndarray:
    """Index rows of FAISS ``labels`` (-1, "nothing found", stays -1).

    FAISS numbers rows in the order they were added: every row but ``held_out`` (sorted), in
    order, then ``held_out``. Label l < count - h is the l-th kept row, i.e. l plus the number
    of held-out rows before it; held_out[j] - j kept rows precede held-out row j.
    """
    labels = labels.astype(np.int64)
    kept = count - len(held_out)
    rows = labels + np.searchsorted(held_out - np.arange(len(held_out)), labels, side="right")
    if len(held_out):
        rows = np.where(labels >= kept, held_out[np.clip(labels - kept, 0, len(held_out) - 1)], rows)
    return np.where(labels < 0, -1, rows)


def _import_faiss():
    try:
        import faiss
    except ImportError:
        raise MmcliError("FAISS search needs the faiss-cpu package: pip install faiss-cpu") from None
    return faiss


def _ivf_lists(count: int) -> int:
    # 4·√N lists (FAISS's guideline), capped so every list gets ≥ 39 training points.
    return max(1, min(int(4 * math.sqrt(count)), count // 39))


def _new_faiss_index(faiss, kind: str, embeddings: Embeddings) -> tuple[Any, dict]:
    """An empty (trained) index of ``kind`` and its build parameters."""
    dim = embeddings.shape[1]
    if kind == "flat":
        return faiss.IndexFlatIP(dim), {}
    if kind == "hnsw":
        fi = faiss.IndexHNSWFlat(dim, _HNSW_M, faiss.METRIC_INNER_PRODUCT)
        fi.hnsw.efConstruction = _HNSW_EF_CONSTRUCTION
        return fi, {"M": _HNSW_M, "efConstruction": _HNSW_EF_CONSTRUCTION}
    if kind == "ivf":
        nlist = _ivf_lists(len(embeddings))
        fi = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        # 50 points per list: k-means quality levels off there and training stays O(minutes) at 1M.
        rows = np.random.default_rng(1).choice(len(embeddings), size=min(len(embeddings), 50 * nlist), replace=False)
        fi.train(np.ascontiguousarray(embeddings[np.sort(rows)], dtype=np.float32))
        return fi, {"nlist": nlist}
    raise MmcliError(f"unknown FAISS index kind {kind!r}: choose auto, flat, hnsw or ivf")


def _held_out_rows(count: int) -> np.ndarray:
    """Sorted random rows (200, or a tenth of a small index) kept back to tune the search."""
    size = min(_RECALL_QUERIES, count // 10)
    return np.sort(np.random.default_rng(0).choice(count, size=size, replace=False))


def _add_rows(fi, embeddings: Embeddings, *, skip: np.ndarray) -> None:
    """Add every row but ``skip`` to ``fi``, in row order."""
    keep = np.ones(len(embeddings), dtype=bool)
    keep[skip] = False
    for start, block in iter_row_blocks(embeddings, 65_536):
        fi.add(np.ascontiguousarray(block[keep[start : start + len(block)]], dtype=np.float32))


def _exact_ids_without(embeddings: Embeddings, queries: np.ndarray, k: int, excluded: np.ndarray) -> np.ndarray:
    """Exact top-``k`` ids of ``queries`` among the rows not in ``excluded``."""
    ids = search_exact(embeddings, queries, k + len(excluded))[1]
    if not len(excluded):
        return ids
    return np.stack([row[~np.isin(row, excluded)][:k] for row in ids]) if len(ids) else ids[:, :k]


def _search_ladder(kind: str, params: dict) -> list[int | None]:
    """Search-parameter values to try, cheapest first (None: the kind has no such parameter)."""
    if kind == "hnsw":
        return [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    if kind == "ivf":
        nlist = params["nlist"]
        return sorted({min(nlist, round(2 ** (i / 2))) for i in range(2 * int(math.log2(nlist)) + 2)})
    return [None]


def _set_search_param(faiss, fi, kind: str, value: int | None) -> dict:
    if kind == "hnsw":
        fi.hnsw.efSearch = value
        return {"efSearch": value}
    if kind == "ivf":
        faiss.extract_index_ivf(fi).nprobe = value
        return {"nprobe": value}
    return {}


def _tune_search(faiss, fi, kind: str, params: dict, queries: np.ndarray, exact_ids: np.ndarray, held_out: np.ndarray):
    """The cheapest search parameter reaching the tuning recall (else the largest tried)."""
    k, count = exact_ids.shape[1], int(fi.ntotal) + len(held_out)
    for value in _search_ladder(kind, params):
        chosen = _set_search_param(faiss, fi, kind, value)
        recall = recall_at_k(_label_rows(fi.search(queries, k)[1], held_out, count), exact_ids) if k else 1.0
        if recall >= _TUNE_RECALL:
            break
    return {**params, **chosen}, recall


def _fingerprint(index: Index) -> str:
    """sha256 over each .npy's size, first MiB and sidecar creation time.

    Hashing whole files would take seconds at 1M rows; every rewrite by IndexWriter changes
    the creation time, and size + header + first rows catch most other edits.
    """
    digest = hashlib.sha256()
    for path in index.files or (index.path,):
        with open(path, "rb") as f:
            digest.update(f.read(_FINGERPRINT_BYTES))
        digest.update(str(os.path.getsize(path)).encode())
        digest.update(json.dumps(read_sidecar(path).get("created")).encode())
    return "sha256:" + digest.hexdigest()


def _save_faiss(faiss, fi: FaissIndex, index: Index) -> None:
    try:
        atomic_write(fi.path, lambda tmp: faiss.write_index(fi.index, str(tmp)))
        atomic_write_json(
            fi.path + ".json",
            {
                "format": "mmcli-faiss",
                "version": VERSION,
                "kind": fi.kind,
                "params": fi.params,
                "recall_at_10": fi.recall_at_10,
                "count": len(index),
                "fingerprint": _fingerprint(index),
                "held_out": fi.held_out.tolist(),
                "build_seconds": round(fi.build_seconds, 3),
            },
            indent=None,
        )
    except (OSError, RuntimeError) as exc:
        raise MmcliError(f"cannot write the FAISS index {fi.path}: {exc}") from exc


def _load_faiss(path: str, index: Index, kind: str) -> FaissIndex | None:
    try:
        with open(path + ".json", encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None  # no usable description: a cache miss, not an error
    fresh = (
        saved.get("format") == "mmcli-faiss"
        and saved.get("version") == VERSION
        and saved.get("kind") == kind
        and saved.get("count") == len(index)
        and saved.get("fingerprint") == _fingerprint(index)
    )
    if not fresh or not os.path.exists(path):
        return None
    faiss = _import_faiss()
    try:
        fi = faiss.read_index(path)
    except RuntimeError:
        return None  # a damaged file is rebuilt
    search_value = saved["params"].get("efSearch", saved["params"].get("nprobe"))
    _set_search_param(faiss, fi, kind, search_value)
    held_out = np.asarray(saved.get("held_out", []), dtype=np.int64)
    return FaissIndex(fi, kind, saved["params"], saved.get("recall_at_10"), held_out, path, built=False)
