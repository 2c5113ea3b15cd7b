"""Shared types and helpers of the evaluation layer: items, results, errors, JSON I/O."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

QuestionId = int | str
"""A question id, kept with the type the benchmark's own files give it (int or str)."""

SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
"""LLaVA-1.5's suffix for short-answer questions (VQAv2, GQA, POPE, MME)."""

LETTER_SUFFIX = "Answer with the option's letter from the given choices directly."
"""LLaVA-1.5's suffix for multiple-choice questions (ScienceQA, MMBench)."""

IMAGE_MARKER = "<image>"

SHORT_MAX_NEW_TOKENS = 32
LONG_MAX_NEW_TOKENS = 1024


class EvalError(ValueError):
    """Evaluation cannot go on as asked; the message names the file, benchmark or question at fault."""


@dataclass(frozen=True)
class EvalItem:
    """One question as the model sees it, plus what the scorer needs to grade the answer.

    `prompt` is the user turn with `<image>` markers (one per entry of `images`) and the
    benchmark's official answer-format suffix; the inference layer applies the chat template.
    """

    question_id: QuestionId
    prompt: str
    images: tuple[str, ...] = ()
    answer: Any = None
    """The reference: an option letter, a text answer, "yes"/"no", or a list of annotator answers."""
    category: str = ""
    """The scorer's main grouping key (subject, split, subtask, question type)."""
    max_new_tokens: int = SHORT_MAX_NEW_TOKENS
    meta: Mapping[str, Any] = field(default_factory=dict)
    """Anything else the scorer needs (grade, context flags, scene objects ...)."""


PredictFn = Callable[[list[EvalItem]], list[str]]
"""Answers a batch of items, one string per item, in order."""


class Benchmark(Protocol):
    """A registry entry: loads a benchmark's official files and scores answers with its metrics."""

    name: str

    def load(self, data_path: Path) -> list[EvalItem]:
        """Read the benchmark's files under `data_path` into items."""
        ...

    def score(self, items: Sequence[EvalItem], answers: Mapping[QuestionId, str]) -> dict[str, Any]:
        """Grade `answers` (question id -> model text) for `items`; see `make_result` for the shape."""
        ...


def make_result(
    benchmark: str,
    num_questions: int,
    primary: str,
    metrics: Mapping[str, float],
    breakdown: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The common shape of every benchmark's scores.

    `metrics` are the headline numbers (rates in percent); `primary` names the one charted;
    `breakdown` maps a grouping ("subject", "split" ...) to rows to metrics; `details` is free-form.
    """
    if primary not in metrics:
        raise EvalError(f"{benchmark}: primary metric {primary!r} is not among {sorted(metrics)}")
    return {
        "benchmark": benchmark,
        "num_questions": num_questions,
        "primary": primary,
        "metrics": dict(metrics),
        "breakdown": {g: {r: dict(m) for r, m in rows.items()} for g, rows in (breakdown or {}).items()},
        "details": dict(details or {}),
    }


def percent(numerator: float, denominator: float) -> float:
    """100 * numerator / denominator; 0.0 for an empty denominator (the count is reported beside it)."""
    return 100.0 * numerator / denominator if denominator else 0.0


def answers_for(items: Sequence[EvalItem], answers: Mapping[QuestionId, str], benchmark: str) -> list[str]:
    """The answer text of each item, in order; an error naming the first missing question."""
    missing = [item.question_id for item in items if item.question_id not in answers]
    if missing:
        raise EvalError(f"{benchmark}: no answer for {len(missing)} question(s), first {missing[0]!r}")
    return [answers[item.question_id] for item in items]


def check_unique_ids(items: Iterable[EvalItem], source: Path) -> None:
    """Raise if two items share a question id (answers are keyed by it)."""
    seen: set[QuestionId] = set()
    for item in items:
        if item.question_id in seen:
            raise EvalError(f"{source}: duplicate question id {item.question_id!r}")
        seen.add(item.question_id)


def need(row: Any, key: str, where: str, hint: str = "") -> Any:
    """row[key] of a JSON object from a benchmark file; EvalError naming `where` (file, question) otherwise."""
    if not isinstance(row, Mapping):
        raise EvalError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if key not in row:
        raise EvalError(f"{where}: no {key!r} field{hint}")
    return row[key]


def json_of(data: Any, kind: type, path: Path, what: str) -> Any:
    """`data` if it is a `kind` (dict or list) at the top of `path`, else EvalError saying what was expected."""
    if not isinstance(data, kind):
        raise EvalError(f"{path}: expected {what}, got a JSON {type(data).__name__}")
    return data


def read_json(path: Path) -> Any:
    """Parse a JSON file; errors name the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EvalError(f"{path}: not valid JSON ({exc})") from None


def read_jsonl(path: Path) -> list[Any]:
    """Parse a JSON-lines file (blank lines skipped); errors name the file and line."""
    return [row for _, row in read_jsonl_numbered(path)]


def read_jsonl_numbered(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed row) of each non-blank line of a JSON-lines file; errors name the file and line."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise EvalError(f"{path}:{lineno}: not valid JSON ({exc})") from None
    return rows


def require_file(path: Path, what: str) -> Path:
    """Return `path` if it is a file, else a FileNotFoundError saying what was expected there."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def find_one(directory: Path, patterns: Sequence[str], what: str) -> Path:
    """The single file in `directory` matching the first pattern that matches anything."""
    if not directory.is_dir():
        raise FileNotFoundError(f"benchmark directory not found: {directory}")
    for pattern in patterns:
        found = sorted(directory.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise EvalError(f"{directory}: several {what} files ({names}); keep one")
    raise FileNotFoundError(f"{directory}: no {what} file (looked for {', '.join(patterns)})")


def image_prompt(text: str, suffix: str | None, with_image: bool = True) -> str:
    """LLaVA-1.5's user turn: `<image>` line, the question, then the answer-format suffix line."""
    parts = [IMAGE_MARKER] if with_image else []
    parts.append(text)
    if suffix:
        parts.append(suffix)
    return "\n".join(parts)


def group_rows(values: Iterable[tuple[str, bool]]) -> dict[str, dict[str, float]]:
    """Accuracy per group from (group, correct) pairs: {group: {"accuracy": %, "count": n}}."""
    tally: dict[str, list[int]] = {}
    for group, ok in values:
        t = tally.setdefault(group, [0, 0])
        t[0] += int(ok)
        t[1] += 1
    return {g: {"accuracy": percent(c, n), "count": n} for g, (c, n) in sorted(tally.items())}
