"""Stage-0 auxiliary losses `object_loss_weight` / `position_loss_weight`: the patch tokens under each object name
its shape and colour / its place in the image.

LLaVA reads the layer -2 patch tokens, and its questions ("What shape is the red object?") need each object's
shape and colour at the object's own tokens. The CLIP loss pays for neither directly, and the category loss
(`CategoryHead`, a max over the whole grid) only for which shapes the image holds. Here, per object of the
scene graph (its COCO box), the mean of the patch tokens whose centres lie inside the box (at least the patch
under the box centre) goes through two linear heads, category and colour, trained with cross-entropy; with
`position_loss_weight`, a third head names the object's 3x3 cell (`PositionHead`). The heads are dropped at save:
the checkpoint stays a plain HF CLIP.

Written here because it needs the world's scene graphs mapped onto the tower's patch grid (LLaVA's `pad`
view, as `clip_data.square_pixels` renders it); a few tensor lines, no library does this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def box_patch_mask(box: list[float], width: int, height: int, image_size: int, patch_size: int) -> torch.Tensor:
    """[P] bool: the patches (row-major, as CLIP flattens them) whose centres lie inside `box` [x, y, w, h]
    (pixels of a width x height image, seen padded to a centred square and resized to image_size), or the
    patch under the box centre when no centre lies inside."""
    side = max(width, height)
    scale = image_size / side
    x0 = (box[0] + (side - width) // 2) * scale  # box in tower pixels
    y0 = (box[1] + (side - height) // 2) * scale
    x1, y1 = x0 + box[2] * scale, y0 + box[3] * scale
    grid = image_size // patch_size
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) * patch_size  # [G]
    inside_x = (centres >= x0) & (centres < x1)  # [G]
    inside_y = (centres >= y0) & (centres < y1)  # [G]
    mask = inside_y[:, None] & inside_x[None, :]  # [G, G]
    if not mask.any():
        col = min(int((x0 + x1) / 2 // patch_size), grid - 1)
        row = min(int((y0 + y1) / 2 // patch_size), grid - 1)
        mask[max(row, 0), max(col, 0)] = True
    return mask.flatten()  # [P]


@dataclass
class ObjectTargets:
    """Per training image, up to M objects: patch masks and category / colour labels (-100: no object)."""

    masks: torch.Tensor  # [N, M, P] float (1 inside the object's box)
    categories: torch.Tensor  # [N, M] int64
    colors: torch.Tensor  # [N, M] int64
    category_names: list[str]
    color_names: list[str]
    positions: torch.Tensor  # [N, M] int64: index into POSITIONS (-100: no object, or no `position` recorded)


def object_targets(scenes: list[dict[str, Any]], image_size: int, patch_size: int) -> ObjectTargets:
    """The targets of `ObjectHead` and `PositionHead` for a world's scene graphs (objects without a colour or a
    recorded position get -100 there; a position that is not one of the nine cells is an error naming it)."""
    from llavakit.world.config import POSITIONS

    cats = sorted({o["category"] for s in scenes for o in s["objects"]})
    cols = sorted({o["color"] for s in scenes for o in s["objects"] if o.get("color")})
    most = max((len(s["objects"]) for s in scenes), default=0)
    patches = (image_size // patch_size) ** 2
    masks = torch.zeros(len(scenes), max(most, 1), patches)  # [N, M, P]
    cat_labels = torch.full((len(scenes), max(most, 1)), -100, dtype=torch.long)  # [N, M]
    col_labels = torch.full_like(cat_labels, -100)  # [N, M]
    pos_labels = torch.full_like(cat_labels, -100)  # [N, M]
    for row, scene in enumerate(scenes):
        for k, obj in enumerate(scene["objects"]):
            masks[row, k] = box_patch_mask(obj["bbox"], scene["width"], scene["height"], image_size, patch_size)
            cat_labels[row, k] = cats.index(obj["category"])
            if obj.get("color"):
                col_labels[row, k] = cols.index(obj["color"])
            if obj.get("position") is not None:  # a world without positions (e.g. COCO's) has none: -100
                if obj["position"] not in POSITIONS:
                    raise ValueError(f"scene {scene.get('image_id', row)}, object {k}: position {obj['position']!r} "
                                     f"is not one of {', '.join(POSITIONS)}")
                pos_labels[row, k] = POSITIONS.index(obj["position"])
    return ObjectTargets(masks, cat_labels, col_labels, cats, cols, pos_labels)


def pooled_objects(targets: ObjectTargets, patches: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Each object's mean patch token: [B, M, D]. patches: [B, P, D]; images: [B] indices of the world."""
    masks = targets.masks[images]  # [B, M, P]
    return masks @ patches / masks.sum(-1, keepdim=True).clamp(min=1.0)  # [B, M, D]


class ObjectHead(torch.nn.Module):
    """Two linear heads on each object's mean patch token: its category and its colour."""

    def __init__(self, targets: ObjectTargets, width: int) -> None:
        super().__init__()
        self.targets = targets
        self.category = torch.nn.Linear(width, max(len(targets.category_names), 1))
        self.color = torch.nn.Linear(width, max(len(targets.color_names), 1))

    def loss(self, patches: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the batch's objects (category + colour). patches: [B, P, D]; images: [B]."""
        pooled = pooled_objects(self.targets, patches, images)  # [B, M, D]
        if not (self.targets.categories[images] != -100).any():  # a batch of empty scenes: nothing to name
            return pooled.sum() * 0.0
        ce = torch.nn.functional.cross_entropy
        cat = ce(self.category(pooled).flatten(0, 1), self.targets.categories[images].flatten(), ignore_index=-100)
        colors = self.targets.colors[images].flatten()  # [B*M]
        if not (colors != -100).any():
            return cat
        return cat + ce(self.color(pooled).flatten(0, 1), colors, ignore_index=-100)


class PositionHead(torch.nn.Module):
    """A linear head on each object's mean patch token: its 3x3 cell of the image (the scene graph's `position`)."""

    def __init__(self, targets: ObjectTargets, width: int) -> None:
        from llavakit.world.config import POSITIONS

        super().__init__()
        self.targets = targets
        self.position = torch.nn.Linear(width, len(POSITIONS))

    def loss(self, patches: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the batch's objects with a recorded position. patches: [B, P, D]; images: [B]."""
        pooled = pooled_objects(self.targets, patches, images)  # [B, M, D]
        labels = self.targets.positions[images].flatten()  # [B*M]
        if not (labels != -100).any():  # no object with a position in this batch
            return pooled.sum() * 0.0
        return torch.nn.functional.cross_entropy(self.position(pooled).flatten(0, 1), labels, ignore_index=-100)
