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
