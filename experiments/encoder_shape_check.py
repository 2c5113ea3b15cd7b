"""Can the stage-0 vision tower learn *shape* at all at this scale, when told the answer directly?

A diagnostic for docs/encoder.md (issue #3: the CLIP-trained tower carries colour and count but not
shape). It takes the CLIP loss out of the question: single-object scenes of the generated world, the
shape name as a class label (14 classes), cross-entropy, the same pixels the encoder sees (112 px,
LLaVA `pad`, CLIP normalisation). Two learners on the same data, steps and batches:

- `vit`: a transformers `CLIPVisionModel` shaped like configs/clip-world.yaml (patch 14 unless
  --patch), a linear head on the max (or mean) over layer -2 patch tokens (what LLaVA reads);
- `cnn`: four 3x3 conv + BatchNorm + ReLU blocks with max pooling, a linear head (a reference for
  how learnable the task is; it cannot be a LLaVA tower in the HF CLIP layout).

    python experiments/encoder_shape_check.py --steps 400 [--learners vit,cnn] [--patch 14] [--lr 3e-4]

Prints held-out accuracy every --eval-every steps and writes experiments/results/encoder_shape_check.json.
Hand-written loop on purpose: a few lines of plain torch, nothing here is reused by llavakit.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from llavakit.train.clip_data import load_world_images, normalize
from llavakit.world import WorldConfig, generate_world

OUT = Path(__file__).resolve().parent / "results"
WORLD = dict(backgrounds=("plain", "gradient", "noise"), min_objects=1, max_objects=1, text_prob=0.0, chart_prob=0.0)


def data(root: Path, train: int, test: int):
    """(pixels, labels) for a train and a test split of single-object scenes; label = shape index."""
    splits = {}
    for split, n in (("train", train), ("test", test)):
        out = root / f"single_{split}_{n}"
        if not (out / "world.json").exists():
            generate_world(WorldConfig(out=out, num_images=n, seed=5, split=split, **WORLD))
        px, scenes = load_world_images(out, 112)  # [N, 3, 112, 112] uint8
        splits[split] = (px, [s["objects"][0]["category"] for s in scenes])
    classes = sorted(set(splits["train"][1]) | set(splits["test"][1]))
    return {k: (px, torch.tensor([classes.index(c) for c in names])) for k, (px, names) in splits.items()}, classes


class VitHead(nn.Module):
    def __init__(self, classes: int, patch: int, pool: str):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = CLIPVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=3,
                               image_size=112, patch_size=patch)
        cfg._attn_implementation = "sdpa"
        self.tower, self.pool, self.head = CLIPVisionModel(cfg), pool, nn.Linear(192, classes)

    def forward(self, x):
        h = self.tower(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]  # [B, P, D], CLS dropped
        return self.head(h.amax(1) if self.pool == "max" else h.mean(1))  # [B, K]


def cnn(classes: int) -> nn.Module:
    def block(i, o):
        return [nn.Conv2d(i, o, 3, 1, 1), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(*block(3, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2), *block(64, 128),
                         nn.MaxPool2d(2), *block(128, 128), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(128, classes))


def accuracy(model, px, y, batch: int = 200) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum((model(normalize(px[i:i + batch])).argmax(1) == y[i:i + batch]).sum().item()
                   for i in range(0, len(y), batch))
    model.train()
    return hits / len(y)


def train(name: str, model: nn.Module, splits, args) -> list[dict]:
    (px, y), (tpx, ty) = splits["train"], splits["test"]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.98))
    warm = min(100, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1.0))))
    g, t0, log = torch.Generator().manual_seed(0), time.perf_counter(), []
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(y), (args.batch,), generator=g)  # [B]
        loss = nn.functional.cross_entropy(model(normalize(px[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.eval_every == 0 or step == args.steps:
            row = {"learner": name, "step": step, "loss": round(loss.item(), 3), "test_acc": round(accuracy(model, tpx, ty), 3),
                   "seconds": round(time.perf_counter() - t0, 1)}
            print(json.dumps(row), flush=True)
            log.append(row)
    return log


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--pool", choices=("max", "mean"), default="max")
    p.add_argument("--learners", default="vit,cnn")
    p.add_argument("--train-images", type=int, default=6000)
    p.add_argument("--test-images", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/llavakit-shape-check", help="where the worlds are generated")
    p.add_argument("--out", default=str(OUT / "encoder_shape_check.json"), help="result JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    splits, classes = data(Path(args.work), args.train_images, args.test_images)
    runs = {}
    for name in args.learners.split(","):
        torch.manual_seed(0)
        model = VitHead(len(classes), args.patch, args.pool) if name == "vit" else cnn(len(classes))
        runs[name] = train(name, model, splits, args)
    result = {"args": vars(args), "classes": classes, "chance": 1 / len(classes), "runs": runs}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
