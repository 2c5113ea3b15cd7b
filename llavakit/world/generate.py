"""The generation loop: sample, caption, render and write every image of one split."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .captions import make_captions
from .clipart import ClipartLibrary
from .coco import CocoWriter, categories_table, coco_info, shape_category_ids
from .config import (
    COLORS,
    DEFAULT_CLIPART_SUBJECTS,
    FORMAT_VERSION,
    POSITIONS,
    PREDICATES,
    SHAPES,
    SIZES,
    SPLIT_ID_OFFSET,
    WorldConfig,
    WorldError,
)
from .render import background_image, compose
from .scene import SceneContext, sample_scene

WRITE_PROBE = ".llavakit-write-probe"


@dataclass
class WorldSummary:
    """What `generate_world` did."""

    out: Path
    split: str
    num_images: int
    num_objects: int
    seconds: float

    @property
    def images_per_sec(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        return (
            f"wrote {self.num_images} {self.split} images ({self.num_objects} objects) to {self.out} "
            f"in {self.seconds:.2f}s ({self.images_per_sec:.0f} images/s)"
        )


def prepare_out(out: Path) -> None:
    """Create DIR/images and DIR/annotations, or raise WorldError saying why DIR is unusable."""
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / "annotations").mkdir(exist_ok=True)
        probe = out / WRITE_PROBE
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise WorldError(f"output directory {out} is not writable: {reason}") from exc


def open_clipart(config: WorldConfig) -> ClipartLibrary:
    """The clip-art library for a config (custom subject lists must all exist)."""
    strict = config.clipart_subjects != DEFAULT_CLIPART_SUBJECTS
    library = ClipartLibrary.scan(config.clipart_dir, config.clipart_subjects, SHAPES, strict=strict)
    longest_side = max(config.max_size, config.width or 0, config.height or 0)
    library.cache_side = math.ceil(config.size_range("large")[1] * longest_side) + 2
    return library


def category_ids(clipart: ClipartLibrary | None) -> tuple[dict[str, int], dict[str, int]]:
    """(all category ids, clip-art ids only)."""
    extra = {} if clipart is None else clipart.category_ids()
    return shape_category_ids() | extra, extra


def generate_world(config: WorldConfig, progress: Callable[[int], None] | None = None) -> WorldSummary:
    """Generate `config.num_images` images with annotations into `config.out`; see docs/world-format.md."""
    start = time.perf_counter()
    clipart = open_clipart(config) if config.clipart_prob > 0 else None
    prepare_out(config.out)
    ids, clipart_ids = category_ids(clipart)
    ctx = SceneContext(config, clipart=clipart)
    writer = CocoWriter(coco_info(config.split, config.seed), ids, categories_table(clipart_ids))
    offset = SPLIT_ID_OFFSET[config.split]
    num_objects = 0
    with (config.out / "scenes.jsonl").open("w", encoding="utf-8") as lines:
        for index in range(config.num_images):
            record = generate_one(ctx, index, offset + index)
            lines.write(json.dumps(record, separators=(",", ":")) + "\n")
            writer.add(record)
            num_objects += len(record["objects"])
            if progress is not None:
                progress(index + 1)
    writer.write(config.out / "annotations")
    write_world_json(config, writer.categories, num_objects)
    seconds = time.perf_counter() - start
    return WorldSummary(config.out, config.split, config.num_images, num_objects, seconds)


def generate_one(ctx: SceneContext, index: int, image_id: int) -> dict[str, Any]:
    """Sample, caption, render and save one image; return its scene-graph record."""
    scene = sample_scene(ctx, index, image_id)
    record = scene.record
    record["captions"] = make_captions(record, np.random.default_rng([record["seed"], 1]))
    image = compose(background_image(record["background"], record["width"], record["height"]), scene.sprites)
    image.save(ctx.config.out / record["file_name"], "PNG", compress_level=ctx.config.png_compress_level)
    return record


def write_world_json(config: WorldConfig, categories: list[dict[str, Any]], num_objects: int) -> None:
    from llavakit import __version__

    data = {
        "format_version": FORMAT_VERSION,
        "generator": "llavakit.world",
        "llavakit_version": __version__,
        "split": config.split,
        "seed": config.seed,
        "num_images": config.num_images,
        "num_objects": num_objects,
        "image_id_offset": SPLIT_ID_OFFSET[config.split],
        "config": config.to_json(),
        "categories": categories,
        "colors": {name: list(rgb) for name, rgb in COLORS.items()},
        "sizes": {name: list(config.size_range(name)) for name in SIZES},
        "positions": list(POSITIONS),
        "predicates": list(PREDICATES),
    }
    with (config.out / "world.json").open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
