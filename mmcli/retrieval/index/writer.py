"""Writing an index: :class:`IndexWriter` streams rows into a resumable ``.partial`` file."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.lib.format as npy_format

from mmcli.errors import MmcliError
from mmcli.io import FileLock, atomic_write_json, created_stamp
from mmcli.retrieval.index.files import (
    _SHARD_RE,
    DTYPES,
    FORMAT,
    MODALITIES,
    VERSION,
    _base_of,
    _check_npy_path,
    _complete,
    _partial,
    _progress,
    _set_npy_rows,
    _shard_files,
    _unlink,
    sidecar_path,
    writer_lock,
)
from mmcli.retrieval.index.metadata import STAT_COLUMNS, MetadataSource, Signature, metadata_path, write_metadata

# Sidecar fields the writer sets itself; the same keys in ``meta`` are ignored.
_WRITER_KEYS = {
    "format",
    "version",
    "model",
    "modality",
    "dim",
    "dtype",
    "count",
    "created",
    "root",
    "items",
    "skipped",
    "complete",
    "shard",
    "metadata",
}


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
    job: dict | None = None
    """What the interrupted run was embedding (see :class:`IndexWriter`); ``None`` for progress
    files of mmcli versions that did not record it."""
    signatures: list | None = None
    """Each written row's file signature as the interrupted run recorded it (see ``signature``)."""


class IndexWriter:
    """Write an index block by block so that an interrupted run can resume.

    Rows go into ``<path>.partial``, a memory-mapped .npy sized for ``capacity`` rows (grown if
    more arrive), and the progress (rows done, items, skipped) into ``<path>.partial.json``,
    every ``flush_seconds``. Only :meth:`finish` creates ``<path>`` and its sidecar, so a file
    named like a complete index always is one. ``meta`` must hold ``model`` (ref, arch,
    checksum) and ``modality``, and may hold ``root`` and any other field for the sidecar.

    One writer at a time: the writer holds ``<path>.lock`` (:func:`writer_lock`, an exclusive
    ``flock``) from construction to :meth:`finish` or the end of its ``with`` block; a second one
    is refused at once with the holder's pid. A caller that must look at the partial output before
    constructing the writer takes the lock first and passes it as ``lock`` (it then releases it).

    When ``<path>.partial`` exists the writer continues it (see :meth:`resume_state`), but only
    for the same ``job``: a JSON-safe dict of whatever decides the rows (input, keys, dtype,
    decoding, model checksum) saved in the progress file; a different one is refused, naming the
    first field that differs. ``overwrite=True`` discards the partial output instead and lets
    :meth:`finish` replace a complete index; ``replace=True`` lets :meth:`finish` replace a complete
    index but resumes a partial one (``embed --update``: the old index stays whole and readable
    until the new one takes its place). Used as a context manager it finishes on success and
    flushes the progress on an error.

    ``metadata``, when given, is called by :meth:`finish` with the items written and returns their
    metadata columns, written to ``<path>.parquet`` (:mod:`~mmcli.retrieval.index.metadata`).
    ``signature`` gives an item's file signature (size, mtime_ns) as listed by this run; it is
    recorded as each row is written (kept in the progress file, so a resumed run keeps the
    signatures of the rows the interrupted run wrote) and becomes the metadata's ``size`` and
    ``mtime_ns`` columns.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        dim: int,
        dtype: str = "float32",
        capacity: int,
        meta: dict,
        overwrite: bool = False,
        flush_seconds: float = 10.0,
        job: dict | None = None,
        lock: FileLock | None = None,
        replace: bool = False,
        metadata: MetadataSource | None = None,
        signature: Callable[[str], Signature] | None = None,
    ) -> None:
        self.path = _check_npy_path(path)
        self.replace, self.metadata, self.signature = replace or overwrite, metadata, signature
        self._columns: list[str] | None = None
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.dim, self.dtype, self.meta = int(dim), dtype, _check_meta(meta)
        self.job = _json_copy(job) if job is not None else None
        self.overwrite, self.flush_seconds = overwrite, flush_seconds
        self._array = None
        if lock is None:
            self._lock = writer_lock(self.path).acquire()
        elif lock.held and str(lock.path) == str(writer_lock(self.path).path):
            self._lock = None  # the caller's lock: the caller releases it
        else:
            raise ValueError(f"lock must be the held writer_lock of {self.path}")
        try:
            self._open(capacity)
        except BaseException:
            self._release()
            raise

    def _open(self, capacity: int) -> None:
        if self.overwrite:
            _unlink(_partial(self.path), _progress(self.path))
        elif not self.replace:
            _refuse_existing(self.path)
        state = self.resume_state(self.path)
        if state is not None:
            self._check_resumable(state)
        self.rows_done = state.rows if state else 0
        self.items: list[str] = list(state.items) if state else []
        self.skipped: list[dict] = list(state.skipped) if state else []
        # Signatures recorded when each row was written: a resumed run keeps the interrupted run's.
        recorded = state.signatures if state and state.signatures is not None else None
        self.signatures: list = list(recorded) if recorded is not None else self._signatures_now(self.items)
        self._array = self._open_partial(max(int(capacity), self.rows_done, 1), resume=state is not None)
        self._last_flush = time.monotonic()

    @staticmethod
    def resume_state(path: str | os.PathLike) -> ResumeState | None:
        """Rows, items and skipped items already saved by an interrupted run into ``path``.

        ``None`` when there is nothing to resume (no partial output, or no progress saved yet).
        """
        path = os.fspath(path)
        if not os.path.exists(_partial(path)):
            return None
        try:
            with open(_progress(path), encoding="utf-8") as f:
                p = json.load(f)
            return ResumeState(
                p["rows"], p["items"], p["skipped"], p["dim"], p["dtype"], p["meta"], p.get("job"), p.get("signatures")
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None  # progress is written atomically; without it, nothing is safely done

    def add(self, rows: np.ndarray, items: list[str]) -> None:
        """Append ``rows`` (n×dim, L2-normalised) for ``items`` (n relative paths or texts)."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.dim or len(items) != len(rows):
            raise ValueError(f"expected {len(items)}×{self.dim} rows, got shape {rows.shape}")
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            bad = [str(items[i]) for i in np.flatnonzero(~finite)]
            more = f" and {len(bad) - 1} more of this batch" if len(bad) > 1 else ""
            raise MmcliError(
                f"{self.path}: the embedding of {bad[0]!r}{more} holds NaN or infinity; nothing of this batch "
                f"was written (the model {self.meta['model'].get('ref')} gives non-finite outputs)"
            )
        norms = np.linalg.norm(rows.astype(np.float32, copy=False), axis=1)
        if not np.allclose(norms, 1.0, atol=1e-2):
            raise ValueError("index rows must be L2-normalised")
        end = self.rows_done + len(rows)
        if end > len(self._array):
            self._grow(max(end, 2 * len(self._array)))
        self._array[self.rows_done : end] = rows
        self.items.extend(str(item) for item in items)
        self.signatures.extend(self._signatures_now(items))
        self.rows_done = end
        self._flush_if_due()

    def skip(self, item: str, reason: str) -> None:
        """Record that ``item`` has no row (unreadable image, empty text) and why."""
        self.skipped.append({"item": str(item), "reason": str(reason)})
        self._flush_if_due()

    def flush(self) -> None:
        """Save the rows and the progress so that a crash after this loses nothing before it."""
        self._array.flush()  # rows reach the file before the progress that counts them
        progress = {
            "rows": self.rows_done,
            "dim": self.dim,
            "dtype": self.dtype,
            "meta": self.meta,
            "job": self.job,
            "items": self.items,
            "skipped": self.skipped,
            "signatures": self.signatures,
        }
        atomic_write_json(_progress(self.path), progress, indent=None)
        self._last_flush = time.monotonic()

    def finish(self) -> str:
        """Truncate to the rows written, write the metadata and the final sidecar, move all into place.

        Everything that takes time or can fail is written beside the partial rows first (the
        metadata, the new sidecar as a temporary file); then the swap — old sidecar out, rows,
        metadata and sidecar in, progress out — is a handful of renames, run with SIGINT and SIGTERM
        deferred, so a Ctrl-C cannot leave a replaced index half old, half new.
        """
        if self._array is None:
            raise RuntimeError(f"{self.path} is already finished")
        self._array.flush()
        self._array = None  # unmap before truncating: touching a truncated map is a SIGBUS
        try:
            partial = _partial(self.path)
            _set_npy_rows(partial, self.rows_done)
            if self.metadata is not None:
                columns = self.metadata(self.items)
                if self.signature is not None:
                    for n, name in enumerate(STAT_COLUMNS):
                        columns[name] = [sig[n] for sig in self.signatures]
                write_metadata(partial, self.items, columns)
                self._columns = ["item", *columns]
            sidecar = partial + ".sidecar"
            atomic_write_json(sidecar, self._final_sidecar(), indent=None)
            with _signals_deferred():
                # An old sidecar must never describe the new array, even for an instant.
                _unlink(sidecar_path(self.path))
                if self.replace:
                    _remove_other_layouts(self.path)
                os.replace(partial, self.path)
                if self.metadata is not None:
                    os.replace(metadata_path(partial), metadata_path(self.path))
                else:
                    _unlink(metadata_path(self.path))
                _unlink(_progress(self.path))
                os.replace(sidecar, sidecar_path(self.path))
        finally:
            self._release()
        return self.path

    def _signatures_now(self, items) -> list:
        if self.signature is None:
            return [None] * len(items)
        return [list(self.signature(str(item))) for item in items]

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._array is None:
            self._release()
            return
        if exc_type is None:
            self.finish()
            return
        try:
            self.flush()
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def _flush_if_due(self) -> None:
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def _check_resumable(self, state: ResumeState) -> None:
        checks = [("dim", state.dim, self.dim), ("dtype", state.dtype, self.dtype)]
        if state.job is not None:
            before, now = state.job, self.job or {}
            checks += [(key, before.get(key), now.get(key)) for key in sorted(set(before) | set(now))]
        else:  # progress of an mmcli that recorded no job: compare what it did record
            checks += [(key, state.meta.get(key), self.meta.get(key)) for key in ("model", "modality", "root")]
        for name, before, now in checks:
            if before != now:
                raise MmcliError(
                    f"{_partial(self.path)} holds {state.rows} rows of another job ({name}: {before} there, "
                    f"{now} now); rerun with --overwrite to discard them and start over, or choose another --out"
                )

    def _open_partial(self, capacity: int, *, resume: bool) -> np.memmap:
        partial = _partial(self.path)
        if not resume:
            _unlink(_progress(self.path))  # a progress file without its rows must never describe new ones
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
        if self._columns is not None:
            extra["metadata"] = {"file": os.path.basename(metadata_path(self.path)), "columns": self._columns}
        created = created_stamp()
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.meta["model"],
            "modality": self.meta["modality"],
            "dim": self.dim,
            "dtype": self.dtype,
            "count": self.rows_done,
            "created": created,
            "root": self.meta.get("root"),
            **extra,
            "items": self.items,
            "skipped": self.skipped,
            "complete": True,
        }


def _check_meta(meta: dict) -> dict:
    if not isinstance(meta.get("model"), dict):
        raise ValueError("meta['model'] must be a dict (ref, arch, checksum)")
    if meta.get("modality") not in MODALITIES:
        raise ValueError(f"meta['modality'] must be one of {MODALITIES}")
    return _json_copy(meta)


def _json_copy(value: dict) -> dict:
    return json.loads(json.dumps(value))  # a JSON-safe copy, compared as such on resume


def _refuse_existing(path: str) -> None:
    """Without --overwrite, write neither over a complete index nor beside one of another layout."""
    base = _base_of(path)
    if _complete(path):
        raise MmcliError(f"{path} already exists; pass --update to embed only new and changed items, or --overwrite")
    if base != path and _complete(base):
        raise MmcliError(f"{base} already exists; pass --overwrite to replace it with shards")
    own_world = _shard_world(path)
    for world, ranks in _shard_files(base).items():
        done = [p for p in ranks.values() if world != own_world and _complete(p)]
        if done:
            raise MmcliError(f"shards of {base} already exist ({done[0]}); pass --overwrite to replace them")


def _shard_world(path: str) -> int | None:
    match = _SHARD_RE.match(os.path.basename(path))
    return int(match["world"]) if match else None


def _remove_other_layouts(path: str) -> None:
    """Remove outputs for the same base in the other layout, so a reader never sees both."""
    base, own_world = _base_of(path), _shard_world(path)
    if base != path:
        _unlink(base, sidecar_path(base), metadata_path(base))
    for world, ranks in _shard_files(base).items():
        if world != own_world:
            for shard in ranks.values():
                _unlink(shard, sidecar_path(shard), metadata_path(shard))


@contextlib.contextmanager
def _signals_deferred():
    """Defer SIGINT and SIGTERM to the end of the block (delivered then, to the handlers in place
    before it), around a few renames that must not be split.

    Python runs signal handlers in the main thread whichever thread the signal reached, so replacing
    the handlers defers them for the whole process (a per-thread signal mask would not: the signal
    would reach a DataLoader or BLAS thread). Elsewhere than in the main thread handlers cannot be
    set, and the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    deferred = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in deferred}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in received:
            signal.raise_signal(sig)
