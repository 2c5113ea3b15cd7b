"""COCO instances and captions files for a generated world.

Category ids are stable: shapes are 1.. in `SHAPES` order (all listed whatever the config
draws), clip-art subjects follow from `CLIPART_ID_BASE` in name order. Annotation ids are
`image_id * 1000 + k + 1` and caption ids `image_id * 10 + k + 1`, so they are unique
across splits too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import FORMAT_VERSION, SHAPES

ANN_ID_STRIDE = 1000
CAPTION_ID_STRIDE = 10


def shape_category_ids() -> dict[str, int]:
    return {name: i + 1 for i, name in enumerate(SHAPES)}


def categories_table(clipart_ids: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """COCO `categories`: every shape, then any clip-art subjects."""
    table = [{"id": i, "name": n, "supercategory": "shape"} for n, i in shape_category_ids().items()]
    for name, cid in sorted((clipart_ids or {}).items(), key=lambda kv: kv[1]):
        table.append({"id": cid, "name": name, "supercategory": "clipart"})
    return table


@dataclass
class CocoWriter:
    """Collects images, object annotations and captions; writes the two COCO files."""

    info: dict[str, Any]
    category_ids: dict[str, int]
    categories: list[dict[str, Any]]
    images: list[dict[str, Any]] = field(default_factory=list)
    annotations: list[dict[str, Any]] = field(default_factory=list)
    captions: list[dict[str, Any]] = field(default_factory=list)

    def add(self, scene: dict[str, Any]) -> None:
        """Add one scene graph (with its captions)."""
        image_id = scene["image_id"]
        self.images.append({"id": image_id, "file_name": scene["file_name"],
                            "width": scene["width"], "height": scene["height"]})  # fmt: skip
        for k, obj in enumerate(scene["objects"]):
            x, y, w, h = obj["bbox"]
            self.annotations.append({
                "id": image_id * ANN_ID_STRIDE + k + 1,
                "image_id": image_id,
                "category_id": self.category_ids[obj["category"]],
                "bbox": [x, y, w, h],
                "area": obj["area"],
                "iscrowd": 0,
                "attributes": {"color": obj["color"], "size": obj["size"]},
            })  # fmt: skip
        for k, text in enumerate(scene["captions"]):
            self.captions.append({"id": image_id * CAPTION_ID_STRIDE + k + 1, "image_id": image_id,
                                  "caption": text})  # fmt: skip

    def write(self, annotations_dir: Path) -> None:
        annotations_dir.mkdir(parents=True, exist_ok=True)
        instances = {"info": self.info, "licenses": [], "images": self.images,
                     "categories": self.categories, "annotations": self.annotations}  # fmt: skip
        captions = {"info": self.info, "licenses": [], "images": self.images, "annotations": self.captions}
        _dump(annotations_dir / "instances.json", instances)
        _dump(annotations_dir / "captions.json", captions)


def coco_info(split: str, seed: int) -> dict[str, Any]:
    return {"description": f"llavakit generated world ({split})", "version": FORMAT_VERSION,
            "contributor": "llavakit", "split": split, "seed": seed}  # fmt: skip


def _dump(path: Path, data: Any) -> None:
    text = json.dumps(data, separators=(",", ":"))  # one-shot dumps uses the C encoder
    path.write_text(text, encoding="utf-8")
