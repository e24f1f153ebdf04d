"""Safe decoding: each kind of odd or broken file gives exact RGB pixels or a BadImage."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from mmcli.data.images import BadImage, is_image_file, load_image
from mmcli.io import IMAGE_SUFFIXES as IMAGE_EXTENSIONS


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **options)
    return buffer.getvalue()


def gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)
    y = np.linspace(0, 255, height, dtype=np.uint8)
    blue = np.full((height, width), 128, np.uint8)
    pixels = np.stack(np.broadcast_arrays(x[None, :], y[:, None], blue), -1)
    return Image.fromarray(pixels, "RGB")


def reason(source, **options) -> str:
    with pytest.raises(BadImage) as info:
        load_image(source, **options)
    return info.value.reason


def test_plain_rgb_png_round_trips_exactly(tmp_path):
    image = gradient(40, 30)
    image.save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    assert loaded.mode == "RGB" and loaded.size == (40, 30)
    assert np.array_equal(np.asarray(loaded), np.asarray(image))


def test_truncated_jpeg(tmp_path):
    data = jpeg_bytes(gradient(200, 150))
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    assert reason(tmp_path / "t.jpg") == "truncated"
    assert reason(data[: len(data) // 2]) == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_zero_bytes_text_file_and_missing_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("this is not a picture\n")
    assert reason(tmp_path / "empty.png") == "zero bytes"
    assert reason(b"") == "zero bytes"
    assert reason(tmp_path / "notes.jpg") == "not an image"
    assert reason(tmp_path / "absent.jpg") == "missing file"
    assert reason(tmp_path) == "not a file"


def test_bad_image_message_names_the_file(tmp_path):
    (tmp_path / "notes.jpg").write_text("hello")
    with pytest.raises(BadImage, match=r"notes\.jpg: not an image"):
        load_image(str(tmp_path / "notes.jpg"))


def test_oversized_header_is_rejected_before_decoding(tmp_path):
    Image.new("RGB", (100, 80)).save(tmp_path / "big.png")
    assert reason(tmp_path / "big.png", max_pixels=7999) == "too large (100×80)"
    assert load_image(tmp_path / "big.png", max_pixels=8000).size == (100, 80)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896], [65535, 1000, 65278]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I")  # really a 16-bit file
    loaded = np.asarray(load_image(tmp_path / "deep.png"))
    # round(v / 257): 1000 -> 3.89 -> 4; clipping would have made 257 and 1000 saturate at 255.
    expected = np.array([[0, 1, 128], [255, 4, 254]], dtype=np.uint8)
    assert np.array_equal(loaded, np.repeat(expected[..., None], 3, axis=-1))


def test_mode_i_and_binary_and_grey(tmp_path):
    as_i = Image.fromarray(np.array([[0, 65535, 70000, -5, 514]], dtype=np.int32), "I")
    assert np.asarray(load_image(encoded(as_i, "TIFF")))[0, :, 0].tolist() == [0, 255, 255, 0, 2]
    binary = Image.fromarray(np.array([[True, False]]))
    assert np.asarray(load_image(encoded(binary)))[0].tolist() == [[255, 255, 255], [0, 0, 0]]
    grey = Image.fromarray(np.array([[7, 200]], dtype=np.uint8), "L")
    assert np.asarray(load_image(encoded(grey)))[0].tolist() == [[7, 7, 7], [200, 200, 200]]


def encoded(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)  # pure red
    with Image.open(tmp_path / "c.jpg") as raw:
        assert raw.mode == "CMYK"
    r, g, b = np.asarray(load_image(tmp_path / "c.jpg")).reshape(-1, 3).mean(axis=0)
    assert r > 240 and g < 15 and b < 15


def test_rgba_is_composited_on_white():
    pixels = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 255, 128]]], dtype=np.uint8)
    loaded = np.asarray(load_image(encoded(Image.fromarray(pixels, "RGBA")))).astype(int)
    assert loaded[0, 0].tolist() == [255, 0, 0]
    assert loaded[0, 1].tolist() == [255, 255, 255]
    assert np.abs(loaded[0, 2] - [127, 127, 255]).max() <= 1  # half blue over white


def test_palette_gif_with_transparency_and_animation(tmp_path):
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    frames = []
    for colour in (0, 1):
        frame = Image.new("P", (4, 2), colour)
        frame.putpalette(palette)
        frame.putpixel((3, 1), 2)
        frames.append(frame)
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], transparency=2, duration=50)
    with Image.open(tmp_path / "a.gif") as raw:
        assert raw.n_frames == 2
    loaded = np.asarray(load_image(tmp_path / "a.gif"))
    assert loaded[0, 0].tolist() == [255, 0, 0]  # first frame (red), not the second (green)
    assert loaded[1, 3].tolist() == [255, 255, 255]  # the transparent index shows white


def test_palette_without_transparency():
    image = Image.new("P", (2, 1), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 6))
    assert np.asarray(load_image(encoded(image)))[0].tolist() == [[10, 20, 30], [10, 20, 30]]


def test_exif_orientation_six_swaps_width_and_height(tmp_path):
    image = Image.new("RGB", (60, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # a red band at the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    (tmp_path / "r.jpg").write_bytes(jpeg_bytes(image, exif=exif.tobytes()))
    loaded = load_image(tmp_path / "r.jpg")
    assert loaded.size == (20, 60)
    pixels = np.asarray(loaded).astype(int)
    assert pixels[2, 10, 0] > 200 and pixels[2, 10, 2] < 60  # the left edge is now the top
    assert pixels[-2, 10, 2] > 200


def test_draft_decodes_a_large_jpeg_at_reduced_size_at_least_the_request(tmp_path):
    (tmp_path / "big.jpg").write_bytes(jpeg_bytes(gradient(800, 600)))
    assert load_image(tmp_path / "big.jpg", draft=(224, 224)).size == (400, 300)
    assert load_image(tmp_path / "big.jpg", draft=(100, 70)).size == (100, 75)
    assert load_image(tmp_path / "big.jpg").size == (800, 600)


def test_corrupt_png_body_is_bad_image_not_another_exception():
    data = bytearray(encoded(gradient(64, 64)))
    data[60:200] = bytes(140)  # wipe the middle of the compressed stream
    with pytest.raises(BadImage):
        load_image(bytes(data))


def test_image_extensions_match_case_insensitively():
    assert set(IMAGE_EXTENSIONS) == {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
    assert is_image_file(Path("a/B.JPG")) and is_image_file("x.TiFf")
    assert not is_image_file("caption.txt") and not is_image_file("jpg")


@pytest.mark.parametrize("format", ["JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"])
def test_randomly_damaged_files_give_an_rgb_image_or_bad_image(format):
    rng = np.random.default_rng(0)
    data = encoded(Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)), format)
    outcomes = set()
    for trial in range(40):
        damaged = bytearray(data[: rng.integers(1, len(data))] if trial % 2 else data)
        for position in rng.integers(0, len(damaged), size=8):
            damaged[position] = rng.integers(256)
        try:
            image = load_image(bytes(damaged), max_pixels=50_000)
        except BadImage:
            outcomes.add("bad")
        else:
            # A damaged header may change the size, never past max_pixels.
            assert image.mode == "RGB" and image.width * image.height <= 50_000
            outcomes.add("ok")
    assert "bad" in outcomes


def test_signed_pixels_map_0_and_255_to_minus_one_and_one_and_resize_without_cropping():
    import numpy as np
    from PIL import Image

    from mmcli.data.images import signed_pixels

    array = np.zeros((4, 4, 3), dtype=np.uint8)
    array[0, 0] = (255, 0, 51)
    out = signed_pixels(4)(Image.fromarray(array))
    assert out.shape == (3, 4, 4)
    assert out[:, 0, 0].tolist() == [1.0, -1.0, pytest.approx(51 / 127.5 - 1)]
    assert float(out[:, 1:, 1:].max()) == -1.0
    stripes = np.zeros((6, 24, 3), dtype=np.uint8)  # red | green | blue, 8 columns each
    for k in range(3):
        stripes[:, 8 * k : 8 * (k + 1), k] = 255
    wide = signed_pixels(6)(Image.fromarray(stripes))
    assert wide.shape == (3, 6, 6)
    # squeezed, not cropped: the outer stripes are still there, at the edges
    assert wide[:, :, 0].mean(dim=1).argmax() == 0 and wide[:, :, -1].mean(dim=1).argmax() == 2
    assert wide[:, :, 3].mean(dim=1).argmax() == 1
