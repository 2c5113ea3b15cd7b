"""The plainest test of whether a LLaVA model learns to read its image: every record asks the same
two questions of a single-object scene ("What color is the shape?", "What shape is it?"), so the
question text carries nothing and any answer better than the prior must come from the image.

    llavakit world --out W/train --num-images 1000 --seed 10 --min-objects 1 --max-objects 1 ...
    python experiments/fixed_questions.py W/train W/train-fixed.json

Scenes without exactly one object are left out and counted (a chart-only scene, say). The records
carry `provenance.qtypes`, so experiments/image_use.py scores them per question.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def records(world: Path) -> tuple[list[dict], int]:
    out, skipped = [], 0
    for line in (world / "scenes.jsonl").read_text().splitlines():
        scene = json.loads(line)
        if len(scene["objects"]) != 1:
            skipped += 1
            continue
        obj = scene["objects"][0]
        out.append({
            "id": f"{scene['split']}-{scene['image_id']}",
            "image": Path(scene["file_name"]).name,
            "conversations": [
                {"from": "human", "value": "<image>\nWhat color is the shape? Answer with one word."},
                {"from": "gpt", "value": obj["color"]},
                {"from": "human", "value": "What shape is it? Answer with one word."},
                {"from": "gpt", "value": obj["category"]},
            ],
            "provenance": {"source": "experiments/fixed_questions.py", "qtypes": ["color", "shape"]},
        })
    return out, skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("world", type=Path, help="a `llavakit world` split dir (scenes.jsonl, images/)")
    ap.add_argument("out", type=Path, help="LLaVA JSON to write (image paths relative to WORLD/images)")
    args = ap.parse_args()
    recs, skipped = records(args.world)
    args.out.write_text(json.dumps(recs))
    print(f"{len(recs)} records -> {args.out} ({skipped} scenes without exactly one object left out)")


if __name__ == "__main__":
    main()
