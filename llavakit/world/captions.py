"""Five COCO-style captions per scene, written from the scene graph alone.

Each caption takes one angle on the scene (inventory, counts, colours, positions, a
relation, the largest object, text, chart, background) with varied phrasing, and
every statement is true of the scene. Conventions the tests (and later stages) rely on:

- `<number word> <category>` (e.g. "two circles", "one star") is the exact count of that category;
- `<number word> <colour> shape(s)` is the exact count of shapes of that colour;
- `<number word> shapes` is the exact number of shape objects, `<number word> objects` of all
  objects (the same unless clip art is on); lists elsewhere use articles ("a", "more").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

Scene = dict[str, Any]
Obj = dict[str, Any]

NUMBER_WORDS: tuple[str, ...] = (
    "no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)  # fmt: skip
SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {"ellipse": ("ellipse", "oval")}
IRREGULAR_PLURALS: dict[str, str] = {"cross": "crosses", "person": "people"}
CLIPART_NOUNS: dict[str, str] = {  # subject folder (openclipart-png) → singular noun
    "animals": "animal",
    "buildings": "building",
    "containers": "container",
    "decorations": "decoration",
    "education": "school item",
    "electronics": "electronic device",
    "food": "food item",
    "geography": "map",
    "office": "office item",
    "people": "person",
    "plants": "plant",
    "recreation": "leisure item",
    "science": "science item",
    "signs and symbols": "sign",
    "tools": "tool",
    "transportation": "vehicle",
    "computer": "computer icon",
    "logos": "logo",
    "buttons": "button",
    "shapes": "clip-art figure",
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little"),
    "medium": ("medium-sized", "mid-sized"),
    "large": ("large", "big"),
}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "at the top left", "in the upper left"),
    "top": ("at the top", "near the top", "in the upper middle"),
    "top right": ("in the top right corner", "at the top right", "in the upper right"),
    "left": ("on the left", "on the left side", "at the left"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "on the right side", "at the right"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left"),
    "bottom": ("at the bottom", "near the bottom", "in the lower middle"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right"),
}
PREDICATE_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "higher up than"),
    "below": ("below", "beneath", "under"),
}
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
OPENERS: tuple[str, ...] = (
    "An image of {}", "A picture showing {}", "A simple drawing of {}", "{}",
    "A synthetic scene with {}", "An illustration of {}", "A picture with {}", "A graphic of {}",
)  # fmt: skip
NUM_CAPTIONS = 5
CAPTION_TRIES = 40


def pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def number(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def plural(noun: str) -> str:
    last = noun.split(" ")[-1]
    if last in IRREGULAR_PLURALS:
        return noun[: -len(last)] + IRREGULAR_PLURALS[last]
    return noun + ("es" if noun.endswith(("s", "x")) else "s")


def article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def sentence(text: str) -> str:
    text = text.strip().rstrip(".")
    return text[:1].upper() + text[1:] + "."


def noun(obj: Obj, rng: np.random.Generator) -> str:
    """The object's noun: its shape name (or a synonym) or a clip-art subject noun."""
    if obj["supercategory"] == "clipart":
        base = CLIPART_NOUNS.get(obj["category"], f"{obj['category']} picture")
        return base if rng.random() < 0.5 else f"clip-art {base}"
    return pick(rng, SHAPE_SYNONYMS.get(obj["category"], (obj["category"],)))


def category_noun(obj: Obj) -> str:
    if obj["supercategory"] == "clipart":
        return CLIPART_NOUNS.get(obj["category"], f"{obj['category']} picture")
    return obj["category"]


def describe(obj: Obj, rng: np.random.Generator, size_p: float = 0.4, color_p: float = 0.9) -> str:
    """'large red circle', 'blue star', 'small hexagon'... (without article)."""
    words = []
    if rng.random() < size_p:
        words.append(pick(rng, SIZE_WORDS[obj["size"]]))
    if obj.get("color") and rng.random() < color_p:
        words.append(obj["color"])
    words.append(noun(obj, rng))
    return " ".join(words)


def a_(obj: Obj, rng: np.random.Generator, **kw: float) -> str:
    return article(describe(obj, rng, **kw))


def thing_word(scene: Scene, rng: np.random.Generator) -> str:
    """'shape' or 'object' ('object' whenever clip art is present)."""
    if any(o["supercategory"] != "shape" for o in scene["objects"]):
        return "object"
    return pick(rng, ("shape", "shape", "object"))


def background_phrase(bg: dict[str, Any], rng: np.random.Generator) -> str:
    """'on a white background', 'on a background fading from blue to white', ..."""
    color = bg["color"]
    if bg["kind"] == "gradient":
        return pick(rng, (f"on {article(color)} and {bg['color2']} gradient background",
                          f"on a background fading from {color} to {bg['color2']}"))  # fmt: skip
    if bg["kind"] == "noise":
        return f"on a {pick(rng, ('textured', 'noisy', 'speckled'))} {color} background"
    return pick(rng, (f"on {article(color)} background", f"against a plain {color} background"))


# --- caption kinds ----------------------------------------------------------------------


def cap_inventory(scene: Scene, rng: np.random.Generator) -> str | None:
    objs = list(scene["objects"])
    if not objs:
        return None
    order = [objs[int(i)] for i in rng.permutation(len(objs))]
    if len(order) <= 4:
        listed = join([a_(o, rng) for o in order])
    else:
        more = f"{number(len(order) - 3)} more {thing_word(scene, rng)}s"
        listed = ", ".join(a_(o, rng) for o in order[:3]) + " and " + more
    text = pick(rng, OPENERS).format(listed)
    if rng.random() < 0.4:
        text += " " + background_phrase(scene["background"], rng)
    return sentence(text)


def counts_phrase(scene: Scene, rng: np.random.Generator) -> str:
    counts = Counter(category_noun(o) for o in scene["objects"])
    names = [k for k, _ in counts.most_common()]
    if rng.random() < 0.5:
        names = [names[int(i)] for i in rng.permutation(len(names))]
    return join([f"{number(counts[k])} {k if counts[k] == 1 else plural(k)}" for k in names])


def cap_counts(scene: Scene, rng: np.random.Generator) -> str:
    n, thing = len(scene["objects"]), thing_word(scene, rng)
    if n == 0:
        return sentence(pick(rng, (f"there are no {thing}s in this image",
                                   f"an image without any {thing}s")))  # fmt: skip
    if n == 1:
        only = a_(scene["objects"][0], rng, size_p=0.3)
        return sentence(pick(rng, (f"there is only one {thing}: {only}", f"a single {thing}, {only}")))
    phrase = counts_phrase(scene, rng)
    templates = (
        f"there are {number(n)} {thing}s: {phrase}",
        f"{number(n)} {thing}s in total: {phrase}",
        f"the image contains {phrase}",
        f"this picture has {phrase}",
        f"{phrase}, {number(n)} {thing}s in all",
    )
    return sentence(pick(rng, templates))


def cap_colors(scene: Scene, rng: np.random.Generator) -> str | None:
    shapes = [o for o in scene["objects"] if o["supercategory"] == "shape"]
    if not shapes:
        return None
    counts = Counter(o["color"] for o in shapes)
    colors = [c for c, _ in counts.most_common()]
    bg = " " + background_phrase(scene["background"], rng) if rng.random() < 0.5 else ""
    if len(shapes) == 1:
        return sentence(pick(rng, (f"one {colors[0]} shape{bg}", f"the only shape is {colors[0]}")))
    if len(counts) == 1:
        every = "both shapes" if len(shapes) == 2 else f"all {number(len(shapes))} shapes"
        return sentence(f"{every} are {colors[0]}{bg}")
    if rng.random() < 0.5:
        parts = [f"{number(k)} {c} {'shape' if k == 1 else 'shapes'}" for c, k in counts.most_common()]
        return sentence(join(parts) + bg)
    order = [colors[int(i)] for i in rng.permutation(len(colors))]
    return sentence(pick(rng, (f"shapes in {join(order)}{bg}", f"{join(order)} shapes{bg}",
                               f"a few shapes colored {join(order)}{bg}")))  # fmt: skip


def cap_positions(scene: Scene, rng: np.random.Generator) -> str | None:
    objs = scene["objects"]
    if not objs:
        return None
    chosen = [objs[int(i)] for i in rng.permutation(len(objs))[: min(3, len(objs))]]
    if len(chosen) == 1 or rng.random() < 0.25:
        o = chosen[0]
        pos = pick(rng, POSITION_PHRASES[o["position"]])
        return sentence(pick(rng, (f"{pos} there is {a_(o, rng)}", f"{a_(o, rng)} sits {pos}",
                                   f"{a_(o, rng)} {pos} of the image")))  # fmt: skip
    parts = [f"{a_(o, rng)} {pick(rng, POSITION_PHRASES[o['position']])}" for o in chosen]
    return sentence(join(parts))


def cap_relation(scene: Scene, rng: np.random.Generator) -> str | None:
    rels = scene["relations"]
    if not rels:
        return None
    objs = scene["objects"]
    rel = rels[int(rng.integers(len(rels)))]
    subj, obj, pred = objs[rel["subject"]], objs[rel["object"]], rel["predicate"]
    if pred == "overlapping":
        s, o = a_(subj, rng), a_(obj, rng)
        return sentence(pick(rng, (f"{s} overlapping {o}", f"{s} and {o} overlap", f"{s} overlaps {o}")))
    if rng.random() < 0.5:
        subj, obj, pred = obj, subj, INVERSE[pred]
    verb = pick(rng, ("", "is ", "placed "))
    return sentence(f"{a_(subj, rng)} {verb}{pick(rng, PREDICATE_PHRASES[pred])} {a_(obj, rng)}")


def cap_largest(scene: Scene, rng: np.random.Generator) -> str | None:
    objs = sorted(scene["objects"], key=lambda o: o["area"], reverse=True)
    if len(objs) < 2:
        return None
    thing = thing_word(scene, rng)
    if objs[0]["area"] >= 1.5 * objs[1]["area"] and rng.random() < 0.6:
        big = a_(objs[0], rng, size_p=0.0)
        return sentence(pick(rng, (f"the largest {thing} is {big}", f"{big} is the biggest {thing}")))
    if objs[-1]["area"] * 1.5 <= objs[-2]["area"]:
        small = a_(objs[-1], rng, size_p=0.0)
        return sentence(pick(rng, (f"the smallest {thing} is {small}", f"{small} is the smallest {thing}")))
    return None


def cap_text(scene: Scene, rng: np.random.Generator) -> str | None:
    texts = scene["text"]
    if not texts:
        return None
    if len(texts) > 1:
        words = join([f'"{t["string"]}"' for t in texts])
        return sentence(pick(rng, (f"the words {words} are written on the image",
                                   f"text reading {words} on the image")))  # fmt: skip
    t = texts[0]
    s, c, pos = t["string"], t["color"], pick(rng, POSITION_PHRASES[t["position"]])
    return sentence(pick(rng, (f'the word "{s}" written in {c} {pos}', f'{c} text reading "{s}" {pos}',
                               f'the text "{s}" appears {pos}', f'a label that says "{s}"')))  # fmt: skip


def cap_chart(scene: Scene, rng: np.random.Generator) -> str | None:
    chart = scene["chart"]
    if not chart:
        return None
    labels, values, colors = chart["labels"], chart["values"], chart["colors"]
    n = len(values)
    tallest = labels[int(np.argmax(values))]
    shortest = labels[int(np.argmin(values))]
    hue = f"{colors[0]} bars" if len(set(colors)) == 1 else "bars of different colors"
    templates = (
        f"a bar chart with {number(n)} bars labeled {join(labels)}",
        f"a small bar chart where bar {tallest} is the tallest",
        f"a bar chart with {hue}, the shortest one labeled {shortest}",
        f"a bar chart of {number(n)} {hue}",
    )
    return sentence(pick(rng, templates))


def cap_overview(scene: Scene, rng: np.random.Generator) -> str:
    n, thing = len(scene["objects"]), thing_word(scene, rng)
    count = f"{number(n)} {thing}{'' if n == 1 else 's'}"
    bg = background_phrase(scene["background"], rng)
    verbs = ("", "drawn ", "scattered ") if n > 1 else ("", "drawn ")
    return sentence(f"{count} {pick(rng, verbs)}{bg}")


CaptionFn = Callable[[Scene, np.random.Generator], "str | None"]
KINDS: dict[str, tuple[CaptionFn, float]] = {
    "counts": (cap_counts, 2.0),
    "colors": (cap_colors, 2.0),
    "positions": (cap_positions, 2.0),
    "relation": (cap_relation, 2.0),
    "largest": (cap_largest, 1.0),
    "overview": (cap_overview, 1.0),
}


def make_captions(scene: Scene, rng: np.random.Generator, n: int = NUM_CAPTIONS) -> list[str]:
    """`n` distinct captions (when the scene allows): inventory, any text/chart, then a mix."""
    out: list[str] = []

    def add(fn: CaptionFn) -> None:
        text = fn(scene, rng)
        if text and text not in out and len(out) < n:
            out.append(text)

    for fn in (cap_inventory, cap_text, cap_chart):
        add(fn)
    names = list(KINDS)
    weights = np.array([KINDS[k][1] for k in names])
    keys = rng.random(len(names)) ** (1.0 / weights)  # weighted order (Efraimidis-Spirakis)
    for i in np.argsort(-keys):
        add(KINDS[names[int(i)]][0])
    refill: tuple[CaptionFn, ...] = (cap_inventory, cap_positions, cap_counts, cap_colors, cap_overview)
    for t in range(CAPTION_TRIES):
        if len(out) >= n:
            break
        add(refill[t % len(refill)])
    while len(out) < n:  # a scene too bare for n distinct sentences: repeat the first
        out.append(out[0])
    return [out[int(i)] for i in rng.permutation(len(out))]
