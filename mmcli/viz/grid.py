"""Contact sheet: the top-k images of a search as one PNG, each labelled with rank and score."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from mmcli.io import atomic_write

PAD = 8
"""Pixels between tiles and around the sheet."""
LABEL_HEIGHT = 34
"""Pixels under each thumbnail for its two label lines (rank and score, file name)."""
TITLE_HEIGHT = 28
"""Pixels above the tiles for the title."""
BACKGROUND = (255, 255, 255)
TILE_BACKGROUND = (235, 235, 235)
UNREADABLE = (128, 128, 128)
TEXT = (20, 20, 20)
SIGNATURE = ("mmcli", "contact sheet")
"""The PNG text chunk (keyword, text) that marks a file as a contact sheet mmcli wrote, which a
later sheet may replace (:func:`is_contact_sheet`); any other file is the user's."""


def sheet_size(count: int, *, thumb: int = 160, cols: int = 5) -> tuple[int, int]:
    """(width, height) in pixels of a sheet of ``count`` tiles, ``cols`` per row."""
    rows = math.ceil(count / cols)
    width = PAD + min(max(count, 1), cols) * (thumb + PAD)
    height = TITLE_HEIGHT + PAD + rows * (thumb + LABEL_HEIGHT + PAD)
    return width, height


def contact_sheet(
    image_paths: Sequence[str | Path],
    scores: Sequence[float],
    out: str | Path,
    *,
    title: str,
    thumb: int = 160,
    cols: int = 5,
) -> Path:
    """Write a PNG of ``image_paths`` in rank order, each labelled "#rank  score" and its name.

    Images that cannot be read are drawn as a grey tile labelled "unreadable"; the sheet is
    always written, atomically, and carries :data:`SIGNATURE`. Returns ``out``.
    """
    if len(image_paths) != len(scores):
        raise ValueError(f"{len(image_paths)} images for {len(scores)} scores")
    sheet = Image.new("RGB", sheet_size(len(image_paths), thumb=thumb, cols=cols), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((PAD, PAD // 2), _fit(title, sheet.width - 2 * PAD, font), fill=TEXT, font=font)
    for rank, (path, score) in enumerate(zip(image_paths, scores), start=1):
        x = PAD + ((rank - 1) % cols) * (thumb + PAD)
        y = TITLE_HEIGHT + PAD + ((rank - 1) // cols) * (thumb + LABEL_HEIGHT + PAD)
        _draw_tile(sheet, draw, font, (x, y), thumb, path, f"#{rank}  {score:.3f}")
    out = Path(out)
    info = PngImagePlugin.PngInfo()
    info.add_text(*SIGNATURE)
    atomic_write(out, lambda tmp: sheet.save(tmp, format="PNG", pnginfo=info))
    return out


def is_contact_sheet(path: str | Path) -> bool:
    """Whether ``path`` is a PNG that :func:`contact_sheet` wrote (it carries :data:`SIGNATURE`)."""
    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get(SIGNATURE[0]) == SIGNATURE[1]
    except Exception:  # noqa: BLE001 - whatever cannot be opened as an image is not one of ours
        return False


def _draw_tile(
    sheet: Image.Image,
    draw: ImageDraw.ImageDraw,
    font,
    corner: tuple[int, int],
    thumb: int,
    path: str | Path,
    caption: str,
) -> None:
    x, y = corner
    image = open_thumbnail(path, thumb)
    name = os.path.basename(os.fspath(path))
    if image is None:
        draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], fill=UNREADABLE)
        left, top, right, bottom = draw.textbbox((0, 0), "unreadable", font=font)
        centre = (x + (thumb - right + left) // 2, y + (thumb - bottom + top) // 2)
        draw.text(centre, "unreadable", fill=(255, 255, 255), font=font)
    else:
        draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], fill=TILE_BACKGROUND)
        sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
    draw.text((x, y + thumb + 3), caption, fill=TEXT, font=font)
    draw.text((x, y + thumb + 18), _fit(name, thumb, font), fill=TEXT, font=font)


def open_thumbnail(path: str | Path, size: int) -> Image.Image | None:
    """``path`` as an RGB image scaled to fit size×size, or None when it cannot be read.

    Decoding goes through :func:`mmcli.data.images.load_image` (EXIF orientation, odd modes,
    size guard). Small images are enlarged too, with nearest-neighbour so their pixels stay
    crisp: a 64 px image in a 160 px tile should be looked at, not squinted at.
    """
    from mmcli.data.images import BadImage, load_image

    try:
        image = load_image(path, draft=(size, size))
    except BadImage:
        return None  # missing, truncated or not an image: drawn as an "unreadable" tile
    scale = size / max(image.size)
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)


def _fit(text: str, width: int, font) -> str:
    """``text`` cut with an ellipsis so that it fits in ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."
