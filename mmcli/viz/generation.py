"""A picture of generated images: one row per prompt, its text, then its pictures (optionally the
real image first), each framed green or red when the scene reader's verdict is known."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from mmcli.io import atomic_write
from mmcli.viz.explain import _wrap
from mmcli.viz.grid import BACKGROUND, PAD, TEXT, TITLE_HEIGHT

RIGHT = (30, 150, 60)
WRONG = (200, 40, 40)
FRAME = 3
"""Width in pixels of the verdict frame around a picture."""
LABEL_WIDTH = 190
"""Pixels left of the pictures for the prompt's text."""
LINE = 13


@dataclass
class SheetRow:
    """One prompt of the sheet: its pictures, and per picture an optional label ("real", "#2")
    and verdict (``True``: the picture shows the prompt exactly; ``None``: not judged)."""

    prompt: str
    pictures: list[Image.Image]
    labels: list[str]
    verdicts: list[bool | None]


def prompt_sheet(rows: Sequence[SheetRow], out: str | Path, *, title: str, thumb: int = 96) -> Path:
    """Write the sheet as a PNG, pictures scaled up ``thumb`` pixels wide without smoothing (a
    32 px picture stays what it is, pixel for pixel); written atomically; returns ``out``."""
    font = ImageFont.load_default()
    columns = max((len(r.pictures) for r in rows), default=1)
    cell = thumb + 2 * FRAME
    row_height = cell + LINE + PAD
    width = PAD + LABEL_WIDTH + columns * (cell + PAD)
    sheet = Image.new("RGB", (width, TITLE_HEIGHT + PAD + max(1, len(rows)) * row_height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, PAD // 2), title, fill=TEXT, font=font)
    for r, row in enumerate(rows):
        y = TITLE_HEIGHT + PAD + r * row_height
        for k, line in enumerate(_wrap(row.prompt, LABEL_WIDTH - PAD)[: cell // LINE]):
            draw.text((PAD, y + k * LINE), line, fill=TEXT, font=font)
        for c, picture in enumerate(row.pictures):
            x = PAD + LABEL_WIDTH + c * (cell + PAD)
            verdict = row.verdicts[c] if c < len(row.verdicts) else None
            if verdict is not None:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=RIGHT if verdict else WRONG)
            sheet.paste(picture.convert("RGB").resize((thumb, thumb), Image.Resampling.NEAREST), (x + FRAME, y + FRAME))
            if c < len(row.labels):
                draw.text((x + FRAME, y + cell + 1), row.labels[c], fill=TEXT, font=font)
    out = Path(out)
    atomic_write(out, lambda tmp: sheet.save(tmp, format="PNG"))
    return out
