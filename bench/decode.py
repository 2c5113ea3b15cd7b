"""Decode speed at batch 1 (and 8): llavakit's decode loop vs transformers `generate` on the same
weights, and vs the memory-bandwidth floor (weight bytes per token / measured read bandwidth).

Decode rate is batch size / the median time between consecutive generated tokens (prefill
excluded; the median ignores stalls caused by other processes), over a fixed number of tokens (EOS
blocked). Variants run interleaved, `reps` times each; medians of those.
Run: python -m bench.decode [--quick]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import read_bandwidth_gbs, row, table, write_result  # noqa: E402

NAME = "decode"
QUESTION = "<image>\nDescribe the image in detail."


class _Clock:
    """A logits processor that only timestamps: `generate` calls it once per generated token."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def _step_rate(times: list[float], batch: int) -> float:
    """Tokens/s from per-step timestamps: batch / median step time (robust to stalls by other processes)."""
    return batch / statistics.median(b - a for a, b in zip(times, times[1:]))


def hf_rate(model, inputs: dict, n: int) -> float:
    import torch
    from transformers import LogitsProcessorList

    clock = _Clock()
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       logits_processor=LogitsProcessorList([clock]))
    return _step_rate(clock.times, inputs["input_ids"].shape[0])


def our_rate(pipe, prompts, n: int) -> float:
    from llavakit.infer.params import SamplingParams

    rows = [pipe.row(p, SamplingParams(n, min_new_tokens=n)) for p in prompts]
    return _step_rate([time.perf_counter() for _ in pipe.engine.run(rows)], len(prompts))


def hf_inputs(pipe, prompts) -> dict:
    """Left-padded inputs for `generate`, built from llavakit's prompts (same ids, same pixels)."""
    from llavakit.infer.engine import left_pad

    ids, mask, _ = left_pad([p.ids for p in prompts], pipe.engine.pad_token_id)
    images = [im for p in prompts for im in p.images]
    mask = mask if mask is not None else ids.new_ones(ids.shape)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pipe.pixel_values(images),
            "pad_token_id": pipe.engine.pad_token_id}


def _median_rates(variants: dict, reps: int) -> dict[str, float]:
    samples = {k: [] for k in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            samples[name].append(fn())
    return {k: statistics.median(v) for k, v in samples.items()}


def run(quick: bool = False) -> dict:
    import torch

    from llavakit.infer.api import Pipeline
    from llavakit.infer.benchmodel import cpu_pressure, bench_image, bench_model_dir, lm_weight_bytes
    from llavakit.model.io import load_model

    n, reps = (24, 3) if quick else (64, 5)
    path = bench_model_dir()
    stock = load_model(path).model  # transformers' modules as loaded
    ours = Pipeline(load_model(path))  # oneDNN-prepacked linears
    unpacked = Pipeline(load_model(path), fast=False)
    prompts = [ours.prompt([bench_image(i)], QUESTION) for i in range(8)]
    one, eight = hf_inputs(ours, prompts[:1]), hf_inputs(ours, prompts)
    hf_rate(stock, one, 4), our_rate(ours, prompts[:1], 4)  # warm up
    b1 = _median_rates({
        "generate": lambda: hf_rate(stock, one, n),
        "ours": lambda: our_rate(ours, prompts[:1], n),
        "ours_unpacked": lambda: our_rate(unpacked, prompts[:1], n),
    }, reps)
    b8 = _median_rates({
        "generate": lambda: hf_rate(stock, eight, n // 2),
        "ours": lambda: our_rate(ours, prompts, n // 2),
    }, max(1, reps // 2))
    bandwidth = read_bandwidth_gbs()
    weight_bytes = lm_weight_bytes(stock)
    floor = bandwidth * 1e9 / weight_bytes
    rows = [
        row("decode tok/s, batch 1, llavakit", b1["ours"], "tok/s", b1["generate"], ">= 1.0x transformers generate"),
        row("decode tok/s, batch 1, llavakit vs bandwidth floor", b1["ours"], "tok/s", floor, ">= 0.5x floor"),
        row("decode tok/s, batch 1, llavakit loop, unpacked linears", b1["ours_unpacked"], "tok/s", b1["generate"],
            "(loop alone)"),
    ]
    rows.append(row("decode tok/s, batch 8, llavakit", b8["ours"], "tok/s", b8["generate"], "(vs generate, batch 8)"))
    return {"name": NAME, "rows": rows, "cpu_pressure_after": cpu_pressure(),
            "model": str(path), "new_tokens": n, "reps": reps,
            "read_bandwidth_gbs": bandwidth, "weight_bytes_per_token": weight_bytes, "floor_tok_s": floor,
            "batch1_tok_s": b1, "batch8_tok_s": b8, "prompt_tokens": len(prompts[0].ids), "threads": torch.get_num_threads()}


def main() -> None:
    quick = "--quick" in sys.argv
    result = run(quick)
    print(table([result]))
    print(f"wrote {write_result(result)}")


if __name__ == "__main__":
    main()
