"""CPU int8 (`--int8`: dynamic quantization of the LM's linears) vs fp32: speed and answer agreement.

Speed: decode tokens/s at batch 1 and prefill time of an image prompt (576 image tokens),
interleaved, medians. Agreement: greedy answers (32 tokens) to text and image questions from
both models: exact-match rate, the share of answer tokens before the first divergence, and the
teacher-forced top-1 agreement (int8's next-token argmax along fp32's answer, token by token).
Run: python -m bench.int8 [--quick]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import row, table, write_result  # noqa: E402
from bench.decode import our_rate  # noqa: E402

NAME = "int8"
TEXT_QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis in two sentences.",
    "List three uses of a paperclip.", "What is 12 times 7?", "Translate 'good morning' into Spanish.",
    "Who wrote Romeo and Juliet?", "Give me a tip for learning to cook.", "What causes rain?",
    "Name the planets of the solar system.", "Why is the sky blue?", "Describe a cat to someone who has never seen one.",
    "What is a prime number?", "Suggest a name for a bakery.", "How do vaccines work?", "What is machine learning?",
]
IMAGE_QUESTIONS = ["<image>\nWhat is in this picture?", "<image>\nHow many boxes are there?",
                   "<image>\nDescribe the colours.", "<image>\nWhere is the largest box?"]


def prefill_seconds(pipe, prompt) -> float:
    from llavakit.infer.params import SamplingParams

    t0 = time.perf_counter()
    next(iter(pipe.engine.run([pipe.row(prompt, SamplingParams(1))])))
    return time.perf_counter() - t0


def agreement(fp32, int8, quick: bool) -> dict:
    from llavakit.infer.benchmodel import bench_image
    from llavakit.infer.params import SamplingParams

    texts = TEXT_QUESTIONS[:6] if quick else TEXT_QUESTIONS
    images = IMAGE_QUESTIONS[:2] if quick else IMAGE_QUESTIONS
    items = [([], q) for q in texts] + [([bench_image(i)], q) for i, q in enumerate(images)]
    params = SamplingParams(32)
    a = [fp32.complete([it], params)[0] for it in items]  # batch 1: no batch-mate shares int8's activation scales
    b = [int8.complete([it], params)[0] for it in items]
    exact = sum(x.token_ids == y.token_ids for x, y in zip(a, b)) / len(items)
    shares = [_common_prefix(x.token_ids, y.token_ids) / max(len(x.token_ids), 1) for x, y in zip(a, b)]
    forced = [teacher_forced(int8, int8.prompt(*it), x.token_ids) for it, x in zip(items, a)]
    return {"items": len(items), "exact": exact, "prefix_share": statistics.mean(shares),
            "teacher_forced_top1": statistics.mean(forced),
            "examples": [{"q": q, "fp32": x.text, "int8": y.text} for (_, q), x, y in list(zip(items, a, b))[:3]]}


def teacher_forced(pipe, prompt, answer: tuple[int, ...]) -> float:
    """Share of `answer`'s tokens that `pipe`'s model predicts (argmax) given the prompt and the answer so far."""
    import torch

    ids = torch.tensor([list(prompt.ids) + list(answer)])  # [1, T+n]
    with torch.inference_mode():
        logits = pipe.lm.model(input_ids=ids, pixel_values=pipe.pixel_values(prompt.images)).logits[0]  # [T+n, V]
    predicted = logits[len(prompt.ids) - 1:-1].argmax(-1)  # [n] prediction for each answer token
    return float((predicted == torch.tensor(answer)).float().mean())


def _common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def run(quick: bool = False) -> dict:
    from llavakit.infer.api import Pipeline
    from llavakit.infer.benchmodel import cpu_pressure, bench_image, bench_model_dir
    from llavakit.model.io import load_model

    n, reps = (24, 2) if quick else (64, 4)
    path = bench_model_dir()
    fp32, int8 = Pipeline(load_model(path)), Pipeline(load_model(path), int8=True)
    prompt = fp32.prompt([bench_image(0)], "<image>\nDescribe the image in detail.")
    for p in (fp32, int8):
        our_rate(p, [prompt], 4)  # warm up
    rates = {"fp32": [], "int8": []}
    prefill = {"fp32": [], "int8": []}
    for _ in range(reps):
        for name, p in (("fp32", fp32), ("int8", int8)):
            rates[name].append(our_rate(p, [prompt], n))
            prefill[name].append(prefill_seconds(p, prompt))
    rate = {k: statistics.median(v) for k, v in rates.items()}
    pre = {k: statistics.median(v) * 1000 for k, v in prefill.items()}
    agree = agreement(fp32, int8, quick)
    rows = [
        row("decode tok/s, batch 1, int8", rate["int8"], "tok/s", rate["fp32"], "(vs fp32)"),
        row(f"prefill ms, {len(prompt.ids)}-token image prompt, int8", pre["int8"], "ms", pre["fp32"], "(vs fp32)",
            higher_is_better=False),
        row("greedy answers identical to fp32", agree["exact"] * 100, "%", None, "(agreement)"),
        row("answer tokens before first divergence", agree["prefix_share"] * 100, "%", None, "(agreement)"),
        row("teacher-forced next-token agreement", agree["teacher_forced_top1"] * 100, "%", None, "(agreement)"),
    ]
    return {"name": NAME, "rows": rows, "cpu_pressure_after": cpu_pressure(),
            "new_tokens": n, "reps": reps, "agreement": agree,
            "decode_tok_s": rate, "prefill_ms": pre}


def main() -> None:
    result = run("--quick" in sys.argv)
    print(table([result]))
    for ex in result["agreement"]["examples"]:
        print(f"- {ex['q']!r}\n  fp32: {ex['fp32']!r}\n  int8: {ex['int8']!r}")
    print(f"wrote {write_result(result)}")


if __name__ == "__main__":
    main()
