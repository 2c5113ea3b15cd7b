"""`llavakit recipe` (train the default model, or any recipe, end to end), `llavakit ablations` and `llavakit demo`.

    llavakit recipe configs/default/recipe.yaml [KEY=VALUE ...] [--until STEP]
    llavakit ablations configs/default/pilot.yaml [KEY=VALUE ...] [--out DIR] [--only a,b,c,d]
    llavakit demo [--out DIR] [--images N] [--bench-images N]

Only argparse here; the work is imported in the handlers.
"""

from __future__ import annotations

import argparse

STEP_NAMES = ("world", "data", "encoder", "init", "align", "ground", "instruct", "eval", "package")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "recipe", help="run a whole recipe (world, data, encoder, init, align, [ground], instruct, eval, package), resumably",
        description="Run every step of a recipe file; finished steps (marker with the same settings) are skipped, "
                    "training resumes from checkpoints. configs/default/recipe.yaml trains the default model.")
    p.add_argument("recipe", help="recipe YAML (configs/default/recipe.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override recipe keys, e.g. eval.batch_size=4")
    p.add_argument("--until", choices=STEP_NAMES, help="stop after this step")
    p.set_defaults(func=run_recipe_cmd)

    a = sub.add_parser(
        "ablations", help="train and evaluate a recipe's ablations: align+instruct, instruct only, text only, captions only",
        description="From one recipe file, train the paper's variants - (a) align_instruct: the recipe as is; "
                    "(b) instruct_only: no align stage; (c) text_only: every image grey in training and evaluation; "
                    "(d) caption_only: stage 2 on the caption data - and print their table on the offline benchmark "
                    "(with a majority-answer column). Shared steps (world, data, encoder, init) run once, in the "
                    "recipe's out dir; finished steps are skipped on a rerun. Writes OUT/ablations.json and "
                    "OUT/ablations.md.")
    a.add_argument("recipe", help="recipe YAML (e.g. configs/default/pilot.yaml)")
    a.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override recipe keys, e.g. eval.batch_size=4")
    a.add_argument("--out", help="where the variants and the table go (default: ablations.out, else <recipe out>/ablations)")
    a.add_argument("--only", metavar="a,b,...", help="these variants only: letters a-d or names, comma-separated")
    a.set_defaults(func=run_ablations_cmd)

    d = sub.add_parser(
        "demo", help="the default model on held-out generated images: answers next to the truth, then the benchmark",
        description="Load the default model (materialised on first use), generate a few held-out world images, "
                    "ask varied questions and print the answers next to the truth, then run the offline benchmark "
                    "on a small held-out set. Without a shipped default model it says so and trains a scaled-down "
                    "pilot of the same recipe instead (configs/default/pilot.yaml).")
    d.add_argument("--out", default="runs/demo", help="where images, answers and results go (default runs/demo)")
    d.add_argument("--images", type=int, default=3, help="held-out images to ask about (default 3)")
    d.add_argument("--bench-images", type=int, default=30, help="held-out images in the benchmark run (default 30)")
    d.add_argument("--seed", type=int, default=2026, help="seed of the held-out demo worlds (default 2026)")
    d.add_argument("--model", default=None, help="a model dir to demo instead of the default model")
    d.add_argument("--pilot-recipe", default="configs/default/pilot.yaml",
                   help="recipe trained when no default model is shipped (default configs/default/pilot.yaml)")
    d.add_argument("--no-benchmark", action="store_true", help="skip the benchmark run")
    d.set_defaults(func=run_demo_cmd)


def run_recipe_cmd(args: argparse.Namespace) -> int:
    from llavakit.recipe.config import load_recipe
    from llavakit.recipe.run import run_recipe

    results = run_recipe(load_recipe(args.recipe, args.overrides), until=args.until)
    for name, r in results.items():
        print(f"{name:9s} {'skipped' if r.skipped else 'ran':7s} {r.seconds:8.0f} s  {r.dir}")
    return 0


def run_ablations_cmd(args: argparse.Namespace) -> int:
    import json

    from llavakit.recipe.ablations import run_ablations
    from llavakit.recipe.config import load_recipe

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"ablations.out={json.dumps(args.out)}")
    if args.only:
        overrides.append(f"ablations.variants={json.dumps(args.only)}")
    run_ablations(load_recipe(args.recipe, overrides))
    return 0


def run_demo_cmd(args: argparse.Namespace) -> int:
    from llavakit.recipe.demo import demo

    return demo(out=args.out, images=args.images, bench_images=args.bench_images, seed=args.seed, model=args.model,
                pilot_recipe=args.pilot_recipe, benchmark=not args.no_benchmark)
