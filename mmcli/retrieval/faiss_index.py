"""Approximate nearest-neighbour search over an embedding index with FAISS.

``build_faiss`` picks the index kind from the row count, the dimension and a memory budget
(:mod:`mmcli.retrieval.index_plan`: flat, IVF-Flat, IVF-PQ with exact re-ranking, HNSW by name),
trains it on a sample and adds the rows block by block from the memory-mapped ``.npy`` (shards
one after another, one id space), tunes its search parameter on held-out rows until recall@10
against exact search reaches the target, and saves it next to the ``.npy``; ``load_or_build_faiss``
reuses a saved one while the index it was built from is unchanged. faiss is imported inside the
functions, so importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmcli.errors import MmcliError
from mmcli.io import atomic_write, atomic_write_json
from mmcli.retrieval import ivf_on_disk
from mmcli.retrieval.index import (
    VERSION,
    Embeddings,
    Index,
    iter_row_blocks,
    query_matrix,
    read_rows,
    read_sidecar,
    recall_at_k,
    release_pages,
    search_exact,
    take_rows,
)
from mmcli.retrieval.index_plan import (
    FLAT_MAX_ROWS,  # noqa: F401 - re-exported: callers knew it here
    HNSW_M,
    RERANK_FACTOR,
    IndexPlan,
    block_rows,
    plan_index,
)

FAISS_AUTO_THRESHOLD = 2_000_000
"""Above this many rows retrieval uses FAISS instead of :func:`search_exact`. Exact search
reads the whole matrix once per query batch: at 1M×512 float32 on two cores it took 20 ms/query
in batches of 100 and 120-150 ms for a single query (``tests/bench/retrieve_latency.py``), so
past 2M rows a single query stops feeling interactive, while IVF stays under 1 ms/query on
clustered data (on uniform random vectors, which have no near neighbours, no index helps)."""

RECALL_TARGET = 0.95
"""Recall@10 an approximate index must reach against exact search."""

_TUNE_RECALL = 0.96  # the target plus a margin for the error of a 200-query estimate
_PLATEAU = 0.002  # recall gained over two more ladder steps below which tuning stops
_QUANTIZER_EF = 128  # HNSW coarse quantizer's search depth: FAISS's 16 missed a query's nearest list ~4% of the time
_RECALL_QUERIES = 200
_HNSW_EF_CONSTRUCTION = 80
_KMEANS_ITERATIONS = 10  # FAISS's default is 25; the coarse centroids change little after 10 (and 10M rows need hours)
_FINGERPRINT_BYTES = 1 << 20
_RERANK_QUERIES = 16  # re-ranked together: 16 × 200 candidates × 512 float32 is 6.6 MB


@dataclass
class FaissIndex:
    """A FAISS index over an :class:`Index`, with how it was made.

    ``kind`` is ``flat``, ``hnsw``, ``ivf`` or ``ivfpq``; ``params`` the build and (tuned)
    search parameters; ``recall_at_10`` the recall against exact search measured at build time
    (see :func:`build_faiss`); ``held_out`` the rows added last, after tuning; ``built`` is
    False when it was loaded from ``path``. ``rerank`` (IVF-PQ) holds the rows that hits are
    re-scored against exactly (the memory-mapped index), fetching ``RERANK_FACTOR`` × k candidates.
    ``lists_file`` is where a freshly built index keeps its on-disk inverted lists until it is saved.
    """

    index: Any
    kind: str
    params: dict
    recall_at_10: float | None
    held_out: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    path: str | None = None
    built: bool = True
    build_seconds: float = 0.0
    rerank: Embeddings | None = field(default=None, repr=False)
    lists_file: str | None = None

    def __len__(self) -> int:
        return int(self.index.ntotal)


def choose_faiss_kind(count: int, dim: int = 512, max_memory: int | None = None) -> str:
    """The FAISS index ``kind="auto"`` builds for ``count`` rows of ``dim`` under ``max_memory``
    bytes (default: half this machine's memory): ``flat``, ``ivf`` or ``ivfpq`` (see
    :func:`mmcli.retrieval.index_plan.plan_index`).

    Measured on 1M×512 float32, two shared cores, clustered synthetic data: IVF built in
    109 s and answered in 0.55 ms/query (one at a time) at recall@10 0.99; HNSW (M=32,
    efConstruction=80) took 412 s to build, needed efSearch=192 and answered in 1.05 ms/query
    at recall@10 0.96. ``hnsw`` is built only by name.
    """
    return plan_index(count, dim, max_memory=max_memory).kind


def build_faiss(
    index: Index,
    *,
    kind: str = "auto",
    path: str | None = None,
    tune_queries: np.ndarray | None = None,
    max_memory: int | None = None,
) -> FaissIndex:
    """Build a FAISS index over ``index`` under ``max_memory`` bytes, tune its search parameter,
    and save it at ``path``.

    The plan (:func:`~mmcli.retrieval.index_plan.plan_index`) is trained on a sample of rows read
    from the memory map; the rows are then added in blocks of about 128 MB as float32, so the
    process holds the index, one block and little else whatever N is. The search parameter (HNSW
    ``efSearch``, IVF ``nprobe``) is the smallest that reaches recall@10 ≥ 0.96 against exact
    search, and that recall is returned. It is measured with ``tune_queries`` (e.g. a sample of
    text embeddings for an image index) or else with 200 indexed rows held out of the index until
    tuning is done: a row that is already in the index finds itself and its neighbours far too
    easily and overstates recall.
    """
    faiss = _import_faiss()
    plan = plan_index(len(index), index.dim, kind=kind, max_memory=max_memory)
    block = block_rows(plan.budget, index.dim)
    start = time.perf_counter()
    fi, params = _new_faiss_index(faiss, plan, index.embeddings, block)
    held_out = _held_out_rows(len(index)) if tune_queries is None else np.zeros(0, np.int64)
    queries = query_matrix(take_rows(index.embeddings, held_out) if tune_queries is None else tune_queries, index.dim)
    exact_ids = _exact_ids_without(index.embeddings, queries, 10, held_out, block)
    if plan.on_disk:
        result = _build_on_disk(faiss, plan, index, fi, params, held_out, queries, exact_ids, path)
    else:
        later = queries if held_out.size else None
        _add_rows(faiss, fi, index.embeddings, skip=held_out, later=later, per_block=block)
        result = FaissIndex(fi, plan.kind, params, None, held_out, path, True, 0.0)
        result.rerank = index.embeddings if plan.rerank else None
        result.params, result.recall_at_10 = _tune_search(faiss, result, queries, exact_ids)
        if held_out.size:
            _add_later(faiss, fi, queries)
    result.build_seconds = time.perf_counter() - start
    if path is not None:
        _save_faiss(faiss, result, index)
    return result


def _build_on_disk(
    faiss, plan: IndexPlan, index: Index, trained, params: dict, held_out: np.ndarray, queries, exact_ids, path
) -> FaissIndex:
    """Codes written in shards of ``plan.shard_rows`` rows, the search tuned over the shards side by
    side, then every shard (the held-out rows' last) merged into one on-disk lists file, staged in
    a folder beside ``path`` until :func:`_save_faiss` moves it into place."""
    name = os.path.basename(path) if path else "index.faiss"
    staging = tempfile.mkdtemp(prefix=f".{name}.", suffix=".building", dir=os.path.dirname(path) if path else None)
    try:
        fresh, add = (lambda: faiss.clone_index(trained)), _adder(faiss, trained)
        blocks = _kept_blocks(index.embeddings, held_out, block_rows(plan.budget, index.dim))
        files = ivf_on_disk.write_shards(fresh, add, blocks, plan.shard_rows, staging)
        kept = ivf_on_disk.ShardLists(faiss, files)
        view = ivf_on_disk.StackedView(faiss, trained, kept)
        result = FaissIndex(view.index, plan.kind, {**params, "on_disk": True}, None, held_out, path, True, 0.0)
        result.rerank = index.embeddings
        result.params, result.recall_at_10 = _tune_search(faiss, result, queries, exact_ids)
        view.close()
        kept.close()
        if held_out.size:
            files += ivf_on_disk.write_shards(fresh, add, [queries], len(queries), staging, first_label=kept.ntotal)
        every = ivf_on_disk.ShardLists(faiss, files)
        result.lists_file = os.path.join(staging, name + ".ivfdata")
        result.index = ivf_on_disk.merge_on_disk(faiss, trained, every, result.lists_file)
        every.close()
        for file in files:
            os.unlink(file)
        _set_search_param(faiss, result.index, plan.kind, result.params["nprobe"])
        return result
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_or_build_faiss(
    index: Index,
    *,
    kind: str = "auto",
    path: str | None = None,
    tune_queries: np.ndarray | None = None,
    max_memory: int | None = None,
) -> FaissIndex:
    """The FAISS index saved next to ``index`` if it is fresh (and of ``kind``, unless ``auto``:
    then whatever ``mmcli index build`` made), else a new one.

    Saved as ``<index>.faiss`` plus ``<index>.faiss.json`` (kind, params, recall and a
    fingerprint of the .npy files: a rewritten index is detected and the FAISS one rebuilt).
    ``tune_queries`` and ``max_memory`` are passed to :func:`build_faiss` when a build is needed.
    """
    path = path or index.path + ".faiss"
    saved = _load_faiss(path, index, None if kind == "auto" else kind)
    if saved is not None:
        return saved
    return build_faiss(index, kind=kind, path=path, tune_queries=tune_queries, max_memory=max_memory)


def search_faiss(fi: FaissIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of ``queries`` in ``fi``: ``(scores, ids)`` as :func:`search_exact` returns them.

    An IVF-PQ index fetches ``RERANK_FACTOR`` × k candidates by their codes and orders them by
    their exact cosine, read from the rows. Rows an approximate search could not fill (tiny
    ``nprobe``) have id -1 and score -inf.
    """
    q = query_matrix(queries, fi.index.d)
    k = min(int(k), len(fi))
    if k <= 0:
        return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
    scores, ids = _search(fi, q, k, count=len(fi))
    return np.where(ids < 0, -np.inf, scores).astype(np.float32), ids


def _search(fi: FaissIndex, q: np.ndarray, k: int, *, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and index rows of the top ``k`` (``count``: the index's rows, held-out ones included)."""
    fetch = min(int(fi.index.ntotal), k * RERANK_FACTOR) if fi.rerank is not None else k
    scores, labels = fi.index.search(q, fetch)
    ids = _label_rows(labels, fi.held_out, count)
    return _rerank(fi.rerank, q, ids, k) if fi.rerank is not None else (scores, ids)


def _rerank(rows: Embeddings, q: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of each query's candidate ``ids`` by exact cosine with ``rows`` (-1: none),
    ties to the lower row, :data:`_RERANK_QUERIES` queries at a time: their candidates' rows as
    float32 are then a few MB (200 queries at once, as the tuning asks, would hold ~0.2 GB)."""
    if len(q) <= _RERANK_QUERIES:
        return _rerank_some(rows, q, ids, k)
    parts = [
        _rerank_some(rows, q[i : i + _RERANK_QUERIES], ids[i : i + _RERANK_QUERIES], k)
        for i in range(0, len(q), _RERANK_QUERIES)
    ]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _rerank_some(rows: Embeddings, q: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_rerank` of a few queries; each distinct candidate row among them is read once."""
    found = ids >= 0
    unique = np.unique(ids[found])
    if not unique.size:
        return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
    vectors = read_rows(rows, unique).astype(np.float32)  # pread: no pages mapped into the process
    exact = np.einsum("qd,qcd->qc", q, vectors[np.searchsorted(unique, np.where(found, ids, unique[0]))])
    exact = np.where(found, exact, -np.inf).astype(np.float32)
    order = np.lexsort((ids, -exact), axis=1)[:, :k]
    scores = np.take_along_axis(exact, order, axis=1)
    return scores, np.where(np.isfinite(scores), np.take_along_axis(ids, order, axis=1), -1)


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


def _new_faiss_index(faiss, plan: IndexPlan, embeddings: Embeddings, block: int) -> tuple[Any, dict]:
    """An empty (trained) index for ``plan`` and its build parameters; its sample is read ``block``
    rows at a time."""
    dim = embeddings.shape[1]
    if plan.kind == "flat":
        return faiss.IndexFlatIP(dim), {}
    fi = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "hnsw":
        fi.hnsw.efConstruction = _HNSW_EF_CONSTRUCTION
        if plan.train_rows:  # an 8-bit scalar quantizer learns each dimension's range
            fi.train(_sample_rows(embeddings, _sample_ids(len(embeddings), plan.train_rows), block))
        return fi, {
            "M": HNSW_M,
            "efConstruction": _HNSW_EF_CONSTRUCTION,
            "factory": plan.factory,
            "max_memory": plan.budget,
        }
    ivf = faiss.extract_index_ivf(fi)
    ivf.cp.niter = _KMEANS_ITERATIONS
    codes = faiss.downcast_index(ivf)
    if hasattr(codes, "do_polysemous_training"):
        # FAISS's factory turns on polysemous training (a simulated annealing of the codes' order, for
        # Hamming-distance filtering), which mmcli's search never uses: 45 s of a 20k-row build.
        codes.do_polysemous_training = False
    _set_quantizer_ef(faiss, ivf, _QUANTIZER_EF)  # training finds the sample's lists (PQ trains on residuals)
    sample = _sample_rows(embeddings, _sample_ids(len(embeddings), plan.train_rows), block)
    fi.train(sample)
    del sample  # the budget's room for the sample is the codes' room next
    params = {"nlist": plan.nlist, "factory": plan.factory, "train_rows": plan.train_rows}
    if plan.kind == "ivfpq":
        params.update(m=plan.m, opq=plan.opq, rerank=RERANK_FACTOR, max_memory=plan.budget)
    return fi, params


def _sample_ids(count: int, size: int) -> np.ndarray:
    """A fixed random sample of ``size`` of ``count`` rows, sorted: what trains an index."""
    return np.sort(np.random.default_rng(1).choice(count, size=size, replace=False))


def _sample_rows(embeddings: Embeddings, rows: np.ndarray, region: int) -> np.ndarray:
    """float32 copies of the sorted ``rows``, read ``region`` rows of the file at a time and each region's
    pages handed back before the next: a random sample touches pages all over the file, and at
    10M rows they would otherwise stay resident as GBs of the process's memory."""
    sample = np.empty((len(rows), embeddings.shape[1]), np.float32)
    for start, block in iter_row_blocks(embeddings, region, release=True):
        first, last = np.searchsorted(rows, [start, start + len(block)])
        sample[first:last] = block[rows[first:last] - start]
    return sample


def _set_quantizer_ef(faiss, ivf, ef: int) -> None:
    """The search depth of an HNSW coarse quantizer (``IVFn_HNSW32``); nothing for an exact one."""
    quantizer = faiss.downcast_index(ivf.quantizer)
    if hasattr(quantizer, "hnsw"):
        quantizer.hnsw.efSearch = ef


def _held_out_rows(count: int) -> np.ndarray:
    """Sorted random rows (200, or a tenth of a small index) kept back to tune the search."""
    size = min(_RECALL_QUERIES, count // 10)
    return np.sort(np.random.default_rng(0).choice(count, size=size, replace=False))


def _add_rows(
    faiss, fi, embeddings: Embeddings, *, skip: np.ndarray, later: np.ndarray | None = None, per_block: int = 65_536
) -> None:
    """Add every row but ``skip`` to ``fi``, in row order, ``per_block`` rows at a time.

    An IVF index's inverted lists grow by doubling (``std::vector``) when rows are added block by
    block, so they can hold twice the codes' memory. Instead every row's list is found first (its nearest
    centroid, :func:`_list_finder`), each list is given room for exactly its rows (and ``later``'s,
    added after tuning), and the codes are then added with those lists: the index FAISS's add would
    make with an exact quantizer, at the cost of reading the rows twice.
    """
    ivf = _in_memory_ivf(faiss, fi)
    if ivf is None:
        if hasattr(fi, "hnsw"):
            _reserve_graph(faiss, fi, len(embeddings))
        for block in _kept_blocks(embeddings, skip, per_block):
            fi.add(block)
        return
    rotate = _pre_transform(faiss, fi)
    lists = _sized_lists(ivf, _list_finder(faiss, ivf), rotate, _kept_blocks(embeddings, skip, per_block), later)
    at = 0
    for block in _kept_blocks(embeddings, skip, per_block):
        _add_to_lists(faiss, fi, ivf, rotate(block), lists[at : at + len(block)])
        at += len(block)


def _add_to_lists(faiss, fi, ivf, x: np.ndarray, lists: np.ndarray, ids: np.ndarray | None = None) -> None:
    """Add rows ``x`` (already rotated, if ``fi`` rotates) to the IVF index ``ivf`` inside ``fi``,
    each to its given list, numbered on from ``fi.ntotal`` unless ``ids`` are given."""
    assigned = np.ascontiguousarray(lists, dtype=np.int64)
    ivf.add_core(len(x), faiss.swig_ptr(x), None if ids is None else faiss.swig_ptr(ids), faiss.swig_ptr(assigned))
    fi.ntotal = ivf.ntotal  # an OPQ wrapper counts its rows apart from the IVF inside it


def _adder(faiss, trained):
    """How rows are added to ``trained`` or an empty copy of it: each row to the list
    :func:`_list_finder` finds for it (``add(index, rows, ids=None)``; no ids: numbered on)."""
    finder = _list_finder(faiss, faiss.extract_index_ivf(trained))

    def add(index, rows: np.ndarray, ids: np.ndarray | None = None) -> None:
        x = _pre_transform(faiss, index)(rows)
        _add_to_lists(faiss, index, faiss.extract_index_ivf(index), x, finder.assign(x, 1).ravel(), ids)

    return add


def _add_later(faiss, fi, rows: np.ndarray) -> None:
    """Add ``rows`` after the rest (the held-out rows, once tuning is done), into the room
    :func:`_add_rows` kept for them: to the lists it counted them in, not through FAISS's add, whose
    HNSW quantizer could pick another."""
    if _in_memory_ivf(faiss, fi) is None:
        fi.add(rows)
    else:
        _adder(faiss, fi)(fi, rows)


def _sized_lists(ivf, finder, rotate, blocks, later: np.ndarray | None) -> np.ndarray:
    """Each row's list as ``finder`` finds it (int32: 4 bytes a row, which the plan counts), every
    list given room for its rows and for ``later``'s."""
    lists = [finder.assign(rotate(block), 1).ravel().astype(np.int32) for block in blocks]
    lists = np.concatenate(lists) if lists else np.zeros(0, np.int32)
    extra = finder.assign(rotate(later), 1).ravel() if later is not None and len(later) else lists[:0]
    sizes = np.bincount(np.concatenate([lists, extra]), minlength=ivf.nlist)
    for list_no in np.flatnonzero(sizes):
        ivf.invlists.resize(int(list_no), int(sizes[list_no]))  # std::vector keeps the room on shrinking
        ivf.invlists.resize(int(list_no), 0)
    return lists


def _list_finder(faiss, ivf):
    """What finds each added row's inverted list: the coarse quantizer, or, when that is an HNSW
    graph (``IVFn_HNSW32``), an exact search of its centroids. The graph answers one query faster,
    but a block of rows is a matrix product: at 10M rows (8,738 lists) a 65,536-row block took 5.1 s
    exact against 22 s through the graph at efSearch 128, which also missed 1 row in 65,536."""
    quantizer = faiss.downcast_index(ivf.quantizer)
    if not hasattr(quantizer, "hnsw"):
        return quantizer
    exact = faiss.IndexFlat(ivf.d, quantizer.metric_type)
    exact.add(quantizer.reconstruct_n(0, quantizer.ntotal))
    return exact


def _reserve_graph(faiss, fi, rows: int) -> None:
    """Room for ``rows`` in an HNSW index's vectors and links before any is added, so that neither is
    copied to a buffer twice its size as blocks are added. A row has 2·M links in the bottom layer
    and on average M/(M-1) above it."""
    storage = faiss.downcast_index(fi.storage)
    for vector, size in ((storage.codes, rows * storage.code_size), (fi.hnsw.neighbors, rows * (2 * HNSW_M + 2))):
        vector.resize(size)  # the underlying std::vector keeps its room when shrunk back
        vector.resize(0)


def _in_memory_ivf(faiss, fi):
    """The IVF index inside ``fi`` when its lists are FAISS's in-memory arrays, else None."""
    try:
        ivf = faiss.extract_index_ivf(fi)
    except RuntimeError:  # flat, HNSW
        return None
    return ivf if isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists) else None


def _pre_transform(faiss, fi):
    """What ``fi`` does to rows before its IVF index sees them: an OPQ rotation, or nothing."""
    if not isinstance(fi, faiss.IndexPreTransform):
        return lambda x: x
    chain = [fi.chain.at(i) for i in range(fi.chain.size())]

    def rotate(x: np.ndarray) -> np.ndarray:
        for transform in chain:
            x = transform.apply(x)
        return np.ascontiguousarray(x, dtype=np.float32)

    return rotate


def _kept_blocks(embeddings: Embeddings, skip: np.ndarray, rows: int):
    """Every row but ``skip``, in row order, as float32 blocks of ``rows`` rows (shard after shard),
    each block's pages of the memory map handed back once the next is asked for."""
    keep = np.ones(len(embeddings), dtype=bool)
    keep[skip] = False
    for start, block in iter_row_blocks(embeddings, rows, release=True):
        yield np.ascontiguousarray(block[keep[start : start + len(block)]], dtype=np.float32)


def _exact_ids_without(
    embeddings: Embeddings, queries: np.ndarray, k: int, excluded: np.ndarray, block: int
) -> np.ndarray:
    """Exact top-``k`` ids of ``queries`` among the rows not in ``excluded``, ``block`` rows at a time."""
    # Smaller blocks than a search's default: the score matrix and argpartition's ids of 200 queries
    # over 262k rows would add ~0.7 GB to the build's peak; and NumPy alone: importing torch to widen
    # float16 rows would add ~0.45 GiB of libraries.
    ids = search_exact(embeddings, queries, k + len(excluded), chunk_rows=block, release=True, numpy_only=True)[1]
    if not len(excluded):
        return ids
    return np.stack([row[~np.isin(row, excluded)][:k] for row in ids]) if len(ids) else ids[:, :k]


def _search_ladder(kind: str, params: dict) -> list[int | None]:
    """Search-parameter values to try, cheapest first (None: the kind has no such parameter)."""
    if kind == "hnsw":
        return [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    if kind in ("ivf", "ivfpq"):
        nlist = params["nlist"]
        return sorted({min(nlist, round(2 ** (i / 2))) for i in range(2 * int(math.log2(nlist)) + 2)})
    return [None]


def _set_search_param(faiss, fi, kind: str, value: int | None) -> dict:
    if kind == "hnsw":
        fi.hnsw.efSearch = value
        return {"efSearch": value}
    if kind in ("ivf", "ivfpq"):
        ivf = faiss.extract_index_ivf(fi)
        ivf.nprobe = value
        _set_quantizer_ef(faiss, ivf, max(_QUANTIZER_EF, 2 * value))
        return {"nprobe": value}
    return {}


def _tune_search(faiss, fi: FaissIndex, queries: np.ndarray, exact_ids: np.ndarray) -> tuple[dict, float]:
    """The cheapest search parameter reaching the tuning recall, and the recall of the whole search
    with it (re-ranking included), measured before the held-out rows are added.

    When recall stops improving (less than 0.002 over two more steps of the ladder: IVF-PQ's codes
    cap what more lists can find), the cheapest value of the plateau is kept instead of climbing
    to a full scan for nothing.
    """
    k, count = exact_ids.shape[1], int(fi.index.ntotal) + len(fi.held_out)
    tried: list[tuple[int | None, float]] = []
    for value in _search_ladder(fi.kind, fi.params):
        _set_search_param(faiss, fi.index, fi.kind, value)
        recall = recall_at_k(_search(fi, queries, k, count=count)[1], exact_ids) if k else 1.0
        if fi.rerank is not None:
            release_pages(fi.rerank)  # each step reads 20·k candidates a query, scattered over the file
        tried.append((value, recall))
        if recall >= _TUNE_RECALL:
            break
        if len(tried) >= 3 and recall < tried[-3][1] + _PLATEAU:
            break
    best = max(r for _, r in tried)
    value, recall = next((v, r) for v, r in tried if r >= best - _PLATEAU)
    return {**fi.params, **_set_search_param(faiss, fi.index, fi.kind, value)}, recall


def _fingerprint(index: Index) -> str:
    """sha256 over each .npy's size, first MiB and sidecar creation time.

    Hashing whole files would take seconds at 1M rows; every rewrite by IndexWriter changes
    the creation time, and size + header + first rows catch most other edits. The creation times
    are those read when the index was opened (a sidecar read again would be ~0.7 GB of item names
    parsed at 10M rows).
    """
    digest = hashlib.sha256()
    files = index.files or (index.path,)
    created = index.created or tuple(read_sidecar(path).get("created") for path in files)
    for path, when in zip(files, created):
        with open(path, "rb") as f:
            digest.update(f.read(_FINGERPRINT_BYTES))
        digest.update(str(os.path.getsize(path)).encode())
        digest.update(json.dumps(when).encode())
    return "sha256:" + digest.hexdigest()


def _save_faiss(faiss, fi: FaissIndex, index: Index) -> None:
    """The FAISS file, its lists file when they are on disk, and last the description that makes
    them count as fresh (removed first: a reader never pairs an old description with new files)."""
    lists = fi.path + ".ivfdata"
    try:
        if os.path.exists(fi.path + ".json"):
            os.unlink(fi.path + ".json")
        if fi.lists_file is not None:
            os.replace(fi.lists_file, lists)
            shutil.rmtree(os.path.dirname(fi.lists_file), ignore_errors=True)
            fi.lists_file = None
        atomic_write(fi.path, lambda tmp: faiss.write_index(fi.index, str(tmp)))
        if not fi.params.get("on_disk") and os.path.exists(lists):
            os.unlink(lists)  # an earlier on-disk build's lists
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


def _load_faiss(path: str, index: Index, kind: str | None) -> FaissIndex | None:
    try:
        with open(path + ".json", encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None  # no usable description: a cache miss, not an error
    fresh = (
        saved.get("format") == "mmcli-faiss"
        and saved.get("version") == VERSION
        and kind in (None, saved.get("kind"))
        and saved.get("count") == len(index)
        and saved.get("fingerprint") == _fingerprint(index)
    )
    if not fresh or not os.path.exists(path):
        return None
    faiss = _import_faiss()
    kind = saved["kind"]
    try:
        # Inverted lists are memory-mapped, not read: only the lists a query probes are paged in.
        if saved["params"].get("on_disk"):
            fi = ivf_on_disk.read_on_disk(faiss, path)
        else:
            fi = faiss.read_index(path, faiss.IO_FLAG_MMAP if kind in ("ivf", "ivfpq") else 0)
    except RuntimeError:
        return None  # a damaged file is rebuilt
    search_value = saved["params"].get("efSearch", saved["params"].get("nprobe"))
    _set_search_param(faiss, fi, kind, search_value)
    held_out = np.asarray(saved.get("held_out", []), dtype=np.int64)
    loaded = FaissIndex(fi, kind, saved["params"], saved.get("recall_at_10"), held_out, path, built=False)
    loaded.rerank = index.embeddings if kind == "ivfpq" else None
    return loaded
