"""The ``captioning`` task of ``mmcli eval``: caption each image of an image–caption source with a
CoCa run, score the captions against the references (BLEU-1…4, ROUGE-L, CIDEr-D), and on a
shapes JSONL read each caption back with the dataset's grammar against the scene it describes
(object precision/recall/F1, relation accuracy, exact scene).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmcli.data.sources import read_records
from mmcli.errors import MmcliError
from mmcli.evaluation.captioning_metrics import corpus_metrics, scene_scores
from mmcli.io import atomic_write_text
from mmcli.spec import SourceSpec


def read_references(spec) -> tuple[list[str], dict[str, list[str]], dict[str, dict]]:
    """``(image paths in first-seen order, references per image, scene per image)`` of a source;
    an image listed on several lines has several references. Scenes are the records' own
    ``objects``/``relations`` (a shapes JSONL), empty for other data."""
    source = SourceSpec(
        path=spec.path, format=spec.format, image_key=spec.image_key, text_key=spec.text_key, separator=spec.separator
    )
    references: dict[str, list[str]] = {}
    scenes: dict[str, dict] = {}
    for record in read_records(source):
        references.setdefault(record.image, []).append(record.text)
        meta = record.meta or {}
        if isinstance(meta.get("objects"), list) and isinstance(meta.get("relations"), list):
            scenes.setdefault(record.image, meta)
    return list(references), references, scenes


def seed_keys(paths: list[str]) -> dict[str, str]:
    """Each image's key for sampling seeds: its path relative to the folder holding every image,
    as ``mmcli caption`` keys the images of a dataset file (so a moved dataset draws the same)."""
    import os

    root = os.path.commonpath([os.path.dirname(os.path.realpath(p)) for p in paths]) if paths else ""
    return {p: os.path.relpath(os.path.realpath(p), root).replace(os.sep, "/") for p in paths}


def caption_paths(loaded, decoder, paths: list[str], settings, *, seed: int, batch_size: int, workers: int, device):
    """``({path: Caption}, [(path, reason)])``: the captions by ``decoder`` (a
    :class:`~mmcli.models.captioning.CaptionDecoder` of ``loaded``) of the usable image files ``paths``
    and the unusable ones, decoded as ``mmcli caption`` decodes by default (the model's transform,
    JPEGs in draft mode where that loses nothing)."""
    import torch

    from mmcli.models.captioning import item_seed
    from mmcli.retrieval.embedding import ImageItems, Item, draft_size, image_loader

    keys = seed_keys(paths)
    dataset = ImageItems([Item(p, p) for p in paths], loaded.preprocess, draft=draft_size(loaded.preprocess))
    captions, bad = {}, []
    with torch.inference_mode():
        for batch in image_loader(dataset, batch_size=batch_size, workers=workers):
            bad += batch["bad"]
            if batch["pixels"] is None:
                continue
            seeds = [item_seed(seed, keys[path]) for path in batch["keys"]]
            found = decoder.decode(batch["pixels"].to(device), settings, seeds=seeds)
            captions.update(zip(batch["keys"], found))
    return captions, bad


def evaluate_captioning(loaded, spec, *, device, batch_size: int, workers: int, predictions_path: Path, notes: list):
    """The captioning metrics of ``loaded`` (a CoCa run) on the source of ``spec`` (a
    :class:`~mmcli.spec.CaptioningTaskSpec`); every caption is written to ``predictions_path``."""
    import json

    from mmcli.models.captioning import CaptionDecoder, DecodeSettings, SettingError, require_captioner

    require_captioner(loaded, f"captioning: model {loaded.ref}")
    try:
        settings = DecodeSettings(
            decoding=spec.decoding,
            beams=spec.beams,
            top_p=spec.top_p,
            temperature=spec.temperature,
            max_tokens=spec.max_tokens,
            min_tokens=spec.min_tokens,
        )
        decoder = CaptionDecoder.of(loaded.model)
        decoder.check(settings)
    except SettingError as exc:
        raise MmcliError(f"captioning.{exc}") from None
    paths, references, scenes = read_references(spec)
    found, bad = caption_paths(
        loaded, decoder, paths, settings, seed=spec.seed, batch_size=batch_size, workers=workers, device=device
    )
    decode = loaded.tokenizer.decode
    predicted = {p: decode(list(c.tokens)).strip() for p, c in found.items()}
    if bad:
        notes.append(f"captioning: {len(bad)} unreadable images left out, e.g. {bad[0][0]} ({bad[0][1]})")
    rows = [
        {"image": p, "caption": predicted[p], "score": round(found[p].score, 4), "references": references[p]}
        for p in paths
        if p in predicted
    ]
    atomic_write_text(predictions_path, "".join(json.dumps(r) + "\n" for r in rows))
    try:
        out: dict[str, Any] = corpus_metrics(predicted, {p: references[p] for p in predicted})
    except ValueError as exc:  # a reference with no words
        raise MmcliError(f"captioning: {spec.path}: {exc}") from None
    out["skipped"] = len(bad)
    out["decoding"] = settings.decoding
    if scenes:
        missing = [p for p in predicted if p not in scenes]
        if missing:
            notes.append(f"captioning: {len(missing)} images have no scene record; the scene score leaves them out")
        scored = [p for p in predicted if p in scenes]  # unreadable images are not scored
        out["scene"] = scene_scores({p: predicted[p] for p in scored}, {p: scenes[p] for p in scored})
    out["examples"] = rows[: spec.examples]
    return out
