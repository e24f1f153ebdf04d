"""Exact search over an index: chunked cosine top-k that never grows with N, and recall@k."""

from __future__ import annotations

import mmap
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mmcli.retrieval.index.reader import Embeddings, Index, RowConcat

_SCORE_BUDGET = 1 << 26  # score-matrix elements per chunk (256 MiB of float32)
_FEW_QUERIES = 64  # up to this many queries, blocks are scored in parallel threads
_WIDEN_ROWS = 4096  # float16 rows widened to float32 at a time (8 MiB at D=512)
_ROUGH_MARGIN = 2.0**-8
"""How far below a block's k-th rough (float16) score a row may be and still be re-scored, per unit of
query norm. A rough score is the product of float16 rows with the query rounded to float16,
accumulated in float32 and rounded to float16: for rows of norm ≤ 1.01 (the writer refuses others)
it is off by at most (2·2⁻¹¹ + D·2⁻²⁴)·1.01·‖q‖ ≈ 0.0012·‖q‖ at D = 512. A row of the true top-k is
then at most twice that below the k-th rough score, and 2⁻⁸ ≈ 0.0039 leaves room to spare."""
_ROUGH_QUERIES = 4  # up to this many queries, float16 rows are filtered by rough scores (below)
_MAX_ROUGH_NORM = 100.0  # larger queries could overflow float16 scores: they take the widened path
_MAX_CANDIDATES = 1 << 15  # more re-scored rows than this (a block of near-ties): score the block widened
_POOL: ThreadPoolExecutor | None = None


# --------------------------------------------------------------------------------------------
# exact search
# --------------------------------------------------------------------------------------------


def iter_row_blocks(embeddings: Embeddings, rows: int, *, release: bool = False) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, block) pairs covering ``embeddings`` in blocks of at most ``rows`` rows.

    ``release`` hands each block's pages of a memory-mapped file back once the caller asks for the
    next block (``madvise(MADV_DONTNEED)``): a pass over a file larger than memory then keeps the
    process's resident size at about one block (the pages stay in the OS's file cache).
    """
    parts = embeddings.parts if isinstance(embeddings, RowConcat) else [embeddings]
    offset = 0
    for part in parts:
        for start in range(0, len(part), rows):
            yield offset + start, part[start : start + rows]
            if release:
                _release_rows(part, start, min(rows, len(part) - start))
        offset += len(part)


def release_pages(embeddings: Embeddings) -> None:
    """Hand back every resident page of a memory-mapped index (after scattered reads: re-ranking)."""
    for part in embeddings.parts if isinstance(embeddings, RowConcat) else [embeddings]:
        _release_rows(part, 0, len(part))


def _release_rows(array: np.ndarray, first: int, count: int) -> None:
    mapped = getattr(array, "_mmap", None)
    if mapped is None or not hasattr(mmap, "MADV_DONTNEED") or count <= 0:
        return
    head = array.offset % mmap.ALLOCATIONGRANULARITY  # where the array starts inside the mapping
    start = head + first * array.strides[0]
    end = start + count * array.strides[0]
    start -= start % mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, start, end - start)


def search_exact(
    source: Index | Embeddings,
    queries: np.ndarray,
    k: int,
    *,
    chunk_rows: int = 262_144,
    release: bool = False,
    numpy_only: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-``k`` of ``queries`` (Q×D, L2-normalised) among the rows of ``source``.

    Scans the rows in chunks (fewer rows per chunk for large Q, so the Q×chunk score matrix
    stays under 256 MiB) and merges each chunk's top-k into a running top-k: memory never
    grows with N. float16 rows are scored in float32. Returns ``(scores, ids)``, Q×min(k, N)
    float32 and int64, best first; equal scores are ordered by lower id. ``numpy_only`` widens
    float16 rows with NumPy (slower) instead of importing torch, whose libraries alone are
    ~0.45 GiB resident: a FAISS build under a memory budget keeps that room for the index.
    """
    embeddings = source.embeddings if isinstance(source, Index) else source
    q = query_matrix(queries, embeddings.shape[1])
    k = min(int(k), len(embeddings))
    best_scores = np.empty((len(q), 0), np.float32)
    best_ids = np.empty((len(q), 0), np.int64)
    if k <= 0:
        return best_scores, best_ids
    rows = min(chunk_rows, max(1024, _SCORE_BUDGET // max(len(q), 1)))
    blocks = iter_row_blocks(embeddings, rows, release=release)
    if len(q) <= _FEW_QUERIES and (os.cpu_count() or 1) > 1 and not release:
        found = _pool().map(lambda item: _block_top_k(q, item[1], k, item[0], numpy_only), blocks)
    else:
        found = (_block_top_k(q, block, k, start, numpy_only) for start, block in blocks)
    for chunk_scores, chunk_ids in found:
        best_scores, best_ids = _merge_top_k(best_scores, best_ids, chunk_scores, chunk_ids, k)
    return best_scores, best_ids


def _block_top_k(
    q: np.ndarray, block: np.ndarray, k: int, start: int, numpy_only: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The top-``k`` of ``q`` in one block (ids counted from ``start``). float16 rows are widened
    to float32 a slice at a time, small enough to stay in cache, never the whole block."""
    if block.dtype == np.float32:
        scores = q @ np.asarray(block).T
    elif numpy_only:
        scores = np.empty((len(q), len(block)), np.float32)
        for at in range(0, len(block), _WIDEN_ROWS):
            scores[:, at : at + _WIDEN_ROWS] = q @ np.asarray(block[at : at + _WIDEN_ROWS], dtype=np.float32).T
    elif len(q) <= _ROUGH_QUERIES and (found := _filtered_top_k(q, block, k)) is not None:
        return found[0], found[1] + start
    else:
        scores = _widened_scores(q, block)
    ids = _top_k_columns(scores, k)
    return np.take_along_axis(scores, ids, axis=1), ids + start


def _filtered_top_k(q: np.ndarray, block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The exact top-``k`` of a few queries in float16 rows, without widening every row: rough
    float16 scores (torch's half-precision matrix-vector product, which reads each row once and
    accumulates in float32) pick the rows within :data:`_ROUGH_MARGIN` of the k-th rough score, and
    only those are scored in float32. The result is the widened search's, ties included. None where
    the bound does not hold (a query too long, torch set to reduce in float16) or too many rows tie.

    1M × 512 float16, one query, 2 cores: 75 ms against 185 ms widened (``benchmarks/exact_fp16.py``).
    Each query is a pass over the rows (torch's half-precision matrix product is 4× slower than its
    matrix-vector one), so past :data:`_ROUGH_QUERIES` queries widening, shared by all, wins."""
    import torch

    norms = np.linalg.norm(q, axis=1)
    if k >= len(block) or norms.max() > _MAX_ROUGH_NORM or torch._C._get_cpu_allow_fp16_reduced_precision_reduction():
        return None
    rough = _rough_scores(q, block)
    kth = np.partition(rough, len(block) - k, axis=1)[:, len(block) - k]
    scores, ids = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
    for i in range(len(q)):
        near = np.flatnonzero(rough[i] >= kth[i] - _ROUGH_MARGIN * norms[i])
        if len(near) > _MAX_CANDIDATES:
            return None
        exact = _widened_scores(q[i : i + 1], block[near])
        best = _top_k_columns(exact, k)[0]
        order = np.lexsort((near[best], -exact[0, best]))
        scores[i], ids[i] = exact[0, best[order]], near[best[order]]
    return scores, ids


def _rough_scores(q: np.ndarray, block: np.ndarray) -> np.ndarray:
    """Q × rows float16-rounded scores: each row read once, in half precision, summed in float32."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only memory map: torch only reads it
        rows = torch.from_numpy(np.asarray(block))
    queries = torch.from_numpy(q).half()
    return torch.stack([torch.mv(rows, query) for query in queries]).float().numpy()  # mm is 4× slower


def _widened_scores(q: np.ndarray, block: np.ndarray) -> np.ndarray:
    """``q`` against float16 rows in float32, widened a slice at a time. torch widens with the
    CPU's conversion instructions, about 4× faster than NumPy's loop (1M × 512: 0.2 s against 0.9 s
    on one core); torch is imported only here, so reading an index does not pay for it."""
    import torch

    scores = np.empty((len(block), len(q)), np.float32)
    queries = torch.from_numpy(np.ascontiguousarray(q.T))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only memory map: torch only reads it
        for at in range(0, len(block), _WIDEN_ROWS):
            rows = torch.from_numpy(np.asarray(block[at : at + _WIDEN_ROWS])).float()
            torch.matmul(rows, queries, out=torch.from_numpy(scores[at : at + _WIDEN_ROWS]))
    return scores.T


def _pool() -> ThreadPoolExecutor:
    # One worker per core: NumPy releases the GIL while it widens and multiplies, so blocks are
    # scored in parallel (a single query alone would use one core: a matrix-vector product).
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=os.cpu_count(), thread_name_prefix="mmcli-exact")
    return _POOL


def query_matrix(queries: np.ndarray, dim: int) -> np.ndarray:
    q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must be Q×{dim}, got shape {np.shape(queries)}")
    if not np.isfinite(q).all():
        raise ValueError("queries contain NaN or infinity")
    return np.ascontiguousarray(q)


def _top_k_columns(scores: np.ndarray, k: int) -> np.ndarray:
    """Column ids of each row's ``k`` largest scores (unordered), lower ids first among ties."""
    n = scores.shape[1]
    if k >= n:
        return np.broadcast_to(np.arange(n), scores.shape).copy()
    ids = np.argpartition(scores, n - k, axis=1)[:, n - k :]
    # argpartition picks arbitrarily among scores equal to the k-th: redo the rows where a
    # tied score was left out, with a stable sort that keeps lower ids first.
    kth = np.take_along_axis(scores, ids, axis=1).min(axis=1, keepdims=True)
    for row in np.flatnonzero(np.count_nonzero(scores >= kth, axis=1) > k):
        ids[row] = np.argsort(-scores[row], kind="stable")[:k]
    return ids


def _merge_top_k(s1: np.ndarray, i1: np.ndarray, s2: np.ndarray, i2: np.ndarray, k: int):
    scores, ids = np.concatenate([s1, s2], axis=1), np.concatenate([i1, i2], axis=1)
    order = np.lexsort((ids, -scores), axis=1)[:, :k]  # by score, then by lower id
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def recall_at_k(found_ids: np.ndarray, true_ids: np.ndarray) -> float:
    """Mean fraction of each row of ``true_ids`` (Q×k) that appears in the same row of ``found_ids``."""
    if true_ids.size == 0:
        return 1.0
    hits = [len(np.intersect1d(f, t)) for f, t in zip(found_ids, true_ids)]
    return float(np.sum(hits) / true_ids.size)
