"""Downstream examples from the shapes dataset's JSONL files: questions (VQA) and matching pairs (ITM).

Each example is an image, a text (a question, or a caption that may or may not match), a label
(an answer id, or 1/0 for match/no match), and the image's object boxes, carried to the fusion
module as a padded tensor with a mask for strategies that reason over regions.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from mmcli.data.batches import PairLoader, mix_seed, rank_batches
from mmcli.data.images import BadImage, load_image
from mmcli.data.masking import IGNORE_INDEX
from mmcli.errors import MmcliError


@dataclass(frozen=True)
class Example:
    """One downstream example: ``label`` is an answer (VQA) or ``"yes"``/``"no"`` (ITM)."""

    id: str
    image: str
    """Absolute image path."""
    text: str
    label: str
    type: str
    """The question type (``color``, ``count``, …), or ``match``/``mismatch`` for ITM."""
    boxes: tuple[tuple[int, int, int, int], ...] = field(default=(), hash=False)


def read_shapes_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a shapes JSONL file, with one-line errors naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise MmcliError(f"{path}: no such file")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MmcliError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
            missing = [k for k in ("id", "image", "caption") if k not in record]
            if missing:
                raise MmcliError(f"{path}: line {number}: missing {', '.join(missing)} (not a shapes JSONL file?)")
            record["image"] = os.path.abspath(path.parent / record["image"])
            records.append(record)
    if not records:
        raise MmcliError(f"{path}: no records")
    return records


def _boxes(record: dict[str, Any]) -> tuple:
    return tuple(tuple(o["box"]) for o in record.get("objects", []))


def question_examples(records: list[dict[str, Any]]) -> list[Example]:
    """Every question of every record, in file order (id ``<record id>-q<k>``)."""
    out = []
    for record in records:
        for k, q in enumerate(record.get("questions", [])):
            out.append(Example(f"{record['id']}-q{k}", record["image"], q["question"], q["answer"], q["type"], _boxes(record)))
    return out


def matching_examples(records: list[dict[str, Any]], seed: int) -> list[Example]:
    """Each image with its own caption (``yes``) and with the caption of another image that reads
    differently (``no``); the other image is drawn from ``seed``, so the pairs are fixed."""
    rng = random.Random(mix_seed(seed, len(records)))
    several = len({r["caption"] for r in records}) > 1
    out = []
    for record in records:
        out.append(Example(f"{record['id']}-match", record["image"], record["caption"], "yes", "match", _boxes(record)))
        if several:
            text = _draw_other(rng, records, record)
            out.append(Example(f"{record['id']}-mismatch", record["image"], text, "no", "mismatch", _boxes(record)))
    return out


def _draw_other(rng: random.Random, records: list[dict[str, Any]], record: dict[str, Any]) -> str:
    # Rejection sampling: a different caption is usually found in a draw or two, never scanning all.
    while True:
        caption = records[rng.randrange(len(records))]["caption"]
        if caption != record["caption"]:
            return caption


def answer_vocabulary(examples: list[Example]) -> list[str]:
    """The sorted set of the examples' answers (the classifier's classes)."""
    return sorted({e.label for e in examples})


def answer_prior(examples: list[Example]) -> dict[str, dict[str, int]]:
    """Answer counts overall (``"*"``) and per question type, for majority-answer baselines."""
    prior: dict[str, Counter] = {"*": Counter()}
    for e in examples:
        prior["*"][e.label] += 1
        prior.setdefault(e.type, Counter())[e.label] += 1
    return {kind: dict(counts) for kind, counts in prior.items()}


class ExampleDataset(Dataset):
    """Decoded examples: image tensor, text tokens, label id (``IGNORE_INDEX`` when the label is
    not among ``labels``); an undecodable image gives ``None``."""

    def __init__(self, examples: list[Example], labels: list[str], image_fn: Callable, tokenize: Callable,
                 max_pixels: int = 89_478_485):
        self.examples, self.image_fn, self.tokenize = examples, image_fn, tokenize
        self.label_ids = {label: i for i, label in enumerate(labels)}
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        e = self.examples[index]
        try:
            image = load_image(e.image, max_pixels=self.max_pixels)
        except BadImage:
            return None
        return {"image": self.image_fn(image), "text": self.tokenize(e.text), "index": index,
                "label": self.label_ids.get(e.label, IGNORE_INDEX), "boxes": e.boxes}


def collate_examples(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack examples; ``boxes`` [B, R, 4] (float, zero-padded) with ``box_mask`` [B, R]."""
    kept = [item for item in items if item is not None]
    most = max((len(item["boxes"]) for item in kept), default=0)
    boxes = torch.zeros(len(kept), most, 4)
    box_mask = torch.zeros(len(kept), most, dtype=torch.bool)
    for row, item in enumerate(kept):
        if item["boxes"]:
            boxes[row, : len(item["boxes"])] = torch.tensor(item["boxes"], dtype=torch.float32)
            box_mask[row, : len(item["boxes"])] = True
    return {
        "images": torch.stack([item["image"] for item in kept]) if kept else torch.empty(0, 3, 0, 0),
        "texts": torch.stack([item["text"] for item in kept]).long() if kept else torch.empty(0, 0, dtype=torch.long),
        "labels": torch.tensor([item["label"] for item in kept], dtype=torch.long),
        "index": torch.tensor([item["index"] for item in kept], dtype=torch.long),
        "boxes": boxes,
        "box_mask": box_mask,
        "skipped": len(items) - len(kept),
    }


def example_loader(dataset: ExampleDataset, *, batch_size: int, train: bool, seed: int, epoch: int = 0,
                   start_batch: int = 0, rank: int = 0, world_size: int = 1, workers: int = 0):
    """Batches of ``dataset`` for one rank and epoch (the same order rule as pretraining)."""
    batches = rank_batches(len(dataset), batch_size=batch_size, train=train, seed=seed, epoch=epoch,
                           rank=rank, world_size=world_size)[start_batch:]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_examples,
                        pin_memory=torch.cuda.is_available())
    return PairLoader(loader, len(batches), len(dataset))
