"""Everything before the first step: processes, data index, model, accelerator, optimizer, resume.

`setup(cfg, resume)` returns a `Run`, the state the loop in `trainer.py` works on. Data is indexed
by the main process and broadcast; the accelerator is created once the data says whether some
micro-batches will leave parameters unused (text-only records never touch the projector).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch

from llavakit.train import checkpoint as ckpt
from llavakit.train.config import ConfigError, TrainConfig
from llavakit.train.data import Failure, Index, Source


# Keys that may differ between a run and its resumption.
RESUMABLE_CHANGES = ("out", "runtime.kill_after_step", "data.num_workers", "data.on_bad_record", "log",
                     "checkpoint.keep_last")
# Keys added since runs were saved: an older run's config.yaml lacks them, and the checkpoint's own parameters
# tell whether its resume fits (lora.train_new_tokens: checkpoint.mismatch_cause).
ADDED_KEYS = ("lora.train_new_tokens",)
# Truncated record ids named in report.json (the count is always exact).
TRUNCATED_IDS_SHOWN = 50


@dataclass
class RunState:
    """Everything about progress that is not in accelerate's state: saved as trainer_state.json."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    """Global batches of `epoch` already trained: the sampler position."""
    tokens: int = 0
    """Real (non-pad) tokens trained, all processes."""
    slots: int = 0
    """Token slots including padding, all processes."""
    epoch_tokens: int = 0
    epoch_slots: int = 0
    padding: list = field(default_factory=list)
    """[{epoch, padding_fraction, tokens, slots}] per finished epoch."""
    skipped: list = field(default_factory=list)
    """[{id, reason}] of bad records left out (data.on_bad_record: skip)."""
    train_seconds: float = 0.0
    last_loss: float | None = None
    eval_loss: float | None = None
    first_eval_loss: float | None = None
    data_fingerprint: str = ""
    processes: int = 0
    """Processes the run trains on (0: not recorded); a resume must use as many (the batch split depends on it)."""


@dataclass
class Truncation:
    """Records cut at data.max_length (data.truncate): counted and named, never silent."""

    enabled: bool
    max_length: int | None
    train: int = 0
    """Truncated records among the training records (after the eval split)."""
    eval: int = 0
    """Truncated records among the eval records."""
    ids: list[str] = field(default_factory=list)
    """The first TRUNCATED_IDS_SHOWN truncated ids, training records first."""

    @property
    def count(self) -> int:
        return self.train + self.eval

    def line(self) -> str:
        more = f", first {len(self.ids)} of them" if len(self.ids) < self.count else ""
        named = f" (ids{more}: {', '.join(self.ids)})" if self.ids else ""
        return (f"data.truncate: {self.count} record(s) cut at max_length {self.max_length} "
                f"({self.train} train, {self.eval} eval){named}")

    def to_dict(self) -> dict:
        return {"enabled": self.enabled, "max_length": self.max_length, "count": self.count,
                "train": self.train, "eval": self.eval, "ids": self.ids, "ids_shown_max": TRUNCATED_IDS_SHOWN}


def count_truncated(cfg: TrainConfig, train: tuple[Source, Index], held: tuple[Source | None, Index | None]) -> Truncation:
    from llavakit.train.data import truncated_ids

    ids = truncated_ids(*train) + (truncated_ids(*held) if held[1] is not None else [])
    return Truncation(cfg.data.truncate, cfg.data.max_length, len(train[1].truncated),
                      len(held[1].truncated) if held[1] is not None else 0, ids[:TRUNCATED_IDS_SHOWN])


@dataclass
class Run:
    """What one training run holds while it runs."""

    cfg: TrainConfig
    out: Path
    accelerator: object
    loaded: object
    train_source: Source
    eval_source: Source | None
    train_index: Index
    eval_index: Index | None
    module: object = None
    optimizer: object = None
    scheduler: object = None
    accum: int = 1
    steps_per_epoch: int = 0
    total_steps: int = 0
    state: RunState = field(default_factory=RunState)
    metrics: object = None
    progress: object = None
    resumed_from: int | None = None
    restarted: bool = False  # --resume found no checkpoint: starting in place from step 0
    truncation: Truncation | None = None

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


# ---- setup ------------------------------------------------------------------------------------


def check_out_dir(cfg: TrainConfig, resume: bool) -> tuple[Path, Path | None]:
    """The output dir, and with `resume` the checkpoint to restore (None: restart the run in place from step 0)."""
    if not cfg.out:
        raise ConfigError("out: no output dir (set `out:` in the config or pass --out)")
    out = Path(cfg.out)
    if not resume:
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"out: {out} exists and is not empty (use --resume to continue it, or a new --out)")
        return out, None
    if not (out / "config.yaml").is_file():
        raise FileNotFoundError(f"--resume: {out} holds no training run (no config.yaml)")
    check_same_config(cfg, out / "config.yaml")
    latest = ckpt.latest(out / "checkpoints")
    if latest is None and (out / "report.json").is_file():  # finished without checkpoints: a restart would redo it
        raise ConfigError(f"--resume: {out} is a finished run (report.json) with no checkpoint to continue from; "
                          "train into a new --out")
    return out, latest


def check_same_config(cfg: TrainConfig, saved_path: Path) -> None:
    import yaml

    saved = _flatten(yaml.safe_load(saved_path.read_text()))
    now = _flatten(cfg.to_dict())
    changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)
               and not any(k == p or k.startswith(p + ".") for p in RESUMABLE_CHANGES)
               and not (k in ADDED_KEYS and k not in saved)]
    if changed:
        raise ConfigError(f"--resume with a different config: {', '.join(changed)} changed since {saved_path}")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


DIST_TIMEOUT = timedelta(hours=2)
"""How long processes wait at a collective: the main process alone indexes the data and builds the feature
cache while the others wait (torch's default of 10 minutes is shorter than a 558k-image cache build)."""


def process_state():
    """accelerate's view of the processes (torchrun / accelerate launch), before the Accelerator exists."""
    from accelerate import PartialState

    # Without a GPU (or other accelerator) accelerate must be told so, else torchrun's processes
    # are not joined: then it runs DDP over gloo on CPU.
    cpu = not (hasattr(torch, "accelerator") and torch.accelerator.is_available()) and not torch.cuda.is_available()
    return PartialState(cpu=cpu, timeout=DIST_TIMEOUT), cpu  # the process group is made here, with its timeout


def make_accelerator(cfg: TrainConfig, cpu: bool, world: int, unused_params: bool):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    per_step = cfg.optim.micro_batch_size * world
    if cfg.optim.batch_size % per_step:
        raise ConfigError(f"optim.batch_size {cfg.optim.batch_size} is not a multiple of micro_batch_size "
                          f"{cfg.optim.micro_batch_size} x {world} process(es)")
    precision = cfg.runtime.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    kwargs = dict(
        cpu=cpu, mixed_precision=precision, gradient_accumulation_steps=cfg.optim.batch_size // per_step,
        # A micro-batch without images never touches the projector (or the vision tower).
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused_params)],
        step_scheduler_with_optimizer=False,
    )
    if cfg.runtime.deepspeed:
        from accelerate.utils import DeepSpeedPlugin

        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=cfg.runtime.deepspeed)
    if cfg.runtime.compile:
        kwargs["dynamo_backend"] = "inductor"
    return Accelerator(**kwargs)


def zero_stage(cfg: TrainConfig) -> int | None:
    """The DeepSpeed ZeRO stage of this run: from runtime.deepspeed, else from `accelerate launch`'s DeepSpeed
    settings (its config file, else its zero_stage, 2 by default as accelerate's); None without DeepSpeed."""
    import os

    path = cfg.runtime.deepspeed
    if not path:
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
            return None
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if not path or path == "none":
            return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))
    try:
        stage = json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage", 0)
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise ConfigError(f"DeepSpeed config {path}: not a readable JSON config ({exc})") from None
    return stage if isinstance(stage, int) else None


def check_token_rows_sharding(ids: list[int], stage: int | None) -> None:
    """peft's trainable tokens (the LoRA run's rows of added tokens, `ids`) are refused under ZeRO-3: the layer
    reads its base layer's weight outside that layer's forward, so ZeRO-3 may not have gathered it, and saving
    fails (peft issue #2946, KeyError on token_adapter.trainable_tokens_delta)."""
    if ids and stage == 3:
        raise ConfigError(f"lora.train_new_tokens: this LoRA run trains the rows of {len(ids)} token(s) `llavakit "
                          "init` added for the template (peft trainable tokens), which peft does not support under "
                          "DeepSpeed ZeRO-3 (it reads the sharded embedding outside its forward, and saving fails: "
                          "peft issue #2946); use ZeRO-2 (configs/deepspeed/zero2.json), or set "
                          "lora.train_new_tokens: false (those rows then keep their initial mean)")


def tune_cpu_malloc() -> bool:
    """glibc: never give freed memory back to the OS between steps (mallopt; ~25-35% faster small CPU steps)."""
    import ctypes
    import platform

    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def data_template(cfg: TrainConfig, loaded):
    from llavakit.data.templates import get_template

    return get_template(cfg.data.template) if cfg.data.template else loaded.template


def make_source(cfg: TrainConfig, loaded, path: str) -> Source:
    from llavakit.data.records import load_records
    from llavakit.data.render import RenderOptions

    opts = RenderOptions(loaded.image_seq_length, cfg.data.max_length, cfg.data.truncate)
    return Source(load_records(path), loaded.tokenizer, data_template(cfg, loaded), opts,
                  Path(cfg.data.image_folder), loaded.image_processor)


def index_everywhere(procs, source: Source, num_workers: int) -> Index:
    """The main process renders every record; the others receive its index."""
    from accelerate.utils import broadcast_object_list

    from llavakit.train.data import build_index

    box = [build_index(source, num_workers) if procs.is_main_process else None]
    if procs.num_processes > 1:
        broadcast_object_list(box)
    return box[0]


def handle_failures(cfg: TrainConfig, failures: list[Failure], state: RunState, where: str) -> None:
    """'error': raise naming the first bad record; 'skip': remember them all for the report."""
    from llavakit.data.records import RecordError

    if not failures:
        return
    odd = [f for f in failures if f.unexpected]
    if odd:  # not a kind of bad record the checks know: skipping it could hide a bug that hits every record
        raise RecordError(odd[0].id, f"unexpected error: {odd[0].reason} [{where}]")
    if cfg.data.on_bad_record == "error":
        more = f" (and {len(failures) - 1} more bad record(s); data.on_bad_record=skip leaves them out)" if len(failures) > 1 else ""
        raise RecordError(failures[0].id, f"{failures[0].reason} [{where}]{more}")
    seen = {(x["id"], x["where"]) for x in state.skipped}
    state.skipped += [{"id": f.id, "reason": f.reason, "where": where} for f in failures if (f.id, where) not in seen]


def fingerprint(index: Index) -> str:
    h = hashlib.sha256(json.dumps([index.positions, index.lengths]).encode())
    return h.hexdigest()[:16]


def build_data(cfg: TrainConfig, procs, loaded, state: RunState):
    from llavakit.train.data import split_eval

    train_source = make_source(cfg, loaded, cfg.data.path)
    index = index_everywhere(procs, train_source, cfg.data.num_workers)
    handle_failures(cfg, index.failures, state, "data.path")
    eval_source, eval_index = None, None
    if cfg.data.eval_path:
        eval_source = make_source(cfg, loaded, cfg.data.eval_path)
        eval_index = index_everywhere(procs, eval_source, cfg.data.num_workers)
        handle_failures(cfg, eval_index.failures, state, "data.eval_path")
    elif cfg.data.eval_size:
        index, eval_index = split_eval(index, cfg.data.eval_size, cfg.runtime.seed)
        eval_source = train_source
    return train_source, index, eval_source, eval_index


def attach_feature_cache(run: Run, llava) -> None:
    from llavakit.data.records import record_images
    from llavakit.train.features import open_or_build

    sources = [(run.train_source, run.train_index)] + ([(run.eval_source, run.eval_index)] if run.eval_index else [])
    images = sorted({name for src, idx in sources for p in idx.positions for name in record_images(src.records[p])})
    for part in (llava.model.vision_tower, llava.model.multi_modal_projector):  # encode on the GPU if there is one
        part.to(run.accelerator.device)
    store = open_or_build(
        run.cfg.data.feature_cache, llava, run.loaded.image_processor, images, Path(run.cfg.data.image_folder),
        dtype=run.cfg.data.feature_cache_dtype, batch_size=run.cfg.optim.micro_batch_size,
        num_workers=run.cfg.data.num_workers, is_main=run.is_main, barrier=run.accelerator.wait_for_everyone)
    for src, _ in sources:
        src.features = store


def build_optimizer(run: Run, model) -> None:
    from transformers import get_scheduler

    from llavakit.train.model import param_groups

    o = run.cfg.optim
    run.optimizer = torch.optim.AdamW(param_groups(model, o), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps)
    warmup = math.ceil(o.warmup_ratio * run.total_steps)
    run.scheduler = get_scheduler(o.scheduler, run.optimizer, num_warmup_steps=warmup, num_training_steps=run.total_steps)


def geometry(run: Run) -> None:
    o = run.cfg.optim
    run.accum = o.batch_size // (o.micro_batch_size * run.world)
    run.steps_per_epoch = len(run.train_index) // o.batch_size
    if run.steps_per_epoch == 0:
        raise ValueError(f"{run.cfg.data.path}: {len(run.train_index)} usable training records, fewer than one "
                         f"global batch (optim.batch_size {o.batch_size})")
    run.total_steps = run.steps_per_epoch * o.epochs
    if o.max_steps is not None:
        run.total_steps = min(run.total_steps, o.max_steps)


def remainder_line(run: Run) -> str | None:
    """What the incomplete last global batch of an epoch leaves out, said on screen (report.json records it too)."""
    o = run.cfg.optim
    left = len(run.train_index) - run.steps_per_epoch * o.batch_size
    if not left:
        return None
    which = ("never trained" if o.epochs == 1 else
             f"left out of each epoch (a different {left} each epoch: the order is reshuffled)")
    return (f"optim.batch_size {o.batch_size}: {len(run.train_index)} training records make {run.steps_per_epoch} "
            f"full global batch(es) per epoch; {left} record(s) are {which}")


def setup(cfg: TrainConfig, resume: bool) -> Run:
    """Everything up to the first step: data, model, accelerator, optimizer, and the resumed state."""
    from accelerate.utils import set_seed

    from llavakit.model.io import load_model
    from llavakit.train.model import TrainModule, prepare_model, resolve_init, trained_token_ids

    out, resume_from = check_out_dir(cfg, resume)  # decided once, before any process could write a checkpoint
    procs, cpu = process_state()
    if cfg.runtime.cpu_malloc_tuning and cpu:
        tune_cpu_malloc()
    set_seed(cfg.runtime.seed)
    loaded = load_model(resolve_init(cfg.init_from))
    check_token_rows_sharding(trained_token_ids(cfg, loaded.tokenizer, loaded.model.config), zero_stage(cfg))
    state = RunState(processes=procs.num_processes)
    train_source, train_index, eval_source, eval_index = build_data(cfg, procs, loaded, state)
    unused = cfg.data.on_bad_record == "skip" or not all(train_index.n_images)
    accelerator = make_accelerator(cfg, cpu, procs.num_processes, unused)
    run = Run(cfg, out, accelerator, loaded, train_source, eval_source, train_index, eval_index, state=state,
              truncation=count_truncated(cfg, (train_source, train_index), (eval_source, eval_index)))
    geometry(run)
    state.data_fingerprint = fingerprint(train_index)
    if cfg.data.feature_cache:
        attach_feature_cache(run, loaded.model)
    model = prepare_model(loaded.model, cfg, loaded.tokenizer)
    build_optimizer(run, model)
    sharded = accelerator.distributed_type.value in ("DEEPSPEED", "FSDP") and procs.num_processes > 1
    module = TrainModule(model, freeze_vision_mode=not cfg.train_vision,
                         every_rank_encodes=("features" if cfg.data.feature_cache else "pixels") if sharded else None)
    module.train()
    if accelerator.state.deepspeed_plugin is not None:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.optim.micro_batch_size
        ds["gradient_accumulation_steps"] = run.accum
        ds["gradient_clipping"] = cfg.optim.max_grad_norm
    run.module, run.optimizer = accelerator.prepare(module, run.optimizer)
    accelerator.register_for_checkpointing(run.scheduler)
    if accelerator.distributed_type.value not in ("DEEPSPEED", "FSDP"):
        ckpt.install_trainable_only(accelerator, run.module)
    if resume_from is not None:
        restore(run, resume_from)
    elif resume:
        restart(run)
    return run


def restart(run: Run) -> None:
    """--resume on a run stopped before its first checkpoint: start it again in place from step 0."""
    run.restarted = True
    if run.is_main:
        print(f"--resume: no complete checkpoint under {run.out / 'checkpoints'} yet; starting {run.out} from step 0",
              flush=True)
        if (run.out / "checkpoints").is_dir():
            ckpt.prune(run.out / "checkpoints", keep_last=1)  # no complete checkpoint: removes only cut-short temp dirs


def restore(run: Run, path: Path) -> None:
    saved = ckpt.read_state(path)
    if saved.get("processes") and saved["processes"] != run.accelerator.num_processes:
        raise ValueError(f"--resume: {path} was saved by a run on {saved['processes']} process(es), this one has "
                         f"{run.accelerator.num_processes}: resume on as many (how each global batch is split over "
                         "processes and accumulation steps depends on it)")
    run.accelerator.load_state(str(path))
    run.state = RunState(**{**saved, "processes": run.accelerator.num_processes})  # also for checkpoints before it was kept
    if run.state.data_fingerprint != fingerprint(run.train_index):
        raise ValueError(f"--resume: the training data changed since {path} (different usable records or lengths)")
    run.resumed_from = run.state.step
