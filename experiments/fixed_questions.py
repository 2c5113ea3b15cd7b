"""The plainest test of whether a LLaVA model learns to read its image: every record asks the same
two questions of a single-object scene ("What color is the shape?", "What shape is it?"), so the
question text carries nothing and any answer better than the prior must come from the image
(the records of llavakit/datagen/grounding.py, which the recipe's `ground` step trains on).

    llavakit world --out W/train --num-images 1000 --seed 10 --min-objects 1 --max-objects 1 ...
    python experiments/fixed_questions.py W/train W/train-fixed.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llavakit.datagen.grounding import grounding_records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("world", type=Path, help="a `llavakit world` split dir (scenes.jsonl, images/)")
    ap.add_argument("out", type=Path, help="LLaVA JSON to write (image paths relative to WORLD/images)")
    ap.add_argument("--attributes", nargs="+", default=["color", "shape"],
                    help="grounding attributes (llavakit/datagen/grounding.py ATTRIBUTES; default: color shape)")
    args = ap.parse_args()
    recs, skipped = grounding_records(args.world, tuple(args.attributes))
    args.out.write_text(json.dumps(recs))
    print(f"{len(recs)} records -> {args.out} ({skipped} scenes without a question left out)")


if __name__ == "__main__":
    main()
