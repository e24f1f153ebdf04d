"""Tests for mmcli.viz.grid: sheet geometry, thumbnail colours and unreadable tiles."""

from __future__ import annotations

import pytest
from PIL import Image

from mmcli.viz import grid


def test_sheet_size_by_hand():
    # 4 tiles, 3 per row → 2 rows; width 8 + 3·(32 + 8); height 28 + 8 + 2·(32 + 34 + 8)
    assert grid.sheet_size(4, thumb=32, cols=3) == (128, 184)
    assert grid.sheet_size(2, thumb=32, cols=3) == (88, 110)  # one short row is only as wide as it needs


def test_contact_sheet_draws_thumbnails_and_unreadable_tiles(tmp_path):
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (10, 10), (0, 0, 255)).save(tmp_path / "blue.jpg", quality=100)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    paths = [tmp_path / "red.png", tmp_path / "blue.jpg", tmp_path / "missing.png", tmp_path / "broken.jpg"]

    out = grid.contact_sheet(
        paths, [0.91, 0.5, 0.25, 0.1], tmp_path / "sheets" / "top.png", title="a red circle", thumb=32, cols=3
    )

    with Image.open(out) as sheet:
        sheet = sheet.convert("RGB")
        assert sheet.size == (128, 184)
        top = grid.TITLE_HEIGHT + grid.PAD  # first row of tiles starts here
        # tile 1: the 40×20 red image shrinks to 32×16, centred vertically in its 32×32 tile
        assert sheet.getpixel((8 + 16, top + 16)) == (255, 0, 0)
        assert sheet.getpixel((8 + 16, top + 2)) == grid.TILE_BACKGROUND
        # tile 2: blue, kept at 10×10 (thumbnails never upscale), centred
        assert _close(sheet.getpixel((48 + 16, top + 16)), (0, 0, 255))
        # tiles 3 (missing file) and 4 (not an image, second row) are grey
        assert sheet.getpixel((88 + 2, top + 2)) == grid.UNREADABLE
        second_row = top + 32 + grid.LABEL_HEIGHT + grid.PAD
        assert sheet.getpixel((8 + 2, second_row + 2)) == grid.UNREADABLE


def test_mismatched_scores_are_refused(tmp_path):
    with pytest.raises(ValueError, match="2 images for 1 scores"):
        grid.contact_sheet(["a.png", "b.png"], [0.5], tmp_path / "x.png", title="t")


def test_long_names_are_cut_to_the_tile_width():
    font = grid.ImageFont.load_default()
    cut = grid._fit("a-very-long-file-name-indeed.jpg", 60, font)
    assert cut.endswith("...") and font.getlength(cut) <= 60


def _close(got, want, tolerance=8):
    return all(abs(a - b) <= tolerance for a, b in zip(got, want))


def test_sheets_carry_the_signature_that_marks_them_as_mmcli_s(tmp_path):
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "red.png")
    out = grid.contact_sheet([tmp_path / "red.png"], [0.5], tmp_path / "sheet.png", title="t", thumb=32)
    with Image.open(out) as sheet:
        assert sheet.info[grid.SIGNATURE[0]] == grid.SIGNATURE[1]
    assert grid.is_contact_sheet(out)
    assert not grid.is_contact_sheet(tmp_path / "red.png")  # a PNG of someone else's
    (tmp_path / "notes.png").write_text("not an image")
    assert not grid.is_contact_sheet(tmp_path / "notes.png") and not grid.is_contact_sheet(tmp_path / "missing.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.png", "red.png", "sheet.png"]  # no temporary left
