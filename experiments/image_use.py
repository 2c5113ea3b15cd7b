"""Does a trained model use its image? Per question type, on held-out short-answer records.

For every answer of every record (one multi-turn record per image, one answer per question type,
as `llavakit datagen vqa --types ...` writes them) this scores the answer tokens teacher-forced,
twice: with the record's own image and with the next record's image (same tokens, so the same
targets). Per question type it prints the mean answer NLL both ways, their difference (the
image gain restricted to answer tokens, not diluted by template tokens), and the teacher-forced
exact match (every answer token the argmax) both ways. A model that ignores its images has gain
~0 and the same accuracy both ways.

    python experiments/image_use.py --model runs/default/instruct/model \
        --records runs/probe/val-core.json --images runs/default/world/val [--json out.json]

Written by hand (not the trainer's eval) because it needs per-answer scores keyed by question type.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch


def answer_spans(labels: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs of trained labels: one per assistant turn, in order."""
    spans, start = [], None
    for i, lab in enumerate(labels + [-100]):
        if lab != -100 and start is None:
            start = i
        elif lab == -100 and start is not None:
            spans.append((start, i))
            start = None
    return spans


def score(model, ids: torch.Tensor, pixels: torch.Tensor, spans: list[tuple[int, int]]) -> list[tuple[float, bool]]:
    """(summed NLL, all-argmax-correct) of each span, teacher-forced."""
    with torch.no_grad():
        logits = model(input_ids=ids[None], pixel_values=pixels[None]).logits[0]  # [T, V]
    logp = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
    out = []
    for a, b in spans:
        targets = ids[a:b]  # [n]
        pred = logp[a - 1:b - 1]  # position t-1 predicts token t
        nll = -pred.gather(1, targets[:, None]).sum().item()
        out.append((nll, bool((pred.argmax(-1) == targets).all())))
    return out


def main() -> None:
    from llavakit.data.images import load_image
    from llavakit.data.render import RenderOptions, render_record
    from llavakit.model.io import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--records", required=True, help="LLaVA JSON of short-answer records with provenance.qtypes")
    ap.add_argument("--images", required=True, help="folder the records' image paths are relative to")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the table here")
    args = ap.parse_args()

    loaded = load_model(args.model)
    opts = RenderOptions(image_seq_length=loaded.image_seq_length)
    records = json.loads(Path(args.records).read_text())[: args.limit]
    pixels = [loaded.image_processor([load_image(Path(args.images) / r["image"])], return_tensors="pt")["pixel_values"][0]
              for r in records]  # each [3, H, W]
    stats = defaultdict(lambda: defaultdict(float))
    for i, record in enumerate(records):
        sample = render_record(record, loaded.tokenizer, loaded.template, opts)
        ids = torch.tensor(sample.input_ids)  # [T]
        spans = answer_spans(sample.labels)
        qtypes = record.get("provenance", {}).get("qtypes")
        if not qtypes:
            raise ValueError(f"{record.get('id', i)}: no provenance.qtypes (write the records with `llavakit datagen vqa`)")
        if len(spans) != len(qtypes):
            raise ValueError(f"{record['id']}: {len(spans)} answers but {len(qtypes)} question types")
        own = score(loaded.model, ids, pixels[i], spans)
        other = score(loaded.model, ids, pixels[(i + 1) % len(records)], spans)
        for q, (nll, ok), (nll_o, ok_o), (a, b) in zip(qtypes, own, other, spans):
            s = stats[q]
            s["n"] += 1
            s["tokens"] += b - a
            s["nll"] += nll
            s["nll_other"] += nll_o
            s["acc"] += ok
            s["acc_other"] += ok_o
    table = {}
    print(f"{'type':10s} {'n':>4s} {'NLL own':>8s} {'NLL other':>9s} {'gain/tok':>8s} {'acc own':>8s} {'acc other':>9s}")
    for q, s in sorted(stats.items()):
        row = {"n": int(s["n"]), "nll": s["nll"] / s["n"], "nll_other": s["nll_other"] / s["n"],
               "gain_per_token": (s["nll_other"] - s["nll"]) / s["tokens"], "acc": s["acc"] / s["n"],
               "acc_other": s["acc_other"] / s["n"]}
        table[q] = row
        print(f"{q:10s} {row['n']:4d} {row['nll']:8.3f} {row['nll_other']:9.3f} {row['gain_per_token']:+8.3f} "
              f"{row['acc']:8.3f} {row['acc_other']:9.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "records": args.records, "per_type": table}, indent=1))


if __name__ == "__main__":
    main()
