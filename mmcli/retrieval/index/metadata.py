"""Per-row metadata of an index: a Parquet file beside the ``.npy`` (``emb.npy.parquet``).

One row per index row, in row order: ``item`` (the row's key, as in the sidecar), ``caption`` (the
caption of a dataset file's row, or a folder image's same-name ``.txt``; null when there is none),
``size`` and ``mtime_ns`` (the image file's size and modification time when it was listed, which
``embed --update`` compares to find changed files; null for texts and webdataset members) and
any ``--keep-columns`` of a dataset file (as text). Parquet, as clip-retrieval keeps its metadata,
because it scales where a JSON sidecar does not: columns are read memory-mapped and only the rows
asked for are materialised.

pyarrow is imported inside the functions, so that reading an index without metadata stays cheap.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from mmcli.errors import MmcliError
from mmcli.io import atomic_write

STAT_COLUMNS = ("size", "mtime_ns")
"""Columns describing the file a row was embedded from (see :func:`file_stat`)."""

RESERVED = ("item", "caption", *STAT_COLUMNS)
"""Column names mmcli sets itself; a ``--keep-columns`` name may not be one of them."""

Signature = tuple[int | None, int | None]
"""A file's ``(size, mtime_ns)``, or ``(None, None)`` for a row that is not a file."""

Columns = dict[str, list]
"""Column name → one value per row (``None`` for a missing value)."""

MetadataSource = Callable[[list[str]], Columns]
"""Given the items of the rows written, in row order, their metadata columns (``item`` excluded)."""


def metadata_path(path: str) -> str:
    """The metadata file of the index file ``path`` (``emb.npy`` → ``emb.npy.parquet``)."""
    return path + ".parquet"


def file_stat(path: str) -> Signature:
    """``(size, mtime_ns)`` of ``path``, or ``(None, None)`` when it cannot be read: the signature
    ``embed --update`` compares (rsync's quick check), without reading the file."""
    try:
        st = os.stat(path)
    except OSError:
        return None, None
    return st.st_size, st.st_mtime_ns


def write_metadata(path: str, items: Sequence[str], columns: Columns) -> None:
    """Write the metadata of the index file ``path`` atomically: ``item`` then ``columns``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {"item": pa.array(list(items), pa.string())}
    for name, values in columns.items():
        if len(values) != len(items):
            raise ValueError(f"metadata column {name!r} has {len(values)} values for {len(items)} rows")
        kind = pa.int64() if name in STAT_COLUMNS else pa.string()
        arrays[name] = pa.array(values, kind)
    table = pa.table(arrays)
    atomic_write(metadata_path(path), lambda tmp: pq.write_table(table, str(tmp), compression="zstd"))


class Metadata:
    """The metadata of an index (the Parquet files of its one or more ``.npy`` files, in row order).

    ``rows(ids)`` gives each row's caption and kept columns as a dict; ``column(name)`` a whole column.
    """

    def __init__(self, table, files: Sequence[str]) -> None:
        self.table, self.files = table, tuple(files)

    @property
    def columns(self) -> list[str]:
        """Column names, ``item`` first."""
        return list(self.table.column_names)

    def __len__(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> list:
        """Every value of column ``name`` (a list of Python values; ``None`` when the column is absent)."""
        if name not in self.table.column_names:
            return [None] * len(self)
        return self.table.column(name).to_pylist()

    def rows(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        """The metadata of rows ``ids``: ``caption`` and the kept columns (not the file signature)."""
        if not len(ids):
            return []
        shown = [c for c in self.table.column_names if c not in ("item", *STAT_COLUMNS)]
        taken = self.table.select(shown).take(list(ids)).to_pylist()
        return taken


def read_metadata(files: Sequence[str], counts: Sequence[int], items: Sequence[str]) -> Metadata | None:
    """The metadata of an index made of ``files`` (``counts`` rows each, ``items`` in all), or
    ``None`` if any file has none (an index written before metadata existed).

    A metadata file whose rows or items disagree with its index is an error naming it: showing
    another index's captions would be worse than showing none.
    """
    paths = [metadata_path(f) for f in files]
    if not all(os.path.exists(p) for p in paths):
        return None
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables, start = [], 0
    for path, count in zip(paths, counts):
        try:
            table = pq.read_table(path, memory_map=True)
        except (OSError, pa.ArrowException) as exc:
            raise MmcliError(f"{path}: unreadable metadata ({str(exc).splitlines()[0]}); re-run embed") from None
        if table.num_rows != count or "item" not in table.column_names:
            raise MmcliError(f"{path}: {table.num_rows} metadata rows for {count} index rows; re-run embed")
        if table.column("item").to_pylist() != list(items[start : start + count]):
            raise MmcliError(f"{path}: its items are not those of the index's rows; re-run embed")
        tables.append(table)
        start += count
    if len(tables) == 1:
        return Metadata(tables[0], paths)
    return Metadata(pa.concat_tables(tables, promote_options="default"), paths)
