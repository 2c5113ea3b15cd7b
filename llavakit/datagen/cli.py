"""`llavakit datagen`: instruction data generation.

    llavakit datagen [instruct] --annotations A --images-dir D --kinds conversation,detail,reasoning
                     --teacher offline|openai|hf [--teacher-url URL --teacher-model NAME]
                     [--concurrency N] --cache DIR --out data.json
    llavakit datagen captions   --annotations A --images-dir D --out captions.json
    llavakit datagen vqa        --annotations A --images-dir D --out vqa.json
    llavakit datagen mix        --source a.json[:RATIO] --source b.json[:RATIO] --seed S --out mix.json

Only argparse here; the work is imported inside the handlers.
"""

from __future__ import annotations

import argparse
import os
import sys

KINDS_HELP = "conversation,detail,reasoning"


def _add_source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input")
    g.add_argument("--annotations", metavar="PATH",
                   help="world dir, annotations dir, or COCO instances JSON (captions/scenes found next to it)")
    g.add_argument("--images-dir", metavar="DIR", help="directory the records' image paths are relative to")
    g.add_argument("--captions", metavar="FILE", help="COCO captions JSON (default: next to the instances file)")
    g.add_argument("--scenes", metavar="FILE", help="world scenes.jsonl (default: the world dir's, when present)")
    g.add_argument("--limit", type=int, metavar="N", help="use only the first N images (by id)")
    g.add_argument("--allow-missing-images", action="store_true",
                   help="skip (and count) images whose file is missing instead of failing")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="FILE", help="output LLaVA JSON (report and rejections are written next to it)")
    p.add_argument("--seed", type=int, default=0, help="seed of all random choices (default 0)")
    p.add_argument("--debug", action="store_true", help="show tracebacks (or set LLAVAKIT_DEBUG=1)")


def _add_instruct_args(p: argparse.ArgumentParser) -> None:
    _add_source_args(p)
    g = p.add_argument_group("generation")
    g.add_argument("--kinds", default=KINDS_HELP, help=f"comma-separated kinds (default {KINDS_HELP})")
    g.add_argument("--teacher", default="offline", choices=("offline", "openai", "hf"),
                   help="who writes the data (default offline)")
    g.add_argument("--teacher-url", metavar="URL", help="openai: base URL, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--teacher-model", metavar="NAME", help="openai: model name; hf: local model directory")
    g.add_argument("--teacher-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="openai: environment variable holding the API key (default OPENAI_API_KEY)")
    g.add_argument("--concurrency", type=int, default=4, help="openai: requests in flight (default 4)")
    g.add_argument("--timeout", type=float, default=120.0, help="openai: seconds per request (default 120)")
    g.add_argument("--max-retries", type=int, default=5, help="openai: retries on 429/5xx/timeouts (default 5)")
    g.add_argument("--temperature", type=float, default=0.7, help="openai/hf: sampling temperature (default 0.7)")
    g.add_argument("--max-tokens", type=int, default=1024, help="openai/hf: longest completion (default 1024)")
    g.add_argument("--attempts", type=int, default=2,
                   help="teacher calls per item when its output is rejected (default 2; offline: 1)")
    g.add_argument("--prompt-dir", metavar="DIR",
                   help="directory whose prompt packs / lists override the built-in ones")
    g.add_argument("--cache", metavar="DIR", help="cache directory (default: <out>.cache next to the output)")
    g.add_argument("--retry-rejected", action="store_true", help="ask again for items whose cached output was rejected")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_common(p)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "datagen",
        help="generate instruction data (conversation/detail/reasoning, captions, VQA, mixes)",
        description="Generate LLaVA instruction data from COCO-style annotations. Without a mode, runs "
                    "`instruct`. Modes: instruct, captions, vqa, mix.",
    )
    _add_instruct_args(p)
    p.set_defaults(func=run_instruct)
    modes = p.add_subparsers(dest="datagen_mode", metavar="[MODE]")

    pi = modes.add_parser("instruct", help="conversation / detail / reasoning records from a teacher (default)")
    _add_instruct_args(pi)
    pi.set_defaults(func=run_instruct)

    pc = modes.add_parser("captions", help="stage-1 caption records (brief instruction + one caption)")
    _add_source_args(pc)
    pc.add_argument("--per-image", choices=("one", "all"), default="one",
                    help="one caption per image (default) or one record per caption")
    pc.add_argument("--prompt-dir", metavar="DIR", help="directory with a brief_questions.json override")
    _add_common(pc)
    pc.set_defaults(func=run_captions)

    pv = modes.add_parser("vqa", help="LLaVA-1.5 style short-answer and multiple-choice items")
    _add_source_args(pv)
    pv.add_argument("--questions-per-image", type=int, default=4, help="short-answer questions per image (default 4)")
    pv.add_argument("--mc-per-image", type=int, default=1, help="multiple-choice items per image (default 1)")
    pv.add_argument("--types", help="comma-separated question types (default: all that apply)")
    _add_common(pv)
    pv.set_defaults(func=run_vqa)

    pm = modes.add_parser("mix", help="combine LLaVA JSON files with ratios and a seed")
    pm.add_argument("--source", action="append", metavar="FILE[:RATIO]", default=[],
                    help="a LLaVA JSON file and how much of it to take (1 = all, 0.5 = half, 2 = twice); repeatable")
    pm.add_argument("--no-shuffle", action="store_true", help="keep source order")
    _add_common(pm)
    pm.set_defaults(func=run_mix)


def _need(args, *names: str) -> None:
    from llavakit.datagen.config import DatagenError

    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) in (None, "", [])]
    if missing:
        raise DatagenError(f"missing {', '.join(missing)}")


def _source(args):
    from llavakit.datagen.config import SourceConfig

    _need(args, "annotations", "images_dir", "out")
    return SourceConfig(annotations=args.annotations, images_dir=args.images_dir, captions=args.captions,
                        scenes=args.scenes, limit=args.limit, allow_missing_images=args.allow_missing_images)


def _print_report(report) -> None:
    print(report.format())


def run_instruct(args) -> int:
    from pathlib import Path

    from llavakit.datagen.config import InstructConfig, TeacherConfig
    from llavakit.datagen.instruct import generate_instruct

    source = _source(args)
    teacher = TeacherConfig(
        name=args.teacher, model=args.teacher_model, url=args.teacher_url, key_env=args.teacher_key_env,
        concurrency=args.concurrency, timeout=args.timeout, max_retries=args.max_retries,
        temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed,
    )
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else out.with_name(out.name + ".cache")
    config = InstructConfig(source=source, out=out, cache_dir=cache, teacher=teacher, kinds=args.kinds,
                            prompt_dir=args.prompt_dir, seed=args.seed, attempts=args.attempts,
                            retry_rejected=args.retry_rejected, progress=not args.no_progress)
    try:
        report = generate_instruct(config)
    except KeyboardInterrupt:
        print(f"\ndatagen: interrupted; finished items are in {cache}. Rerun the same command to resume.",
              file=sys.stderr)
        return 130
    _print_report(report)
    return 0


def run_captions(args) -> int:
    from llavakit.datagen.captions import generate_captions
    from llavakit.datagen.config import CaptionsConfig

    _print_report(generate_captions(CaptionsConfig(source=_source(args), out=args.out, per_image=args.per_image,
                                                   prompt_dir=args.prompt_dir, seed=args.seed)))
    return 0


def run_vqa(args) -> int:
    from llavakit.datagen.config import VQAConfig
    from llavakit.datagen.vqa import generate_vqa

    _print_report(generate_vqa(VQAConfig(source=_source(args), out=args.out,
                                         questions_per_image=args.questions_per_image,
                                         mc_per_image=args.mc_per_image, types=args.types, seed=args.seed)))
    return 0


def run_mix(args) -> int:
    from llavakit.datagen.config import MixConfig
    from llavakit.datagen.mix import mix_sources

    _need(args, "source", "out")
    _print_report(mix_sources(MixConfig(sources=args.source, out=args.out, seed=args.seed,
                                        shuffle=not args.no_shuffle)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m llavakit.datagen.cli ...` == `llavakit datagen ...` (without the other stages)."""
    parser = argparse.ArgumentParser(prog="llavakit")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["datagen", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        if args.debug or os.environ.get("LLAVAKIT_DEBUG") == "1":
            raise
        print(f"llavakit datagen: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
