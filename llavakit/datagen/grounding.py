"""Grounding records: the same attribute questions asked of every single-object scene.

"What color is the shape?" and "What shape is it?" carry nothing about the answer, so only the image
can answer them. On the default world a LoRA instruct run from the align model first learns to read
colour from these, and only then from the recipe's mixed, bound questions ("What color is the circle?"
among up to six objects), which alone never leave the answer prior in 223 steps (docs/default-model.md,
"Does the pipeline read images at all?"). The recipe's `ground` step trains on them before `instruct`.

Reads a `llavakit world` split (its `scenes.jsonl`); scenes without exactly one object (a chart-only
scene, say) are left out and counted. Records carry `provenance.qtypes` (experiments/image_use.py
scores them per question).
"""

from __future__ import annotations

import json
from pathlib import Path

ATTRIBUTES: dict[str, tuple[str, str]] = {
    "color": ("What color is the shape? Answer with one word.", "color"),
    "shape": ("What shape is it? Answer with one word.", "category"),
}
"""Attribute -> (question, the scene object's key holding the answer)."""


def grounding_records(world: Path, attributes: tuple[str, ...] = ("color", "shape")) -> tuple[list[dict], int]:
    """(records, scenes left out) for world split `world`; image paths are relative to `world/images`."""
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown or not attributes:
        raise ValueError(f"grounding attributes {list(attributes)}: known are {', '.join(ATTRIBUTES)}")
    path = Path(world) / "scenes.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no scenes.jsonl (a `llavakit world` split dir is needed)")
    out, skipped = [], 0
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            scene = json.loads(line)
            objects, image, sid = scene["objects"], Path(scene["file_name"]).name, f"{scene['split']}-{scene['image_id']}"
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: not a scene record ({exc!r})") from None
        if len(objects) != 1:
            skipped += 1
            continue
        out.append(_record(sid, image, objects[0], attributes, f"{path}:{n}"))
    return out, skipped


def _record(sid: str, image: str, obj: dict, attributes: tuple[str, ...], where: str) -> dict:
    turns = []
    for i, attribute in enumerate(attributes):
        question, key = ATTRIBUTES[attribute]
        if not obj.get(key):
            raise ValueError(f"{where}: the object has no {key!r}")
        turns += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + question},
                  {"from": "gpt", "value": str(obj[key])}]
    return {"id": sid, "image": image, "conversations": turns,
            "provenance": {"source": "llavakit.datagen.grounding", "qtypes": list(attributes)}}
