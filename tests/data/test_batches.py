"""Datasets, collate and loaders: order, rank split, resume, augmentation seeds, webdataset."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms import RandomCrop
from torchvision.transforms.functional import pil_to_tensor

from mmcli.data import shapes
from mmcli.data.batches import PairDataset, collate_pairs, make_loader, mix_seed, rank_batches
from mmcli.data.sources import Record
from mmcli.errors import MmcliError
from mmcli.spec import DataSpec, SourceSpec


def to_tensor(image: Image.Image) -> torch.Tensor:
    return pil_to_tensor(image).float() / 255


class CropWithJitter:
    """A random 16-px crop plus a brightness offset from Python's ``random``, so that both the
    torch and the Python generators must be seeded per sample for results to repeat."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return RandomCrop(16)(to_tensor(image)) + random.random()


def caption_length(text: str) -> torch.Tensor:
    return torch.tensor([[len(text), 7]])  # [1, L], the shape open_clip's tokenizer returns


def sample_number(text: str) -> torch.Tensor:
    return torch.tensor([int(text.split()[-1])])


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    shapes.generate(out, n=40, size=32, seed=0)
    return out


def data_spec(source: str, workers: int = 0, **fields) -> DataSpec:
    return DataSpec(train=SourceSpec(path=source), workers=workers, **fields)


def loader_indices(loader) -> list[list[int]]:
    return [batch["index"].tolist() for batch in loader]


def shapes_loader(small_shapes: Path, workers: int = 0, image_fn=to_tensor, **options):
    data = data_spec(str(small_shapes / "train.tsv"), workers=workers)
    options = {"batch_size": 4, "train": True, "seed": 0, **options}
    return make_loader(data.train, data, image_fn, caption_length, **options)


# --------------------------------------------------------------------------------------------
# collate and map-style datasets
# --------------------------------------------------------------------------------------------


def test_collate_drops_none_and_counts_it():
    def item(i):
        return {"image": torch.full((3, 2, 2), float(i)), "text": torch.tensor([i, 0]), "index": i}

    batch = collate_pairs([item(4), None, item(9)])
    assert batch["images"].shape == (2, 3, 2, 2) and batch["images"][1, 0, 0, 0] == 9
    assert batch["texts"].tolist() == [[4, 0], [9, 0]] and batch["texts"].dtype == torch.long
    assert batch["index"].tolist() == [4, 9] and batch["skipped"] == 1
    empty = collate_pairs([None, None])
    assert empty["images"].shape[0] == 0 and empty["index"].numel() == 0 and empty["skipped"] == 2


def test_pair_dataset_returns_none_for_a_bad_image_and_flattens_tokens(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    records = [Record(str(tmp_path / "good.png"), "abc", {}), Record(str(tmp_path / "bad.png"), "x", {})]
    dataset = PairDataset(records, to_tensor, caption_length, max_pixels=1000)
    sample = dataset[0]
    assert sample["text"].tolist() == [3, 7] and sample["index"] == 0
    assert sample["image"][:, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert dataset[1] is None
    assert PairDataset(records, to_tensor, caption_length, max_pixels=63)[0] is None  # 8×8 > 63


def test_mix_seed_is_stable_and_spreads_neighbours():
    assert mix_seed(0, 0, 1) == mix_seed(0, 0, 1)
    assert len({mix_seed(0, e, i) for e in range(10) for i in range(100)}) == 1000
    assert mix_seed(-1, 0, 0) != mix_seed(1, 0, 0) and 0 <= mix_seed(-1, 0, 0) < 2**63


# --------------------------------------------------------------------------------------------
# order, ranks, resume
# --------------------------------------------------------------------------------------------


def test_same_seed_same_order_and_another_epoch_another_order(small_shapes):
    first = loader_indices(shapes_loader(small_shapes))
    assert first == loader_indices(shapes_loader(small_shapes))
    assert first != loader_indices(shapes_loader(small_shapes, epoch=1))
    assert sorted(sum(first, [])) == list(range(40))  # a permutation: 40 = 10 full batches
    expected = torch.randperm(40, generator=torch.Generator().manual_seed(0)).tolist()
    assert sum(first, []) == expected


def test_union_over_ranks_equals_the_single_process_batch(small_shapes):
    single = loader_indices(shapes_loader(small_shapes, batch_size=8))
    ranks = [loader_indices(shapes_loader(small_shapes, batch_size=4, rank=r, world_size=2)) for r in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 5
    for k, batch in enumerate(single):
        assert ranks[0][k] == batch[0::2] and ranks[1][k] == batch[1::2]


@pytest.mark.parametrize("n, world_size, batch_size", [(41, 2, 4), (10, 3, 2), (7, 4, 1), (50, 3, 5)])
def test_rank_batches_pad_by_wrapping_and_keep_the_union_property(n, world_size, batch_size):
    options = {"train": True, "seed": 3, "epoch": 2}
    ranks = range(world_size)
    per_rank = [rank_batches(n, batch_size=batch_size, rank=r, world_size=world_size, **options) for r in ranks]
    single = rank_batches(n, batch_size=batch_size * world_size, rank=0, world_size=1, **options)
    per_rank_samples = -(-n // world_size)  # ceil: every rank the same count, as DistributedSampler
    assert all(len(b) == per_rank_samples // batch_size for b in per_rank)
    padded = torch.randperm(n, generator=torch.Generator().manual_seed(5)).tolist() * 2
    padded = padded[: per_rank_samples * world_size]
    for r in range(world_size):
        assert sum(per_rank[r], []) == padded[r::world_size][: len(per_rank[r]) * batch_size]
    for k in range(min(len(single), len(per_rank[0]))):
        assert sorted(sum((per_rank[r][k] for r in range(world_size)), [])) == sorted(single[k])


def test_evaluation_order_is_sequential_keeps_the_last_partial_batch_and_limit(small_shapes):
    batches = loader_indices(shapes_loader(small_shapes, train=False, limit=10))
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    loader = shapes_loader(small_shapes, train=False, limit=10)
    assert len(loader) == 3 and loader.num_samples == 10
    train = shapes_loader(small_shapes, limit=10)
    assert len(train) == 2 and all(i < 10 for b in loader_indices(train) for i in b)


def test_start_batch_skips_without_decoding(small_shapes):
    calls = []

    def counting(image):
        calls.append(1)
        return to_tensor(image)

    full = loader_indices(shapes_loader(small_shapes, epoch=3))
    resumed = shapes_loader(small_shapes, image_fn=counting, epoch=3, start_batch=7)
    assert len(resumed) == 3 and resumed.num_samples == 40
    assert loader_indices(resumed) == full[7:]
    assert len(calls) == 3 * 4  # only the batches after the resume point were decoded


def test_augmentation_is_per_sample_whatever_the_workers(small_shapes):
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    single = list(shapes_loader(small_shapes, workers=0, image_fn=CropWithJitter(), limit=16))
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    multi = list(shapes_loader(small_shapes, workers=2, image_fn=CropWithJitter(), limit=16))
    assert [b["index"].tolist() for b in single] == [b["index"].tolist() for b in multi]
    for a, b in zip(single, multi):
        assert a["images"].shape == (4, 3, 16, 16) and torch.equal(a["images"], b["images"])
    other_epoch = list(shapes_loader(small_shapes, workers=0, image_fn=CropWithJitter(), limit=16, epoch=1))

    def by_index(batches):
        return {int(i): img for b in batches for i, img in zip(b["index"], b["images"])}

    assert not torch.equal(by_index(single)[0], by_index(other_epoch)[0])


def test_bad_image_in_a_csv_source_is_skipped_and_counted(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "1.png").write_bytes(b"broken")
    (tmp_path / "p.tsv").write_text("filepath\ttitle\n" + "".join(f"{i}.png\tc{i}\n" for i in range(3)))
    data = data_spec(str(tmp_path / "p.tsv"))
    (batch,) = make_loader(data.train, data, to_tensor, caption_length, batch_size=3, train=False, seed=0)
    assert batch["index"].tolist() == [0, 2] and batch["skipped"] == 1


# --------------------------------------------------------------------------------------------
# webdataset
# --------------------------------------------------------------------------------------------

SHARDS, PER_SHARD, CORRUPT = 3, 5, 7


def jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (value, 10, 10)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    for s in range(SHARDS):
        with wds.TarWriter(str(out / f"s-{s:03d}.tar")) as sink:
            for j in range(PER_SHARD):
                n = s * PER_SHARD + j
                image = b"\xff\xd8\xff not a jpeg" if n == CORRUPT else jpeg(10 * n)
                sink.write({"__key__": f"{n:05d}", "jpg": image, "txt": f"sample {n}"})
    return out


def webdataset_loader(shard_dir: Path, workers=0, **options):
    data = data_spec(str(shard_dir / "s-{000..002}.tar"), workers=workers, shuffle_buffer=4)
    options = {"batch_size": 2, "train": True, "seed": 0, **options}
    return make_loader(data.train, data, to_tensor, sample_number, **options)


def seen(loader) -> list[int]:
    return [n for batch in loader for n in batch["texts"][:, 0].tolist()]


GOOD = sorted(set(range(SHARDS * PER_SHARD)) - {CORRUPT})


def test_webdataset_with_workers_sees_every_good_sample_once(shard_dir):
    loader = webdataset_loader(shard_dir, workers=2, train=False)
    assert loader.num_samples == 15 and len(loader) == 8  # counted from member names
    batches = list(loader)
    assert sorted(seen(batches)) == GOOD
    assert sum(b["skipped"] for b in batches) == 1  # the corrupt one, reported


def test_webdataset_ranks_partition_the_samples(shard_dir):
    per_rank = [seen(webdataset_loader(shard_dir, workers=2, train=False, rank=rank, world_size=2)) for rank in (0, 1)]
    assert sorted(per_rank[0] + per_rank[1]) == GOOD
    assert not set(per_rank[0]) & set(per_rank[1])


def test_webdataset_training_gives_every_rank_the_same_number_of_batches(shard_dir):
    for rank in (0, 1):
        loader = webdataset_loader(shard_dir, workers=2, rank=rank, world_size=2)
        batches = list(loader)
        # floor(15 / 2 ranks / 2 per batch) = 3, although one rank holds 1 shard and the other 2:
        # the rank with one shard (2 full batches) reads it again, reshuffled.
        assert len(loader) == 3 and len(batches) == 3
        assert all(len(b["texts"]) + b["skipped"] == 2 for b in batches)


def test_webdataset_images_and_indices(shard_dir):
    batches = list(webdataset_loader(shard_dir, train=False))
    pairs = {n: img for b in batches for n, img in zip(b["texts"][:, 0].tolist(), b["images"])}
    assert abs(pairs[12][0, 10, 10].item() * 255 - 120) < 4  # red channel written as 10 * n
    indices = [i for b in batches for i in b["index"].tolist()]
    assert len(set(indices)) == len(indices) == 14


def test_webdataset_shuffle_is_seeded_by_epoch(shard_dir):
    epoch0 = seen(webdataset_loader(shard_dir, workers=0))
    assert epoch0 == seen(webdataset_loader(shard_dir, workers=0))
    epoch1 = seen(webdataset_loader(shard_dir, workers=0, epoch=1))
    assert epoch0 != epoch1
    # 7 batches of 2 from 15 samples: at most one good sample left out, none repeated.
    assert len(set(epoch0)) == len(epoch0) >= 13 and set(epoch0) <= set(GOOD)
    assert epoch0 != sorted(epoch0)


@pytest.mark.parametrize("workers", [0, 2])
def test_webdataset_resume_skips_the_batches_already_seen(shard_dir, workers):
    def texts(loader):
        return [b["texts"][:, 0].tolist() for b in loader]

    full = texts(webdataset_loader(shard_dir, workers=workers, epoch=2))
    assert len(full) == 7
    resumed = webdataset_loader(shard_dir, workers=workers, epoch=2, start_batch=3)
    assert len(resumed) == 4
    assert texts(resumed) == full[3:]


def test_webdataset_needs_a_shard_per_rank(shard_dir):
    with pytest.raises(MmcliError, match="3 webdataset shards for 4 ranks"):
        webdataset_loader(shard_dir, rank=0, world_size=4)


def test_webdataset_size_from_the_spec(shard_dir):
    data = data_spec(str(shard_dir), shuffle_buffer=4)
    spec = SourceSpec(path=str(shard_dir), size=100)
    loader = make_loader(spec, data, to_tensor, sample_number, batch_size=5, train=True, seed=0, world_size=2)
    assert loader.num_samples == 100 and len(loader) == 10


# --------------------------------------------------------------------------------------------
# unusable data: no empty batch, skipped samples carried, empty sources end
# --------------------------------------------------------------------------------------------


def _tsv_with_broken(tmp_path: Path, n: int, broken: set[int]) -> DataSpec:
    for i in range(n):
        if i in broken:
            (tmp_path / f"{i}.png").write_bytes(b"not a png")
        else:
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "p.tsv").write_text("filepath\ttitle\n" + "".join(f"{i}.png\tc{i}\n" for i in range(n)))
    return data_spec(str(tmp_path / "p.tsv"))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_batch_without_one_decoded_image_is_dropped_and_its_skips_carried(tmp_path, workers):
    # batches of 2 in order: [0 1] all broken, [2 3] one broken, [4 5] all broken, [6 7] good,
    # [8 9] all broken (after the last yielded batch).
    data = _tsv_with_broken(tmp_path, 10, {0, 1, 3, 4, 5, 8, 9})
    data = data.model_copy(update={"workers": workers})
    loader = make_loader(data.train, data, to_tensor, caption_length, batch_size=2, train=False, seed=0)
    batches = list(loader)
    assert [b["index"].tolist() for b in batches] == [[2], [6, 7]]
    assert [b["skipped"] for b in batches] == [2 + 1, 2]  # since the previous yielded batch
    assert [b["batches"] for b in batches] == [2, 2]  # planned batches each stands for
    assert all(b["images"].shape[0] > 0 for b in batches)
    assert loader.skipped == 7  # the two broken ones after the last batch are counted too


def test_a_source_without_one_decodable_image_yields_no_batch(tmp_path):
    data = _tsv_with_broken(tmp_path, 6, set(range(6)))
    loader = make_loader(data.train, data, to_tensor, caption_length, batch_size=2, train=True, seed=0)
    assert len(loader) == 3  # planned
    assert list(loader) == [] and loader.skipped == 6


def _shards(out: Path, members) -> Path:
    out.mkdir()
    for s in range(2):
        with wds.TarWriter(str(out / f"s-{s}.tar")) as sink:
            for j in range(6):
                sink.write({"__key__": f"{s}-{j:03d}", **members(s * 6 + j)})
    return out


@pytest.mark.parametrize(
    "members",
    [
        lambda n: {"jpg": b"\xff\xd8\xff not a jpeg", "txt": f"sample {n}"},  # no image decodes
        lambda n: {"txt": f"sample {n}"},  # no image at all
        lambda n: {"jpg": jpeg(n)},  # no caption
    ],
    ids=["undecodable", "no-image", "no-caption"],
)
def test_webdataset_without_a_usable_sample_ends_with_an_empty_epoch(tmp_path, members):
    shards = _shards(tmp_path / "shards", members)
    data = data_spec(str(shards), shuffle_buffer=4)
    source = SourceSpec(path=str(shards), size=12)  # as a user would state it; the epoch plans 6 batches
    loader = make_loader(source, data, to_tensor, sample_number, batch_size=2, train=True, seed=0)
    assert len(loader) == 6
    batches = list(loader)  # refilling passes stop once a pass yields nothing
    assert batches == []
    assert loader.skipped >= 12  # every sample of the first pass at least


def test_webdataset_skips_are_carried_into_the_next_batch(tmp_path):
    # One shard in order: samples 0-3 unusable, then good ones; batches of 2 without shuffling.
    shards = _shards(tmp_path / "shards", lambda n: {"jpg": jpeg(n) if n % 6 >= 4 else b"bad", "txt": f"sample {n}"})
    data = data_spec(str(shards / "s-0.tar"), shuffle_buffer=1)
    loader = make_loader(data.train, data, to_tensor, sample_number, batch_size=2, train=False, seed=0)
    (batch,) = list(loader)
    assert batch["texts"][:, 0].tolist() == [4, 5] and batch["skipped"] == 4 and batch["batches"] == 3
