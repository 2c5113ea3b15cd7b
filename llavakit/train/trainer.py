"""The training loop: a plain, readable loop around accelerate's `Accelerator`.

Accelerate does everything distributed and numeric: device placement, DDP / FSDP / DeepSpeed
wrapping, gradient accumulation (`accumulate`, no gradient sync until the last micro-batch),
mixed-precision autocast, gradient clipping, and the checkpoint format (`save_state`).

Why not transformers' `Trainer`: what LLaVA training needs here — a batch plan that groups by
modality and length, is a pure function of (seed, epoch) and is cut per process (exact resume and
1-vs-N-process equivalence), a loss normalised over the target tokens of the whole global batch,
cached vision features fed through the model's own `mm_encoder_outputs`, bad records that are
named or counted, trainable-only checkpoints — would mean overriding its sampler, loss, collator,
evaluation and checkpointing. The loop below is shorter than those overrides, and every step of it
is visible.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llavakit.train import checkpoint as ckpt
from llavakit.train.config import TrainConfig
from llavakit.train.setup import Run, handle_failures, remainder_line, setup


# ---- steps ------------------------------------------------------------------------------------


def fetch(iterator, n: int) -> list:
    return [next(iterator) for _ in range(n)]


def check_batches(run: Run, batches: list, where: str) -> torch.Tensor:
    """Sum this step's counts over every process; bad records stop every process or are recorded."""
    from accelerate.utils import gather_object

    local = torch.tensor([sum(b.n_targets for b in batches), sum(len(b.failures) for b in batches),
                          sum(b.n_tokens for b in batches), sum(b.n_slots for b in batches)],
                         dtype=torch.long, device=run.accelerator.device)  # [4]
    total = run.accelerator.reduce(local, "sum") if run.world > 1 else local  # [4]
    if int(total[1]):
        failures = [f for b in batches for f in b.failures]
        everyone = gather_object(failures) if run.world > 1 else failures
        if run.cfg.data.on_bad_record == "error" and not failures:
            raise RuntimeError("another process hit a bad record (its error names it)")
        handle_failures(run.cfg, everyone, run.state, where)
    return total


def train_step(run: Run, batches: list) -> dict:
    """One optimizer step over this process's `accum` micro-batches."""
    acc, device = run.accelerator, run.accelerator.device
    targets, _, tokens, slots = check_batches(run, batches, "data.path").tolist()
    # sum over tokens / num_items, with num_items = all targets / (processes x micro-steps):
    # DDP averages over processes and accelerate divides by accumulation steps, which undo the factor.
    num_items = torch.tensor(max(targets, 1) / (run.world * run.accum), device=device)
    loss_sum, grad_norm = torch.zeros((), device=device), None
    for batch in batches:
        with acc.accumulate(run.module):
            loss = run.module(**batch.model_inputs(device), num_items=num_items)
            acc.backward(loss)
            loss_sum += loss.detach()
            if acc.sync_gradients:
                if run.cfg.optim.max_grad_norm > 0:
                    grad_norm = acc.clip_grad_norm_(run.module.parameters(), run.cfg.optim.max_grad_norm)
                run.optimizer.step()
                run.scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
    if run.world > 1:
        loss_sum = acc.reduce(loss_sum, "sum")
    return {"loss": float(loss_sum) / (run.world * run.accum), "tokens": tokens, "slots": slots, "targets": targets,
            "grad_norm": None if grad_norm is None else float(grad_norm)}


@dataclass
class EvalResult:
    loss: float
    """Mean target-token loss over the held-out split."""
    image_gain: float | None = None
    """Mean loss with other records' images minus with the right ones, over the targets of the
    micro-batches holding at least two images; None when there are none (or it is turned off)."""


def evaluate(run: Run) -> EvalResult | None:
    """Held-out loss (every process takes the same number of batches), and how much the images matter."""
    from llavakit.train.data import eval_micro_batches, make_loader

    if run.eval_index is None or len(run.eval_index) == 0:
        return None
    micro = run.cfg.eval.micro_batch_size or run.cfg.optim.micro_batch_size
    batches = eval_micro_batches(run.eval_index, micro, run.world, run.rank)
    per_rank = math.ceil(math.ceil(len(run.eval_index) / micro) / run.world)
    batches += [[] for _ in range(per_rank - len(batches))]  # empty batch: one pad token, keeps processes in step
    loader = make_loader(run.eval_source, batches, run.cfg.data.num_workers, run.loaded.tokenizer.pad_token_id)
    model = run.module  # through the wrapper: under ZeRO-3/FSDP forward gathers shards (same batch count everywhere)
    model.eval()
    one = torch.ones((), device=run.accelerator.device)
    # [loss sum, targets, loss sum where images were swapped, the same with swapped images, their targets]
    sums = torch.zeros(5, dtype=torch.float64, device=run.accelerator.device)
    with torch.no_grad():
        for batch in loader:
            check_batches(run, [batch], "eval")
            inputs = batch.model_inputs(run.accelerator.device)
            loss = model(**inputs, num_items=one).double()  # summed token loss
            n = float(batch.n_targets)
            swapped = _swap_images(inputs) if run.cfg.eval.image_gain else None
            seen = swapped is not None
            other = loss.new_zeros(())
            if run.cfg.eval.image_gain:  # every process runs the second forward too (ZeRO-3/FSDP gather in it)
                other = model(**(swapped if seen else inputs), num_items=one).double()
            zero = loss.new_zeros(())
            sums += torch.stack([loss, loss.new_tensor(n), loss if seen else zero, other if seen else zero,
                                 loss.new_tensor(n if seen else 0.0)])
    model.train()
    sums = run.accelerator.reduce(sums, "sum") if run.world > 1 else sums
    if not float(sums[1]):
        return None
    gain = float((sums[3] - sums[2]) / sums[4]) if float(sums[4]) else None
    return EvalResult(float(sums[0] / sums[1]), gain)


def _swap_images(inputs: dict) -> dict | None:
    """The same inputs with the images rolled by one (each image slot gets another image of the batch).

    Every image has the same number of tokens, so the token layout stays valid. None with < 2 images.
    """
    key = "pixel_values" if "pixel_values" in inputs else "image_features" if "image_features" in inputs else None
    if key is None or inputs[key].shape[0] < 2:
        return None
    return {**inputs, key: inputs[key].roll(1, dims=0)}  # [N, ...]


# ---- the loop ---------------------------------------------------------------------------------


def epoch_loader(run: Run, epoch: int, start: int):
    """This process's micro-batches of `epoch` from global batch `start` on, and how many global batches."""
    from llavakit.train.data import make_loader, plan_epoch, rank_micro_batches

    d, o = run.cfg.data, run.cfg.optim
    plan = plan_epoch(run.train_index, o.batch_size, run.cfg.runtime.seed, epoch, d.group_by_length, d.group_window)
    micro = [mb for batch in plan[start:] for mb in rank_micro_batches(batch, run.train_index, o.micro_batch_size, run.world, run.rank)]
    return make_loader(run.train_source, micro, d.num_workers, run.loaded.tokenizer.pad_token_id), len(plan)


def log_eval(run: Run) -> None:
    result = evaluate(run)
    if result is None:
        return
    loss = result.loss
    run.state.eval_loss = loss
    if run.state.first_eval_loss is None:
        run.state.first_eval_loss = loss
    record, line = {"step": run.state.step, "eval_loss": loss}, f"step {run.state.step}: eval loss {loss:.4f}"
    if result.image_gain is not None:
        record["image_gain"] = result.image_gain
        line += f", image gain {result.image_gain:+.4f} (loss with other records' images minus with the right ones)"
    run.metrics.log(record, "eval")
    run.progress.write(line)


def log_train(run: Run, window: list[dict], seconds: float) -> None:
    s = run.state
    lrs = run.scheduler.get_last_lr()
    names = [g.get("name", "") for g in run.optimizer.param_groups]
    record = {"step": s.step, "epoch": s.epoch + s.step_in_epoch / run.steps_per_epoch,
              "loss": sum(w["loss"] for w in window) / len(window), "lr": lrs[_group(names, "model")],
              "tokens_total": s.tokens, "tokens_per_s": sum(w["tokens"] for w in window) / max(seconds, 1e-9),
              "padding_fraction": 1 - sum(w["tokens"] for w in window) / max(sum(w["slots"] for w in window), 1)}
    for part in ("projector", "vision"):
        if any(n.startswith(part) for n in names):
            record[f"{part}_lr"] = lrs[_group(names, part)]
    if window[-1]["grad_norm"] is not None:
        record["grad_norm"] = window[-1]["grad_norm"]
    run.metrics.log(record, "train")
    run.progress.update(s.step, record["loss"], record["lr"], record["tokens_per_s"])


def _group(names: list[str], prefix: str) -> int:
    return next((i for i, n in enumerate(names) if n.startswith(prefix)), 0)


def save_checkpoint(run: Run) -> None:
    ckpt.save(run.accelerator, run.out / "checkpoints", run.state.step, asdict(run.state), run.cfg.to_yaml(),
              run.cfg.checkpoint.keep_last)


def after_step(run: Run, result: dict, window: list[dict], started: float) -> tuple[list[dict], float]:
    s, c = run.state, run.cfg
    s.step += 1
    s.step_in_epoch += 1
    s.tokens += result["tokens"]
    s.slots += result["slots"]
    s.epoch_tokens += result["tokens"]
    s.epoch_slots += result["slots"]
    s.last_loss = result["loss"]
    window.append(result)
    if s.step % c.log.every_steps == 0 or s.step == run.total_steps:
        log_train(run, window, time.perf_counter() - started)
        window, started = [], time.perf_counter()
    if c.eval.every_steps and s.step % c.eval.every_steps == 0 and s.step < run.total_steps:
        log_eval(run)
    if c.checkpoint.every_steps and s.step % c.checkpoint.every_steps == 0:
        save_checkpoint(run)
    if c.runtime.kill_after_step == s.step:
        os.kill(os.getpid(), signal.SIGKILL)
    return window, started


def end_epoch(run: Run) -> None:
    s = run.state
    fraction = 1 - s.epoch_tokens / max(s.epoch_slots, 1)
    s.padding.append({"epoch": s.epoch, "padding_fraction": fraction, "tokens": s.epoch_tokens, "slots": s.epoch_slots})
    run.metrics.log({"step": s.step, "epoch": s.epoch, "padding_fraction": fraction}, "epoch")
    run.progress.write(f"epoch {s.epoch}: padding fraction {fraction:.3f}")
    s.epoch, s.step_in_epoch, s.epoch_tokens, s.epoch_slots = s.epoch + 1, 0, 0, 0


def train_epochs(run: Run) -> None:
    s = run.state
    while s.step < run.total_steps:
        loader, n_batches = epoch_loader(run, s.epoch, s.step_in_epoch)
        iterator, window, started = iter(loader), [], time.perf_counter()
        while s.step_in_epoch < n_batches and s.step < run.total_steps:
            t0 = time.perf_counter()
            result = train_step(run, fetch(iterator, run.accum))
            s.train_seconds += time.perf_counter() - t0
            window, started = after_step(run, result, window, started)
        if s.step_in_epoch >= n_batches:
            end_epoch(run)
    if s.step_in_epoch:  # stopped by max_steps inside an epoch: report its padding so far
        s.padding.append({"epoch": s.epoch, "padding_fraction": 1 - s.epoch_tokens / max(s.epoch_slots, 1),
                          "tokens": s.epoch_tokens, "slots": s.epoch_slots, "partial": True})


def train(cfg: TrainConfig, *, resume: bool = False) -> Path:
    """Run one stage; returns the output dir."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return _train(cfg, resume)
    finally:
        release_accelerate_state()


def release_accelerate_state() -> None:
    """Forget accelerate's process-wide settings after a single-process run.

    accelerate keeps one `AcceleratorState` per process and refuses a second `Accelerator` with
    other settings (precision, compile); a later `train()` in the same process (dry runs, tests,
    notebooks) must start clean. Distributed processes run one stage and exit, and keep theirs.
    """
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if PartialState._shared_state and PartialState().num_processes > 1:
        return
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's own tests reset this way
    GradientState._reset_state()


def _train(cfg: TrainConfig, resume: bool) -> Path:
    from llavakit.train.export import export, write_report
    from llavakit.train.metrics import Metrics, Progress, plot_losses

    wall = time.perf_counter()
    run = setup(cfg, resume)
    if run.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "config.yaml").write_text(cfg.to_yaml())
        if cfg.data.truncate:
            print(run.truncation.line(), flush=True)
        if (remainder := remainder_line(run)) is not None:
            print(remainder, flush=True)
    resume_step = -1 if run.restarted else run.resumed_from  # -1: a restart keeps none of the stopped start's records
    run.metrics = Metrics(run.out, enabled=run.is_main, tensorboard=cfg.log.tensorboard, resume_step=resume_step)
    run.progress = Progress(run.total_steps, run.state.step, enabled=run.is_main and cfg.log.progress)
    if cfg.eval.at_start and run.state.step == 0:
        log_eval(run)
    train_epochs(run)
    log_eval(run)
    run.progress.close()
    run.metrics.close()
    export(run)
    if run.is_main:
        if cfg.log.plot:
            plot_losses(run.out / "metrics.jsonl", run.out / "loss.png", f"{cfg.stage}: {Path(cfg.data.path).name}")
        write_report(run, time.perf_counter() - wall)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return run.out
