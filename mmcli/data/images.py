"""Safe image decoding: every image comes back as 8-bit RGB, or as a :class:`BadImage`.

A training run over millions of scraped files meets every kind of broken file; one of them must
never stop the run, hang a worker or raise something the caller does not expect. The size is
checked from the header before any pixel is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from mmcli.io import IMAGE_SUFFIXES

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")
# Orientations 5–8 swap width and height, so a draft size must be asked for the other way round.
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


class BadImage(Exception):
    """An image that cannot be used; ``reason`` says why in a few words ("truncated")."""

    def __init__(self, reason: str, source: str | None = None):
        super().__init__(f"{source}: {reason}" if source else reason)
        self.reason = reason
        self.source = source


def is_image_file(path: str | Path) -> bool:
    """Whether ``path`` has one of :data:`~mmcli.io.IMAGE_SUFFIXES` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def load_image(
    source: str | Path | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode ``source`` (a path or the file's bytes) into an 8-bit RGB image.

    EXIF orientation is applied; grey, palette, alpha (composited on white), 16-bit and CMYK
    images are converted; an animated image gives its first frame. ``draft`` lets a JPEG decode
    at a reduced scale that is still at least ``draft`` (width, height). Raises
    :class:`BadImage` for anything unusable, including more than ``max_pixels`` pixels.
    """
    name = None if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        return _load(source, max_pixels, draft)
    except BadImage as exc:
        raise BadImage(exc.reason, name) from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "unusable", never a crash
        raise BadImage(_reason(exc), name) from None


def _load(source, max_pixels: int, draft: tuple[int, int] | None) -> Image.Image:
    stream = _open_stream(source)
    with warnings.catch_warnings():
        # Broken files are reported as BadImage, so PIL's warnings about them (and about size,
        # which max_pixels checks instead) would only flood the log of a long run.
        warnings.filterwarnings("ignore", module=r"PIL\.")
        with Image.open(stream) as image:
            _check_size(image, max_pixels)
            if draft is not None:
                image.draft(None, _draft_size(image, draft))
            image.load()
            rgb = to_rgb(_upright(image))
            # The result must not share pixels with the image that the ``with`` closes.
            return rgb.copy() if rgb is image else rgb


def _open_stream(source) -> io.BytesIO | Path:
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise BadImage("zero bytes")
        return io.BytesIO(source)
    path = Path(source)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise BadImage("missing file") from None
    except OSError as exc:
        raise BadImage(f"unreadable ({exc.strerror or exc})") from None
    if not path.is_file():
        raise BadImage("not a file")
    if size == 0:
        raise BadImage("zero bytes")
    return path


def _check_size(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise BadImage(f"too large ({width}×{height})")
    if width == 0 or height == 0:
        raise BadImage(f"empty ({width}×{height})")


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # noqa: BLE001 - broken EXIF only loses the orientation, not the image
        return 1


def _draft_size(image: Image.Image, size: tuple[int, int]) -> tuple[int, int]:
    if _orientation(image) in _SWAPPING_ORIENTATIONS:
        return size[1], size[0]
    return size


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - broken EXIF only loses the orientation, not the image
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to 8-bit RGB (alpha over white, 16 bit scaled)."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(image)
    if image.mode == "P":
        if not image.has_transparency_data:
            return image.convert("RGB")
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        return _on_white(image.convert("RGBA"))
    return image.convert("RGB")


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    # PIL's own I;16 -> L conversion clips at 255; scaling keeps the full tonal range. Mode "I"
    # is read as 16-bit data too: that is what PNG and TIFF decoders produce it from.
    values = np.asarray(image).astype(np.int64)
    values = np.clip(values, 0, 65535)
    grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def _on_white(image: Image.Image) -> Image.Image:
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image).convert("RGB")


def _reason(exc: Exception) -> str:
    text = str(exc)
    if isinstance(exc, UnidentifiedImageError):
        return "not an image"
    if isinstance(exc, Image.DecompressionBombError):
        return "too large (over PIL's decompression-bomb limit)"
    if isinstance(exc, EOFError) or "truncated" in text.lower():
        return "truncated"
    if isinstance(exc, MemoryError):
        return "out of memory while decoding"
    detail = f"{type(exc).__name__}: {text[:80]}" if text else type(exc).__name__
    return f"undecodable ({detail})"


def signed_pixels(size: int):
    """PIL image (8-bit RGB, as :func:`load_image` returns) → float tensor [3, size, size] with
    values in [-1, 1], what a pixel-space diffusion model denoises. torchvision's transforms: an
    image of another size is resized (Lanczos, antialiased when it shrinks), never cropped, so
    nothing a caption names is cut away."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.LANCZOS),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.5] * 3, std=[0.5] * 3),
        ]
    )
