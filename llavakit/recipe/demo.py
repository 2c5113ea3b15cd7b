"""`llavakit demo`: the default model on held-out generated images, then the offline benchmark.

With the shipped default model (llavakit/default_model/weights): materialise it (first use),
generate a few images of a held-out world (saved; paths printed), ask each several questions —
the benchmark's wording and wordings never used in training — and print the answers next to the
truth; then build the offline benchmark on a small held-out world and print its table, and the
table its recipe measured when it was trained (with the blind and majority columns), from the manifest.

Without it (the model has not been trained and packaged yet), the demo says so and runs the
most complete real thing instead: a scaled-down pilot of the same recipe
(configs/default/pilot.yaml), trained for real in minutes, whose answers and measured score are
printed labelled as a pilot.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from llavakit.recipe.run import log

PILOT_BANNER = (
    "PILOT, NOT THE DEFAULT MODEL: a scaled-down run of the default recipe (minutes of training on a few hundred "
    "images, tiny encoder). Its answers and score show that the pipeline trains and answers for real; they say "
    "nothing about the quality of the default model.")


DEFAULT_BANNER = (
    "THE DEFAULT MODEL is small and learned generated scenes, not photos (SmolLM2-135M + llavakit's own encoder, "
    "about 2 hours of training on 2 cores; docs/default-model.md). Its measured scores are far below llavakit's "
    "targets (90 % exact match, POPE F1 90): compare its column with `majority` (the answer prior) and, in the "
    "table measured when it was trained, with `blind` (grey images) to see what it reads from the image.")


def demo(out: str = "runs/demo", images: int = 3, bench_images: int = 30, seed: int = 2026, model: str | None = None,
         pilot_recipe: str = "configs/default/pilot.yaml", benchmark: bool = True) -> int:
    from llavakit import default_model

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    label = "model"
    pilot_table = shipped_table = None
    options: dict = {}  # the world settings of the held-out images: those the model was trained on, where known
    if model is not None and model != "default":
        model_dir, label = Path(model), str(model)
    elif default_model.available():
        log(DEFAULT_BANNER)
        log("default model: materialising it from the shipped parts (once; reused afterwards)")
        model_dir, label = default_model.path(progress=log), "default model"
        manifest = default_model.manifest()
        options = trained_world_options(manifest.get("recipe"))
        shipped_table = measured_table(manifest.get("eval"))
    else:
        log(f"The default model is not in this checkout ({default_model.WEIGHTS / 'manifest.json'} is missing): "
            f"`llavakit recipe {default_model.RECIPE}` trains and packages it (about 2 hours on 2 cores).")
        log(PILOT_BANNER)
        model_dir, pilot_table, options = run_pilot(pilot_recipe)
        label = "pilot"
    from llavakit.infer.api import load_pipeline

    log(f"loading {label} from {model_dir}")
    pipe = load_pipeline(model_dir)
    ask_about_images(pipe, out_dir, images, seed, label, options)
    if benchmark:
        run_small_benchmark(pipe, out_dir, bench_images, seed + 1, label, tag=model_tag(Path(model_dir)), options=options)
    if shipped_table:
        scenes = f"its recipe's {shipped_table[1]} held-out scenes" if shipped_table[1] else "its recipe's held-out split"
        print(f"\nThe default model's benchmark when it was trained ({scenes}; blind = every image replaced by grey, "
              f"majority = the answer prior):\n{shipped_table[0]}")
        print(DEFAULT_BANNER)
    if pilot_table:
        print(f"\nThe pilot recipe's own benchmark (its held-out test split), measured when it was trained:\n{pilot_table}")
        print(PILOT_BANNER)
    return 0


def measured_table(summary: dict | None) -> tuple[str, int | None] | None:
    """The recipe's eval table recorded in a package manifest (None if it was packaged without one)."""
    from llavakit.recipe.evaluate import format_table

    if not summary or not summary.get("rows"):
        return None
    order = ["full", "blind", "paraphrased", "majority"]
    seen = {col for values in summary["rows"].values() for col in values}
    columns = [c for c in order if c in seen] + sorted(seen - set(order))
    return format_table(summary["rows"], columns), summary.get("scenes")


def trained_world_options(recipe: dict | None) -> dict:
    """The world options a recipe trained on (the held-out images should look like them); {} if unknown."""
    return dict(((recipe or {}).get("world") or {}).get("options") or {})


def run_pilot(recipe_file: str) -> tuple[Path, str | None, dict]:
    from llavakit.recipe.config import load_recipe
    from llavakit.recipe.run import run_recipe

    if not Path(recipe_file).is_file():
        raise FileNotFoundError(f"pilot recipe {recipe_file} not found (run the demo from the llavakit checkout)")
    cfg = load_recipe(recipe_file)
    log(f"pilot: running {recipe_file} into {cfg['out']} (resumable; finished steps are skipped)")
    results = run_recipe(cfg, until="eval")
    table = (results["eval"].dir / "summary.md").read_text() if "eval" in results else None
    return results["instruct"].dir / "model", table, trained_world_options(cfg)


def make_world(out: Path, n: int, seed: int, options: dict | None = None) -> Path:
    """A held-out world split ('test') of `n` images with the given WorldConfig options (none: 3 backgrounds)."""
    from llavakit.recipe.config import digest
    from llavakit.recipe.run import world_options
    from llavakit.world.config import WorldConfig
    from llavakit.world.generate import generate_world

    options = world_options(options or {})
    if not options:  # no training world known: the CLI's world with all three backgrounds
        options["backgrounds"] = ("plain", "gradient", "noise")
    world = out / f"world-test-{seed}-{n}-{digest(options)[:8]}"
    if not (world / "world.json").is_file():  # written last: a generation cut short is redone
        import shutil

        if world.exists():
            shutil.rmtree(world)
        generate_world(WorldConfig(out=str(world), num_images=n, seed=seed, split="test", **options))
    return world


def demo_questions(world: Path, out: Path, seed: int) -> list[dict]:
    """Per image: the benchmark's questions, some reworded in ways never used in training."""
    from llavakit.eval.offline import build_offline
    from llavakit.recipe.phrasing import paraphrase_prompt

    bench = out / f"{world.name}.questions.json"
    build_offline(world, bench, seed=seed, pope_per_image=1)
    doc = json.loads(bench.read_text())
    picked = []
    for q in doc["questions"]:
        if q["task"] in ("color", "shape", "count", "position", "existence", "describe"):
            picked.append(q)
            rng = random.Random(f"{seed}/{q['question_id']}")
            if q["task"] in ("color", "count", "existence") and (new := paraphrase_prompt(q["prompt"], q["task"], rng)):
                picked.append({**q, "prompt": new, "reworded": True})
    return picked


def ask_about_images(pipe, out: Path, n: int, seed: int, label: str, options: dict | None = None) -> None:
    from llavakit.eval.text import normalize_vqa

    world = make_world(out, n, seed, options)
    questions = demo_questions(world, out, seed)
    by_image: dict[str, list[dict]] = {}
    for q in questions:
        by_image.setdefault(q["image"], []).append(q)
    print(f"\n== {label}: {n} held-out generated images (world split 'test', seed {seed}; never seen in training) ==")
    right = total = 0
    for image_name, qs in sorted(by_image.items()):
        path = world / image_name
        print(f"\nimage: {path.resolve()}")
        image = pipe.load_images([path])
        short = [q for q in qs if q["task"] != "describe"]
        long = [q for q in qs if q["task"] == "describe"]
        answers = pipe.generate([(image, q["prompt"]) for q in short], max_new_tokens=16)
        answers += pipe.generate([(image, q["prompt"]) for q in long], max_new_tokens=128) if long else []
        for q, a in zip(short + long, answers):
            question = q["prompt"].split("\n")[1]
            if q["task"] == "describe":
                print(f"  Q: {question}\n     model: {a.strip()}")
                continue
            ok = normalize_vqa(a) == normalize_vqa(q["answer"])
            right, total = right + ok, total + 1
            tag = " (reworded)" if q.get("reworded") else ""
            print(f"  Q{tag}: {question}\n     model: {a.strip()[:40]!r:24s} truth: {q['answer']!r:14s} {'ok' if ok else 'WRONG'}")
        sys.stdout.flush()
    print(f"\n{label}: {right}/{total} short answers right on these images")


def model_tag(model_dir: Path) -> str:
    """Names this model's answer files (answers are resumed per model, never mixed between models)."""
    from llavakit.recipe.config import digest

    weights = model_dir / "model.safetensors"
    stat = weights.stat() if weights.is_file() else None
    return digest(str(model_dir.resolve()), stat.st_size if stat else None, stat.st_mtime_ns if stat else None)[:10]


def run_small_benchmark(pipe, out: Path, n: int, seed: int, label: str, tag: str = "model",
                        options: dict | None = None) -> dict:
    from llavakit.recipe.evaluate import build_benchmark, format_table, majority_rows, run_benchmarks, summary_rows

    world = make_world(out, n, seed, options)
    bench = out / f"offline-{n}-{world.name}.json"
    built = build_benchmark(world, bench, seed=0, pope_per_image=3, describe=False)
    print(f"\n== offline benchmark, {label}: {built['scenes']} held-out images, {sum(built['questions'].values())} "
          "questions (exact match; POPE F1 and yes-ratio) ==", flush=True)
    t0 = time.perf_counter()
    answers = out / f"bench-{world.name}-{tag}"
    runs = run_benchmarks(pipe, bench, answers, ablations=["paraphrased"], batch_size=8, seed=0, say=log, model_id=label)
    rows = summary_rows(runs)
    for metric, values in majority_rows(bench).items():
        rows.setdefault(metric, {}).update(values)
    print(format_table(rows, [*runs, "majority"]))
    print("majority: always the most frequent answer of each task on these questions (the prior to beat)")
    print(f"({time.perf_counter() - t0:.0f} s; answers and results in {answers})")
    return runs
