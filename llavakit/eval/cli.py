"""`llavakit eval`: run a benchmark on a model, re-score answers, build the offline benchmark.

    llavakit eval --model M --benchmark NAME --data PATH --out DIR [--batch-size 8]
    llavakit eval score --benchmark NAME --data PATH --out DIR [--answers FILE]
    llavakit eval --model M --benchmark vqav2 --data TESTDEV --out DIR --submission [--all-questions FILE]
    llavakit eval vqav2-submission --data TESTDEV --out DIR [--answers FILE] [--all-questions FILE]
    llavakit eval build-offline --world DIR --out FILE [--seed 0]
"""

from __future__ import annotations

import argparse
import sys

# Kept literal so that building the parser imports nothing; tests check it against the registry.
BENCHMARK_NAMES = ("scienceqa", "vqav2", "gqa", "pope", "mme", "llava_bench", "offline")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a model on a benchmark (or re-score, or build the offline benchmark)",
        description="Without an ACTION: predict answers for a benchmark in batches (resuming finished ones), score "
        "them with the benchmark's official metrics, and write answers.jsonl, results.json, results.md and chart.png "
        "to --out. See docs/evaluation.md for where each benchmark's files go.",
    )
    _bench_args(p, required=False)
    p.add_argument("--model", default="default", help="model dir or short name, loaded with llavakit.infer "
                   "(default: the shipped default model)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate call (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override the per-question token budget")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--submission", action="store_true", help="vqav2 only: read the questions without annotations "
                   "(test-dev), predict, and write OUT/submission.json for the evaluation server instead of scoring")
    _all_questions_arg(p)
    p.set_defaults(func=run_eval)
    esub = p.add_subparsers(dest="eval_command", metavar="ACTION", required=False)

    s = esub.add_parser("score", help="score an existing answers file", description="Score answers already "
                        "written (JSON lines with question_id and text, as LLaVA's model_vqa writes; the ids must be the "
                        "benchmark's own, see docs/evaluation.md) and write the reports to --out.")  # fmt: skip
    _bench_args(s, required=True)
    s.add_argument("--answers", default=None, help="answers JSONL (default OUT/answers.jsonl)")
    s.set_defaults(func=run_score)

    v = esub.add_parser("vqav2-submission", help="write the VQAv2 evaluation-server file of an existing answers file",
                        description="Write OUT/submission.json, the JSON list of {question_id, answer} the VQA "
                        "evaluation server (EvalAI) takes, answers VQA-normalised, for the questions in --data (e.g. "
                        "test-dev; no annotations needed).")  # fmt: skip
    v.add_argument("--data", required=True, help="VQAv2 directory with the questions file (e.g. test-dev2015's)")
    v.add_argument("--out", required=True, help="output directory")
    v.add_argument("--answers", default=None, help="answers JSONL (default OUT/answers.jsonl)")
    _all_questions_arg(v)
    v.set_defaults(func=run_vqav2_submission)

    b = esub.add_parser("build-offline", help="write the offline benchmark of a held-out generated world",
                        description="Generate questions from WORLD/scenes.jsonl (deterministic for a seed).")  # fmt: skip
    b.add_argument("--world", required=True, help="generated world directory (val/test split)")
    b.add_argument("--out", required=True, help="benchmark JSON file to write")
    b.add_argument("--seed", type=int, default=0, help="question sampling seed (default 0)")
    b.add_argument("--pope-per-image", type=int, default=3, help="POPE positives (= negatives) per image and split")
    b.add_argument("--allow-train", action="store_true", help="accept a world of training scenes (not held out)")
    b.set_defaults(func=run_build_offline)


def _bench_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--benchmark", choices=BENCHMARK_NAMES, required=required, help="benchmark name")
    p.add_argument("--data", required=required, help="benchmark data directory (offline: the benchmark file)")
    p.add_argument("--out", required=required, help="output directory")
    g = p.add_argument_group("LLM judge (llava_bench)")
    g.add_argument("--judge-url", default=None, help="OpenAI-compatible API base URL, e.g. https://api.openai.com/v1")
    g.add_argument("--judge-model", default=None, help="judge model name")
    g.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="env var holding the API key (default OPENAI_API_KEY)")
    g.add_argument("--judge-cache", default=None, help="review cache directory (default OUT/judge_cache)")
    g.add_argument("--judge-rules", default=None, metavar="PATH", help="judge rules: a file in llavakit's format (as "
                   "llavakit/eval/judge_rules.json, our wording, the default) or LLaVA's llava/eval/table/rule.json "
                   "(LLaVA's review protocol, for scores comparable with published ones)")
    g.add_argument("--judge-system", default=None, metavar="TEXT", help="the judge's system message, in place of "
                   "the rules file's (a LLaVA rule.json has none; llavakit's is sent unless this is given)")


def _all_questions_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all-questions", default=None, help="vqav2 submission: a questions file (e.g. "
                   "v2_OpenEnded_mscoco_test2015_questions.json) whose questions not in --data get an empty answer; "
                   "without it a test-dev file answers test-dev alone, which the server may reject (a warning says so)")


def _benchmark(args: argparse.Namespace):
    import dataclasses
    from pathlib import Path

    from llavakit.eval.common import EvalError
    from llavakit.eval.judge import JudgeConfig, load_rules
    from llavakit.eval.registry import get_benchmark

    bench = get_benchmark(args.benchmark)
    if args.benchmark == "llava_bench":
        cache = Path(args.judge_cache) if args.judge_cache else Path(args.out) / "judge_cache"
        rules = Path(args.judge_rules) if args.judge_rules else None
        judge = JudgeConfig(url=args.judge_url or "", model=args.judge_model or "", cache_dir=cache,
                            api_key_env=args.judge_key_env, rules=rules, system=args.judge_system)
        load_rules(rules, args.judge_system)  # an unreadable rules file stops the run before the model is loaded
        bench = dataclasses.replace(bench, judge=judge)
    if getattr(args, "submission", False):
        if args.benchmark != "vqav2":
            raise EvalError(f"--submission writes the VQAv2 evaluation-server file; not for {args.benchmark}")
        bench = dataclasses.replace(bench, questions_only=True)
    return bench


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_eval(args: argparse.Namespace) -> int:
    """`llavakit eval --model ...`: predict (resuming), score, report."""
    from pathlib import Path

    from llavakit.eval.common import EvalError
    from llavakit.eval.predict import load_predict_fn
    from llavakit.eval.runner import evaluate, predict_benchmark

    missing = [f"--{n.replace('_', '-')}" for n in ("model", "benchmark", "data", "out") if not getattr(args, n)]
    if missing:
        raise EvalError(f"missing {', '.join(missing)} (see `llavakit eval --help`)")
    if args.all_questions and not args.submission:
        raise EvalError("--all-questions goes with --submission")
    bench = _benchmark(args)  # judge and submission settings are checked before the model is loaded
    predict_fn = load_predict_fn(args.model, args.max_new_tokens)
    if args.submission:
        run = predict_benchmark(bench, args.data, predict_fn, args.out, args.batch_size, args.model, args.limit, _log)
        return _write_submission(run.items, run.answers, Path(args.out), args.all_questions)
    evaluate(bench, args.data, predict_fn, args.out, args.batch_size, model_id=args.model, limit=args.limit, log=_log)
    print((Path(args.out) / "results.md").read_text(encoding="utf-8"), end="")
    return 0


def run_vqav2_submission(args: argparse.Namespace) -> int:
    """`llavakit eval vqav2-submission`: the evaluation-server file of an existing answers file."""
    from pathlib import Path

    from llavakit.eval.runner import load_answers
    from llavakit.eval.vqav2 import VQAv2

    answers_path = Path(args.answers) if args.answers else Path(args.out) / "answers.jsonl"
    if not answers_path.is_file():
        raise FileNotFoundError(f"answers file not found: {answers_path}")
    items = VQAv2(questions_only=True).load(Path(args.data))
    return _write_submission(items, load_answers(answers_path), Path(args.out), args.all_questions)


def _write_submission(items, answers, out, all_questions: str | None) -> int:
    from pathlib import Path

    from llavakit.eval.vqav2 import partial_submission_warning, write_submission

    full_list = Path(all_questions) if all_questions else None
    done = write_submission(out / "submission.json", items, answers, full_list)
    blank = f", and an empty answer to {done.blank} other question(s) of {all_questions}" if all_questions else ""
    print(f"wrote {done.path}: {done.answered} answer(s){blank}")
    warning = partial_submission_warning(done.path, items, full_list)
    if warning:
        _log(warning)
    return 0


def run_score(args: argparse.Namespace) -> int:
    """`llavakit eval score`: grade an existing answers file."""
    from pathlib import Path

    from llavakit.eval.runner import load_answers, score_and_report

    bench = _benchmark(args)
    answers_path = Path(args.answers) if args.answers else Path(args.out) / "answers.jsonl"
    if not answers_path.is_file():
        raise FileNotFoundError(f"answers file not found: {answers_path}")
    items = bench.load(Path(args.data))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    score_and_report(bench, items, load_answers(answers_path), out, model_id="")
    print((out / "results.md").read_text(encoding="utf-8"), end="")
    return 0


def run_build_offline(args: argparse.Namespace) -> int:
    """`llavakit eval build-offline`: write the benchmark file."""
    from llavakit.eval.offline import build_offline

    summary = build_offline(args.world, args.out, seed=args.seed, pope_per_image=args.pope_per_image, allow_train=args.allow_train)
    counts = ", ".join(f"{k} {v}" for k, v in summary["questions"].items())
    print(f"wrote {summary['file']}: {summary['scenes']} scenes; questions: {counts}")
    return 0
