"""Does a wrong colour or shape answer name another object of the scene (a binding error) or nothing there at all?

    python experiments/binding.py runs/default/eval/offline.json runs/default/eval/full/answers.jsonl \
        runs/default/world/test

For the offline benchmark's `color` and `shape` questions, counts answers that are right, that name the colour
(shape) of another object in the same scene, and that name none in it, split by scenes of one object and of
several. Written by hand: a one-off reading of three files the recipe's eval step already wrote.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

ATTRIBUTE = {"color": "color", "shape": "category"}  # benchmark task -> scene-object field


def outcome(answer: str, truth: str, objects: list[dict], field: str) -> str:
    if answer == truth:
        return "right"
    return "another object's" if answer in {o.get(field) for o in objects} else "none in the scene"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("benchmark", type=Path, help="the offline benchmark file (offline.json)")
    ap.add_argument("answers", type=Path, help="the model's answers.jsonl on it")
    ap.add_argument("world", type=Path, help="the `llavakit world` split the benchmark was built from")
    args = ap.parse_args()
    questions = json.loads(args.benchmark.read_text())["questions"]
    answers = {r["question_id"]: r["text"].strip().lower().rstrip(".")
               for r in map(json.loads, args.answers.read_text().splitlines()) if r}
    scenes = {Path(s["file_name"]).name: s for s in map(json.loads, (args.world / "scenes.jsonl").read_text().splitlines())}
    counts: Counter = Counter()
    for q in questions:
        if q["task"] not in ATTRIBUTE or q["question_id"] not in answers:
            continue
        objects = scenes[Path(q["image"]).name]["objects"]
        scene = "one object" if len(objects) == 1 else "several objects"
        counts[(q["task"], scene, outcome(answers[q["question_id"]], q["answer"], objects, ATTRIBUTE[q["task"]]))] += 1
    print("| question | scene | right | another object's | none in the scene |\n| --- | --- | ---: | ---: | ---: |")
    for task in ATTRIBUTE:
        for scene in ("one object", "several objects"):
            row = [counts[(task, scene, k)] for k in ("right", "another object's", "none in the scene")]
            print(f"| {task} | {scene} | " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
