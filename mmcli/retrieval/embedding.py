"""Turn images or texts into L2-normalised embeddings, batch by batch.

The inputs of ``mmcli embed`` (a folder of images, a CSV/TSV/JSONL dataset file, webdataset
shards, a text file) become a list of :class:`Item` s, or a stream of them for shards. Images are
decoded in DataLoader workers, at reduced size where the format allows it (JPEG draft mode), and
each batch comes back as ``(keys, embeddings, bad)`` so that a caller can stream rows into an
:class:`~mmcli.retrieval.index.IndexWriter` (``mmcli embed``) or collect them (``mmcli eval``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from mmcli.data.images import DEFAULT_MAX_PIXELS, BadImage, is_image_file, load_image
from mmcli.data.sources import Record, count_shard_samples, read_records, source_format, webdataset_urls
from mmcli.errors import MmcliError
from mmcli.io import DEFAULT_IMAGE_KEY, DEFAULT_TEXT_KEY, IMAGE_SUFFIXES, TEXT_SUFFIXES, WEBDATASET_IMAGE_KEYS
from mmcli.spec import SourceSpec


@dataclass(frozen=True)
class Item:
    """One thing to embed: ``key`` names its row in the index (a path relative to the input, or
    the text itself); ``source`` is what is decoded (an absolute image path, or the text);
    ``caption`` and ``columns`` (kept columns of a dataset file's row) go into the index's metadata."""

    key: str
    source: str
    caption: str | None = field(default=None, compare=False)
    columns: dict[str, str] | None = field(default=None, compare=False, hash=False)


@dataclass(frozen=True)
class Inputs:
    """What ``mmcli embed PATH`` reads: ``items`` (None for streamed webdataset ``urls``), the
    ``modality``, the ``root`` that relative keys start from, and the input ``format``;
    ``blank_lines``: the lines of a text file left out because they hold no text (reported)."""

    format: str
    modality: str
    root: str
    items: list[Item] | None = None
    urls: list[str] | None = None
    blank_lines: int = 0


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


KEYED_FORMATS = ("csv", "tsv", "jsonl")
"""Embed inputs whose ``--image-key``/``--text-key`` choose the column (or key) read."""


def input_format(path: str) -> str:
    """``folder``, ``text``, ``csv``, ``tsv``, ``jsonl`` or ``webdataset`` for an embed input."""
    p = Path(path).expanduser()
    if p.suffix.lower() in TEXT_SUFFIXES and p.is_file():
        return "text"
    from pydantic import ValidationError

    try:
        spec = SourceSpec(path=path)
    except ValidationError:  # a URL or pipe: a spec may opt in to; embed and caption have no such option
        raise MmcliError(f"{path}: only local files, folders and shards are read, not URLs or pipe:") from None
    return source_format(spec)


def resolve_inputs(
    path: str,
    modality: str = "auto",
    *,
    image_key: str = DEFAULT_IMAGE_KEY,
    text_key: str = DEFAULT_TEXT_KEY,
    keep_columns: tuple[str, ...] = (),
) -> Inputs:
    """The items (or shards) of ``path`` for ``modality`` (``auto``, ``image`` or ``text``).

    ``auto`` embeds images, except for a text file. Keys are unique: relative paths for images
    (the same image listed twice in a dataset file is embedded once, with its first row's caption
    and ``keep_columns``), texts for texts. A folder's images carry their same-name ``.txt`` caption.
    """
    fmt = input_format(path)
    if modality == "auto":
        modality = "text" if fmt == "text" else "image"
    if keep_columns and fmt not in KEYED_FORMATS:
        raise MmcliError(f"--keep-columns: {path} is a {fmt}, which has no columns (only CSV, TSV and JSONL do)")
    if fmt == "text":
        if modality == "image":
            raise MmcliError(f"{path}: a text file holds texts; use --modality text or auto")
        texts, blank = text_file_lines(Path(path))
        root = str(Path(path).resolve().parent)
        return Inputs(fmt, modality, root, items=[Item(t, t) for t in texts], blank_lines=blank)
    if fmt == "folder":
        if modality == "text":
            raise MmcliError(f"{path}: a folder of images has no texts to embed; use --modality image")
        root = Path(path).expanduser().resolve()
        return Inputs(fmt, modality, str(root), items=folder_items(root))
    if fmt == "webdataset":
        return Inputs(
            fmt, modality, str(Path(path).expanduser().resolve()), urls=webdataset_urls(SourceSpec(path=path))
        )
    spec = SourceSpec(path=path, format=fmt, image_key=image_key, text_key=text_key)
    records = read_records(spec)
    _check_kept_columns(path, records, keep_columns, reserved=(image_key, text_key))
    root = Path(path).expanduser().resolve().parent
    if modality == "image":  # every image must lie under the root: items never climb out of it
        root = Path(os.path.commonpath([str(root), *(os.path.dirname(_real(r.image)) for r in records)]))
    return Inputs(fmt, modality, str(root), items=dataset_items(records, root, modality, keep_columns))


def folder_items(root: Path) -> list[Item]:
    """Every image file under ``root`` (recursive, any letter case of the suffix), sorted, each with
    the text of its same-name ``.txt`` file as caption when there is one."""
    if not root.is_dir():
        raise MmcliError(f"{root}: no such folder")
    paths = sorted(p for p in root.rglob("*") if is_image_file(p) and not p.is_dir())
    if not paths:
        raise MmcliError(f"{root}: no image files found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return [Item(p.relative_to(root).as_posix(), str(p), caption=_sidecar_caption(p)) for p in paths]


def _sidecar_caption(image: Path) -> str | None:
    try:
        text = image.with_suffix(".txt").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None  # no caption (or an unreadable one) leaves the row without: it is still embedded
    return text or None


def dataset_items(records: list[Record], root: Path, modality: str, keep_columns: tuple[str, ...] = ()) -> list[Item]:
    """The images (deduplicated, keyed by their path relative to ``root``, which holds them all)
    or the captions of the records of a CSV/TSV/JSONL dataset file, each with its first record's
    caption and ``keep_columns`` (as text: JSON for a JSONL value that is not a string)."""

    def kept(r: Record) -> dict[str, str] | None:
        if not keep_columns:
            return None
        return {c: _as_text(r.meta.get(c)) for c in keep_columns}

    if modality == "text":
        return [Item(r.text, r.text, columns=kept(r)) for r in records]
    seen: dict[str, Item] = {}
    for r in records:
        key = os.path.relpath(_real(r.image), root).replace(os.sep, "/")
        if key not in seen:
            seen[key] = Item(key, r.image, caption=r.text, columns=kept(r))
    return list(seen.values())


def _as_text(value: Any) -> str | None:
    # A JSONL value that is not a string (a number, a list, an object) is kept as its JSON text.
    return value if value is None or isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _check_kept_columns(path: str, records: list[Record], keep: tuple[str, ...], *, reserved: tuple[str, ...]) -> None:
    from mmcli.retrieval.index.metadata import RESERVED

    for column in keep:
        if column in RESERVED or column in reserved:
            raise MmcliError(f"--keep-columns {column}: already stored (as the item or its caption); leave it out")
        if column not in records[0].meta:
            have = ", ".join(records[0].meta) or "none"
            raise MmcliError(f"--keep-columns {column}: {path} has no such column (it has: {have})")


def _real(image: str) -> str:
    # The folder with its links resolved, as the root is; the file keeps its own name.
    return os.path.join(os.path.realpath(os.path.dirname(image)), os.path.basename(image))


def text_file_lines(path: Path) -> tuple[list[str], int]:
    """The non-blank lines of a UTF-8 text file (surrounding spaces dropped), and how many lines were
    blank: a blank line has no text to embed, and the caller reports the count rather than hiding it."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise MmcliError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise MmcliError(f"{path}: no texts (every line is blank)")
    return texts, len(lines) - len(texts)


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------


class ImageItems(Dataset):
    """Map-style dataset: ``(key, pixels or None, reason)``; an unusable image gives ``None``
    and why, never an exception, so one broken file cannot stop a run."""

    def __init__(
        self,
        items: list[Item],
        preprocess: Callable,
        *,
        draft: tuple[int, int] | None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.items, self.preprocess, self.draft, self.max_pixels = items, preprocess, draft, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor | None, str]:
        item = self.items[index]
        return decode(item.key, item.source, self.preprocess, self.draft, self.max_pixels)


def decode(key: str, source: Any, preprocess: Callable, draft, max_pixels: int):
    """``(key, preprocess(image), "")``, or ``(key, None, reason)`` for an unusable image."""
    try:
        image = load_image(source, max_pixels=max_pixels, draft=draft)
        return key, preprocess(image), ""
    except BadImage as exc:
        return key, None, exc.reason
    except Exception as exc:  # noqa: BLE001 - a transform failing on one odd image skips only it
        return key, None, f"preprocessing failed ({type(exc).__name__}: {str(exc)[:80]})"


class ShardImages(IterableDataset):
    """Images streamed from webdataset shards (``key.jpg`` …), keyed ``shard.tar/key``.

    Each DataLoader worker reads every ``workers``-th shard; ``done`` keys are not decoded."""

    def __init__(
        self, urls: list[str], preprocess: Callable, *, draft, done: set[str], max_pixels: int = DEFAULT_MAX_PIXELS
    ):
        self.urls, self.preprocess, self.draft, self.done, self.max_pixels = urls, preprocess, draft, done, max_pixels

    def __iter__(self):
        import webdataset as wds

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for url in self.urls[worker::workers]:
            samples = wds.tarfile_to_samples(handler=wds.warn_and_continue)(iter([{"url": url}]))
            for raw in samples:
                key = f"{os.path.basename(url)}/{raw['__key__']}"
                if key in self.done:
                    continue
                data = next((raw[k] for k in WEBDATASET_IMAGE_KEYS if k in raw), None)
                if data is None:
                    yield key, None, "no image member"
                else:
                    yield decode(key, data, self.preprocess, self.draft, self.max_pixels)


def collate_items(batch: list[tuple[str, torch.Tensor | None, str]]) -> dict[str, Any]:
    """Stack the decoded images of a batch; list the undecodable ones as ``(key, reason)``."""
    good = [(key, pixels) for key, pixels, _ in batch if pixels is not None]
    return {
        "keys": [key for key, _ in good],
        "pixels": torch.stack([p for _, p in good]) if good else None,
        "bad": [(key, reason) for key, pixels, reason in batch if pixels is None],
    }


def draft_size(preprocess: Callable) -> tuple[int, int] | None:
    """The smallest decode size that loses nothing for ``preprocess``: its output side.

    open_clip's evaluation transform resizes the shorter side to the model's input size, so a
    JPEG decoded at any scale whose sides are at least that size gives the same crop (up to
    resampling); DCT-domain scaling skips most of the decoding work for large photos.
    """
    for t in getattr(preprocess, "transforms", []):
        size = getattr(t, "size", None)
        if size is not None:
            side = size if isinstance(size, int) else max(size)
            return side, side
    return None


def decode_settings(preprocess: Callable, *, draft: bool) -> dict[str, Any]:
    """How ``mmcli embed`` decodes images for ``preprocess``, as recorded in the sidecar's ``decode``
    field: ``{"draft": [w, h]}`` (JPEG draft mode at :func:`draft_size`) or ``{"draft": None}``."""
    size = draft_size(preprocess) if draft else None
    return {"draft": list(size) if size else None}


def recorded_draft(meta: dict, preprocess: Callable, *, where: str) -> tuple[int, int] | None:
    """The JPEG draft size the images of the index described by ``meta`` (its sidecar, read from
    ``where``) were decoded at, so that a query decodes the same way.

    A sidecar without the ``decode`` field was written by an embed that always decoded at
    :func:`draft_size` of the model's transform, unless its ``draft_decode`` flag says it did not.
    """
    if "decode" not in meta:
        return draft_size(preprocess) if meta.get("draft_decode", True) else None
    decode = meta["decode"]
    draft = decode.get("draft", "?") if isinstance(decode, dict) else "?"
    if draft is None:
        return None
    if isinstance(draft, list) and len(draft) == 2 and all(type(v) is int and v > 0 for v in draft):
        return draft[0], draft[1]
    raise MmcliError(f"{where}: field 'decode' is {decode!r}; expected {{\"draft\": [width, height] or null}}")


# --------------------------------------------------------------------------------------------
# one rank's share
# --------------------------------------------------------------------------------------------


def rank_and_world() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` of a torchrun launch, else ``(0, 1)``.

    ``mmcli embed`` and ``mmcli caption`` need no process group: each rank handles its own share
    of the input and writes its own shard."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def rank_share(items: list[Item], rank: int, world: int) -> list[Item]:
    """Rank ``rank``'s contiguous share of ``items`` (contiguous shares keep the input order across shards)."""
    share = math.ceil(len(items) / world)
    return items[rank * share : (rank + 1) * share]


def image_batches(
    inputs: Inputs,
    preprocess: Callable,
    *,
    done: set[str],
    rank: int,
    world: int,
    batch_size: int,
    workers: int,
    draft: bool,
) -> tuple[Iterable[dict[str, Any]], int]:
    """This rank's batches (see :func:`collate_items`, in input order) of the images of ``inputs``
    whose keys are not in ``done``, and how many images this rank has, done ones included.

    Webdataset shards are dealt to ranks one by one (every ``world``-th shard); listed items in
    contiguous shares (:func:`rank_share`). ``draft`` decodes JPEGs at :func:`draft_size`."""
    size = draft_size(preprocess) if draft else None
    if inputs.urls is not None:
        urls = inputs.urls[rank::world]
        total = count_shard_samples(tuple(urls), WEBDATASET_IMAGE_KEYS) if urls else 0
        dataset = ShardImages(urls, preprocess, draft=size, done=done)
        return image_loader(dataset, batch_size=batch_size, workers=min(workers, len(urls))), total
    mine = rank_share(inputs.items, rank, world)
    dataset = ImageItems([item for item in mine if item.key not in done], preprocess, draft=size)
    return image_loader(dataset, batch_size=batch_size, workers=workers), len(mine)


# --------------------------------------------------------------------------------------------
# encoding
# --------------------------------------------------------------------------------------------


Batch = tuple[list[str], np.ndarray, list[tuple[str, str]]]


def image_loader(dataset: Dataset, *, batch_size: int, workers: int) -> DataLoader:
    """A DataLoader over an image dataset of this module, in order (resuming relies on it)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_items,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


@torch.inference_mode()
def encode_image_batches(model, loader: Iterable[dict[str, Any]], device: torch.device) -> Iterator[Batch]:
    """``(keys, embeddings float32 [n, D], bad)`` per batch of ``loader`` (see :func:`collate_items`)."""
    for batch in loader:
        if batch["pixels"] is None:
            yield [], np.zeros((0, 0), np.float32), batch["bad"]
            continue
        with _autocast(device):
            emb = model.encode_image(batch["pixels"].to(device, non_blocking=True), normalize=True)
        yield batch["keys"], _normalised(emb), batch["bad"]


@torch.inference_mode()
def encode_text_batches(
    model, tokenizer: Callable, items: list[Item], *, batch_size: int, device: torch.device
) -> Iterator[Batch]:
    """``(keys, embeddings, [])`` per batch of texts; texts never fail (long ones are truncated
    to the model's context, as open_clip's tokenizer does)."""
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        tokens = tokenizer([item.source for item in chunk]).to(device)
        with _autocast(device):
            emb = model.encode_text(tokens, normalize=True)
        yield [item.key for item in chunk], _normalised(emb), []


def _normalised(emb: torch.Tensor) -> np.ndarray:
    # Renormalised in float32: under bf16 autocast the model's own normalisation is inexact.
    emb = emb.float()
    return torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def embed_image_file(
    loaded,
    source: str | bytes,
    *,
    draft: tuple[int, int] | None,
    device: torch.device,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """One image (a file, or a file's bytes) embedded exactly as ``mmcli embed`` embeds the rows of
    an index (the same decoding at ``draft``, transform, autocast and renormalisation), so that an
    indexed image queried by itself scores 1. Raises :class:`~mmcli.data.images.BadImage` for an
    unusable image, including one of more than ``max_pixels`` pixels."""
    key = source if isinstance(source, str) else "upload"
    key, pixels, reason = decode(key, source, loaded.preprocess, draft, max_pixels)
    if pixels is None:
        raise BadImage(reason, key)
    ((_, emb, _),) = encode_image_batches(loaded.model, [collate_items([(key, pixels, reason)])], device)
    return emb[0]


def embed_images(
    loaded,
    paths: list[str],
    *,
    batch_size: int,
    workers: int,
    device: torch.device,
    draft: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Embed the image files ``paths`` in memory: ``(embeddings [n_ok, D], ok mask [n], bad)``.

    Used by ``mmcli eval``; ``bad`` lists ``(path, reason)`` of the images left out; ``on_batch``
    is told how many paths each batch settled (embedded or left out), for a progress bar.
    """
    items = [Item(str(i), p) for i, p in enumerate(paths)]
    dataset = ImageItems(items, loaded.preprocess, draft=draft_size(loaded.preprocess) if draft else None)
    rows, ok, bad = [], np.zeros(len(paths), dtype=bool), []
    for keys, emb, failed in encode_image_batches(
        loaded.model, image_loader(dataset, batch_size=batch_size, workers=workers), device
    ):
        if keys:
            rows.append(emb)
            ok[[int(k) for k in keys]] = True
        bad += [(paths[int(k)], reason) for k, reason in failed]
        if on_batch is not None:
            on_batch(len(keys) + len(failed))
    dim = rows[0].shape[1] if rows else loaded.model.clip.visual.output_dim
    return (np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)), ok, bad


def embed_texts(
    loaded, texts: list[str], *, batch_size: int, device: torch.device, on_batch: Callable[[int], None] | None = None
) -> np.ndarray:
    """Embed ``texts`` in memory: float32 [n, D], L2-normalised (``on_batch``: as for images)."""
    items = [Item(str(i), t) for i, t in enumerate(texts)]
    rows = []
    for keys, emb, _ in encode_text_batches(
        loaded.model, loaded.tokenizer, items, batch_size=batch_size, device=device
    ):
        rows.append(emb)
        if on_batch is not None:
            on_batch(len(keys))
    return np.concatenate(rows)
