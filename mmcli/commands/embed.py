"""``mmcli embed PATH --out emb.npy``: embed images or texts into a self-describing index."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmcli.errors import MmcliError
from mmcli.io import DEFAULT_IMAGE_KEY, DEFAULT_TEXT_KEY
from mmcli.retrieval import index as ix


def run(
    path: str,
    out: str,
    *,
    model: str | None = None,
    modality: str = "auto",
    dtype: str = "float32",
    batch_size: int = 64,
    workers: int = 2,
    overwrite: bool = False,
    update: bool = False,
    draft: bool = True,
    image_key: str = DEFAULT_IMAGE_KEY,
    text_key: str = DEFAULT_TEXT_KEY,
    keep_columns: tuple[str, ...] = (),
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Embed ``path`` into the index ``out`` (this rank's shard under torchrun); return a summary.

    One process at a time writes ``out`` (it holds ``out.lock``; a second one is refused). Re-running
    the same job into the same ``out`` resumes an interrupted run (the model defaults to the one it
    was started with); another job (input, keys, dtype, decoding, model) is refused.
    ``overwrite`` starts over and replaces a complete index; ``update`` brings a complete index up
    to date, embedding only new and changed items (:mod:`mmcli.retrieval.incremental`).
    The model is ``model``, else the one the resumed or updated index was made with, else the
    default (:func:`mmcli.models.defaults.default_model`): an index is never continued with another.
    """
    from mmcli.distributed import resolve_device
    from mmcli.models.defaults import default_model, use_cached_default
    from mmcli.models.loading import load_model
    from mmcli.retrieval import incremental
    from mmcli.retrieval.embedding import rank_and_world, resolve_inputs

    rank, world = rank_and_world()
    if not str(out).endswith(".npy"):
        raise MmcliError(f"--out {out}: the index file name must end with .npy")
    if update and overwrite:
        raise MmcliError("--update and --overwrite: choose one (update keeps unchanged rows, overwrite re-embeds all)")
    if update and world > 1:
        raise MmcliError("--update: a sharded (torchrun) index cannot be updated in place; update it in one process")
    target = ix.shard_path(str(out), rank, world) if world > 1 else str(out)
    inputs = resolve_inputs(path, modality, image_key=image_key, text_key=text_key, keep_columns=keep_columns)
    if update and inputs.urls is not None:
        raise MmcliError(f"--update: {path} is webdataset shards, which are re-embedded whole; use --overwrite")
    with ix.writer_lock(target) as lock:  # before reading the partial output another run may be writing
        state = None if overwrite else ix.IndexWriter.resume_state(target)
        old = ix.open_index(target) if update and ix.index_exists(target) else None
        ref = model or (state.meta["model"]["ref"] if state else old.meta["model"]["ref"] if old else None)
        ref = ref or default_model()
        use_cached_default(ref)
        dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
        loaded = load_model(ref, device=dev)
        meta, job = _describe(path, inputs, loaded, dtype=dtype, draft=draft, image_key=image_key, text_key=text_key)
        stats = incremental.item_stats(inputs.items or [], inputs.modality)
        plan = None
        if old is not None:
            incremental.check_compatible(old, meta, dtype, loaded.checksum)
            plan = incremental.plan_update(old, inputs.items, stats, inputs.modality)
        start = time.perf_counter()
        batches, capacity, todo = _batches(
            inputs,
            loaded,
            state,
            plan,
            rank=rank,
            world=world,
            batch_size=batch_size,
            workers=workers,
            draft=draft,
            device=dev,
        )
        dim = loaded.model.clip.visual.output_dim
        resumed = state.rows + len(state.skipped) if state else 0
        metadata = incremental.metadata_source(inputs.items or [])
        with ix.IndexWriter(
            target,
            dim=dim,
            dtype=dtype,
            capacity=capacity,
            meta=meta,
            overwrite=overwrite,
            replace=update,
            job=job,
            lock=lock,
            metadata=metadata,
            signature=lambda item: stats.get(item, (None, None)),
        ) as writer:
            _write(writer, batches, total=capacity, done=resumed, show=progress, unit=inputs.modality)
    seconds = time.perf_counter() - start
    return {
        "out": os.path.abspath(target),
        "rank": rank,
        "world_size": world,
        "model": meta["model"],
        "modality": inputs.modality,
        "format": inputs.format,
        "dim": dim,
        "dtype": dtype,
        "count": writer.rows_done,
        "skipped": writer.skipped,
        "resumed_from": resumed,
        "embedded": todo,
        "update": plan.summary() if plan else None,
        "blank_lines_skipped": inputs.blank_lines,
        "notes": [f"{path}: {_lines(inputs.blank_lines)} skipped (no text to embed)"] if inputs.blank_lines else [],
        "seconds": round(seconds, 3),
        "items_per_s": round(todo / seconds, 1) if seconds > 0 and todo else None,
        "device": str(dev),
        "is_main": rank == 0,
    }


def _lines(n: int) -> str:
    return f"{n} blank line{'s' * (n != 1)}"


def _describe(
    path: str, inputs, loaded, *, dtype: str, draft: bool, image_key: str, text_key: str
) -> tuple[dict, dict]:
    """The sidecar fields of this run, and its job: everything that decides the rows, which a
    resumed run must share (see :class:`~mmcli.retrieval.index.IndexWriter`)."""
    from mmcli.retrieval.embedding import KEYED_FORMATS, decode_settings

    decode = decode_settings(loaded.preprocess, draft=draft)
    meta = {
        "model": {"ref": loaded.ref, "arch": loaded.arch, "checksum": loaded.checksum},
        "modality": inputs.modality,
        "root": inputs.root,
        "source": {"path": str(path), "format": inputs.format},
        "decode": decode,
    }
    job = {
        "input": str(Path(path).expanduser().resolve()),
        "format": inputs.format,
        "modality": inputs.modality,
        "keys": {"image": image_key, "text": text_key} if inputs.format in KEYED_FORMATS else None,
        "dtype": dtype,
        "decode": decode if inputs.modality == "image" else None,
        "model": loaded.checksum,
    }
    return meta, job


def _batches(
    inputs, loaded, state, plan, *, rank: int, world: int, batch_size: int, workers: int, draft: bool, device
) -> tuple[Iterator, int, int]:
    """This rank's batches of the items not yet written (rows an update keeps are copied, the others
    embedded), the number of items of this rank, and how many of them are embedded."""
    from mmcli.retrieval.embedding import encode_image_batches, encode_text_batches, image_batches, rank_share
    from mmcli.retrieval.incremental import merge_rows

    done = set(state.items) | {s["item"] for s in state.skipped} if state else set()
    kept = plan.kept if plan else {}
    if inputs.urls is not None and inputs.modality != "image":
        raise MmcliError(
            f"{inputs.root}: embedding the texts of webdataset shards is not supported; export them to a text file"
        )
    if inputs.modality == "text":
        mine = rank_share(inputs.items, rank, world)
        embed = [item for item in mine if item.key not in done and item.key not in kept]
        batches = encode_text_batches(loaded.model, loaded.tokenizer, embed, batch_size=batch_size, device=device)
    else:
        loader, total = image_batches(
            inputs,
            loaded.preprocess,
            done=done | set(kept),
            rank=rank,
            world=world,
            batch_size=batch_size,
            workers=workers,
            draft=draft,
        )
        batches = encode_image_batches(loaded.model, loader, device)
        if inputs.urls is not None:
            return batches, total, total - len(done)
        mine = rank_share(inputs.items, rank, world)
        embed = [item for item in mine if item.key not in done and item.key not in kept]
    if plan is not None:
        todo = [item.key for item in mine if item.key not in done]
        batches = merge_rows(todo, kept, plan.old.embeddings, batches)
    return batches, len(mine), len(embed)


def _write(writer: ix.IndexWriter, batches: Iterator, *, total: int, done: int, show: bool, unit: str) -> int:
    """Stream ``batches`` into ``writer`` under a progress bar (stderr); return the items handled."""
    from mmcli.commands.render import embed_progress

    handled = 0
    with embed_progress(unit, show=show) as bar:
        task = bar.add_task("embedding", total=total, completed=done)
        for keys, emb, bad in batches:
            if keys:
                writer.add(emb.astype(writer.dtype), keys)
            for key, reason in bad:
                writer.skip(key, reason)
            handled += len(keys) + len(bad)
            bar.update(task, advance=len(keys) + len(bad))
    return handled
