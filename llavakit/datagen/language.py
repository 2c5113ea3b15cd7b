"""Small English helpers for template-generated text: plurals, articles, numbers, lists, positions."""

from __future__ import annotations

import random

NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()

_IRREGULAR = {
    "person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice",
    "foot": "feet", "tooth": "teeth", "sheep": "sheep", "fish": "fish", "deer": "deer",
    "knife": "knives", "leaf": "leaves", "wolf": "wolves", "shelf": "shelves", "skis": "skis",
    "scissors": "scissors", "glasses": "glasses", "series": "series", "species": "species",
    "cactus": "cacti", "bus": "buses", "octopus": "octopuses",
}  # fmt: skip


def plural(noun: str) -> str:
    """'circle' -> 'circles', 'cross' -> 'crosses', 'traffic light' -> 'traffic lights'."""
    head, _, last = noun.rpartition(" ")
    low = last.lower()
    if low in _IRREGULAR:
        out = _IRREGULAR[low]
    elif low.endswith(("s", "x", "z", "ch", "sh")):
        out = last + "es"
    elif low.endswith("y") and len(low) > 1 and low[-2] not in "aeiou":
        out = last[:-1] + "ies"
    else:
        out = last + "s"
    return f"{head} {out}" if head else out


# Clip-art categories of the generated world are subject folders ("animals", "food"); say them as nouns.
CLIPART_NOUNS: dict[str, tuple[str, str]] = {
    "animals": ("animal", "animals"), "buildings": ("building", "buildings"),
    "containers": ("container", "containers"), "electronics": ("electronic device", "electronic devices"),
    "food": ("food item", "food items"), "office": ("office item", "office items"), "people": ("person", "people"),
    "plants": ("plant", "plants"), "tools": ("tool", "tools"), "transportation": ("vehicle", "vehicles"),
}  # fmt: skip


def category_nouns(category: str, supercategory: str | None) -> tuple[str, str]:
    """(singular, plural) noun for a category name."""
    if supercategory == "clipart":
        return CLIPART_NOUNS.get(category) or (f"picture of {category}", f"pictures of {category}")
    return category, plural(category)


def noun_for(count: int, noun: str) -> str:
    return noun if count == 1 else plural(noun)


def article(phrase: str) -> str:
    """'a red circle', 'an orange star', 'an ellipse'."""
    low = phrase.lower()
    vowel = low[:1] in "aeiou" and not low.startswith(("uni", "use", "one", "eu"))
    return ("an " if vowel else "a ") + phrase


def number(n: int, rng: random.Random | None = None, digits_p: float = 0.0) -> str:
    """A number as a word (0..20), or digits when larger or (with probability digits_p) at random."""
    if 0 <= n < len(NUMBER_WORDS) and not (rng is not None and rng.random() < digits_p):
        return NUMBER_WORDS[n]
    return str(n)


def count_phrase(n: int, noun: str, rng: random.Random | None = None) -> str:
    """'one circle', 'three circles', 'no circles'."""
    if n == 0:
        return f"no {plural(noun)}"
    return f"{number(n, rng)} {noun_for(n, noun)}"


def be(n: int) -> str:
    return "is" if n == 1 else "are"


def join(items: list[str], conj: str = "and") -> str:
    items = [i for i in items if i]
    if not items:
        return ""
    if len(items) == 1:
        return items[0]
    return f"{', '.join(items[:-1])} {conj} {items[-1]}"


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


# How to say "(located) in <grid cell>"; the canonical cell name always appears verbatim,
# so a model trained on these answers names positions with the 3x3 grid vocabulary.
_WHERE = {
    "top left": ("in the top left", "in the top left corner", "in the top left part"),
    "top right": ("in the top right", "in the top right corner", "in the top right part"),
    "bottom left": ("in the bottom left", "in the bottom left corner", "in the bottom left part"),
    "bottom right": ("in the bottom right", "in the bottom right corner", "in the bottom right part"),
    "top": ("at the top", "at the top", "in the top middle"),
    "bottom": ("at the bottom", "at the bottom", "in the bottom middle"),
    "left": ("on the left", "on the left side", "on the left"),
    "right": ("on the right", "on the right side", "on the right"),
    "center": ("in the center", "in the center", "right in the center"),
}
# Question-side synonyms (questions may use words the answers never do).
_WHERE_ASK = {
    "top left": ("in the top left", "in the upper left", "in the top-left corner", "at the top left"),
    "top right": ("in the top right", "in the upper right", "in the top-right corner", "at the top right"),
    "bottom left": ("in the bottom left", "in the lower left", "in the bottom-left corner", "at the bottom left"),
    "bottom right": ("in the bottom right", "in the lower right", "in the bottom-right corner",
                     "at the bottom right"),
    "top": ("at the top center", "in the top middle", "in the upper middle", "at the top, in the middle"),
    "bottom": ("at the bottom center", "in the bottom middle", "in the lower middle", "at the bottom, in the middle"),
    "left": ("at the middle left", "in the middle of the left side", "on the left, halfway down", "at the center left"),
    "right": ("at the middle right", "in the middle of the right side", "on the right, halfway down",
              "at the center right"),
    "center": ("in the center", "in the middle", "at the center", "in the centre"),
}  # fmt: skip


def where(position: str, rng: random.Random | None = None, of_image: str | None = None) -> str:
    """'in the top left corner', 'at the top of the picture', ..."""
    options = _WHERE[position]
    text = options[0] if rng is None else rng.choice(options)
    if of_image and rng is not None and rng.random() < 0.35 and not text.startswith("right in"):
        text = f"{text} of the {of_image}"
    return text


def where_ask(position: str, rng: random.Random) -> str:
    """A phrase that names the grid cell unambiguously (edge cells say 'middle'), with synonyms."""
    return rng.choice(_WHERE_ASK[position])


_WHERE_REF = {"top": "at the top center", "bottom": "at the bottom center", "left": "at the middle left",
              "right": "at the middle right", "center": "in the center"}


def where_ref(position: str) -> str:
    """The grid cell as a post-modifier of a referring expression ('the circle at the top center')."""
    return _WHERE_REF.get(position, f"in the {position}")


def fmt_value(v: object) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)
