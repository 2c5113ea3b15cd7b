"""Shape geometry: each category becomes a tight binary mask (PIL "L", 0/255).

Masks are cropped to their drawn pixels, so a mask's size *is* the object's tight box.
Shapes are kept unambiguous: squares, rectangles and crosses stay axis-aligned
(a rotated square would be a diamond), the rest may rotate freely.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

Points = list[tuple[float, float]]
ARROW_DIRECTIONS: tuple[str, ...] = ("right", "down", "left", "up")  # 0, 90, 180, 270 degrees (y down)


@dataclass
class ShapeMask:
    """A drawn shape: its tight mask and any shape-specific attributes (e.g. arrow direction)."""

    mask: Image.Image
    attributes: dict[str, Any] = field(default_factory=dict)


def _rotate(points: Points, degrees: float) -> Points:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    return [(x * c - y * s, x * s + y * c) for x, y in points]


def _regular(n: int, radius: float, rotation: float, inner: float | None = None) -> Points:
    """A regular polygon (or a star, when `inner` gives the inner radius ratio) around (0, 0)."""
    step = 360.0 / n
    points: Points = []
    for i in range(n):
        a = math.radians(rotation + i * step - 90.0)
        points.append((radius * math.cos(a), radius * math.sin(a)))
        if inner is not None:
            b = math.radians(rotation + (i + 0.5) * step - 90.0)
            points.append((radius * inner * math.cos(b), radius * inner * math.sin(b)))
    return points


def _ellipse(rx: float, ry: float, rotation: float, n: int = 48) -> Points:
    pts = [(rx * math.cos(2 * math.pi * i / n), ry * math.sin(2 * math.pi * i / n)) for i in range(n)]
    return _rotate(pts, rotation)


def _box(w: float, h: float) -> Points:
    return [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]


def _poly_circle(s: float, rng: np.random.Generator) -> tuple[Points, dict]:
    return _ellipse(s / 2, s / 2, 0.0, n=max(24, int(s))), {}


def _poly_ellipse(s: float, rng: np.random.Generator) -> tuple[Points, dict]:
    ratio = rng.uniform(0.45, 0.65)
    return _ellipse(s / 2, s * ratio / 2, rng.uniform(0, 180)), {}


def _poly_square(s: float, rng: np.random.Generator) -> tuple[Points, dict]:
    side = s * 0.85
    return _box(side, side), {}


def _poly_rectangle(s: float, rng: np.random.Generator) -> tuple[Points, dict]:
    long, short = s, s * rng.uniform(0.42, 0.62)
    return (_box(long, short) if rng.random() < 0.5 else _box(short, long)), {}


def _poly_triangle(s: float, rng: np.random.Generator) -> tuple[Points, dict]:
    return _regular(3, s * 0.55, rng.uniform(0, 120)), {}


def _poly_diamond(s: float, rng: np.random.Generator) -> tuple[Points, dict]:
    half_w = s / 2 * rng.uniform(0.55, 0.8)
    return [(0, -s / 2), (half_w, 0), (0, s / 2), (-half_w, 0)], {}


def _poly_star(s: float, rng: np.random.Generator) -> tuple[Points, dict]:
    return _regular(5, s / 2, rng.uniform(0, 72), inner=rng.uniform(0.4, 0.5)), {}


def _poly_ngon(n: int) -> Callable[[float, np.random.Generator], tuple[Points, dict]]:
    def build(s: float, rng: np.random.Generator) -> tuple[Points, dict]:
        return _regular(n, s / 2, rng.uniform(0, 360 / n)), {}

    return build


def _poly_cross(s: float, rng: np.random.Generator) -> tuple[Points, dict]:
    a, t = s / 2, s * rng.uniform(0.15, 0.2)
    return [
        (-t, -a), (t, -a), (t, -t), (a, -t), (a, t), (t, t),
        (t, a), (-t, a), (-t, t), (-a, t), (-a, -t), (-t, -t),
    ], {}  # fmt: skip


def _poly_heart(s: float, rng: np.random.Generator) -> tuple[Points, dict]:
    pts = []
    for i in range(60):
        t = 2 * math.pi * i / 60
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x * s / 34, -y * s / 34))
    return pts, {}


def _poly_arrow(s: float, rng: np.random.Generator) -> tuple[Points, dict]:
    a, shaft, head = s / 2, s * rng.uniform(0.1, 0.14), s * rng.uniform(0.26, 0.32)
    neck = a - s * rng.uniform(0.35, 0.45)
    pts = [(-a, -shaft), (neck, -shaft), (neck, -head), (a, 0), (neck, head), (neck, shaft), (-a, shaft)]
    k = int(rng.integers(4))
    return _rotate(pts, 90.0 * k), {"direction": ARROW_DIRECTIONS[k]}


POLYGONS: dict[str, Callable[[float, np.random.Generator], tuple[Points, dict]]] = {
    "circle": _poly_circle,
    "square": _poly_square,
    "triangle": _poly_triangle,
    "star": _poly_star,
    "ellipse": _poly_ellipse,
    "rectangle": _poly_rectangle,
    "diamond": _poly_diamond,
    "pentagon": _poly_ngon(5),
    "hexagon": _poly_ngon(6),
    "octagon": _poly_ngon(8),
    "cross": _poly_cross,
    "heart": _poly_heart,
    "arrow": _poly_arrow,
}


def _draw(points_list: list[tuple[Points, int]], extent: float) -> Image.Image:
    """Draw polygons (fill 255 or 0, in order) centred on a padded canvas and crop to the ink."""
    side = int(math.ceil(extent * 1.2)) + 4
    img = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(img)
    c = side / 2
    for points, fill in points_list:
        draw.polygon([(x + c, y + c) for x, y in points], fill=fill)
    box = img.getbbox()
    if box is None:  # degenerate (should not happen for sane extents): keep one pixel
        return Image.new("L", (1, 1), 255)
    return img.crop(box)


def _crescent(s: float, rng: np.random.Generator) -> list[tuple[Points, int]]:
    angle = rng.uniform(0, 360)
    shift = s * rng.uniform(0.28, 0.4)
    outer = _ellipse(s / 2, s / 2, 0.0, n=max(24, int(s)))
    dx, dy = shift * math.cos(math.radians(angle)), shift * math.sin(math.radians(angle))
    inner = [(x * 0.9 + dx, y * 0.9 + dy) for x, y in outer]
    return [(outer, 255), (inner, 0)]


def shape_mask(category: str, extent: float, rng: np.random.Generator) -> ShapeMask:
    """Draw `category` about `extent` pixels across; return its tight mask and attributes."""
    if category == "crescent":
        return ShapeMask(_draw(_crescent(extent, rng), extent))
    try:
        build = POLYGONS[category]
    except KeyError:
        raise ValueError(f"unknown shape category {category!r}") from None
    points, attributes = build(extent, rng)
    return ShapeMask(_draw([(points, 255)], extent), attributes)
