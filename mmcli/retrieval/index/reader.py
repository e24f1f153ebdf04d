"""Reading an index: memory-mapped :class:`Index`, shards as one :class:`RowConcat`, the sidecar."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from mmcli.errors import MmcliError
from mmcli.retrieval.index.files import (
    FORMAT,
    VERSION,
    _base_of,
    _check_npy_path,
    _partial,
    _shard_files,
    shard_path,
    sidecar_path,
)
from mmcli.retrieval.index.metadata import Metadata, read_metadata

# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


class RowConcat:
    """Shards read as one N×D matrix without copying; indexing copies only the rows asked for."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.dtype = parts[0].dtype
        self.shape = (int(self.offsets[-1]), parts[0].shape[1])
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (int array, negative counts from the end) as a new array."""
        rows = np.asarray(rows, dtype=np.int64)
        rows = np.where(rows < 0, rows + len(self), rows)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        out = np.empty((rows.size, self.shape[1]), self.dtype)
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        for p in np.unique(part):
            sel = part == p
            out[sel] = self.parts[p][rows[sel] - self.offsets[p]]
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, slice):
            rows = self.take(np.arange(*key.indices(len(self))))
        elif np.ndim(key) == 0:
            rows = self.take(np.array([key]))[0]
            return rows[rest] if rest else rows
        else:
            rows = self.take(key)
        return rows[(slice(None),) + rest] if rest else rows

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.concatenate(self.parts)
        return out if dtype is None else out.astype(dtype)


Embeddings = np.ndarray | RowConcat


def take_rows(embeddings: Embeddings, rows: list[int] | np.ndarray) -> np.ndarray:
    """Rows ``rows`` of ``embeddings`` (a memmap or shards) as a new array, in the stored dtype."""
    rows = np.asarray(rows, np.int64)
    if isinstance(embeddings, RowConcat):
        return embeddings.take(rows)
    return np.asarray(embeddings[rows])


def read_rows(embeddings: Embeddings, rows: list[int] | np.ndarray) -> np.ndarray:
    """Rows ``rows`` of ``embeddings`` (like :func:`take_rows`), read from the ``.npy`` files with
    ``pread`` instead of through the memory map.

    Scattered reads through a mapping fault in each page's neighbourhood as well (the kernel's
    fault-around, about 64 KB), and those pages stay in the process's resident size: re-ranking
    40,000 candidates of 200 queries mapped the whole 1 GB of a 1M-row index. Read this way, the
    pages stay in the OS's file cache only. Arrays that are not file-backed are indexed in memory.
    """
    rows = np.asarray(rows, np.int64)
    parts, starts = (embeddings.parts, embeddings.offsets) if isinstance(embeddings, RowConcat) else ([embeddings], [0])
    out = np.empty((len(rows), embeddings.shape[1]), embeddings.dtype)
    for part, start in zip(parts, starts):
        chosen = np.flatnonzero((rows >= start) & (rows < start + len(part)))
        if not chosen.size:
            continue
        local = rows[chosen] - start
        filename = getattr(part, "filename", None)
        if filename is None or not isinstance(part, np.memmap):
            out[chosen] = part[local]
            continue
        size = part.strides[0]
        fd = os.open(filename, os.O_RDONLY)
        try:
            for at, row in zip(chosen, local):
                out[at] = np.frombuffer(os.pread(fd, size, part.offset + int(row) * size), part.dtype)
        finally:
            os.close(fd)
    return out


@dataclass(frozen=True)
class Index:
    """A complete index opened read-only.

    ``embeddings`` is the N×D read-only memmap (a :class:`RowConcat` of memmaps for shards),
    ``meta`` the sidecar (for shards: the first one's, with count, items and skipped of all),
    ``items`` row → relative path or text (absent when opened with ``items=False``), ``created``
    each file's sidecar creation time.
    """

    path: str
    embeddings: Embeddings
    meta: dict = field(repr=False)
    files: tuple[str, ...] = ()
    created: tuple = ()

    @property
    def items(self) -> list[str]:
        """Row → item (relative path or text)."""
        if "items" not in self.meta:
            raise ValueError(f"{self.path} was opened without its items")
        return self.meta["items"]

    def item_path(self, item: str) -> str:
        """The file of ``item`` (a row of an image index): ``root`` joined with the item.

        Items are paths relative to ``root`` by construction; a sidecar whose item is absolute,
        climbs out of ``root`` through ``..`` or has no ``root`` to start from was not written by
        mmcli (or was edited), and is refused rather than read from wherever it points.
        """
        root = self.meta.get("root")
        side = sidecar_path(self.path) if len(self.files) <= 1 else f"the shard sidecars of {self.path}"
        if not isinstance(root, str) or not os.path.isabs(root):
            raise MmcliError(f"{side}: field 'root' is {root!r}, not an absolute folder; re-run embed")
        parts = PurePosixPath(item).parts if isinstance(item, str) else ()
        if not parts or item.startswith("/") or ".." in parts:
            raise MmcliError(
                f"{side}: item {item!r} is not a path inside the index root {root} (absolute, or climbing out "
                "with '..'); refusing to read it"
            )
        return os.path.join(root, *parts)

    @functools.cached_property
    def metadata(self) -> Metadata | None:
        """Per-row captions, file signatures and kept columns (the ``.parquet`` beside each ``.npy``),
        or ``None`` for an index written without (:func:`~mmcli.retrieval.index.metadata.read_metadata`)."""
        parts = self.embeddings.parts if isinstance(self.embeddings, RowConcat) else [self.embeddings]
        return read_metadata(self.files or (self.path,), [len(p) for p in parts], self.items)

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return self.embeddings.shape[1]

    def __len__(self) -> int:
        return self.embeddings.shape[0]


def open_index(path: str | os.PathLike, *, items: bool = True) -> Index:
    """Open the index at ``path`` (``emb.npy``; shards are found from that base name).

    ``items=False`` checks the items but keeps none of them: a FAISS build needs only the rows, and
    10M item names held as Python strings are ~0.7 GB of its memory.
    """
    path = _check_npy_path(path)
    files = _index_files(path)
    arrays, metas = [], []
    for file in files:
        array, meta = _open_one(file)
        arrays.append(array)
        metas.append(meta if items else {k: v for k, v in meta.items() if k != "items"})
    created = tuple(meta.get("created") for meta in metas)
    if len(files) == 1:
        return Index(path, arrays[0], metas[0], tuple(files), created)
    return Index(path, RowConcat(arrays), _merge_shard_meta(files, metas), tuple(files), created)


def _index_files(path: str) -> list[str]:
    """The file(s) making up the index named ``path``, or a one-line reason why there are none."""
    shards = _shard_files(path) if _base_of(path) == path else {}
    if not shards:
        if not os.path.exists(path):
            raise _missing(path)
        return [path]
    if os.path.exists(path):
        raise MmcliError(f"{path} and shards of it both exist; remove one of them")
    if len(shards) > 1:
        raise MmcliError(f"shards of {path} from runs with {sorted(shards)} ranks both exist; remove the stale ones")
    ((world, ranks),) = shards.items()
    for rank in range(world):
        if rank not in ranks:
            raise _missing(shard_path(path, rank, world))
    return [ranks[r] for r in range(world)]


def _missing(path: str) -> MmcliError:
    if os.path.exists(_partial(path)) or _shard_files(path, suffix=".partial"):
        return MmcliError(
            f"index {path} is incomplete (a .partial file exists): re-run embed with the same --out to resume"
        )
    return MmcliError(f"index file not found: {path}")


def _open_one(path: str) -> tuple[np.ndarray, dict]:
    meta = read_sidecar(path)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise MmcliError(f"cannot read index {path}: {exc}") from exc
    found = {
        "count": array.shape[0] if array.ndim == 2 else None,
        "dim": array.shape[1] if array.ndim == 2 else None,
        "dtype": str(array.dtype),
    }
    for key, value in found.items():
        if meta[key] != value:
            raise MmcliError(f"{path}: sidecar says {key}={meta[key]} but the array has {value}; re-run embed")
    if len(meta["items"]) != meta["count"]:
        raise MmcliError(f"{sidecar_path(path)}: {len(meta['items'])} items for {meta['count']} rows")
    return array, meta


def read_sidecar(path: str) -> dict:
    side = sidecar_path(path)
    try:
        with open(side, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise MmcliError(f"index sidecar not found: {side} (it describes {path}; re-run embed)") from None
    except (OSError, ValueError) as exc:
        raise MmcliError(f"index sidecar {side} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise MmcliError(f"{side} is not an mmcli index sidecar (format should be {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise MmcliError(f"{side}: index format version {meta.get('version')} is not supported (expected {VERSION})")
    if meta.get("complete") is not True:
        raise MmcliError(f"{side}: index is incomplete; re-run embed with the same --out to resume")
    for key in ("model", "modality", "dim", "dtype", "count", "items"):
        if key not in meta:
            raise MmcliError(f"{side}: field {key!r} is missing")
    return meta


def _merge_shard_meta(files: list[str], metas: list[dict]) -> dict:
    for path, meta in zip(files[1:], metas[1:]):
        for key in ("model", "modality", "dim", "dtype"):
            if meta[key] != metas[0][key]:
                raise MmcliError(f"{path}: {key} differs from {files[0]}; these shards are not one index")
    merged = {k: v for k, v in metas[0].items() if k != "shard"}
    merged["count"] = sum(m["count"] for m in metas)
    if all("items" in m for m in metas):
        merged["items"] = [item for m in metas for item in m["items"]]
    merged["skipped"] = [s for m in metas for s in m.get("skipped", [])]
    merged["shards"] = [os.path.basename(f) for f in files]
    return merged
