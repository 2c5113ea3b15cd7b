"""The recipe's evaluation: the offline benchmark on the held-out split, and its ablations.

- `full`: the trained model, as `llavakit eval --benchmark offline` runs it;
- `blind`: the same model and questions, every image replaced by a uniform grey square
  (`blank_image`: what the model answers from the question alone, the text-only ablation);
- `paraphrased`: the short-answer questions asked with wordings used nowhere in training
  (llavakit.recipe.phrasing).

Writes `<dir>/<name>/results.json` (and answers.jsonl, resumable) per run, and `summary.json` +
`summary.md` with the table the model card shows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHORT_TASKS = ("color", "shape", "count", "position", "existence")
GREY = (128, 128, 128)


def blank_image(size: tuple[int, int]):
    """A uniform grey square, as wide as the image's longer side. Square, so that the processor's
    pad-to-square adds no border that would show the aspect ratio: every blank image preprocesses
    to the same pixels, and the image-token layout is the real image's."""
    from PIL import Image

    side = max(size)
    return Image.new("RGB", (side, side), GREY)


def blind_predict_fn(pipe, max_new_tokens: int | None = None):
    """Like `pipeline_predict_fn`, with every image replaced by `blank_image`."""
    from PIL import Image

    def predict(items) -> list[str]:
        batch = []
        for item in items:
            images = []
            for p in item.images:
                with Image.open(p) as im:
                    images.append(blank_image(im.size))
            batch.append((images, item.prompt))
        budget = max_new_tokens or max(item.max_new_tokens for item in items)
        return list(pipe.generate(batch, max_new_tokens=budget, temperature=0.0))

    return predict


def build_benchmark(world: Path, out_file: Path, seed: int, pope_per_image: int, describe: bool,
                    images: int | None = None) -> dict:
    """The offline benchmark of `world`; without `describe` questions if asked, of its first `images` scenes only."""
    from collections import Counter

    from llavakit.eval.offline import build_offline

    summary = build_offline(world, out_file, seed=seed, pope_per_image=pope_per_image)
    if describe and images is None:
        return summary
    doc = json.loads(out_file.read_text(encoding="utf-8"))
    kept = set(sorted({q["image"] for q in doc["questions"]})[:images])
    doc["questions"] = [q for q in doc["questions"] if (describe or q["task"] != "describe") and q["image"] in kept]
    out_file.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    summary["questions"] = dict(Counter(q["task"] for q in doc["questions"]))
    if images is not None:
        summary["scenes"] = len(kept)
    return summary


def run_benchmarks(model, bench_file: Path, out: Path, *, ablations: list[str], batch_size: int, seed: int,
                   say=print, model_id: str = "llavakit") -> dict[str, Any]:
    """Run `full`, then the ablations in the order given, of one model on one benchmark file; returns {run: results}."""
    from llavakit.eval.runner import evaluate
    from llavakit.infer.api import load_pipeline

    pipe = load_pipeline(model) if isinstance(model, (str, Path)) else model
    progress = _progress(say)
    runs: dict[str, Any] = {}
    for run in ["full", *ablations]:
        file, predict, what = _ablation_input(run, pipe, bench_file, out, seed)
        say(f"eval {run}{what}: {file}")
        runs[run] = evaluate("offline", file, predict, out / run, batch_size, model_id, log=progress)
    return runs


def _ablation_input(run: str, pipe, bench_file: Path, out: Path, seed: int):
    """(question file, predict function, note) of one evaluation run."""
    from llavakit.eval.predict import pipeline_predict_fn
    from llavakit.recipe.phrasing import paraphrase_benchmark

    if run == "full":
        return bench_file, pipeline_predict_fn(pipe), ""
    if run == "paraphrased":
        para = out / "offline-paraphrased.json"
        paraphrase_benchmark(bench_file, para, seed)
        return para, pipeline_predict_fn(pipe), ""
    if run == "blind":
        blind = out / "offline-blind.json"
        doc = json.loads(bench_file.read_text(encoding="utf-8"))
        doc["questions"] = [q for q in doc["questions"] if q["task"] != "describe"]  # no objects to describe
        blind.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        return blind, blind_predict_fn(pipe), " (grey images)"
    raise ValueError(f"unknown evaluation run {run!r} (known: full, blind, paraphrased)")


def _progress(say):
    def log(msg: str) -> None:
        if msg.startswith("answered"):
            done, total = (int(x) for x in msg.split()[1].split("/"))
            if done == total or done % 80 < 8:  # about every 10 batches of 8
                say(f"  {msg}")
        else:
            say(f"  {msg}")

    return log


def summary_rows(runs: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """{metric: {run: value}}: per-task accuracy, exact-match overall, mc, POPE F1 / yes-ratio per split, CHAIR."""
    rows: dict[str, dict[str, float | None]] = {}

    def put(metric: str, run: str, value: float | None) -> None:
        rows.setdefault(metric, {})[run] = value

    for run, res in runs.items():
        tasks = res.get("breakdown", {}).get("task", {})
        for task in (*SHORT_TASKS, "mc"):
            if task in tasks:
                put(f"{task} (exact match %)" if task != "mc" else "multiple choice (letter %)", run, tasks[task]["accuracy"])
        m = res.get("metrics", {})
        if "short_answer_accuracy" in m:
            put("short answers overall (%)", run, m["short_answer_accuracy"])
        for split, row in res.get("breakdown", {}).get("pope", {}).items():
            put(f"POPE {split} F1", run, row["f1"])
            put(f"POPE {split} yes-ratio (%)", run, row["yes_ratio"])
        if "pope_f1" in m:
            put("POPE F1 (mean of splits)", run, m["pope_f1"])
        for key in ("chair_i", "chair_s", "recall"):
            if key in m:
                put(f"CHAIR {key}", run, m[key])
    return rows


def majority_rows(bench_file: Path) -> dict[str, dict[str, float]]:
    """What always giving each task's most frequent answer scores on this question set (the prior to beat)."""
    from collections import Counter

    from llavakit.eval.text import normalize_vqa

    doc = json.loads(Path(bench_file).read_text(encoding="utf-8"))
    by_task: dict[str, list[str]] = {}
    for q in doc["questions"]:
        if q["task"] in (*SHORT_TASKS, "mc"):
            by_task.setdefault(q["task"], []).append(normalize_vqa(str(q["answer"])))
    rows: dict[str, dict[str, float]] = {}
    hits = total = 0
    for task, answers in by_task.items():
        top = Counter(answers).most_common(1)[0][1]
        name = f"{task} (exact match %)" if task != "mc" else "multiple choice (letter %)"
        rows[name] = {"majority": 100.0 * top / len(answers)}
        if task != "mc":
            hits, total = hits + top, total + len(answers)
    if total:
        rows["short answers overall (%)"] = {"majority": 100.0 * hits / total}
    return rows


def format_table(rows: dict[str, dict[str, float | None]], runs: list[str]) -> str:
    lines = ["| metric | " + " | ".join(runs) + " |", "| --- |" + " ---: |" * len(runs)]
    for metric, values in rows.items():
        cells = [("" if values.get(r) is None else f"{values[r]:.1f}") for r in runs]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(runs: dict[str, Any], out: Path, extra: dict | None = None,
                  baseline: dict[str, dict[str, float]] | None = None) -> dict:
    """summary.json and summary.md; `baseline` ({metric: {"majority": value}}) adds a column."""
    rows = summary_rows(runs)
    names = list(runs)
    if baseline:
        for metric, values in baseline.items():
            rows.setdefault(metric, {}).update(values)
        names.append("majority")
    counts = {run: res.get("num_questions") for run, res in runs.items()}  # majority: same questions as full
    summary = {"rows": rows, "runs": names, "questions": counts, **(extra or {})}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(format_table(rows, names) + "\n", encoding="utf-8")
    return summary


def run_evaluation(recipe, path: Path) -> dict:
    c = recipe.cfg["eval"]
    path.mkdir(parents=True, exist_ok=True)
    bench = path / "offline.json"
    built = build_benchmark(recipe.world_dir(c["split"]), bench, int(c["seed"]), int(c["pope_per_image"]), bool(c["describe"]),
                            images=c.get("images"))
    recipe.say(f"eval: benchmark {bench}: {built['scenes']} held-out scenes, questions {built['questions']}")
    model = recipe.results["instruct"].dir / "model"
    runs = run_benchmarks(model, bench, path, ablations=list(c["ablations"]), batch_size=int(c["batch_size"]),
                          seed=int(c["seed"]), say=recipe.say, model_id=recipe.cfg["name"])
    summary = write_summary(runs, path, {"benchmark": str(bench), "scenes": built["scenes"]}, baseline=majority_rows(bench))
    recipe.say("eval:\n" + (path / "summary.md").read_text())
    return {"summary": summary}
