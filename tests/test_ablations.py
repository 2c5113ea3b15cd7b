"""`llavakit ablations`: variant wiring (what each one trains on), the grey images, the config, and a
tiny end-to-end run (tiny models trained for real, a few minutes on 2 cores: marked slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_recipe import tiny_recipe

from llavakit.recipe.ablations import GREY, VARIANTS, VariantRecipe
from llavakit.recipe.config import RecipeError, load_recipe
from llavakit.recipe.run import Recipe, StepResult

LABELS = ["(a) align_instruct", "(b) instruct_only", "(c) text_only", "(d) caption_only"]


def fake_shared(cfg: dict) -> Recipe:
    """A recipe whose shared steps are recorded as done (dirs and ids), without running them."""
    base = Recipe(cfg, say=lambda m: None)
    for name in ("world", "data", "encoder", "init"):
        base.results[name] = StepResult(name, base.step_dir(name), f"h-{name}", f"id-{name}", True, 0.0, {})
    return base


def wired(cfg: dict, name: str, tmp: Path) -> VariantRecipe:
    v = VariantRecipe(fake_shared(cfg), VARIANTS[name], tmp / "abl", tmp / "abl" / "benchmark" / "offline.json", "b0")
    if v.variant.blank:
        v.results["blank"] = StepResult("blank", v.step_dir("blank"), v.step_hash("blank"), "id-blank", True, 0.0, {})
    if v.variant.align:
        v.results["align"] = StepResult("align", v.step_dir("align"), v.step_hash("align"), "id-align", True, 0.0, {})
    return v


def test_each_variant_trains_on_its_own_inputs(tmp_path):
    cfg = tiny_recipe(tmp_path, tmp_path / "lm")
    out, abl = Path(cfg["out"]), tmp_path / "abl"
    recipe = fake_shared(cfg)
    recipe.results["align"] = StepResult("align", out / "align", "h", "id-align", True, 0.0, {})
    a, b, c, d = (wired(cfg, name, tmp_path) for name in VARIANTS)
    # (a) is the recipe itself: same dirs, hashes and training configs as `llavakit recipe`
    assert (a.step_dir("align"), a.step_dir("instruct"), a.step_dir("eval")) == (out / "align", out / "instruct",
                                                                                abl / "align_instruct" / "eval")
    assert a.step_hash("align") == recipe.step_hash("align") and a.step_hash("instruct") == recipe.step_hash("instruct")
    assert a.train_config("instruct", out / "instruct") == recipe.train_config("instruct", out / "instruct")
    # the recipe's ground step belongs to (a) alone: its instruct goes on training ground's adapter
    assert a.steps == ["align", "ground", "instruct", "eval"] and a.step_dir("ground") == out / "ground"
    for v in (recipe, a, b):
        v.results["ground"] = StepResult("ground", out / "ground", "h", "id-ground", True, 0.0, {})
    assert a.step_hash("instruct") == recipe.step_hash("instruct")
    adapter = str(out / "ground" / "run" / "adapter")
    assert a.train_config("instruct", out / "instruct").lora.init_adapter == adapter
    assert recipe.train_config("instruct", out / "instruct").lora.init_adapter == adapter
    # ... on the mix with the grounding records replayed (instruct.replay_ground; written when it trains)
    assert a.train_config("instruct", out / "instruct").data.path == str(out / "instruct-data" / "mix.json")
    assert not (out / "instruct-data").exists()
    del b.results["ground"]
    # (b) no align step; stage 2 starts from init, on the instruction mix
    assert b.steps == ["instruct", "eval"]
    cb = b.train_config("instruct", b.step_dir("instruct"))
    assert (cb.init_from, cb.data.path, cb.out) == (str(out / "init"), str(out / "data" / "mix.json"),
                                                    str(abl / "instruct_only" / "instruct"))
    # (c) both stages on grey copies of the images, with a feature cache of their own
    assert c.steps == ["blank", "align", "instruct", "eval"]
    for stage in ("align", "instruct"):
        cc = c.train_config(stage, c.step_dir(stage))
        assert cc.data.image_folder == str(abl / "text_only" / "blank-images")
        assert cc.data.feature_cache == str(abl / "text_only" / "features") != str(out / "features")
        assert cc.out == str(abl / "text_only" / stage)
    assert c.step_hash("align") != recipe.step_hash("align")
    # (d) shares (a)'s align step; stage 2 trains on the captions
    assert d.step_dir("align") == out / "align" and d.step_hash("align") == a.step_hash("align")
    cd = d.train_config("instruct", d.step_dir("instruct"))
    assert (cd.data.path, cd.init_from, cd.stage) == (str(out / "data" / "captions.json"), str(out / "align"), "instruct")
    assert len({v.step_hash("instruct") for v in (a, b, c, d)}) == 4
    assert len({v.step_dir("instruct") for v in (a, b, c, d)}) == 4
    # instruct.replay_ground bears on (a) alone, the one variant with a ground step to replay
    other = json.loads(json.dumps(cfg))
    other["instruct"]["replay_ground"] = 0.5
    a2, b2, c2 = (wired(other, name, tmp_path) for name in ("align_instruct", "instruct_only", "text_only"))
    a2.results["ground"] = StepResult("ground", out / "ground", "h", "id-ground", True, 0.0, {})
    assert a2.step_hash("instruct") != a.step_hash("instruct")
    assert (b2.step_hash("instruct"), c2.step_hash("instruct")) == (b.step_hash("instruct"), c.step_hash("instruct"))


def test_blank_images_keep_names_and_lose_every_pixel(tmp_path):
    from PIL import Image

    cfg = tiny_recipe(tmp_path, tmp_path / "lm")
    world = Path(cfg["out"]) / "world" / "train" / "images"
    world.mkdir(parents=True)
    Image.new("RGB", (40, 24), (200, 10, 30)).save(world / "a.png")
    Image.new("RGB", (16, 64), (0, 90, 255)).save(world / "b.png")
    c = wired(cfg, "text_only", tmp_path)
    info = c.do_blank(c.step_dir("blank"))
    assert info["images"] == 2
    for name, side in (("a.png", 40), ("b.png", 64)):  # squares: no pad-to-square border shows the aspect ratio
        with Image.open(c.step_dir("blank") / name) as im:
            assert im.size == (side, side) and im.convert("RGB").getcolors() == [(side * side, GREY)]
    for f in world.iterdir():
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no training images"):
        c.do_blank(c.step_dir("blank"))


def test_blind_evaluation_sees_the_same_blank_images(tmp_path):
    """The text-only variant is evaluated (and the recipe's `blind` run) on the blanks it was trained on."""
    from types import SimpleNamespace

    from PIL import Image

    from llavakit.recipe.evaluate import blind_predict_fn

    paths = []
    for name, size in (("a.png", (40, 24)), ("b.png", (16, 64))):
        Image.new("RGB", size, (250, 0, 0)).save(tmp_path / name)
        paths.append(tmp_path / name)
    seen = []

    class Pipe:
        def generate(self, batch, max_new_tokens, temperature):
            seen.extend(im for images, _ in batch for im in images)
            return ["x"] * len(batch)

    items = [SimpleNamespace(images=(str(p),), prompt="<image>\nq", max_new_tokens=4) for p in paths]
    assert blind_predict_fn(Pipe())(items) == ["x", "x"]
    assert [im.size for im in seen] == [(40, 40), (64, 64)]
    assert all(im.getcolors() == [(im.size[0] ** 2, GREY)] for im in seen)


def test_variants_config_letters_names_and_errors():
    base = {"encoder": {"reuse": "x"}}
    assert load_recipe(data=base)["ablations"]["variants"] == list(VARIANTS)
    assert load_recipe(data=base, overrides=["ablations.variants=c,a"])["ablations"]["variants"] == ["text_only",
                                                                                                 "align_instruct"]
    assert load_recipe(data={**base, "ablations": {"variants": ["b", "caption_only"]}})["ablations"]["variants"] == [
        "instruct_only", "caption_only"]
    with pytest.raises(RecipeError, match="unknown variant 'e'"):
        load_recipe(data=base, overrides=["ablations.variants=a,e"])
    with pytest.raises(RecipeError, match="'text_only' is listed twice"):
        load_recipe(data=base, overrides=["ablations.variants=c,text_only"])
    with pytest.raises(RecipeError, match="ablations.out: expected a path"):
        load_recipe(data=base, overrides=["ablations.out=[1]"])
    with pytest.raises(RecipeError, match="unknown key 'ablations.bogus'"):
        load_recipe(data={**base, "ablations": {"bogus": 1}})


def test_ablations_cli_help_and_bad_variant(tmp_path, capsys):
    from llavakit.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["ablations", "--help"])
    assert exc.value.code == 0 and "usage: llavakit ablations" in capsys.readouterr().out
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"encoder": {"reuse": "x"}, "out": str(tmp_path / "run")}))
    assert main(["ablations", str(recipe), "--only", "a,z"]) == 1
    assert "unknown variant 'z'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- end to end (tiny models, trained for real)


@pytest.fixture(scope="module")
def ablation_run(tmp_path_factory):
    from llavakit.model.tiny import tiny_llama
    from llavakit.recipe.ablations import run_ablations

    tmp = tmp_path_factory.mktemp("ablations")
    cfg = tiny_recipe(tmp, tiny_llama(tmp / "lm"))
    cfg["package"]["out"] = None
    messages: list[str] = []
    doc = run_ablations(cfg, say=messages.append)
    return tmp, cfg, doc, messages


def train_config(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


@pytest.mark.slow
def test_shared_steps_run_once_and_variants_train_on_what_they_say(ablation_run):
    import numpy as np

    tmp, cfg, doc, messages = ablation_run
    out, abl = Path(cfg["out"]), Path(cfg["out"]) / "ablations"
    for step in ("world", "data", "encoder", "init", "align"):  # align: (a) and (d) share it
        assert sum(m == f"{step}: running -> {out / step}" for m in messages) == 1, messages
    # (a) the recipe's own align + instruct
    a = train_config(out / "instruct")
    assert (a["init_from"], a["data"]["path"]) == (str(out / "align"), str(out / "instruct-data" / "mix.json"))
    replayed = json.loads((out / "instruct-data" / "mix.json").read_text())  # the mix + the grounding records
    assert len(replayed) == len(json.loads((out / "data" / "mix.json").read_text())) + len(
        json.loads((out / "ground" / "questions.json").read_text()))
    # (b) no align dir; instruct from init
    assert not (abl / "instruct_only" / "align").exists()
    b = train_config(abl / "instruct_only" / "instruct")
    assert (b["init_from"], b["data"]["path"]) == (str(out / "init"), str(out / "data" / "mix.json"))
    # (c) grey images only: every cached feature row is the same (one grey input), unlike the real images'
    for stage in ("align", "instruct"):
        assert train_config(abl / "text_only" / stage)["data"]["image_folder"] == str(abl / "text_only" / "blank-images")
    meta = json.loads((abl / "text_only" / "features" / "meta.json").read_text())
    grey = np.memmap(abl / "text_only" / "features" / "features.bin", dtype=meta["dtype"], mode="r",
                     shape=(len(meta["images"]), *meta["shape"]))
    real_meta = json.loads((out / "features" / "meta.json").read_text())
    real = np.memmap(out / "features" / "features.bin", dtype=real_meta["dtype"], mode="r",
                     shape=(len(real_meta["images"]), *real_meta["shape"]))
    assert len(meta["images"]) == 24 and np.allclose(grey, grey[0:1]) and not np.allclose(real, real[0:1])
    # (d) stage 2 on the captions (one per image: 24 records), from the shared align
    d = train_config(abl / "caption_only" / "instruct")
    assert (d["init_from"], d["data"]["path"]) == (str(out / "align"), str(out / "data" / "captions.json"))
    records = {run: json.loads((run / "report.json").read_text())["records"]["train"]
               for run in (out / "instruct", abl / "caption_only" / "instruct")}
    assert records == {out / "instruct": len(replayed), abl / "caption_only" / "instruct": 24}
    assert records[out / "instruct"] != 24
    # every variant's eval answered the same benchmark; text_only's on grey images
    for name in VARIANTS:
        res = json.loads((abl / name / "eval" / "results.json").read_text())
        assert res["model_id"] == f"tiny/{name}" and res["num_questions"] == sum(doc["questions"].values()) > 0


@pytest.mark.slow
def test_table_is_written_with_a_column_per_variant_and_majority(ablation_run):
    tmp, cfg, doc, _ = ablation_run
    abl = Path(cfg["out"]) / "ablations"
    saved = json.loads((abl / "ablations.json").read_text())
    assert saved["columns"] == [*LABELS, "majority"] == doc["columns"]
    rows = saved["rows"]
    assert set(rows["short answers overall (%)"]) == set(saved["columns"])
    for task in ("color", "count", "existence"):
        assert set(rows[f"{task} (exact match %)"]) == set(saved["columns"])
    assert set(rows["POPE random F1"]) == set(LABELS) and set(rows["POPE random yes-ratio (%)"]) == set(LABELS)
    assert all(0.0 <= v <= 100.0 for row in rows.values() for v in row.values() if v is not None)
    md = (abl / "ablations.md").read_text()
    assert "| metric | " + " | ".join(saved["columns"]) + " |" in md and "| short answers overall (%) |" in md
    assert "- `majority`:" in md and "- `(c) text_only`:" in md


@pytest.mark.slow
def test_rerun_skips_everything_and_a_changed_variant_setting_redoes_only_it(ablation_run):
    from llavakit.recipe.ablations import run_ablations

    tmp, cfg, doc, _ = ablation_run
    messages: list[str] = []
    again = run_ablations(cfg, say=messages.append)
    assert not [m for m in messages if ": running ->" in m], messages
    assert again["rows"] == doc["rows"]
    changed = json.loads(json.dumps(cfg))
    changed["instruct"]["train"]["optim"]["lr"] = 1e-3
    changed["ablations"]["variants"] = ["instruct_only"]
    messages.clear()
    third = run_ablations(changed, say=messages.append)
    ran = [m.split(":")[0] for m in messages if ": running ->" in m]
    assert ran == ["instruct", "eval"] and third["columns"] == ["(b) instruct_only", "majority"]
    assert list((Path(cfg["out"]) / "ablations" / "instruct_only").glob("instruct.stale-*"))
