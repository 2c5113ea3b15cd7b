"""`llavakit train clip`: stage-0 encoder pretraining and its evaluation.

    llavakit train clip --world TRAIN_DIR --val-world VAL_DIR --out DIR [--config configs/clip-world.yaml] [--resume] [KEY=VALUE ...]
    llavakit train clip --eval --model DIR --world VAL_DIR [--out DIR] [--random-init] [KEY=VALUE ...]

Training settings come from the dataclass defaults, then --config, then the flags, then KEY=VALUE
(values parsed as YAML: `epochs=3`, `compile=true`, `max_steps=null`). `llavakit train` (cli.py)
hands everything after `clip` to `main`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

PROG = "llavakit train clip"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Pretrain a small CLIP encoder (HF CLIP format) on a generated world with the CLIP loss, "
                    "or evaluate one (--eval): zero-shot retrieval and linear probes (colour, shape, count, position).",
        epilog="KEY=VALUE overrides any ClipTrainConfig field (training) or EvalConfig field (--eval), e.g. "
               "epochs=2 batch_size=64 compile=true; docs/encoder.md has the recipe.",
    )  # fmt: skip
    p.add_argument("--world", metavar="DIR", help="training world (train mode) or held-out world (--eval)")
    p.add_argument("--val-world", metavar="DIR", help="held-out world for validation loss, recall and probe settings")
    p.add_argument("--out", metavar="DIR", help="output dir (train: the checkpoint; --eval: where eval.json goes)")
    p.add_argument("--config", metavar="YAML", help="recipe file of ClipTrainConfig keys (e.g. configs/clip-world.yaml)")
    p.add_argument("--resume", action="store_true",
                   help="go on with the interrupted run in --out from its checkpoint/ (same settings; threads, compile, "
                        "logging, checkpoint and evaluation settings may change)")
    p.add_argument("--eval", action="store_true", help="evaluate --model on --world instead of training")
    p.add_argument("--model", metavar="DIR", help="checkpoint to evaluate (with --eval)")
    p.add_argument("--random-init", action="store_true",
                   help="with --eval: evaluate an untrained model of the same architecture (baseline)")  # fmt: skip
    p.add_argument("--probe-dir", metavar="DIR", help="with --eval: keep the generated probe worlds here")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return p


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['epochs=3', 'compile=true'] → {'epochs': 3, 'compile': True} (values are YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {file} does not exist")
    data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {file} must hold a mapping of ClipTrainConfig keys")
    return data


def train_config(args: argparse.Namespace):
    from llavakit.train.clip import ClipTrainConfig

    data = load_yaml(args.config) if args.config else {}
    flags = {"world": args.world, "val_world": args.val_world, "out": args.out}
    data.update({k: v for k, v in flags.items() if v is not None})
    data.update(parse_overrides(args.overrides))
    return ClipTrainConfig.from_dict(data)


def eval_config(args: argparse.Namespace):
    from dataclasses import fields

    from llavakit.train.clip_eval import EvalConfig

    if not args.model or not args.world:
        raise ValueError("--eval needs --model DIR and --world VAL_DIR")
    data = {"model": args.model, "world": args.world, "out": args.out, "random_init": args.random_init,
            "probe_dir": args.probe_dir, **parse_overrides(args.overrides)}  # fmt: skip
    known = {f.name for f in fields(EvalConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown eval key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return EvalConfig(**data)


def faster_malloc() -> None:
    """Keep freed memory in the heap (glibc): what MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=... do, ~25 % faster here."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if sys.platform != "linux" or not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-1, 64 << 30)  # M_TRIM_THRESHOLD
        libc.mallopt(-4, 0)  # M_MMAP_MAX
    except (OSError, AttributeError):
        pass


def run_eval(args: argparse.Namespace) -> int:
    from llavakit.train.clip_eval import evaluate, format_report

    if args.resume:
        raise ValueError("--resume goes with training, not --eval")
    cfg = eval_config(args)
    report = evaluate(cfg.model, cfg)
    print(format_report(report))
    return 0


def run_train(args: argparse.Namespace) -> int:
    from llavakit.train.clip import train_clip

    if args.model or args.random_init or args.probe_dir:
        raise ValueError("--model, --random-init and --probe-dir go with --eval")
    cfg = train_config(args)
    result = train_clip(cfg, resume=args.resume)
    print(f"wrote {result.out}: {result.steps} steps in {result.seconds / 60:.1f} min, "
          f"final loss {sum(result.losses[-10:]) / len(result.losses[-10:]):.4f}")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `llavakit train clip`; returns the exit code (1 with a one-line error for bad input)."""
    import os

    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help, or a usage error already printed by argparse
        return int(exc.code or 0)
    faster_malloc()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" / "Loading weights" bars: noise in a training log
    try:
        return run_eval(args) if args.eval else run_train(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as exc:
        if os.environ.get("LLAVAKIT_DEBUG") == "1":
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
