"""E17: does the LM carry the named object's cell to the token where it must answer "where"?

    python experiments/lm_position_probe.py runs/v12/instruct/model runs/e16/position.json \
        runs/v12/world/train/images runs/e16/position-bench.json

For each position question (the first `--train` of the training records, shuffled with seed 0, and every position
question of an offline benchmark file whose `world` is an absolute path), run the model on the prompt (image and
question, no answer) and keep every layer's hidden state at the last prompt token: where the answer's first token
is predicted. Fit a linear probe per layer (multinomial logistic regression, L2 picked on a 150-record split of the
training records, then refit on all of them) and print its held-out accuracy on the benchmark's questions next to
the majority answer. Written by hand with torch (no scikit-learn here): a one-off diagnostic, as E15 is for the tower.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

import torch


def last_token_states(pipe, image: Path, text: str) -> torch.Tensor:
    """Every layer's hidden state at the last prompt token: [L+1, D]."""
    prompt = pipe.prompt(pipe.load_images([image]), text)
    with torch.no_grad():
        out = pipe.lm.model(input_ids=torch.tensor([prompt.ids]), pixel_values=pipe.pixel_values(prompt.images),
                            output_hidden_states=True)
    return torch.stack([h[0, -1] for h in out.hidden_states])  # [L+1, D]


def fit_predict(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, n_classes: int, l2: float) -> torch.Tensor:
    """Standardised multinomial logistic regression (LBFGS); the predicted classes of x_test."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, x_test = (x - mu) / sd, (x_test - mu) / sd  # [N, D], [M, D]
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)  # [D, C]
    b = torch.zeros(n_classes, requires_grad=True)  # [C]
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (x_test @ w + b).argmax(1).detach()  # [M]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("records", help="single-turn position records (LLaVA JSON)")
    ap.add_argument("images", help="their image folder")
    ap.add_argument("bench", help="offline benchmark file (its position questions are the test set)")
    ap.add_argument("--train", type=int, default=900)
    args = ap.parse_args()
    from llavakit.infer.api import load_pipeline

    pipe = load_pipeline(args.model, fast=False)
    records = json.loads(Path(args.records).read_text())
    random.Random(0).shuffle(records)
    records = records[: args.train]
    bench = json.loads(Path(args.bench).read_text())
    questions = [q for q in bench["questions"] if q["task"] == "position"]
    x = torch.stack([last_token_states(pipe, Path(args.images) / r["image"], r["conversations"][0]["value"])
                     for r in records])  # [N, L+1, D]
    xt = torch.stack([last_token_states(pipe, Path(bench["world"]) / q["image"], q["prompt"]) for q in questions])
    y_txt, yt_txt = [r["conversations"][1]["value"] for r in records], [q["answer"] for q in questions]
    classes = sorted(set(y_txt) | set(yt_txt))
    y, yt = (torch.tensor([classes.index(a) for a in t]) for t in (y_txt, yt_txt))
    majority = Counter(y_txt).most_common(1)[0][0]
    print(f"{len(y)} train, {len(yt)} test; majority {majority!r} on test: {sum(a == majority for a in yt_txt) / len(yt):.3f}")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    val, fit = perm[:150], perm[150:]
    for layer in range(0, x.shape[1], 3):
        scores = [((fit_predict(x[fit, layer], y[fit], x[val, layer], len(classes), l2) == y[val]).float().mean().item(), l2)
                  for l2 in (1e-3, 1e-2, 1e-1)]
        val_acc, l2 = max(scores)
        test = (fit_predict(x[:, layer], y, xt[:, layer], len(classes), l2) == yt).float().mean().item()
        print(f"layer {layer:2d}: val {val_acc:.3f} (l2 {l2}) test {test:.3f}", flush=True)


if __name__ == "__main__":
    main()
