"""Embedding index: streaming write with a sidecar, memory-mapped read, exact search (FAISS: ann.py).

An index on disk is ``emb.npy`` (N×D L2-normalised float32 or float16 rows) plus the sidecar
``emb.npy.json`` that makes it self-describing (model, modality, dim, dtype, count, row → item).
Ranks of a distributed run write shards ``emb.rank00000-of-00002.npy`` (each with its own
sidecar) which :func:`open_index` reads, given ``emb.npy``, as one index in rank order.

Of third-party packages only numpy is imported here (FAISS lives in :mod:`mmcli.retrieval.faiss_index`, torch
nowhere), so that commands which read an index start fast.

One module per concern: :mod:`~mmcli.retrieval.index.files` (format constants, file names, the
writer's lock), :mod:`~mmcli.retrieval.index.writer` (:class:`IndexWriter`), :mod:`~mmcli.retrieval.index.reader`
(:func:`open_index`, :class:`Index`, :class:`RowConcat`) and :mod:`~mmcli.retrieval.index.search`
(:func:`search_exact`, :func:`recall_at_k`). Import from ``mmcli.retrieval.index``; every public name is
re-exported here. Private names live in their submodule: patch them there.
"""

from mmcli.retrieval.index.files import (
    DTYPES,
    FORMAT,
    MODALITIES,
    VERSION,
    index_exists,
    is_index_file,
    lock_path,
    shard_name,
    shard_path,
    sidecar_path,
    writer_lock,
)
from mmcli.retrieval.index.reader import Embeddings, Index, RowConcat, open_index, read_sidecar
from mmcli.retrieval.index.search import iter_row_blocks, query_matrix, recall_at_k, search_exact
from mmcli.retrieval.index.writer import IndexWriter, ResumeState

__all__ = [
    # files
    "DTYPES",
    "FORMAT",
    "MODALITIES",
    "VERSION",
    "index_exists",
    "is_index_file",
    "lock_path",
    "shard_name",
    "shard_path",
    "sidecar_path",
    "writer_lock",
    # writer
    "IndexWriter",
    "ResumeState",
    # reader
    "Embeddings",
    "Index",
    "RowConcat",
    "open_index",
    "read_sidecar",
    # search
    "iter_row_blocks",
    "query_matrix",
    "recall_at_k",
    "search_exact",
]
