"""Time to first token at turn 5 of an image chat: KV cache kept across turns vs recomputing the
whole conversation every turn (what LLaVA's CLI does).

Each conversation: one image (576 image tokens) at turn 1, five questions, fixed-length greedy
answers (EOS blocked) so both variants build the same history. TTFT is the time from sending a
message to the first streamed text piece. Variants alternate; medians over `reps` conversations.
Run: python -m bench.chat_ttft [--quick]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import row, table, write_result  # noqa: E402

NAME = "chat_ttft"
QUESTIONS = ["What is in this image?", "What colours are the boxes?", "Which box is the largest?",
             "Where is the smallest box?", "Summarize what we discussed in one sentence."]


def conversation(pipe, reuse: bool, params) -> tuple[list[float], object]:
    """TTFT of every turn, and the session (for its last-turn stats)."""
    from llavakit.infer.benchmodel import bench_image

    session = pipe.session(reuse_kv=reuse)
    session.add_image(bench_image(0))
    ttfts = []
    for q in QUESTIONS:
        t0 = time.perf_counter()
        pieces = session.send(q, params)
        next(pieces)
        ttfts.append(time.perf_counter() - t0)
        for _ in pieces:
            pass
    return ttfts, session


def run(quick: bool = False) -> dict:
    from llavakit.infer.api import Pipeline
    from llavakit.infer.benchmodel import cpu_pressure, bench_model_dir
    from llavakit.infer.params import SamplingParams
    from llavakit.model.io import load_model

    answer_tokens, reps = (16, 1) if quick else (40, 3)
    pipe = Pipeline(load_model(bench_model_dir()))
    params = SamplingParams(answer_tokens, min_new_tokens=answer_tokens)
    pipe.generate([([], "Hello")], max_new_tokens=2)  # warm up
    runs = {True: [], False: []}
    for _ in range(reps):
        for reuse in (True, False):
            ttfts, session = conversation(pipe, reuse, params)
            runs[reuse].append((ttfts, session.stats))
    turn5 = {k: statistics.median(t[-1] for t, _ in v) for k, v in runs.items()}
    per_turn = {("reuse" if k else "recompute"): [statistics.median(t[i] for t, _ in v) for i in range(len(QUESTIONS))]
                for k, v in runs.items()}
    stats = runs[True][-1][1]
    rows = [row("time to first token, turn 5, KV reuse", turn5[True] * 1000, "ms", turn5[False] * 1000,
                ">= 3x faster than recomputing", higher_is_better=False)]
    return {"name": NAME, "rows": rows, "cpu_pressure_after": cpu_pressure(),
            "per_turn_ms": {k: [round(x * 1000, 1) for x in v] for k, v in per_turn.items()},
            "turn5_prompt_tokens": stats.prompt_tokens, "turn5_reused_tokens": stats.reused_tokens,
            "turn5_prefilled_tokens": stats.prefilled_tokens, "answer_tokens": answer_tokens, "reps": reps,
            "image_tokens": pipe.lm.image_seq_length}


def main() -> None:
    result = run("--quick" in sys.argv)
    print(table([result]))
    print(f"per-turn TTFT (ms): {result['per_turn_ms']}")
    print(f"wrote {write_result(result)}")


if __name__ == "__main__":
    main()
