"""Pictures of a graph fusion's region–concept alignment (``mmcli fuse --explain DIR``).

Each picture is a validation image, upscaled so that a person can read it, with every region's
box drawn in its own colour and labelled with the caption concepts the region aligns with best
and their alignment weights; the caption is written under the image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

BOX_COLOURS = ((0, 0, 0), (255, 0, 255), (0, 160, 160), (110, 110, 110), (130, 70, 0), (0, 0, 128))
"""Box colours by region index: dark or unusual, so a box stands out from the light background
and from the shapes' own colours."""

LINE = 2
"""Box outline width in pixels of the upscaled picture."""


def draw_explanation(
    image: Image.Image,
    boxes: list[tuple[float, float, float, float]],
    labels: list[list[tuple[str, float]]],
    caption: str = "",
    scale: int = 6,
) -> Image.Image:
    """The image upscaled ``scale`` times (nearest neighbour: the pixels stay crisp), each box
    (``(x0, y0, x1, y1)`` in the image's pixels, ``x1``/``y1`` exclusive) outlined in
    ``BOX_COLOURS[i]`` and labelled with ``labels[i]`` (``(concept, weight)`` pairs), and the
    caption on a white strip below."""
    font = ImageFont.load_default()
    width, height = image.width * scale, image.height * scale
    strip = 4 + 14 * max(1, len(_wrap(caption, width)))
    canvas = Image.new("RGB", (width, height + strip), (255, 255, 255))
    canvas.paste(image.convert("RGB").resize((width, height), Image.NEAREST), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for index, (box, pairs) in enumerate(zip(boxes, labels)):
        colour = BOX_COLOURS[index % len(BOX_COLOURS)]
        x0, y0, x1, y1 = (round(v * scale) for v in box)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=LINE)
        text = "\n".join(f"{concept} {weight:.2f}" for concept, weight in pairs)
        _label(draw, (x0, y0), text, colour, font, (width, height))
    for row, line in enumerate(_wrap(caption, width)):
        draw.text((4, height + 2 + 14 * row), line, fill=(0, 0, 0), font=font)
    return canvas


def _label(draw: ImageDraw.ImageDraw, corner: tuple[int, int], text: str, colour, font, bounds) -> None:
    """Text on a filled box of the region's colour (dark text on light colours): above the box's
    top-left ``corner`` where it fits, so that it hides the box's content least; kept inside."""
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    above = corner[1] - (bottom - top) - LINE - 2
    at = (corner[0] + 1, above if above >= 1 else corner[1] + LINE + 1)
    left, top, right, bottom = draw.multiline_textbbox(at, text, font=font)
    dx, dy = min(0, bounds[0] - right - 1), min(0, bounds[1] - bottom - 1)
    left, top, right, bottom = left + dx, top + dy, right + dx, bottom + dy
    draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=colour)
    ink = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)
    draw.multiline_text((at[0] + dx, at[1] + dy), text, fill=ink, font=font)


def _wrap(text: str, width: int, char_width: int = 6) -> list[str]:
    """``text`` cut into lines of at most ``width`` pixels of the default font."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > max(1, width // char_width):
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def best_concepts(alignment: torch.Tensor, concepts: list[str], top: int = 2) -> list[list[tuple[str, float]]]:
    """For each region (row of ``alignment`` [R, C]), its ``top`` concepts by weight, best first;
    concepts of weight 0 (relations, which are no region's alignment) are left out."""
    if not concepts:
        return [[] for _ in range(len(alignment))]
    weights, index = alignment[:, : len(concepts)].topk(min(top, len(concepts)), dim=1)
    return [
        [(concepts[j], round(float(w), 4)) for w, j in zip(ws, js) if w > 0] for ws, js in zip(weights, index.tolist())
    ]


def file_boxes(boxes: torch.Tensor, image_wh: tuple[int, int], input_hw: tuple[int, int]) -> list[tuple]:
    """Boxes in the input tensor's pixels mapped back to the image file's (the inverse of
    :func:`mmcli.data.examples.input_boxes`)."""
    (width, height), (in_h, in_w) = image_wh, input_hw
    scale = max(in_h / height, in_w / width)
    dx, dy = (width * scale - in_w) / 2, (height * scale - in_h) / 2
    return [
        ((x0 + dx) / scale, (y0 + dy) / scale, (x1 + dx) / scale, (y1 + dy) / scale)
        for x0, y0, x1, y1 in boxes.tolist()
    ]


@torch.no_grad()
def write_explanations(
    model, dataset, out_dir: Path, *, device, count: int = 6, scale: int = 6, regions: str | None = None
) -> dict[str, Any]:
    """PNGs of the first ``count`` distinct images of ``dataset`` (an ``ExampleDataset`` with
    concepts), reasoning over each image and its own caption; returns the paths written."""
    from mmcli.data.batches import to_device
    from mmcli.data.concepts import extract_concepts
    from mmcli.data.examples import collate_examples
    from mmcli.models.downstream import caption_graph, pair_inputs

    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    picks, seen = [], set()
    for index, example in enumerate(dataset.examples):
        if example.image not in seen and len(picks) < count:
            seen.add(example.image)
            picks.append(index)
    batch = collate_examples([dataset[i] for i in picks])
    batch = to_device(batch, device)
    inputs = pair_inputs(model, batch)
    out = caption_graph(model, inputs, batch, regions)
    boxes, box_mask = model.fusion.region_boxes(inputs, regions)
    paths = []
    for row, index in enumerate(batch["index"].tolist()):
        example = dataset.examples[index]
        image = Image.open(example.image).convert("RGB")
        concepts = [c.text for c in extract_concepts(example.caption)]
        real = box_mask[row]
        picture = draw_explanation(
            image,
            file_boxes(boxes[row][real].cpu(), image.size, tuple(batch["images"].shape[-2:])),
            best_concepts(out.alignment[row][real].cpu(), concepts),
            example.caption,
            scale,
        )
        path = out_dir / f"{Path(example.image).stem}.png"
        picture.save(path)
        paths.append(str(path))
    return {"dir": str(out_dir), "pictures": paths, "iterations": out.iterations}
