"""Training checkpoints: accelerate's full state, written atomically, the newest K kept.

`accelerator.save_state` writes model, optimizer, registered objects (the LR scheduler), the step
counter and every process's RNG states — under DeepSpeed and FSDP in their own sharded formats.
Around it this module adds: a temp dir renamed into place only when complete (a crash never
leaves a half checkpoint that looks whole), `trainer_state.json` (global step, sampler position,
counters) and `config.yaml`, pruning to the newest `keep_last`, and — outside DeepSpeed/FSDP —
saving only the trainable parameters (frozen ones are re-read from the stage's `init_from`).

Crash safety: every file of the temp dir is fsynced before `trainer_state.json` (written last,
itself fsynced) marks it complete, and the parent dir is fsynced after each rename, so neither a
killed process nor a power cut leaves a complete-looking checkpoint with missing or empty files.
Pruning renames a checkpoint out of the `step-N` namespace before deleting it, so a checkpoint
half-deleted by a crash never looks complete either.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

STATE_FILE = "trainer_state.json"
PREFIX = "step-"


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith(PREFIX) and d.name[len(PREFIX):].isdigit() and (d / STATE_FILE).is_file():
            found.append((int(d.name[len(PREFIX):]), d))
    return sorted(found)


def latest(root: Path) -> Path | None:
    found = checkpoints(root)
    return found[-1][1] if found else None


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE_FILE).read_text())


def save(accelerator, root: Path, step: int, state: dict, config_yaml: str, keep_last: int) -> Path:
    """Write checkpoint `step-N` under root (every process takes part)."""
    tmp, final = root / f".tmp-{PREFIX}{step}", root / f"{PREFIX}{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "config.yaml").write_text(config_yaml)
        _fsync_tree(tmp)
        _write_json(tmp / STATE_FILE, state)  # written last: its presence marks a complete checkpoint
        _replace_dir(tmp, final)
        _fsync_dir(root)
        prune(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def _write_json(path: Path, data: dict) -> None:
    part = path.with_suffix(".part")
    with open(part, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under root (accelerate writes without fsync)."""
    for d, _, files in os.walk(root):
        for name in files:
            fd = os.open(Path(d) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(d))


def _fsync_dir(path: Path) -> None:
    """Persist a directory's entries (files created or renamed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():  # re-saving a step after a resume: swap, then delete the old one
        old = dst.with_name(f".old-{dst.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
    else:
        os.replace(src, dst)


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and leftover temp dirs."""
    for _, d in checkpoints(root)[:-keep_last]:
        old = d.with_name(f".old-{d.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(d, old)  # atomic: from here on it is no longer a checkpoint, whatever is left of it
    for d in root.iterdir():
        if d.name.startswith((".tmp-", ".old-")) and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


def install_trainable_only(accelerator, module) -> None:
    """Checkpoints hold only the trainable parameters of `module` (the prepared model).

    Through accelerate's own save/load hooks; DeepSpeed and FSDP save their engines' state
    themselves and are left alone.
    """
    from safetensors.torch import load_file

    names = {n for n, p in module.named_parameters() if p.requires_grad}

    def on_save(models, weights, output_dir):
        for i, w in enumerate(weights):
            weights[i] = {k: v for k, v in w.items() if k in names}

    def on_load(models, input_dir):
        for i, m in enumerate(models):
            path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            state = load_file(str(path), device=str(accelerator.device))
            missing, unexpected = sorted(names - set(state)), sorted(set(state) - names)
            if missing or unexpected:
                raise ValueError(f"checkpoint {input_dir} does not match the trainable parameters of this run "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]}); "
                                 + mismatch_cause(missing, unexpected))
            m.load_state_dict(state, strict=False)
        models.clear()  # loaded here; accelerate must not load them again (strictly, as a full model)

    accelerator.register_save_state_pre_hook(on_save)
    accelerator.register_load_state_pre_hook(on_load)


TOKEN_ROWS = "trainable_tokens_delta"
"""peft's name for the trained rows of the tokens `llavakit init` added (a LoRA run with lora.train_new_tokens)."""


def mismatch_cause(missing: list[str], unexpected: list[str]) -> str:
    """The likely cause of a checkpoint whose parameters differ from this run's trainable ones."""
    if missing and not unexpected and all(TOKEN_ROWS in name for name in missing):
        return ("only the rows of the tokens `llavakit init` added are missing: the checkpoint is likely from an "
                "llavakit version before LoRA trained those rows; resume it with `lora.train_new_tokens: false` "
                "(no token rows, as then)")
    return "was the config changed?"
