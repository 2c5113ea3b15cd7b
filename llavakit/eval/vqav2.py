"""VQAv2 (and VQA-format sets) with the official VQA accuracy.

Files (the official release): `DIR/*questions*.json` ({"data_subtype": "val2014",
"questions": [{image_id, question, question_id}]}), `DIR/*annotations*.json`
({"annotations": [{question_id, answer_type, answers: [{answer, answer_id, ...}] x 10}]}),
images at `DIR/<data_subtype>/COCO_<data_subtype>_<image_id:012d>.jpg`.

Accuracy of one answer: for each of the 10 leave-one-annotator-out subsets of 9,
min(#annotators in the subset who gave the answer / 3, 1); the mean over the 10 subsets. As the
official script (vqaEval.py) does it: the answer goes through the whole VQA normalisation, the
annotators' answers only through its punctuation step, and only when they are not all the same.
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
    check_unique_ids,
    find_one,
    image_prompt,
    json_of,
    make_result,
    need,
    read_json,
)
from llavakit.eval.text import normalize_vqa, process_punctuation


def vqa_accuracy(prediction: str, annotator_answers: Sequence[str]) -> float:
    """The official VQA accuracy (0..1) of `prediction` against the annotators' answers (module docstring): so
    "2" scores 0 against ten "two"s, and "t-shirt" 0 against ten "t-shirt"s, as on the evaluation server."""
    if not annotator_answers:
        raise EvalError("VQA accuracy needs at least one annotator answer")
    pred = normalize_vqa(prediction)
    gts = list(annotator_answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    total = 0.0
    for left_out in range(len(gts)):
        matches = sum(1 for j, gt in enumerate(gts) if j != left_out and gt == pred)
        total += min(1.0, matches / 3.0)
    return total / len(gts)


@dataclass(frozen=True)
class VQAv2:
    """VQAv2 benchmark entry."""

    name: str = "vqav2"

    def load(self, data_path: Path) -> list[EvalItem]:
        """Questions joined with their annotations, in question-file order."""
        root = Path(data_path)
        qfile = find_one(root, ["*questions*.json"], "VQA questions")
        afile = find_one(root, ["*annotations*.json"], "VQA annotations")
        qdata = json_of(read_json(qfile), dict, qfile, 'an object with "questions"')
        adata = json_of(read_json(afile), dict, afile, 'an object with "annotations"')
        subtype = qdata.get("data_subtype", "val2014")
        anns = {need(a, "question_id", f"{afile}: annotation {i}"): a
                for i, a in enumerate(need(adata, "annotations", str(afile)))}
        items = []
        for i, q in enumerate(need(qdata, "questions", str(qfile))):
            qid = need(q, "question_id", f"{qfile}: question {i}")
            ann = anns.get(qid)
            if ann is None:
                raise EvalError(f"{afile}: no annotation for question {qid!r}")
            answers = [need(a, "answer", f"{afile}: question {qid!r}") for a in need(ann, "answers", f"{afile}: question {qid!r}")]
            if not answers:
                raise EvalError(f"{afile}: question {qid!r} has no annotator answers")
            image = root / subtype / f"COCO_{subtype}_{int(need(q, 'image_id', f'{qfile}: question {qid!r}')):012d}.jpg"
            items.append(
                EvalItem(
                    question_id=qid,
                    prompt=image_prompt(need(q, "question", f"{qfile}: question {qid!r}"), SHORT_ANSWER_SUFFIX),
                    images=(str(image),),
                    answer=answers,
                    category=ann.get("answer_type", "other"),
                )
            )
        check_unique_ids(items, qfile)
        return items

    def score(self, items: Sequence[EvalItem], answers: Mapping[QuestionId, str]) -> dict[str, Any]:
        """Mean VQA accuracy (percent), overall and per answer type (yes/no, number, other)."""
        texts = answers_for(items, answers, self.name)
        per_type: dict[str, list[float]] = {}
        accs = []
        for item, text in zip(items, texts):
            acc = vqa_accuracy(text, item.answer)
            accs.append(acc)
            per_type.setdefault(item.category, []).append(acc)
        overall = 100.0 * sum(accs) / len(accs) if accs else 0.0
        rows = {t: {"accuracy": 100.0 * sum(v) / len(v), "count": len(v)} for t, v in sorted(per_type.items())}
        metrics = {"accuracy": overall} | {t: r["accuracy"] for t, r in rows.items()}
        return make_result(self.name, len(items), "accuracy", metrics, {"answer_type": rows})
