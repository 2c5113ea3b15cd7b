"""`llavakit ablations RECIPE.yaml`: the paper's training ablations of one recipe, on its offline benchmark.

From one recipe file, train and evaluate these variants (the table's columns):

- `align_instruct` (a): the recipe as is. Its align, ground (if any) and instruct steps *are* the
  recipe's own (same directories, same hashes), so a finished `llavakit recipe` run is reused, not
  retrained; the other variants have no ground step (their stage 2 starts a fresh adapter);
- `instruct_only` (b): no align stage: stage 2 starts from the init model (projector untrained);
- `text_only` (c): every training image replaced by a uniform grey square (the same file names,
  so the records and the image-token layout are unchanged; square, so no padding shows the
  aspect ratio: every blank image is the same model input), in both stages, and the benchmark
  asked on grey images too (`evaluate.blank_image`): what is learnt from the text alone;
- `caption_only` (d): stage 2 trained on the caption data (the align data) instead of the
  instruction mix; its align step is (a)'s (same inputs: computed once).

The world, data, encoder and init steps run once, in the recipe's own out dir (they are the
recipe's steps), and serve every variant; the benchmark is built once from the held-out split
(`OUT/benchmark/offline.json`). Each variant writes `OUT/<variant>/`: its own training dirs
where it differs from the recipe (`blank-images/`, `features/`, `align/`, `instruct/`) and
`eval/`. Every step is a recipe step with its own marker: a rerun skips finished work, resumes
training from checkpoints and evaluation from its answers. Writes `OUT/ablations.json` and
`OUT/ablations.md` (the table, one column per variant plus `majority`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llavakit.recipe.config import ABLATION_VARIANTS, _deep_update, digest
from llavakit.recipe.evaluate import GREY, blank_image
from llavakit.recipe.run import Recipe, StepResult, log, sha256_file

SHARED = ("world", "data", "encoder", "init")


@dataclass(frozen=True)
class Variant:
    """One training variant: how it departs from the recipe."""

    name: str
    letter: str
    align: bool  # stage 1 runs before stage 2
    blank: bool  # training and benchmark images are uniform grey
    stage2_data: str  # file of the recipe's data dir that stage 2 trains on
    what: str

    @property
    def label(self) -> str:
        return f"({self.letter}) {self.name}"

    def changes(self, step: str) -> bool:
        """Whether this variant's `step` differs from the recipe's own (then it gets its own dir and hash)."""
        if step == "align":
            return self.blank
        if step == "instruct":
            return self.blank or not self.align or self.stage2_data != "mix.json"
        return step in ("blank", "eval")


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("align_instruct", "a", True, False, "mix.json", "align, then instruct on the instruction mix (the recipe as is)"),
    Variant("instruct_only", "b", False, False, "mix.json", "no align stage: instruct starts from the init model"),
    Variant("text_only", "c", True, True, "mix.json", "the recipe with every image grey, in training and evaluation"),
    Variant("caption_only", "d", True, False, "captions.json", "align, then stage 2 on the caption data, not the mix"),
)}  # fmt: skip
assert {v.letter: v.name for v in VARIANTS.values()} == ABLATION_VARIANTS


class VariantRecipe(Recipe):
    """One variant's steps (blank, align, instruct, eval) on the shared steps of `base`."""

    def __init__(self, base: Recipe, variant: Variant, root: Path, bench: Path, bench_id: str):
        super().__init__(base.cfg, base.say)
        self.variant, self.dir, self.bench, self.bench_id = variant, root / variant.name, bench, bench_id
        self.results = {name: base.results[name] for name in SHARED}

    @property
    def steps(self) -> list[str]:
        v = self.variant
        # the recipe's ground step goes with its own instruct step only: the other variants start instruct afresh
        ground = self.grounded and not v.changes("instruct")
        return ["blank"] * v.blank + ["align"] * v.align + ["ground"] * ground + ["instruct", "eval"]

    def run_steps(self) -> dict[str, StepResult]:
        for name in self.steps:
            self.results[name] = self.step(name)
        return self.results

    # ---- where and what ----------------------------------------------------------------------

    @property
    def features_dir(self) -> Path:
        return self.dir / "features" if self.variant.blank else super().features_dir

    @property
    def image_folder(self) -> Path:
        return self.step_dir("blank") if self.variant.blank else self.world_dir("train") / "images"

    def step_dir(self, name: str) -> Path:
        if self.variant.changes(name):
            return self.dir / {"blank": "blank-images"}.get(name, name)
        return super().step_dir(name)

    def upstream(self, name: str) -> list[str]:
        if name == "instruct" and not self.variant.align:
            ids = [self.results["init"].id, self.results["data"].id]
        else:
            ids = super().upstream(name)
        if self.variant.blank and name in ("align", "instruct"):
            ids.append(self.results["blank"].id)
        return ids

    def step_hash(self, name: str) -> str:
        v = self.variant
        if name == "blank":
            return digest("blank", GREY, "square", self.results["world"].id)
        if name == "eval":
            settings = {k: val for k, val in self.cfg["eval"].items() if k != "ablations"}
            return digest("ablation-eval", settings, v.blank, self.bench_id, self.results["instruct"].id)
        h = super().step_hash(name)
        return digest(h, v.name, v.align, v.blank, v.stage2_data) if v.changes(name) else h

    def stage_data(self, stage: str) -> Path:
        return self.data_dir / ("captions.json" if stage == "align" else self.variant.stage2_data)

    def train_config(self, stage: str, path: Path):
        from llavakit.train.config import TrainConfig

        init = self.results["align" if stage == "instruct" and self.variant.align else "init"].dir
        data = self.stage_data(stage)
        cache = None if self.cfg[stage]["train"].get("train_vision") else str(self.features_dir)
        fixed = {"stage": stage, "init_from": str(init), "out": str(path),
                 "data": {"path": str(data), "image_folder": str(self.image_folder), "feature_cache": cache}}
        return TrainConfig.from_dict(_deep_update(self.cfg[stage]["train"], self.from_ground(stage, fixed)))

    # ---- the variant's own steps -------------------------------------------------------------

    def do_blank(self, path: Path) -> dict:
        """A blank copy (`blank_image`) of every training image, under the same file name."""
        from PIL import Image

        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        source = self.world_dir("train") / "images"
        n = 0
        for image in sorted(p for p in source.rglob("*") if p.is_file()):
            with Image.open(image) as im:
                size = im.size
            dest = path / image.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            blank_image(size).save(dest)
            n += 1
        if not n:
            raise FileNotFoundError(f"text_only: no training images in {source} to blank")
        return {"images": n, "color": list(GREY)}

    def do_eval(self, path: Path) -> dict:
        from llavakit.eval.predict import pipeline_predict_fn
        from llavakit.eval.runner import evaluate
        from llavakit.infer.api import load_pipeline
        from llavakit.recipe.evaluate import _progress, blind_predict_fn

        pipe = load_pipeline(self.results["instruct"].dir / "model")
        predict = blind_predict_fn(pipe) if self.variant.blank else pipeline_predict_fn(pipe)
        self.say(f"{self.variant.name}: eval on {self.bench}{' (grey images)' if self.variant.blank else ''}")
        evaluate("offline", self.bench, predict, path, int(self.cfg["eval"]["batch_size"]),
                 f"{self.cfg['name']}/{self.variant.name}", log=_progress(self.say))
        return {"results": str(path / "results.json"), "model": str(self.results["instruct"].dir / "model")}


# ---- the driver ------------------------------------------------------------------------------


def run_ablations(cfg: dict, say: Callable[[str], None] = log) -> dict[str, Any]:
    """Train and evaluate `cfg["ablations"]["variants"]` of recipe `cfg`; returns ablations.json's content."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    base = Recipe(cfg, say)
    root = ablations_dir(cfg)
    base.out.mkdir(parents=True, exist_ok=True)
    with base.lock():
        if cfg["threads"]:
            import torch

            torch.set_num_threads(int(cfg["threads"]))
        for name in SHARED:
            base.results[name] = base.step(name)
        bench = build_shared_benchmark(base, root / "benchmark")
        variants: dict[str, VariantRecipe] = {}
        for name in cfg["ablations"]["variants"]:
            say(f"== variant {VARIANTS[name].label}: {VARIANTS[name].what}")
            variants[name] = VariantRecipe(base, VARIANTS[name], root, bench["file"], bench["sha256"])
            variants[name].run_steps()
        return write_ablations(variants, bench, root, say)


def ablations_dir(cfg: dict) -> Path:
    return Path(cfg["ablations"]["out"] or Path(cfg["out"]) / "ablations")


def build_shared_benchmark(base: Recipe, path: Path) -> dict[str, Any]:
    """The offline benchmark of the held-out split, once for every variant (deterministic: rebuilt each run)."""
    from llavakit.recipe.evaluate import build_benchmark

    c = base.cfg["eval"]
    file = path / "offline.json"
    built = build_benchmark(base.world_dir(c["split"]), file, int(c["seed"]), int(c["pope_per_image"]), bool(c["describe"]),
                            images=c.get("images"))
    base.say(f"benchmark {file}: {built['scenes']} held-out scenes, questions {built['questions']}")
    return {"file": file, "sha256": sha256_file(file), "scenes": built["scenes"], "questions": built["questions"]}


def write_ablations(variants: dict[str, VariantRecipe], bench: dict, root: Path, say=print) -> dict[str, Any]:
    """ablations.json and ablations.md: metrics (rows) by variant and the majority baseline (columns)."""
    from llavakit.recipe.evaluate import format_table, majority_rows, summary_rows

    runs = {v.variant.label: json.loads((v.results["eval"].dir / "results.json").read_text(encoding="utf-8"))
            for v in variants.values()}
    rows = summary_rows(runs)
    for metric, values in majority_rows(bench["file"]).items():
        rows.setdefault(metric, {}).update(values)
    columns = [*runs, "majority"]
    doc = {"benchmark": str(bench["file"]), "benchmark_sha256": bench["sha256"], "scenes": bench["scenes"],
           "questions": bench["questions"], "columns": columns, "rows": rows,
           "variants": {name: variant_info(v) for name, v in variants.items()},
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    root.mkdir(parents=True, exist_ok=True)
    (root / "ablations.json").write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    (root / "ablations.md").write_text(table_markdown(doc, variants) + "\n", encoding="utf-8")
    say("ablations:\n" + format_table(rows, columns) + f"\n(written to {root / 'ablations.md'})")
    return doc


def variant_info(v: VariantRecipe) -> dict[str, Any]:
    steps = {}
    for name in v.steps:
        r = v.results[name]
        report = r.info.get("report", {})
        steps[name] = {"dir": str(r.dir), "hash": r.hash, "skipped": r.skipped, "seconds": round(r.seconds, 1),
                       **{k: report[k] for k in ("steps", "final_loss", "records") if k in report}}
    return {"label": v.variant.label, "what": v.variant.what, "steps": steps}


def table_markdown(doc: dict, variants: dict[str, VariantRecipe]) -> str:
    from llavakit.recipe.evaluate import format_table

    legend = [f"- `{v.variant.label}`: {v.variant.what}" for v in variants.values()]
    legend.append("- `majority`: always the most frequent answer of each task on these questions (the prior to beat)")
    head = (f"Offline benchmark `{doc['benchmark']}` ({doc['scenes']} held-out scenes); "
            "exact match / letter accuracy and POPE in %, CHAIR in %.")
    return "\n".join([head, "", format_table(doc["rows"], doc["columns"]), "", *legend])
