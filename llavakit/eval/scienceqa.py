"""ScienceQA (IMG and text-only questions) with LLaVA-1.5's option-letter prompt.

Files (the official release): `DIR/problems.json` ({pid: problem}), `DIR/pid_splits.json`
({split: [pid, ...]}) and images at `DIR/images/<split>/<pid>/<problem["image"]>`.
Metrics: accuracy overall and by subject (NAT/SOC/LAN), context modality (TXT/IMG/NO) and
grade (G1-6/G7-12), as in the ScienceQA paper's table. TXT and IMG overlap (a question may
have both a text hint and an image); NO is neither.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llavakit.eval.common import (
    LETTER_SUFFIX,
    EvalError,
    EvalItem,
    QuestionId,
    answers_for,
    image_prompt,
    make_result,
    need,
    percent,
    read_json,
    require_file,
)
from llavakit.eval.text import LETTERS, parse_letter

SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")
GROUPS = {"subject": ("NAT", "SOC", "LAN"), "context": ("TXT", "IMG", "NO"), "grade": ("G1-6", "G7-12")}


def question_text(problem: Mapping[str, Any]) -> str:
    """The question as LLaVA-1.5 shows it: optional "Context: <hint>" line, question, "A. ..." lines."""
    choices = problem["choices"]
    if len(choices) > len(LETTERS):
        raise EvalError(f"ScienceQA problem has {len(choices)} choices; at most {len(LETTERS)} are supported")
    lines = [f"Context: {problem['hint']}"] if problem.get("hint") else []
    lines.append(problem["question"])
    lines.extend(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return "\n".join(lines)


def columns_of(problem: Mapping[str, Any]) -> list[str]:
    """The paper-table columns a problem counts towards."""
    cols = [SUBJECTS[problem["subject"]]]
    has_text, has_image = bool(problem.get("hint")), bool(problem.get("image"))
    cols += ["TXT"] * has_text + ["IMG"] * has_image + ["NO"] * (not has_text and not has_image)
    grade = int(str(problem["grade"]).removeprefix("grade"))
    cols.append("G1-6" if grade <= 6 else "G7-12")
    return cols


@dataclass(frozen=True)
class ScienceQA:
    """ScienceQA benchmark entry."""

    name: str = "scienceqa"
    split: str = "test"

    def load(self, data_path: Path) -> list[EvalItem]:
        """Items of `self.split` in pid_splits order."""
        root = Path(data_path)
        problems = read_json(require_file(root / "problems.json", "ScienceQA problems.json"))
        splits = read_json(require_file(root / "pid_splits.json", "ScienceQA pid_splits.json"))
        if self.split not in splits:
            raise EvalError(f"{root / 'pid_splits.json'}: no split {self.split!r} (has {', '.join(splits)})")
        return [self._item(root, pid, problems) for pid in splits[self.split]]

    def _item(self, root: Path, pid: str, problems: Mapping[str, Any]) -> EvalItem:
        if pid not in problems:
            raise EvalError(f"{root / 'problems.json'}: split {self.split!r} lists unknown problem {pid!r}")
        prob = problems[pid]
        where = f"{root / 'problems.json'}: problem {pid!r}"
        choices, answer = need(prob, "choices", where), need(prob, "answer", where)
        if not isinstance(answer, int) or not 0 <= answer < min(len(choices), len(LETTERS)):
            raise EvalError(f"{where}: answer {answer!r} is not the index of one of its {len(choices)} choices")
        if prob.get("subject") not in SUBJECTS:
            raise EvalError(f"ScienceQA problem {pid!r}: unknown subject {prob.get('subject')!r}")
        image = prob.get("image")
        images = (str(root / "images" / self.split / pid / image),) if image else ()
        return EvalItem(
            question_id=pid,
            prompt=image_prompt(question_text(prob), LETTER_SUFFIX, with_image=bool(image)),
            images=images,
            answer=LETTERS[answer],
            category=SUBJECTS[prob["subject"]],
            meta={"num_choices": len(choices), "columns": columns_of(prob)},
        )

    def score(self, items: Sequence[EvalItem], answers: Mapping[QuestionId, str]) -> dict[str, Any]:
        """Accuracy overall and per paper column; an unreadable letter counts as wrong."""
        texts = answers_for(items, answers, self.name)
        tally = {c: [0, 0] for c in COLUMNS}
        correct = unparsed = 0
        for item, text in zip(items, texts):
            letter = parse_letter(text, item.meta["num_choices"])
            unparsed += letter is None
            ok = letter == item.answer
            correct += ok
            for col in item.meta["columns"]:
                tally[col][0] += ok
                tally[col][1] += 1
        metrics = {"accuracy": percent(correct, len(items))}
        metrics.update({c: percent(k, n) for c, (k, n) in tally.items() if n})
        breakdown = {
            g: {c: {"accuracy": percent(*tally[c]), "count": tally[c][1]} for c in cols if tally[c][1]}
            for g, cols in GROUPS.items()
        }
        details = {"correct": correct, "unparsed": unparsed}
        return make_result(self.name, len(items), "accuracy", metrics, breakdown, details)
