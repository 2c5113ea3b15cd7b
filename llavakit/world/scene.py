"""Sampling one scene graph (and the sprites that draw it) from a numpy Generator.

Everything about an image comes from `np.random.default_rng(image_seed(seed, split, index))`,
so a scene is reproducible from its line's `seed` alone. Text and charts are placed
first; objects never touch them and may overlap each other only up to `max_overlap`.
Boxes are measured on the drawn pixels that stay visible, so they are tight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .clipart import ClipartLibrary
from .config import (
    COLORS,
    MIN_CONTRAST,
    POSITIONS,
    SPLITS,
    TEXT_CONTRAST,
    TEXT_LUMA_CONTRAST,
    WorldConfig,
    color_distance,
    luma,
)
from .render import Fonts, Sprite, chart_drawing, text_mask
from .shapes import shape_mask

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)

WORDS: tuple[str, ...] = (
    "STOP", "EXIT", "OPEN", "SALE", "HELLO", "CAFE", "PARK", "TAXI", "HOTEL", "BUS", "ZOO",
    "BANK", "FOOD", "BOOK", "MILK", "RAIN", "SNOW", "WIND", "LOVE", "HOME", "SHOP", "PLAY",
    "JAZZ", "KING", "MOON", "TREE", "FISH", "BIRD", "CAT", "DOG", "SUN", "MAP", "KEY", "NEW",
    "HOT", "COLD", "GAME", "WIN", "DATA", "CODE", "LAB", "ART", "PIZZA", "MUSIC", "RADIO",
    "LIGHT", "WATER", "PHONE", "ROBOT", "TIGER", "OK", "HI", "42", "7", "2024", "A1", "B12", "99",
)  # fmt: skip
CHART_LABELS: tuple[tuple[str, ...], ...] = (
    ("A", "B", "C", "D", "E", "F"),
    ("W", "X", "Y", "Z", "Q", "R"),
    ("1", "2", "3", "4", "5", "6"),
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun"),
    ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat"),
)
WIDE_LABEL_SLOT = 24  # word labels only when each bar's slot is at least this wide (px)
GRADIENT_DIRECTIONS: tuple[str, ...] = ("horizontal", "vertical", "diagonal")
SIZE_ORDER: tuple[str, ...] = ("large", "medium", "small")
EDGE = 1  # objects keep this many pixels from the image border
GAP = 2  # objects keep this many pixels from text and charts
PLACE_TRIES = 40


def image_seed(seed: int, split: str, index: int) -> int:
    """The 53-bit seed of image `index` of `split` (disjoint streams per split and index)."""
    state = np.random.SeedSequence([seed, SPLITS.index(split), index]).generate_state(1, np.uint64)
    return int(state[0]) >> 11


@dataclass
class SceneContext:
    """Per-run helpers that outlive one scene: fonts and the optional clip-art library."""

    config: WorldConfig
    fonts: Fonts = field(default_factory=Fonts)
    clipart: ClipartLibrary | None = None


@dataclass
class Scene:
    """A sampled scene: its JSON scene graph and the sprites that draw it over the background."""

    record: dict[str, Any]
    sprites: list[Sprite]


@dataclass
class _Canvas:
    """The image being laid out: its size, usable colours, and regions already taken."""

    width: int
    height: int
    palette: list[str]  # object colours that stand out from the background
    bg_names: list[str]  # the background's colour(s)
    reserved: list[Box] = field(default_factory=list)  # text and chart boxes
    sprites: list[Sprite] = field(default_factory=list)  # text and chart, in drawing order


@dataclass
class _Placed:
    """An object while the scene is being built."""

    sprite: Sprite
    info: dict[str, Any]


def sample_scene(ctx: SceneContext, index: int, image_id: int) -> Scene:
    """Sample image `index` of the configured split."""
    cfg = ctx.config
    seed = image_seed(cfg.seed, cfg.split, index)
    rng = np.random.default_rng(seed)
    width = cfg.width or int(rng.integers(cfg.min_size, cfg.max_size + 1))
    height = cfg.height or int(rng.integers(cfg.min_size, cfg.max_size + 1))
    background, palette = _background(rng, cfg)
    canvas = _Canvas(width, height, palette, _background_colors(background))
    chart = _chart(rng, ctx, canvas)
    text = _texts(rng, ctx, canvas)
    placed = _objects(rng, ctx, canvas)
    objects, relations = _finish_objects(placed, width, height)
    sprites = canvas.sprites + [p.sprite for p in placed]
    record = {
        "image_id": image_id,
        "file_name": f"images/{cfg.split}_{index:06d}.png",
        "width": width,
        "height": height,
        "split": cfg.split,
        "seed": seed,
        "world_seed": cfg.seed,
        "index": index,
        "background": background,
        "objects": objects,
        "relations": relations,
        "text": text,
        "chart": chart,
    }
    return Scene(record, sprites)


# --- background -------------------------------------------------------------------------


def _choice(rng: np.random.Generator, items: list[str] | tuple[str, ...]) -> str:
    return items[int(rng.integers(len(items)))]


def _background(rng: np.random.Generator, cfg: WorldConfig) -> tuple[dict[str, Any], list[str]]:
    """A background entry and the object colours that stand out from it."""
    kind = _choice(rng, cfg.backgrounds)
    color = _choice(rng, cfg.background_colors)
    palette = [c for c in cfg.colors if color_distance(c, color) >= MIN_CONTRAST]
    if kind == "gradient":
        others = [c for c in cfg.background_colors if c != color]
        if others:
            color2 = _choice(rng, others)
            narrowed = [c for c in palette if _stands_out(c, color, color2)]
            if narrowed:
                direction = _choice(rng, GRADIENT_DIRECTIONS)
                return {"kind": kind, "color": color, "color2": color2, "direction": direction}, narrowed
        kind = "plain"  # no second colour leaves room for objects: fall back
    if kind == "noise":
        amplitude = int(rng.integers(10, 25))
        noise_seed = int(rng.integers(2**31))
        return {"kind": kind, "color": color, "amplitude": amplitude, "noise_seed": noise_seed}, palette
    return {"kind": "plain", "color": color}, palette


def _stands_out(c: str, a: str, b: str) -> bool:
    """Whether colour `c` contrasts with both ends and the middle of an a→b gradient."""
    mid = np.add(COLORS[a], COLORS[b]) / 2.0
    return (
        color_distance(c, a) >= MIN_CONTRAST
        and color_distance(c, b) >= MIN_CONTRAST
        and float(np.linalg.norm(np.subtract(COLORS[c], mid))) >= MIN_CONTRAST
    )


def _background_colors(background: dict[str, Any]) -> list[str]:
    return [background["color"]] + ([background["color2"]] if "color2" in background else [])


def _contrast_color(rng: np.random.Generator, bg_names: list[str], prefer: tuple[str, ...]) -> str:
    """A colour readable on the background: one of `prefer` at random if any is, else the best."""

    def readable(c: str) -> bool:
        return all(
            color_distance(c, b) >= TEXT_CONTRAST and abs(luma(c) - luma(b)) >= TEXT_LUMA_CONTRAST
            for b in bg_names
        )

    good = [c for c in prefer if readable(c)]
    if good:
        return _choice(rng, good)
    return max(COLORS, key=lambda c: min(abs(luma(c) - luma(b)) for b in bg_names))


# --- placement --------------------------------------------------------------------------


def _intersects(a: Box, b: Box, gap: int = 0) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def _find_spot(
    rng: np.random.Generator, width: int, height: int, w: int, h: int, ok: Callable[[Box], bool]
) -> tuple[int, int] | None:
    """A top-left corner keeping a w x h box inside the image (EDGE margin) where `ok` holds."""
    hi_x, hi_y = width - w - EDGE, height - h - EDGE
    if hi_x < EDGE or hi_y < EDGE:
        return None
    for _ in range(PLACE_TRIES):
        x, y = int(rng.integers(EDGE, hi_x + 1)), int(rng.integers(EDGE, hi_y + 1))
        if ok((x, y, x + w, y + h)):
            return x, y
    return None


def _clear_of(reserved: list[Box]) -> Callable[[Box], bool]:
    return lambda box: not any(_intersects(box, r, GAP) for r in reserved)


def _put(rng: np.random.Generator, canvas: _Canvas, sprite: Sprite) -> bool:
    """Place a text or chart sprite in free space and reserve its box; False if it doesn't fit."""
    free = _clear_of(canvas.reserved)
    spot = _find_spot(rng, canvas.width, canvas.height, sprite.width, sprite.height, free)
    if spot is None:
        return False
    sprite.x, sprite.y = spot
    canvas.reserved.append(sprite.box)
    canvas.sprites.append(sprite)
    return True


# --- chart and text ---------------------------------------------------------------------


def _chart(rng: np.random.Generator, ctx: SceneContext, canvas: _Canvas) -> dict[str, Any] | None:
    """Maybe a bar chart (recorded with its box and each bar's box)."""
    if ctx.config.chart_prob <= 0 or rng.random() >= ctx.config.chart_prob:
        return None
    width, height, palette = canvas.width, canvas.height, canvas.palette
    cw, ch = round(width * rng.uniform(0.45, 0.62)), round(height * rng.uniform(0.4, 0.55))
    n = int(rng.integers(3, 7))
    label_sets = [s for s in CHART_LABELS if len(s[0]) == 1 or cw / n >= WIDE_LABEL_SLOT]
    labels = list(label_sets[int(rng.integers(len(label_sets)))][:n])
    values = [int(v) + 1 for v in rng.choice(9, size=n, replace=False)]
    if rng.random() < 0.5 or len(palette) < n:
        colors = [_choice(rng, palette)] * n
    else:
        colors = [palette[int(i)] for i in rng.choice(len(palette), size=n, replace=False)]
    axis = _contrast_color(rng, canvas.bg_names, ("black", "white"))
    spec = {"type": "bar", "labels": labels, "values": values, "colors": colors,
            "show_values": bool(rng.random() < 0.5), "axis_color": axis}  # fmt: skip
    drawing = chart_drawing(spec, cw, ch, COLORS[axis], ctx.fonts)
    sprite = drawing.sprite
    if not _put(rng, canvas, sprite):
        return None
    spec["bbox"] = _xywh(sprite.box)
    spec["bar_bboxes"] = [_xywh((a + sprite.x, b + sprite.y, c + sprite.x, d + sprite.y))
                          for a, b, c, d in drawing.bar_boxes]  # fmt: skip
    return spec


def _texts(rng: np.random.Generator, ctx: SceneContext, canvas: _Canvas) -> list[dict[str, Any]]:
    """Maybe one or two short words in the default font, readable on the background."""
    if ctx.config.text_prob <= 0 or rng.random() >= ctx.config.text_prob:
        return []
    count = 2 if rng.random() < 0.25 else 1
    side = min(canvas.width, canvas.height)
    out = []
    for _ in range(count):
        word = _choice(rng, WORDS)
        word = word.title() if rng.random() < 0.3 else word
        size = int(rng.integers(max(10, side // 14), max(12, side // 8) + 1))
        color = _contrast_color(rng, canvas.bg_names, tuple(COLORS))
        sprite = Sprite(0, 0, text_mask(word, size, ctx.fonts), COLORS[color])
        if not _put(rng, canvas, sprite):
            continue
        out.append({"string": word, "color": color, "bbox": _xywh(sprite.box), "font_size": size,
                    "position": _position(sprite.box, canvas.width, canvas.height)})  # fmt: skip
    return out


# --- objects ----------------------------------------------------------------------------


def _objects(rng: np.random.Generator, ctx: SceneContext, canvas: _Canvas) -> list[_Placed]:
    """Up to the sampled number of objects, each placed clear of text, charts and (mostly) each other."""
    cfg = ctx.config
    count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    placed: list[_Placed] = []
    for _ in range(count):
        use_clipart = ctx.clipart is not None and rng.random() < cfg.clipart_prob
        item = _place_one(rng, ctx, canvas, placed, use_clipart)
        if item is not None:
            placed.append(item)
    return placed


def _place_one(
    rng: np.random.Generator, ctx: SceneContext, canvas: _Canvas, placed: list[_Placed], use_clipart: bool
) -> _Placed | None:
    """Draw one object, shrinking it a size class at a time until it fits somewhere."""
    cfg = ctx.config
    width, height = canvas.width, canvas.height
    category = _choice(rng, cfg.categories)
    color = _choice(rng, canvas.palette)
    first_size = _choice(rng, SIZE_ORDER)
    boxes = [p.sprite.box for p in placed]
    ok_reserved = _clear_of(canvas.reserved)

    def ok(box: Box) -> bool:
        return ok_reserved(box) and _overlap_ok(box, boxes, cfg.max_overlap)

    for size in SIZE_ORDER[SIZE_ORDER.index(first_size) :]:
        lo, hi = cfg.size_range(size)
        extent = rng.uniform(lo, hi) * min(width, height)
        sprite, info = _draw_object(rng, ctx, (category, color), extent, canvas.bg_names, use_clipart)
        spot = _find_spot(rng, width, height, sprite.width, sprite.height, ok)
        if spot is not None:
            sprite.x, sprite.y = spot
            info["size"] = size
            return _Placed(sprite, info)
    return None


def _draw_object(
    rng: np.random.Generator,
    ctx: SceneContext,
    shape_choice: tuple[str, str],
    extent: float,
    bg_names: list[str],
    use_clipart: bool,
) -> tuple[Sprite, dict[str, Any]]:
    """A clip-art picture when asked for (and one fits), else the chosen (category, colour) shape."""
    category, color = shape_choice
    art = None
    if use_clipart and ctx.clipart is not None:
        art = ctx.clipart.sample(rng, extent, [COLORS[c] for c in bg_names])
    if art is not None:
        info = {"category": art.category, "supercategory": "clipart", "color": None,
                "subject": art.subject, "file": art.file}  # fmt: skip
        return Sprite(0, 0, art.mask, art.rgb), info
    # a shape (also when no usable clip-art picture turned up)
    shape = shape_mask(category, extent, rng)
    info = {"category": category, "supercategory": "shape", "color": color, **shape.attributes}
    return Sprite(0, 0, shape.mask, COLORS[color]), info


def _area(box: Box) -> int:
    return max(0, box[2] - box[0]) * max(0, box[3] - box[1])


def _inter(a: Box, b: Box) -> int:
    return _area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))


def _overlap_ok(box: Box, others: list[Box], max_iou: float) -> bool:
    """IoU <= max_iou with every other box, and no box covers much of a smaller one."""
    cover_limit = max(0.25, 2.0 * max_iou)
    for other in others:
        inter = _inter(box, other)
        if inter == 0:
            continue
        a, b = _area(box), _area(other)
        if inter / (a + b - inter) > max_iou or inter / min(a, b) > cover_limit:
            return False
    return True


# --- visibility, positions, relations ---------------------------------------------------


def _visible_masks(placed: list[_Placed]) -> list[np.ndarray]:
    """Each object's mask minus what later (upper) objects cover."""
    masks = [np.asarray(p.sprite.mask) > 0 for p in placed]
    visible = []
    for i, p in enumerate(placed):
        vis = masks[i].copy()
        a = p.sprite.box
        for j in range(i + 1, len(placed)):
            b = placed[j].sprite.box
            if _intersects(a, b):
                ia, ib = _overlap_slices(a, b)
                vis[ia] &= ~masks[j][ib]
        visible.append(vis)
    return visible


def _overlap_slices(a: Box, b: Box) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Array slices of the a∩b region in a's and in b's local coordinates."""
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    sa = (slice(y0 - a[1], y1 - a[1]), slice(x0 - a[0], x1 - a[0]))
    sb = (slice(y0 - b[1], y1 - b[1]), slice(x0 - b[0], x1 - b[0]))
    return sa, sb


def _tight(vis: np.ndarray, origin: tuple[int, int]) -> Box | None:
    rows, cols = np.flatnonzero(vis.any(axis=1)), np.flatnonzero(vis.any(axis=0))
    if rows.size == 0:
        return None
    x, y = origin
    return x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1, y + int(rows[-1]) + 1


def _finish_objects(
    placed: list[_Placed], width: int, height: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Object records (visible tight boxes, area, grid position) and pairwise relations."""
    visible = _visible_masks(placed)
    kept: list[tuple[_Placed, Box]] = []
    objects: list[dict[str, Any]] = []
    for p, vis in zip(placed, visible, strict=True):
        box = _tight(vis, (p.sprite.x, p.sprite.y))
        if box is None:  # entirely hidden under later objects
            continue
        record = {"id": len(objects), **p.info, "bbox": _xywh(box), "area": int(vis.sum()),
                  "position": _position(box, width, height)}  # fmt: skip
        objects.append(_ordered(record))
        kept.append((p, box))
    return objects, _relations(kept)


def _ordered(record: dict[str, Any]) -> dict[str, Any]:
    head = ("id", "category", "supercategory", "color", "size", "bbox", "area", "position")
    return {k: record[k] for k in head} | {k: v for k, v in record.items() if k not in head}


def _relations(kept: list[tuple[_Placed, Box]]) -> list[dict[str, Any]]:
    """`overlapping` when drawn pixels touch; otherwise directions of clearly separated pairs."""
    relations = []
    for i in range(len(kept)):
        for j in range(i + 1, len(kept)):
            (pi, bi), (pj, bj) = kept[i], kept[j]
            for predicate in _predicates(pi.sprite, bi, pj.sprite, bj):
                relations.append({"subject": i, "predicate": predicate, "object": j})
    return relations


def _predicates(si: Sprite, bi: Box, sj: Sprite, bj: Box) -> list[str]:
    if _intersects(si.box, sj.box):
        ia, ib = _overlap_slices(si.box, sj.box)
        if (np.asarray(si.mask)[ia] & np.asarray(sj.mask)[ib]).any():
            return ["overlapping"]
    out = []
    if bi[2] <= bj[0]:
        out.append("left of")
    elif bj[2] <= bi[0]:
        out.append("right of")
    if bi[3] <= bj[1]:
        out.append("above")
    elif bj[3] <= bi[1]:
        out.append("below")
    return out


def _position(box: Box, width: int, height: int) -> str:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    col, row = min(2, int(3 * cx / width)), min(2, int(3 * cy / height))
    return POSITIONS[row * 3 + col]


def _xywh(box: Box) -> list[int]:
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]
