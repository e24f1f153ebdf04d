"""Files that must never be seen half-written, the names of a run folder's files, and the file
formats every stage shares (no torch, no numpy: the CLI imports it).

A run folder holds::

    spec.yaml                    the resolved spec
    open_clip_config.json        {"model_cfg", "preprocess_cfg"}: rebuilds the dual encoder
    open_clip_model.safetensors  the dual encoder's weights (plain open_clip state dict)
    mmcli_model.safetensors      weights of any module beyond the dual encoder (fusion, heads)
    mmcli.json                   what mmcli needs beyond open_clip (extra modules, step, checksum)
    train_state.pt               optimizer, scheduler, step, data position, RNG states
    metrics.jsonl                training and validation metrics, one JSON object a line
    curves.png                   the picture of metrics.jsonl (losses, learning rate, validation)

Because of the first three files the folder loads in plain open_clip:
``open_clip.create_model("local-dir:runs/NAME")``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmcli.errors import MmcliError

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
EXTRA_WEIGHTS = "mmcli_model.safetensors"
MMCLI_META = "mmcli.json"
TRAIN_STATE = "train_state.pt"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
SPEC = "spec.yaml"

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
"""Suffixes of the image files mmcli reads (compared in lower case)."""

TEXT_SUFFIXES = (".txt",)
"""Suffixes of a text file of one query or caption per line."""

WEBDATASET_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
"""The image members of a webdataset sample, tried in this order (img2dataset's layout)."""

WEBDATASET_TEXT_KEY = "txt"
"""The caption member of a webdataset sample."""

SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".tar": "webdataset"}
"""The source format a data file's suffix implies (``format: auto``)."""

DEFAULT_IMAGE_KEY = "filepath"
"""Image column of a CSV/TSV/JSONL source (open_clip's default)."""

DEFAULT_TEXT_KEY = "title"
"""Caption column of a CSV/TSV/JSONL source (open_clip's default)."""


def _umask() -> int:
    # os.umask can only be read by setting it; set it back at once.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A reader sees the old file or the new one, never part of one; when ``write`` (or the rename)
    fails the temporary file is removed and ``path`` is untouched. The new file gets the
    permissions of a normally created one (0666 less the umask), not ``mkstemp``'s 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
        fd = -1
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` leaves when its process is killed
    (``.NAME.*.tmp``) in ``folder``; return them."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2) -> None:
    """Write ``data`` as JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False))


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line (flushed, so an interrupted run keeps every line written)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def file_checksum(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


_CHECKSUMS: dict[str, tuple[tuple[int, int, int], str]] = {}
_CACHE_ENTRIES = 2000


def checksum_cache_dir() -> Path:
    """Where verified weight checksums are remembered between processes: ``$MMCLI_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/mmcli``, else ``~/.cache/mmcli``."""
    if os.environ.get("MMCLI_CACHE_DIR"):
        return Path(os.environ["MMCLI_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmcli"


def cached_checksum(path: str | os.PathLike) -> str:
    """:func:`file_checksum` of ``path``, hashed again only when its size, modification time or
    inode changed since it was last hashed (in this process, or in any, through a small JSON
    file in :func:`checksum_cache_dir`). A file rewritten with the same size and the same
    nanosecond modification time would not be hashed again."""
    key = os.path.realpath(path)
    st = os.stat(key)
    stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
    if key in _CHECKSUMS and _CHECKSUMS[key][0] == stamp:
        return _CHECKSUMS[key][1]
    cache_file = checksum_cache_dir() / "checksums.json"
    try:
        saved = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = {}
    entry = saved.get(key) if isinstance(saved, dict) else None
    if isinstance(entry, list) and len(entry) == 4 and tuple(entry[:3]) == stamp:
        digest = entry[3]
    else:
        digest = file_checksum(key)
        saved = dict(list(saved.items())[-(_CACHE_ENTRIES - 1) :]) if isinstance(saved, dict) else {}
        saved[key] = [*stamp, digest]
        try:
            atomic_write_json(cache_file, saved, indent=None)
        except OSError:
            pass  # an unwritable cache costs a hash next time, nothing else
    _CHECKSUMS[key] = (stamp, digest)
    return digest


def is_run_dir(ref: str | os.PathLike) -> bool:
    """True when ``ref`` is a folder written by ``mmcli pretrain``/``fuse``."""
    return (Path(ref) / MMCLI_META).is_file()


def read_meta(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's ``mmcli.json``."""
    path = Path(run_dir) / MMCLI_META
    if not path.is_file():
        raise MmcliError(f"{run_dir}: not an mmcli run folder (no {MMCLI_META})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MmcliError(f"{path}: unreadable ({exc})") from None
    if not isinstance(meta, dict):
        raise MmcliError(f"{path}: not an mmcli run description (a JSON object is expected)")
    return meta


class FileLock:
    """An exclusive, non-blocking ``flock`` on the file ``path`` (created, with its folder, if absent),
    held by one process at a time: the second one gets an :class:`MmcliError` naming ``what`` and
    the holder's pid, which the holder writes into the file.

    The kernel releases a ``flock`` when the last descriptor of its open file is closed, which it does
    when the holder exits however it exits (SIGKILL, OOM kill, power loss of the process): a lock left
    behind by a dead process never blocks anyone; its file stays, naming the dead pid, until the next
    holder takes it. :meth:`release` removes the file while still holding the lock; a process that
    opened it just before then locks a file no longer at ``path``, notices, and retries.
    """

    def __init__(self, path: str | os.PathLike, *, what: str) -> None:
        self.path, self.what = Path(path), what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> FileLock:
        """Take the lock, or raise :class:`MmcliError` at once if another process holds it."""
        import fcntl  # POSIX only; imported here so that ``mmcli --help`` never pays for it

        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already locked by this object")
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise MmcliError(f"{self.path}: cannot create the lock file of {self.what} ({exc.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                os.close(fd)
                raise MmcliError(
                    f"{self.what} is being written by another process (pid {holder}, lock {self.path}); "
                    "wait for it to finish, or stop it"
                ) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # its holder removed the file between our open and our lock: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and let go of the lock (nothing happens when it is not held)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def __del__(self) -> None:
        # Dropped while held: as when the holder dies, the descriptor closes and the file stays.
        if self._fd is not None:
            os.close(self._fd)

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _lock_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def created_stamp() -> dict[str, str]:
    """``{time, mmcli, host}``: when, by which mmcli version and where an output was finished (the
    ``created`` field of index and captions sidecars)."""
    from datetime import datetime, timezone

    from mmcli import __version__

    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mmcli": __version__,
        "host": socket.gethostname(),
    }
