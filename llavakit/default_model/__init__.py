"""The embedded default model: its shipped parts live in `weights/` (written by `llavakit recipe`'s package step).

    from llavakit.default_model import available, path
    path()   # the full HF-native model dir, materialised into the cache on first use

`path` is what the short name `default` resolves to (llavakit.infer.api.MODEL_REGISTRY).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
RECIPE = "configs/default/recipe.yaml"


def available() -> bool:
    """True when the shipped parts are here (manifest.json)."""
    return (WEIGHTS / "manifest.json").is_file()


def manifest() -> dict:
    """The shipped manifest (file digests, base LM, the recipe it was trained with, its measured scores)."""
    from llavakit.model.package import read_manifest

    if not available():
        raise FileNotFoundError(f"the default model is not shipped in this checkout ({WEIGHTS / 'manifest.json'} is missing)")
    return read_manifest(WEIGHTS)


def _stderr(msg: str) -> None:
    import sys

    print(f"default model: {msg}", file=sys.stderr, flush=True)


def path(progress: Callable[[str], None] | None = _stderr) -> Path:
    """The default model's full directory (built from the shipped parts + smollm2-135m on first use; progress on stderr)."""
    if not available():
        raise FileNotFoundError(
            f"the default model is not shipped in this checkout ({WEIGHTS / 'manifest.json'} is missing); "
            f"train and package it with `llavakit recipe {RECIPE}`")
    from llavakit.model.package import materialize

    return materialize(WEIGHTS, name="default", progress=progress)


def register(registry: dict) -> None:
    """Add the short name `default` to a model registry (a plain dict of name -> dir or function)."""
    registry.setdefault("default", path)
