"""A picture of generated captions beside their images (and the references they are scored on)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from mmcli.io import atomic_write
from mmcli.viz.explain import _wrap
from mmcli.viz.grid import BACKGROUND, PAD, TEXT, TILE_BACKGROUND, TITLE_HEIGHT, UNREADABLE, open_thumbnail

LINE = 13
"""Pixels per text line of the default font."""
PREDICTED = (20, 70, 160)
"""Colour of the generated caption (the references are in :data:`~mmcli.viz.grid.TEXT`)."""


def caption_sheet(
    rows: Sequence[dict[str, Any]], out: str | Path, *, title: str, thumb: int = 128, cols: int = 4, width: int = 220
) -> Path:
    """Write a PNG with, for each row (``image``, ``caption``, ``score``, ``references``), the
    image and, beside it, the generated caption (blue, with its score) above the first reference.
    Unreadable images are grey tiles. Written atomically; returns ``out``."""
    font = ImageFont.load_default()
    cell_w, cell_h = thumb + PAD + width, thumb
    n_rows = max(1, -(-len(rows) // cols))
    sheet = Image.new("RGB", (PAD + cols * (cell_w + PAD), TITLE_HEIGHT + PAD + n_rows * (cell_h + PAD)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, PAD // 2), title, fill=TEXT, font=font)
    for i, row in enumerate(rows):
        x = PAD + (i % cols) * (cell_w + PAD)
        y = TITLE_HEIGHT + PAD + (i // cols) * (cell_h + PAD)
        image = open_thumbnail(row["image"], thumb)
        draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], fill=UNREADABLE if image is None else TILE_BACKGROUND)
        if image is not None:
            sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
        lines = [(line, PREDICTED) for line in _wrap(f"{row['caption']}  ({row['score']:.2f})", width)]
        references = row.get("references") or []
        if references:
            lines += [("", TEXT)] + [(line, TEXT) for line in _wrap(f"ref: {references[0]}", width)]
        for j, (line, colour) in enumerate(lines[: cell_h // LINE]):
            draw.text((x + thumb + PAD, y + j * LINE), line, fill=colour, font=font)
    out = Path(out)
    atomic_write(out, lambda tmp: sheet.save(tmp, format="PNG"))
    return out
