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
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

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
    caption: str = ""
    """The image's own caption (the text of the weakly supervised region–concept alignment)."""


def read_shapes_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a shapes JSONL file, with one-line errors naming the file and line."""
    path = Path(path)
    records = []
    for number, record in read_jsonl_rows(path):
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


def apply_box_file(records: list[dict[str, Any]], path: str | Path) -> list[dict[str, Any]]:
    """Records whose object boxes are replaced by those of a box JSONL file (``{"id": ...,
    "boxes": [[x0, y0, x1, y1], ...]}`` per line, e.g. a detector's output); records the file
    does not list are unchanged. The replaced objects carry boxes only (no labels)."""
    boxes: dict[str, list] = {}
    for number, row in read_jsonl_rows(path):
        if not isinstance(row.get("boxes"), list) or "id" not in row:
            raise MmcliError(f'{path}: line {number}: expected {{"id": ..., "boxes": [[x0, y0, x1, y1], ...]}}')
        if any(len(b) != 4 for b in row["boxes"]):
            raise MmcliError(f"{path}: line {number}: every box needs 4 numbers (x0, y0, x1, y1)")
        boxes[str(row["id"])] = row["boxes"]
    return [{**r, "objects": [{"box": b} for b in boxes[r["id"]]]} if r["id"] in boxes else r for r in records]


def read_jsonl_rows(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSONL file; one-line errors name
    the file and line."""
    path = Path(path)
    if not path.is_file():
        raise MmcliError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise MmcliError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
    return rows


def question_examples(records: list[dict[str, Any]]) -> list[Example]:
    """Every question of every record, in file order (id ``<record id>-q<k>``)."""
    out = []
    for record in records:
        for k, q in enumerate(record.get("questions", [])):
            out.append(
                Example(
                    f"{record['id']}-q{k}",
                    record["image"],
                    q["question"],
                    q["answer"],
                    q["type"],
                    _boxes(record),
                    record["caption"],
                )
            )
    return out


def matching_examples(records: list[dict[str, Any]], seed: int) -> list[Example]:
    """Each image with its own caption (``yes``) and with the caption of another image that reads
    differently (``no``); the other image is drawn from ``seed``, so the pairs are fixed."""
    rng = random.Random(mix_seed(seed, len(records)))
    several = len({r["caption"] for r in records}) > 1
    out = []
    for record in records:
        out.append(
            Example(
                f"{record['id']}-match",
                record["image"],
                record["caption"],
                "yes",
                "match",
                _boxes(record),
                record["caption"],
            )
        )
        if several:
            text = _draw_other(rng, records, record)
            out.append(
                Example(
                    f"{record['id']}-mismatch",
                    record["image"],
                    text,
                    "no",
                    "mismatch",
                    _boxes(record),
                    record["caption"],
                )
            )
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
    not among ``labels``), boxes in pixels of the image tensor; an undecodable image gives ``None``.

    With ``concepts`` each example also carries the token spans of the key concepts of its text
    and of its caption, and the caption's tokens (what graph fusion and its alignment loss read).
    Boxes are mapped from the file's pixels to the tensor's assuming the preprocessing resizes
    the shorter side and crops the centre (open_clip's evaluation transform).
    """

    def __init__(
        self,
        examples: list[Example],
        labels: list[str],
        image_fn: Callable,
        tokenize: Callable,
        max_pixels: int = 89_478_485,
        concepts: bool = False,
    ):
        self.examples, self.image_fn, self.tokenize = examples, image_fn, tokenize
        self.label_ids = {label: i for i, label in enumerate(labels)}
        self.max_pixels, self.concepts = max_pixels, concepts

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        e = self.examples[index]
        try:
            image = load_image(e.image, max_pixels=self.max_pixels)
        except BadImage:
            return None
        pixels = self.image_fn(image)
        item = {
            "image": pixels,
            "text": self.tokenize(e.text),
            "index": index,
            "label": self.label_ids.get(e.label, IGNORE_INDEX),
            "boxes": input_boxes(e.boxes, image.size, tuple(pixels.shape[-2:])),
        }
        if self.concepts:
            spans, grounded = text_concepts(e.text)
            caption_spans, caption_grounded = text_concepts(e.caption or e.text)
            item.update(
                concept_spans=spans,
                concept_grounded=grounded,
                caption=self.tokenize(e.caption or e.text),
                caption_spans=caption_spans,
                caption_grounded=caption_grounded,
            )
        return item


def input_boxes(boxes: tuple, image_wh: tuple[int, int], input_hw: tuple[int, int]) -> tuple:
    """``boxes`` of an image of ``image_wh`` pixels in the pixels of the ``input_hw`` tensor made
    by resizing its shorter side to the input's and cropping the centre."""
    if not boxes:
        return ()
    (width, height), (out_h, out_w) = image_wh, input_hw
    scale = max(out_h / height, out_w / width)
    dx, dy = (width * scale - out_w) / 2, (height * scale - out_h) / 2
    return tuple((x0 * scale - dx, y0 * scale - dy, x1 * scale - dx, y1 * scale - dy) for x0, y0, x1, y1 in boxes)


@lru_cache(maxsize=65536)
def text_concepts(text: str) -> tuple[tuple[tuple[int, int], ...], tuple[bool, ...]]:
    """Token spans of the key concepts of ``text`` and, per concept, whether one region can show
    it (objects and attributes; a relation is between regions). Cached: questions and captions
    repeat."""
    from mmcli.data.concepts import concept_token_spans, extract_concepts

    concepts = extract_concepts(text)
    return tuple(concept_token_spans(text, concepts=concepts)), tuple(c.grounded for c in concepts)


def _pad_rows(rows: list[tuple], width: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example tuples of ``width`` numbers as a zero-padded ``[B, most, width]`` and a mask."""
    most = max((len(r) for r in rows), default=0)
    values = torch.zeros(len(rows), most, width, dtype=dtype)
    mask = torch.zeros(len(rows), most, dtype=torch.bool)
    for row, entries in enumerate(rows):
        if entries:
            values[row, : len(entries)] = torch.tensor(entries, dtype=dtype)
            mask[row, : len(entries)] = True
    return values, mask


def _pad_flags(rows: list[tuple[bool, ...]]) -> torch.Tensor:
    """Per-example flags as a ``[B, most]`` bool tensor, False on padding."""
    flags = torch.zeros(len(rows), max((len(r) for r in rows), default=0), dtype=torch.bool)
    for row, entries in enumerate(rows):
        flags[row, : len(entries)] = torch.tensor(entries, dtype=torch.bool)
    return flags


def collate_examples(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack examples; ``boxes`` [B, R, 4] (float, zero-padded) with ``box_mask`` [B, R]; with
    concepts also ``concept_spans`` [B, C, 2] with ``concept_mask``, ``captions`` [B, L] and
    ``caption_spans``/``caption_concept_mask``, and ``concept_grounded``/``caption_concept_grounded``
    [B, C] (True for a concept one region can show: not a relation; False on padding);
    ``skipped``: the undecodable items left out. A batch of none but undecodable items has zero
    rows; :func:`example_loader` never yields it (its ``skipped`` count moves on to the next)."""
    kept = [item for item in items if item is not None]
    boxes, box_mask = _pad_rows([item["boxes"] for item in kept], 4, torch.float32)
    batch = {
        "images": torch.stack([item["image"] for item in kept]) if kept else torch.empty(0, 3, 0, 0),
        "texts": torch.stack([item["text"] for item in kept]).long() if kept else torch.empty(0, 0, dtype=torch.long),
        "labels": torch.tensor([item["label"] for item in kept], dtype=torch.long),
        "index": torch.tensor([item["index"] for item in kept], dtype=torch.long),
        "boxes": boxes,
        "box_mask": box_mask,
        "skipped": len(items) - len(kept),
    }
    if kept and "concept_spans" in kept[0]:
        batch["concept_spans"], batch["concept_mask"] = _pad_rows([i["concept_spans"] for i in kept], 2, torch.long)
        batch["captions"] = torch.stack([item["caption"] for item in kept]).long()
        spans = [item["caption_spans"] for item in kept]
        batch["caption_spans"], batch["caption_concept_mask"] = _pad_rows(spans, 2, torch.long)
        batch["concept_grounded"] = _pad_flags([item["concept_grounded"] for item in kept])
        batch["caption_concept_grounded"] = _pad_flags([item["caption_grounded"] for item in kept])
    return batch


def example_loader(
    dataset: ExampleDataset,
    *,
    batch_size: int,
    train: bool,
    seed: int,
    epoch: int = 0,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
):
    """Batches of ``dataset`` for one rank and epoch (the same order rule as pretraining); as in
    pretraining (:class:`~mmcli.data.batches.PairLoader`) no yielded batch is empty and each says
    under ``skipped`` how many examples were left out since the one before."""
    batches = rank_batches(
        len(dataset), batch_size=batch_size, train=train, seed=seed, epoch=epoch, rank=rank, world_size=world_size
    )[start_batch:]
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate_examples,
        pin_memory=torch.cuda.is_available(),
    )
    return PairLoader(loader, len(batches), len(dataset))
