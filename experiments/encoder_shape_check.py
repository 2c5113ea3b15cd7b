"""Can the stage-0 vision tower learn *shape* at all at this scale, when told the answer directly?

A diagnostic for docs/encoder.md (issue #3: the CLIP-trained tower carries colour and count but not
shape). It takes the CLIP loss out of the question: single-object scenes of the generated world, the
shape name as a class label (14 classes), cross-entropy, the same pixels the encoder sees (112 px,
LLaVA `pad`, CLIP normalisation). Learners on the same data, steps and batches:

- `vit`: a transformers `CLIPVisionModel` shaped like configs/clip-world.yaml (patch 14 unless
  --patch), a linear head on the max (or mean) over layer -2 patch tokens (what LLaVA reads);
- `cnn`: four 3x3 conv + BatchNorm + ReLU blocks with max pooling, a linear head (a reference for
  how learnable the task is; it cannot be a LLaVA tower in the HF CLIP layout);
- `vitd`: `vit` plus a dense auxiliary loss: every patch token names the shape whose box covers the
  patch centre, or background.

Variants: `--init mimetic` (attention init of Trockman & Kolter 2023), `--init pca` (whitened principal
components of the training patches as the patch embedding; built into llavakit as
`ClipTrainConfig.patch_init`), `--init luma` (colour-blind outline filters on --luma-dims outputs; also
`ClipTrainConfig.patch_init`), world overrides (`--categories`, `--colors`, `--background-colors`,
`--backgrounds`) to see which part of the world makes shape slow to learn, and `--aux` (a second
training world, e.g. high-contrast colours; the test set stays the main world's).

    python experiments/encoder_shape_check.py --steps 400 [--learners vit,vitd,cnn] [--patch 14] [--lr 3e-4]

Prints held-out accuracy every --eval-every steps and writes experiments/results/encoder_shape_check.json.
Hand-written loop on purpose: a few lines of plain torch, not part of llavakit.
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


def data(root: Path, train: int, test: int, world: dict, grid: int, aux: dict | None = None, size: int = 112):
    """(pixels, labels, patch labels) for a train and a test split of single-object scenes.

    label = shape index; patch labels [N, grid*grid] = the shape index where the patch centre lies in the
    object's box (mapped through LLaVA's pad-and-resize), else len(classes) for background.
    """
    splits = {}
    extra = {k: v for k, v in world.items() if v}  # world overrides: categories, colors, backgrounds, sizes, ...
    tag = "_".join("-".join(v) if isinstance(v, tuple) else str(v) for v in extra.values()) or "all"
    for split, n in (("train", train), ("test", test)):
        out = root / f"single_{split}_{n}_{tag}"
        if not (out / "world.json").exists():
            generate_world(WorldConfig(out=out, num_images=n, seed=5, split=split, **{**WORLD, **extra}))
        px, scenes = load_world_images(out, size)  # [N, 3, size, size] uint8
        if split == "train" and aux:  # as many more training images from a second world (e.g. high contrast)
            aux_out = root / f"single_train_{n}_aux_{'_'.join('-'.join(v) for v in aux.values())}"
            if not (aux_out / "world.json").exists():
                generate_world(WorldConfig(out=aux_out, num_images=n, seed=6, split=split, **{**WORLD, **extra, **aux}))
            aux_px, aux_scenes = load_world_images(aux_out, size)
            px, scenes = torch.cat([px, aux_px]), scenes + aux_scenes
        splits[split] = (px, scenes)
    classes = sorted({s["objects"][0]["category"] for _, sc in splits.values() for s in sc})
    out = {}
    for k, (px, scenes) in splits.items():
        y = torch.tensor([classes.index(s["objects"][0]["category"]) for s in scenes])  # [N]
        out[k] = (px, y, torch.stack([patch_labels(s, y_i, len(classes), grid) for s, y_i in zip(scenes, y.tolist())]))
    return out, classes


def patch_labels(scene: dict, label: int, background: int, grid: int) -> torch.Tensor:
    """[grid*grid] int64: `label` where a patch centre falls inside the object's box, else `background`."""
    w, h = scene["width"], scene["height"]
    side = max(w, h)
    x, y, bw, bh = scene["objects"][0]["bbox"]
    x, y = x + (side - w) // 2, y + (side - h) // 2  # box in the padded square
    centres = (torch.arange(grid) + 0.5) * side / grid  # [G] patch centres in square pixels
    inside_x = (centres >= x) & (centres <= x + bw)  # [G]
    inside_y = (centres >= y) & (centres <= y + bh)  # [G]
    inside = inside_y[:, None] & inside_x[None, :]  # [G, G], row-major like the patch tokens
    return torch.where(inside, label, background).flatten()  # [G*G]


class VitHead(nn.Module):
    def __init__(self, classes: int, patch: int, pool: str, init: str = "default", size: int = 112):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = CLIPVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=3,
                               image_size=size, patch_size=patch)
        cfg._attn_implementation = "sdpa"
        self.tower, self.pool, self.head = CLIPVisionModel(cfg), pool, nn.Linear(192, classes)
        self.dense = nn.Linear(192, classes + 1)  # per-patch shape-or-background head (learner vitd)
        self.patches = None
        if "mimetic" in init:
            mimetic_init(self.tower)

    def forward(self, x):
        h = self.tower(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]  # [B, P, D], CLS dropped
        self.patches = h
        return self.head(h.amax(1) if self.pool == "max" else h.mean(1))  # [B, K]


@torch.no_grad()
def mimetic_init(tower, a1: float = 0.7, b1: float = 0.7, a2: float = 0.4, b2: float = 0.4) -> None:
    """Trockman & Kolter (2023): W_q W_k^T ~ a1 Z + b1 I and W_v W_o ~ a2 Z - b2 I per layer (same shapes,
    so the HF CLIP layout is unchanged)."""
    for layer in tower.encoder.layers:
        att = layer.self_attn
        d = att.q_proj.weight.shape[0]
        for (m1, m2), (a, b) in (((att.q_proj, att.k_proj), (a1, b1)), ((att.v_proj, att.out_proj), (a2, -b2))):
            target = a * torch.randn(d, d) / d**0.5 + b * torch.eye(d)  # [D, D]
            u, s, vh = torch.linalg.svd(target)
            root = s.sqrt()
            if m2 is att.k_proj:  # q(x)·k(x) = x W_q^T W_k x^T, so W_q^T W_k = target
                m1.weight.copy_((u * root).T)
                m2.weight.copy_(root[:, None] * vh)
            else:  # out(v(x)) = x W_v^T W_o^T, so W_v^T W_o^T = target
                m1.weight.copy_((u * root).T)
                m2.weight.copy_((root[:, None] * vh).T)


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
    (px, y, py), (tpx, ty, _) = splits["train"], splits["test"]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.98))
    warm = max(1, min(100, args.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1.0))))
    g, t0, log = torch.Generator().manual_seed(0), time.perf_counter(), []
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(y), (args.batch,), generator=g)  # [B]
        loss = nn.functional.cross_entropy(model(normalize(px[idx])), y[idx])
        if name == "vitd":  # dense auxiliary loss: every patch token names the shape covering it (or background)
            dense = model.dense(model.patches)  # [B, P, K+1]
            loss = loss + args.dense_weight * nn.functional.cross_entropy(dense.flatten(0, 1), py[idx].flatten())
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
    p.add_argument("--image-size", type=int, default=112, help="tower input side (the world is resized to it)")
    p.add_argument("--pool", choices=("max", "mean"), default="max")
    p.add_argument("--learners", default="vit,cnn", help="comma list of vit, vitd (vit + dense patch loss), cnn")
    p.add_argument("--init", choices=("default", "mimetic", "pca", "pca+mimetic", "luma"), default="default",
                   help="ViT init: mimetic attention, whitened-PCA patch embedding, both, or luma (zero-DC luminance PCA "
                        "filters shared across RGB on --luma-dims outputs)")
    p.add_argument("--luma-dims", type=int, default=128, help="outputs of the patch embedding given luma filters")
    p.add_argument("--dense-weight", type=float, default=1.0)
    p.add_argument("--categories", default="", help="comma list of shape names (default: all)")
    p.add_argument("--colors", default="", help="comma list of object colours (default: all)")
    p.add_argument("--background-colors", default="", help="comma list of background colours (default: all)")
    p.add_argument("--backgrounds", default="", help="comma list of background kinds (default: plain,gradient,noise)")
    p.add_argument("--aux", default="", help="a second training world of as many images, world overrides as "
                   "'colors=white;background_colors=black;backgrounds=plain' (the test set stays the main world's)")
    p.add_argument("--object-scale", type=float, default=1.0, help="WorldConfig.object_scale (larger objects when > 1)")
    p.add_argument("--side", type=int, default=0, help="square images of this side (default: 128-224 px, any aspect)")
    p.add_argument("--train-images", type=int, default=6000)
    p.add_argument("--test-images", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/llavakit-shape-check", help="where the worlds are generated")
    p.add_argument("--out", default=str(OUT / "encoder_shape_check.json"), help="result JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    world = {k: tuple(v.split(",")) if v else None for k, v in (("categories", args.categories), ("colors", args.colors),
             ("background_colors", args.background_colors), ("backgrounds", args.backgrounds))}
    if args.side:  # square images of this side (objects keep their share of the side)
        world.update(width=args.side, height=args.side)
    if args.object_scale != 1.0:
        world.update(object_scale=args.object_scale)
    aux = {k: tuple(v.split(",")) for k, v in (x.split("=") for x in args.aux.split(";") if x)}
    splits, classes = data(Path(args.work), args.train_images, args.test_images, world, args.image_size // args.patch, aux,
                           args.image_size)
    runs = {}
    for name in args.learners.split(","):
        torch.manual_seed(0)
        model = VitHead(len(classes), args.patch, args.pool, args.init, args.image_size) if name.startswith("vit") else cnn(len(classes))
        if name.startswith("vit") and "pca" in args.init:
            from llavakit.train.clip_init import patch_pca_

            patch_pca_(model.tower.embeddings.patch_embedding, splits["train"][0])
        if name.startswith("vit") and args.init == "luma":
            from llavakit.train.clip_init import patch_luma_

            patch_luma_(model.tower.embeddings.patch_embedding, splits["train"][0], dims=args.luma_dims)
        runs[name] = train(name, model, splits, args)
    result = {"args": vars(args), "classes": classes, "chance": 1 / len(classes), "runs": runs}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
