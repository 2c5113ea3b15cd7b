"""Clip-art objects from a tree of PNGs (Debian's `openclipart-png`: /usr/share/openclipart/png).

The top-level subject folder of each file is its category (`animals`, `food`, ...); the
folder path below the root is kept as `subject` (e.g. `animals/mammals`). Pictures are
composited with their alpha channel thresholded at 50%, so the mask and box are exact.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .config import CLIPART_ID_BASE, WorldError

ALPHA_THRESHOLD = 128
MAX_CACHED = 2048  # pictures kept in memory, each at most cache_side pixels square
MAX_PIXELS = 2_500_000  # larger pictures (a few posters of 100+ megapixels) are skipped
MAX_DRAWS = 8  # pictures tried per object before giving up (the object becomes a shape)
MAX_ASPECT = 3.0  # longest side at most this many times the shortest
MIN_INK = 0.12  # opaque pixels at least this fraction of extent**2
MIN_MEAN_CONTRAST = 60.0  # RGB distance between a picture's mean colour and the background


@dataclass
class ClipartSprite:
    """A clip-art picture scaled for one object: RGB pixels, binary mask, and where it came from."""

    rgb: Image.Image
    mask: Image.Image
    category: str
    subject: str
    file: str


def missing_message(root: Path) -> str:
    state = "holds no <subject>/*.png folders" if root.is_dir() else "does not exist"
    return (
        f"clip art was requested but {root} {state}; install the clip art with "
        f"`apt-get install openclipart-png` or point clipart_dir (--clipart-dir) at a folder of "
        f"<subject>/.../*.png files"
    )


@dataclass
class ClipartLibrary:
    """The PNG files under `root`, grouped by top-level subject folder, with a small picture cache."""

    root: Path
    files: dict[str, list[str]]
    cache_side: int = 256
    """Pictures are cached downscaled to at most this side (the largest object extent)."""
    _cache: dict[str, Image.Image | None] = field(default_factory=dict, repr=False)

    @classmethod
    def scan(
        cls, root: Path, subjects: tuple[str, ...] = (), reserved: tuple[str, ...] = (), strict: bool = False
    ) -> ClipartLibrary:
        """Index every `*.png` under `root/<subject>/`.

        `subjects` limits the folders (all when empty); with `strict` each must exist.
        Subjects whose name is in `reserved` (the shape names) are skipped. Raises WorldError
        when nothing usable is found.
        """
        root = Path(root)
        if not root.is_dir():
            raise WorldError(missing_message(root))
        folders = {p.name: p for p in root.iterdir() if p.is_dir()}
        if strict:
            for name in subjects:
                if name not in folders:
                    known = ", ".join(sorted(folders)) or "none"
                    raise WorldError(f"unknown clip-art subject {name!r} in {root}; found: {known}")
        files: dict[str, list[str]] = {}
        for folder in sorted(folders):
            name = _category_name(folder)
            if (subjects and folder not in subjects) or name in reserved:
                continue
            pngs = sorted(str(p.relative_to(root)) for p in folders[folder].rglob("*.png") if p.is_file())
            if pngs:
                files[name] = pngs
        if not files:
            raise WorldError(missing_message(root))
        return cls(root, files)

    @property
    def categories(self) -> list[str]:
        return sorted(self.files)

    def category_ids(self) -> dict[str, int]:
        return {name: CLIPART_ID_BASE + i for i, name in enumerate(self.categories)}

    def sample(
        self, rng: np.random.Generator, extent: float, background: list[tuple[int, int, int]]
    ) -> ClipartSprite | None:
        """Pick a category and a picture uniformly and scale it to fit `extent` pixels.

        Pictures that cannot be used (unreadable, huge), come out as slivers (very elongated,
        little ink) or whose mean colour is close to a `background` colour are redrawn a few
        times; None if every draw failed.
        """
        for _ in range(MAX_DRAWS):
            sprite = self._sample_once(rng, extent)
            if sprite is not None and _usable(sprite, extent, background):
                return sprite
        return None

    def _sample_once(self, rng: np.random.Generator, extent: float) -> ClipartSprite | None:
        category = self.categories[int(rng.integers(len(self.files)))]
        names = self.files[category]
        rel = names[int(rng.integers(len(names)))]
        picture = self._load(rel)
        if picture is None:
            return None
        scale = extent / max(picture.size)
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        picture = picture.resize(size, Image.Resampling.BILINEAR)
        alpha = picture.getchannel("A")
        mask = alpha.point(lambda a: 255 if a >= ALPHA_THRESHOLD else 0)
        box = mask.getbbox()
        if box is None:
            return None
        rgb = picture.convert("RGB").crop(box)
        return ClipartSprite(rgb, mask.crop(box), category, str(Path(rel).parent), rel)

    def _load(self, rel: str) -> Image.Image | None:
        """The picture as RGBA, downscaled to cache_side; None if unreadable or too large."""
        if rel in self._cache:
            return self._cache[rel]
        picture = _read_small(self.root / rel, self.cache_side)
        if len(self._cache) >= MAX_CACHED:
            self._cache.pop(next(iter(self._cache)))
        self._cache[rel] = picture
        return picture


def _usable(sprite: ClipartSprite, extent: float, background: list[tuple[int, int, int]]) -> bool:
    w, h = sprite.mask.size
    ink = np.asarray(sprite.mask) > 0
    if max(w, h) > MAX_ASPECT * min(w, h) or ink.sum() < MIN_INK * extent * extent:
        return False
    mean = np.asarray(sprite.rgb, dtype=np.float32)[ink].mean(axis=0)
    return all(float(np.linalg.norm(mean - np.asarray(bg))) >= MIN_MEAN_CONTRAST for bg in background)


def _read_small(path: Path, side: int) -> Image.Image | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    return None
                picture = im.convert("RGBA")
        except (OSError, ValueError, Image.DecompressionBombError):
            return None
    picture.thumbnail((side, side), Image.Resampling.BILINEAR)
    return picture


def _category_name(folder: str) -> str:
    return folder.replace("_", " ").replace("-", " ").strip().lower()
