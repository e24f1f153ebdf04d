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
    draft: bool = True,
    image_key: str = DEFAULT_IMAGE_KEY,
    text_key: str = DEFAULT_TEXT_KEY,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Embed ``path`` into the index ``out`` (this rank's shard under torchrun); return a summary.

    One process at a time writes ``out`` (it holds ``out.lock``; a second one is refused). Re-running
    the same job into the same ``out`` resumes an interrupted run (the model defaults to the one it
    was started with); another job (input, keys, dtype, decoding, model) is refused.
    ``overwrite`` starts over and replaces a complete index.
    """
    from mmcli.distributed import resolve_device
    from mmcli.models.loading import load_model
    from mmcli.retrieval.embedding import rank_and_world, resolve_inputs

    rank, world = rank_and_world()
    if not str(out).endswith(".npy"):
        raise MmcliError(f"--out {out}: the index file name must end with .npy")
    target = ix.shard_path(str(out), rank, world) if world > 1 else str(out)
    inputs = resolve_inputs(path, modality, image_key=image_key, text_key=text_key)
    with ix.writer_lock(target) as lock:  # before reading the partial output another run may be writing
        state = None if overwrite else ix.IndexWriter.resume_state(target)
        ref = model or (state.meta["model"]["ref"] if state else None)
        if ref is None:
            raise MmcliError("--model: give a run folder (runs/NAME) or ARCH:PRETRAINED to embed with")
        dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
        loaded = load_model(ref, device=dev)
        meta, job = _describe(path, inputs, loaded, dtype=dtype, draft=draft, image_key=image_key, text_key=text_key)
        start = time.perf_counter()
        batches, capacity = _batches(
            inputs,
            loaded,
            state,
            rank=rank,
            world=world,
            batch_size=batch_size,
            workers=workers,
            draft=draft,
            device=dev,
        )
        dim = loaded.model.clip.visual.output_dim
        resumed = state.rows + len(state.skipped) if state else 0
        with ix.IndexWriter(
            target, dim=dim, dtype=dtype, capacity=capacity, meta=meta, overwrite=overwrite, job=job, lock=lock
        ) as writer:
            new = _write(writer, batches, total=capacity, done=resumed, show=progress, unit=inputs.modality)
    seconds = time.perf_counter() - start
    return {
        "out": target,
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
        "seconds": round(seconds, 3),
        "items_per_s": round(new / seconds, 1) if seconds > 0 else None,
        "device": str(dev),
        "is_main": rank == 0,
    }


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
    inputs, loaded, state, *, rank: int, world: int, batch_size: int, workers: int, draft: bool, device
) -> tuple[Iterator, int]:
    """This rank's batches of not-yet-embedded items and the number of items of this rank."""
    from mmcli.retrieval.embedding import encode_image_batches, encode_text_batches, image_batches, rank_share

    done = set(state.items) | {s["item"] for s in state.skipped} if state else set()
    if inputs.urls is not None and inputs.modality != "image":
        raise MmcliError(
            f"{inputs.root}: embedding the texts of webdataset shards is not supported; export them to a text file"
        )
    if inputs.modality == "text":
        mine = rank_share(inputs.items, rank, world)
        todo = [item for item in mine if item.key not in done]
        return encode_text_batches(loaded.model, loaded.tokenizer, todo, batch_size=batch_size, device=device), len(
            mine
        )
    loader, total = image_batches(
        inputs,
        loaded.preprocess,
        done=done,
        rank=rank,
        world=world,
        batch_size=batch_size,
        workers=workers,
        draft=draft,
    )
    return encode_image_batches(loaded.model, loader, device), total


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
