"""Does the image move a model's yes/no decision? P("yes") vs P("no") of the first answer token on POPE questions.

Loads the model with transformers' own `LlavaForConditionalGeneration` + `AutoProcessor` (the HF layout llavakit
writes), asks each question of one POPE split of an offline benchmark file, and prints, per true answer, the mean
log-odds log P(yes) - log P(no), the mean probabilities and the argmax counts. A model that reads existence from
its images has clearly different log-odds for "yes" and "no" truths.

    python experiments/yes_no_margin.py --model ~/.cache/llavakit/models/default-<id> \
        --bench runs/default/eval/offline.json --images runs/default/world/test [--split pope_random] [--n 120]

Written by hand (not the evaluation runner) because it needs the two tokens' probabilities, not the answers.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics as st
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration


def margins(model_dir: str, bench: str, images: Path, split: str, n: int) -> list[tuple[str, float, float, str]]:
    """(truth, log P(yes), log P(no), argmax token) per question."""
    proc = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    yes, no = (proc.tokenizer.encode(w, add_special_tokens=False)[0] for w in ("yes", "no"))
    questions = [q for q in json.loads(Path(bench).read_text())["questions"] if q["task"] == split][:n]
    if not questions:
        raise SystemExit(f"{bench}: no questions of task {split!r}")
    rows = []
    for q in questions:
        text = "<image>\n" + q["prompt"].replace("<image>\n", "").replace("<image>", "")
        prompt = proc.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        inputs = proc(images=Image.open(images / q["image"]).convert("RGB"), text=prompt, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]  # [V]
        logp = torch.log_softmax(logits, -1)
        top = int(logits.argmax())
        rows.append((q["answer"], float(logp[yes]), float(logp[no]), "yes" if top == yes else "no" if top == no else "other"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--bench", required=True)
    ap.add_argument("--images", required=True, type=Path, help="the benchmark's world dir (holds images/)")
    ap.add_argument("--split", default="pope_random")
    ap.add_argument("--n", type=int, default=120)
    args = ap.parse_args()
    rows = margins(args.model, args.bench, args.images, args.split, args.n)
    for truth in ("yes", "no"):
        r = [x for x in rows if x[0] == truth]
        if not r:
            continue
        d = [y - n for _, y, n, _ in r]
        print(f"truth {truth}: {len(r)} questions, log-odds yes-no {st.mean(d):.3f} ± {st.pstdev(d):.3f} "
              f"(min {min(d):.3f}, max {max(d):.3f}), P(yes) {st.mean(math.exp(y) for _, y, _, _ in r):.3f}, "
              f"P(no) {st.mean(math.exp(n) for _, _, n, _ in r):.3f}, argmax "
              + ", ".join(f"{k} {sum(a == k for *_, a in r)}" for k in ("yes", "no", "other")))


if __name__ == "__main__":
    main()
