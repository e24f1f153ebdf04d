"""IVF inverted lists built in groups of rows and merged into one memory-mapped file on disk.

For an index whose codes do not fit the memory budget (:func:`mmcli.retrieval.index_plan.plan_index`
sets ``on_disk``). Each group of rows is added to a copy of the trained, empty index and written to
a shard file, so memory holds one group's codes at a time; the shards are then merged, list by
list, into FAISS's ``OnDiskInvertedLists`` file (``<index>.faiss.ivfdata``), which searches
memory-map. Labels are given explicitly (a row's position in the order rows were added), so the
merged index numbers rows exactly as one built in memory would.

FAISS prints progress of the on-disk lists with ``printf``; :func:`quiet_stdout` keeps it out of
the process's standard output (which ``--json`` output owns).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Send what C code writes to file descriptor 1 to /dev/null meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def write_shards(
    fresh: Callable[[], Any],
    add: Callable[[Any, np.ndarray, np.ndarray], None],
    blocks: Iterable[np.ndarray],
    shard_rows: int,
    folder: str,
    *,
    first_label: int = 0,
) -> list[str]:
    """Add float32 ``blocks`` to copies of a trained, empty index made by ``fresh`` (``add(shard,
    rows, labels)``), labelled ``first_label`` onwards, writing a shard file to ``folder`` each time
    one holds ``shard_rows`` rows (and one for the rest). Returns the files in order."""
    files: list[str] = []
    shard, label = None, first_label
    for block in blocks:
        while len(block):
            shard = fresh() if shard is None else shard
            part, block = block[: shard_rows - shard.ntotal], block[shard_rows - shard.ntotal :]
            add(shard, part, np.arange(label, label + len(part), dtype=np.int64))
            label += len(part)
            if shard.ntotal >= shard_rows:
                files.append(_write(shard, folder, first_label, len(files)))
                shard = None
    if shard is not None and shard.ntotal:
        files.append(_write(shard, folder, first_label, len(files)))
    return files


def _write(shard, folder: str, first_label: int, number: int) -> str:
    import faiss

    path = os.path.join(folder, f"shard-{first_label}-{number:05d}.faiss")
    faiss.write_index(shard, path)
    return path


class ShardLists:
    """The inverted lists of shard files, memory-mapped (read, not loaded) while this is open."""

    def __init__(self, faiss, paths: list[str]):
        self._indexes = [faiss.read_index(p, faiss.IO_FLAG_MMAP) for p in paths]
        self._lists = [faiss.extract_index_ivf(ix).invlists for ix in self._indexes]
        self.vector = faiss.InvertedListsPtrVector()
        for lists in self._lists:
            self.vector.push_back(lists)
        self.ntotal = sum(int(ix.ntotal) for ix in self._indexes)

    def close(self) -> None:
        self.vector = None
        self._lists.clear()
        self._indexes.clear()  # each index frees (unmaps) its own lists


class StackedView:
    """A searchable copy of ``trained`` whose lists are the shards' lists side by side (FAISS's
    ``HStackInvertedLists``): the shards searched as one index, nothing copied. Used to tune the
    search before the held-out rows' shard joins the merge."""

    def __init__(self, faiss, trained, shards: ShardLists):
        self.shards = shards
        self.index = faiss.clone_index(trained)
        ivf = faiss.extract_index_ivf(self.index)
        self._stack = faiss.HStackInvertedLists(shards.vector.size(), shards.vector.data())
        ivf.replace_invlists(self._stack, False)
        _set_ntotal(faiss, self.index, shards.ntotal)

    def close(self) -> None:
        self.index = None  # before the lists it points at
        self._stack = None


def merge_on_disk(faiss, trained, shards: ShardLists, ivfdata: str) -> Any:
    """A copy of ``trained`` holding every shard's entries in an on-disk lists file ``ivfdata``."""
    merged = faiss.clone_index(trained)
    ivf = faiss.extract_index_ivf(merged)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, ivfdata)
    with quiet_stdout():
        total = lists.merge_from_multiple(shards.vector.data(), shards.vector.size(), False)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns it now
    _set_ntotal(faiss, merged, total)
    return merged


def read_on_disk(faiss, path: str) -> Any:
    """Read an index whose lists file lies beside it (``<path>.ivfdata``), without writing to it."""
    with quiet_stdout():
        return faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)


def _set_ntotal(faiss, index, total: int) -> None:
    faiss.extract_index_ivf(index).ntotal = total
    index.ntotal = total  # an OPQ wrapper counts its rows too
