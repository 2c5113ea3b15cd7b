"""The encoder step: reuse a finished stage-0 run whose recorded config matches, else train one.

A reused run must be complete (config.json, model.safetensors, train_config.json written last by
`llavakit train clip`) and its train_config.json must equal the recipe's encoder config (the
ClipTrainConfig from `encoder.config` + `encoder.overrides`), paths and run-only settings (threads, compile, logging, checkpointing, evaluation) aside. While another process
is still writing it (its command line names the directory), the step waits up to
`encoder.wait_hours` for it. Otherwise the recipe trains its own encoder into the step's dir, resuming an
interrupted one of the same settings from its checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from llavakit.recipe.config import RecipeError

POLL_SECONDS = 60


def encoder_worlds(recipe) -> tuple[Path, Path | None]:
    """(train world, val world) the recipe's own encoder trains on."""
    enc = recipe.cfg["encoder"]
    if enc["world"]:
        root = recipe.step_dir("encoder") / "world"
        return root / "train", (root / "val" if "val" in enc["world"] else None)
    return recipe.world_dir(enc["train_world"]), (recipe.world_dir(enc["val_world"]) if enc["val_world"] else None)


def wanted_config(recipe, out: Path | None = None):
    """The ClipTrainConfig the recipe asks for (with its own worlds and `out` filled in)."""
    from llavakit.train.clip import ClipTrainConfig
    from llavakit.train.clip_cli import load_yaml

    enc = recipe.cfg["encoder"]
    data = load_yaml(enc["config"]) if enc["config"] else {}
    data.update(enc["overrides"] or {})
    train, val = encoder_worlds(recipe)
    data.update({"world": str(train), "out": str(out or recipe.step_dir("encoder") / "clip"),
                 "val_world": str(val) if val else None})
    return ClipTrainConfig.from_dict(data)


def make_worlds(recipe) -> None:
    """Generate the encoder's own worlds (when `encoder.world` is set); an interrupted one is redone."""
    import shutil

    from llavakit.recipe.run import world_options
    from llavakit.world.config import WorldConfig
    from llavakit.world.generate import generate_world

    specs = recipe.cfg["encoder"]["world"] or {}
    train, val = encoder_worlds(recipe)
    for split, out in (("train", train), ("val", val)):
        if split not in specs or out is None:
            continue
        if out.exists():
            shutil.rmtree(out)
        spec = specs[split]
        own = {k: v for k, v in spec.items() if k not in ("num_images", "seed")}  # e.g. max_objects for stage 0
        options = world_options({**recipe.cfg["world"]["options"], **own})
        summary = generate_world(WorldConfig(out=str(out), num_images=int(spec["num_images"]), seed=int(spec["seed"]),
                                             split=split, **options))
        recipe.say(f"encoder world {split}: {summary.num_images} images in {summary.seconds:.0f} s")


def weight_settings(train_config: dict) -> dict:
    """The ClipTrainConfig settings that decide an encoder's weights (paths and run-only keys aside), defaults
    filled in: what the package manifest records and a checkout's `encoder.config` + `encoder.overrides` must match."""
    from llavakit.train.clip import PATH_KEYS, RUN_KEYS, ClipTrainConfig

    full = ClipTrainConfig.from_dict({"world": "-", "out": "-", **train_config}).to_dict()
    return {k: v for k, v in sorted(full.items()) if k not in PATH_KEYS + RUN_KEYS}


def recipe_weight_settings(enc: dict) -> dict:
    """weight_settings of what a recipe's `encoder` section asks for (its config file + overrides)."""
    from llavakit.train.clip_cli import load_yaml

    data = load_yaml(enc["config"]) if enc["config"] else {}
    return weight_settings({**data, **(enc["overrides"] or {})})


def complete(path: Path) -> bool:
    return all((path / f).is_file() for f in ("config.json", "model.safetensors", "train_config.json"))


def config_diff(path: Path, wanted) -> list[str]:
    """Keys (paths and run-only settings aside) where the run's recorded config differs from `wanted`."""
    recorded = weight_settings(json.loads((path / "train_config.json").read_text()))
    now = weight_settings(wanted.to_dict())
    return sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))


def writers(path: Path) -> list[int]:
    """PIDs of live processes whose command line names `path` (a run still writing it)."""
    target = str(path.resolve())
    rel = str(path)
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in args]
        if int(proc.name) != os.getpid() and any(a in (target, rel) or a.rstrip("/") in (target, rel) for a in text):
            pids.append(int(proc.name))
    return pids


def resolve_encoder(recipe, path: Path) -> dict:
    from llavakit.recipe.run import sha256_file

    enc = recipe.cfg["encoder"]
    reuse = Path(enc["reuse"]) if enc["reuse"] else None
    wanted = wanted_config(recipe) if (enc["config"] or enc["overrides"]) else None
    if reuse is not None:
        deadline = time.time() + float(enc["wait_hours"]) * 3600
        polls = 0
        while not complete(reuse) and writers(reuse) and time.time() < deadline:
            if polls % 10 == 0:  # every 10 minutes
                recipe.say(f"encoder: {reuse} is still being written (pid {', '.join(map(str, writers(reuse)))}); "
                           f"waiting (up to {enc['wait_hours']} h)")
            polls += 1
            time.sleep(POLL_SECONDS)
        if complete(reuse):
            diff = config_diff(reuse, wanted) if wanted is not None else []
            if not diff:
                recipe.say(f"encoder: reusing {reuse} (its recorded config matches)")
                return {"path": str(reuse.resolve()), "reused": True,
                        "train_config": json.loads((reuse / "train_config.json").read_text()),
                        "eval": _eval_summary(reuse), "identity": sha256_file(reuse / "model.safetensors")}
            recipe.say(f"encoder: {reuse} was trained with other settings ({', '.join(diff)}); training our own")
        else:
            recipe.say(f"encoder: {reuse} is incomplete and nothing is writing it; training our own")
    if wanted is None:
        raise RecipeError(f"encoder: {reuse} is not usable and encoder.config is not set (how to train one)")
    return train_own(recipe, path, wanted)


def train_own(recipe, path: Path, wanted) -> dict:
    import shutil

    from llavakit.recipe.run import sha256_file
    from llavakit.train.clip import train_clip

    out = Path(wanted.out)
    resume = resumable(recipe, out, wanted)
    if out.exists() and not resume:
        shutil.rmtree(out)  # stopped before its first checkpoint, or under other settings: start again
    make_worlds(recipe)  # seeded: a resumed run trains on the same scenes
    result = train_clip(wanted, say=recipe.say, resume=resume)
    return {"path": str(out.resolve()), "reused": False, "train_config": wanted.to_dict(), "steps": result.steps,
            "seconds": result.seconds, "eval": _eval_summary(out), "identity": sha256_file(out / "model.safetensors")}


def resumable(recipe, out: Path, wanted) -> bool:
    """Whether `out` (wanted.out) holds an interrupted run of `wanted` that can go on from its checkpoint."""
    from llavakit.train.clip import checkpoint_mismatch

    diff = checkpoint_mismatch(wanted)
    if diff is None:
        return False
    if diff:
        recipe.say(f"encoder: {out} holds an unfinished run with other settings ({', '.join(diff)}); starting again")
        return False
    recipe.say(f"encoder: resuming the unfinished run in {out}")
    return True


def _eval_summary(path: Path) -> dict | None:
    file = path / "eval.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except ValueError:
        return None
