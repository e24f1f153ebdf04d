"""Index file names and layout: format constants, sidecar and shard names, .npy resizing."""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re

import numpy as np
import numpy.lib.format as npy_format

from mmcli.errors import MmcliError
from mmcli.io import FileLock

FORMAT = "mmcli-index"
VERSION = 1
DTYPES = ("float32", "float16")
MODALITIES = ("image", "text")

# The files an index is made of besides its ``.npy``: sidecar, partial rows and progress, a
# writer's lock, metadata (Parquet), FAISS file and its description.
_INDEX_SUFFIXES = (
    ".npy.json",
    ".npy.parquet",
    ".npy.partial",
    ".npy.partial.json",
    ".npy.partial.sidecar",
    ".npy.lock",
    ".npy.faiss",
    ".npy.faiss.json",
)

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
    return shard_name(_check_npy_path(base), rank, world_size, suffix=".npy")


def shard_name(base: str, rank: int, world_size: int, *, suffix: str) -> str:
    """The file rank ``rank`` of ``world_size`` writes for the output ``base`` (ending in ``suffix``):
    the rank tag goes before the suffix, as for an index's shards.

    ``shard_name("out/captions.jsonl", 1, 4, suffix=".jsonl")`` is ``out/captions.rank00001-of-00004.jsonl``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if not base.endswith(suffix):
        raise ValueError(f"{base} does not end with {suffix}")
    return f"{base[: len(base) - len(suffix)]}.rank{rank:05d}-of-{world_size:05d}{suffix}"


def lock_path(path: str) -> str:
    """The lock file beside the index file ``path`` while a writer holds it (``emb.npy.lock``)."""
    return path + ".lock"


def writer_lock(path: str | os.PathLike) -> FileLock:
    """The (not yet taken) lock that makes one :class:`~mmcli.retrieval.index.IndexWriter` at a time
    write ``path``; see :class:`mmcli.io.FileLock`."""
    path = _check_npy_path(path)
    return FileLock(lock_path(path), what=path)


def is_index_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a file of an index, complete or not: the rows (an ``.npy`` with a
    sidecar or a partial file beside it), a sidecar, a partial file or its progress, a writer's lock,
    or a FAISS file built from it. Only the name and its neighbours are looked at."""
    path = os.fspath(path)
    if path.endswith(".npy"):
        return os.path.exists(sidecar_path(path)) or os.path.exists(_partial(path))
    return path.endswith(_INDEX_SUFFIXES)


def index_exists(path: str | os.PathLike) -> bool:
    """Whether a complete index exists at ``path``: the file and its sidecar, or a full shard set."""
    path = os.fspath(path)
    if _complete(path):
        return True
    if _base_of(path) != path or not path.endswith(".npy"):
        return False
    return any(
        len(ranks) == world and all(_complete(p) for p in ranks.values()) for world, ranks in _shard_files(path).items()
    )


def _complete(path: str) -> bool:
    return os.path.exists(path) and os.path.exists(sidecar_path(path))


def _partial(path: str) -> str:
    return path + ".partial"


def _progress(path: str) -> str:
    return path + ".partial.json"


def _check_npy_path(path: str | os.PathLike) -> str:
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
