"""Drawing with PIL: backgrounds, sprites (objects, text, charts) and the final composite.

A `Sprite` is a tight binary mask placed at (x, y) with a solid colour or an RGB image
as its fill; its box is exactly its drawn pixels, which is what the annotations record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .config import COLORS

RGB = tuple[int, int, int]
NOISE_CELL = 16  # pixels per cell of the smooth noise grid
NOISE_GRAIN = 6  # amplitude of the per-pixel grain added on top


@dataclass
class Sprite:
    """Something drawn on the canvas: a 0/255 mask cropped to its ink, at (x, y)."""

    x: int
    y: int
    mask: Image.Image
    fill: RGB | Image.Image

    @property
    def width(self) -> int:
        return self.mask.width

    @property
    def height(self) -> int:
        return self.mask.height

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), exclusive end."""
        return self.x, self.y, self.x + self.mask.width, self.y + self.mask.height


@dataclass
class Fonts:
    """PIL's default (Aileron) font at several sizes, loaded once per size."""

    _cache: dict[int, Any] = field(default_factory=dict)

    def get(self, size: int) -> Any:
        font = self._cache.get(size)
        if font is None:
            font = self._cache[size] = ImageFont.load_default(size=size)
        return font


def background_image(background: dict[str, Any], width: int, height: int) -> Image.Image:
    """Render a scene's `background` entry (plain, gradient or noise)."""
    kind = background["kind"]
    base = COLORS[background["color"]]
    if kind == "plain":
        return Image.new("RGB", (width, height), base)
    if kind == "gradient":
        return _gradient(base, COLORS[background["color2"]], background["direction"], width, height)
    if kind == "noise":
        return _noise(base, background["amplitude"], background["noise_seed"], width, height)
    raise ValueError(f"unknown background kind {kind!r}")


def _gradient(a: RGB, b: RGB, direction: str, width: int, height: int) -> Image.Image:
    xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    if direction == "horizontal":
        t = np.broadcast_to(xs, (height, width))
    elif direction == "vertical":
        t = np.broadcast_to(ys, (height, width))
    else:  # diagonal
        t = (xs + ys) / 2.0
    ca, cb = np.asarray(a, np.float32), np.asarray(b, np.float32)
    pixels = ca + t[..., None] * (cb - ca)
    return Image.fromarray(np.round(pixels).astype(np.uint8), "RGB")


def _noise(base: RGB, amplitude: int, seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    gh, gw = height // NOISE_CELL + 2, width // NOISE_CELL + 2
    grid = rng.integers(128 - amplitude, 128 + amplitude + 1, size=(gh, gw, 3), dtype=np.uint8)
    smooth = Image.fromarray(grid, "RGB").resize((width, height), Image.Resampling.BILINEAR)
    offset = np.asarray(smooth, dtype=np.int16) - 128
    offset += rng.integers(-NOISE_GRAIN, NOISE_GRAIN + 1, size=offset.shape, dtype=np.int16)
    pixels = np.clip(offset + np.asarray(base, np.int16), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def text_mask(string: str, size: int, fonts: Fonts) -> Image.Image:
    """`string` drawn in the default font at `size`, cropped to its ink."""
    font = fonts.get(size)
    x0, y0, x1, y1 = font.getbbox(string)
    img = Image.new("L", (x1 - x0 + 4, y1 - y0 + 4), 0)
    ImageDraw.Draw(img).text((2 - x0, 2 - y0), string, fill=255, font=font)
    box = img.getbbox()
    return img.crop(box) if box else Image.new("L", (1, 1), 255)


@dataclass
class ChartDrawing:
    """A rendered bar chart: its sprite (placed at 0, 0) and each bar's box in sprite coordinates."""

    sprite: Sprite
    bar_boxes: list[tuple[int, int, int, int]]


def chart_drawing(chart: dict[str, Any], width: int, height: int, axis: RGB, fonts: Fonts) -> ChartDrawing:
    """Draw a bar chart (labels under bars, optional values above) into a width x height panel."""
    labels, values = chart["labels"], chart["values"]
    font_size = max(8, min(14, height // 9))
    font = fonts.get(font_size)
    line = font_size + 3
    mask = Image.new("L", (width, height), 0)  # coverage (text anti-aliased, bars solid)
    fill = Image.new("RGB", (width, height), axis)  # axis colour, with the bars painted in
    draw_mask, draw_fill = ImageDraw.Draw(mask), ImageDraw.Draw(fill)
    left, base = 2, height - line - 2
    top = line if chart["show_values"] else 2
    slot = (width - left - 2) / len(values)
    draw_mask.line([(left, top - 1), (left, base)], fill=255, width=1)
    draw_mask.line([(left, base), (width - 2, base)], fill=255, width=1)
    peak = max(values)
    bar_boxes = []
    for i, (label, value, color) in enumerate(zip(labels, values, chart["colors"], strict=True)):
        cx = left + slot * (i + 0.5)
        half = max(1.0, slot * 0.32)
        bar_top = base - max(2, round((base - top) * value / peak))
        box = (round(cx - half), bar_top, round(cx + half), base - 1)
        draw_mask.rectangle(box, fill=255)
        draw_fill.rectangle(box, fill=COLORS[color])
        bar_boxes.append((box[0], box[1], box[2] + 1, box[3] + 1))
        draw_mask.text((cx, base + 2), label, fill=255, font=font, anchor="mt")
        if chart["show_values"]:
            draw_mask.text((cx, bar_top - 2), str(value), fill=255, font=font, anchor="mb")
    x0, y0, x1, y1 = mask.getbbox() or (0, 0, width, height)
    shifted = [(a - x0, b - y0, c - x0, d - y0) for a, b, c, d in bar_boxes]
    crop = (x0, y0, x1, y1)
    return ChartDrawing(Sprite(0, 0, mask.crop(crop), fill.crop(crop)), shifted)


def compose(background: Image.Image, sprites: list[Sprite]) -> Image.Image:
    """Paste sprites onto the background in order (later ones on top)."""
    for sprite in sprites:
        background.paste(sprite.fill, sprite.box, sprite.mask)
    return background
