"""Do a feature cache's image tokens sit where their objects are? For every single-object scene of a world split,
the patch token furthest (L2) from the scene's median token should lie in (or next to) the object's box.

    python experiments/feature_positions.py runs/exp-g2/features runs/exp-g2/world

Prints how many single-object scenes pass. Written by hand: a one-off sanity check of the cache's token order
(row-major patch grid, CLS dropped) against the world's boxes; it assumes square images as the default world has.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("features", type=Path, help="a feature cache dir (meta.json, features.bin)")
    ap.add_argument("world", type=Path, help="the `llavakit world` split its images came from (scenes.jsonl)")
    args = ap.parse_args()
    meta = json.loads((args.features / "meta.json").read_text())
    tokens, dim = meta["shape"]
    side = math.isqrt(tokens)
    feats = np.memmap(args.features / "features.bin", dtype=meta["dtype"], mode="r").reshape(len(meta["images"]), tokens, dim)
    scenes = {Path(s["file_name"]).name: s for s in map(json.loads, (args.world / "scenes.jsonl").read_text().splitlines())}
    inside = total = 0
    for i, name in enumerate(meta["images"]):
        scene = scenes[name]
        if len(scene["objects"]) != 1:
            continue
        row, col = divmod(int(np.argmax(np.linalg.norm(feats[i] - np.median(feats[i], 0), axis=1))), side)  # [T] -> cell
        x, y, w, h = scene["objects"][0]["bbox"]
        cw, ch = scene["width"] / side, scene["height"] / side
        cx, cy = (col + 0.5) * cw, (row + 0.5) * ch
        inside += x - cw / 2 <= cx <= x + w + cw / 2 and y - ch / 2 <= cy <= y + h + ch / 2
        total += 1
    print(f"{inside} of {total} single-object scenes: the most distinct patch token lies in (or next to) the object's box")


if __name__ == "__main__":
    main()
