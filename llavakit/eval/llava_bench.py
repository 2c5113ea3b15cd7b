"""LLaVA-Bench (In-the-Wild / COCO): open-ended answers graded by an LLM judge.

Files (the official release): `DIR/questions.jsonl` ({question_id, image, text, category}),
`DIR/context.jsonl` ({image, caption} — the written description the judge sees),
`DIR/answers_gpt4.jsonl` ({question_id, text} — the reference answers) and `DIR/images/<image>`.

Each question is reviewed with the reference as assistant 1 and the model as assistant 2.
Relative score = mean model grade / mean reference grade x 100, per category and overall.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llavakit.eval.common import (
    LONG_MAX_NEW_TOKENS,
    EvalError,
    EvalItem,
    QuestionId,
    answers_for,
    check_unique_ids,
    image_prompt,
    make_result,
    read_jsonl,
    require_file,
)
from llavakit.eval.judge import Judge, JudgeConfig, Review, ReviewRequest


def _caption(row: Mapping[str, Any]) -> str:
    cap = row.get("caption", "")
    return "\n".join(cap) if isinstance(cap, list) else str(cap)


def relative_scores(reviews: Sequence[tuple[str, Review]]) -> dict[str, dict[str, float]]:
    """Per category and "all": reference mean, model mean, relative score (model/reference x 100), count."""
    groups: dict[str, list[Review]] = {}
    for category, review in reviews:
        groups.setdefault(category, []).append(review)
        groups.setdefault("all", []).append(review)
    rows = {}
    for name in sorted(groups, key=lambda g: (g == "all", g)):
        rs = groups[name]
        ref = sum(r.reference_score for r in rs) / len(rs)
        model = sum(r.model_score for r in rs) / len(rs)
        rows[name] = {"relative_score": 100.0 * model / ref, "reference_mean": ref, "model_mean": model, "count": len(rs)}
    return rows


@dataclass(frozen=True)
class LlavaBench:
    """LLaVA-Bench entry; `judge` must be set (dataclasses.replace) before scoring."""

    name: str = "llava_bench"
    judge: JudgeConfig | None = None

    def load(self, data_path: Path) -> list[EvalItem]:
        """Questions joined with their image description and reference answer."""
        root = Path(data_path)
        questions = read_jsonl(require_file(root / "questions.jsonl", "LLaVA-Bench questions.jsonl"))
        ctx_path = require_file(root / "context.jsonl", "LLaVA-Bench context.jsonl")
        contexts = {row["image"]: _caption(row) for row in read_jsonl(ctx_path)}
        refs_path = require_file(root / "answers_gpt4.jsonl", "LLaVA-Bench answers_gpt4.jsonl")
        refs = {row["question_id"]: row["text"] for row in read_jsonl(refs_path)}
        items = [self._item(root, q, contexts, refs) for q in questions]
        check_unique_ids(items, root / "questions.jsonl")
        return items

    def _item(self, root: Path, q: Mapping[str, Any], contexts: Mapping[str, str], refs: Mapping[Any, str]) -> EvalItem:
        qid = q["question_id"]
        if q["image"] not in contexts:
            raise EvalError(f"{root / 'context.jsonl'}: no description of image {q['image']!r} (question {qid!r})")
        if qid not in refs:
            raise EvalError(f"{root / 'answers_gpt4.jsonl'}: no reference answer for question {qid!r}")
        return EvalItem(
            question_id=qid,
            prompt=image_prompt(q["text"], None),
            images=(str(root / "images" / q["image"]),),
            answer=refs[qid],
            category=q["category"],
            max_new_tokens=LONG_MAX_NEW_TOKENS,
            meta={"context": contexts[q["image"]], "question": q["text"]},
        )

    def score(self, items: Sequence[EvalItem], answers: Mapping[QuestionId, str]) -> dict[str, Any]:
        """Judge every answer (cached), then relative scores; any judge failure aborts with the question named."""
        if self.judge is None:
            raise EvalError("llava_bench needs a judge: pass --judge-url and --judge-model")
        texts = answers_for(items, answers, self.name)
        reviews = []
        with Judge(self.judge) as judge:
            for item, text in zip(items, texts):
                req = ReviewRequest(item.question_id, item.category, item.meta["context"], item.meta["question"], item.answer, text)
                reviews.append((item.category, judge.review(req)))
            calls = judge.calls
        rows = relative_scores(reviews)
        metrics = {"relative_score": rows["all"]["relative_score"]} | {
            f"{c}_relative": r["relative_score"] for c, r in rows.items() if c != "all"
        }
        details = {
            "judge_model": self.judge.model,
            "judge_calls": calls,
            "reviews": {str(r.question_id): [r.reference_score, r.model_score] for _, r in reviews},
        }
        return make_result(self.name, len(items), "relative_score", metrics, {"category": rows}, details)
