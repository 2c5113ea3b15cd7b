"""Correct, varied questions and answers computed from a scene (the offline teacher's brain).

Every question is *definite*: objects are only referred to by descriptions that pick out exactly
one object, counts skip crowd annotations, relations only use clearly separated pairs, and
existence questions are about things that are present or clearly absent (about half each).
Each `QA` carries the question, a natural-sentence answer (`long`), a single word or phrase
(`short`, for LLaVA-1.5 style VQA), the answer domain (`choices`, for multiple choice) and the
structured `facts` it was computed from (so tests can check answers independently).

Phrasing is varied on purpose: many templates per question type, synonyms for colour/image/
positions, different referring expressions for the same object.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from llavakit.datagen.annotations import POSITIONS, Dataset, ImageEntry, SceneObject
from llavakit.datagen.language import (
    article,
    be,
    cap,
    category_nouns,
    count_phrase,
    fmt_value,
    join,
    noun_for,
    number,
    plural,
    where,
    where_ask,
    where_ref,
)

GENERATOR_VERSION = "4"  # 2: existence questions first in a record, yes/no a fair coin each; 3: absent things
# named without a colour as often as present ones (v2 asked colour-less "Is there a star?" only of present shapes);
# 4: absent things only of categories some image has (v3 asked of the world's six never-drawn declared shapes)

NAMED_COLOR_SHARE = 0.7
"""How often an existence question names the colour, for "yes" and "no" answers alike."""

QTYPE_WEIGHTS: dict[str, float] = {
    "count": 3.0,
    "exists": 3.0,
    "color": 2.0,
    "shape": 2.0,
    "position": 2.0,
    "relation": 2.0,
    "size": 1.0,
    "total": 1.0,
    "text": 1.0,
    "chart": 1.0,
    "background": 0.7,
    "direction": 1.0,
}
QTYPES: tuple[str, ...] = tuple(QTYPE_WEIGHTS)
SIZES = ("small", "medium", "large")
RELATION_WORDS = {
    "left of": ("to the left of", "left of", "on the left side of"),
    "right of": ("to the right of", "right of", "on the right side of"),
    "above": ("above", "higher than", "higher up than"),
    "below": ("below", "lower than", "lower down than"),
}
RELATION_SHORT = {"left of": "left", "right of": "right", "above": "above", "below": "below"}
COMPARATIVE = {
    "left of": ("further left", "more to the left", "closer to the left edge"),
    "right of": ("further right", "more to the right", "closer to the right edge"),
    "above": ("higher", "higher up", "closer to the top"),
    "below": ("lower", "lower down", "closer to the bottom"),
}
DIRECTIONS = {"up": "up", "down": "down", "left": "to the left", "right": "to the right"}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class QA:
    """One question with its answers."""

    qtype: str
    question: str
    long: str
    short: str
    choices: tuple[str, ...] = ()
    """The answer domain (contains `short`); empty when multiple choice makes no sense."""
    facts: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass
class Ref:
    """A referring expression that picks out exactly one object."""

    obj: SceneObject
    attrs: tuple[str, ...]
    """Subset of ('size', 'color', 'category', 'position') used."""
    thing: str
    noun: str
    """The category as a singular noun."""

    def np(self, rng: random.Random) -> str:
        o = self.obj
        words = [o.size if "size" in self.attrs else None, o.color if "color" in self.attrs else None,
                 self.noun if "category" in self.attrs else self.thing]
        text = " ".join(w for w in words if w)
        if "position" in self.attrs:
            text += " " + where_ref(o.position)
        return text

    def the(self, rng: random.Random) -> str:
        return "the " + self.np(rng)


def _img(rng: random.Random) -> str:
    return rng.choice(("image", "image", "picture", "scene", "photo"))


def _word(s: str) -> str:
    return "word" if s.replace(" ", "").isalpha() else "text"


def _colour(rng: random.Random) -> str:
    return rng.choice(("color", "color", "colour"))


class SceneQA:
    """Generates QA pairs, descriptions and reasoning for images of one dataset."""

    def __init__(self, dataset: Dataset):
        # only categories some image has: "Is there a hexagon?" of a dataset without hexagons is a "no" learnt from
        # the word alone (the generated world declares all its 14 shapes, the default recipe draws 8)
        occurring = {o.category for img in dataset.images for o in img.objects}
        self.categories = [c for c in dataset.categories if c in occurring]
        self.colors = list(dataset.colors)
        self.sizes = list(dataset.sizes) or list(SIZES)
        self.thing = dataset.thing
        self.things = plural(self.thing)
        self.nouns = {c: category_nouns(c, dataset.supercategories.get(c)) for c in self.categories}
        self._memo_image: ImageEntry | None = None
        self._memo_data: dict = {}

    # ------------------------------------------------------------------ nouns

    def sg(self, category: str | None) -> str:
        if category is None:
            return self.thing
        return (self.nouns.get(category) or category_nouns(category, None))[0]

    def pl(self, category: str | None) -> str:
        if category is None:
            return self.things
        return (self.nouns.get(category) or category_nouns(category, None))[1]

    def np(self, category: str | None, color: str | None = None, size: str | None = None, n: int = 1) -> str:
        """'red circle', 'large red circles', 'red shapes' (category None = the generic thing)."""
        noun = self.sg(category) if n == 1 else self.pl(category)
        return " ".join(w for w in (size, color, noun) if w)

    def cnt(self, n: int, category: str | None = None, color: str | None = None) -> str:
        """'no red circles', 'one red circle', 'three red circles'."""
        return f"no {self.np(category, color, n=0)}" if n == 0 else f"{number(n)} {self.np(category, color, n=n)}"

    def a(self, o: SceneObject, size: bool = False) -> str:
        """'a red circle' for an object (with its size when asked)."""
        return article(self.np(o.category, o.color, o.size if size else None))

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _objs(img: ImageEntry) -> list[SceneObject]:
        return img.objects

    @staticmethod
    def _count(img: ImageEntry, *, category: str | None = None, color: str | None = None) -> int | None:
        """How many objects match; None when a crowd annotation makes the count undefined."""
        n = 0
        for o in img.objects:
            if (category is None or o.category == category) and (color is None or o.color == color):
                if o.iscrowd:
                    return None
                n += 1
        return n

    def _refs(self, img: ImageEntry, o: SceneObject, *, exclude: tuple[str, ...] = (),
              need_category: bool = True) -> list[Ref]:
        """All referring expressions (from a fixed menu) that pick out `o` uniquely (memoised per image)."""
        memo = self._memo(img)
        key = ("refs", o.index, exclude, need_category)
        if key not in memo:
            memo[key] = self._compute_refs(img, o, exclude, need_category)
        return memo[key]

    def _memo(self, img: ImageEntry) -> dict:
        if self._memo_image is not img:
            self._memo_image, self._memo_data = img, {}
        return self._memo_data

    def _compute_refs(self, img: ImageEntry, o: SceneObject, exclude: tuple[str, ...],
                      need_category: bool) -> list[Ref]:
        menu = [("category",), ("color", "category"), ("size", "category"), ("size", "color", "category"),
                ("category", "position"), ("color", "category", "position")]
        if not need_category:
            menu = [("color",), ("position",), ("size", "color"), ("color", "position"), ("size", "position")]
        out = []
        for attrs in menu:
            if any(a in exclude for a in attrs) or (need_category and "category" in exclude):
                continue
            if any(getattr(o, a) in (None, "") for a in attrs):
                continue
            same = [p for p in img.objects if all(getattr(p, a) == getattr(o, a) for a in attrs)]
            if len(same) == 1:
                out.append(Ref(o, attrs, self.thing, self.sg(o.category)))
        return out

    def _pick_ref(self, rng: random.Random, refs: list[Ref]) -> Ref:
        return refs[0] if rng.random() < 0.55 else rng.choice(refs)

    def _referable(self, img: ImageEntry, rng: random.Random, **kw) -> list[tuple[SceneObject, Ref]]:
        out = []
        for o in img.objects:
            refs = self._refs(img, o, **kw)
            if refs:
                out.append((o, self._pick_ref(rng, refs)))
        return out

    def _absent_combo(self, img: ImageEntry, rng: random.Random) -> tuple[str | None, str] | None:
        """An absent (colour, category) — half the time a 'hard' one sharing a colour or category."""
        memo = self._memo(img)
        if "absent" not in memo:
            memo["absent"] = self._compute_absent(img)
        combos, hard = memo["absent"]
        if not combos:
            return None
        pool = hard if hard and rng.random() < 0.5 else combos
        return rng.choice(pool)

    def _absent_thing(self, img: ImageEntry, rng: random.Random, named_color: bool) -> tuple[str | None, str] | None:
        """An absent (colour, category), or (None, category) for an absent category when `named_color` is false
        (an absent combination when every category is present)."""
        cats_present = {o.category for o in img.objects}
        absent_cats = [k for k in self.categories if k not in cats_present]
        if named_color or not absent_cats:
            return self._absent_combo(img, rng)
        return None, rng.choice(absent_cats)

    def _compute_absent(self, img: ImageEntry) -> tuple[list, list]:
        present = {(o.color, o.category) for o in img.objects}
        cats_present = {o.category for o in img.objects}
        if not self.colors:
            return [(None, k) for k in self.categories if k not in cats_present], []
        # a colour+category is clearly absent only if no object of that category lacks a colour
        uncoloured = {o.category for o in img.objects if o.color is None}
        colors_present = {o.color for o in img.objects}
        combos = [(c, k) for c in self.colors for k in self.categories if (c, k) not in present and k not in uncoloured]
        hard = [(c, k) for c, k in combos if k in cats_present or c in colors_present]
        return combos, hard

    # ------------------------------------------------------------------ question types

    def ask(self, img: ImageEntry, qtype: str, rng: random.Random, **kw) -> QA | None:
        """One QA of the given type, or None when the scene offers no definite question of that type."""
        return getattr(self, f"_q_{qtype}")(img, rng, **kw)

    def _count_targets(self, img: ImageEntry) -> dict[int, list[tuple[str | None, str | None]]]:
        """Countable (colour, category) targets grouped by their count (memoised per image)."""
        memo = self._memo(img)
        if "count_targets" not in memo:
            targets: set[tuple[str | None, str | None]] = set()
            for o in img.objects:
                targets.add((None, o.category))
                if o.color:
                    targets.add((o.color, o.category))
                    targets.add((o.color, None))
            if img.objects:
                targets.add((None, None))
            by_count: dict[int, list] = {}
            for color, category in sorted(targets, key=str):
                n = self._count(img, category=category, color=color)
                if n is not None:
                    by_count.setdefault(n, []).append((color, category))
            memo["count_targets"] = by_count
        return memo["count_targets"]

    def _q_count(self, img: ImageEntry, rng: random.Random) -> QA | None:
        # Draw the count value first, then a target with that count: this flattens the answer
        # distribution (most single categories occur once; colours and totals give larger counts).
        by_count = dict(self._count_targets(img))
        absent = self._absent_thing(img, rng, named_color=rng.random() < NAMED_COLOR_SHARE)
        if absent is not None:
            by_count[0] = [absent]
        if not by_count:
            return None
        values = sorted(by_count)
        n = rng.choices(values, weights=[0.5 if v == 0 else 1.0 for v in values])[0]
        color, category = rng.choice(by_count[n])
        sg, pl = self.np(category, color), self.np(category, color, n=2)
        im = _img(rng)
        templates = [
            f"How many {pl} are there?",
            f"How many {pl} are there in the {im}?",
            f"How many {pl} can you see?",
            f"How many {pl} do you see in the {im}?",
            f"Count the {pl}.",
            f"Count the {pl} in the {im}.",
            f"What is the number of {pl} in the {im}?",
            f"How many {pl} does the {im} contain?",
            f"How many {pl} are shown?",
            f"Tell me how many {pl} there are.",
            f"How many {pl} are visible in the {im}?",
            f"What is the count of {pl}?",
            f"Please count the {pl} in this {im}.",
            f"How many {pl} appear in the {im}?",
        ]
        if color and category:
            templates += [
                f"What number of {self.pl(category)} are {color}?",
                f"How many of the {self.pl(category)} are {color}?",
                f"How many {self.pl(category)} in the {im} are {color}?",
            ]
        question = rng.choice(templates)
        word = number(n, rng, digits_p=0.15)
        if n == 0:
            long = rng.choice([
                f"There are no {pl} in the {im}.",
                f"I don't see any {pl}.",
                f"There aren't any {pl}.",
                f"The {im} contains no {pl}.",
                f"Zero. There are no {pl} here.",
            ])
        elif n == 1:
            long = rng.choice([
                f"There is one {sg}.",
                f"There is exactly one {sg}.",
                f"I can see one {sg}.",
                f"The {im} contains one {sg}.",
                f"Only one {sg} is visible.",
            ])
        else:
            long = rng.choice([
                f"There are {word} {pl}.",
                f"I can see {word} {pl}.",
                f"The {im} contains {word} {pl}.",
                f"There are {word} {pl} in total.",
                f"{cap(word)} {pl} are visible.",
                f"I count {word} {pl}.",
            ])
        choices = tuple(str(i) for i in range(0, max(6, n + 2)))
        return QA("count", question, long, str(n), choices,
                  {"color": color, "category": category, "count": n})

    def _q_total(self, img: ImageEntry, rng: random.Random) -> QA | None:
        n = self._count(img)
        if n is None:
            return None
        im, things = _img(rng), self.things
        question = rng.choice([
            f"How many {things} are there in total?",
            f"How many {things} are in the {im}?",
            f"Count all the {things} in the {im}.",
            f"What is the total number of {things}?",
            f"How many {things} can you see altogether?",
            f"How many {things} does this {im} show?",
            f"In total, how many {things} are there?",
        ])
        if n == 0:
            long = f"There are no {things} in the {im}."
        else:
            long = rng.choice([
                f"There {be(n)} {self.cnt(n)} in total.",
                f"The {im} shows {self.cnt(n)}.",
                f"Altogether there {be(n)} {self.cnt(n)}.",
                f"I can see {self.cnt(n)}.",
            ])
        return QA("total", question, long, str(n), tuple(str(i) for i in range(0, max(6, n + 2))), {"count": n})

    def _q_exists(self, img: ImageEntry, rng: random.Random, positive: bool | None = None) -> QA | None:
        """Present or clearly absent things, each with probability 1/2 unless `positive` asks for one."""
        if positive is None:
            positive = rng.random() < 0.5
        # the same share names a colour whatever the answer: otherwise the phrasing alone gives the answer away
        named_color = rng.random() < NAMED_COLOR_SHARE
        absent = None if positive else self._absent_thing(img, rng, named_color)
        if not img.objects:
            positive = False
        elif not positive and absent is None:
            positive = True
        im = _img(rng)
        if positive:
            o = rng.choice([o for o in img.objects])
            color, category = (o.color if named_color else None), o.category
            n = sum(1 for p in img.objects if p.category == category and (color is None or p.color == color))
        else:
            if absent is None:
                absent = self._absent_thing(img, rng, named_color)
            if absent is None:
                return None
            color, category = absent
            n = 0
        sg, pl = self.np(category, color), self.np(category, color, n=2)
        a_np = article(sg)
        question = rng.choice([
            f"Is there {a_np} in the {im}?",
            f"Is there {a_np}?",
            f"Do you see {a_np}?",
            f"Do you see any {pl}?",
            f"Can you see {a_np} in the {im}?",
            f"Does the {im} contain {a_np}?",
            f"Are there any {pl}?",
            f"Are there any {pl} in the {im}?",
            f"Is there any {sg} in the {im}?",
            f"Does the {im} show {a_np}?",
            f"Can you find {a_np}?",
            f"Is {a_np} present in the {im}?",
            f"Does {a_np} appear in the {im}?",
            f"Is there at least one {sg}?",
            f"Can {a_np} be seen in the {im}?",
        ])
        if n > 0:
            if n == 1:
                o = next(p for p in img.objects if p.category == category and (color is None or p.color == color))
                long = rng.choice([
                    f"Yes, there is {a_np} {where(o.position, rng, im)}.",
                    f"Yes, I can see {a_np} {where(o.position, rng)}.",
                    f"Yes, there is one {sg} in the {im}.",
                    "Yes, there is one.",
                ])
            else:
                long = rng.choice([
                    f"Yes, there are {number(n)} {pl}.",
                    f"Yes, I can see {number(n)} {pl} in the {im}.",
                    f"Yes, the {im} contains {number(n)} {pl}.",
                ])
            short = "yes"
        else:
            same_cat = [p for p in img.objects if p.category == category]
            long = rng.choice([
                f"No, there is no {sg} in the {im}.",
                f"No, I don't see any {pl}.",
                f"No, there isn't {a_np}.",
                f"No, the {im} does not contain {a_np}.",
                f"No, there are no {pl} here.",
            ])
            if color and same_cat and all(p.color for p in same_cat) and rng.random() < 0.5:
                others = sorted({p.color for p in same_cat})
                if len(same_cat) == 1:
                    long = f"No. There is {article(self.sg(category))}, but it is {others[0]}, not {color}."
                else:
                    long = (f"No. There are {self.cnt(len(same_cat), category)}, but none of them is {color}; "
                            f"they are {join(others)}.")
            short = "no"
        return QA("exists", question, long, short, ("yes", "no"),
                  {"color": color, "category": category, "count": n, "answer": short})

    def _q_color(self, img: ImageEntry, rng: random.Random) -> QA | None:
        cands = [(o, r) for o, r in self._referable(img, rng, exclude=("color",)) if o.color]
        if not cands:
            return None
        o, ref = rng.choice(cands)
        the, c, im = ref.the(rng), _colour(rng), _img(rng)
        in_im = "" if "position" in ref.attrs else f" in the {im}"
        question = rng.choice([
            f"What {c} is {the}?",
            f"What is the {c} of {the}?",
            f"Which {c} is {the}?",
            f"What {c} does {the} have?",
            f"Tell me the {c} of {the}.",
            f"Can you tell me what {c} {the} is?",
            f"What {c} is {the}{in_im}?",
            f"Name the {c} of {the}.",
            f"{cap(the)} is what {c}?",
            f"What {c} has been used for {the}?",
            f"In what {c} is {the} drawn?",
        ])
        long = rng.choice([
            f"{cap(the)} is {o.color}.",
            f"It is {o.color}.",
            f"{cap(the)}{in_im} is {o.color}.",
            f"The {c} of {the} is {o.color}.",
            f"It's {o.color}.",
        ])
        return QA("color", question, long, o.color, tuple(self.colors),
                  {"object": o.index, "attrs": ref.attrs, "color": o.color})

    def _q_shape(self, img: ImageEntry, rng: random.Random) -> QA | None:
        cands = self._referable(img, rng, need_category=False)
        if not cands:
            return None
        o, ref = rng.choice(cands)
        thing, im = self.thing, _img(rng)
        kind = "shape" if thing == "shape" else "object"
        if ref.attrs == ("color",):
            question = rng.choice([
                f"Which {thing} is {o.color}?",
                f"What is the {o.color} {thing}?",
                f"What {kind} is {o.color}?",
                f"What kind of {thing} is the {o.color} one?",
                f"Identify the {o.color} {thing}.",
                f"The {o.color} {thing} is what {kind}?",
                f"What is the {o.color} {thing} in the {im}?",
            ])
        elif ref.attrs == ("position",):
            pos = where_ask(o.position, rng)
            question = rng.choice([
                f"What {kind} is {pos}?",
                f"What {thing} can be seen {pos}?",
                f"Which {thing} is {pos}?",
                f"What is {pos}?",
                f"Identify the {thing} {pos}.",
                f"What kind of {thing} appears {pos}?",
                f"Name the {thing} located {pos}.",
            ])
        else:
            the = ref.the(rng)
            question = rng.choice([
                f"What {kind} is {the}?",
                f"What is {the}?",
                f"What kind of {thing} is {the}?",
                f"Identify {the}.",
                f"Name {the}.",
                f"What type of {thing} is {the}?",
            ])
        a_cat = article(self.sg(o.category))
        long = rng.choice([
            f"It is {a_cat}.",
            f"It's {a_cat}.",
            f"That is {a_cat}.",
            f"The {thing} is {a_cat}.",
            f"It is {self.a(o)}.",
        ])
        return QA("shape", question, long, self.sg(o.category), tuple(self.sg(c) for c in self.categories),
                  {"object": o.index, "attrs": ref.attrs, "category": o.category})

    def _q_position(self, img: ImageEntry, rng: random.Random) -> QA | None:
        cands = self._referable(img, rng, exclude=("position",))
        if not cands:
            return None
        o, ref = rng.choice(cands)
        the, im = ref.the(rng), _img(rng)
        question = rng.choice([
            f"Where is {the}?",
            f"Where is {the} located?",
            f"Where is {the} in the {im}?",
            f"In which part of the {im} is {the}?",
            f"Where can {the} be found?",
            f"Which part of the {im} contains {the}?",
            f"Where does {the} appear?",
            f"Locate {the}.",
            f"What is the location of {the}?",
            f"Where in the {im} is {the} placed?",
            f"In what region of the {im} is {the}?",
            f"Where exactly is {the}?",
        ])
        long = rng.choice([
            f"{cap(the)} is {where(o.position, rng, im)}.",
            f"It is {where(o.position, rng, im)}.",
            f"{cap(the)} is located {where(o.position, rng, im)}.",
            f"You can find it {where(o.position, rng, im)}.",
            f"It's {where(o.position, rng, im)}.",
        ])
        return QA("position", question, long, o.position, POSITIONS,
                  {"object": o.index, "attrs": ref.attrs, "position": o.position})

    def _q_size(self, img: ImageEntry, rng: random.Random) -> QA | None:
        cands = [(o, r) for o, r in self._referable(img, rng, exclude=("size",)) if o.size]
        if not cands:
            return None
        o, ref = rng.choice(cands)
        the = ref.the(rng)
        question = rng.choice([
            f"What size is {the}?",
            f"How big is {the}?",
            f"Is {the} small, medium or large?",
            f"How large is {the}?",
            f"What is the size of {the}?",
            f"Would you say {the} is small, medium or large?",
        ])
        long = rng.choice([f"{cap(the)} is {o.size}.", f"It is {o.size}.", f"It's a {o.size} one.",
                           f"{cap(the)} is {o.size} in size."])
        return QA("size", question, long, o.size, tuple(self.sizes), {"object": o.index, "size": o.size})

    def _relation_pairs(self, img: ImageEntry, rng: random.Random) -> list[tuple[Ref, str, Ref]]:
        refs = dict((o.index, r) for o, r in self._referable(img, rng, exclude=("position",)))
        return [(refs[s], p, refs[o]) for s, p, o in sorted(img.relations) if s in refs and o in refs]

    def _q_relation(self, img: ImageEntry, rng: random.Random) -> QA | None:
        pairs = self._relation_pairs(img, rng)
        if not pairs:
            return None
        a, pred, b = rng.choice(pairs)
        ta, tb = a.the(rng), b.the(rng)
        mode = rng.random()
        true_rels = {p for s, p, o in img.relations if s == a.obj.index and o == b.obj.index}
        if mode < 0.5:
            asked = pred if rng.random() < 0.5 else OPPOSITE[pred]
            word = rng.choice(RELATION_WORDS[asked])
            question = rng.choice([f"Is {ta} {word} {tb}?", f"Is {ta} positioned {word} {tb}?",
                                   f"Would you say {ta} is {word} {tb}?", f"Does {ta} appear {word} {tb}?"])
            if asked == pred:
                long = rng.choice([f"Yes, {ta} is {word} {tb}.", "Yes, it is.",
                                   f"Yes. {cap(ta)} is {RELATION_WORDS[pred][0]} {tb}."])
                short = "yes"
            else:
                long = rng.choice([f"No, {ta} is {RELATION_WORDS[pred][0]} {tb}.",
                                   f"No. It is actually {RELATION_WORDS[pred][0]} {tb}."])
                short = "no"
            return QA("relation", question, long, short, ("yes", "no"),
                      {"subject": a.obj.index, "predicate": asked, "object": b.obj.index, "answer": short})
        if mode < 0.75 and len(true_rels) == 1:
            question = rng.choice([
                f"Where is {ta} relative to {tb}?",
                f"What is the position of {ta} relative to {tb}?",
                f"How is {ta} positioned compared to {tb}?",
                f"Where is {ta} with respect to {tb}?",
                f"Is {ta} to the left of, to the right of, above or below {tb}?",
            ])
            long = rng.choice([f"{cap(ta)} is {RELATION_WORDS[pred][0]} {tb}.",
                               f"It is {RELATION_WORDS[pred][0]} {tb}."])
            return QA("relation", question, long, RELATION_SHORT[pred], tuple(RELATION_SHORT.values()),
                      {"subject": a.obj.index, "predicate": pred, "object": b.obj.index})
        comp = rng.choice(COMPARATIVE[pred])
        first, second = (ta, tb) if rng.random() < 0.5 else (tb, ta)
        question = rng.choice([
            f"Which is {comp}, {first} or {second}?",
            f"Which one is {comp}: {first} or {second}?",
            f"Between {first} and {second}, which is {comp}?",
        ])
        long = rng.choice([f"{cap(ta)} is {comp} than {tb}.", f"{cap(ta)} is {comp}."])
        na, nb = a.np(rng), b.np(rng)
        return QA("relation", question, long, na, (na, nb),
                  {"subject": a.obj.index, "predicate": pred, "object": b.obj.index, "which": a.obj.index})

    def _q_text(self, img: ImageEntry, rng: random.Random) -> QA | None:
        if len(img.texts) != 1:
            return None
        t = img.texts[0]
        s, im = str(t["string"]), _img(rng)
        if t.get("color") and rng.random() < 0.3:
            c = _colour(rng)
            question = rng.choice([f"What {c} is the text?", f"In what {c} is the word written?",
                                   f"What {c} is the writing in the {im}?"])
            long = rng.choice([f"The text is {t['color']}.", f'The {_word(s)} "{s}" is written in {t["color"]}.'])
            return QA("text", question, long, str(t["color"]), tuple(self.colors), {"text": s, "color": t["color"]})
        question = rng.choice([
            "What does the text say?",
            f"What word is written in the {im}?",
            f"Read the text in the {im}.",
            f"What is written in the {im}?",
            f"Which word appears in the {im}?",
            "What does the writing say?",
            f"Is there any text in the {im}? What does it say?",
        ])
        pos = self._text_position(img, t)
        long = rng.choice([f'The text says "{s}".', f'It reads "{s}".',
                           f'The {_word(s)} "{s}" is written {where(pos, rng, im)}.' if pos else f'It says "{s}".'])
        return QA("text", question, long, s, (), {"text": s})

    @staticmethod
    def _text_position(img: ImageEntry, t: dict) -> str | None:
        from llavakit.datagen.annotations import grid_position

        box = t.get("bbox")
        if not (isinstance(box, list) and len(box) == 4):
            return None
        x, y, w, h = box
        return grid_position(x + w / 2, y + h / 2, img.width, img.height)

    def _q_chart(self, img: ImageEntry, rng: random.Random) -> QA | None:
        ch = img.chart
        if not ch or not ch.get("labels") or len(ch.get("labels", [])) != len(ch.get("values", [])):
            return None
        labels, values = [str(x) for x in ch["labels"]], list(ch["values"])
        mode = rng.random()
        top = max(values)
        if mode < 0.4 and values.count(top) == 1:
            label = labels[values.index(top)]
            question = rng.choice(["Which bar is the tallest?", "Which label has the highest value in the chart?",
                                   "In the bar chart, which bar is highest?", "Which category has the largest value?"])
            long = f"The tallest bar is {label}, with a value of {fmt_value(top)}."
            return QA("chart", question, long, label, tuple(labels), {"max": label})
        if mode < 0.7:
            i = rng.randrange(len(labels))
            question = rng.choice([f"What is the value of {labels[i]} in the chart?",
                                   f"How high is the bar labelled {labels[i]}?",
                                   f"What value does the chart show for {labels[i]}?"])
            long = f"The bar labelled {labels[i]} has a value of {fmt_value(values[i])}."
            return QA("chart", question, long, fmt_value(values[i]), (), {"label": labels[i], "value": values[i]})
        n = len(labels)
        question = rng.choice(["How many bars does the chart have?", "How many bars are in the bar chart?",
                               "Count the bars in the chart."])
        long = f"The chart has {number(n)} {noun_for(n, 'bar')}: {join(labels)}."
        return QA("chart", question, long, str(n), tuple(str(i) for i in range(1, max(6, n + 2))), {"bars": n})

    def _q_background(self, img: ImageEntry, rng: random.Random) -> QA | None:
        bg = img.background or {}
        if bg.get("kind") != "plain" or not bg.get("color"):
            return None
        c, im = _colour(rng), _img(rng)
        question = rng.choice([f"What {c} is the background?", f"What is the background {c} of the {im}?",
                               f"Which {c} is the background?", f"What {c} is the background of the {im}?"])
        long = rng.choice([f"The background is {bg['color']}.", f"It is a plain {bg['color']} background."])
        return QA("background", question, long, str(bg["color"]), tuple(self.colors), {"color": bg["color"]})

    def _q_direction(self, img: ImageEntry, rng: random.Random) -> QA | None:
        cands = [(o, r) for o, r in self._referable(img, rng) if o.attributes.get("direction") in DIRECTIONS]
        if not cands:
            return None
        o, ref = rng.choice(cands)
        the, d = ref.the(rng), o.attributes["direction"]
        phrase = DIRECTIONS[d]
        question = rng.choice([f"Which way does {the} point?", f"In which direction is {the} pointing?",
                               f"Where does {the} point?", f"Which direction does {the} face?",
                               f"Is {the} pointing up, down, left or right?"])
        long = rng.choice([f"{cap(the)} points {phrase}.", f"It is pointing {phrase}.", f"It points {phrase}."])
        return QA("direction", question, long, d, tuple(DIRECTIONS), {"object": o.index, "direction": d})

    # ------------------------------------------------------------------ batches

    def available(self, img: ImageEntry) -> list[str]:
        types = ["count", "exists", "total"]
        if img.objects:
            types += ["shape", "position"]
            if any(o.color for o in img.objects):
                types.append("color")
            if any(o.size for o in img.objects):
                types.append("size")
            if img.relations:
                types.append("relation")
            if any(o.attributes.get("direction") in DIRECTIONS for o in img.objects):
                types.append("direction")
        if len(img.texts) == 1:
            types.append("text")
        if img.chart:
            types.append("chart")
        if (img.background or {}).get("kind") == "plain" and (img.background or {}).get("color"):
            types.append("background")
        return types

    def sample(self, img: ImageEntry, rng: random.Random, n: int,
               types: tuple[str, ...] | None = None) -> list[QA]:
        """Up to `n` distinct QAs with types drawn by weight (no repeated question or fact), existence first.

        Existence answers must not follow from the text of earlier turns: an earlier "What color is the star?"
        tells that a star is there (in v1's records "yes if an earlier turn names the shape" was right for 66 % of
        the existence answers, and the recipe's v4 model answered every existence question yes), so existence
        questions come first; and each one's yes/no is a fair coin (v1 balanced them within a record, which
        made a record's second existence answer the opposite of its first). Other questions can still lean on
        earlier turns (a "yes" to "Is there a red circle?" before "Is there a circle?", or "the circle" implying
        one); existence was the one the models measurably learned from the text.
        """
        pool = [t for t in self.available(img) if types is None or t in types]
        out: list[QA] = []
        seen_q: set[str] = set()
        seen_facts: set[str] = set()
        tries = 0
        while len(out) < n and pool and tries < 12 * n:
            tries += 1
            qtype = rng.choices(pool, weights=[QTYPE_WEIGHTS[t] for t in pool])[0]
            qa = self.ask(img, qtype, rng)
            if qa is None:
                pool.remove(qtype)
                continue
            key = f"{qa.qtype}:{sorted((k, v) for k, v in qa.facts.items() if k != 'attrs')}"
            if qa.question in seen_q or key in seen_facts:
                continue
            seen_q.add(qa.question)
            seen_facts.add(key)
            out.append(qa)
        return sorted(out, key=lambda qa: qa.qtype != "exists")  # stable: the drawn order otherwise

    # ------------------------------------------------------------------ detail

    def describe(self, img: ImageEntry, rng: random.Random, max_objects: int = 10) -> str:
        """A paragraph describing the scene: overview, every object with its place, relations, text, chart."""
        im, thing = _img(rng), self.thing
        bg = img.background or {}
        on_bg = f" on a {bg['color']} background" if bg.get("kind") == "plain" and bg.get("color") else ""
        if bg.get("kind") == "gradient" and bg.get("color") and bg.get("color2"):
            on_bg = f" on a {bg['color']} and {bg['color2']} gradient background"
        elif bg.get("kind") == "noise" and bg.get("color"):
            on_bg = f" on a textured {bg['color']} background"
        objs = sorted(img.objects, key=lambda o: (POSITIONS.index(o.position) // 3, o.center[0], o.center[1]))
        n = len(objs)
        sentences: list[str] = []
        if n == 0:
            sentences.append(f"The {im} shows an empty scene{on_bg}; there are no {self.things} in it.")
        else:
            amount = f"a single {thing}" if n == 1 else f"{number(n)} {self.things}"
            sentences.append(rng.choice([
                f"The {im} shows {amount}{on_bg}.",
                f"This {im} contains {amount}{on_bg}.",
                f"In this {im} there {be(n)} {amount}{on_bg}.",
                f"The scene is made up of {amount}{on_bg}.",
            ]))
        said: set[str] = set()
        for o in objs[:max_objects]:
            np = self.np(o.category, o.color, o.size)
            a_np = f"another {np}" if np in said else article(np)
            said.add(np)
            w = where(o.position, rng, im)
            sentences.append(rng.choice([
                f"{cap(w)}, there is {a_np}.",
                f"{cap(a_np)} sits {w}.",
                f"{cap(a_np)} is located {w}.",
                f"There is {a_np} {w}.",
                f"{cap(w)} we can see {a_np}.",
                f"{cap(a_np)} appears {w}.",
            ]))
        if n > max_objects:
            rest = n - max_objects
            sentences.append(f"There {be(rest)} also {self.cnt(rest)} more.")
        pairs = self._relation_pairs(img, rng)
        rng.shuffle(pairs)
        used: set[frozenset] = set()
        for a, pred, b in pairs:
            if len(used) >= 2:
                break
            if frozenset((a.obj.index, b.obj.index)) in used:
                continue
            used.add(frozenset((a.obj.index, b.obj.index)))
            sentences.append(f"{cap(a.the(rng))} is {rng.choice(RELATION_WORDS[pred])} {b.the(rng)}.")
        for t in img.texts[:3]:
            pos = self._text_position(img, t)
            color = f" in {t['color']}" if t.get("color") else ""
            sentences.append(f'The {_word(str(t["string"]))} "{t["string"]}" is written{color}'
                             f'{" " + where(pos, rng) if pos else ""}.')
        ch = img.chart
        if ch and ch.get("labels") and len(ch["labels"]) == len(ch.get("values", [])):
            labels, values = [str(x) for x in ch["labels"]], list(ch["values"])
            text = f"A bar chart with {count_phrase(len(labels), 'bar')} ({join(labels)}) is also shown"
            if values.count(max(values)) == 1:
                text += f"; the tallest bar is {labels[values.index(max(values))]}"
            sentences.append(text + ".")
        if n >= 3 and all(o.color for o in objs):
            by_color = Counter(o.color for o in objs)
            parts = [self.cnt(k, None, c) for c, k in sorted(by_color.items(), key=lambda x: (-x[1], x[0]))]
            first = sorted(by_color.items(), key=lambda x: (-x[1], x[0]))[0][1]
            sentences.append(f"Counting by colour, there {be(first)} {join(parts)}.")
        return " ".join(sentences)

    # ------------------------------------------------------------------ reasoning

    def reason(self, img: ImageEntry, rng: random.Random) -> QA:
        """One question that needs a few steps of reasoning, with a detailed, explained answer."""
        makers = [self._r_remove, self._r_compare, self._r_majority_color, self._r_extreme,
                  self._r_same_color, self._r_distinct_colors, self._r_largest]
        rng.shuffle(makers)
        for make in makers:
            qa = make(img, rng)
            if qa is not None:
                return qa
        return self._r_add(img, rng)

    def _list_objs(self, objs: list[SceneObject]) -> str:
        return join([self.a(o) for o in objs])

    def _r_remove(self, img: ImageEntry, rng: random.Random) -> QA | None:
        objs = img.objects
        if len(objs) < 2 or any(o.iscrowd or not o.color for o in objs):
            return None
        color = rng.choice(sorted({o.color for o in objs}))
        gone = [o for o in objs if o.color == color]
        left = [o for o in objs if o.color != color]
        N, k = len(objs), len(gone)
        question = rng.choice([
            f"If all the {color} {self.things} were removed, how many {self.things} would remain?",
            f"Suppose every {color} {self.thing} disappeared. How many {self.things} would be left in the {_img(rng)}?",
            f"How many {self.things} would be left after taking away the {color} ones?",
        ])
        long = (f"There {be(N)} {self.cnt(N)} in total. {cap(number(k))} of them {be(k)} {color}: "
                f"{self._list_objs(gone)}. ")
        if left:
            long += f"Removing {'it' if k == 1 else 'them'} would leave {self.cnt(len(left))}: {self._list_objs(left)}."
        else:
            long += f"Since every {self.thing} is {color}, removing them would leave no {self.things} at all."
        return QA("reasoning", question, long, str(len(left)), (), {"remove_color": color, "remaining": len(left)})

    def _r_compare(self, img: ImageEntry, rng: random.Random) -> QA | None:
        if any(o.iscrowd for o in img.objects):
            return None
        cats = Counter(o.category for o in img.objects)
        if len(cats) >= 2 and rng.random() < 0.6:
            a, b = rng.sample(sorted(cats), 2)
            na, nb = cats[a], cats[b]
            sa, sb = self.sg(a), self.sg(b)
            pa, pb = self.pl(a), self.pl(b)
        else:
            cols = Counter(o.color for o in img.objects if o.color)
            if len(cols) < 2:
                return None
            a, b = rng.sample(sorted(cols), 2)
            na, nb = cols[a], cols[b]
            sa, sb = self.np(None, a), self.np(None, b)
            pa, pb = self.np(None, a, n=2), self.np(None, b, n=2)
        question = rng.choice([f"Are there more {pa} than {pb}?", f"Does the {_img(rng)} have more {pa} than {pb}?",
                               f"Which are more numerous, {pa} or {pb}?"])
        counts = (f"There {be(na)} {'no ' + pa if na == 0 else number(na) + ' ' + (sa if na == 1 else pa)} and "
                  f"{'no ' + pb if nb == 0 else number(nb) + ' ' + (sb if nb == 1 else pb)}")
        if question.startswith("Which"):
            if na == nb:
                long = f"Neither. {counts}, so there are exactly as many {pa} as {pb}."
                short = "neither"
            else:
                more = pa if na > nb else pb
                long = f"{cap(counts)}, so the {more} are more numerous, by {number(abs(na - nb))}."
                short = more
        elif na > nb:
            long = f"Yes. {counts}, so the {pa} outnumber the {pb} by {number(na - nb)}."
            short = "yes"
        elif na == nb:
            long = f"No. {counts}, so there are exactly as many {pa} as {pb}."
            short = "no"
        else:
            long = f"No. {counts}, so there are fewer {pa} than {pb}."
            short = "no"
        return QA("reasoning", question, long, short, (), {"a": a, "b": b, "na": na, "nb": nb})

    def _r_majority_color(self, img: ImageEntry, rng: random.Random) -> QA | None:
        if not img.objects or any(not o.color for o in img.objects):
            return None
        cols = Counter(o.color for o in img.objects)
        (top, k), *rest = cols.most_common()
        if k < 2 or (rest and rest[0][1] == k):
            return None
        question = rng.choice([f"Which colour is the most common among the {self.things}?",
                               f"What is the most frequent color in the {_img(rng)}?",
                               f"Which color do most of the {self.things} share?"])
        others = join([f"{number(n)} {c}" for c, n in rest]) if rest else ""
        long = (f"{cap(top)} is the most common colour: {number(k)} of the {self.cnt(len(img.objects))} "
                f"are {top} ({self._list_objs([o for o in img.objects if o.color == top])})")
        long += f", while the rest are {others}." if others else "; in fact every one of them is " + top + "."
        return QA("reasoning", question, long, top, tuple(self.colors), {"color": top})

    def _r_extreme(self, img: ImageEntry, rng: random.Random) -> QA | None:
        if len(img.objects) < 2:
            return None
        direction = rng.choice(["top", "bottom", "left", "right"])
        axis = 1 if direction in ("top", "bottom") else 0
        extent = img.height if axis else img.width
        sign = 1 if direction in ("top", "left") else -1
        objs = sorted(img.objects, key=lambda o: sign * o.center[axis])
        if abs(objs[0].center[axis] - objs[1].center[axis]) < 0.08 * extent:
            return None
        refs = self._refs(img, objs[0], exclude=("position",))
        if not refs:
            return None
        the = self._pick_ref(rng, refs).the(rng)
        question = rng.choice([f"Which {self.thing} is closest to the {direction} of the {_img(rng)}?",
                               f"Which {self.thing} is nearest the {direction} edge?",
                               f"Of all the {self.things}, which one is furthest toward the {direction}?"])
        others = [f"{self.a(o)} {where(o.position)}"
                  for o in objs[1:4]]
        long = (f"{cap(the)} is closest to the {direction}. It is {where(objs[0].position)}, "
                f"while the others are further away: {join(others)}.")
        return QA("reasoning", question, long, the[4:], (), {"object": objs[0].index, "direction": direction})

    def _r_same_color(self, img: ImageEntry, rng: random.Random) -> QA | None:
        cats = Counter(o.category for o in img.objects)
        multi = [c for c, k in cats.items() if k >= 2]
        if not multi:
            return None
        cat = rng.choice(sorted(multi))
        objs = [o for o in img.objects if o.category == cat]
        if any(not o.color or o.iscrowd for o in objs):
            return None
        cols = Counter(o.color for o in objs)
        question = rng.choice([f"Do all the {self.pl(cat)} have the same colour?",
                               f"Are all of the {self.pl(cat)} the same color?",
                               f"Is every {self.sg(cat)} in the {_img(rng)} the same colour?"])
        if len(cols) == 1:
            long = f"Yes. There are {self.cnt(len(objs), cat)} and all of them are {objs[0].color}."
            short = "yes"
        else:
            parts = join([f"{number(k)} {c}" for c, k in sorted(cols.items())])
            long = f"No. The {self.cnt(len(objs), cat)} come in different colours: {parts}."
            short = "no"
        return QA("reasoning", question, long, short, ("yes", "no"), {"category": cat, "colors": dict(cols)})

    def _r_distinct_colors(self, img: ImageEntry, rng: random.Random) -> QA | None:
        if len(img.objects) < 2 or any(not o.color for o in img.objects):
            return None
        cols = Counter(o.color for o in img.objects)
        question = rng.choice([f"How many different colours do the {self.things} have?",
                               f"How many distinct colors appear among the {self.things}?",
                               f"Count the different colours used for the {self.things}."])
        detail = join([f"{c} ({number(k)})" for c, k in sorted(cols.items())])
        k = len(cols)
        long = (f"There {be(k)} {count_phrase(k, 'different colour')}: {detail}. "
                f"That covers all {self.cnt(len(img.objects))}.")
        return QA("reasoning", question, long, str(k), (), {"distinct": k})

    def _r_largest(self, img: ImageEntry, rng: random.Random) -> QA | None:
        if len(img.objects) < 2:
            return None
        objs = sorted(img.objects, key=lambda o: -(o.bbox[2] * o.bbox[3]))
        a0, a1 = objs[0].bbox[2] * objs[0].bbox[3], objs[1].bbox[2] * objs[1].bbox[3]
        if a0 < 1.5 * a1:
            return None
        refs = self._refs(img, objs[0], exclude=("size",))
        if not refs:
            return None
        the = self._pick_ref(rng, refs).the(rng)
        question = rng.choice([f"Which {self.thing} is the biggest?",
                               f"Which is the largest {self.thing} in the {_img(rng)}?",
                               f"What is the biggest {self.thing} here?"])
        second = objs[1]
        long = (f"{cap(the)} is the biggest {self.thing}; it is clearly larger than the next biggest one, "
                f"{self.a(second)} {where(second.position)}.")
        return QA("reasoning", question, long, the[4:], (), {"object": objs[0].index})

    def _r_add(self, img: ImageEntry, rng: random.Random) -> QA:
        cat = rng.choice(sorted({o.category for o in img.objects}) or self.categories)
        n = sum(1 for o in img.objects if o.category == cat)
        question = rng.choice([
            f"If one more {self.sg(cat)} were added, how many {self.pl(cat)} would there be?",
            f"Imagine another {self.sg(cat)} is drawn in the {_img(rng)}. How many {self.pl(cat)} would there be then?",
        ])
        now = f"there {be(n)} {self.cnt(n, cat)}"
        long = f"At the moment {now} in the {_img(rng)}, so adding one more would make {self.cnt(n + 1, cat)}."
        return QA("reasoning", question, long, str(n + 1), (), {"category": cat, "count": n + 1})
