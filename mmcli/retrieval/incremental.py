"""``mmcli embed --update``: bring a complete index up to date with its input, embedding only what changed.

An image file counts as unchanged when its size and modification time (nanoseconds) equal those
recorded in the index's metadata (rsync's quick check: no file is read to decide, so a file
rewritten with the same size within the same nanosecond tick would be missed; ``--overwrite``
re-embeds everything). A text is unchanged when the same text is a row. Unchanged rows are copied
from the old index bit for bit; new and changed items are embedded; rows of items no longer in the
input are dropped. Rows come out in input order, as a full re-embed would write them, so row
numbers of an updated index are those of a fresh one.

The new index is written as ``<out>.partial`` beside the old one, which stays whole and readable
until :meth:`~mmcli.retrieval.index.IndexWriter.finish` swaps the files; an interrupted update
resumes like an interrupted embed.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from mmcli.errors import MmcliError
from mmcli.retrieval import index as ix
from mmcli.retrieval.embedding import Batch, Item
from mmcli.retrieval.index.metadata import STAT_COLUMNS, Columns, MetadataSource, Signature

_COMPARED = ("modality", "dtype", "root", "decode")


class IncompatibleIndex(MmcliError):
    """The index to update was made with another model, dtype, modality, root or decoding: its rows
    cannot be kept. Still a one-line user error; a caller that owns the index (``retrieve --in``'s
    cache) catches it and re-embeds everything instead."""


@dataclass(frozen=True)
class UpdatePlan:
    """What an update does: ``kept`` maps the key of each unchanged item to its row in ``old``."""

    old: ix.Index
    kept: dict[str, int]
    new: int
    changed: int
    deleted: int

    def summary(self) -> dict[str, int]:
        """Counts for the command's result."""
        return {"unchanged": len(self.kept), "new": self.new, "changed": self.changed, "deleted": self.deleted}


def item_stats(items: Sequence[Item], modality: str) -> dict[str, Signature]:
    """The file signature (size, mtime_ns) of each image item, taken now, before any is decoded:
    a file changed after this is seen as changed by the next update. Texts have none."""
    if modality != "image":
        return {}
    return {item.key: ix.file_stat(item.source) for item in items}


def check_compatible(old: ix.Index, meta: dict, dtype: str, model_checksum: str | None) -> None:
    """Refuse to update ``old`` with rows of another kind (model, dtype, modality, root, decoding):
    mixing them would make scores incomparable. The message names the first field that differs."""
    now = {**{k: meta.get(k) for k in _COMPARED}, "dtype": dtype}
    checks = [("model", old.meta["model"].get("checksum"), model_checksum)]
    checks += [(k, old.meta.get(k), now[k]) for k in _COMPARED if k != "decode" or "decode" in old.meta]
    for name, before, after in checks:
        if before != after:
            raise IncompatibleIndex(
                f"--update: {old.path} was embedded with another {name} ({before} there, {after} now); "
                "rerun with --overwrite to re-embed everything"
            )


def plan_update(old: ix.Index, items: Sequence[Item], stats: dict[str, Signature], modality: str) -> UpdatePlan:
    """Which items of the input are unchanged rows of ``old`` (see the module's docstring)."""
    rows = {item: row for row, item in enumerate(old.items)}
    metadata = old.metadata
    if modality == "image":
        recorded = list(zip(*(metadata.column(c) for c in STAT_COLUMNS))) if metadata else [(None, None)] * len(old)
    kept: dict[str, int] = {}
    changed = new = 0
    for item in items:
        row = rows.get(item.key)
        if row is None:
            new += 1
        elif modality != "image" or (recorded[row] == stats.get(item.key) and None not in recorded[row]):
            kept[item.key] = row
        else:
            changed += 1
    listed = {item.key for item in items}
    deleted = sum(1 for item in old.items if item not in listed)
    return UpdatePlan(old, kept, new=new, changed=changed, deleted=deleted)


def merge_rows(
    todo: Sequence[str], kept: dict[str, int], old: ix.Embeddings, embedded: Iterator[Batch], *, block: int = 4096
) -> Iterator[Batch]:
    """Batches ``(keys, rows, bad)`` covering ``todo`` in its order: rows of ``kept`` keys copied
    from ``old``, the others taken from ``embedded`` (batches of the non-kept keys, in the same order).

    ``embedded`` must cover the non-kept keys of ``todo`` exactly once each (as a row or as bad),
    in order; each batch it yields is merged with the kept rows that come before and among its keys.
    """
    pos = 0

    def kept_runs() -> Iterator[Batch]:
        # The kept keys from ``pos`` up to the next key that is not kept, in blocks of ``block`` rows.
        nonlocal pos
        while pos < len(todo) and todo[pos] in kept:
            start = pos
            while pos < len(todo) and todo[pos] in kept and pos - start < block:
                pos += 1
            keys = list(todo[start:pos])
            yield keys, ix.take_rows(old, [kept[k] for k in keys]), []

    for keys, rows, bad in embedded:
        yield from kept_runs()
        # Per key, in order: a text file may hold the same new text twice, embedded twice.
        fresh: dict[str, deque] = defaultdict(deque)
        for n, k in enumerate(keys):
            fresh[k].append(rows[n])
        failed: dict[str, deque] = defaultdict(deque)
        for k, reason in bad:
            failed[k].append(reason)
        waiting = len(keys) + len(bad)
        out_keys, out_rows, out_bad = [], [], []
        while waiting:
            if pos >= len(todo):
                raise RuntimeError(f"embedded items {sorted(fresh)[:3]} are not in the update's list")
            key = todo[pos]
            if key in kept:  # kept rows among this batch's keys: what came before goes first, then the run
                yield out_keys, _stacked(out_rows), out_bad
                out_keys, out_rows, out_bad = [], [], []
                yield from kept_runs()
                continue
            if fresh.get(key):
                out_keys.append(key)
                out_rows.append(fresh[key].popleft())
            elif failed.get(key):
                out_bad.append((key, failed[key].popleft()))
            else:
                raise RuntimeError(f"{key} was not embedded before the items after it")
            waiting -= 1
            pos += 1
        yield out_keys, _stacked(out_rows), out_bad
    yield from kept_runs()
    if pos != len(todo):
        raise RuntimeError(f"{todo[pos]} was neither kept nor embedded")


def _stacked(rows: list[np.ndarray]) -> np.ndarray:
    return np.stack(rows) if rows else np.zeros((0, 0), np.float32)


def metadata_source(items: Sequence[Item]) -> MetadataSource:
    """The metadata columns of the rows written (:mod:`mmcli.retrieval.index.metadata`), from the
    items as listed: caption and kept columns (the file signatures are the writer's, recorded as
    each row is written)."""
    by_key = {item.key: item for item in items}  # webdataset members are not listed: no caption
    kept_names = next((list(item.columns) for item in items if item.columns), [])

    def columns(keys: list[str]) -> Columns:
        rows = [by_key.get(k) for k in keys]
        out: Columns = {"caption": [item.caption if item else None for item in rows]}
        for name in kept_names:
            out[name] = [(item.columns or {}).get(name) if item else None for item in rows]
        return out

    return columns
