"""LLaVA-Bench (In-the-Wild / COCO): open-ended answers graded by an LLM judge.

Two official releases are read, told apart by their questions file (see `LAYOUTS`):

- llava-bench-in-the-wild: `questions.jsonl` ({question_id, image, text, category}),
  `context.jsonl` ({image, caption} — the written description the judge sees) and
  `answers_gpt4.jsonl` ({question_id, text} — the reference answers);
- llava-bench-coco: `qa90_questions.jsonl`, `qa90_gpt4_answer.jsonl` (the same fields) and
  `caps_boxes_coco2014_val_80.jsonl` ({image, captions: [str], instances: [{category, bbox}]}):
  the judge sees the captions, one per line, then after a blank line one `category: [x1, y1, x2, y2]`
  line per instance (bbox as given in the file).

Each description is kept twice (`Description`): as our rules show it, and as LLaVA's review scripts
write it under [Context], which the LLaVA layout (a LLaVA rule.json) sends. The two differ where those
scripts join a caption given as one string character by character, and for a COCO row without
instances (an empty boxes section, its blank lines kept).

Images are at `DIR/images/<image>`. Each question is reviewed with the reference as assistant 1
and the model as assistant 2, under the judge's rules (`JudgeConfig.rules`; every question's
category must have a rule, checked when the questions are loaded). Relative score = mean model
grade / mean reference grade x 100, per category and overall.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
    need,
    read_jsonl_numbered,
    require_file,
)
from llavakit.eval.judge import Judge, JudgeConfig, Review, ReviewRequest, load_rules


@dataclass(frozen=True)
class Layout:
    """The file names of one LLaVA-Bench release, in the `--data` directory."""

    release: str
    questions: str
    context: str
    references: str


LAYOUTS = (
    Layout("llava-bench-in-the-wild", "questions.jsonl", "context.jsonl", "answers_gpt4.jsonl"),
    Layout("llava-bench-coco", "qa90_questions.jsonl", "caps_boxes_coco2014_val_80.jsonl", "qa90_gpt4_answer.jsonl"),
)


def find_layout(root: Path) -> Layout:
    """The release whose questions file is in `root`; an error if none or both are."""
    if not root.is_dir():
        raise FileNotFoundError(f"LLaVA-Bench directory not found: {root}")
    found = [layout for layout in LAYOUTS if (root / layout.questions).is_file()]
    if not found:
        names = " or ".join(layout.questions for layout in LAYOUTS)
        raise FileNotFoundError(f"{root}: no LLaVA-Bench questions file (looked for {names})")
    if len(found) > 1:
        raise EvalError(f"{root}: holds both {found[0].questions} and {found[1].questions}; keep one release per directory")
    return found[0]


def _texts(value: Any, where: str, key: str) -> list[str]:
    """A non-empty text, or a non-empty list of non-empty texts, as a list."""
    texts = value if isinstance(value, list) else [value]
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise EvalError(f"{where}: {key!r} is {value!r:.80}, not a non-empty text (or list of texts): "
                        "the judge would review without a description of the image")
    return texts


def _box_line(instance: Any, where: str) -> str:
    """`category: [x1, y1, x2, y2]` for one instance of a caps_boxes row."""
    category, bbox = need(instance, "category", where), need(instance, "bbox", where)
    if not isinstance(category, str) or not category.strip():
        raise EvalError(f"{where}: 'category' is {category!r}, not a name")
    numbers = isinstance(bbox, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
    if not numbers or len(bbox) != 4:
        raise EvalError(f"{where}: 'bbox' is {bbox!r:.80}, not [x1, y1, x2, y2]")
    return f"{category}: [{', '.join(str(v) for v in bbox)}]"


@dataclass(frozen=True)
class Description:
    """What the judge reads about an image: `text` under our rules, `llava` in LLaVA's layout."""

    text: str
    llava: str
    """As LLaVA's review scripts write it under [Context]: they put a newline between the items of the caption
    field, so a caption given as one string (as context.jsonl gives it) becomes one character per line; a COCO
    row's boxes section follows its blank line even when the row has no instances."""


def _llava_lines(value: str | list[str]) -> str:
    """LLaVA's joining of a caption field: a newline between its items, i.e. between the characters of a string."""
    return "\n".join(value)


def describe(row: Any, where: str) -> Description:
    """An image's description from a context.jsonl `caption` (a list is joined line by line), or a caps_boxes row's
    `captions`, one per line, then a blank line and one box line per `instances` entry (no section without any)."""
    if isinstance(row, Mapping) and "captions" in row:
        captions = _texts(row["captions"], where, "captions")
        instances = need(row, "instances", where, " (a row with 'captions' also lists the image's 'instances')")
        if not isinstance(instances, list):
            raise EvalError(f"{where}: 'instances' is a {type(instances).__name__}, not a list")
        boxes = "\n".join(_box_line(inst, f"{where}: instance {i}") for i, inst in enumerate(instances))
        text = "\n".join(captions) + ("\n\n" + boxes if boxes else "")
        return Description(text, _llava_lines(row["captions"]) + "\n\n" + boxes)
    caption = need(row, "caption", where, " (nor 'captions'): the judge needs the image's description")
    return Description("\n".join(_texts(caption, where, "caption")), _llava_lines(caption))


def _index(path: Path, key: str, value: Callable[[Any, str], Any]) -> dict[Any, Any]:
    """row[key] -> value(row, "file:line") for every row of a JSON-lines file; a repeated key is an error."""
    out: dict[Any, Any] = {}
    lines: dict[Any, int] = {}
    for lineno, row in read_jsonl_numbered(path):
        where = f"{path}:{lineno}"
        k = need(row, key, where)
        if k in out:
            raise EvalError(f"{where}: {key} {k!r} again (first at line {lines[k]})")
        out[k], lines[k] = value(row, where), lineno
    return out


def _reference(row: Any, where: str) -> str:
    text = need(row, "text", where)
    if not isinstance(text, str) or not text.strip():
        raise EvalError(f"{where}: reference answer 'text' is {text!r:.80}, not a non-empty text")
    return text


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
        """Questions joined with their image description and reference answer (release: `find_layout`)."""
        root = Path(data_path)
        layout = find_layout(root)
        contexts = _index(require_file(root / layout.context, f"{layout.release} {layout.context}"), "image", describe)
        refs = _index(require_file(root / layout.references, f"{layout.release} {layout.references}"), "question_id",
                      _reference)  # fmt: skip
        qpath = root / layout.questions
        items = [self._item(root, layout, q, f"{qpath}:{lineno}", contexts, refs) for lineno, q in read_jsonl_numbered(qpath)]
        check_unique_ids(items, qpath)
        self._check_rules(items, qpath)
        return items

    def _check_rules(self, items: Sequence[EvalItem], qpath: Path) -> None:
        """With a judge set, every question's category has a rule in its rules file (before any prediction)."""
        if self.judge is None:
            return
        rules = load_rules(self.judge.rules, self.judge.system)
        for item in items:
            rules.rule_for(item.category, item.meta["release"], f"{qpath}: question {item.question_id!r}")

    def _item(self, root: Path, layout: Layout, q: Any, where: str, contexts: Mapping[str, Description],
              refs: Mapping[Any, str]) -> EvalItem:  # fmt: skip
        qid = need(q, "question_id", where)
        where = f"{where} (question {qid!r})"
        image, text, category = need(q, "image", where), need(q, "text", where), need(q, "category", where)
        if image not in contexts:
            raise EvalError(f"{where}: no description of image {image!r} in {root / layout.context}")
        if qid not in refs:
            raise EvalError(f"{where}: no reference answer in {root / layout.references}")
        return EvalItem(
            question_id=qid,
            prompt=image_prompt(text, None),
            images=(str(root / "images" / image),),
            answer=refs[qid],
            category=category,
            max_new_tokens=LONG_MAX_NEW_TOKENS,
            meta={"context": contexts[image].text, "llava_context": contexts[image].llava, "question": text,
                  "release": layout.release},
        )

    def score(self, items: Sequence[EvalItem], answers: Mapping[QuestionId, str]) -> dict[str, Any]:
        """Judge every answer (cached), then relative scores; any judge failure aborts with the question named."""
        if self.judge is None:
            raise EvalError("llava_bench needs a judge: pass --judge-url and --judge-model")
        texts = answers_for(items, answers, self.name)
        reviews = []
        with Judge(self.judge) as judge:
            for item, text in zip(items, texts):
                req = ReviewRequest(item.question_id, item.category, item.meta["context"], item.meta["question"],
                                    item.answer, text, item.meta["release"], item.meta["llava_context"])
                reviews.append((item.category, judge.review(req)))
            calls, rules = judge.calls, judge.rules
        rows = relative_scores(reviews)
        metrics = {"relative_score": rows["all"]["relative_score"]} | {
            f"{c}_relative": r["relative_score"] for c, r in rows.items() if c != "all"
        }
        details = {
            "judge_model": self.judge.model,
            "judge_calls": calls,
            "judge_rules": {"file": rules.source, "format": rules.style, "sha256": rules.digest, "system": rules.system},
            "reviews": {str(r.question_id): [r.reference_score, r.model_score] for _, r in reviews},
        }
        return make_result(self.name, len(items), "relative_score", metrics, {"category": rows}, details)
