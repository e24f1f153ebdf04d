"""Scoring a text-to-image generator: the denoising loss on held-out images (during training) and,
for ``mmcli eval``'s ``generation`` task, what the pictures show.

A generated picture is judged by reading it (:func:`mmcli.data.scenes.read_scene`: colours, blobs,
shapes, boxes, relations) and comparing the scene read with the prompt read by the dataset's
grammar (:func:`mmcli.data.shapes.parse_caption`), and by the base run's own dual encoder: the
CLIP score of the picture with its prompt and whether the prompt is the nearest of all the split's
captions (prompt R@1).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmcli import io
from mmcli.data.batches import to_device
from mmcli.data.shapes import parse_caption
from mmcli.errors import MmcliError
from mmcli.evaluation.captioning_metrics import relation_is_true
from mmcli.models.generation import (
    SampleSettings,
    draw_all,
    encode_prompts,
    noise_schedule,
    predict,
    prompt_tokens,
    require_generator,
)

VALIDATION_TIMESTEPS = 8
"""Noise levels each validation image is scored at (evenly spread over the schedule)."""


def denoising_validator(loader, device, *, seed: int) -> Callable:
    """A validation function for the training loop: the prediction error (noise or velocity) on held-out images
    at :data:`VALIDATION_TIMESTEPS` evenly spread noise levels, with noise drawn from ``seed``
    alone (the same draws at every validation, so the figures compare), for the trained weights
    (``val_loss``) and, when the run keeps one, their moving average (``val_loss_ema``)."""

    def validate(model) -> dict[str, Any]:
        generator = model.generator
        levels = torch.linspace(0, generator.cfg["timesteps"] - 1, VALIDATION_TIMESTEPS).round().long()
        draws = torch.Generator().manual_seed(seed)
        schedule = noise_schedule(generator.cfg, "ddpm")
        sums = {"val_loss": 0.0, "val_loss_ema": 0.0}
        count = 0
        for batch in loader:
            batch = to_device(batch, device)
            images = batch["images"]
            prompt = encode_prompts(model, batch["texts"])
            for level in levels.tolist():
                noise = torch.randn(images.shape, generator=draws).to(device)
                steps = torch.full((images.shape[0],), level, device=device, dtype=torch.long)
                noisy = schedule.add_noise(images, noise, steps)
                target = generator.target(schedule, images, noise, steps)
                sums["val_loss"] += _error(generator.unet, noisy, steps, prompt, target)
                if generator.ema_decay is not None:
                    sums["val_loss_ema"] += _error(generator.ema, noisy, steps, prompt, target)
            count += images.shape[0] * len(levels)
        model.train()
        out = {
            k: round(v / max(count, 1), 6)
            for k, v in sums.items()
            if generator.ema_decay is not None or k == "val_loss"
        }
        return {**out, "val_images": count // len(levels)}

    return validate


def _error(unet, noisy, steps, prompt, target) -> float:
    predicted = predict(unet, noisy, steps, prompt).float()
    return float(F.mse_loss(predicted, target, reduction="sum")) / target[0].numel()


# --------------------------------------------------------------------------------------------
# what a picture shows
# --------------------------------------------------------------------------------------------


def _objects(scene: dict) -> list[tuple[str, str]]:
    return [(o["color"], o["shape"]) for o in scene["objects"]]


def picture_verdict(prompt: str, scene: dict) -> dict[str, Any]:
    """How the scene read from one picture (a :func:`~mmcli.data.scenes.scene_record`) matches its
    prompt (a shapes caption): ``named`` / ``drawn`` / ``hits`` count (colour, shape) objects as
    multisets (two red circles drawn for "a red circle" is one hit, one extra); ``relation``: for a
    prompt stating a relation, whether it holds between the drawn objects (``None`` otherwise);
    ``exact``: exactly the named objects, each once, and the relation if one is stated."""
    parsed = parse_caption(prompt)
    if parsed is None:
        raise ValueError(f"{prompt!r}: not a caption of the shapes grammar")
    named, drawn = Counter(parsed.objects), Counter(_objects(scene))
    hits = sum((named & drawn).values())
    relation = relation_is_true(parsed, scene) if parsed.relation is not None else None
    exact = named == drawn and relation is not False
    return {
        "named": sum(named.values()),
        "drawn": sum(drawn.values()),
        "hits": hits,
        "relation": relation,
        "exact": bool(exact),
    }


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def verdict_scores(verdicts: list[dict[str, Any]]) -> dict[str, float | int | None]:
    """Corpus scores of :func:`picture_verdict` rows: object precision (hits / drawn), recall
    (hits / named) and F1, micro-averaged; relation accuracy over the pictures whose prompt
    states a relation; exact-scene accuracy; the counts."""
    hits = sum(v["hits"] for v in verdicts)
    drawn = sum(v["drawn"] for v in verdicts)
    named = sum(v["named"] for v in verdicts)
    relations = [v["relation"] for v in verdicts if v["relation"] is not None]
    return {
        "object_precision": _ratio(hits, drawn),
        "object_recall": _ratio(hits, named),
        "object_f1": _ratio(2 * hits, drawn + named),
        "relation_accuracy": _ratio(sum(relations), len(relations)),
        "exact_scene": _ratio(sum(v["exact"] for v in verdicts), len(verdicts)),
        "pictures": len(verdicts),
        "relation_prompts": len(relations),
    }


# --------------------------------------------------------------------------------------------
# the eval task
# --------------------------------------------------------------------------------------------

SUBSETS = {"all": lambda n: True, "single_object": lambda n: n == 1}
"""Prompt subsets each row is scored on, by the number of objects the prompt names."""


def distinct_captions(records: list[dict[str, Any]]) -> tuple[list[str], dict[str, str]]:
    """The distinct captions of a shapes split in file order, and each one's first image."""
    first: dict[str, str] = {}
    for record in records:
        first.setdefault(record["caption"], record["image"])
    return list(first), first


@torch.no_grad()
def clip_scores(
    loaded, pictures, prompt_rows: list[int], caption_features: torch.Tensor, device
) -> dict[str, list[float]]:
    """Per picture, with the run's own dual encoder: its CLIP score, ``100 · max(cos(picture,
    prompt), 0)`` (the torchmetrics convention), and its prompt R@1 hit — whether its nearest
    caption among all the split's distinct captions (``caption_features``, normalised) is its
    prompt (``prompt_rows[i]``: the row of picture i's prompt there)."""
    scores, hits = [], []
    for start in range(0, len(pictures), 256):
        batch = torch.stack([loaded.preprocess(p) for p in pictures[start : start + 256]]).to(device)
        similarity = loaded.model.encode_image(batch).float() @ caption_features.T
        rows = torch.tensor(prompt_rows[start : start + 256], device=similarity.device)
        own = similarity[torch.arange(len(rows)), rows]
        scores += (100 * own.clamp(min=0)).tolist()
        hits += (similarity.argmax(dim=1) == rows).float().tolist()
    return {"clip_score": scores, "prompt_r1": hits}


def _row_scores(verdicts, prompts_of, object_counts, clip: dict[str, list[float]]) -> dict[str, Any]:
    out = {}
    for name, keep in SUBSETS.items():
        mask = [keep(object_counts[p]) for p in prompts_of]
        out[name] = {
            **verdict_scores([v for v, m in zip(verdicts, mask, strict=True) if m]),
            **_masked_mean(clip, mask),
        }
    return out


def _masked_mean(per_picture: dict[str, list[float]], mask: list[bool]) -> dict[str, float | None]:
    return {
        k: (float(np.mean([x for x, m in zip(v, mask, strict=True) if m])) if any(mask) else None)
        for k, v in per_picture.items()
    }


def evaluate_generation(loaded, spec, *, device, batch_size: int, output) -> dict[str, Any]:
    """The ``generation`` eval task (see :class:`~mmcli.spec.evaluate.GenerationTaskSpec`): rows
    ``real``, ``conditional`` and (with ``unconditional``) ``unconditional``, each scored on
    ``all`` prompts and on ``single_object`` ones; every picture's verdict goes to
    ``<output>-generated.jsonl`` and the first prompts' pictures to ``<output>-generated.png``."""
    require_generator(loaded, "model:")
    captions, first_image = _prompts_of_split(spec.path)
    prompts = captions[: spec.prompts] if spec.prompts is not None else captions
    tokens = prompt_tokens(loaded, captions, lambda i: f"{spec.path}: caption {i + 1}")
    with torch.no_grad():
        caption_features = torch.cat(
            [loaded.model.encode_text(tokens[s : s + 1024].to(device)).float() for s in range(0, len(tokens), 1024)]
        )
    index = {c: i for i, c in enumerate(captions)}
    row_settings = {"conditional": SampleSettings(spec.sampler, spec.steps, spec.guidance, spec.seed)}
    if spec.unconditional:
        row_settings["unconditional"] = SampleSettings(spec.sampler, spec.steps, 0.0, spec.seed)
    rows = {"real": PictureRow(prompts, [_open_rgb(first_image[p]) for p in prompts], [0] * len(prompts))}
    for kind, settings in row_settings.items():
        rows[kind] = _draw_row(
            loaded, prompts, tokens[[index[p] for p in prompts]], spec.samples, settings, device, batch_size
        )

    object_counts = {p: len(parse_caption(p).objects) for p in prompts}
    metrics: dict[str, Any] = {}
    picture_rows = []
    for kind, row in rows.items():
        row.read()
        clip = clip_scores(loaded, row.pictures, [index[p] for p in row.prompts], caption_features, device)
        metrics[kind] = _row_scores(row.verdicts, row.prompts, object_counts, clip)
        if row.seconds is not None:
            metrics[kind]["images_per_s"] = round(len(row.pictures) / row.seconds, 2)
        picture_rows += row.records(kind)
    metrics["settings"] = {**row_settings["conditional"].as_dict(), "samples": spec.samples, "prompts": len(prompts)}

    out = Path(output)
    rows_path = out.with_name(out.stem + "-generated.jsonl")
    io.atomic_write_text(rows_path, "".join(json.dumps(r) + "\n" for r in picture_rows))
    metrics["pictures_file"] = str(rows_path)
    if spec.sheet_prompts:
        sheet = out.with_name(out.stem + "-generated.png")
        _write_sheet(sheet, rows, row_settings, spec, loaded.ref)
        metrics["sheet"] = str(sheet)
    return metrics


def _prompts_of_split(path: str) -> tuple[list[str], dict[str, str]]:
    from mmcli.data.examples import read_shapes_jsonl

    captions, first_image = distinct_captions(read_shapes_jsonl(path))
    unreadable = [c for c in captions if parse_caption(c) is None]
    if unreadable:
        raise MmcliError(f"{path}: caption {unreadable[0]!r} is not of the shapes grammar (the scene score reads it)")
    return captions, first_image


def _open_rgb(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


class PictureRow:
    """One row of the table: its pictures, each with its prompt and sample number, how long they
    took to draw, and (after :meth:`read`) what the scene reader saw and its verdict."""

    def __init__(self, prompts: list[str], pictures: list[Image.Image], samples: list[int], seconds=None):
        self.prompts, self.pictures, self.samples, self.seconds = prompts, pictures, samples, seconds
        self.scenes: list[dict] = []
        self.verdicts: list[dict] = []

    def read(self) -> None:
        from mmcli.data.scenes import read_scene, scene_record

        self.scenes = [scene_record(read_scene(p)) for p in self.pictures]
        self.verdicts = [picture_verdict(p, s) for p, s in zip(self.prompts, self.scenes, strict=True)]

    def records(self, kind: str) -> list[dict[str, Any]]:
        return [
            {"kind": kind, "prompt": p, "sample": j, "read": scene["objects"], **verdict}
            for p, j, scene, verdict in zip(self.prompts, self.samples, self.scenes, self.verdicts, strict=True)
        ]


def _draw_row(loaded, prompts, tokens, samples: int, settings, device, batch_size: int) -> PictureRow:
    start = time.perf_counter()
    drawn = draw_all(loaded, prompts, samples, settings, device=device, batch_size=batch_size, tokens=tokens)
    seconds = time.perf_counter() - start
    flat = [(p, j, x) for p, pictures in zip(prompts, drawn, strict=True) for j, x in enumerate(pictures)]
    return PictureRow([p for p, _, _ in flat], [x for _, _, x in flat], [j for _, j, _ in flat], seconds)


def _write_sheet(path: Path, rows: dict[str, PictureRow], row_settings: dict, spec, ref: str) -> None:
    """The first prompts: the real image, then each generated row's samples, framed by verdict."""
    from mmcli.viz.generation import SheetRow, prompt_sheet

    sheet_rows = []
    for i, prompt in enumerate(rows["real"].prompts[: spec.sheet_prompts]):
        pictures, labels, verdicts = [rows["real"].pictures[i]], ["real"], [rows["real"].verdicts[i]["exact"]]
        for kind, settings in row_settings.items():
            span = range(i * spec.samples, (i + 1) * spec.samples)
            pictures += [rows[kind].pictures[k] for k in span]
            labels += [f"w={settings.guidance:g} #{k - span.start + 1}" for k in span]
            verdicts += [rows[kind].verdicts[k]["exact"] for k in span]
        sheet_rows.append(SheetRow(prompt, pictures, labels, verdicts))
    guidance = " and ".join(f"w={s.guidance:g}" for s in row_settings.values())
    title = (
        f"{ref}: real, then {spec.samples} per row at {guidance} ({spec.sampler}, {spec.steps} steps); "
        "green: the scene reader sees exactly the prompt"
    )
    prompt_sheet(sheet_rows, path, title=title)
