"""Parse and validate teacher output.

`qa` format (conversation, reasoning)::

    Question:
    How many dogs are there?
    ===
    Answer:
    There are two dogs.
    ===
    Question:
    ...

Labels may carry the text on the same line (`Question: How many ...`) and may be bold
(`**Answer:**`); blocks are separated by lines of `===` (a new label line also starts a block).
`prose` format (detail): one or more paragraphs, no Question/Answer blocks.

Anything else is rejected with a short machine-readable `code` and a human `message`; the caller
counts rejections per code, so nothing is ever dropped silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

IMAGE_TOKEN = "<image>"

_LABEL = re.compile(r"^\s*(?:\*\*|__|#+\s*)?(question|answer)\s*\d*\s*[:：]\s*(?:\*\*|__)?\s*", re.IGNORECASE)
_SEP = re.compile(r"^\s*={3,}\s*$")
# A bracketed pair of decimals, e.g. "[0.123, 0.456" — the box format of the context leaking out.
_COORDS = re.compile(r"\[\s*\d*\.\d+\s*,\s*\d*\.\d+")
_SOURCE_WORDS = re.compile(
    r"\b(the (given |provided )?(captions?|descriptions?|annotations?|context)|bounding box(es)?|coordinates?)\b",
    re.IGNORECASE,
)
_REFUSAL = re.compile(r"^\s*(I'?m sorry|I am sorry|As an AI|I cannot|I can'?t|I am unable|I'm unable)\b", re.IGNORECASE)
_REPEAT_WORD = re.compile(r"\b(\w+)(?:\W+\1\b){7,}", re.IGNORECASE)


class Rejected(Exception):
    """Teacher output that does not pass validation."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Rules:
    """What a valid output looks like for one prompt pack."""

    format: str = "qa"
    """'qa' (Question/===/Answer blocks) or 'prose'."""
    min_pairs: int = 1
    max_pairs: int = 10
    min_chars: int = 1
    """prose: shortest accepted text."""
    max_chars: int = 2000
    """qa: longest accepted turn; prose: longest accepted text."""


@dataclass
class Parsed:
    """A valid output: question/answer pairs (qa) or a text (prose)."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    text: str | None = None

    def to_json(self) -> dict:
        return {"text": self.text} if self.text is not None else {"pairs": [list(p) for p in self.pairs]}

    @classmethod
    def from_json(cls, obj: dict) -> Parsed:
        if "text" in obj:
            return cls(text=obj["text"])
        return cls(pairs=[(q, a) for q, a in obj["pairs"]])


def format_qa(pairs: list[tuple[str, str]]) -> str:
    """Render pairs in the teacher output format (what the offline teacher emits)."""
    return "\n===\n".join(f"Question:\n{q}\n===\nAnswer:\n{a}" for q, a in pairs)


def _clean(text: str) -> str:
    lines = [ln.rstrip() for ln in text.strip().splitlines()]
    out = "\n".join(lines).strip()
    return re.sub(r"\n{3,}", "\n\n", out)


def _common_checks(text: str, where: str) -> None:
    if IMAGE_TOKEN in text:
        raise Rejected("image_token", f"{where} contains the {IMAGE_TOKEN} token")
    if _COORDS.search(text):
        raise Rejected("coordinates", f"{where} quotes box coordinates: {_COORDS.search(text).group(0)!r}")
    m = _REPEAT_WORD.search(text)
    if m:
        raise Rejected("degenerate", f"{where} repeats {m.group(1)!r} over and over")
    visible = len("".join(text.split()))
    letters = sum(map(str.isalpha, text)) if visible >= 20 else 0
    if visible >= 20 and letters / visible < 0.6:
        raise Rejected("not_text", f"{where} is mostly not letters ({letters}/{visible})")


def _answer_checks(text: str, where: str) -> None:
    m = _SOURCE_WORDS.search(text)
    if m:
        raise Rejected("mentions_context", f"{where} talks about {m.group(0)!r} instead of the image")


def split_blocks(text: str) -> list[tuple[str, str]]:
    """[(label, text)] with label 'question' | 'answer'; raises Rejected on unlabelled text."""
    blocks: list[tuple[str, list[str]]] = []
    current: tuple[str, list[str]] | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        if _SEP.match(line):
            current = None
            continue
        m = _LABEL.match(line)
        if m:
            current = (m.group(1).lower(), [line[m.end():]])
            blocks.append(current)
            continue
        if current is None:
            if line.strip():
                raise Rejected("unlabelled_text",
                               f"line {lineno} is outside any Question/Answer block: {line.strip()[:80]!r}")
            continue
        current[1].append(line)
    return [(label, _clean("\n".join(body))) for label, body in blocks]


def parse_output(text: str, rules: Rules) -> Parsed:
    """Validate one teacher output; return the parsed turns or raise Rejected."""
    if not isinstance(text, str) or not text.strip():
        raise Rejected("empty", "the teacher returned no text")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if _REFUSAL.match(text):
        raise Rejected("refusal", f"the teacher refused: {text.strip()[:80]!r}")
    if rules.format == "prose":
        return _parse_prose(text, rules)
    blocks = split_blocks(text)
    if not blocks:
        raise Rejected("no_blocks", "no Question/Answer blocks found")
    for i, (label, body) in enumerate(blocks):
        expected = "question" if i % 2 == 0 else "answer"
        if label != expected:
            raise Rejected("bad_order", f"block {i + 1} is a {label} where a {expected} belongs")
        if not body:
            raise Rejected("empty_turn", f"block {i + 1} ({label}) is empty")
    if len(blocks) % 2:
        raise Rejected("unanswered_question", "the last Question has no Answer")
    pairs: list[tuple[str, str]] = []
    for i, (label, body) in enumerate(blocks):
        if len(body) > rules.max_chars:
            raise Rejected("turn_too_long", f"block {i + 1} has {len(body)} characters (max {rules.max_chars})")
        _common_checks(body, f"block {i + 1}")
        if label == "answer":
            _answer_checks(body, f"block {i + 1}")
            pairs.append((blocks[i - 1][1], body))
    questions = [q.lower() for q, _ in pairs]
    if len(set(questions)) != len(questions):
        raise Rejected("duplicate_question", "the same question is asked twice")
    if len(pairs) < rules.min_pairs:
        raise Rejected("too_few_pairs", f"{len(pairs)} question/answer pair(s), at least {rules.min_pairs} needed")
    if len(pairs) > rules.max_pairs:
        raise Rejected("too_many_pairs", f"{len(pairs)} question/answer pairs, at most {rules.max_pairs} allowed")
    return Parsed(pairs=pairs)


def _parse_prose(text: str, rules: Rules) -> Parsed:
    body = _clean(text)
    for line in body.splitlines():
        if _LABEL.match(line) or _SEP.match(line):
            raise Rejected("qa_in_prose", f"a description must be prose, found {line.strip()[:40]!r}")
    if len(body) < rules.min_chars:
        raise Rejected("too_short", f"{len(body)} characters (at least {rules.min_chars} needed)")
    if len(body) > rules.max_chars:
        raise Rejected("too_long", f"{len(body)} characters (max {rules.max_chars})")
    _common_checks(body, "the description")
    _answer_checks(body, "the description")
    return Parsed(text=body)
