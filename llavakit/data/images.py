"""Safe image loading: every failure is an `ImageError` naming the file (or source).

Pillow does the decoding; this adds the checks a training run or a server needs: only common
photo formats, size caps before decoding (decompression bombs, and thin strips that the image
processor would blow up), full decode up front (truncated files fail here, not in a worker later),
and conversion of every mode (1, L, LA, P, PA, RGBA, CMYK, YCbCr, LAB, I;16, I, F) to RGB.
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MAX_PIXELS_DEFAULT = 40_000_000
"""Largest image accepted (width x height): bigger files are refused before they are decoded."""

FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "AVIF", "BMP", "TIFF", "PPM")
"""Pillow formats tried when opening (those of them this Pillow build has). Pillow's `formats=` is
its own way to narrow what untrusted bytes may be parsed as: no EPS (that runs Ghostscript), PSD,
FITS, ... (JPEG includes cameras' multi-picture MPO files)."""


class ImageError(ValueError):
    """An image that cannot be used; the message names the source and the reason."""


@dataclass(frozen=True)
class ImageLimits:
    """Caps checked from the header, before any pixel is decoded.

    Hand-written rather than Pillow's `Image.MAX_IMAGE_PIXELS`: that is one process-wide global,
    while a training run and a server (`--max-image-pixels`) each need their own limit, set per
    call from threads. Pillow's own `DecompressionBombError` (at 2x its global) stays as a backstop.
    `max_side` and `max_aspect` have no Pillow equivalent: the image processor pads to a square of
    the longest side, or resizes the shortest side to the encoder's size, so a 2 x 20000 strip
    (40k pixels, a few hundred bytes) would take gigabytes and tens of seconds there.
    """

    max_pixels: int = MAX_PIXELS_DEFAULT
    max_bytes: int = 50 * 1024 * 1024
    max_side: int = 10_000
    max_aspect: float = 50.0

    def __post_init__(self) -> None:
        if min(self.max_pixels, self.max_bytes, self.max_side) <= 0 or self.max_aspect < 1:
            raise ValueError("image limits must be > 0 (max_aspect >= 1)")

    def check_size(self, w: int, h: int, name: str) -> None:
        """Raise `ImageError` naming `name` if a w x h image is over a limit."""
        if w <= 0 or h <= 0:
            raise ImageError(f"{name}: invalid size {w}x{h}")
        if w * h > self.max_pixels:
            raise ImageError(f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {self.max_pixels}")
        if max(w, h) > self.max_side:
            raise ImageError(f"{name}: {w}x{h}: a side longer than the limit of {self.max_side} pixels")
        if max(w, h) / min(w, h) > self.max_aspect:
            raise ImageError(f"{name}: {w}x{h}: aspect ratio {max(w, h) / min(w, h):.0f}:1 exceeds the limit of "
                             f"{self.max_aspect:g}:1")


def _scaled_to_l(img):
    """16/32-bit integer and float greyscale -> 8-bit L.

    Pillow's own convert clips these at 255 (a 16-bit photo turns almost white), so scale by hand:
    16-bit modes by their full range (65535 -> 255); 'I' and 'F' have no fixed range and are
    stretched from their minimum to their maximum.
    """
    import numpy as np
    from PIL import Image

    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        scaled = arr / 257.0
    else:
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.rint(scaled).clip(0, 255).astype(np.uint8), mode="L")


def to_rgb(img, name: str = "<image>"):
    """An RGB copy of a PIL image of any mode (transparency composited on white)."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode.startswith(("I;16", "I", "F")):
        img = _scaled_to_l(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        base = Image.new("RGB", img.size, (255, 255, 255))
        rgba = img.convert("RGBA")
        base.paste(rgba, mask=rgba.getchannel("A"))
        return base
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"{name}: cannot convert mode {img.mode} to RGB: {exc}") from None


def _formats() -> tuple[str, ...]:
    from PIL import Image

    Image.init()  # registers every plugin once; a no-op afterwards
    return tuple(f for f in FORMATS if f in Image.OPEN)


def decode_image(data: bytes, name: str = "<bytes>", limits: ImageLimits = ImageLimits()):
    """Decode image bytes into an RGB PIL image, or raise `ImageError` naming `name`."""
    from PIL import Image

    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(f"{name}: {len(data)} bytes exceeds the limit of {limits.max_bytes}")
    with _pillow_errors(name, "corrupt or truncated image"):
        img = Image.open(io.BytesIO(data), formats=_formats())
        limits.check_size(*img.size, name)
        img.load()
    return to_rgb(img, name)


@contextmanager
def _pillow_errors(name: str, broken: str):
    """Pillow's ways of failing on bad bytes, as `ImageError`s naming `name` (`broken`: what a decode error means)."""
    from PIL import Image, UnidentifiedImageError

    try:
        yield
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image, or not one of the accepted formats ({', '.join(_formats())})") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{name}: {broken} ({exc})") from None


def check_image_file(path: str | Path, limits: ImageLimits = ImageLimits()) -> None:
    """Header-only check of an image file (there, not empty, an accepted format, within the size caps): cheap
    enough for an index pass over every record. A file cut short after its header fails when it is decoded."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image file not found")
    with _pillow_errors(str(path), "corrupt image header"):
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file (0 bytes)")
        with Image.open(path, formats=_formats()) as img:
            limits.check_size(*img.size, str(path))


def load_image(path: str | Path, limits: ImageLimits = ImageLimits()):
    """Read and decode an image file into RGB; `ImageError` names the path on any failure."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image file not found")
    try:
        size = path.stat().st_size
        if size > limits.max_bytes:  # before reading: a huge file is never loaded into memory
            raise ImageError(f"{path}: {size} bytes exceeds the limit of {limits.max_bytes}")
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return decode_image(data, str(path), limits)
