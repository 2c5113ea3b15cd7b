"""The recipe end to end on a tiny scale, resume/skip, packaging round trip, demo CLI.

The end-to-end tests train tiny models for real (about 1-2 minutes on 2 cores): marked slow
(`make test-slow`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from llavakit.recipe.config import RecipeError, load_recipe


def plain_clip_batches() -> dict:
    """24 tiny images are too few for the encoder's grouped hard-negative batches (hard_batch_prob,
    llavakit/train/clip_hard.py): plain CLIP batches, where the encoder trainer has that option."""
    import dataclasses

    from llavakit.train.clip import ClipTrainConfig

    return {"hard_batch_prob": 0.0} if "hard_batch_prob" in {f.name for f in dataclasses.fields(ClipTrainConfig)} else {}


def tiny_recipe(tmp: Path, lm: Path) -> dict:
    small_train = {"optim": {"epochs": 1, "batch_size": 8, "micro_batch_size": 4, "max_steps": 3},
                   "data": {"num_workers": 0, "max_length": 2048}, "runtime": {"mixed_precision": "no"},
                   "checkpoint": {"every_steps": 2}, "eval": {"at_start": False},
                   "log": {"tensorboard": False, "plot": False, "progress": False}}
    instruct = {**small_train, "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "save_adapter": True}}
    return load_recipe(data={
        "name": "tiny", "out": str(tmp / "run"),
        "world": {"options": {"max_objects": 3}, "splits": {"train": {"num_images": 24, "seed": 0},
                                                             "val": {"num_images": 8, "seed": 1},
                                                             "test": {"num_images": 4, "seed": 2}}},
        "encoder": {"overrides": {"image_size": 32, "patch_size": 8, "vision_hidden": 32, "vision_layers": 2,
                                  "vision_heads": 2, "text_hidden": 32, "text_layers": 1, "text_heads": 2,
                                  "projection_dim": 16, "vocab_size": 600, "max_steps": 2, "batch_size": 8,
                                  "warmup_steps": 1, "compile": False, "evaluate": False, "eval_every": 0,
                                  "threads": 1, **plain_clip_batches()}},
        "data": {"vqa": {"core": {"questions_per_image": 3, "mc_per_image": 1, "types": ["color", "count", "exists"]}},
                 "mix": {"instruct": 0.25, "vqa.core": 1.0}, "phrasing": {"prob": 0.5}},
        "init": {"lm": str(lm), "template": "chatml"},
        "align": {"train": small_train}, "instruct": {"train": instruct, "replay_ground": 1.0},
        "ground": {"world": {"num_images": 16, "seed": 5, "max_objects": 1}, "train": {"optim": {"max_steps": 2}}},
        "eval": {"describe": False, "batch_size": 16, "ablations": ["blind", "paraphrased"]},
        "package": {"out": str(tmp / "package")},
    })


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    from llavakit.model.tiny import tiny_llama
    from llavakit.recipe.run import run_recipe

    tmp = tmp_path_factory.mktemp("recipe")
    lm = tiny_llama(tmp / "lm")
    cfg = tiny_recipe(tmp, lm)
    messages: list[str] = []
    results = run_recipe(cfg, say=messages.append)
    return tmp, cfg, results, messages


@pytest.mark.slow
def test_every_step_writes_its_outputs(recipe_run):
    tmp, cfg, results, _ = recipe_run
    out = Path(cfg["out"])
    assert list(results) == ["world", "data", "encoder", "init", "align", "ground", "instruct", "eval", "package"]
    assert all(not r.skipped for r in results.values())
    for split in ("train", "val", "test"):
        assert (out / "world" / split / "scenes.jsonl").is_file()
    for name in ("captions.json", "instruct.json", "vqa-core.json", "mix.json"):
        assert json.loads((out / "data" / name).read_text())
    assert (out / "encoder" / "clip" / "model.safetensors").is_file()
    assert (out / "init" / "config.json").is_file()
    for stage in ("align", "instruct"):
        report = json.loads((out / stage / "model" / ".." / "report.json").read_text())
        assert report["steps"] == 3
    assert (out / "instruct" / "adapter" / "adapter_config.json").is_file()
    # ground: single-object scenes, the fixed attribute questions, a LoRA run that instruct goes on training
    grounding = json.loads((out / "ground" / "questions.json").read_text())
    assert len(grounding) + results["ground"].info["left_out"] == 16 and len(grounding) >= 8
    assert grounding[0]["conversations"][0]["value"].startswith("<image>\nWhat color is the shape?")
    assert json.loads((out / "ground" / "run" / "report.json").read_text())["steps"] == 2
    instruct_cfg = yaml.safe_load((out / "instruct" / "config.yaml").read_text())
    assert instruct_cfg["lora"]["init_adapter"] == str(out / "ground" / "run" / "adapter")
    assert instruct_cfg["init_from"] == str(out / "align")
    # replay_ground 1.0: the mix plus every grounding record, their images found from the run's one image folder
    assert instruct_cfg["data"]["path"] == str(out / "instruct-data" / "mix.json")
    trained = json.loads((out / "instruct-data" / "mix.json").read_text())
    replayed = [r for r in trained if r["id"].startswith("ground-")]
    assert len(trained) == len(json.loads((out / "data" / "mix.json").read_text())) + len(grounding)
    assert sorted(r["id"] for r in replayed) == sorted(f"ground-{r['id']}" for r in grounding)
    folder = Path(instruct_cfg["data"]["image_folder"])
    assert all((folder / r["image"]).resolve() == (out / "ground" / "world" / "images" / Path(r["image"]).name).resolve()
               and (folder / r["image"]).is_file() for r in replayed)
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["runs"] == ["full", "blind", "paraphrased", "majority"]  # majority: the prior-to-beat column
    overall = summary["rows"]["short answers overall (%)"]
    assert set(overall) == {"full", "blind", "paraphrased", "majority"}
    assert 0.0 < overall["majority"] <= 100.0
    manifest = json.loads((tmp / "package" / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"vision.safetensors", "embeddings.safetensors", "adapter/adapter_config.json",
                                      "config.json"}
    assert "adapter/README.md" not in manifest["files"]  # peft's template card is not shipped
    modules = json.loads((tmp / "package" / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert modules == sorted(modules) and len(modules) > 1  # peft's set order would change on every package
    for r in results.values():
        marker = json.loads((r.dir / ".recipe-step.json").read_text())
        assert marker["hash"] == r.hash


@pytest.mark.slow
def test_rerun_skips_completed_steps_and_redoes_changed_ones(recipe_run):
    from llavakit.recipe.run import run_recipe

    tmp, cfg, results, _ = recipe_run
    messages: list[str] = []
    again = run_recipe(cfg, until="instruct", say=messages.append)
    assert all(r.skipped for r in again.values()), messages
    assert {n: r.id for n, r in again.items()} == {n: results[n].id for n in again}
    # a changed eval setting redoes eval only; the old output is kept aside
    changed = json.loads(json.dumps(cfg))
    changed["eval"]["ablations"] = ["blind"]
    third = run_recipe(changed, until="eval", say=messages.append)
    assert [n for n, r in third.items() if not r.skipped] == ["eval"]
    assert list(Path(cfg["out"]).glob("eval.stale-*"))


@pytest.mark.slow
def test_demo_asks_the_shipped_model_about_held_out_images_like_its_training_world(recipe_run, tmp_path, monkeypatch,
                                                                                   capsys):
    """`llavakit demo` with a shipped package: materialised into the cache, then questions and the benchmark on
    held-out images made with the recipe's world options (here max_objects 3, where the CLI default is 6)."""
    from llavakit import default_model
    from llavakit.recipe.demo import demo

    tmp, cfg, results, _ = recipe_run
    monkeypatch.setattr(default_model, "WEIGHTS", tmp / "package")
    monkeypatch.setenv("LLAVAKIT_CACHE", str(tmp_path / "cache"))
    assert demo(out=str(tmp_path / "demo"), images=1, bench_images=3) == 0
    out = capsys.readouterr().out
    assert "== default model: 1 held-out generated images" in out and "offline benchmark, default model" in out
    assert "short answers overall" in out and "PILOT" not in out
    assert "THE DEFAULT MODEL" in out and "benchmark when it was trained" in out  # its recipe's own table, labelled
    assert list((tmp_path / "cache" / "models").glob("default-*/model.safetensors"))
    worlds = sorted(p for p in (tmp_path / "demo").glob("world-test-*") if p.is_dir())
    assert len(worlds) == 2
    for world in worlds:
        assert json.loads((world / "world.json").read_text())["config"]["max_objects"] == 3


@pytest.mark.slow
def test_package_round_trip_gives_identical_logits(recipe_run, tmp_path):
    import torch

    from llavakit.model.io import load_model
    from llavakit.recipe.package import PackageError, materialize

    tmp, cfg, results, _ = recipe_run
    lm_dir = Path(results["init"].info["lm_dir"])
    target = materialize(tmp / "package", target=tmp_path / "built", base_lm_dir=lm_dir)
    assert materialize(tmp / "package", target=target, base_lm_dir=lm_dir) == target  # reused
    trained = load_model(Path(cfg["out"]) / "instruct" / "model")
    rebuilt = load_model(target)
    ids = torch.tensor([[1, 5, 9, 12, trained.model.config.image_token_id] + [7] * 3])
    ids = torch.cat([ids[:, :4], torch.full((1, trained.image_seq_length), trained.model.config.image_token_id),
                     ids[:, 5:]], dim=1)
    pixels = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        a = trained.model(input_ids=ids, pixel_values=pixels).logits
        b = rebuilt.model(input_ids=ids, pixel_values=pixels).logits
    assert torch.equal(a, b)
    # an altered shipped file is refused
    weights = tmp / "package" / "vision.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="vision.safetensors"):
        materialize(tmp / "package", target=tmp_path / "other", base_lm_dir=lm_dir)


def test_recipe_rejects_unknown_keys_and_shared_seeds():
    with pytest.raises(RecipeError, match="unknown key 'world.bogus'"):
        load_recipe(data={"world": {"bogus": 1}, "encoder": {"reuse": "x"}})
    with pytest.raises(RecipeError, match="own seed"):
        load_recipe(data={"encoder": {"reuse": "x"}, "world": {"splits": {"train": {"num_images": 2, "seed": 0},
                                                                           "test": {"num_images": 2, "seed": 0}}}})


@pytest.mark.parametrize("override, message", [
    ("data.vqa.core.questions_per_imag=5", "data.vqa.core.questions_per_imag: unknown"),
    ("data.vqa.core.mc_per_image=-1", "data.vqa.core.mc_per_image: expected an integer >= 0, got -1"),
    ("data.vqa.general=null", "data.vqa.general: expected a mapping"),
    ("eval.batch_size=abc", "eval.batch_size: expected an integer >= 1, got 'abc'"),
    ("eval.images=0", "eval.images: expected an integer >= 1, got 0"),
    ("eval.describe=maybe", "eval.describe: expected true or false"),
])
def test_recipe_values_are_checked_before_any_work_naming_the_key(override, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(Path(__file__).resolve().parents[1] / "configs" / "default" / "recipe.yaml", [override])


def test_eval_images_keeps_the_first_scenes(tmp_path):
    from llavakit.recipe.evaluate import build_benchmark
    from llavakit.world.config import WorldConfig
    from llavakit.world.generate import generate_world

    world = tmp_path / "w"
    generate_world(WorldConfig(out=str(world), num_images=5, seed=3, split="test"))
    whole = build_benchmark(world, tmp_path / "all.json", 0, 1, True)
    two = build_benchmark(world, tmp_path / "two.json", 0, 1, True, images=2)
    asked = {q["image"] for q in json.loads((tmp_path / "two.json").read_text())["questions"]}
    assert whole["scenes"] == 5 and two["scenes"] == 2 and len(asked) == 2
    assert sum(two["questions"].values()) < sum(whole["questions"].values())


def test_recipe_ground_step_settings_are_checked():
    lora = {"instruct": {"train": {"lora": {"enabled": True}}}}
    ground = {"world": {"num_images": 10, "seed": 7, "max_objects": 1}}
    assert load_recipe(data={"encoder": {"reuse": "x"}, **lora, "ground": ground})["ground"]["world"]["seed"] == 7
    for bad, match in (({"world": {"num_images": 10, "seed": 0}}, "ground.world.seed: must differ"),
                       ({"world": {"num_images": 0, "seed": 7}}, "ground.world: needs num_images"),
                       ({**ground, "attributes": ["size"]}, "ground.attributes .*'size'.*known are color, shape"),
                       ({**ground, "bogus": 1}, "unknown key 'ground.bogus'"),
                       ({"world": {**ground["world"], "max_objets": 1}}, "ground.world.max_objets: not a world setting")):
        with pytest.raises(RecipeError, match=match):
            load_recipe(data={"encoder": {"reuse": "x"}, **lora, "ground": bad})
    with pytest.raises(RecipeError, match="set instruct.train.lora.enabled"):
        load_recipe(data={"encoder": {"reuse": "x"}, "ground": ground})
    for bad, match in ((-1, "expected a mix ratio >= 0, got -1"), ("all", "expected a mix ratio >= 0, got 'all'"),
                       (True, "expected a mix ratio")):
        with pytest.raises(RecipeError, match=f"instruct.replay_ground: {match}"):
            load_recipe(data={"encoder": {"reuse": "x"}, "instruct": {**lora["instruct"], "replay_ground": bad},
                              "ground": ground})
    with pytest.raises(RecipeError, match="instruct.replay_ground: needs a ground step"):
        load_recipe(data={"encoder": {"reuse": "x"}, "instruct": {**lora["instruct"], "replay_ground": 0.5}})
    with pytest.raises(RecipeError, match="ground.train.lora.r: set it in instruct.train only"):
        load_recipe(data={"encoder": {"reuse": "x"}, **lora, "ground": {**ground, "train": {"lora": {"r": 8}}}})


def test_ground_step_needs_a_question_that_applies_and_until_names_a_step_that_runs(tmp_path):
    from llavakit.recipe.run import Recipe, StepResult

    lora = {"instruct": {"train": {"lora": {"enabled": True}}}}
    cfg = load_recipe(data={"out": str(tmp_path / "run"), "encoder": {"reuse": "x"}, **lora,
                            "ground": {"world": {"num_images": 3, "seed": 7, "min_objects": 2, "max_objects": 3}}})
    recipe = Recipe(cfg, say=lambda m: None)
    recipe.results["align"] = StepResult("align", tmp_path / "align", "h", "id", True, 0.0, {})
    with pytest.raises(RecipeError, match=r"ground: no question of ground.attributes \['color', 'shape'\] applies to any of the 3 scenes"):
        recipe.do_ground(tmp_path / "ground")
    plain = Recipe(load_recipe(data={"out": str(tmp_path / "other"), "encoder": {"reuse": "x"}}), say=lambda m: None)
    with pytest.raises(RecipeError, match="--until ground: this recipe has no ground step"):
        plain.run(until="ground")


def test_default_recipe_file_loads():
    root = Path(__file__).resolve().parents[1]
    for name in ("recipe.yaml", "pilot.yaml"):
        cfg = load_recipe(root / "configs" / "default" / name)
        assert cfg["init"]["lm"] == "smollm2-135m" and cfg["init"]["template"] == "tokenizer"


def test_demo_and_recipe_help(capsys):
    from llavakit.cli import main

    for cmd in ("demo", "recipe"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        assert f"usage: llavakit {cmd}" in capsys.readouterr().out


@pytest.mark.slow
def test_killed_recipe_resumes_training_from_its_checkpoint(tmp_path):
    """SIGKILL inside instruct training (after step 2, checkpoint at 2); the rerun resumes there and finishes."""
    import shutil
    import subprocess
    import sys

    import yaml

    from llavakit.model.tiny import tiny_llama

    cfg = tiny_recipe(tmp_path, tiny_llama(tmp_path / "lm"))
    cfg["eval"]["ablations"] = []
    cfg["package"]["out"] = None
    cfg["ground"]["train"]["runtime"] = {"kill_after_step": None}  # ground inherits instruct.train: not this
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "llavakit.cli", "recipe", str(recipe)]
    killed = subprocess.run(cmd + ["instruct.train.runtime.kill_after_step=2", "--until", "instruct"],
                            capture_output=True, text=True, timeout=900)
    assert killed.returncode != 0 and "instruct: running" in killed.stdout, killed.stderr[-2000:]
    out = Path(cfg["out"])
    assert (out / "instruct" / "checkpoints").is_dir() and not (out / "instruct" / ".recipe-step.json").exists()
    done = subprocess.run(cmd + ["--until", "instruct"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ground: done already" in done.stdout and "instruct: resuming from" in done.stdout
    report = json.loads((out / "instruct" / "report.json").read_text())
    assert report["resumed_from_step"] == 2 and report["steps"] == 3
    # an unfinished run (checkpoints, no marker or report) and a rerun with other instruct settings: moved aside
    (out / "instruct" / ".recipe-step.json").unlink()
    report_file = out / "instruct" / "report.json"
    report_file.unlink()
    changed = subprocess.run(cmd + ["instruct.train.optim.lr=3e-3", "--until", "instruct"], capture_output=True, text=True, timeout=900)
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert "holds an unfinished run with other settings" in changed.stdout and "optim.lr" in changed.stdout
    assert (out / "instruct.stale-unfinished" / "checkpoints").is_dir()
    report = json.loads(report_file.read_text())
    assert report["resumed_from_step"] is None and report["steps"] == 3
    assert yaml.safe_load((out / "instruct" / "config.yaml").read_text())["optim"]["lr"] == 3e-3
    # a run-only setting (kill_after_step, as logging or workers) is not in the hash: the finished step is kept
    lr = ["instruct.train.optim.lr=3e-3"]
    kept = subprocess.run(cmd + lr + ["instruct.train.runtime.kill_after_step=2", "--until", "instruct"],
                          capture_output=True, text=True, timeout=900)
    assert kept.returncode == 0 and "instruct: done already" in kept.stdout, kept.stdout[-2000:]
    # killed again (its output removed first); then ground changes (so instruct's inputs do, not its own settings):
    # not resumed either
    shutil.rmtree(out / "instruct")
    killed = subprocess.run(cmd + lr + ["instruct.train.runtime.kill_after_step=2", "--until", "instruct"],
                            capture_output=True, text=True, timeout=900)
    assert killed.returncode != 0 and (out / ".instruct.pending").is_file(), killed.stdout[-2000:]
    redone = subprocess.run(cmd + lr + ["ground.train.optim.lr=5e-3", "--until", "instruct"], capture_output=True, text=True, timeout=900)
    assert redone.returncode == 0, redone.stderr[-2000:]
    assert "ground: settings or inputs changed" in redone.stdout
    assert "instruct: " + str(out / "instruct") + " was left unfinished with other settings or inputs" in redone.stdout
    assert json.loads(report_file.read_text())["resumed_from_step"] is None and not (out / ".instruct.pending").exists()


def test_two_runs_of_one_recipe_never_overlap(tmp_path):
    from llavakit.recipe.run import Recipe

    cfg = load_recipe(data={"out": str(tmp_path / "run"), "encoder": {"reuse": "x"}})
    first = Recipe(cfg, say=lambda m: None)
    first.out.mkdir(parents=True)
    with first.lock():
        with pytest.raises(RecipeError, match="in use by another recipe run"):
            Recipe(cfg, say=lambda m: None).run()
    with Recipe(cfg, say=lambda m: None).lock():  # released
        pass


def test_encoder_world_splits_add_their_own_world_options(tmp_path):
    """encoder.world.<split> may set WorldConfig fields on top of world.options (the v3 stage-0 world has 1-2
    objects per training image while the LLaVA data's world has more)."""
    import json

    from llavakit.recipe.encoder import make_worlds
    from llavakit.recipe.run import Recipe

    cfg = load_recipe(data={
        "out": str(tmp_path / "run"),
        "world": {"options": {"width": 96, "height": 96, "min_objects": 2, "max_objects": 4,
                              "categories": ["circle", "star"]}},
        "encoder": {"reuse": "x", "world": {"train": {"num_images": 6, "seed": 0, "min_objects": 1, "max_objects": 1},
                                            "val": {"num_images": 4, "seed": 5}}},
    })
    make_worlds(Recipe(cfg, say=lambda _: None))
    root = tmp_path / "run" / "encoder" / "world"
    train = json.loads((root / "train" / "world.json").read_text())["config"]
    val = json.loads((root / "val" / "world.json").read_text())["config"]
    assert (train["min_objects"], train["max_objects"], train["width"], train["categories"]) == (1, 1, 96, ["circle", "star"])
    assert (val["min_objects"], val["max_objects"], val["width"]) == (2, 4, 96)


def test_step_hashes_follow_what_decides_the_outputs(tmp_path):
    """A step's hash holds its config file's content (not its path) and leaves run-only settings out, so changing
    logging, workers or checkpoint retention redoes nothing while an edited encoder config redoes the encoder."""
    import yaml

    from llavakit.recipe.run import Recipe, StepResult

    def hashes(cfg: dict) -> dict[str, str]:
        r = Recipe(cfg, say=lambda m: None)
        out = {}
        for name in ("world", "data", "encoder", "init", "align", "ground", "instruct"):
            out[name] = r.step_hash(name)
            r.results[name] = StepResult(name, r.step_dir(name), out[name], out[name], True, 0.0, {})
        return out

    clip = tmp_path / "clip.yaml"
    clip.write_text(yaml.safe_dump({"lr": 1e-3}))
    cfg = tiny_recipe(tmp_path, tmp_path / "lm")
    cfg["encoder"]["config"] = str(clip)
    base = hashes(cfg)
    run_only = json.loads(json.dumps(cfg))
    run_only["encoder"]["wait_hours"] = 3.0
    for stage in ("align", "instruct"):
        run_only[stage]["train"]["data"]["num_workers"] = 2
        run_only[stage]["train"]["log"]["progress"] = True
        run_only[stage]["train"]["checkpoint"]["keep_last"] = 5
    run_only["ground"]["train"]["data"] = {"on_bad_record": "error"}
    assert hashes(run_only) == base
    moved = tmp_path / "elsewhere.yaml"  # the same content under another path
    moved.write_text(clip.read_text())
    assert hashes({**cfg, "encoder": {**cfg["encoder"], "config": str(moved)}}) == base
    clip.write_text(yaml.safe_dump({"lr": 2e-3}))  # edited in place: the encoder and all after it are redone
    edited = hashes(cfg)
    assert edited["world"] == base["world"] and edited["data"] == base["data"]
    assert all(edited[n] != base[n] for n in ("encoder", "init", "align", "ground", "instruct"))
    lr = json.loads(json.dumps(cfg))
    lr["align"]["train"]["optim"]["lr"] = 5e-3  # a setting that decides the weights
    changed = hashes(lr)
    assert changed["init"] == edited["init"] and changed["align"] != edited["align"]
