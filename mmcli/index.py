"""Embedding index: streaming write with a sidecar, memory-mapped read, exact search (FAISS: ann.py).

An index on disk is ``emb.npy`` (N×D L2-normalised float32 or float16 rows) plus the sidecar
``emb.npy.json`` that makes it self-describing (model, modality, dim, dtype, count, row → item).
Ranks of a distributed run write shards ``emb.rank00000-of-00002.npy`` (each with its own
sidecar) which :func:`open_index` reads, given ``emb.npy``, as one index in rank order.

Only numpy is imported here, and faiss inside the functions that need it, so that commands
which read an index start fast.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator, Optional, Union

import numpy as np
import numpy.lib.format as npy_format

from mmcli import __version__
from mmcli.errors import MmcliError

FORMAT = "mmcli-index"
VERSION = 1
DTYPES = ("float32", "float16")
MODALITIES = ("image", "text")

_SCORE_BUDGET = 1 << 26  # score-matrix elements per chunk (256 MiB of float32)

# Sidecar fields the writer sets itself; the same keys in ``meta`` are ignored.
_WRITER_KEYS = {"format", "version", "model", "modality", "dim", "dtype", "count", "created", "root",
                "items", "skipped", "complete", "shard"}
_SHARD_RE = re.compile(r"^(?P<stem>.+)\.rank(?P<rank>\d{5})-of-(?P<world>\d{5})\.npy$")


# --------------------------------------------------------------------------------------------
# file names
# --------------------------------------------------------------------------------------------


def sidecar_path(path: str) -> str:
    """The sidecar of the index file ``path`` (``emb.npy`` → ``emb.npy.json``)."""
    return path + ".json"


def shard_path(base: str, rank: int, world_size: int) -> str:
    """The file rank ``rank`` of ``world_size`` writes for the index ``base``.

    ``shard_path("out/emb.npy", 1, 4)`` is ``out/emb.rank00001-of-00004.npy``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return f"{_check_npy_path(base)[:-4]}.rank{rank:05d}-of-{world_size:05d}.npy"


def index_exists(path: Union[str, os.PathLike]) -> bool:
    """Whether a complete index exists at ``path``: the file and its sidecar, or a full shard set."""
    path = os.fspath(path)
    if _complete(path):
        return True
    if _base_of(path) != path or not path.endswith(".npy"):
        return False
    return any(len(ranks) == world and all(_complete(p) for p in ranks.values())
               for world, ranks in _shard_files(path).items())


def _complete(path: str) -> bool:
    return os.path.exists(path) and os.path.exists(sidecar_path(path))


def _partial(path: str) -> str:
    return path + ".partial"


def _progress(path: str) -> str:
    return path + ".partial.json"


def _check_npy_path(path: Union[str, os.PathLike]) -> str:
    path = os.fspath(path)
    if not path.endswith(".npy"):
        raise MmcliError(f"index path must end with .npy: {path}")
    return path


def _base_of(path: str) -> str:
    """The name a reader gives for ``path``: a shard's base name, or ``path`` itself."""
    match = _SHARD_RE.match(os.path.basename(path))
    if match is None:
        return path
    return os.path.join(os.path.dirname(path), match["stem"] + ".npy")


def _shard_files(base: str, *, suffix: str = "") -> dict[int, dict[int, str]]:
    """Shard files of ``base`` ending in ``.npy`` + ``suffix``, as {world_size: {rank: path}}."""
    pattern = glob.escape(base[:-4]) + ".rank?????-of-?????.npy" + suffix
    found: dict[int, dict[int, str]] = {}
    for name in glob.glob(pattern):
        match = _SHARD_RE.match(os.path.basename(name[: len(name) - len(suffix)]))
        if match:
            found.setdefault(int(match["world"]), {})[int(match["rank"])] = name
    return found


def write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    os.replace(tmp, path)


def _unlink(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _set_npy_rows(path: str, rows: int) -> None:
    """Resize the .npy at ``path`` to ``rows`` rows in place: new header, truncated/extended data.

    numpy has no in-place resize; its headers reserve room for the first axis to grow to 21
    digits, so the rewritten header always has the length of the old one and no data moves.
    """
    with open(path, "r+b") as f:
        version = npy_format.read_magic(f)
        read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        offset = f.tell()
        header = io.BytesIO()
        write_header = npy_format.write_array_header_1_0 if version == (1, 0) else npy_format.write_array_header_2_0
        descr = npy_format.dtype_to_descr(dtype)
        write_header(header, {"descr": descr, "fortran_order": False, "shape": (rows, shape[1])})
        if header.tell() != offset:
            raise RuntimeError(f"cannot resize {path} in place: numpy {np.__version__} writes headers of another size")
        f.seek(0)
        f.write(header.getvalue())
        f.truncate(offset + rows * shape[1] * dtype.itemsize)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


@dataclass
class ResumeState:
    """What an interrupted :class:`IndexWriter` had saved: the caller skips these items."""

    rows: int
    items: list[str]
    skipped: list[dict]
    dim: int
    dtype: str
    meta: dict


class IndexWriter:
    """Write an index block by block so that an interrupted run can resume.

    Rows go into ``<path>.partial``, a memory-mapped .npy sized for ``capacity`` rows (grown if
    more arrive), and the progress (rows done, items, skipped) into ``<path>.partial.json``,
    every ``flush_seconds``. Only :meth:`finish` creates ``<path>`` and its sidecar, so a file
    named like a complete index always is one. ``meta`` must hold ``model`` (ref, arch,
    checksum) and ``modality``, and may hold ``root`` and any other field for the sidecar.

    When ``<path>.partial`` exists the writer continues it (see :meth:`resume_state`);
    ``overwrite=True`` discards it instead and lets :meth:`finish` replace a complete index.
    Used as a context manager it finishes on success and flushes the progress on an error.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        *,
        dim: int,
        dtype: str = "float32",
        capacity: int,
        meta: dict,
        overwrite: bool = False,
        flush_seconds: float = 10.0,
    ) -> None:
        self.path = _check_npy_path(path)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.dim, self.dtype, self.meta = int(dim), dtype, _check_meta(meta)
        self.overwrite, self.flush_seconds = overwrite, flush_seconds
        if overwrite:
            _unlink(_partial(self.path), _progress(self.path))
        else:
            _refuse_existing(self.path)
        state = self.resume_state(self.path)
        if state is not None:
            self._check_resumable(state)
        self.rows_done = state.rows if state else 0
        self.items: list[str] = list(state.items) if state else []
        self.skipped: list[dict] = list(state.skipped) if state else []
        self._array = self._open_partial(max(int(capacity), self.rows_done, 1), resume=state is not None)
        self._last_flush = time.monotonic()

    @staticmethod
    def resume_state(path: Union[str, os.PathLike]) -> Optional[ResumeState]:
        """Rows, items and skipped items already saved by an interrupted run into ``path``.

        ``None`` when there is nothing to resume (no partial output, or no progress saved yet).
        """
        path = os.fspath(path)
        if not os.path.exists(_partial(path)):
            return None
        try:
            with open(_progress(path), encoding="utf-8") as f:
                p = json.load(f)
            return ResumeState(p["rows"], p["items"], p["skipped"], p["dim"], p["dtype"], p["meta"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # progress is written atomically; without it, nothing is safely done

    def add(self, rows: np.ndarray, items: list[str]) -> None:
        """Append ``rows`` (n×dim, L2-normalised) for ``items`` (n relative paths or texts)."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.dim or len(items) != len(rows):
            raise ValueError(f"expected {len(items)}×{self.dim} rows, got shape {rows.shape}")
        norms = np.linalg.norm(rows.astype(np.float32, copy=False), axis=1)
        if not np.allclose(norms, 1.0, atol=1e-2):
            raise ValueError("index rows must be L2-normalised")
        end = self.rows_done + len(rows)
        if end > len(self._array):
            self._grow(max(end, 2 * len(self._array)))
        self._array[self.rows_done : end] = rows
        self.items.extend(str(item) for item in items)
        self.rows_done = end
        self._flush_if_due()

    def skip(self, item: str, reason: str) -> None:
        """Record that ``item`` has no row (unreadable image, empty text) and why."""
        self.skipped.append({"item": str(item), "reason": str(reason)})
        self._flush_if_due()

    def flush(self) -> None:
        """Save the rows and the progress so that a crash after this loses nothing before it."""
        self._array.flush()  # rows reach the file before the progress that counts them
        progress = {"rows": self.rows_done, "dim": self.dim, "dtype": self.dtype, "meta": self.meta,
                    "items": self.items, "skipped": self.skipped}
        write_json_atomic(_progress(self.path), progress)
        self._last_flush = time.monotonic()

    def finish(self) -> str:
        """Truncate to the rows written, write the final sidecar and move both into place."""
        if self._array is None:
            raise RuntimeError(f"{self.path} is already finished")
        self._array.flush()
        self._array = None  # unmap before truncating: touching a truncated map is a SIGBUS
        partial = _partial(self.path)
        _set_npy_rows(partial, self.rows_done)
        # An old sidecar must never describe the new array, even for an instant.
        _unlink(sidecar_path(self.path))
        if self.overwrite:
            _remove_other_layouts(self.path)
        os.replace(partial, self.path)
        write_json_atomic(sidecar_path(self.path), self._final_sidecar())
        _unlink(_progress(self.path))
        return self.path

    def __enter__(self) -> "IndexWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._array is None:
            return
        if exc_type is None:
            self.finish()
        else:
            self.flush()

    def _flush_if_due(self) -> None:
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def _check_resumable(self, state: ResumeState) -> None:
        for name, before, now in (("dim", state.dim, self.dim), ("dtype", state.dtype, self.dtype),
                                  ("model", state.meta.get("model"), self.meta["model"]),
                                  ("modality", state.meta.get("modality"), self.meta["modality"])):
            if before != now:
                raise MmcliError(f"{_partial(self.path)} was started with another {name} ({before} vs {now}); "
                                 "pass --overwrite to start again")

    def _open_partial(self, capacity: int, *, resume: bool) -> np.memmap:
        partial = _partial(self.path)
        if not resume:
            return npy_format.open_memmap(partial, mode="w+", dtype=self.dtype, shape=(capacity, self.dim))
        array = npy_format.open_memmap(partial, mode="r+")
        if array.shape[0] < capacity:
            del array
            _set_npy_rows(partial, capacity)
            array = npy_format.open_memmap(partial, mode="r+")
        return array

    def _grow(self, capacity: int) -> None:
        self._array.flush()
        self._array = None
        _set_npy_rows(_partial(self.path), capacity)
        self._array = npy_format.open_memmap(_partial(self.path), mode="r+")

    def _final_sidecar(self) -> dict:
        extra = {k: v for k, v in self.meta.items() if k not in _WRITER_KEYS}
        shard = _SHARD_RE.match(os.path.basename(self.path))
        if shard:
            extra["shard"] = {"rank": int(shard["rank"]), "world_size": int(shard["world"])}
        created = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "mmcli": __version__, "host": socket.gethostname()}
        return {"format": FORMAT, "version": VERSION, "model": self.meta["model"],
                "modality": self.meta["modality"], "dim": self.dim, "dtype": self.dtype,
                "count": self.rows_done, "created": created, "root": self.meta.get("root"), **extra,
                "items": self.items, "skipped": self.skipped, "complete": True}


def _check_meta(meta: dict) -> dict:
    if not isinstance(meta.get("model"), dict):
        raise ValueError("meta['model'] must be a dict (ref, arch, checksum)")
    if meta.get("modality") not in MODALITIES:
        raise ValueError(f"meta['modality'] must be one of {MODALITIES}")
    return json.loads(json.dumps(meta))  # a JSON-safe copy, compared as such on resume


def _refuse_existing(path: str) -> None:
    """Without --overwrite, write neither over a complete index nor beside one of another layout."""
    base = _base_of(path)
    if _complete(path):
        raise MmcliError(f"{path} already exists; pass --overwrite to replace it")
    if base != path and _complete(base):
        raise MmcliError(f"{base} already exists; pass --overwrite to replace it with shards")
    own_world = _shard_world(path)
    for world, ranks in _shard_files(base).items():
        done = [p for p in ranks.values() if world != own_world and _complete(p)]
        if done:
            raise MmcliError(f"shards of {base} already exist ({done[0]}); pass --overwrite to replace them")


def _shard_world(path: str) -> Optional[int]:
    match = _SHARD_RE.match(os.path.basename(path))
    return int(match["world"]) if match else None


def _remove_other_layouts(path: str) -> None:
    """Remove outputs for the same base in the other layout, so a reader never sees both."""
    base, own_world = _base_of(path), _shard_world(path)
    if base != path:
        _unlink(base, sidecar_path(base))
    for world, ranks in _shard_files(base).items():
        if world != own_world:
            for shard in ranks.values():
                _unlink(shard, sidecar_path(shard))


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


Embeddings = Union[np.ndarray, RowConcat]


@dataclass(frozen=True)
class Index:
    """A complete index opened read-only.

    ``embeddings`` is the N×D read-only memmap (a :class:`RowConcat` of memmaps for shards),
    ``meta`` the sidecar (for shards: the first one's, with count, items and skipped of all),
    ``items`` row → relative path or text.
    """

    path: str
    embeddings: Embeddings
    meta: dict = field(repr=False)
    files: tuple[str, ...] = ()

    @property
    def items(self) -> list[str]:
        """Row → item (relative path or text)."""
        return self.meta["items"]

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return self.embeddings.shape[1]

    def __len__(self) -> int:
        return self.embeddings.shape[0]


def open_index(path: Union[str, os.PathLike]) -> Index:
    """Open the index at ``path`` (``emb.npy``; shards are found from that base name)."""
    path = _check_npy_path(path)
    files = _index_files(path)
    opened = [_open_one(f) for f in files]
    if len(opened) == 1:
        array, meta = opened[0]
        return Index(path, array, meta, tuple(files))
    arrays, metas = zip(*opened)
    return Index(path, RowConcat(list(arrays)), _merge_shard_meta(files, list(metas)), tuple(files))


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
    (world, ranks), = shards.items()
    for rank in range(world):
        if rank not in ranks:
            raise _missing(shard_path(path, rank, world))
    return [ranks[r] for r in range(world)]


def _missing(path: str) -> MmcliError:
    if os.path.exists(_partial(path)) or _shard_files(path, suffix=".partial"):
        return MmcliError(f"index {path} is incomplete (a .partial file exists): "
                          "re-run embed with the same --out to resume")
    return MmcliError(f"index file not found: {path}")


def _open_one(path: str) -> tuple[np.ndarray, dict]:
    meta = read_sidecar(path)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise MmcliError(f"cannot read index {path}: {exc}") from exc
    found = {"count": array.shape[0] if array.ndim == 2 else None,
             "dim": array.shape[1] if array.ndim == 2 else None, "dtype": str(array.dtype)}
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
    merged["items"] = [item for m in metas for item in m["items"]]
    merged["skipped"] = [s for m in metas for s in m.get("skipped", [])]
    merged["shards"] = [os.path.basename(f) for f in files]
    return merged


# --------------------------------------------------------------------------------------------
# exact search
# --------------------------------------------------------------------------------------------


def iter_row_blocks(embeddings: Embeddings, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, block) pairs covering ``embeddings`` in blocks of at most ``rows`` rows."""
    parts = embeddings.parts if isinstance(embeddings, RowConcat) else [embeddings]
    offset = 0
    for part in parts:
        for start in range(0, len(part), rows):
            yield offset + start, part[start : start + rows]
        offset += len(part)


def search_exact(
    source: Union[Index, Embeddings], queries: np.ndarray, k: int, *, chunk_rows: int = 262_144
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-``k`` of ``queries`` (Q×D, L2-normalised) among the rows of ``source``.

    Scans the rows in chunks (fewer rows per chunk for large Q, so the Q×chunk score matrix
    stays under 256 MiB) and merges each chunk's top-k into a running top-k: memory never
    grows with N. float16 rows are scored in float32. Returns ``(scores, ids)``, Q×min(k, N)
    float32 and int64, best first; equal scores are ordered by lower id.
    """
    embeddings = source.embeddings if isinstance(source, Index) else source
    q = query_matrix(queries, embeddings.shape[1])
    k = min(int(k), len(embeddings))
    best_scores = np.empty((len(q), 0), np.float32)
    best_ids = np.empty((len(q), 0), np.int64)
    if k <= 0:
        return best_scores, best_ids
    rows = min(chunk_rows, max(1024, _SCORE_BUDGET // len(q)))
    for start, block in iter_row_blocks(embeddings, rows):
        scores = q @ np.asarray(block, dtype=np.float32).T
        ids = _top_k_columns(scores, k)
        chunk_scores = np.take_along_axis(scores, ids, axis=1)
        best_scores, best_ids = _merge_top_k(best_scores, best_ids, chunk_scores, ids + start, k)
    return best_scores, best_ids


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
