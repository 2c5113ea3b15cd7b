"""The end of a stage: the HF-native model dir (LoRA merged), the optional adapter, report.json.

`model/` is written by `llavakit.model.io.save_model` (atomic), with the stage recorded in the
`llavakit` meta: `stage` set, and this stage's summary (config included) appended to `history`.
The chat template recorded in the model is never replaced by the template the data was rendered
with (`plain` for align); the history entry records the latter.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from llavakit.fsutil import swap_dir


def is_sharded(accelerator) -> bool:
    """Parameters are split over processes (ZeRO-3, FSDP): the full weights must be gathered to save."""
    kind = accelerator.distributed_type.value
    if kind == "FSDP":
        return True
    if kind == "DEEPSPEED":
        return int(accelerator.state.deepspeed_plugin.zero_stage) == 3
    return False


def trained_model(run):
    """The trained model (llava or peft) with full weights, on the main process (None elsewhere)."""
    acc = run.accelerator
    acc.wait_for_everyone()
    if not is_sharded(acc):
        return acc.unwrap_model(run.module).model if acc.is_main_process else None
    state = acc.get_state_dict(run.module)  # gathered on the main process; every process takes part
    return rebuild(run.cfg, run.loaded.path, state) if acc.is_main_process else None


def rebuild(cfg, init_dir: Path, state: dict):
    """A CPU copy of the trained model: the stage's start model, prepared the same way, with `state` loaded."""
    from llavakit.model.io import load_model
    from llavakit.train.model import prepare_model

    start = load_model(init_dir)
    model = prepare_model(start.model, cfg, start.tokenizer)
    prefix = "model."  # TrainModule.model
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        raise ValueError(f"gathered weights do not fit the model: missing {sorted(trainable & set(missing))[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    return model


def history_entry(run) -> dict:
    s, cfg = run.state, run.cfg
    return {
        "stage": cfg.stage, "template": run.train_source.template.name, "init_from": str(run.loaded.path),
        "data": cfg.data.path, "records": len(run.train_index), "steps": s.step, "tokens": s.tokens,
        "final_loss": s.last_loss, "eval_loss": s.eval_loss, "lora": cfg.lora.enabled,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": cfg.to_dict(),
    }


def export(run) -> None:
    """Write model/ (and adapter/) on the main process."""
    model = trained_model(run)
    if run.accelerator.is_main_process:
        write_model(run, model)
    run.accelerator.wait_for_everyone()


def write_model(run, model) -> Path:
    from llavakit.model.io import has_cls_token, save_model
    from llavakit.model.modeling import LlavakitMeta
    from llavakit.train.model import set_checkpointing

    if run.cfg.lora.enabled:
        if run.cfg.lora.save_adapter:
            _atomic_dir(run.out / "adapter", model.save_pretrained)
        model = model.merge_and_unload()
    meta = LlavakitMeta.from_config(model.config)
    meta.stage = run.cfg.stage
    meta.history = list(meta.history) + [history_entry(run)]
    model.config.llavakit = meta.to_dict()
    model.config.use_cache = True
    if run.cfg.runtime.gradient_checkpointing:
        set_checkpointing(model, False)
    loaded = run.loaded
    return save_model(model, loaded.tokenizer, loaded.image_processor, run.out / "model", has_cls=has_cls_token(model.config))


def _atomic_dir(out: Path, write) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write(str(tmp))
        swap_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_report(run, wall_seconds: float) -> Path:
    s = run.state
    report = {
        "stage": run.cfg.stage, "steps": s.step, "total_steps": run.total_steps, "epochs_completed": s.epoch,
        "tokens": s.tokens, "token_slots": s.slots, "train_seconds": s.train_seconds,
        "tokens_per_s": s.tokens / s.train_seconds if s.train_seconds else None, "wall_seconds": wall_seconds,
        "padding_fraction_per_epoch": s.padding, "final_loss": s.last_loss,
        "first_eval_loss": s.first_eval_loss, "eval_loss": s.eval_loss,
        "records": {"train": len(run.train_index), "eval": len(run.eval_index) if run.eval_index else 0,
                    "dropped_incomplete_batch_per_epoch": len(run.train_index) - run.steps_per_epoch * run.cfg.optim.batch_size},
        "skipped": {"count": len(s.skipped), "records": s.skipped},
        "processes": run.world, "accumulation_steps": run.accum, "mixed_precision": run.accelerator.mixed_precision, "resumed_from_step": run.resumed_from,
        "feature_cache": run.cfg.data.feature_cache,
        "truncated": run.truncation.to_dict() if run.truncation else None,
    }
    path = run.out / "report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
