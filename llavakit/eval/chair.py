"""CHAIR-style hallucination scoring of free-text descriptions against a scene's objects.

Mentions are read from the text with a closed vocabulary: every shape category the world
generator can draw (singular and plural, plus a few synonyms such as "oval" for ellipse; fixed,
as CHAIR's COCO word list is, so "a hexagon" counts whatever the scenes hold) and colour words. A
colour counts for a mention when it stands right before the shape word, possibly with size
words in between ("a large red circle"). Within one description, mentions are deduplicated
by (category, colour), and a colourless mention of a category that also has a coloured one is
the same object named again ("a red circle ... the circle"), not another mention.

A mention is hallucinated when no scene object has its category (and its colour, if one was
given). Over a set of descriptions:
- CHAIR_i = hallucinated mentions / all mentions,
- CHAIR_s = descriptions with at least one hallucinated mention / all descriptions,
- recall  = scene objects matched by some mention of their description / all scene objects.
Negations ("there is no star") are not understood, as in the original CHAIR.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from llavakit.eval.common import percent

SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("disc", "disk"),
    "ellipse": ("oval",),
    "rectangle": ("oblong",),
    "diamond": ("rhombus", "lozenge"),
    "crescent": ("moon",),
    "cross": ("plus sign",),
}
IRREGULAR_PLURALS = {"rhombus": "rhombi"}
COLOR_ALIASES = {"grey": "gray"}
# Colour words the world may not use: mentioning them is still a (hallucinated) colour.
EXTRA_COLORS = ("magenta", "violet", "beige", "gold", "silver", "teal", "navy", "maroon", "turquoise", "lime", "tan", "indigo")
MODIFIERS = frozenset({"small", "medium", "large", "big", "tiny", "huge", "little", "sized", "bright", "dark", "light", "pale"})
_WORD = re.compile(r"[a-z]+")


def plurals(noun: str) -> list[str]:
    """Singular and plural surface forms of a (possibly multi-word) noun."""
    *head, last = noun.split()
    if last in IRREGULAR_PLURALS:
        plural = IRREGULAR_PLURALS[last]
        return [noun, " ".join([*head, plural]), " ".join([*head, last + "es"])]
    suffix = "es" if last.endswith(("s", "x", "z", "ch", "sh")) else "s"
    return [noun, " ".join([*head, last + suffix])]


@dataclass(frozen=True)
class Vocabulary:
    """Surface forms -> canonical category / colour."""

    nouns: dict[tuple[str, ...], str]
    colors: dict[str, str]

    @classmethod
    def build(cls, categories: Iterable[str], colors: Iterable[str]) -> Vocabulary:
        """The vocabulary of a world with these shape categories and object colours."""
        nouns: dict[tuple[str, ...], str] = {}
        for cat in categories:
            for form in (cat, *SYNONYMS.get(cat, ())):
                for surface in plurals(form.lower()):
                    nouns[tuple(surface.split())] = cat
        color_map = {c.lower(): c for c in (*colors, *EXTRA_COLORS)}
        color_map.update({alias: canon for alias, canon in COLOR_ALIASES.items() if canon in color_map.values()})
        return cls(nouns, color_map)

    @property
    def max_noun_words(self) -> int:
        return max((len(k) for k in self.nouns), default=1)


@dataclass(frozen=True)
class Mention:
    """An object named in a description; `color` is None when no colour was attached."""

    category: str
    color: str | None


@dataclass(frozen=True)
class SceneObject:
    """An object of the scene, as far as CHAIR cares."""

    category: str
    color: str | None


def find_mentions(text: str, vocab: Vocabulary) -> list[Mention]:
    """Distinct (category, colour) mentions in order of first appearance."""
    words = _WORD.findall(text.lower())
    found: dict[Mention, None] = {}
    i = 0
    while i < len(words):
        for n in range(min(vocab.max_noun_words, len(words) - i), 0, -1):
            cat = vocab.nouns.get(tuple(words[i : i + n]))
            if cat is not None:
                found.setdefault(Mention(cat, _color_before(words, i, vocab)), None)
                i += n
                break
        else:
            i += 1
    coloured = {m.category for m in found if m.color is not None}
    return [m for m in found if m.color is not None or m.category not in coloured]


def _color_before(words: Sequence[str], start: int, vocab: Vocabulary) -> str | None:
    j = start - 1
    while j >= 0 and words[j] in MODIFIERS:
        j -= 1
    return vocab.colors.get(words[j]) if j >= 0 else None


def matches(mention: Mention, obj: SceneObject) -> bool:
    """Whether the mention can refer to the object."""
    return mention.category == obj.category and (mention.color is None or mention.color == obj.color)


@dataclass(frozen=True)
class CaptionScore:
    """One description's mentions, which of them are hallucinated, and object recall."""

    mentions: tuple[Mention, ...]
    hallucinated: tuple[Mention, ...]
    recalled: int
    objects: int


def score_caption(text: str, objects: Sequence[SceneObject], vocab: Vocabulary) -> CaptionScore:
    """Score one description against its scene's objects."""
    mentions = find_mentions(text, vocab)
    hallucinated = tuple(m for m in mentions if not any(matches(m, o) for o in objects))
    recalled = sum(any(matches(m, o) for m in mentions) for o in objects)
    return CaptionScore(tuple(mentions), hallucinated, recalled, len(objects))


def chair_metrics(scores: Sequence[CaptionScore]) -> dict[str, float]:
    """CHAIR_i, CHAIR_s and recall (percent) with the counts behind them."""
    mentions = sum(len(s.mentions) for s in scores)
    hallucinated = sum(len(s.hallucinated) for s in scores)
    objects = sum(s.objects for s in scores)
    recalled = sum(s.recalled for s in scores)
    return {
        "chair_i": percent(hallucinated, mentions),
        "chair_s": percent(sum(bool(s.hallucinated) for s in scores), len(scores)),
        "recall": percent(recalled, objects),
        "mentions": mentions,
        "hallucinated": hallucinated,
        "objects": objects,
        "recalled": recalled,
        "count": len(scores),
    }
