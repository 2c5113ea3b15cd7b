"""The recipe's package step: ship the instruct run small (the parts: llavakit/model/package.py)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from llavakit.model.package import PackageError, materialize, package_id, write_package
from llavakit.recipe.encoder import weight_settings

__all__ = ["PackageError", "materialize", "package_model"]


def package_model(recipe, path: Path) -> dict:
    """The recipe's package step: write the parts, then rebuild them once to prove the round trip."""
    init_info = recipe.results["init"].info
    eval_dir = recipe.results["eval"].dir if "eval" in recipe.results else None
    summary = None
    if eval_dir is not None and (eval_dir / "summary.json").is_file():
        summary = json.loads((eval_dir / "summary.json").read_text())
    steps = {n: {"seconds": r.seconds, "info": _small(r.info)} for n, r in recipe.results.items()}
    extra = {"name": recipe.cfg["name"], "code": code_versions(), "eval": summary, "steps": steps,
             "encoder_settings": weight_settings(recipe.results["encoder"].info["train_config"])}
    manifest = write_package(recipe.results["instruct"].dir, path, base_lm=recipe.cfg["init"]["lm"],
                             base_lm_dir=Path(init_info["lm_dir"]), recipe=recipe.cfg, extra=extra)
    recipe.say(f"package: {path} ({manifest['size_bytes'] / 1e6:.1f} MB); checking the round trip")
    with tempfile.TemporaryDirectory(dir=recipe.out) as tmp:
        materialize(path, target=Path(tmp) / "roundtrip", base_lm_dir=Path(init_info["lm_dir"]), progress=recipe.say)
    return {"size_bytes": manifest["size_bytes"], "model_tensors_sha256": manifest["model_tensors_sha256"],
            "identity": package_id(manifest)}


def code_versions() -> dict[str, str]:
    """The data generators' rule versions: with the recipe file they decide the training data (a new version means
    the shipped weights are no longer what the recipe trains)."""
    from llavakit.datagen.grounding import GROUNDING_VERSION
    from llavakit.datagen.sceneqa import GENERATOR_VERSION

    return {"sceneqa": GENERATOR_VERSION, "grounding": GROUNDING_VERSION}


def _small(info: dict) -> dict:
    return {k: v for k, v in info.items() if k not in ("summary", "train_config")}
