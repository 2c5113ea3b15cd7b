"""VQAv2 (and VQA-format sets) with the official VQA accuracy, and the EvalAI submission file.

Files (the official release): `DIR/*questions*.json` ({"data_subtype": "val2014",
"questions": [{image_id, question, question_id}]}), `DIR/*annotations*.json`
({"annotations": [{question_id, answer_type, question_type, answers: [{answer, answer_id, ...}] x 10}]}),
images at `DIR/<folder>/COCO_<folder>_<image_id:012d>.jpg`, the folder being the questions file's
`data_subtype` (test-dev2015's images are those of test2015).

Accuracy of one answer: for each of the 10 leave-one-annotator-out subsets of 9,
min(#annotators in the subset who gave the answer / 3, 1); the mean over the 10 subsets. As the
official script (vqaEval.py) does it: the answer goes through the whole VQA normalisation, the
annotators' answers only through its punctuation step, and only when they are not all the same.
Reported overall, per answer type and per question type, as vqaEval.py does.

Test splits have no annotations: `VQAv2(questions_only=True)` loads the questions alone, and
`write_submission` writes the answers as the evaluation server takes them (a JSON list of
{"question_id": int, "answer": str}). Answers go through the official VQA normalisation, the one the
server applies to a result anyway, and nothing more (LLaVA's converter adds a first step of its own:
see docs/evaluation.md). A test-dev file without the rest of test2015 may be refused by the server:
`partial_submission_warning` says so.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
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
    require_file,
)
from llavakit.eval.text import normalize_vqa, process_punctuation

TEST_DEV = "test-dev2015"
IMAGE_FOLDERS = {TEST_DEV: "test2015"}
"""data_subtype -> image folder (and file-name part) where they differ: test-dev is a subset of test2015."""


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
class Annotations:
    """The annotations file and its entries by question id."""

    path: Path
    by_question: Mapping[QuestionId, Any]

    @classmethod
    def read(cls, root: Path) -> "Annotations":
        afile = find_one(root, ["*annotations*.json"], "VQA annotations (a test split has none: see --submission)")
        adata = json_of(read_json(afile), dict, afile, 'an object with "annotations"')
        entries = enumerate(need(adata, "annotations", str(afile)))
        return cls(afile, {need(a, "question_id", f"{afile}: annotation {i}"): a for i, a in entries})

    def join(self, item: EvalItem) -> EvalItem:
        """The item with its annotators' answers (answer), answer type (category) and question type (meta)."""
        ann = self.by_question.get(item.question_id)
        if ann is None:
            raise EvalError(f"{self.path}: no annotation for question {item.question_id!r}")
        where = f"{self.path}: question {item.question_id!r}"
        answers = [need(a, "answer", where) for a in need(ann, "answers", where)]
        if not answers:
            raise EvalError(f"{self.path}: question {item.question_id!r} has no annotator answers")
        meta = dict(item.meta) | ({"question_type": ann["question_type"]} if "question_type" in ann else {})
        return replace(item, answer=answers, category=ann.get("answer_type", "other"), meta=meta)


@dataclass(frozen=True)
class VQAv2:
    """VQAv2 benchmark entry; `questions_only` (a test split) loads no annotations and cannot be scored."""

    name: str = "vqav2"
    questions_only: bool = False

    def load(self, data_path: Path) -> list[EvalItem]:
        """Questions joined with their annotations (unless `questions_only`), in question-file order; each item's
        meta holds the questions file's `data_subtype`."""
        root = Path(data_path)
        qfile = find_one(root, ["*questions*.json"], "VQA questions")
        qdata = json_of(read_json(qfile), dict, qfile, 'an object with "questions"')
        anns = None if self.questions_only else Annotations.read(root)
        subtype = qdata.get("data_subtype", "val2014")
        folder = IMAGE_FOLDERS.get(subtype, subtype)
        items = []
        for i, q in enumerate(need(qdata, "questions", str(qfile))):
            qid = need(q, "question_id", f"{qfile}: question {i}")
            where = f"{qfile}: question {qid!r}"
            image = root / folder / f"COCO_{folder}_{int(need(q, 'image_id', where)):012d}.jpg"
            item = EvalItem(question_id=qid, prompt=image_prompt(need(q, "question", where), SHORT_ANSWER_SUFFIX),
                            images=(str(image),), meta={"data_subtype": subtype})  # fmt: skip
            items.append(item if anns is None else anns.join(item))
        check_unique_ids(items, qfile)
        return items

    def score(self, items: Sequence[EvalItem], answers: Mapping[QuestionId, str]) -> dict[str, Any]:
        """Mean VQA accuracy (percent), overall, per answer type (yes/no, number, other) and per question type."""
        if any(item.answer is None for item in items):
            raise EvalError("vqav2: the questions were loaded without annotations (a test split): they are graded by "
                            "the evaluation server; write its file with --submission or `llavakit eval vqav2-submission`")
        texts = answers_for(items, answers, self.name)
        accs = [vqa_accuracy(text, item.answer) for item, text in zip(items, texts)]
        breakdown = {"answer_type": _mean_rows((item.category, acc) for item, acc in zip(items, accs))}
        qtypes = [(item.meta.get("question_type"), acc) for item, acc in zip(items, accs)]
        if any(qt is not None for qt, _ in qtypes):
            breakdown["question_type"] = _mean_rows((qt, acc) for qt, acc in qtypes if qt is not None)
        overall = 100.0 * sum(accs) / len(accs) if accs else 0.0
        metrics = {"accuracy": overall} | {t: r["accuracy"] for t, r in breakdown["answer_type"].items()}
        return make_result(self.name, len(items), "accuracy", metrics, breakdown)


def _mean_rows(values: Iterable[tuple[str, float]]) -> dict[str, dict[str, float]]:
    """Mean accuracy (percent) and count per group, groups sorted."""
    groups: dict[str, list[float]] = {}
    for group, acc in values:
        groups.setdefault(group, []).append(acc)
    return {g: {"accuracy": 100.0 * sum(v) / len(v), "count": len(v)} for g, v in sorted(groups.items())}


@dataclass(frozen=True)
class Submission:
    """What `write_submission` wrote."""

    path: Path
    answered: int
    blank: int


def submission_rows(items: Sequence[EvalItem], answers: Mapping[QuestionId, str],
                    all_question_ids: Sequence[int] = ()) -> list[dict[str, Any]]:  # fmt: skip
    """The server's result list: {"question_id": int, "answer": VQA-normalised text} per item, then an empty answer
    for each id of `all_question_ids` (e.g. every test2015 question) that is not among the items."""
    texts = answers_for(items, answers, "vqav2")
    rows = []
    for item, text in zip(items, texts):
        if isinstance(item.question_id, bool) or not isinstance(item.question_id, int):
            raise EvalError(f"vqav2 submission: question id {item.question_id!r} is not an integer")
        rows.append({"question_id": item.question_id, "answer": normalize_vqa(text)})
    answered = {item.question_id for item in items}
    missing = answered - set(all_question_ids)
    if all_question_ids and missing:
        raise EvalError(f"{len(missing)} answered question(s), e.g. {min(missing)!r}, are not among the full question "
                        "list: is it the questions file of the same test set?")
    return rows + [{"question_id": qid, "answer": ""} for qid in all_question_ids if qid not in answered]


def question_ids(path: Path) -> list[int]:
    """The question ids of a VQA questions file (e.g. v2_OpenEnded_mscoco_test2015_questions.json)."""
    data = json_of(read_json(require_file(Path(path), "VQA questions file")), dict, path, 'an object with "questions"')
    return [need(q, "question_id", f"{path}: question {i}") for i, q in enumerate(need(data, "questions", str(path)))]


def write_submission(path: Path, items: Sequence[EvalItem], answers: Mapping[QuestionId, str],
                     all_questions: Path | None = None) -> Submission:  # fmt: skip
    """Write the EvalAI result file (`submission_rows`) to `path`; `all_questions`: a questions file whose other
    questions get an empty answer."""
    ids = question_ids(all_questions) if all_questions else []
    rows = submission_rows(items, answers, ids)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, ensure_ascii=False) + "\n", encoding="utf-8")
    return Submission(path, len(items), len(rows) - len(items))


def partial_submission_warning(path: Path, items: Sequence[EvalItem], all_questions: Path | None) -> str | None:
    """A warning for a test-dev result file that answers test-dev alone (no `all_questions`), or None."""
    if all_questions is not None or not any(item.meta.get("data_subtype") == TEST_DEV for item in items):
        return None
    return (f"warning: {path} answers only the {len(items)} {TEST_DEV} question(s) of --data. The VQA evaluation "
            f"server (EvalAI) takes a result file for all of test2015, test-dev being a subset of it, and may reject "
            f"one that lacks the other test2015 questions; LLaVA's converter always lists them, with an empty answer. "
            f"To do the same, pass --all-questions v2_OpenEnded_mscoco_test2015_questions.json.")
