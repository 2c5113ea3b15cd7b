"""Reading a generated world back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import WorldError

REQUIRED_FILES: tuple[str, ...] = (
    "world.json",
    "scenes.jsonl",
    "annotations/instances.json",
    "annotations/captions.json",
)


def check_world(directory: str | Path) -> Path:
    """Raise FileNotFoundError naming the first missing piece of a world directory."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"world directory {root} does not exist")
    for rel in REQUIRED_FILES:
        if not (root / rel).is_file():
            raise FileNotFoundError(f"world directory {root} is missing {rel}")
    return root


def load_world_info(directory: str | Path) -> dict[str, Any]:
    """The contents of DIR/world.json (the generator config and tables)."""
    root = check_world(directory)
    with (root / "world.json").open(encoding="utf-8") as f:
        return json.load(f)


def load_scenes(directory: str | Path, check_images: bool = True) -> list[dict[str, Any]]:
    """All scene graphs of a world, in index order; checks the files (and images) exist."""
    root = check_world(directory)
    scenes = []
    with (root / "scenes.jsonl").open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                scenes.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise WorldError(f"{root / 'scenes.jsonl'} line {lineno} is not valid JSON: {exc}") from exc
    if check_images:
        missing = [s["file_name"] for s in scenes if not (root / s["file_name"]).is_file()]
        if missing:
            raise FileNotFoundError(
                f"world directory {root} is missing {len(missing)} image(s), first {missing[0]}"
            )
    return scenes
