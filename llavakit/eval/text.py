"""Answer normalisation and parsing, following each benchmark's official evaluation code.

- `normalize_vqa`: the VQA evaluation's answer processing (punctuation, number words,
  articles, contractions), applied the same way to predictions and annotator answers.
- `normalize_gqa`: LLaVA's GQA conversion (strip, drop a trailing period, lower-case).
- `parse_letter`: ScienceQA / multiple-choice letter parsing as in LLaVA's ScienceQA scorer.
- `parse_yes_no_pope`: LLaVA's POPE rule (first sentence; "no"/"not"/"No" as a word means no).
- `parse_yes_no_mme`: MME's rule ("yes"/"no", else looked for in the first four characters).
"""

from __future__ import annotations

import re
from functools import lru_cache

# Canonical spellings whose apostrophe-less forms the VQA evaluation maps back. Forms with
# one apostrophe are matched with it removed; forms with several, with any one removed.
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't "
    "haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've "
    "shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll "
    "someone's something'd something'd've something'll that's there'd there'd've there're there's "
    "they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're "
    "what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're "
    "why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll "
    "you're you've"
).split()

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
LETTERS = "ABCDE"


@lru_cache(maxsize=1)
def contractions() -> dict[str, str]:
    """The VQA evaluation's contraction table: apostrophe-dropped spelling -> canonical one."""
    table: dict[str, str] = {}
    for word in _CONTRACTED:
        cuts = [i for i, ch in enumerate(word) if ch == "'"]
        if len(cuts) == 1:
            table[word.replace("'", "")] = word
        else:
            for i in cuts:
                table[word[:i] + word[i + 1 :]] = word
    return table


def process_punctuation(text: str) -> str:
    """VQA punctuation handling: marks next to a space (or any, in "1,000"-like text) are dropped,
    other marks become spaces; periods not followed by a digit are dropped."""
    out = text
    squeeze = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        if squeeze or (p + " " in text) or (" " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def process_digit_article(text: str) -> str:
    """VQA word handling: lower-case, number words to digits, articles dropped, contractions restored."""
    table = contractions()
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(table.get(w, w) for w in words if w not in ARTICLES)


def normalize_vqa(text: str) -> str:
    """The full VQA answer normalisation ("Two dogs." -> "2 dogs")."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def normalize_gqa(text: str) -> str:
    """LLaVA's GQA answer conversion: strip, drop trailing periods, lower-case."""
    return text.strip().rstrip(".").lower().strip()


def parse_letter(text: str, num_choices: int) -> str | None:
    """The option letter in a multiple-choice answer, or None if it cannot be read.

    As LLaVA's ScienceQA scorer: the bare letter ("B"), a letter followed by ". " ("B. Paris"),
    or exactly one "The answer is B." in the text. Letters beyond the choices are rejected.
    """
    valid = LETTERS[:num_choices]
    t = text.strip()
    if len(t) == 1 and t in valid:
        found: str | None = t
    elif len(t) >= 3 and t[0] in LETTERS and t[1:3] == ". ":
        found = t[0]
    else:
        hits = re.findall(r"The answer is ([A-Z]).", t)
        found = hits[0] if len(hits) == 1 else None
    return found if found is not None and found in valid else None


def parse_yes_no_pope(text: str) -> str:
    """LLaVA's POPE rule: keep the first sentence, drop commas; "No", "no" or "not" as a word -> "no", else "yes"."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def parse_yes_no_mme(text: str) -> str:
    """MME's rule on the lower-cased answer: exactly yes/no, else "yes"/"no" within the first 4 characters, else "other"."""
    t = text.strip().lower()
    if t in ("yes", "no"):
        return t
    head = t[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"
