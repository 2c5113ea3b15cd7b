"""GQA: exact match after normalisation, overall, open / binary, and per structural / semantic type.

Files (the official release): `DIR/*questions*.json` ({qid: {imageId, question, answer, isBalanced,
types: {structural, semantic, detailed}, ...}}, e.g. testdev_balanced_questions.json) and
images at `DIR/images/<imageId>.jpg`. Predictions are normalised as LLaVA's GQA conversion
does (strip, trailing periods dropped, lower-case); reference answers the same way.

As GQA's official eval.py: only questions with `isBalanced` true count (a question without the
field is taken as balanced; the others are left out and counted in the results), and a question
is "open" if its structural type is `query`, else "binary" (verify, logical, choose, compare).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llavakit.eval.common import (
    SHORT_ANSWER_SUFFIX,
    EvalError,
    EvalItem,
    QuestionId,
    answers_for,
    find_one,
    group_rows,
    image_prompt,
    json_of,
    make_result,
    need,
    percent,
    read_json,
)
from llavakit.eval.text import normalize_gqa


@dataclass(frozen=True)
class GQA:
    """GQA benchmark entry."""

    name: str = "gqa"

    def load(self, data_path: Path) -> list[EvalItem]:
        """One item per balanced question, in file order; the unbalanced ones are left out (and counted)."""
        root = Path(data_path)
        qfile = find_one(root, ["*questions*.json"], "GQA questions")
        questions = json_of(read_json(qfile), dict, qfile, "an object of question id -> question")
        balanced = {qid: q for qid, q in questions.items() if _balanced(q, f"{qfile}: question {qid!r}")}
        left_out = len(questions) - len(balanced)
        if questions and not balanced:
            raise EvalError(f"{qfile}: all {left_out} questions have isBalanced false, and GQA's accuracy counts only "
                            "balanced ones (use a *_balanced_questions.json file)")
        source = {"file": qfile.name, "unbalanced_left_out": left_out}
        return [self._item(root, qid, q, f"{qfile}: question {qid!r}", source) for qid, q in balanced.items()]

    def _item(self, root: Path, qid: str, q: Any, where: str, source: Mapping[str, Any]) -> EvalItem:
        types = q.get("types", {}) if isinstance(q, dict) else {}
        return EvalItem(
            question_id=qid,
            prompt=image_prompt(need(q, "question", where), SHORT_ANSWER_SUFFIX),
            images=(str(root / "images" / f"{need(q, 'imageId', where)}.jpg"),),
            answer=need(q, "answer", where, " (GQA's test and challenge files have none: use testdev_balanced)"),
            category=types.get("structural", ""),
            meta={"semantic": types.get("semantic", ""), "source": source},
        )

    def score(self, items: Sequence[EvalItem], answers: Mapping[QuestionId, str]) -> dict[str, Any]:
        """Exact-match accuracy (percent) overall, open / binary, per structural type and per semantic type."""
        texts = answers_for(items, answers, self.name)
        hits = [normalize_gqa(t) == normalize_gqa(item.answer) for item, t in zip(items, texts)]
        typed = [(item, ok) for item, ok in zip(items, hits) if item.category]
        breakdown = {
            "answer_type": group_rows((answer_type(item.category), ok) for item, ok in typed),
            "structural": group_rows((item.category, ok) for item, ok in typed),
            "semantic": group_rows((item.meta["semantic"], ok) for item, ok in zip(items, hits) if item.meta["semantic"]),
        }
        metrics = {"accuracy": percent(sum(hits), len(hits))}
        metrics |= {kind: row["accuracy"] for kind, row in breakdown["answer_type"].items()}
        return make_result(self.name, len(items), "accuracy", metrics, breakdown, _details(items, len(typed)))


def answer_type(structural: str) -> str:
    """GQA's official split: "open" for `query` questions, "binary" for every other structural type."""
    return "open" if structural == "query" else "binary"


def _balanced(q: Any, where: str) -> bool:
    """The question's `isBalanced` (true when absent); anything but true/false is an error."""
    flag = q.get("isBalanced", True) if isinstance(q, dict) else True
    if not isinstance(flag, bool):
        raise EvalError(f"{where}: 'isBalanced' is {flag!r}, not true or false")
    return flag


def _details(items: Sequence[EvalItem], typed: int) -> dict[str, Any]:
    """What was not scored, said in results.json and (as notes) in results.md."""
    source = items[0].meta.get("source", {}) if items else {}
    left_out = source.get("unbalanced_left_out", 0)
    notes = []
    if left_out:
        notes.append(f"{left_out} question(s) of {source['file']} have isBalanced false and are not scored, "
                     "as in GQA's official evaluation")
    if typed < len(items):
        notes.append(f"{len(items) - typed} question(s) have no structural type and are not in open / binary")
    return {"unbalanced_left_out": left_out, "untyped": len(items) - typed, "notes": notes}
