"""The evaluation runner: batched prediction with resume, then scoring and reports.

`answers.jsonl` uses LLaVA's answer format, one line per question
(`{"question_id", "prompt", "text", "model_id"}`), appended and flushed batch by batch. A rerun
into the same directory predicts only the questions not yet answered there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llavakit.eval.common import Benchmark, EvalError, EvalItem, PredictFn, QuestionId, need
from llavakit.eval.registry import get_benchmark
from llavakit.eval.report import write_reports

ANSWERS_FILE = "answers.jsonl"


def load_answers(path: Path, model_id: str | None = None, prompts: dict | None = None) -> dict[QuestionId, str]:
    """Answers already in `path` (question id -> text).

    A final line cut short by a crash is removed from the file; any other bad line is an error.
    With `model_id`, answers written by a different model are an error (use another --out).
    """
    if not path.is_file():
        return {}
    lines = _repair_tail(path).split(b"\n")
    answers: dict[QuestionId, str] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise EvalError(f"{path}:{lineno}: not valid JSON; fix or delete the file") from None
        qid, text = need(row, "question_id", f"{path}:{lineno}"), need(row, "text", f"{path}:{lineno}")
        if not isinstance(text, str):
            raise EvalError(f"{path}:{lineno}: answer 'text' is {type(text).__name__}, not a string")
        if qid in answers:
            raise EvalError(f"{path}:{lineno}: a second answer to question {qid!r}")
        if model_id is not None and row.get("model_id", "") != model_id:
            raise EvalError(
                f"{path} holds answers of model {row.get('model_id')!r}, not {model_id!r}; use another --out directory"
            )
        answers[qid] = text
        if prompts is not None and "prompt" in row:
            prompts[qid] = row["prompt"]
    return answers


def _repair_tail(path: Path) -> bytes:
    """Make the file end with a newline: drop an unterminated, unreadable last line (an interrupted
    write) or terminate a readable one. Returns the repaired content."""
    raw = path.read_bytes()
    if not raw or raw.endswith(b"\n"):
        return raw
    head, _, tail = raw.rpartition(b"\n")
    head = head + b"\n" if head else b""
    try:
        json.loads(tail)
        fixed = raw + b"\n"
    except json.JSONDecodeError:
        fixed = head
    path.write_bytes(fixed)
    return fixed


def batches(items: Sequence[EvalItem], size: int) -> Iterator[list[EvalItem]]:
    """Consecutive batches of `size` items, items with similar token budgets together."""
    ordered = sorted(items, key=lambda it: it.max_new_tokens)
    for start in range(0, len(ordered), size):
        yield ordered[start : start + size]


def check_images(items: Sequence[EvalItem]) -> None:
    """Fail before any prediction if an item's image file is missing."""
    missing = [(it.question_id, p) for it in items for p in it.images if not Path(p).is_file()]
    if missing:
        qid, path = missing[0]
        raise FileNotFoundError(f"{len(missing)} image file(s) missing, first {path} (question {qid!r})")


def predict_missing(
    items: Sequence[EvalItem],
    predict_fn: PredictFn,
    answers_path: Path,
    model_id: str,
    batch_size: int,
    log: Callable[[str], None] | None = None,
) -> dict[QuestionId, str]:
    """Predict the items, appending each batch's answers to `answers_path` as soon as it is done."""
    new: dict[QuestionId, str] = {}
    with open(answers_path, "a", encoding="utf-8") as fh:
        for batch in batches(items, batch_size):
            texts = predict_fn(batch)
            if len(texts) != len(batch) or not all(isinstance(t, str) for t in texts):
                raise EvalError(f"predict_fn returned {len(texts)} answers for {len(batch)} questions (need one string each)")
            for item, text in zip(batch, texts):
                row = {"question_id": item.question_id, "prompt": item.prompt, "text": text.strip(), "model_id": model_id}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                new[item.question_id] = text.strip()
            fh.flush()
            if log:
                log(f"answered {len(new)}/{len(items)}")
    return new


def evaluate(
    benchmark: str | Benchmark,
    data_path: str | Path,
    predict_fn: PredictFn,
    out_dir: str | Path,
    batch_size: int = 8,
    model_id: str = "",
    limit: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run a benchmark end to end; writes answers.jsonl, results.json, results.md, chart.png in `out_dir`.

    `limit` keeps the first N questions. Returns the results dict (see `common.make_result`),
    with `model_id` and `run` ({new_answers, reused_answers}) added.
    """
    bench = get_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
    run = predict_benchmark(bench, data_path, predict_fn, out_dir, batch_size, model_id, limit, log)
    return score_and_report(bench, run.items, run.answers, Path(out_dir), model_id, new_answers=run.new_answers)


@dataclass(frozen=True)
class PredictionRun:
    """The questions of a run and every answer to them (reused and new)."""

    items: list[EvalItem]
    answers: dict[QuestionId, str]
    new_answers: int


def predict_benchmark(
    bench: Benchmark,
    data_path: str | Path,
    predict_fn: PredictFn,
    out_dir: str | Path,
    batch_size: int = 8,
    model_id: str = "",
    limit: int | None = None,
    log: Callable[[str], None] | None = None,
) -> PredictionRun:
    """Load the questions and answer those `out_dir/answers.jsonl` does not answer yet (no scoring)."""
    if batch_size < 1:
        raise EvalError(f"batch size must be >= 1, got {batch_size}")
    items = bench.load(Path(data_path))
    items = items[:limit] if limit is not None else items
    if not items:
        raise EvalError(f"{bench.name}: no questions in {data_path}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    asked: dict[QuestionId, str] = {}
    answers = load_answers(out / ANSWERS_FILE, model_id, asked)
    changed = next((it for it in items if it.question_id in asked and asked[it.question_id] != it.prompt), None)
    if changed is not None:  # a changed benchmark: those answers are to other questions
        raise EvalError(f"{out / ANSWERS_FILE} answers question {changed.question_id!r} as it was asked before "
                        f"({asked[changed.question_id]!r:.80}), not as it is now ({changed.prompt!r:.80}); "
                        "use another --out or delete the file")
    pending = [it for it in items if it.question_id not in answers]
    if log:
        log(f"{bench.name}: {len(items)} questions, {len(items) - len(pending)} already answered")
    check_images(pending)
    answers.update(predict_missing(pending, predict_fn, out / ANSWERS_FILE, model_id, batch_size, log))
    return PredictionRun(items, answers, len(pending))


def score_and_report(
    bench: Benchmark,
    items: Sequence[EvalItem],
    answers: dict[QuestionId, str],
    out: Path,
    model_id: str,
    new_answers: int = 0,
) -> dict[str, Any]:
    """Score, add run information, write the reports; returns the results."""
    results = bench.score(items, answers)
    results["model_id"] = model_id
    results["run"] = {"new_answers": new_answers, "reused_answers": len(items) - new_answers}
    write_reports(results, out)
    return results
