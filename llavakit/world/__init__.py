"""The generated world: synthetic images with COCO annotations, captions and scene graphs.

`generate_world(WorldConfig(out=..., num_images=...))` writes the layout described in
docs/world-format.md; `load_scenes(dir)` reads the scene graphs back. numpy and PIL are
imported only when these are called.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import WorldConfig, WorldError

if TYPE_CHECKING:
    from .generate import WorldSummary

__all__ = ["WorldConfig", "WorldError", "generate_world", "load_scenes"]


def generate_world(config: WorldConfig, progress: Callable[[int], None] | None = None) -> WorldSummary:
    """Generate one split of the world into `config.out`; returns a summary (count, time, rate).

    `progress`, if given, is called with the number of images done after each image.
    """
    from .generate import generate_world as _generate

    return _generate(config, progress)


def load_scenes(directory: str | Path, check_images: bool = True) -> list[dict[str, Any]]:
    """The scene graphs in DIR/scenes.jsonl; FileNotFoundError names any missing file."""
    from .load import load_scenes as _load

    return _load(directory, check_images=check_images)
