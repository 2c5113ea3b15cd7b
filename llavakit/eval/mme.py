"""MME-style yes/no benchmark: acc and acc+ per subtask, scores summed per perception / cognition.

Files (the official release layout): one folder per subtask under `DIR`, each with either
`questions_answers_YN/<name>.txt` + `images/<name>.<jpg|png>` or `<name>.txt` +
`<name>.<jpg|png>` side by side. Each txt holds lines `question<TAB>Yes|No` (MME asks two
questions per image, one true and one false).

Per subtask: acc = correct answers / questions, acc+ = images whose questions are all
answered correctly / images, score = 100*acc + 100*acc+ (max 200). Perception and
cognition totals sum their subtasks' scores (cognition: the four COGNITION subtasks; every
other subtask counts as perception). Answers are read by MME's rule (`parse_yes_no_mme`).
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
    image_prompt,
    make_result,
    percent,
)
from llavakit.eval.text import parse_yes_no_mme

COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


def _question_files(task_dir: Path) -> tuple[list[Path], Path]:
    """The subtask's question files and the folder holding its images."""
    qa_dir = task_dir / "questions_answers_YN"
    if qa_dir.is_dir():
        return sorted(qa_dir.glob("*.txt")), task_dir / "images"
    return sorted(task_dir.glob("*.txt")), task_dir


def _image_for(image_dir: Path, stem: str, qfile: Path) -> Path:
    for suffix in IMAGE_SUFFIXES:
        if (image_dir / f"{stem}{suffix}").is_file():
            return image_dir / f"{stem}{suffix}"
    raise FileNotFoundError(f"{qfile}: no image {stem}.jpg/.png in {image_dir}")


def _parse_line(line: str, qfile: Path, lineno: int) -> tuple[str, str]:
    parts = line.rstrip("\n").split("\t")
    if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
        raise EvalError(f"{qfile}:{lineno}: expected 'question<TAB>Yes|No', got {line.strip()!r}")
    return parts[0].strip(), parts[1].strip().lower()


@dataclass(frozen=True)
class MME:
    """MME benchmark entry."""

    name: str = "mme"

    def load(self, data_path: Path) -> list[EvalItem]:
        """Items of every subtask folder, subtasks in name order."""
        root = Path(data_path)
        if not root.is_dir():
            raise FileNotFoundError(f"MME data directory not found: {root}")
        items = []
        for task_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            items += self._task_items(task_dir)
        if not items:
            raise FileNotFoundError(f"{root}: no MME subtask folders with question files")
        return items

    def _task_items(self, task_dir: Path) -> list[EvalItem]:
        qfiles, image_dir = _question_files(task_dir)
        items = []
        for qfile in qfiles:
            image = _image_for(image_dir, qfile.stem, qfile)
            lines = [ln for ln in qfile.read_text(encoding="utf-8").splitlines() if ln.strip()]
            for k, line in enumerate(lines):
                question, label = _parse_line(line, qfile, k + 1)
                items.append(
                    EvalItem(
                        question_id=f"{task_dir.name}/{image.name}/{k}",
                        prompt=image_prompt(question, SHORT_ANSWER_SUFFIX),
                        images=(str(image),),
                        answer=label,
                        category=task_dir.name,
                        meta={"image": image.name},
                    )
                )
        return items

    def score(self, items: Sequence[EvalItem], answers: Mapping[QuestionId, str]) -> dict[str, Any]:
        """acc, acc+ and score per subtask; perception / cognition / overall totals."""
        texts = answers_for(items, answers, self.name)
        tasks: dict[str, dict[str, list[bool]]] = {}
        others: dict[str, int] = {}
        for item, text in zip(items, texts):
            pred = parse_yes_no_mme(text)
            others[item.category] = others.get(item.category, 0) + (pred == "other")
            tasks.setdefault(item.category, {}).setdefault(item.meta["image"], []).append(pred == item.answer)
        rows = {t: _task_row(images, others[t]) for t, images in sorted(tasks.items())}
        cognition = sum(r["score"] for t, r in rows.items() if t in COGNITION)
        perception = sum(r["score"] for t, r in rows.items() if t not in COGNITION)
        metrics = {"score": perception + cognition, "perception": perception, "cognition": cognition}
        return make_result(self.name, len(items), "score", metrics, {"subtask": rows})


def _task_row(images: Mapping[str, list[bool]], other_answers: int) -> dict[str, float]:
    questions = [ok for oks in images.values() for ok in oks]
    acc = percent(sum(questions), len(questions))
    acc_plus = percent(sum(all(oks) for oks in images.values()), len(images))
    return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "count": len(questions), "other_answers": other_answers}
