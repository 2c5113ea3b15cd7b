"""Does an object's own image token say *where* it is, or only its index in the sequence does?

    python experiments/position_in_content.py runs/default/ground/features runs/default/ground/world
    python experiments/position_in_content.py --tower runs/clip-world/encoder - runs/default/ground/world

The second form runs the tower itself on the world's single-object images and probes the object's token at every
hidden layer (position, colour and shape from its content), where the first reads a feature cache (one layer).

For every single-object scene, take the patch token under the object's centre (row-major grid, CLS dropped) and fit
linear probes (multinomial logistic regression, 80/20 split by scene) that read from it:
- the object's 3x3 position (the benchmark's nine cells) from the token's *content*;
- the same from the token's *index* alone (one-hot): what the sequence order gives an LM that can count positions;
- the object's colour from the token's content (a sanity check: the tokens are known to carry colour);
- the position from the mean of all tokens (content without picking the object's token).
Prints held-out accuracy next to the majority class. Written by hand with torch (no scikit-learn here): a one-off
diagnostic for where position information lives in the tower's output.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch


def probe(x: np.ndarray, y: np.ndarray, train: np.ndarray, steps: int = 300, l2: float = 1e-3) -> float:
    """Held-out accuracy of a linear softmax probe on standardised features."""
    xt = torch.tensor(x, dtype=torch.float32)  # [N, D]
    mean, std = xt[train].mean(0), xt[train].std(0) + 1e-6
    xt = (xt - mean) / std
    classes = {c: i for i, c in enumerate(sorted(set(y.tolist())))}
    yt = torch.tensor([classes[c] for c in y])  # [N]
    lin = torch.nn.Linear(xt.shape[1], len(classes))
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xt[train]), yt[train]) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    test = ~train
    with torch.no_grad():
        return float((lin(xt[test]).argmax(1) == yt[test]).float().mean())


def majority(y: np.ndarray, train: np.ndarray) -> float:
    values, counts = np.unique(y[train], return_counts=True)
    return float((y[~train] == values[counts.argmax()]).mean())


def tower_layers(tower_dir: Path, world: Path, scenes: list[dict]) -> np.ndarray:
    """Every hidden layer's patch tokens (CLS dropped) of the scenes' images: [L+1, N, T, D]."""
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(tower_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(tower_dir)
    out = []
    with torch.no_grad():
        for i in range(0, len(scenes), 50):
            images = [Image.open(world / s["file_name"]).convert("RGB") for s in scenes[i:i + 50]]
            hidden = tower(**processor(images, return_tensors="pt"), output_hidden_states=True).hidden_states
            out.append(torch.stack(hidden)[:, :, 1:].numpy())  # [L+1, B, T, D]
    return np.concatenate(out, 1)


def centre_token(scene: dict, side: int) -> int:
    """Row-major index of the patch under the (single) object's centre."""
    x, y, w, h = scene["objects"][0]["bbox"]
    col = min(side - 1, int((x + w / 2) / scene["width"] * side))
    row = min(side - 1, int((y + h / 2) / scene["height"] * side))
    return row * side + col


def layer_table(tower_dir: Path, world: Path, seed: int) -> None:
    scenes = [s for s in map(json.loads, (world / "scenes.jsonl").read_text().splitlines()) if len(s["objects"]) == 1]
    hidden = tower_layers(tower_dir, world, scenes)  # [L+1, N, T, D]
    n, side = len(scenes), math.isqrt(hidden.shape[2])
    tok = np.array([centre_token(s, side) for s in scenes])
    ys = {k: np.array([s["objects"][0][k] for s in scenes]) for k in ("position", "color", "category")}
    train = np.random.default_rng(seed).random(n) < 0.8
    print(f"{n} single-object scenes; majority class: " + ", ".join(f"{k} {majority(y, train):.3f}" for k, y in ys.items()))
    print("| hidden layer | position from the object's token | colour | shape |\n| --- | ---: | ---: | ---: |")
    for layer in range(hidden.shape[0]):
        x = hidden[layer, np.arange(n), tok]  # [N, D]
        print(f"| {layer} | " + " | ".join(f"{probe(x, y, train):.3f}" for y in ys.values()) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("features", type=Path, help="a feature cache dir (meta.json, features.bin)")
    ap.add_argument("world", type=Path, help="the `llavakit world` split its images came from (scenes.jsonl)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tower", type=Path, help="a CLIP dir: probe every hidden layer of it instead of a feature cache")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.tower:
        return layer_table(args.tower, args.world, args.seed)
    meta = json.loads((args.features / "meta.json").read_text())
    tokens, dim = meta["shape"]
    side = math.isqrt(tokens)
    feats = np.memmap(args.features / "features.bin", dtype=meta["dtype"], mode="r").reshape(len(meta["images"]), tokens, dim)
    scenes = {Path(s["file_name"]).name: s for s in map(json.loads, (args.world / "scenes.jsonl").read_text().splitlines())}
    own, index, mean, cells, colors = [], [], [], [], []
    for i, name in enumerate(meta["images"]):
        scene = scenes.get(name)
        if scene is None or len(scene["objects"]) != 1:
            continue
        o = scene["objects"][0]
        t = centre_token(scene, side)
        own.append(np.asarray(feats[i, t]))
        index.append(np.eye(tokens, dtype=np.float32)[t])
        mean.append(np.asarray(feats[i]).mean(0))
        cells.append(o["position"])
        colors.append(o["color"])
    y_cell, y_color = np.array(cells), np.array(colors)
    rng = np.random.default_rng(args.seed)
    train = rng.random(len(cells)) < 0.8
    rows = [("position from the object's token content", probe(np.stack(own), y_cell, train), majority(y_cell, train)),
            ("position from the object's token index (one-hot)", probe(np.stack(index), y_cell, train), majority(y_cell, train)),
            ("position from the mean of all tokens", probe(np.stack(mean), y_cell, train), majority(y_cell, train)),
            ("colour from the object's token content", probe(np.stack(own), y_color, train), majority(y_color, train))]
    print(f"{len(cells)} single-object scenes ({int(train.sum())} fit, {int((~train).sum())} held out), {tokens} tokens of {dim}")
    print("| probe | held-out accuracy | majority class |\n| --- | ---: | ---: |")
    for name, acc, base in rows:
        print(f"| {name} | {acc:.3f} | {base:.3f} |")


if __name__ == "__main__":
    main()
