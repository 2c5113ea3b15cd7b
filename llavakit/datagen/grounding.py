"""Grounding records: short questions whose answer only the image holds, asked of small scenes.

"What color is the shape?" and "What shape is it?" of a single-object scene carry nothing about the
answer, so only the image can answer them. On the default world a LoRA instruct run from the align
model first learns to read colour from these, and only then from the recipe's mixed, bound questions
("What color is the circle?" among up to six objects), which alone never leave the answer prior in 223
steps (docs/default-model.md, "Does the pipeline read images at all?"). The recipe's `ground` step
trains on them before `instruct`.

The other attributes ask of scenes with two or more objects, in the same fixed wordings: the colour of
an object whose shape is unique in its scene (`color_of`), the shape of one whose colour is (`shape_of`;
each object is named by one of the two at most, as the one answer would give the other away), how many
shapes there are (`count`), and whether a shape is there (`exists`: a shape that is there or, as often,
one of the world's shapes that is not), and where an object is (`position`: the world's 3x3 cell of the only
object, or of one whose shape is unique in its scene; objects without a recorded position are not asked). Existence and count come first in a
record (`FIRST`): an earlier "What color is the star?" would tell that a star is there. (The other way round
a lean remains: a "yes" to "Is there a star?" narrows a later "What shape is the cyan one?".) Objects without
a colour (clip art) are asked only their shape.

Reads a `llavakit world` split (its `scenes.jsonl`); scenes that no asked attribute applies to (a
chart-only scene, or a two-object scene when only `color`/`shape` are asked) are left out and counted.
Records carry `provenance.qtypes`, one per answer (experiments/image_use.py scores them per question).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from llavakit.datagen.annotations import POSITIONS

GROUNDING_VERSION = "2"
"""Changes whenever the records of the same scenes change (the recipe's ground step hashes it). 2: count
asked before any object is named; objects without a colour (clip art) asked only their shape."""

QA = tuple[str, str, int | None]
"""(question, answer, index of the object it names or None)."""


def _color(objects: list[dict], _: list[str], __: int) -> list[QA]:
    single = len(objects) == 1 and objects[0].get("color")
    return [("What color is the shape? Answer with one word.", objects[0]["color"], None)] if single else []


def _shape(objects: list[dict], _: list[str], __: int) -> list[QA]:
    return [("What shape is it? Answer with one word.", objects[0]["category"], None)] if len(objects) == 1 else []


def _color_of(objects: list[dict], _: list[str], __: int) -> list[QA]:
    shapes = Counter(o["category"] for o in objects)
    return [(f"What color is the {o['category']}? Answer with one word.", o["color"], i)
            for i, o in enumerate(objects) if len(objects) > 1 and shapes[o["category"]] == 1 and o.get("color")]


def _shape_of(objects: list[dict], _: list[str], __: int) -> list[QA]:
    colors = Counter(o.get("color") for o in objects)
    return [(f"What shape is the {o['color']} one? Answer with one word.", o["category"], i)
            for i, o in enumerate(objects) if len(objects) > 1 and o.get("color") and colors[o["color"]] == 1]


def _count(objects: list[dict], _: list[str], __: int) -> list[QA]:
    return [("How many shapes are there? Answer with a number.", str(len(objects)), None)] if len(objects) > 1 else []


def _exists(objects: list[dict], shapes: list[str], pick: int) -> list[QA]:
    present = sorted({o["category"] for o in objects})
    absent = [s for s in shapes if s not in present]
    if len(objects) < 2 or not absent:
        return []
    shape, answer = (present[pick // 2 % len(present)], "yes") if pick % 2 else (absent[pick // 2 % len(absent)], "no")
    return [(f"Is there a {shape} in the image? Answer yes or no.", answer, None)]


def _position(objects: list[dict], _: list[str], __: int) -> list[QA]:
    ask = f"Answer with one of: {', '.join(POSITIONS)}."
    if len(objects) == 1:
        return [(f"Where is the shape? {ask}", objects[0]["position"], None)] if objects[0].get("position") else []
    shapes = Counter(o["category"] for o in objects)
    return [(f"Where is the {o['category']}? {ask}", o["position"], i)
            for i, o in enumerate(objects) if shapes[o["category"]] == 1 and o.get("position")]


FIRST = {"exists": 0, "count": 1}
"""Asked before the other attributes, in this order: the questions that name objects would give their answers
away ("What color is the star?" says there is a star; after two objects are named, "How many shapes are there?"
in a scene of two or three is nearly answered)."""

ATTRIBUTES: dict[str, Callable[[list[dict], list[str], int], list[QA]]] = {
    "color": _color, "shape": _shape, "color_of": _color_of, "shape_of": _shape_of, "count": _count, "exists": _exists,
    "position": _position,
}
"""Attribute -> (scene objects, the world's shapes, a per-scene number) -> its questions of that scene."""


def grounding_records(world: Path, attributes: tuple[str, ...] = ("color", "shape")) -> tuple[list[dict], int]:
    """(records, scenes left out) for world split `world`; image paths are relative to `world/images`."""
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown or not attributes or len(set(attributes)) != len(attributes):
        raise ValueError(f"grounding attributes {list(attributes)}: each at most once; known are {', '.join(ATTRIBUTES)}")
    scenes = _read_scenes(Path(world) / "scenes.jsonl")
    shapes = sorted({o["category"] for scene in scenes for o in scene["objects"]})
    ordered = sorted(attributes, key=lambda a: FIRST.get(a, len(FIRST)))  # see FIRST
    out, skipped = [], 0
    for scene in scenes:
        sid = f"{scene['split']}-{scene['image_id']}"
        pick = int(hashlib.sha256(sid.encode()).hexdigest()[:8], 16)  # the per-scene choices: fixed per scene
        asked = _one_per_object([(a, qa) for a in ordered for qa in ATTRIBUTES[a](scene["objects"], shapes, pick)], pick)
        if not asked:
            skipped += 1
            continue
        out.append(_record(sid, Path(scene["file_name"]).name, asked))
    return out, skipped


def _one_per_object(asked: list[tuple[str, QA]], pick: int) -> list[tuple[str, QA]]:
    """At most one question naming each object: "What color is the circle?" -> "green" would give away "What
    shape is the green one?". Which one an object keeps is fixed per scene (bits of `pick`)."""
    named: dict[int, list[int]] = {}
    for n, (_, qa) in enumerate(asked):
        if qa[2] is not None:
            named.setdefault(qa[2], []).append(n)
    drop = {n for obj, ns in named.items() for k, n in enumerate(ns) if k != (pick >> (8 + obj)) % len(ns)}
    return [item for n, item in enumerate(asked) if n not in drop]


def _read_scenes(path: Path) -> list[dict]:
    """Every scene of `path`; a malformed one raises naming its line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no scenes.jsonl (a `llavakit world` split dir is needed)")
    scenes = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            scene = json.loads(line)
            missing = [k for k in ("split", "image_id", "file_name", "objects") if k not in scene]
            bad = [o for o in scene.get("objects") or [] if not o.get("category")]
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}:{n}: not a scene record ({exc!r})") from None
        if missing or bad:
            raise ValueError(f"{path}:{n}: not a scene record (" + (f"no {missing}" if missing else
                             "an object without a category") + ")")
        scenes.append(scene)
    return scenes


def _record(sid: str, image: str, asked: list[tuple[str, QA]]) -> dict:
    turns = []
    for i, (_, (question, answer, _obj)) in enumerate(asked):
        turns += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + question},
                  {"from": "gpt", "value": str(answer)}]
    return {"id": sid, "image": image, "conversations": turns,
            "provenance": {"source": "llavakit.datagen.grounding", "qtypes": [a for a, _ in asked]}}
