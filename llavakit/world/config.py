"""Configuration and constant tables of the generated world.

Only the standard library is imported here, so the CLI can build its parser
(and show choices in `--help`) without pulling in numpy or PIL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

FORMAT_VERSION = "1"

SPLITS: tuple[str, ...] = ("train", "val", "test")
# Image ids are `SPLIT_ID_OFFSET[split] + index`, so ids never collide across splits.
SPLIT_ID_OFFSET: dict[str, int] = {"train": 0, "val": 100_000_000, "test": 200_000_000}
MAX_IMAGES = 100_000_000

# Named colours with fixed RGB values. Object colours always differ from the
# background by at least MIN_CONTRAST (Euclidean RGB distance).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 60),
    "blue": (30, 80, 220),
    "yellow": (245, 210, 30),
    "orange": (245, 130, 20),
    "purple": (130, 50, 170),
    "pink": (245, 130, 190),
    "brown": (140, 80, 30),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "white": (250, 250, 250),
    "cyan": (30, 200, 220),
}
MIN_CONTRAST = 100.0
# Text and chart axes must also differ in luminance from the background by this much.
TEXT_CONTRAST = 150.0
TEXT_LUMA_CONTRAST = 80.0

# Shape categories; COCO category ids are 1-based positions in this tuple and
# never change. Clip-art categories (if enabled) get ids from CLIPART_ID_BASE on.
SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "ellipse",
    "rectangle",
    "diamond",
    "pentagon",
    "hexagon",
    "octagon",
    "cross",
    "heart",
    "crescent",
    "arrow",
)
CLIPART_ID_BASE = 101
DEFAULT_CLIPART_DIR = "/usr/share/openclipart/png"
# Subject folders of openclipart-png that hold recognisable things (not icons, logos, "unsorted").
DEFAULT_CLIPART_SUBJECTS: tuple[str, ...] = (
    "animals", "buildings", "containers", "electronics", "food", "office", "people", "plants",
    "tools", "transportation",
)  # fmt: skip

# Object extent as a fraction of min(width, height), per size class.
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.14, 0.20),
    "medium": (0.23, 0.31),
    "large": (0.34, 0.45),
}
# Largest object extent (fraction of the shorter side) that object_scale may reach.
MAX_EXTENT = 0.9
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "noise")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
PREDICATES: tuple[str, ...] = ("left of", "right of", "above", "below", "overlapping")

MIN_IMAGE_SIDE = 64
MAX_IMAGE_SIDE = 2048
MAX_OBJECTS = 50


class WorldError(ValueError):
    """A world cannot be generated or loaded as asked; the message names the culprit."""


def _check_names(kind: str, names: tuple[str, ...], known: tuple[str, ...]) -> None:
    if not names:
        raise WorldError(f"at least one {kind} is required")
    for name in names:
        if name not in known:
            raise WorldError(f"unknown {kind} {name!r}; known: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise WorldError(f"duplicate {kind} in {', '.join(names)}")


def _check_prob(name: str, value: float) -> None:
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise WorldError(f"{name} must be in [0, 1], got {value}")


def color_distance(a: str, b: str) -> float:
    """Euclidean RGB distance between two named colours."""
    return math.dist(COLORS[a], COLORS[b])


def luma(name: str) -> float:
    """Rec. 601 luminance (0-255) of a named colour."""
    r, g, b = COLORS[name]
    return 0.299 * r + 0.587 * g + 0.114 * b


@dataclass
class WorldConfig:
    """Everything that determines a generated world; same config → same bytes."""

    out: Path
    """Output directory (created if missing). One directory holds one split."""
    num_images: int = 100
    """Number of images to generate (> 0)."""
    seed: int = 0
    """World seed (>= 0); each image's seed derives from (seed, split, index)."""
    split: str = "train"
    """One of train, val, test; splits draw from disjoint seed streams and id ranges."""
    min_size: int = 128
    """Smallest sampled image side in pixels."""
    max_size: int = 224
    """Largest sampled image side in pixels."""
    width: int | None = None
    """Fixed image width (overrides the sampled one)."""
    height: int | None = None
    """Fixed image height (overrides the sampled one)."""
    min_objects: int = 1
    """Fewest objects to place per image (best effort when space runs out)."""
    max_objects: int = 6
    """Most objects per image."""
    max_overlap: float = 0.05
    """Largest allowed IoU between two object boxes; 0 keeps objects apart."""
    object_scale: float = 1.0
    """Multiplies every size class's extent range (SIZES, fractions of the shorter image side); > 1 draws
    larger objects (e.g. so that each spans several patches of a low-resolution vision tower)."""
    categories: tuple[str, ...] = SHAPES
    """Shape categories to draw (names from SHAPES)."""
    colors: tuple[str, ...] = tuple(COLORS)
    """Object colours (names from COLORS)."""
    backgrounds: tuple[str, ...] = ("plain",)
    """Background kinds to sample from: plain, gradient, noise."""
    background_colors: tuple[str, ...] = tuple(COLORS)
    """Colours a background may take (names from COLORS)."""
    text_prob: float = 0.0
    """Probability that an image carries a short rendered word (OCR-like)."""
    chart_prob: float = 0.0
    """Probability that an image carries a small bar chart."""
    clipart_prob: float = 0.0
    """Probability that each object is a clip-art picture instead of a shape (needs clipart_dir)."""
    clipart_dir: Path = Path(DEFAULT_CLIPART_DIR)
    """Root of the clip-art PNG tree (Debian package openclipart-png); subject folders are categories."""
    clipart_subjects: tuple[str, ...] = DEFAULT_CLIPART_SUBJECTS
    """Top-level subject folders to use; () means every folder. Defaults missing from the tree are skipped,
    explicitly chosen ones must exist."""
    png_compress_level: int = 1
    """zlib level for the PNGs (0-9); low is fast."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.clipart_dir = Path(self.clipart_dir)
        self.categories = tuple(self.categories)
        self.colors = tuple(self.colors)
        self.backgrounds = tuple(self.backgrounds)
        self.background_colors = tuple(self.background_colors)
        self.clipart_subjects = tuple(self.clipart_subjects)
        self._check_counts()
        self._check_sizes()
        _check_names("category", self.categories, SHAPES)
        _check_names("colour", self.colors, tuple(COLORS))
        _check_names("background", self.backgrounds, BACKGROUNDS)
        _check_names("background colour", self.background_colors, tuple(COLORS))
        self._check_contrast()
        for name in ("text_prob", "chart_prob", "clipart_prob"):
            _check_prob(name, getattr(self, name))
        self._check_object_scale()
        if not (0.0 <= self.max_overlap <= 1.0):
            raise WorldError(f"max_overlap must be in [0, 1], got {self.max_overlap}")
        if not (0 <= self.png_compress_level <= 9):
            raise WorldError(f"png_compress_level must be 0..9, got {self.png_compress_level}")

    def _check_counts(self) -> None:
        if not isinstance(self.num_images, int) or self.num_images <= 0:
            raise WorldError(f"num_images must be a positive integer, got {self.num_images!r}")
        if self.num_images > MAX_IMAGES:
            raise WorldError(f"num_images must be at most {MAX_IMAGES}, got {self.num_images}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise WorldError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.split not in SPLITS:
            raise WorldError(f"unknown split {self.split!r}; known: {', '.join(SPLITS)}")
        if not (0 <= self.min_objects <= self.max_objects <= MAX_OBJECTS) or self.max_objects < 1:
            raise WorldError(
                f"need 0 <= min_objects <= max_objects <= {MAX_OBJECTS} and max_objects >= 1, "
                f"got min_objects={self.min_objects}, max_objects={self.max_objects}"
            )

    def _check_sizes(self) -> None:
        for name in ("min_size", "max_size", "width", "height"):
            value = getattr(self, name)
            if value is not None and not (MIN_IMAGE_SIDE <= value <= MAX_IMAGE_SIDE):
                raise WorldError(f"{name} must be in [{MIN_IMAGE_SIDE}, {MAX_IMAGE_SIDE}], got {value}")
        if self.min_size > self.max_size:
            raise WorldError(f"min_size ({self.min_size}) is larger than max_size ({self.max_size})")

    def _check_object_scale(self) -> None:
        top = max(hi for _, hi in SIZES.values())
        scale = self.object_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0.0 < scale <= MAX_EXTENT / top):
            raise WorldError(
                f"object_scale must be in (0, {MAX_EXTENT / top:g}] (the large size class, up to {top:g} of the "
                f"shorter side, may grow to at most {MAX_EXTENT:g}), got {scale!r}"
            )

    def size_range(self, size: str) -> tuple[float, float]:
        """(lo, hi) extent of size class `size` as fractions of the shorter image side, scaled by object_scale."""
        lo, hi = SIZES[size]
        return lo * self.object_scale, hi * self.object_scale

    def _check_contrast(self) -> None:
        for bg in self.background_colors:
            if not any(color_distance(bg, c) >= MIN_CONTRAST for c in self.colors):
                raise WorldError(
                    f"background colour {bg!r} leaves no object colour that stands out from it; "
                    f"add colours or remove {bg!r} from background_colors"
                )

    def to_json(self) -> dict[str, Any]:
        """The config as plain JSON data, without the output path (so it never changes bytes)."""
        data: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "out":
                continue
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            data[f.name] = value
        return data
