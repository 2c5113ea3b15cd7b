"""Run a recipe end to end, resumably: world -> data -> encoder -> init -> align -> [ground] -> instruct -> eval -> package.

Every step writes its outputs into its own directory and, last, a marker file
(`.recipe-step.json`) holding the step's hash: a digest of the step's settings (`Recipe.settings`:
config files by content, run-only settings such as logging, worker count or checkpoint retention
left out) and of the ids of the steps it reads. A step whose marker holds the current hash is
skipped; one whose marker holds another hash is moved aside (`<dir>.stale-<hash>`) and redone.
Training steps resume from their newest checkpoint and the evaluation from its answer files, but
only work started with the same hash: a resuming step records it in `.<dir>.pending` beside its
dir, and unfinished work under another hash, or a training run with another saved config, is
moved aside (`<dir>.stale-partial`, `<dir>.stale-unfinished`) and started afresh.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llavakit.model.package import sha256_file
from llavakit.recipe.config import RecipeError, _deep_update, digest

MARKER = ".recipe-step.json"
STEPS = ("world", "data", "encoder", "init", "align", "ground", "instruct", "eval", "package")
RESUMING = ("align", "ground", "instruct", "eval")
"""Steps that go on from unfinished work (training checkpoints, answer files)."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_marker(path: Path) -> dict | None:
    try:
        return json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_marker(path: Path, data: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (MARKER + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path / MARKER)


def move_aside(path: Path, old_hash: str) -> Path:
    dest = path.with_name(f"{path.name}.stale-{old_hash}")
    n = 1
    while dest.exists():
        dest = path.with_name(f"{path.name}.stale-{old_hash}-{n}")
        n += 1
    os.replace(path, dest)
    return dest


@dataclass
class StepResult:
    name: str
    dir: Path
    hash: str
    id: str
    skipped: bool
    seconds: float
    info: dict


class Recipe:
    """One recipe (a dict from `load_recipe`) and the directories of its steps."""

    def __init__(self, cfg: dict, say: Callable[[str], None] = log):
        self.cfg = cfg
        self.out = Path(cfg["out"])
        self.say = say
        self.results: dict[str, StepResult] = {}

    # ---- paths -------------------------------------------------------------------------------

    def world_dir(self, split: str) -> Path:
        return self.out / "world" / split

    @property
    def data_dir(self) -> Path:
        return self.out / "data"

    @property
    def features_dir(self) -> Path:
        return self.out / "features"

    def step_dir(self, name: str) -> Path:
        if name == "package":
            return Path(self.cfg["package"]["out"])
        return self.out / name

    # ---- the driver --------------------------------------------------------------------------

    def run(self, until: str | None = None) -> dict[str, StepResult]:
        if until is not None and until not in STEPS:
            raise RecipeError(f"unknown step {until!r}; steps: {', '.join(STEPS)}")
        if until == "ground" and not self.grounded:
            raise RecipeError("--until ground: this recipe has no ground step (ground.world is null)")
        if until == "package" and not self.cfg["package"]["out"]:
            raise RecipeError("--until package: this recipe has no package step (package.out is null)")
        self.out.mkdir(parents=True, exist_ok=True)
        with self.lock():
            return self._run(until)

    def lock(self):
        """An exclusive lock on the output dir: two runs of one recipe never train side by side."""
        import contextlib
        import fcntl

        @contextlib.contextmanager
        def held():
            with open(self.out / ".recipe.lock", "a+") as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    fh.seek(0)
                    raise RecipeError(f"{self.out} is in use by another recipe run (pid {fh.read().strip() or '?'}); "
                                      "wait for it or stop it first") from None
                fh.seek(0)
                fh.truncate()
                fh.write(str(os.getpid()))
                fh.flush()
                yield

        return held()

    def _run(self, until: str | None) -> dict[str, StepResult]:
        (self.out / "recipe.resolved.json").write_text(json.dumps(self.cfg, indent=2) + "\n", encoding="utf-8")
        if self.cfg["threads"]:
            import torch

            torch.set_num_threads(int(self.cfg["threads"]))
        for name in STEPS:
            if (name == "package" and not self.cfg["package"]["out"]) or (name == "ground" and not self.grounded):
                continue
            self.results[name] = self.step(name)
            if name == until:
                break
        self.write_state()
        return self.results

    @property
    def grounded(self) -> bool:
        """Whether the recipe has a ground step (a LoRA run on grounding questions before instruct)."""
        return self.cfg["ground"]["world"] is not None

    def upstream(self, name: str) -> list[str]:
        deps = {"world": [], "data": ["world"], "encoder": ["world"], "init": ["encoder"], "align": ["init", "data"],
                "ground": ["align"], "instruct": ["align", "data"] + ["ground"] * ("ground" in self.results),
                "eval": ["instruct", "world"], "package": ["instruct", "init", "eval"]}  # package: eval's table
        return [self.results[d].id for d in deps[name]]

    def settings(self, name: str) -> Any:
        """What decides step `name`'s outputs: its section of the recipe, with the encoder's config file read (its
        content counts, not its path) and run-only settings left out (a training step's RESUMABLE_CHANGES, the
        encoder's wait): changing those redoes nothing."""
        from llavakit.datagen.grounding import GROUNDING_VERSION
        from llavakit.datagen.sceneqa import GENERATOR_VERSION  # new generator rules: new data
        from llavakit.recipe.encoder import recipe_weight_settings

        cfg = self.cfg
        if name == "encoder":
            enc = {k: v for k, v in cfg["encoder"].items() if k not in ("config", "overrides", "wait_hours")}
            return [enc, recipe_weight_settings(cfg["encoder"])]
        if name == "align":
            return {**cfg["align"], "train": _fixed_train_settings(cfg["align"]["train"])}
        if name == "ground":
            return [{k: v for k, v in cfg["ground"].items() if k != "train"}, cfg["world"]["options"],
                    _fixed_train_settings(self.ground_train()), GROUNDING_VERSION]
        if name == "instruct":
            instruct = self.instruct_settings()
            return [_fixed_train_settings(instruct["train"]), {k: v for k, v in instruct.items() if k != "train"}]
        return {"world": cfg["world"], "data": [cfg["data"], cfg["seed"], GENERATOR_VERSION], "init": cfg["init"],
                "eval": cfg["eval"], "package": cfg["name"]}[name]

    def step_hash(self, name: str) -> str:
        return digest(name, self.settings(name), self.upstream(name))

    def step(self, name: str) -> StepResult:
        path, h = self.step_dir(name), self.step_hash(name)
        marker = read_marker(path)
        if marker and marker.get("hash") == h and not self.still_valid(name, marker):
            self.say(f"{name}: its outputs changed or went missing since it ran; redoing it")
        elif marker and marker.get("hash") == h:
            self.say(f"{name}: done already ({path}, {marker.get('seconds', 0):.0f} s when it ran); skipping")
            return StepResult(name, path, h, marker["id"], True, float(marker.get("seconds", 0)), marker.get("info", {}))
        if marker:
            moved = move_aside(path, marker.get("hash", "unknown"))
            self.say(f"{name}: settings or inputs changed since {path} was made; moved it to {moved}")
        self.say(f"{name}: running -> {path}")
        if name in RESUMING:
            self.guard_partial(name, path)
        t0 = time.perf_counter()
        info = getattr(self, f"do_{name}")(path) or {}
        seconds = time.perf_counter() - t0
        step_id = digest(h, info.get("identity")) if info.get("identity") else h
        write_marker(path, {"step": name, "hash": h, "id": step_id, "seconds": seconds,
                            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "info": info})
        pending_file(path).unlink(missing_ok=True)
        self.say(f"{name}: done in {seconds:.0f} s")
        return StepResult(name, path, h, step_id, False, seconds, info)

    def guard_partial(self, name: str, path: Path) -> None:
        """Move aside unfinished work of `name` started under another hash (run-only settings are not in it, so a
        resumed run may change those); record the current one."""
        pending, key = pending_file(path), self.step_hash(name)
        if path.exists() and pending.is_file() and pending.read_text(encoding="utf-8").strip() != key:
            moved = move_aside(path, "partial")
            self.say(f"{name}: {path} was left unfinished with other settings or inputs; moved it to {moved}")
        path.parent.mkdir(parents=True, exist_ok=True)
        pending.write_text(key + "\n", encoding="utf-8")

    def still_valid(self, name: str, marker: dict) -> bool:
        """Cheap checks that a finished step's outputs are still what it recorded."""
        info = marker.get("info", {})
        if name == "encoder":
            weights = Path(info.get("path", "")) / "model.safetensors"
            return weights.is_file() and sha256_file(weights) == info.get("identity")
        if name == "init":
            return (self.step_dir(name) / "model.safetensors").is_file()
        if name in ("align", "instruct"):
            return (self.step_dir(name) / "model" / "model.safetensors").is_file()
        if name == "ground":
            return (ground_adapter(self.step_dir(name)) / "adapter_config.json").is_file()
        if name == "package":
            return (self.step_dir(name) / "manifest.json").is_file()
        return True

    def write_state(self) -> None:
        state = {name: {"dir": str(r.dir), "hash": r.hash, "skipped": r.skipped, "seconds": r.seconds}
                 for name, r in self.results.items()}
        (self.out / "recipe-state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")

    # ---- steps -------------------------------------------------------------------------------

    def do_world(self, path: Path) -> dict:
        from llavakit.world.config import WorldConfig
        from llavakit.world.generate import generate_world

        info = {}
        for split, spec in self.cfg["world"]["splits"].items():
            out = self.world_dir(split)
            if out.exists():
                shutil.rmtree(out)  # an interrupted generation: redo it (it takes seconds)
            config = WorldConfig(out=str(out), num_images=int(spec["num_images"]), seed=int(spec["seed"]), split=split,
                                 **world_options(self.cfg["world"]["options"]))
            summary = generate_world(config)
            self.say(f"world {split}: {summary.num_images} images, {summary.num_objects} objects in {summary.seconds:.1f} s")
            info[split] = {"images": summary.num_images, "objects": summary.num_objects, "seconds": summary.seconds}
        return info

    def do_data(self, path: Path) -> dict:
        from llavakit.datagen.captions import generate_captions
        from llavakit.datagen.config import CaptionsConfig, InstructConfig, MixConfig, MixSource, SourceConfig, VQAConfig
        from llavakit.datagen.instruct import generate_instruct
        from llavakit.datagen.mix import mix_sources, read_records
        from llavakit.datagen.vqa import generate_vqa
        from llavakit.recipe.phrasing import vary_records

        d, seed = self.cfg["data"], int(self.cfg["seed"])
        world = self.world_dir("train")
        source = SourceConfig(annotations=world, images_dir=world / "images")
        path.mkdir(parents=True, exist_ok=True)
        info: dict[str, Any] = {}
        generate_captions(CaptionsConfig(source=source, out=path / "captions.json",
                                                  per_image=d["captions"]["per_image"], seed=seed))
        info["captions"] = _count(path / "captions.json")
        generate_instruct(InstructConfig(source=source, out=path / "instruct.json", cache_dir=path / "instruct.cache",
                                         kinds=tuple(d["instruct"]["kinds"]), seed=seed, progress=False))
        info["instruct"] = _count(path / "instruct.json")
        sources = [MixSource(path / "instruct.json", float(d["mix"].get("instruct", 0.0)))]
        for name, spec in d["vqa"].items():
            raw = path / f"vqa-{name}.raw.json"
            types = spec.get("types")
            generate_vqa(VQAConfig(source=source, out=raw, questions_per_image=int(spec.get("questions_per_image", 4)),
                                   mc_per_image=int(spec.get("mc_per_image", 1)),
                                   types=tuple(types) if types else None, seed=seed + _stable(name)))
            varied, changed = vary_records(read_records(raw), float(d["phrasing"]["prob"]), seed,
                                           float(d["phrasing"]["position_options"]))
            _write_json(path / f"vqa-{name}.json", varied)
            info[f"vqa.{name}"] = {"records": len(varied), "reworded_turns": changed}
            sources.append(MixSource(path / f"vqa-{name}.json", float(d["mix"].get(f"vqa.{name}", 0.0))))
        sources = [s for s in sources if s.ratio > 0]
        mix_sources(MixConfig(sources=sources, out=path / "mix.json", seed=seed))
        info["mix"] = _count(path / "mix.json")
        self.say(f"data: {info}")
        return info

    def do_encoder(self, path: Path) -> dict:
        from llavakit.recipe.encoder import resolve_encoder

        return resolve_encoder(self, path)

    def encoder_path(self) -> Path:
        return Path(self.results["encoder"].info["path"])

    def do_init(self, path: Path) -> dict:
        from llavakit.model.build import InitConfig, init_model

        c = self.cfg["init"]
        if path.exists():
            shutil.rmtree(path)
        init_model(InitConfig(vision=str(self.encoder_path()), lm=c["lm"], out=str(path), projector=c["projector"],
                              template=c["template"], seed=int(c["seed"])))
        from llavakit.model.hub import resolve_lm

        lm_dir = Path(resolve_lm(c["lm"]))
        weights = sorted(lm_dir.glob("*.safetensors"))
        return {"lm": c["lm"], "lm_dir": str(lm_dir), "lm_sha256": {w.name: sha256_file(w) for w in weights},
                "identity": sha256_file(path / "model.safetensors")}

    def train_config(self, stage: str, path: Path):
        from llavakit.train.config import TrainConfig

        init = self.results["init"].dir if stage == "align" else self.results["align"].dir
        data = self.stage_data(stage)
        # the feature cache holds frozen-tower outputs: a stage that trains the tower reads pixels instead
        cache = None if self.cfg[stage]["train"].get("train_vision") else str(self.features_dir)
        fixed = {"stage": stage, "init_from": str(init), "out": str(path),
                 "data": {"path": str(data), "image_folder": str(self.world_dir("train") / "images"),
                          "feature_cache": cache}}
        return TrainConfig.from_dict(_deep_update(self.cfg[stage]["train"], self.from_ground(stage, fixed)))

    def stage_data(self, stage: str) -> Path:
        """The data file of the recipe's data step that `stage` trains on."""
        return self.data_dir / ("captions.json" if stage == "align" else "mix.json")

    def instruct_settings(self) -> dict:
        """The instruct section as it bears on this run: replay_ground only when there is a ground step to replay
        (an ablation variant without one trains the same whatever its value)."""
        if self.replaying("instruct"):
            return self.cfg["instruct"]
        return {k: v for k, v in self.cfg["instruct"].items() if k != "replay_ground"}

    def replaying(self, stage: str) -> bool:
        """Whether `stage` trains on its data with the ground step's records mixed in (instruct.replay_ground)."""
        return stage == "instruct" and "ground" in self.results and float(self.cfg["instruct"]["replay_ground"]) > 0

    def from_ground(self, stage: str, fixed: dict) -> dict:
        """`fixed` (a stage's recipe-set train keys), for instruct after a ground step: going on from its adapter,
        on the replay mix (`write_replay_mix`, written by `train_stage`) when instruct.replay_ground is set."""
        if stage != "instruct" or "ground" not in self.results:
            return fixed
        fixed = {**fixed, "lora": {"init_adapter": str(ground_adapter(self.results["ground"].dir))}}
        if self.replaying(stage):
            fixed["data"] = {**fixed["data"], "path": str(replay_path(Path(fixed["out"])))}
        return fixed

    def ground_train(self) -> dict:
        """The ground step's train settings: instruct.train with ground.train over it."""
        return _deep_update(self.cfg["instruct"]["train"], self.cfg["ground"]["train"])

    def ground_config(self, path: Path):
        """The ground step's run: instruct.train with ground.train over it, on the grounding questions."""
        from llavakit.train.config import TrainConfig

        train = self.ground_train()
        fixed = {"stage": "instruct", "init_from": str(self.results["align"].dir), "out": str(path / "run"),
                 "data": {"path": str(path / "questions.json"), "image_folder": str(path / "world" / "images"),
                          "feature_cache": None if train.get("train_vision") else str(path / "features")},
                 "lora": {"save_adapter": True, "init_adapter": None}}
        return TrainConfig.from_dict(_deep_update(train, fixed))

    def train_stage(self, stage: str, path: Path) -> dict:
        cfg = self.train_config(stage, path)
        if self.replaying(stage):
            write_replay_mix(self.stage_data(stage), Path(cfg.data.image_folder), self.results["ground"].dir,
                             float(self.cfg["instruct"]["replay_ground"]), Path(cfg.data.path), int(self.cfg["seed"]))
        return self.train_run(stage, cfg, path)

    def train_run(self, stage: str, cfg, path: Path) -> dict:
        """Train `cfg` into `path` (its out), resuming from its newest checkpoint."""
        from llavakit.train import checkpoint as ckpt
        from llavakit.train.trainer import train

        resume = ckpt.latest(path / "checkpoints") is not None
        if resume and (why := self.other_settings(cfg, path)):
            moved = move_aside(path, "unfinished")
            self.say(f"{stage}: {path} holds an unfinished run with other settings ({why}); moved it to {moved}")
            resume = False
        if resume:
            self.say(f"{stage}: resuming from {ckpt.latest(path / 'checkpoints')}")
        elif path.exists():
            shutil.rmtree(path)  # stopped before its first checkpoint: start again
        train(cfg, resume=resume)
        report = json.loads((path / "report.json").read_text())
        return {"report": {k: report.get(k) for k in ("steps", "tokens", "train_seconds", "tokens_per_s", "final_loss",
                                                       "first_eval_loss", "eval_loss", "records", "resumed_from_step")},
                "identity": sha256_file(path / "model" / "model.safetensors")}

    @staticmethod
    def other_settings(cfg, path: Path) -> str | None:
        """Why the unfinished run in `path` cannot be resumed with `cfg` (the trainer's own check), or None."""
        from llavakit.train.config import ConfigError
        from llavakit.train.setup import check_same_config

        try:
            check_same_config(cfg, path / "config.yaml")
        except (ConfigError, OSError, ValueError, AttributeError, TypeError) as exc:  # also a torn or empty config.yaml
            return str(exc) or type(exc).__name__
        return None

    def do_align(self, path: Path) -> dict:
        return self.train_stage("align", path)

    def do_ground(self, path: Path) -> dict:
        from llavakit.datagen.grounding import grounding_records
        from llavakit.world.config import WorldConfig
        from llavakit.world.generate import generate_world

        g = self.cfg["ground"]
        world = path / "world"
        if world.exists():
            shutil.rmtree(world)  # an interrupted generation, or a resumed run's (same seed: the same scenes)
        # single-object scenes unless ground.world says otherwise (`color`/`shape` ask only of those)
        options = {**self.cfg["world"]["options"], "min_objects": 1, "max_objects": 1,
                   **{k: v for k, v in g["world"].items() if k not in ("num_images", "seed")}}
        generate_world(WorldConfig(out=str(world), num_images=int(g["world"]["num_images"]), seed=int(g["world"]["seed"]),
                                   split="train", **world_options(options)))
        records, left_out = grounding_records(world, tuple(g["attributes"]))
        if not records:
            raise RecipeError(f"ground: no question of ground.attributes {g['attributes']} applies to any of the "
                              f"{left_out} scenes of ground.world (color and shape ask of single-object scenes)")
        _write_json(path / "questions.json", records)
        self.say(f"ground: {len(records)} grounding records ({left_out} scene{'s' * (left_out != 1)} without a question left out)")
        info = self.train_run("ground", self.ground_config(path), path / "run")
        info["records"], info["left_out"] = len(records), left_out
        return info

    def do_instruct(self, path: Path) -> dict:
        return self.train_stage("instruct", path)

    def do_eval(self, path: Path) -> dict:
        from llavakit.recipe.evaluate import run_evaluation

        return run_evaluation(self, path)

    def do_package(self, path: Path) -> dict:
        from llavakit.recipe.package import package_model

        return package_model(self, path)


def ground_adapter(ground_dir: Path) -> Path:
    """The adapter the ground step's run wrote (instruct goes on training it)."""
    return ground_dir / "run" / "adapter"


def replay_path(out: Path) -> Path:
    """Where a training run into `out` finds its data with the grounding records mixed in (beside `out`, which
    a fresh start wipes)."""
    return out.with_name(out.name + "-data") / "mix.json"


def write_replay_mix(data: Path, image_folder: Path, ground_dir: Path, ratio: float, mix: Path, seed: int) -> None:
    """`data` with `ratio` of the ground step's records mixed in, written to `mix` (rewritten each time: the same
    inputs give the same file). Their image paths become relative to `image_folder`, the run's one image
    folder; ids gain a `ground-` prefix (the ground world's scene ids repeat the train split's)."""
    from llavakit.datagen.config import MixConfig, MixSource
    from llavakit.datagen.mix import mix_sources, read_records

    mix.parent.mkdir(parents=True, exist_ok=True)
    images = Path(os.path.relpath((ground_dir / "world" / "images").resolve(), image_folder.resolve()))  # symlinks
    records = [{**r, "id": f"ground-{r['id']}", "image": str(images / r["image"])}
               for r in read_records(ground_dir / "questions.json")]
    _write_json(mix.with_name("ground.json"), records)
    mix_sources(MixConfig(sources=[MixSource(data, 1.0), MixSource(mix.with_name("ground.json"), ratio)], out=mix,
                          seed=seed))


def pending_file(path: Path) -> Path:
    """Where a resuming step records the hash of its unfinished work (beside its dir, so never wiped with it)."""
    return path.with_name(f".{path.name}.pending")


def _fixed_train_settings(train: dict) -> dict:
    """A stage's train settings without those a resumed run may change (the trainer's RESUMABLE_CHANGES)."""
    from llavakit.train.setup import RESUMABLE_CHANGES

    out = json.loads(json.dumps(train))
    for key in RESUMABLE_CHANGES:
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def world_options(options: dict) -> dict:
    """Recipe world options as WorldConfig keyword arguments (YAML lists as tuples)."""
    out = {}
    for key, value in options.items():
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def _stable(name: str) -> int:
    return int(digest(name)[:6], 16)


def _count(path: Path) -> int:
    return len(json.loads(path.read_text(encoding="utf-8")))


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run_recipe(cfg: dict, until: str | None = None, say: Callable[[str], None] = log) -> dict[str, StepResult]:
    """Run (or resume) every step of `cfg`; returns the step results."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Recipe(cfg, say).run(until)


if __name__ == "__main__":  # python -m llavakit.recipe.run RECIPE.yaml
    from llavakit.recipe.config import load_recipe

    run_recipe(load_recipe(sys.argv[1], sys.argv[2:]))
