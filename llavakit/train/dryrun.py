"""`llavakit train CONFIG --dry-run`: validate a recipe here, even a 7B one, on tiny stand-ins.

What is checked: the config itself (typed, validated on load), the DeepSpeed JSON it names, the
batch geometry for common process counts, the start model's config (if present; weights are
never read), the data file (every record parsed, if present). Then the recipe's own pipeline —
same stage, template, projector, feature layer/strategy, freezing, LoRA, param groups, schedule,
grouping, feature cache, checkpointing, export — runs for two steps on a tiny model built like
the real one (tiny CLIP/SigLIP + tiny Llama) and on the real records if they and their images are
here, else on synthetic stand-in records of the same stage.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

from llavakit.train.config import TrainConfig

STANDIN_RECORDS = 24


class Checks:
    """Collects ok/warn/fail lines; the exit code is 1 if anything failed."""

    def __init__(self):
        self.failed = 0

    def ok(self, text: str) -> None:
        print(f"  ok    {text}")

    def note(self, text: str) -> None:
        print(f"  note  {text}")

    def fail(self, text: str) -> None:
        self.failed += 1
        print(f"  FAIL  {text}")


def check_deepspeed(cfg: TrainConfig, checks: Checks) -> None:
    import importlib.util

    if not cfg.runtime.deepspeed:
        return
    try:
        ds = json.loads(Path(cfg.runtime.deepspeed).read_text())
    except json.JSONDecodeError as exc:
        checks.fail(f"runtime.deepspeed {cfg.runtime.deepspeed}: invalid JSON ({exc})")
        return
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage not in (0, 1, 2, 3):
        checks.fail(f"runtime.deepspeed: zero_optimization.stage must be 0-3, got {stage!r}")
    for key, want in (("train_micro_batch_size_per_gpu", cfg.optim.micro_batch_size), ("gradient_clipping", cfg.optim.max_grad_norm)):
        if ds.get(key, "auto") not in ("auto", want):
            checks.fail(f"runtime.deepspeed: {key} is {ds[key]}, the config says {want} (use \"auto\")")
    zero = ds.get("zero_optimization", {})
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        if zero.get(key) == "auto":
            checks.fail(f"runtime.deepspeed: zero_optimization.{key} must be a number (accelerate sizes 'auto' from "
                        "model.config.hidden_size, which a LLaVA config does not have at the top level)")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            checks.fail(f"runtime.deepspeed: remove '{section}' (llavakit builds AdamW and the transformers schedule itself)")
    installed = importlib.util.find_spec("deepspeed") is not None
    checks.ok(f"deepspeed config {cfg.runtime.deepspeed}: ZeRO stage {stage}"
              + ("" if installed else " (deepspeed is not installed here: the stand-in run uses plain accelerate)"))


def check_token_rows(cfg: TrainConfig, checks: Checks) -> None:
    """Setup refuses a LoRA run that trains added-token rows under ZeRO-3 (the stand-in runs without DeepSpeed):
    said here from the start model's tokenizer and config, if it is here (its weights are not read)."""
    from transformers import AutoConfig, AutoTokenizer

    from llavakit.train.config import ConfigError
    from llavakit.train.model import resolve_init, trained_token_ids
    from llavakit.train.setup import check_token_rows_sharding, zero_stage

    if not (cfg.lora.enabled and cfg.lora.train_new_tokens):
        return
    try:
        stage = zero_stage(cfg)
        if stage != 3:
            return
        path = resolve_init(cfg.init_from)
        ids = trained_token_ids(cfg, AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path))
        check_token_rows_sharding(ids, stage)
    except FileNotFoundError:
        checks.note(f"init_from {cfg.init_from} is not here: whether LoRA trains rows of tokens its template added "
                    "(refused under ZeRO-3) is checked when the run starts")
    except ConfigError as exc:
        checks.fail(str(exc))


def check_geometry(cfg: TrainConfig, checks: Checks) -> None:
    o = cfg.optim
    rows = [f"{w} proc -> {o.batch_size // (o.micro_batch_size * w)} accumulation step(s)"
            for w in (1, 2, 4, 8) if o.batch_size % (o.micro_batch_size * w) == 0]
    if not rows:
        checks.fail(f"optim.batch_size {o.batch_size} fits no process count in 1, 2, 4, 8 with micro_batch_size {o.micro_batch_size}")
        return
    checks.ok(f"global batch {o.batch_size}, micro-batch {o.micro_batch_size}: " + "; ".join(rows))


def start_model_config(cfg: TrainConfig, checks: Checks) -> dict | None:
    """The start model's config.json, if it is here (weights are not read)."""
    from llavakit.train.model import resolve_init

    try:
        path = resolve_init(cfg.init_from)
    except FileNotFoundError:
        checks.note(f"init_from {cfg.init_from} is not here yet: the stand-in uses llavakit defaults "
                    "(mlp2x_gelu, vicuna_v1, layer -2)")
        return None
    data = json.loads((path / "config.json").read_text())
    meta = data.get("llavakit", {})
    checks.ok(f"start model {path}: stage {meta.get('stage')}, template {meta.get('template', {}).get('name')}, "
              f"projector {meta.get('projector_type')}, {data.get('image_seq_length')} image tokens")
    return data


def check_records(cfg: TrainConfig, checks: Checks) -> list[dict] | None:
    """Parse every record of data.path if the file is here; returns usable records with local images."""
    from llavakit.data.records import RecordError, load_records, parse_record

    if not Path(cfg.data.path).is_file():
        checks.note(f"data.path {cfg.data.path} is not here: synthetic stand-in records of the {cfg.stage} stage are used")
        return None
    records = load_records(cfg.data.path)
    bad, usable = [], []
    for rec in records:
        try:
            conv = parse_record(rec)
        except RecordError as exc:
            bad.append(str(exc))
            continue
        if all((Path(cfg.data.image_folder) / i).is_file() for i in conv.images):
            usable.append(rec)
    with_images = sum(1 for r in records if isinstance(r, dict) and ("image" in r or r.get("images")))
    (checks.fail if bad else checks.ok)(f"data.path: {len(records)} records ({with_images} with images), "
                                        f"{len(bad)} malformed" + (f", e.g. {bad[0]}" if bad else ""))
    if len(usable) < STANDIN_RECORDS:
        checks.note(f"only {len(usable)} records have their images under {cfg.data.image_folder or '.'}: stand-in records are used")
        return None
    return usable[:STANDIN_RECORDS]


def standin_model(root: Path, model_config: dict | None, template: str) -> Path:
    """A tiny model built like the real one: same vision family, projector, template, feature selection."""
    from llavakit.model import tiny
    from llavakit.model.build import InitConfig, init_model

    vision = (model_config or {}).get("vision_config", {})
    meta = (model_config or {}).get("llavakit", {})
    size, patch = vision.get("image_size", 32), vision.get("patch_size", 8)
    make = tiny.tiny_siglip if vision.get("model_type", "clip").startswith("siglip") else tiny.tiny_clip
    layer = (model_config or {}).get("vision_feature_layer", -2)
    return init_model(InitConfig(
        vision=str(make(root / "vision", image_size=size, patch=patch)), lm=str(tiny.tiny_llama(root / "lm")),
        out=str(root / "model"), projector=meta.get("projector_type", "mlp2x_gelu"), template=template,
        vision_feature_layer=layer if isinstance(layer, int) else -2,
        select_strategy=(model_config or {}).get("vision_feature_select_strategy"),
        image_aspect_ratio=meta.get("image_aspect_ratio", "pad"),
    ))


def standin_data(root: Path, cfg: TrainConfig, real: list[dict] | None) -> tuple[Path, Path]:
    from llavakit.train.synthetic import write_dataset

    if real is not None:
        path = root / "records.json"
        path.write_text(json.dumps(real))
        return path, Path(cfg.data.image_folder)
    kind = "caption" if cfg.stage == "align" else "qa"
    extra = {} if kind == "caption" else {"text_only": 4, "multi_image": 2}
    return write_dataset(root / "data", STANDIN_RECORDS - sum(extra.values()), kind, **extra)


def standin_config(cfg: TrainConfig, root: Path, model: Path, data: tuple[Path, Path]) -> TrainConfig:
    """The recipe with tiny geometry and stand-in paths: what it trains and how is unchanged."""
    d = copy.deepcopy(cfg.to_dict())
    d.update(init_from=str(model), out=str(root / "out"))
    d["data"].update(path=str(data[0]), image_folder=str(data[1]), eval_path=None, num_workers=min(cfg.data.num_workers, 2),
                     eval_size=4 if (cfg.data.eval_path or cfg.data.eval_size) else 0)
    if cfg.data.feature_cache:
        d["data"]["feature_cache"] = str(root / "feature_cache")
    d["optim"].update(batch_size=4, micro_batch_size=2, max_steps=2)
    d["runtime"].update(deepspeed=None, kill_after_step=None,
                        mixed_precision="no" if cfg.runtime.mixed_precision == "auto" else cfg.runtime.mixed_precision)
    d["checkpoint"].update(every_steps=1, keep_last=1)
    d["eval"].update(every_steps=0)
    d["log"].update(progress=False)
    return TrainConfig.from_dict(d)


def run_standin(cfg: TrainConfig, checks: Checks, model_config: dict | None, real: list[dict] | None) -> None:
    from llavakit.model.io import load_model
    from llavakit.model.modeling import LlavakitMeta
    from llavakit.train.trainer import train

    with tempfile.TemporaryDirectory(prefix="llavakit-dry-run-") as tmp:
        root = Path(tmp)
        template = (model_config or {}).get("llavakit", {}).get("template", {}).get("name", "vicuna_v1")
        model = standin_model(root / "standin", model_config, template)
        small = standin_config(cfg, root, model, standin_data(root, cfg, real))
        out = train(small)
        report = json.loads((out / "report.json").read_text())
        loaded = load_model(out / "model")
        meta = LlavakitMeta.from_config(loaded.model.config)
        checks.ok(f"stand-in run: {report['steps']} steps, {report['tokens']} tokens, loss {report['final_loss']:.3f}, "
                  f"padding {report['padding_fraction_per_epoch'][-1]['padding_fraction']:.3f}")
        checks.ok(f"stand-in output: model/ loads (stage {meta.stage}, template {loaded.template.name}, "
                  f"trained with {meta.history[-1]['template']}); checkpoint, metrics, report written")
        summarize_groups(out)


def summarize_groups(out: Path) -> None:
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    o = cfg["optim"]
    print(f"  info  lr {o['lr']} (projector {o['projector_lr'] or o['lr']}), {o['scheduler']} schedule, "
          f"warmup {o['warmup_ratio']}, weight decay {o['weight_decay']}, train_lm {cfg['train_lm']}, "
          f"train_vision {cfg['train_vision']}, lora {cfg['lora']['enabled']}")


def dry_run(cfg: TrainConfig, resume: bool = False) -> int:
    print(f"dry run: stage {cfg.stage}, init_from {cfg.init_from}, out {cfg.out or '(unset)'}")
    checks = Checks()
    checks.ok("config: typed and validated")
    check_deepspeed(cfg, checks)
    check_token_rows(cfg, checks)
    check_geometry(cfg, checks)
    model_config = start_model_config(cfg, checks)
    real = check_records(cfg, checks)
    if resume:
        checks.note("--resume is ignored in a dry run")
    run_standin(cfg, checks, model_config, real)
    print("dry run: " + ("FAILED" if checks.failed else "ok"))
    return 1 if checks.failed else 0
