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
(:func:`search_exact`, :func:`recall_at_k`), :mod:`~mmcli.retrieval.index.metadata` (the Parquet file
of per-row captions and file signatures). Import from ``mmcli.retrieval.index``; every public name is
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
from mmcli.retrieval.index.metadata import Metadata, file_stat, metadata_path, read_metadata
from mmcli.retrieval.index.reader import (
    Embeddings,
    Index,
    RowConcat,
    open_index,
    read_rows,
    read_sidecar,
    take_rows,
)
from mmcli.retrieval.index.search import iter_row_blocks, query_matrix, recall_at_k, release_pages, search_exact
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
    # metadata
    "Metadata",
    "file_stat",
    "metadata_path",
    "read_metadata",
    # writer
    "IndexWriter",
    "ResumeState",
    # reader
    "Embeddings",
    "Index",
    "RowConcat",
    "open_index",
    "read_sidecar",
    "read_rows",
    "take_rows",
    # search
    "iter_row_blocks",
    "query_matrix",
    "recall_at_k",
    "release_pages",
    "search_exact",
]
