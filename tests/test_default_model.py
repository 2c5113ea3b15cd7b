"""The short name `default` (the shipped default model) and `--model` defaulting to it."""

from __future__ import annotations

import pytest

from llavakit import default_model
from llavakit.cli import main
from llavakit.infer.api import MODEL_REGISTRY, resolve_model


@pytest.fixture
def not_shipped(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "WEIGHTS", tmp_path / "weights")
    return tmp_path


def test_default_is_a_registered_short_name():
    assert MODEL_REGISTRY["default"] is default_model.path


def test_default_without_shipped_weights_names_the_recipe(not_shipped):
    with pytest.raises(FileNotFoundError, match=r"manifest\.json is missing.*llavakit recipe configs/default/recipe\.yaml"):
        resolve_model("default")


def test_chat_without_model_uses_default(not_shipped, tmp_path, capsys):
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    assert main(["chat", "--image", str(image), "what is it?"]) != 0
    assert "default model is not shipped" in capsys.readouterr().err


def test_the_shipped_default_model_is_intact_and_was_trained_by_the_repo_recipe():
    """The checkout ships the default model: every file matches its manifest, and the recipe recorded in the
    manifest trains what configs/default/recipe.yaml trains as it stands, with the same data generator versions (so
    `llavakit recipe` reproduces what ships; eval and package settings may change without retraining)."""
    import json
    from pathlib import Path

    from llavakit.model.package import verify_files
    from llavakit.recipe.config import load_recipe
    from llavakit.recipe.encoder import recipe_weight_settings, weight_settings
    from llavakit.recipe.package import code_versions

    assert default_model.available(), f"{default_model.WEIGHTS / 'manifest.json'} is missing"
    manifest = default_model.manifest()
    verify_files(default_model.WEIGHTS, manifest)
    recipe = json.loads(json.dumps(load_recipe(Path(__file__).parents[1] / default_model.RECIPE), default=str))
    shipped = json.loads(json.dumps(manifest["recipe"], default=str))
    for section in ("seed", "world", "encoder", "data", "init", "align", "ground", "instruct"):  # what decides weights
        assert recipe[section] == shipped[section], f"configs/default/recipe.yaml: {section} differs from the shipped model's"
    assert manifest.get("code") == code_versions(), "the data generators changed since the shipped model was trained"
    # defaults filled in on both sides: a setting added since (at the default that keeps the old behaviour) is no change
    assert weight_settings(manifest["encoder_settings"]) == recipe_weight_settings(recipe["encoder"]), (
        f"{recipe['encoder']['config']}: the stage-0 encoder settings changed since the shipped model was trained")
    rows = manifest["eval"]["rows"]
    assert {"full", "blind", "majority"} <= set(rows["short answers overall (%)"])  # the model card's columns
    assert manifest["size_bytes"] < 50e6


@pytest.mark.slow
def test_the_shipped_default_model_materialises_and_reads_colour(tmp_path, monkeypatch):
    """First use rebuilds the full model from the shipped parts + SmolLM2 (digest-checked) into the cache; asked
    the colour of a single generated object, it names the right one for most of 8 images (the model card's
    teacher-forced rate is 0.90 with the image, 0.06 with another one)."""
    import json

    from llavakit.infer.api import load_pipeline
    from llavakit.world.config import WorldConfig
    from llavakit.world.generate import generate_world

    monkeypatch.setenv("LLAVAKIT_CACHE", str(tmp_path / "cache"))
    options = dict(default_model.manifest()["recipe"]["world"]["options"])
    world = tmp_path / "world"
    generate_world(WorldConfig(out=str(world), num_images=8, seed=77, split="test", min_objects=1, max_objects=1,
                               **{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}))
    scenes = [json.loads(line) for line in (world / "scenes.jsonl").read_text().splitlines()]
    truth = [s["objects"][0]["color"] for s in scenes]
    pipe = load_pipeline(default_model.path(progress=None))
    prompt = "<image>\nWhat color is the shape?\nAnswer the question using a single word or phrase."
    answers = pipe.generate([(pipe.load_images([world / s["file_name"]]), prompt) for s in scenes], max_new_tokens=8)
    right = sum(a.strip().lower().rstrip(".") == t for a, t in zip(answers, truth))
    assert right >= 5, list(zip(answers, truth))
