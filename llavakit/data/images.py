"""Safe image loading: every failure is an `ImageError` naming the file (or source).

Pillow does the decoding; this adds the checks a training run or a server needs: a size cap
before decoding (decompression bombs), full decode up front (truncated files fail here, not in a
worker later), and conversion of every mode (L, LA, P, RGBA, CMYK, I;16, ...) to RGB.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

MAX_PIXELS_DEFAULT = 40_000_000
"""Largest image accepted (width x height): bigger files are refused before they are decoded."""


class ImageError(ValueError):
    """An image that cannot be used; the message names the source and the reason."""


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = MAX_PIXELS_DEFAULT
    max_bytes: int = 50 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_pixels <= 0 or self.max_bytes <= 0:
            raise ValueError("image limits must be > 0")


def _to_rgb(img, name: str):
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max() or 1.0
        img = Image.fromarray((arr / peak * 255).clip(0, 255).astype("uint8"), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        base = Image.new("RGB", img.size, (255, 255, 255))
        rgba = img.convert("RGBA")
        base.paste(rgba, mask=rgba.getchannel("A"))
        return base
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"{name}: cannot convert mode {img.mode} to RGB: {exc}") from None


def decode_image(data: bytes, name: str = "<bytes>", limits: ImageLimits = ImageLimits()):
    """Decode image bytes into an RGB PIL image, or raise `ImageError` naming `name`."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(f"{name}: {len(data)} bytes exceeds the limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageError(f"{name}: invalid size {w}x{h}")
            if w * h > limits.max_pixels:
                raise ImageError(f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {limits.max_pixels}")
            img.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (format not recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: corrupt or truncated image ({exc})") from None
    return _to_rgb(img, name)


def load_image(path: str | Path, limits: ImageLimits = ImageLimits()):
    """Read and decode an image file into RGB; `ImageError` names the path on any failure."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image file not found")
    return decode_image(path.read_bytes(), str(path), limits)
