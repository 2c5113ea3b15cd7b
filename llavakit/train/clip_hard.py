"""Hard-negative batches for stage 0: make the contrastive loss need shape and position.

Why: in a random batch of generated scenes the set of colours alone almost always tells the 64
images apart, so a CLIP loss learns colour and little else (docs/encoder.md measured shape at
chance). A *grouped* batch holds only images that share one attribute value (say, all contain a
red object), and each image is paired with a caption about that object only ("a red star at the
top left"). Inside such a batch the shared value is useless, so telling the captions apart needs the
other attributes of the object: its shape and its position (colour-grouped) or its colour and
position (shape-grouped). This is the in-batch hard-negative idea of NegCLIP / ARO, built from
the scene graph instead of from rewritten captions. No two captions of one grouped batch are equal
(a repeated (colour, shape, position) key would be a false negative), and grouped batches are mixed
with ordinary random batches (`ClipTrainConfig.hard_batch_prob`) so colour and counts keep being learnt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llavakit.world.captions import POSITION_PHRASES, category_noun

GROUP_KINDS: tuple[str, ...] = ("color", "category")  # what a grouped batch shares
GROUP_WEIGHTS: tuple[float, ...] = (0.65, 0.35)


def focus_caption(obj: dict[str, Any]) -> str:
    """'a red star at the top left': one object's colour, shape and position (the first position phrase)."""
    color = f"{obj['color']} " if obj.get("color") else ""
    phrase = f"{color}{category_noun(obj)} {POSITION_PHRASES[obj['position']][0]}"
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


@dataclass
class FocusObjects:
    """Every object of a world as a row: its image, its attribute values and its focus caption ids."""

    image: torch.Tensor  # [M] image index of each object
    input_ids: torch.Tensor  # [M, L] its focus caption, EOS-padded
    attrs: dict[str, list[str]]  # {"color"|"category"|"position": [M] values}


def focus_objects(scenes: list[dict[str, Any]], tokenizer, length: int) -> FocusObjects:
    """All objects of `scenes` that have a colour, with their focus captions tokenised to exactly `length`
    (the length of the world's own caption ids, so a compiled model sees one text shape)."""
    rows = [(i, o) for i, s in enumerate(scenes) for o in s["objects"] if o.get("color")]
    if not rows:
        raise ValueError("hard batches need objects with a colour; this world has none")
    texts = [focus_caption(o) for _, o in rows]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    attrs = {k: [str(o[k]) for _, o in rows] for k in ("color", "category", "position")}
    return FocusObjects(torch.tensor([i for i, _ in rows]), enc["input_ids"], attrs)  # [M], [M, L]


class HardBatchSampler:
    """Draws grouped batches: (image indices [B], caption ids [B, L]) all sharing one attribute value."""

    def __init__(self, objects: FocusObjects, batch_size: int, generator: torch.Generator) -> None:
        self.obj, self.batch_size, self.gen = objects, batch_size, generator
        self.groups: dict[str, list[list[int]]] = {}
        for kind in GROUP_KINDS:
            by_value: dict[str, list[int]] = {}
            for row, value in enumerate(objects.attrs[kind]):
                by_value.setdefault(value, []).append(row)
            usable = [rows for rows in by_value.values() if self._fillable(rows)]
            if usable:
                self.groups[kind] = usable
        if not self.groups:
            raise ValueError(f"no colour or shape occurs in {batch_size} images; the world is too small for "
                             f"hard batches of {batch_size} (lower batch_size or set hard_batch_prob: 0)")  # fmt: skip

    def _key(self, row: int) -> tuple[str, ...]:
        return tuple(self.obj.attrs[k][row] for k in ("color", "category", "position"))

    def _fillable(self, rows: list[int]) -> bool:
        """Whether a group has enough distinct images and distinct captions for one batch."""
        images = {int(self.obj.image[r]) for r in rows}
        return min(len(images), len({self._key(r) for r in rows})) >= self.batch_size

    def _pick(self, options: list, weights: list[float]):
        w = torch.tensor(weights, dtype=torch.float64)
        return options[int(torch.multinomial(w / w.sum(), 1, generator=self.gen))]

    def draw(self, attempts: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
        for _ in range(attempts):
            rows = self._fill()
            if rows is not None:
                idx = torch.tensor(rows)  # [B]
                return self.obj.image[idx], self.obj.input_ids[idx]  # [B], [B, L]
        raise ValueError(f"could not fill a hard batch of {self.batch_size} distinct captions in {attempts} tries; "
                         "the world repeats too few (colour, shape, position) combinations (lower batch_size)")

    def _fill(self) -> list[int] | None:
        """Rows of one grouped batch, or None when this group's draw ran out of distinct keys."""
        kinds = list(self.groups)
        kind = self._pick(kinds, [GROUP_WEIGHTS[GROUP_KINDS.index(k)] for k in kinds])
        rows = self._pick(self.groups[kind], [float(len(g)) for g in self.groups[kind]])
        chosen, images, keys = [], set(), set()
        for j in torch.randperm(len(rows), generator=self.gen).tolist():
            row = rows[j]
            image = int(self.obj.image[row])
            key = self._key(row)
            if image in images or key in keys:  # one caption per image; no two equal captions (false negatives)
                continue
            chosen.append(row)
            images.add(image)
            keys.add(key)
            if len(chosen) == self.batch_size:
                return chosen
        return None
