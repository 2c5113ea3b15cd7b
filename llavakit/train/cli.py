"""`llavakit train`: run a training stage from a YAML config.

    llavakit train CONFIG.yaml [key.sub=value ...] [--out DIR] [--resume] [--dry-run]
    llavakit train clip ...        (CLIP stage-0 pretraining: handled by llavakit.train.clip_cli)

The same command runs under `accelerate launch` and `torchrun` (see docs/training.md).
"""

from __future__ import annotations

import argparse

USAGE = "llavakit train CONFIG.yaml [KEY=VALUE ...] [--out DIR] [--resume] [--dry-run]\n       llavakit train clip ..."


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="output dir of the stage (overrides `out:` in the config)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output dir")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config and run its pipeline for a few steps on tiny stand-in model and data")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", usage=USAGE, help="train a stage (align, instruct) from a YAML config",
        description="Train one stage from a YAML config (configs/ has recipes). KEY=VALUE overrides any config key, "
                    "e.g. optim.lr=1e-4 data.num_workers=4. `llavakit train clip ...` runs CLIP pretraining.",
    )
    _options(p)
    # Everything else (CONFIG, overrides, or `clip` and its own arguments) is parsed in `run`,
    # so that `llavakit train clip --any-flag` reaches the CLIP trainer untouched.
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="CONFIG [KEY=VALUE ...]")
    p.set_defaults(func=run)


def _parse_rest(args: argparse.Namespace) -> argparse.Namespace:
    inner = argparse.ArgumentParser(prog="llavakit train", usage=USAGE)
    inner.add_argument("config")
    inner.add_argument("overrides", nargs="*")
    _options(inner)
    ns = inner.parse_intermixed_args(args.rest)  # options may come between overrides
    ns.out = ns.out or args.out
    ns.resume = ns.resume or args.resume
    ns.dry_run = ns.dry_run or args.dry_run
    return ns


def run_clip(argv: list[str]) -> int:
    from llavakit.cli import CLIError

    import importlib

    try:  # import_module consults sys.modules, so an already-imported module is reused as is
        clip_cli = importlib.import_module("llavakit.train.clip_cli")
    except ModuleNotFoundError as exc:
        if exc.name != "llavakit.train.clip_cli":
            raise
        raise CLIError("CLIP pretraining (`llavakit train clip`) is not available in this build: "
                       "llavakit.train.clip_cli is not installed") from None
    return int(clip_cli.main(argv) or 0)


def run(args: argparse.Namespace) -> int:
    from llavakit.cli import CLIError

    if args.rest and args.rest[0] == "clip":
        if args.out or args.resume or args.dry_run:
            raise CLIError("put options for `llavakit train clip` after `clip`")
        return run_clip(args.rest[1:])
    if not args.rest:
        raise CLIError(f"missing CONFIG\nusage: {USAGE}")
    ns = _parse_rest(args)
    from llavakit.train.config import load_config

    cfg = load_config(ns.config, ns.overrides)
    if ns.out:
        cfg.out = ns.out
    if ns.dry_run:
        from llavakit.train.dryrun import dry_run

        return dry_run(cfg, resume=ns.resume)
    from llavakit.train.trainer import train

    import os

    out = train(cfg, resume=ns.resume)
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per process
        print(f"wrote {out}/model ({cfg.stage}); report: {out}/report.json")
    return 0
