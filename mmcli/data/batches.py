"""Torch datasets of image–text pairs, their collate function, and :func:`make_loader`.

Determinism is by construction, not by luck: the data order is a pure function of
``(seed, epoch)``, and each sample's augmentation runs under a seed derived from
``(seed, epoch, index)``. So the same sample gets the same crop whatever the number of workers,
ranks, or where a run resumed.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from mmcli.data.images import BadImage, load_image
from mmcli.data.sources import Record, count_shard_samples, read_records, source_format, webdataset_urls
from mmcli.errors import MmcliError
from mmcli.io import WEBDATASET_IMAGE_KEYS, WEBDATASET_TEXT_KEY
from mmcli.spec import DataSpec, SourceSpec

ImageFn = Callable[[Any], torch.Tensor]
TextFn = Callable[[str], torch.Tensor]
Sample = dict[str, Any]


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (stable across processes and platforms, unlike
    ``hash``; neighbouring inputs give unrelated seeds, unlike ``seed + index``)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(values)}q", *values), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _as_token_row(text: torch.Tensor) -> torch.Tensor:
    # open_clip's tokenizer returns [1, L] for one string; a sample holds one row.
    if text.dim() == 2 and text.shape[0] == 1:
        return text[0]
    return text


def make_sample(image, text: str, index: int, image_fn: ImageFn, text_fn: TextFn, seed_key: tuple[int, ...]) -> Sample:
    """Apply ``image_fn``/``text_fn`` under the seed ``mix_seed(*seed_key)``, leaving the
    global torch and Python RNG states as they were."""
    sample_seed = mix_seed(*seed_key)
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        # The CPU generator alone: torch.manual_seed also queues a lazy CUDA seeding that records a
        # Python traceback on every call, which cost more than decoding the image here.
        torch.default_generator.manual_seed(sample_seed)
        random.seed(sample_seed)
        try:
            pixels = image_fn(image)
            tokens = _as_token_row(text_fn(text))
        finally:
            random.setstate(python_state)
    return {"image": pixels, "text": tokens, "index": index}


class PairDataset(Dataset):
    """Map-style dataset over :class:`Record` s; an undecodable image gives ``None``.

    Augmentations are seeded by ``(seed, epoch, index)``."""

    def __init__(self, records: list[Record], image_fn: ImageFn, text_fn: TextFn, *, max_pixels: int, seed: int = 0):
        self.records = records
        self.image_fn = image_fn
        self.text_fn = text_fn
        self.max_pixels = max_pixels
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations ``__getitem__`` draws."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample | None:
        record = self.records[index]
        try:
            image = load_image(record.image, max_pixels=self.max_pixels)
        except BadImage:
            return None
        seed_key = (self.seed, self.epoch, index)
        return make_sample(image, record.text, index, self.image_fn, self.text_fn, seed_key)


class WebDatasetPairs(IterableDataset):
    """Image–text pairs streamed from webdataset tar shards (img2dataset layout: ``key.jpg``
    (or ``.jpeg``/``.png``/``.webp``) next to ``key.txt``).

    Shards are split by rank, then by DataLoader worker: every worker of every rank reads its
    own shards, so all are busy only when there are at least ranks × workers shards. Shard order
    and the sample shuffle buffer are seeded from ``(seed, epoch, pass)``; ``shuffle_buffer <= 1``
    reads shards and samples in order. Every tar sample yields one item, ``None`` when it is
    undecodable or lacks an image or caption, so that batch boundaries (and resuming) count
    samples exactly. ``index`` interleaves the running counts of all streams: unique per pass.
    """

    def __init__(
        self,
        urls: list[str],
        image_fn: ImageFn,
        text_fn: TextFn,
        *,
        max_pixels: int,
        shuffle_buffer: int,
        seed: int,
        rank: int,
        world_size: int,
    ):
        if len(urls) < world_size:
            raise MmcliError(
                f"{len(urls)} webdataset shards for {world_size} ranks: every rank needs at least one shard"
            )
        self.urls = list(urls)
        self.image_fn = image_fn
        self.text_fn = text_fn
        self.max_pixels = max_pixels
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.pass_number = 0
        self.resume = (0, 1)  # (batches already done by this rank, batch size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that seeds the shard order, the shuffle buffer and augmentations."""
        self.epoch = epoch

    def set_pass(self, pass_number: int) -> None:
        """Select the pass over the shards within the epoch (see :class:`PairLoader`)."""
        self.pass_number = pass_number

    def skip_batches(self, batches: int, batch_size: int) -> None:
        """Resume after ``batches`` batches of this rank: their samples are skipped undecoded."""
        self.resume = (batches, batch_size)

    def role(self, worker: int, workers: int) -> int:
        """The worker whose shards and stream ``worker`` takes over. The DataLoader takes
        batches from its workers in turn, always starting with worker 0; after resuming at batch
        ``b`` the next batch was due from worker ``b % workers``, so roles rotate by ``b``."""
        return (worker + self._resume_batches()) % workers

    def skipped_samples(self, role: int, workers: int) -> int:
        """Samples that the stream of ``role`` had put in the batches before the resume point:
        it made batches ``role, role + workers, …``."""
        batches = self._resume_batches()
        return max(0, math.ceil((batches - role) / workers)) * self.resume[1]

    def _resume_batches(self) -> int:
        return self.resume[0] if self.pass_number == 0 else 0  # later passes start afresh

    def shards(self, role: int, workers: int) -> list[str]:
        """The shards that the stream of ``role`` (of ``workers``) of this rank reads in this pass."""
        urls = list(self.urls)
        if self.shuffle_buffer > 1:
            # The same permutation on every rank, so the rank slices still partition the shards.
            random.Random(mix_seed(self.seed, self.epoch, self.pass_number)).shuffle(urls)
        return urls[self.rank :: self.world_size][role::workers]

    def __iter__(self) -> Iterator[Sample | None]:
        import webdataset as wds

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        role = self.role(worker, workers)
        shards = [{"url": url} for url in self.shards(role, workers)]
        samples = wds.tarfile_to_samples(handler=wds.warn_and_continue)(iter(shards))
        stream_id = self.rank * workers + role
        if self.shuffle_buffer > 1:
            rng = random.Random(mix_seed(self.seed, self.epoch, self.pass_number, stream_id))
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        streams = self.world_size * workers
        skip = self.skipped_samples(role, workers)
        for count, raw in enumerate(samples):
            if count >= skip:  # skipped samples are read (the shuffle needs them) but not decoded
                yield self._decode(raw, index=count * streams + stream_id)

    def _decode(self, raw: dict[str, Any], index: int) -> Sample | None:
        image_bytes = next((raw[k] for k in WEBDATASET_IMAGE_KEYS if k in raw), None)
        if image_bytes is None or WEBDATASET_TEXT_KEY not in raw:
            return None
        try:
            image = load_image(image_bytes, max_pixels=self.max_pixels)
        except BadImage:
            return None
        text = raw[WEBDATASET_TEXT_KEY].decode("utf-8", errors="replace").strip()
        seed_key = (self.seed, self.epoch, self.pass_number, index)
        return make_sample(image, text, index, self.image_fn, self.text_fn, seed_key)


def collate_pairs(items: list[Sample | None]) -> dict[str, Any]:
    """Stack samples into a batch, dropping ``None`` (undecodable) items and counting them.

    A batch whose every item was undecodable has zero rows; :class:`PairLoader` never yields it
    (its ``skipped`` count moves on to the next batch it yields)."""
    kept = [item for item in items if item is not None]
    skipped = len(items) - len(kept)
    if not kept:
        return {
            "images": torch.empty(0, 3, 0, 0),
            "texts": torch.empty(0, 0, dtype=torch.long),
            "index": torch.empty(0, dtype=torch.long),
            "skipped": skipped,
        }
    return {
        "images": torch.stack([item["image"] for item in kept]),
        "texts": torch.stack([item["text"] for item in kept]).long(),
        "index": torch.tensor([item["index"] for item in kept], dtype=torch.long),
        "skipped": skipped,
    }


class PairLoader:
    """An iterable of batches for one rank and one epoch, with its length known up front.

    No yielded batch is empty: a batch in which no image decoded is dropped, and every yielded
    batch says under ``"skipped"`` how many samples were left out (undecodable, or without an
    image or a caption) since the batch before it, those of dropped batches included, and under
    ``"batches"`` how many of the loader's planned batches it stands for (1 + the dropped ones
    just before it; the unit of ``start_batch``). :attr:`skipped` counts every sample left out
    by the iteration so far, including any after the last yielded batch.

    ``max_batches`` stops a stream that runs past it. With ``refill``, a stream that ends
    sooner is read again (a new pass, reshuffled) until ``max_batches``: in training every rank
    then yields ``len(self)`` batches, so no rank waits forever for another in DDP, even when
    the ranks' shards hold different numbers of samples. A pass that yields no batch ends the
    iteration (a source without a usable sample gives an empty epoch, never an endless one).
    """

    def __init__(
        self,
        loader: DataLoader,
        batches: int,
        num_samples: int,
        *,
        max_batches: int | None = None,
        refill: bool = False,
    ):
        self.loader = loader
        self.batches = batches
        self.num_samples = num_samples
        self.max_batches = max_batches
        self.refill = refill
        self.skipped = 0
        """Samples left out by the current (or last) iteration, reported or not yet."""

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.skipped = 0
        pending_skipped, pending_batches = 0, 0  # of the batches dropped since the last yielded one
        produced = 0
        for pass_number in itertools.count():
            if self.max_batches is not None and produced >= self.max_batches:
                return
            if self.refill:
                self.loader.dataset.set_pass(pass_number)
            before = produced
            for batch in self.loader:
                self.skipped += batch["skipped"]
                pending_skipped += batch["skipped"]
                pending_batches += 1
                if batch["images"].shape[0] == 0:
                    continue  # nothing decoded: never hand the model an empty batch
                batch["skipped"], batch["batches"] = pending_skipped, pending_batches
                pending_skipped, pending_batches = 0, 0
                yield batch
                produced += 1
                if self.max_batches is not None and produced >= self.max_batches:
                    return
            # A pass that yields nothing would do so forever (a source without one usable sample
            # never yields); the first may be empty only by resuming past its end.
            if not self.refill or (produced == before and pass_number > 0):
                return


def rank_batches(
    n: int, *, batch_size: int, train: bool, seed: int, epoch: int, rank: int, world_size: int
) -> list[list[int]]:
    """The record indices of each batch of ``rank`` this epoch.

    As ``DistributedSampler``: one permutation from ``seed + epoch`` (or the identity when not
    training), padded by wrapping to a multiple of ``world_size``, rank ``r`` taking
    ``order[r::world_size]``. Hence the k-th batches of all ranks together are the k-th batch of
    one process with ``batch_size * world_size``. The last partial batch is dropped in training.
    """
    if n == 0:
        return []
    if train:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    else:
        order = list(range(n))
    total = math.ceil(n / world_size) * world_size
    order = (order * math.ceil(total / n))[:total]
    mine = order[rank::world_size]
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    if train and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


@dataclass(frozen=True)
class _Plan:
    """What one rank reads in one epoch (the keyword arguments of :func:`make_loader`)."""

    batch_size: int
    train: bool
    seed: int
    rank: int
    world_size: int
    epoch: int
    start_batch: int
    limit: int | None


def _loader_options(data: DataSpec, plan: _Plan) -> dict[str, Any]:
    return {
        "num_workers": data.workers,
        "collate_fn": collate_pairs,
        "persistent_workers": False,
        "pin_memory": torch.cuda.is_available(),
        # The DataLoader draws its workers' base seed from this generator instead of the global
        # one, so iterating a loader leaves the training loop's random stream untouched.
        "generator": torch.Generator().manual_seed(mix_seed(plan.seed, plan.epoch)),
    }


def make_loader(
    source: SourceSpec,
    data: DataSpec,
    image_fn: ImageFn,
    text_fn: TextFn,
    *,
    batch_size: int,
    train: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    start_batch: int = 0,
    limit: int | None = None,
) -> PairLoader:
    """Batches of ``source`` for ``rank`` of ``world_size`` in ``epoch``; ``batch_size`` is per
    rank. ``start_batch`` resumes mid-epoch without decoding the batches before it; ``limit``
    keeps only the first ``limit`` records (a validation cap)."""
    if not 0 <= rank < world_size:
        raise MmcliError(f"rank {rank} is outside world size {world_size}")
    plan = _Plan(batch_size, train, seed, rank, world_size, epoch, start_batch, limit)
    if source_format(source) == "webdataset":
        return _webdataset_loader(source, data, image_fn, text_fn, plan)
    return _map_loader(source, data, image_fn, text_fn, plan)


def _map_loader(source: SourceSpec, data: DataSpec, image_fn: ImageFn, text_fn: TextFn, plan: _Plan) -> PairLoader:
    records = read_records(source)[: plan.limit]
    dataset = PairDataset(records, image_fn, text_fn, max_pixels=data.max_image_pixels, seed=plan.seed)
    dataset.set_epoch(plan.epoch)
    batches = rank_batches(
        len(records),
        batch_size=plan.batch_size,
        train=plan.train,
        seed=plan.seed,
        epoch=plan.epoch,
        rank=plan.rank,
        world_size=plan.world_size,
    )[plan.start_batch :]
    # A precomputed batch list: the skipped batches are never decoded, and the order does not
    # depend on the number of workers.
    loader = DataLoader(dataset, batch_sampler=batches, **_loader_options(data, plan))
    return PairLoader(loader, len(batches), len(records))


def _webdataset_loader(
    source: SourceSpec, data: DataSpec, image_fn: ImageFn, text_fn: TextFn, plan: _Plan
) -> PairLoader:
    urls = webdataset_urls(source)
    dataset = WebDatasetPairs(
        urls,
        image_fn,
        text_fn,
        max_pixels=data.max_image_pixels,
        shuffle_buffer=data.shuffle_buffer if plan.train else 0,
        seed=plan.seed,
        rank=plan.rank,
        world_size=plan.world_size,
    )
    dataset.set_epoch(plan.epoch)
    dataset.skip_batches(plan.start_batch, plan.batch_size)
    size = source.size or count_shard_samples(tuple(urls), WEBDATASET_IMAGE_KEYS)
    num_samples = min(size, plan.limit) if plan.limit is not None else size
    per_rank = num_samples / plan.world_size / plan.batch_size
    batches = max(0, (math.floor(per_rank) if plan.train else math.ceil(per_rank)) - plan.start_batch)
    options = _loader_options(data, plan)
    loader = DataLoader(dataset, batch_size=plan.batch_size, drop_last=plan.train, **options)
    # Training epochs have the same length on every rank; evaluation reads every sample once
    # (up to the limit), however the estimate rounds.
    max_batches = batches if plan.train or plan.limit is not None else None
    return PairLoader(loader, batches, num_samples, max_batches=max_batches, refill=plan.train)


def to_device(batch: dict, device: torch.device | str) -> dict:
    """``batch`` with its tensors moved to ``device`` (other values as they are)."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
