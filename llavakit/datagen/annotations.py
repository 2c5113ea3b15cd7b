"""Read COCO-style annotations (and a world's `scenes.jsonl`) into one in-memory scene per image.

Inputs (see docs/world-format.md):

- `instances.json` (COCO instances: images, categories, annotations with `bbox [x, y, w, h]` in
  pixels, optional `attributes: {color, size}`) — required;
- `captions.json` (COCO captions) — optional but needed by LLM teachers for `conversation`;
- `scenes.jsonl` (full scene graphs from `llavakit world`) — optional; when present it is the
  source of objects, relations, background, text and chart for the offline teacher.

With only COCO files, grid positions and left/right/above/below relations are computed from the
boxes, so the offline teacher still works from categories, boxes, attributes and captions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llavakit.world.config import POSITIONS  # the nine cells, one definition (standard library only)

OPPOSITE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


class AnnotationError(ValueError):
    """Annotations that cannot be read; the message names the file and the culprit."""


@dataclass
class SceneObject:
    """One object of an image, in pixels."""

    index: int
    category: str
    bbox: tuple[float, float, float, float]
    """[x, y, w, h] in pixels (COCO convention)."""
    position: str
    """3x3 grid cell of the box centre (one of POSITIONS)."""
    color: str | None = None
    size: str | None = None
    supercategory: str | None = None
    iscrowd: bool = False
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def center(self) -> tuple[float, float]:
        x, y, w, h = self.bbox
        return x + w / 2, y + h / 2


@dataclass
class ImageEntry:
    """Everything known about one image."""

    image_id: int | str
    file_name: str
    """Path of the image relative to the images directory."""
    width: int
    height: int
    captions: list[str] = field(default_factory=list)
    objects: list[SceneObject] = field(default_factory=list)
    relations: set[tuple[int, str, int]] = field(default_factory=set)
    """(subject index, predicate, object index) with predicate in left of/right of/above/below;
    closed under inversion (a left of b <=> b right of a)."""
    background: dict[str, Any] | None = None
    texts: list[dict[str, Any]] = field(default_factory=list)
    chart: dict[str, Any] | None = None
    has_scene: bool = False

    def normalized_box(self, obj: SceneObject) -> list[float]:
        """[x1, y1, x2, y2] normalised to [0, 1] with 3 decimals (the paper's context format)."""
        x, y, w, h = obj.bbox
        W, H = float(self.width), float(self.height)
        return [
            round(min(max(x / W, 0.0), 1.0), 3),
            round(min(max(y / H, 0.0), 1.0), 3),
            round(min(max((x + w) / W, 0.0), 1.0), 3),
            round(min(max((y + h) / H, 0.0), 1.0), 3),
        ]

    def context(self, with_boxes: bool) -> str:
        """The teacher's view of the image: captions, a blank line, then `category: [x1, y1, x2, y2]`."""
        parts = ["\n".join(c.strip() for c in self.captions if c.strip())]
        if with_boxes and self.objects:
            lines = []
            for obj in self.objects:
                box = ", ".join(f"{v:.3f}" for v in self.normalized_box(obj))
                lines.append(f"{obj.category}: [{box}]")
            parts.append("\n".join(lines))
        return "\n\n".join(p for p in parts if p)


@dataclass
class Dataset:
    """All images (sorted by id) plus dataset-wide vocabularies used by the offline teacher."""

    images: list[ImageEntry]
    categories: list[str]
    """All category names of instances.json, in id order."""
    supercategories: dict[str, str]
    colors: list[str]
    """Every colour seen anywhere in the dataset: objects, backgrounds, text (sorted)."""
    sizes: list[str]
    sources: dict[str, str]
    """Which files were read (for provenance and the report)."""
    skipped_missing_images: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.by_id = {img.image_id: img for img in self.images}

    @property
    def thing(self) -> str:
        """The noun for an object: 'shape' when every category is a shape, else 'object'."""
        sup = set(self.supercategories.values())
        return "shape" if sup == {"shape"} else "object"


def grid_position(cx: float, cy: float, width: float, height: float) -> str:
    col = min(2, max(0, int(3 * cx / width))) if width > 0 else 1
    row = min(2, max(0, int(3 * cy / height))) if height > 0 else 1
    return POSITIONS[3 * row + col]


def box_relations(objects: list[SceneObject]) -> set[tuple[int, str, int]]:
    """left of / right of / above / below for clearly separated boxes (no overlap on that axis)."""
    rels: set[tuple[int, str, int]] = set()
    for a in objects:
        ax, ay, aw, ah = a.bbox
        for b in objects:
            if a.index == b.index:
                continue
            bx, by, bw, bh = b.bbox
            if ax + aw <= bx:
                rels.add((a.index, "left of", b.index))
                rels.add((b.index, "right of", a.index))
            if ay + ah <= by:
                rels.add((a.index, "above", b.index))
                rels.add((b.index, "below", a.index))
    return rels


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None


def _need(obj: Any, key: str, path: Path, what: str) -> Any:
    if not isinstance(obj, dict):
        raise AnnotationError(f"{path}: {what} must be a JSON object, got {obj!r:.60}")
    if key not in obj:
        raise AnnotationError(f"{path}: {what} lacks {key!r}")
    return obj[key]


def _id(obj: Any, key: str, path: Path, what: str) -> int | str:
    """obj[key] as an id: an integer or a string (ids are dict keys and sort keys)."""
    value = _need(obj, key, path, what)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise AnnotationError(f"{path}: {what}: {key!r} must be an integer or a string, got {value!r:.60}")
    return value


def _number(value: Any, cast: type, path: Path | None, what: str) -> float | int:
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise AnnotationError(f"{path}: {what} must be a number, got {value!r:.60}") from None


def _order(value: Any) -> tuple:
    """A sort key for ids of mixed types: integers first, then everything else as text."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    return (0, value, "") if is_int else (1, 0, str(value))


def _read_scenes(path: Path) -> dict[Any, dict]:
    scenes: dict[Any, dict] = {}
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            scene = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AnnotationError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
        scenes[_id(scene, "image_id", path, f"line {lineno}")] = scene
    return scenes


def _image_lookup(images_dir: Path):
    """A fast existence test for files under images_dir (one directory listing, then stat for subdirs)."""
    try:
        flat = {e.name for e in os.scandir(images_dir) if not e.is_dir()}
    except FileNotFoundError:
        raise AnnotationError(f"images dir not found: {images_dir}") from None

    def exists(rel: str) -> bool:
        if "/" not in rel:
            return rel in flat
        return (images_dir / rel).is_file()

    return exists


def resolve_file_name(file_name: str, exists) -> str | None:
    """The image's path relative to the images dir: as given, else its basename, else None."""
    for cand in (file_name, file_name.split("/", 1)[1] if file_name.startswith("images/") else None,
                 os.path.basename(file_name)):
        if cand and exists(cand):
            return cand
    return None


def load_dataset(
    instances: Path,
    images_dir: Path,
    *,
    captions: Path | None = None,
    scenes: Path | None = None,
    check_images: bool = True,
    allow_missing_images: bool = False,
    limit: int | None = None,
) -> Dataset:
    """Read the annotations into a Dataset (images sorted by id; `limit` keeps the first N)."""
    cats, images, per_image = _read_instances(instances)
    supercats = {c["name"]: c.get("supercategory") or "" for c in cats.values()}
    if captions is not None:
        _add_captions(images, captions)
    scene_map = _read_scenes(scenes) if scenes is not None else {}
    for iid, entry in images.items():
        scene = scene_map.get(iid)
        if scene is not None:
            _fill_from_scene(entry, scene, supercats, scenes)
        else:
            _fill_from_instances(entry, per_image.get(iid, []), cats, instances)
        _check_boxes(entry, scenes if scene is not None else instances)

    ordered = sorted(images.values(), key=lambda e: _order(e.image_id))
    if limit is not None:
        ordered = ordered[:limit]
    skipped: list[str] = []
    if check_images:
        ordered, skipped = _find_images(ordered, images_dir, instances, allow_missing_images)

    colors = {o.color for e in ordered for o in e.objects if o.color}
    colors |= {str(e.background["color"]) for e in ordered if e.background and e.background.get("color")}
    colors |= {str(t["color"]) for e in ordered for t in e.texts if t.get("color")}
    sizes = [s for s in ("small", "medium", "large") if any(o.size == s for e in ordered for o in e.objects)]
    sources = {"instances": str(instances), "images_dir": str(images_dir)}
    if captions is not None:
        sources["captions"] = str(captions)
    if scenes is not None:
        sources["scenes"] = str(scenes)
    return Dataset(
        images=ordered,
        categories=[cats[k]["name"] for k in sorted(cats)],
        supercategories=supercats,
        colors=sorted(colors),
        sizes=sizes,
        sources=sources,
        skipped_missing_images=skipped,
    )


def _read_instances(instances: Path) -> tuple[dict[int, dict], dict[Any, ImageEntry], dict[Any, list[dict]]]:
    """(categories by id, images by id, annotations per image id) of a COCO instances file, checked."""
    inst = _read_json(instances)
    for key in ("images", "annotations", "categories"):
        if not isinstance(inst.get(key) if isinstance(inst, dict) else None, list):
            raise AnnotationError(f"{instances}: not a COCO instances file (no {key!r} list)")
    cats: dict[int, dict] = {}
    for c in inst["categories"]:
        cats[_id(c, "id", instances, "a category")] = c
        _need(c, "name", instances, f"category {c.get('id')}")
    images: dict[Any, ImageEntry] = {}
    for im in inst["images"]:
        iid = _id(im, "id", instances, "an image")
        images[iid] = ImageEntry(
            image_id=iid,
            file_name=str(_need(im, "file_name", instances, f"image {iid}")),
            width=_side(im, "width", instances, iid),
            height=_side(im, "height", instances, iid),
        )
    per_image: dict[Any, list[dict]] = {}
    for ann in inst["annotations"]:
        iid = _id(ann, "image_id", instances, "an annotation")
        if iid not in images:
            raise AnnotationError(f"{instances}: annotation {ann.get('id')} refers to unknown image_id {iid}")
        if _id(ann, "category_id", instances, f"annotation {ann.get('id')}") not in cats:
            raise AnnotationError(
                f"{instances}: annotation {ann.get('id')} has unknown category_id {ann['category_id']}"
            )
        per_image.setdefault(iid, []).append(ann)
    return cats, images, per_image


def _add_captions(images: dict[Any, ImageEntry], captions: Path) -> None:
    """Append each image's captions from a COCO captions file (whitespace collapsed, in caption id order)."""
    caps = _read_json(captions)
    if not isinstance(caps, dict) or not isinstance(caps.get("annotations"), list):
        raise AnnotationError(f"{captions}: not a COCO captions file (no 'annotations' list)")
    for ann in caps["annotations"]:
        _id(ann, "image_id", captions, "a caption")
    for ann in sorted(caps["annotations"], key=lambda a: (_order(a["image_id"]), _order(a.get("id", 0)))):
        iid = ann["image_id"]
        text = _need(ann, "caption", captions, f"caption {ann.get('id')}")
        if iid in images and isinstance(text, str) and text.strip():
            images[iid].captions.append(" ".join(text.split()))


def _find_images(ordered: list[ImageEntry], images_dir: Path, instances: Path,
                 allow_missing: bool) -> tuple[list[ImageEntry], list[str]]:
    """(entries whose image file exists, file_name resolved; file names missing). Missing ones are an error
    naming them unless `allow_missing`."""
    exists = _image_lookup(images_dir)
    kept, skipped = [], []
    for entry in ordered:
        rel = resolve_file_name(entry.file_name, exists)
        if rel is None:
            skipped.append(entry.file_name)
        else:
            entry.file_name = rel
            kept.append(entry)
    if skipped and not allow_missing:
        raise AnnotationError(
            f"{len(skipped)} of {len(ordered)} images listed in {instances} are missing from {images_dir} "
            f"(first: {', '.join(skipped[:3])}); pass --allow-missing-images to skip them"
        )
    return kept, skipped


def _side(im: dict, key: str, path: Path, iid: Any) -> int:
    value = _number(_need(im, key, path, f"image {iid}"), int, path, f"image {iid}: {key}")
    if value <= 0:
        raise AnnotationError(f"{path}: image {iid}: {key} must be > 0, got {value}")
    return value


def _bbox(bbox: Any, path: Path | None, what: str) -> tuple[float, float, float, float]:
    if not (isinstance(bbox, list) and len(bbox) == 4):
        raise AnnotationError(f"{path}: {what}: bbox must be [x, y, w, h], got {bbox!r:.60}")
    x, y, w, h = (_number(v, float, path, f"{what}: bbox value") for v in bbox)
    if w < 0 or h < 0:
        raise AnnotationError(f"{path}: {what}: bbox [x, y, w, h] has a negative width or height: {bbox!r:.60}")
    return x, y, w, h


def _check_boxes(entry: ImageEntry, path: Path | None) -> None:
    """Every box must overlap its image (a box that only pokes out is clamped when normalised, as COCO's do)."""
    for obj in entry.objects:
        x, y, w, h = obj.bbox
        if x >= entry.width or y >= entry.height or x + w <= 0 or y + h <= 0:
            raise AnnotationError(f"{path}: image {entry.image_id}: the box {list(obj.bbox)} of object {obj.index} "
                                  f"({obj.category}) lies outside the {entry.width}x{entry.height} image")


def _fill_from_instances(entry: ImageEntry, anns: list[dict], cats: dict[int, dict], path: Path) -> None:
    for ann in sorted(anns, key=lambda a: _order(a.get("id", 0))):
        x, y, w, h = _bbox(ann.get("bbox"), path, f"annotation {ann.get('id')} of image {entry.image_id}")
        attrs = dict(ann.get("attributes") or {})
        cat = cats[ann["category_id"]]
        entry.objects.append(
            SceneObject(
                index=len(entry.objects),
                category=cat["name"],
                bbox=(x, y, w, h),
                position=grid_position(x + w / 2, y + h / 2, entry.width, entry.height),
                color=attrs.pop("color", None),
                size=attrs.pop("size", None),
                supercategory=cat.get("supercategory"),
                iscrowd=bool(ann.get("iscrowd", 0)),
                attributes=attrs,
            )
        )
    entry.relations = box_relations([o for o in entry.objects if not o.iscrowd])


def _fill_from_scene(entry: ImageEntry, scene: dict, supercats: dict[str, str], path: Path | None) -> None:
    entry.has_scene = True
    index_of: dict[Any, int] = {}
    for obj in scene.get("objects") or []:
        if not isinstance(obj, dict) or "category" not in obj:
            raise AnnotationError(f"{path}: image {entry.image_id}: object {obj!r:.60} needs category and bbox")
        x, y, w, h = _bbox(obj.get("bbox"), path, f"image {entry.image_id}: object {obj.get('id')}")
        extra = {k: v for k, v in obj.items()
                 if k not in {"id", "category", "supercategory", "color", "size", "bbox", "position"}}
        index_of[obj.get("id", len(index_of))] = len(entry.objects)
        entry.objects.append(
            SceneObject(
                index=len(entry.objects),
                category=str(obj["category"]),
                bbox=(x, y, w, h),
                position=obj.get("position") or grid_position(x + w / 2, y + h / 2, entry.width, entry.height),
                color=obj.get("color"),
                size=obj.get("size"),
                supercategory=obj.get("supercategory") or supercats.get(str(obj["category"])),
                attributes=extra,
            )
        )
    rels: set[tuple[int, str, int]] = set()
    for rel in scene.get("relations") or []:
        pred = rel.get("predicate")
        s, o = index_of.get(rel.get("subject")), index_of.get(rel.get("object"))
        if pred in OPPOSITE and s is not None and o is not None and s != o:
            rels.add((s, pred, o))
            rels.add((o, OPPOSITE[pred], s))
    entry.relations = rels
    entry.background = scene.get("background")
    entry.texts = [t for t in scene.get("text") or [] if isinstance(t, dict) and t.get("string")]
    entry.chart = scene.get("chart") or None
    if not entry.captions:
        entry.captions = [" ".join(c.split()) for c in scene.get("captions") or [] if isinstance(c, str) and c.strip()]
