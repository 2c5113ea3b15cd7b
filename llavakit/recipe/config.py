"""The recipe file: one YAML holding every stage's settings, checked against `DEFAULTS`.

Keys are those of `DEFAULTS` (unknown keys are an error naming the key). `align.train` and
`instruct.train` are `TrainConfig` dicts (llavakit/train/config.py) without `stage`, `init_from`,
`out`, `data.path`, `data.image_folder` and `data.feature_cache`, which the recipe sets.
Relative paths in the file are relative to the current directory (run from the repo root).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

DEFAULTS: dict[str, Any] = {
    "name": "default",
    "out": "runs/default",
    "seed": 0,
    "threads": None,  # torch intra-op threads (None: torch's choice)
    "world": {
        # options shared by every split (WorldConfig fields), e.g. backgrounds, text_prob, chart_prob
        "options": {},
        # split name -> {num_images, seed}; train/val/test seeds differ, so the held-out scenes are new
        "splits": {"train": {"num_images": 1000, "seed": 0}, "val": {"num_images": 100, "seed": 1},
                   "test": {"num_images": 100, "seed": 2}},
    },
    "encoder": {
        "reuse": None,  # an HF CLIP dir from `llavakit train clip`, used when its train_config.json matches
        "config": None,  # ClipTrainConfig YAML (configs/clip-world.yaml); the recorded config must match it
        "overrides": {},  # ClipTrainConfig keys on top of `config`
        "wait_hours": 0.0,  # a live process is writing `reuse`: wait this long for it before training our own
        "train_world": "train",  # world split the recipe's own encoder trains on (if it must train one)
        "val_world": "val",
        # its own worlds instead ({train: {num_images, seed, ...}, val: {...}}: world.options plus any WorldConfig
        # fields given in the split, e.g. max_objects); None: the above
        "world": None,
    },
    "data": {
        "captions": {"per_image": "one"},
        "instruct": {"kinds": ["conversation", "detail", "reasoning"]},
        # named VQA sources: {questions_per_image, mc_per_image, types (None: all)}
        "vqa": {"general": {"questions_per_image": 4, "mc_per_image": 1, "types": None}},
        # prob: fraction of short-answer/MC turns whose lead-in or format line is reworded;
        # position_options: fraction of position questions asked with the list of the nine cells
        "phrasing": {"prob": 0.3, "position_options": 0.0},
        # mix ratios per source (instruct, vqa.<name>); 1 = all records once
        "mix": {"instruct": 1.0, "vqa.general": 1.0},
    },
    "init": {"lm": "smollm2-135m", "projector": "mlp2x_gelu", "template": "tokenizer", "seed": 0},
    "align": {"train": {}},
    # a first LoRA run between align and instruct on grounding questions (llavakit/datagen/grounding.py: fixed
    # questions that only the image answers, of single- or few-object scenes); instruct goes on training its
    # adapter, so the model still ships as one adapter. world None: no ground step (instruct starts from align)
    "ground": {
        "world": None,  # {num_images, seed, ...}: world.options plus these WorldConfig fields (min/max_objects: 1)
        "attributes": ["color", "shape"],
        "train": {},  # TrainConfig keys over instruct.train (epochs, lr, ...); LoRA shape must stay instruct's
    },
    "instruct": {
        "train": {},
        # how much of the ground step's grounding records to mix into instruct's data (a `datagen mix` ratio:
        # 1.0 every record once, 0 none), so the mix does not wash out what ground taught (docs/default-model.md, E11)
        "replay_ground": 0.0,
    },
    "eval": {
        "split": "test",
        "seed": 0,
        "pope_per_image": 3,
        "images": None,  # only the first N test images (None: all)
        "describe": True,  # include the detailed-description (CHAIR) questions
        "batch_size": 8,
        "ablations": ["blind", "paraphrased"],
    },
    "package": {"out": None},  # where the shipped parts go (e.g. llavakit/default_model/weights); None: no packaging
    # `llavakit ablations`: the training variants trained and evaluated from this recipe (llavakit/recipe/ablations.py)
    "ablations": {
        "out": None,  # None: <out>/ablations
        "variants": ["align_instruct", "instruct_only", "text_only", "caption_only"],  # or their letters a, b, c, d
    },
}

ABLATION_VARIANTS = {"a": "align_instruct", "b": "instruct_only", "c": "text_only", "d": "caption_only"}
"""Letter (as in the paper-style table) -> name of each `llavakit ablations` variant."""

REPLACED = {("world", "splits"), ("data", "vqa"), ("data", "mix")}
"""Sections a recipe file replaces as a whole."""
OPEN = {("align", "train"), ("instruct", "train"), ("ground", "train"), ("world", "options"), ("encoder", "overrides")}
"""Sections whose keys are checked by the stage they go to (merged key by key)."""


class RecipeError(ValueError):
    """A recipe file that cannot run; the message names the key."""


def _deep_update(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def merge(base: dict, update: dict, path: tuple[str, ...] = ()) -> dict:
    """`update` over `base`, recursively; unknown keys of fixed sections are an error."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        where, sub = ".".join(path + (key,)), path + (key,)
        if key not in base:
            raise RecipeError(f"unknown key {where!r}; known: {', '.join(base)}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise RecipeError(f"{where}: expected a mapping, got {value!r}")
            if sub in REPLACED:
                out[key] = copy.deepcopy(value)
            elif sub in OPEN:
                out[key] = _deep_update(base[key], value)
            else:
                out[key] = merge(base[key], value, sub)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_key(data: dict, item: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to a nested dict: the trainer's own override rule."""
    from llavakit.train.config import ConfigError, apply_override

    try:
        apply_override(data, item)
    except ConfigError as exc:
        raise RecipeError(str(exc)) from None


def load_recipe(path: str | Path | None = None, overrides: list[str] = (), data: dict | None = None) -> dict:
    """The full recipe: DEFAULTS, then the file (or `data`), then `key=value` overrides."""
    import yaml

    user: dict = copy.deepcopy(data) if data is not None else {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"recipe not found: {file}")
        user = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        if not isinstance(user, dict):
            raise RecipeError(f"{file}: expected a mapping at the top level")
    for item in overrides:
        set_key(user, item)
    cfg = merge(DEFAULTS, user)
    cfg["ablations"]["variants"] = ablation_variants(cfg["ablations"]["variants"])
    check(cfg)
    return cfg


def ablation_variants(items: Any) -> list[str]:
    """Variant names from names or letters (a list, or a comma-separated string); an unknown one is an error."""
    if isinstance(items, str):
        items = [item.strip() for item in items.split(",") if item.strip()]
    if not isinstance(items, list) or not items:
        raise RecipeError(f"ablations.variants: expected a non-empty list of variants, got {items!r}")
    known = ", ".join(f"{letter} ({name})" for letter, name in ABLATION_VARIANTS.items())
    names = []
    for item in items:
        name = ABLATION_VARIANTS.get(str(item), str(item))
        if name not in ABLATION_VARIANTS.values():
            raise RecipeError(f"ablations.variants: unknown variant {item!r}; known: {known}")
        if name in names:
            raise RecipeError(f"ablations.variants: {name!r} is listed twice")
        names.append(name)
    return names


def check(cfg: dict) -> None:
    """Every recipe setting validated before any work, the culprit named (one function per section)."""
    _check_world(cfg)
    _check_ground(cfg)
    _check_replay(cfg)
    enc = cfg["encoder"]
    if not enc["reuse"] and not enc["config"] and not enc["overrides"]:
        raise RecipeError("encoder: set reuse (a trained CLIP dir) and/or config (how to train one)")
    _check_data(cfg)
    if cfg["ablations"]["out"] is not None and not isinstance(cfg["ablations"]["out"], str):
        raise RecipeError(f"ablations.out: expected a path, got {cfg['ablations']['out']!r}")
    _check_eval(cfg)


def _check_world(cfg: dict) -> None:
    splits = cfg["world"]["splits"]
    if "train" not in splits:
        raise RecipeError("world.splits: needs a 'train' split")
    if cfg["eval"]["split"] not in splits:
        raise RecipeError(f"eval.split {cfg['eval']['split']!r} is not one of world.splits ({', '.join(splits)})")
    for name, split in splits.items():
        if name not in ("train", "val", "test"):
            raise RecipeError(f"world.splits.{name}: split names are train, val, test")
        if not isinstance(split, dict) or int(split.get("num_images", 0)) < 1 or "seed" not in split:
            raise RecipeError(f"world.splits.{name}: needs num_images >= 1 and seed")
    seeds = [(s["seed"], n) for n, s in splits.items()]
    if len({s for s, _ in seeds}) != len(seeds):
        raise RecipeError("world.splits: every split needs its own seed (held-out scenes)")


def _check_ground(cfg: dict) -> None:
    ground, splits = cfg["ground"], cfg["world"]["splits"]
    if ground["world"] is None:
        return
    if not isinstance(ground["world"], dict) or int(ground["world"].get("num_images", 0)) < 1 or "seed" not in ground["world"]:
        raise RecipeError("ground.world: needs num_images >= 1 and seed (or null: no ground step)")
    if ground["world"]["seed"] in {s["seed"] for s in splits.values()}:
        raise RecipeError("ground.world.seed: must differ from every world.splits seed (other scenes)")
    import dataclasses

    from llavakit.world.config import WorldConfig

    known = {f.name for f in dataclasses.fields(WorldConfig)} - {"out", "split"}
    for key in ground["world"]:
        if key not in known:
            raise RecipeError(f"ground.world.{key}: not a world setting (known: {', '.join(sorted(known))})")
    from llavakit.datagen.grounding import ATTRIBUTES

    attrs = ground["attributes"]
    if not attrs or any(a not in ATTRIBUTES for a in attrs) or len(set(attrs)) != len(attrs):
        raise RecipeError(f"ground.attributes {attrs!r}: each at most once; known are {', '.join(ATTRIBUTES)}")
    if not cfg["instruct"]["train"].get("lora", {}).get("enabled"):
        raise RecipeError("ground: instruct goes on training the ground step's LoRA adapter; "
                          "set instruct.train.lora.enabled")
    # instruct loads ground's adapter, so its shape comes from instruct.train alone
    lora = ground["train"].get("lora") or {}
    shaping = [f"lora.{k}" for k in ("enabled", "r", "alpha", "dropout", "target_modules") if k in lora]
    shaping += ["train_vision"] if "train_vision" in ground["train"] else []
    if shaping:
        raise RecipeError(f"ground.train.{shaping[0]}: set it in instruct.train only "
                          "(instruct goes on training the ground step's adapter, which must have its shape)")


def _check_replay(cfg: dict) -> None:
    replay = cfg["instruct"]["replay_ground"]
    if isinstance(replay, bool) or not isinstance(replay, (int, float)) or not 0 <= replay < float("inf"):
        raise RecipeError(f"instruct.replay_ground: expected a mix ratio >= 0, got {replay!r}")
    if replay > 0 and cfg["ground"]["world"] is None:
        raise RecipeError("instruct.replay_ground: needs a ground step (ground.world) whose records it replays")


VQA_KEYS = {"questions_per_image": 0, "mc_per_image": 0}
"""data.vqa.<name> integer settings (>= the value given); `types` is the third key."""


def _check_data(cfg: dict) -> None:
    for name, spec in (cfg["data"]["vqa"] or {}).items():
        if not isinstance(spec, dict):
            raise RecipeError(f"data.vqa.{name}: expected a mapping of questions_per_image, mc_per_image, types; "
                              f"got {spec!r}")
        for key, value in spec.items():
            if key == "types":
                if value is not None and (not isinstance(value, list) or not all(isinstance(t, str) for t in value)):
                    raise RecipeError(f"data.vqa.{name}.types: expected a list of question types or null, got {value!r}")
            elif key not in VQA_KEYS:
                raise RecipeError(f"data.vqa.{name}.{key}: unknown (known: {', '.join([*VQA_KEYS, 'types'])})")
            else:
                _integer(value, f"data.vqa.{name}.{key}", VQA_KEYS[key])
    for source in cfg["data"]["mix"]:
        if source != "instruct" and not (source.startswith("vqa.") and source[4:] in cfg["data"]["vqa"]):
            raise RecipeError(f"data.mix.{source}: not a data source (instruct, or vqa.<name> of data.vqa)")


def _check_eval(cfg: dict) -> None:
    c = cfg["eval"]
    for key, least in (("seed", 0), ("pope_per_image", 1), ("batch_size", 1)):
        _integer(c[key], f"eval.{key}", least)
    if c["images"] is not None:
        _integer(c["images"], "eval.images", 1)
    if not isinstance(c["describe"], bool):
        raise RecipeError(f"eval.describe: expected true or false, got {c['describe']!r}")
    for ablation in c["ablations"]:
        if ablation not in ("blind", "paraphrased"):
            raise RecipeError(f"eval.ablations: unknown {ablation!r} (known: blind, paraphrased)")


def _integer(value: Any, key: str, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise RecipeError(f"{key}: expected an integer >= {least}, got {value!r}")


def digest(*parts: Any) -> str:
    """sha256 (16 hex) of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
