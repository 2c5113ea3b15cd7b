"""The training config: typed dataclasses, loaded from YAML with `key.sub=value` overrides.

Every field is documented where it is declared. Validation happens in `__post_init__` only, so a
config that constructs is a config that can run. Unknown keys are an error naming the key; a value
of the wrong type is an error naming the key and the expected type. Stage-dependent defaults
(learning rate, template) are resolved here, and the resolved config is what gets saved into every
checkpoint and output dir.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("align", "instruct")
BAD_RECORD_MODES = ("error", "skip")
PRECISIONS = ("auto", "no", "bf16", "fp16")
CACHE_DTYPES = ("float32", "float16")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")

# LLaVA-1.5's learning rates: projector pretraining, full fine-tuning, LoRA fine-tuning.
DEFAULT_LR = {"align": 1e-3, "instruct": 2e-5, "instruct_lora": 2e-4}


class ConfigError(ValueError):
    """A config that cannot run; the message names the key."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class DataConfig:
    """Where the records and images are, and how they become batches."""

    path: str = ""
    """LLaVA JSON list or JSONL file of training records."""
    image_folder: str = ""
    """Image paths in records are relative to this directory."""
    template: str | None = None
    """Chat template used to render the data; None: `plain` for align, the model's own for instruct."""
    eval_path: str | None = None
    """Held-out records for eval loss; None: hold out `eval_size` records of `path`."""
    eval_size: int = 0
    """Records of `path` held out (seeded) for eval when `eval_path` is not set; 0: no eval."""
    max_length: int | None = 2048
    """Longest sequence in tokens (image tokens included); longer records are bad unless `truncate`."""
    truncate: bool = False
    """Cut over-long records at `max_length` instead of treating them as bad."""
    num_workers: int = 2
    """DataLoader worker processes: render records and decode images off the training process."""
    group_by_length: bool = True
    """Batch records of one modality (with/without images) and similar length together (less padding)."""
    group_window: int = 32
    """Length grouping sorts windows of this many global batches; larger: less padding, less randomness."""
    on_bad_record: str = "error"
    """'error': stop at the first bad record, naming it; 'skip': leave it out, count it, report it."""
    feature_cache: str | None = None
    """Dir of precomputed vision features (frozen encoder only); built if missing, refused if stale."""
    feature_cache_dtype: str = "float32"
    """Storage dtype of cached features: float32 (exact) or float16 (half the disk)."""

    def __post_init__(self) -> None:
        _check(bool(self.path), "data.path", "is required")
        _check(self.eval_size >= 0, "data.eval_size", f"must be >= 0, got {self.eval_size}")
        _check(self.max_length is None or self.max_length > 0, "data.max_length", "must be > 0 or null")
        _check(not self.truncate or self.max_length is not None, "data.truncate", "needs data.max_length")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.group_window >= 1, "data.group_window", "must be >= 1")
        _check(self.on_bad_record in BAD_RECORD_MODES, "data.on_bad_record", f"must be one of {BAD_RECORD_MODES}")
        _check(self.feature_cache_dtype in CACHE_DTYPES, "data.feature_cache_dtype", f"must be one of {CACHE_DTYPES}")
        if self.template is not None:
            from llavakit.data.templates import get_template

            try:
                get_template(self.template)
            except KeyError as exc:
                raise ConfigError(f"data.template: {exc.args[0]}") from None


@dataclass
class OptimConfig:
    """Optimizer, schedule and batch geometry."""

    epochs: int = 1
    max_steps: int | None = None
    """Stop after this many optimizer steps (the schedule is built for this many); None: all epochs."""
    batch_size: int = 128
    """Global batch: records per optimizer step over all processes and accumulation steps."""
    micro_batch_size: int = 16
    """Records per forward pass per process; accumulation = batch_size / (micro_batch_size x processes)."""
    lr: float | None = None
    """Peak learning rate; None: LLaVA's 1e-3 (align), 2e-5 (instruct), 2e-4 (instruct with LoRA)."""
    projector_lr: float | None = None
    """Projector learning rate (its own param group); None: `lr`. LLaVA-1.5 LoRA uses 2e-5."""
    vision_lr: float | None = None
    """Vision tower learning rate when `train_vision` is on (its own param group); None: `lr`.
    LLaVA-NeXT-style unfreezing uses a rate well below the LM's."""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices (never on biases and norms)."""
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    """transformers scheduler name: cosine, linear, constant, constant_with_warmup, ..."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0: no clipping."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "optim.epochs", "must be >= 1")
        _check(self.max_steps is None or self.max_steps >= 1, "optim.max_steps", "must be >= 1 or null")
        _check(self.micro_batch_size >= 1, "optim.micro_batch_size", "must be >= 1")
        _check(self.batch_size >= self.micro_batch_size and self.batch_size % self.micro_batch_size == 0,
               "optim.batch_size", f"must be a multiple of micro_batch_size {self.micro_batch_size}, got {self.batch_size}")
        for key in ("lr", "projector_lr", "vision_lr"):
            value = getattr(self, key)
            _check(value is None or value > 0, f"optim.{key}", f"must be > 0, got {value}")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(0 <= self.warmup_ratio < 1, "optim.warmup_ratio", "must be in [0, 1)")
        _check(self.scheduler in SCHEDULERS, "optim.scheduler", f"must be one of {SCHEDULERS}")
        _check(self.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0")


@dataclass
class LoraConfig:
    """LoRA on the language model (instruct stage), via peft."""

    enabled: bool = False
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list[str] | None = None
    """Module names (peft matching); None: every nn.Linear of the language model (LLaVA's choice)."""
    save_adapter: bool = False
    """Also write the adapter alone (adapter/) besides the merged model (model/)."""
    init_adapter: str | None = None
    """Go on training a saved adapter (a run's `adapter/` dir, or the run dir holding it) instead of a fresh
    one: a curriculum in several runs that still ships as one adapter. `init_from` must be the model that
    adapter was trained on (not its merged model); its r, alpha, dropout, target modules, saved modules and
    token rows must match this config."""
    train_new_tokens: bool = True
    """Also train the input-embedding and LM-head rows of the tokens `llavakit init` added for the template (e.g.
    chatml's `<|im_start|>`/`<|im_end|>` on a Llama), as peft trainable tokens; else they keep their initial mean
    row. false: no token rows, as llavakit did before it trained them: to go on training an adapter or resume a
    run from then, and under DeepSpeed ZeRO-3, where peft's trainable tokens are fragile (refused there)."""

    def __post_init__(self) -> None:
        _check(self.r >= 1, "lora.r", "must be >= 1")
        _check(self.alpha >= 1, "lora.alpha", "must be >= 1")
        _check(0 <= self.dropout < 1, "lora.dropout", "must be in [0, 1)")
        _check(self.target_modules is None or len(self.target_modules) > 0, "lora.target_modules", "empty list")


@dataclass
class RuntimeConfig:
    """Hardware, precision and distribution."""

    seed: int = 0
    mixed_precision: str = "auto"
    """auto: bf16 autocast on GPUs that support it, fp32 otherwise (fp32 is faster on CPU); no, bf16, fp16."""
    gradient_checkpointing: bool = False
    compile: bool = False
    """torch.compile the model. Batch lengths vary, so it recompiles often: worth it only for long
    GPU runs (on this project's CPU tests, 4 tiny steps took minutes)."""
    deepspeed: str | None = None
    """DeepSpeed JSON config (configs/deepspeed/); needs deepspeed installed. Or use `accelerate launch --config_file`."""
    cpu_malloc_tuning: bool = False
    """On CPU with glibc: keep freed memory in the heap between steps (mallopt M_MMAP_MAX=0, high
    M_TRIM_THRESHOLD). Reported 25-35% faster for some small-step workloads; on the throughput
    bench here it made no measurable difference, hence off by default."""
    kill_after_step: int | None = None
    """Testing aid: SIGKILL this process right after optimizer step N (a crash between steps)."""

    def __post_init__(self) -> None:
        _check(self.mixed_precision in PRECISIONS, "runtime.mixed_precision", f"must be one of {PRECISIONS}")
        _check(self.kill_after_step is None or self.kill_after_step >= 1, "runtime.kill_after_step", "must be >= 1")
        if self.deepspeed is not None:
            _check(Path(self.deepspeed).is_file(), "runtime.deepspeed", f"file not found: {self.deepspeed}")


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Write full training state every N optimizer steps; 0: only the final model."""
    keep_last: int = 2
    """Keep this many newest checkpoints."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
        _check(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Eval loss on the held-out split every N steps (and at the end); 0: only at the end."""
    at_start: bool = True
    """Also measure eval loss before the first step."""
    micro_batch_size: int | None = None
    """Records per eval forward pass; None: optim.micro_batch_size."""
    image_gain: bool = True
    """Also measure the held-out loss with every image swapped for another record's (rolled by one within
    each eval micro-batch): `image_gain` = that loss − the loss with the right images, on the same targets.
    It is how much the model uses its images; near 0 means it answers from the text alone."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, "eval.every_steps", "must be >= 0")
        _check(self.micro_batch_size is None or self.micro_batch_size >= 1, "eval.micro_batch_size", "must be >= 1")


@dataclass
class LogConfig:
    every_steps: int = 1
    """Write train metrics (JSONL, TensorBoard, progress bar) every N steps."""
    tensorboard: bool = True
    progress: bool = True
    plot: bool = True
    """Write loss.png at the end."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 1, "log.every_steps", "must be >= 1")


@dataclass
class TrainConfig:
    """One training stage."""

    stage: str
    """align: projector only, `plain` template. instruct: projector + language model (full or LoRA)."""
    init_from: str
    """A model dir (e.g. from `llavakit init`) or the previous stage's output dir (its model/ is used)."""
    data: DataConfig
    out: str = ""
    """Output dir of this stage (also `--out`)."""
    train_vision: bool = False
    """Also train the vision tower (frozen by default in both stages)."""
    train_lm: bool | None = None
    """Train the language model; None: no for align, yes for instruct."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        _check(self.stage in STAGES, "stage", f"must be one of {STAGES}, got {self.stage!r}")
        _check(bool(self.init_from), "init_from", "is required")
        if self.train_lm is None:
            self.train_lm = self.stage == "instruct"
        if self.data.template is None and self.stage == "align":
            self.data.template = "plain"
        _check(not (self.lora.enabled and self.stage == "align"), "lora.enabled", "LoRA is for the instruct stage")
        _check(not (self.lora.enabled and not self.train_lm), "lora.enabled", "LoRA trains the language model; train_lm is false")
        _check(not (self.lora.init_adapter and not self.lora.enabled), "lora.init_adapter", "needs lora.enabled")
        _check(not (self.data.feature_cache and self.train_vision), "data.feature_cache",
               "needs a frozen vision tower (train_vision is true)")
        if self.optim.lr is None:
            self.optim.lr = DEFAULT_LR["instruct_lora" if self.lora.enabled else self.stage]

    # ---- conversions -------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        return _build(cls, data, "")


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML config and apply `key.sub=value` overrides (values parsed as YAML)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, item)
    return TrainConfig.from_dict(data)


def apply_override(data: dict, item: str) -> None:
    """Set `a.b.c=value` in a nested dict (the key path is checked when the config is built)."""
    import yaml

    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node = child
    node[leaf] = yaml.safe_load(raw) if raw.strip() else None


# ---- typed construction ----------------------------------------------------------------------


def _build(cls, data: object, prefix: str):
    """Construct dataclass `cls` from a dict, checking keys and value types recursively."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"unknown key {prefix + str(unknown[0])!r}; known in {where}: {', '.join(fields)}")
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in data.items()}
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing key {prefix + missing[0]!r}")
    return cls(**kwargs)


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    return _scalar(tp, value, key)


def _scalar(tp, value, key: str):
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
            try:
                return float(value)
            except ValueError:
                pass
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected {_name(tp)}, got {value!r}")


def _name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
