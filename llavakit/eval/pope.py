"""POPE: object-hallucination yes/no probing, scored per split as LLaVA does.

Files (the official release): `DIR/coco_pope_<split>.json` for split in random / popular /
adversarial, each JSON lines `{"question_id", "image", "text", "label": "yes"|"no"}`, and
the images at `DIR/images/<image>` (COCO val2014 for the COCO splits). Question ids repeat
across split files, so items are keyed `"<split>/<question_id>"`.

Answers become yes/no by LLaVA's rule (see `parse_yes_no_pope`); "yes" is the positive class.
Metrics per split: accuracy, precision, recall, F1 and the ratio of "yes" answers (percent).
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
    image_prompt,
    make_result,
    need,
    percent,
    read_jsonl,
)
from llavakit.eval.text import parse_yes_no_pope

SPLIT_ORDER = ("random", "popular", "adversarial")


def binary_metrics(preds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1, yes-ratio (percent) and the confusion counts; "yes" is positive.

    An empty denominator (e.g. no "yes" predictions for precision) gives 0.0; the counts are reported.
    """
    if len(preds) != len(labels):
        raise EvalError(f"{len(preds)} predictions for {len(labels)} labels")
    tp = sum(p == "yes" and l == "yes" for p, l in zip(preds, labels))
    fp = sum(p == "yes" and l == "no" for p, l in zip(preds, labels))
    tn = sum(p == "no" and l == "no" for p, l in zip(preds, labels))
    fn = sum(p == "no" and l == "yes" for p, l in zip(preds, labels))
    precision, recall = percent(tp, tp + fp), percent(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": percent(tp + tn, len(labels)),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": percent(sum(p == "yes" for p in preds), len(preds)),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "count": len(labels),
    }  # fmt: skip


def split_name(path: Path) -> str:
    """"coco_pope_random.json" -> "random"; other names -> their stem."""
    stem = path.name.split(".")[0]
    return stem.split("pope_", 1)[1] if "pope_" in stem else stem


def _split_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"POPE data not found: {root}")
    files = sorted({*root.glob("*pope_*.json"), *root.glob("*pope_*.jsonl")})
    if not files:
        raise FileNotFoundError(f"{root}: no POPE files (expected coco_pope_<split>.json)")
    rank = {s: i for i, s in enumerate(SPLIT_ORDER)}
    return sorted(files, key=lambda p: (rank.get(split_name(p), len(rank)), p.name))


NO_LABEL = " (a file of questions only, e.g. LLaVA's llava_pope_test.jsonl? POPE's coco_pope_<split>.json has labels)"


@dataclass(frozen=True)
class POPE:
    """POPE benchmark entry."""

    name: str = "pope"

    def load(self, data_path: Path) -> list[EvalItem]:
        """Items of every split file (or of the one file given), split by split."""
        root = Path(data_path)
        image_dir = (root.parent if root.is_file() else root) / "images"
        items = []
        for path in _split_files(root):
            split = split_name(path)
            for lineno, row in enumerate(read_jsonl(path), 1):
                where = f"{path}:{lineno}"
                qid = need(row, "question_id", where)
                where = f"{where} (question {qid!r})"
                label = str(need(row, "label", where, NO_LABEL)).strip().lower()
                if label not in ("yes", "no"):
                    raise EvalError(f"{where}: label {row['label']!r}; expected yes/no")
                items.append(
                    EvalItem(
                        question_id=f"{split}/{qid}",
                        prompt=image_prompt(need(row, "text", where), SHORT_ANSWER_SUFFIX),
                        images=(str(image_dir / need(row, "image", where)),),
                        answer=label,
                        category=split,
                    )
                )
        check_unique_ids(items, root)
        return items

    def score(self, items: Sequence[EvalItem], answers: Mapping[QuestionId, str]) -> dict[str, Any]:
        """Per-split metrics; the headline numbers are the means over splits (F1 is charted)."""
        texts = answers_for(items, answers, self.name)
        return pope_result(self.name, items, [parse_yes_no_pope(t) for t in texts])


def pope_result(benchmark: str, items: Sequence[EvalItem], preds: Sequence[str]) -> dict[str, Any]:
    """Scores of already-parsed yes/no predictions, per split (item.category)."""
    rows = {}
    for split in dict.fromkeys(item.category for item in items):
        pairs = [(p, item.answer) for item, p in zip(items, preds) if item.category == split]
        rows[split] = binary_metrics([p for p, _ in pairs], [l for _, l in pairs])
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    metrics = {k: sum(r[k] for r in rows.values()) / len(rows) for k in keys} if rows else dict.fromkeys(keys, 0.0)
    return make_result(benchmark, len(items), "f1", metrics, {"split": rows})
