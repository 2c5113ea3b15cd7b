"""GQA: exact match after normalisation, overall and per structural / semantic type.

Files (the official release): `DIR/*questions*.json` ({qid: {imageId, question, answer,
types: {structural, semantic, detailed}, ...}}, e.g. testdev_balanced_questions.json) and
images at `DIR/images/<imageId>.jpg`. Predictions are normalised as LLaVA's GQA conversion
does (strip, trailing periods dropped, lower-case); reference answers the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llavakit.eval.common import (
    SHORT_ANSWER_SUFFIX,
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
        """One item per question, in file order."""
        root = Path(data_path)
        qfile = find_one(root, ["*questions*.json"], "GQA questions")
        items = []
        for qid, q in json_of(read_json(qfile), dict, qfile, "an object of question id -> question").items():
            where = f"{qfile}: question {qid!r}"
            types = q.get("types", {}) if isinstance(q, dict) else {}
            items.append(
                EvalItem(
                    question_id=qid,
                    prompt=image_prompt(need(q, "question", where), SHORT_ANSWER_SUFFIX),
                    images=(str(root / "images" / f"{need(q, 'imageId', where)}.jpg"),),
                    answer=need(q, "answer", where, " (GQA's test and challenge files have none: use testdev_balanced)"),
                    category=types.get("structural", ""),
                    meta={"semantic": types.get("semantic", "")},
                )
            )
        return items

    def score(self, items: Sequence[EvalItem], answers: Mapping[QuestionId, str]) -> dict[str, Any]:
        """Exact-match accuracy (percent) overall, per structural type and per semantic type."""
        texts = answers_for(items, answers, self.name)
        hits = [normalize_gqa(t) == normalize_gqa(item.answer) for item, t in zip(items, texts)]
        breakdown = {
            "structural": group_rows((item.category, ok) for item, ok in zip(items, hits) if item.category),
            "semantic": group_rows((item.meta["semantic"], ok) for item, ok in zip(items, hits) if item.meta["semantic"]),
        }
        metrics = {"accuracy": percent(sum(hits), len(hits))}
        return make_result(self.name, len(items), "accuracy", metrics, breakdown)
