"""Stage 0: CLIP-loss pretraining of a small `CLIPModel` on the generated world (`llavakit train clip`).

The same code path a GPU user would take with openai/clip-vit-large-patch14-336, scaled down: a
transformers `CLIPModel` (vision + text tower), a real CLIP-format BPE tokenizer, the contrastive
loss from `CLIPModel(return_loss=True)`, AdamW with warmup and a cosine schedule. The output dir is
a standard HF CLIP checkpoint (config + safetensors + `CLIPImageProcessorPil` + `CLIPTokenizer`), so
`CLIPModel`, `CLIPVisionModel`, `AutoImageProcessor` and `llavakit init --vision DIR` load it as they
would load OpenAI's. Alongside: train_config.json, metrics.jsonl, loss.png and (with a val world)
eval.json from `clip_eval.evaluate`.

Resuming: every `checkpoint_every` steps `checkpoint/` under `out` holds what the loop needs to go on
(model, auxiliary heads, optimiser, schedule, random-number states, the rest of the epoch's batch order,
the losses so far); `train_clip(cfg, resume=True)` (`--resume`) continues from it and ends with the same
weights as a run that was never stopped. The finished run deletes it.

Augmentation: none on pixels, on purpose. Captions name colours, left/right and the 3x3 position
of objects, and count them, so flips, crops, colour jitter and shifts could each make a caption
false; the world is cheap to generate, so fresh images do the job augmentation would. The text
side is varied instead: each epoch draws one of the five captions of every image.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
LOSS_PNG = "loss.png"
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.pt"
PATH_KEYS = ("world", "out", "val_world")
RUN_KEYS = ("threads", "compile", "log_every", "eval_every", "val_images", "probe_fit_images", "probe_test_images",
            "probe_seed", "evaluate", "checkpoint_every")
"""Settings that do not change the trained weights: how fast the run went, what it logged, checkpointed and
evaluated. A resumed run may change them (and the recipe's encoder step ignores them when it compares runs)."""


PATCH_INITS = ("random", "pca", "luma")  # ClipTrainConfig.patch_init; pca, luma: llavakit/train/clip_init.py
LUMA_SHARE = 2 / 3  # patch_init luma: share of the patch embedding's outputs given outline filters (rest: colour)


class ClipConfigError(ValueError):
    """A `ClipTrainConfig` value or key is invalid; the message names it."""


@dataclass
class ClipTrainConfig:
    """Everything that determines a stage-0 encoder run. Defaults are the recipe of configs/clip-world.yaml."""

    world: str = ""
    """Training world directory (from `llavakit world --split train`)."""
    out: str = ""
    """Output directory: the HF CLIP checkpoint and the run's logs (must be empty or absent)."""
    val_world: str | None = None
    """Held-out world directory (val split): validation loss during training, recall and probe worlds after."""
    # model
    image_size: int = 112
    """Input side in pixels (images are padded to a square and resized, as LLaVA's `pad` mode does)."""
    patch_size: int = 14
    """ViT patch side; LLaVA's image_seq_length is (image_size / patch_size) ** 2."""
    vision_hidden: int = 192
    """Vision transformer width."""
    vision_layers: int = 6
    """Vision transformer depth (LLaVA reads layer -2)."""
    vision_heads: int = 3
    """Vision attention heads (must divide vision_hidden)."""
    text_hidden: int = 128
    """Text transformer width."""
    text_layers: int = 3
    """Text transformer depth."""
    text_heads: int = 2
    """Text attention heads (must divide text_hidden)."""
    mlp_ratio: int = 4
    """MLP width / hidden width in both towers."""
    projection_dim: int = 128
    """Width of the shared image-text embedding space."""
    patch_init: str = "random"
    """Vision patch embedding at the start: `random` (transformers' init), `pca` (whitened principal
    components of the training patches) or `luma` (two thirds of the outputs: colour-blind outline filters,
    whitened components of the patches' channel mean (≈ luminance) applied alike to R, G and B; the rest
    random). Both in llavakit/train/clip_init.py."""
    # tokenizer
    vocab_size: int = 1024
    """Upper bound on the BPE vocabulary (512 byte symbols + merges + 2 specials); training stops early when
    every caption word is one token."""
    max_text_len: int = 77
    """Longest tokenised caption (CLIP's 77); longer captions are truncated."""
    # optimisation
    epochs: int = 5
    """Passes over the training world (one random caption of five per image per pass)."""
    max_steps: int | None = None
    """Stop after this many steps instead (the cosine schedule spans them)."""
    batch_size: int = 64
    """Image-caption pairs per step (the contrastive negatives); the last partial batch of an epoch is dropped."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    min_lr_ratio: float = 0.05
    """Final learning rate as a fraction of lr (cosine decay)."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only; not biases, norms or logit_scale)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas (CLIP's)."""
    eps: float = 1e-6
    """AdamW epsilon (CLIP's)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 turns it off)."""
    category_loss_weight: float = 8.0
    """Weight of an auxiliary loss beside the CLIP loss: a linear head on the max over the layer -2 patch tokens
    (what LLaVA reads) predicts which object categories the image holds (multi-label, from the world's scene
    graph, i.e. its COCO annotations). The head is not part of the saved CLIP checkpoint. 0: CLIP loss alone
    (v1). At 2.0 the recipe's recall@1 doubled and the patch grid's position probe rose 0.22 -> 0.34; at 8.0, on
    the v3 world of larger objects, the shape probe rose from 0.18 to 0.36 (chance 0.125; docs/encoder.md)."""
    object_loss_weight: float = 2.0
    """Weight of a second auxiliary loss (llavakit/train/clip_objects.py): for each object of the scene graph,
    the mean of the layer -2 patch tokens inside its box predicts its category and its colour (two linear
    heads, cross-entropy), so the tokens LLaVA reads at an object say what is there. Dropped at save. 0: off (v3).
    At 2.0 (v4) the shape probe rose from 0.36 to 0.56 and colour, count, position and recall rose too; 8.0 was
    worse than 2.0 (docs/encoder.md)."""
    position_loss_weight: float = 0.0
    """Weight of a third auxiliary loss (llavakit/train/clip_objects.py, `PositionHead`): each object's mean patch
    token (as for `object_loss_weight`) predicts the object's 3x3 cell of the image (the scene graph's `position`),
    so the tokens at an object also say *where* it is. Without it the v4 tower's object tokens carry colour and
    shape but no position (a probe reads the majority cell; docs/default-model.md, E15): an LM must then find
    positions from the tokens' order alone. Dropped at save. 0: off (v4)."""
    hard_batch_prob: float = 0.0
    """Fraction of steps that use a grouped hard-negative batch instead of a random one: images sharing one
    colour (or shape), each paired with a caption about that object alone, so shape and position must be
    told apart (llavakit/train/clip_hard.py). 0 gives plain CLIP batches."""
    seed: int = 0
    """Seed of initialisation, caption choice and batch order."""
    threads: int = 2
    """torch intra-op threads."""
    compile: bool = True
    """Wrap the model in torch.compile (fixed shapes: ~10-20 s to compile, then ~1.5x faster on CPU)."""
    # logging and evaluation
    log_every: int = 10
    """Steps between metrics.jsonl lines."""
    eval_every: int = 250
    """Steps between validation losses (0: only at the end); needs val_world."""
    snapshot_every: int = 0
    """Steps between snapshots: the HF CLIP checkpoint (with tokenizer and image processor) written to
    `snapshots/step-N/` under `out`, loadable and evaluable like the final one (`llavakit train clip --eval`)
    while a long run goes on. Weights only: a run cannot resume from a snapshot. 0: none."""
    checkpoint_every: int = 250
    """Steps between resumable checkpoints: `checkpoint/` under `out` (replaced each time, deleted when the run
    ends), which `--resume` continues from. 0: none."""
    val_images: int = 500
    """Images of val_world used for validation loss and retrieval recall."""
    probe_fit_images: int = 2000
    """Images per probe world to fit the linear probes on (0 skips the probes)."""
    probe_test_images: int = 1000
    """Images per probe world to test the linear probes on."""
    probe_seed: int = 1000
    """World seed of the generated probe worlds."""
    evaluate: bool = True
    """Run `clip_eval.evaluate` after training when val_world is set (writes eval.json)."""

    def __post_init__(self) -> None:
        self.world, self.out = str(self.world), str(self.out)
        self.val_world = None if self.val_world in (None, "") else str(self.val_world)
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self._check_required()
        self._check_positive()
        self._check_model()
        self._check_optim()

    def _check_required(self) -> None:
        if not self.world:
            raise ClipConfigError("world is required: the training world directory")
        if not self.out:
            raise ClipConfigError("out is required: the output directory")

    def _check_positive(self) -> None:
        names = ("image_size", "patch_size", "vision_hidden", "vision_layers", "vision_heads", "text_hidden",
                 "text_layers", "text_heads", "mlp_ratio", "projection_dim", "max_text_len", "epochs",
                 "batch_size", "threads", "log_every", "val_images", "probe_test_images")  # fmt: skip
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ClipConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "eval_every", "snapshot_every", "checkpoint_every", "seed", "probe_fit_images",
                     "probe_seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ClipConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps <= 0):
            raise ClipConfigError(f"max_steps must be a positive integer or null, got {self.max_steps!r}")

    @property
    def luma_dims(self) -> int:
        """patch_init luma: how many patch-embedding outputs start as outline filters."""
        return round(LUMA_SHARE * self.vision_hidden)

    def _check_model(self) -> None:
        if self.image_size % self.patch_size:
            raise ClipConfigError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.vision_hidden % self.vision_heads:
            raise ClipConfigError(f"vision_heads ({self.vision_heads}) must divide vision_hidden ({self.vision_hidden})")
        if self.text_hidden % self.text_heads:
            raise ClipConfigError(f"text_heads ({self.text_heads}) must divide text_hidden ({self.text_hidden})")
        if self.patch_init not in PATCH_INITS:
            raise ClipConfigError(f"patch_init must be one of {', '.join(PATCH_INITS)}, got {self.patch_init!r}")
        if self.patch_init == "pca" and self.vision_hidden > 3 * self.patch_size**2:
            raise ClipConfigError(f"patch_init pca needs vision_hidden ({self.vision_hidden}) <= 3 * patch_size**2 "
                                  f"({3 * self.patch_size**2}): one component per channel")
        if self.patch_init == "luma" and not 0 < self.luma_dims < self.patch_size**2:
            raise ClipConfigError(f"patch_init luma makes 2/3 of vision_hidden ({self.luma_dims} of {self.vision_hidden}) "
                                  f"outline filters, and at most patch_size**2 - 1 ({self.patch_size**2 - 1}) fit: "
                                  "lower vision_hidden or raise patch_size")
        if self.vision_layers < 2:
            raise ClipConfigError("vision_layers must be at least 2 (LLaVA reads layer -2)")
        if self.vocab_size < 520:
            raise ClipConfigError(f"vocab_size must be at least 520 (512 byte symbols + merges + 2), got {self.vocab_size}")
        if self.max_text_len < 3:
            raise ClipConfigError(f"max_text_len must be at least 3, got {self.max_text_len}")

    def _check_optim(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ClipConfigError(f"lr must be a positive number, got {self.lr!r}")
        if not (0.0 <= self.min_lr_ratio <= 1.0):
            raise ClipConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise ClipConfigError("weight_decay and grad_clip must be >= 0 and eps > 0")
        if not (self.category_loss_weight >= 0 and math.isfinite(self.category_loss_weight)):
            raise ClipConfigError(f"category_loss_weight must be >= 0, got {self.category_loss_weight!r}")
        for name in ("object_loss_weight", "position_loss_weight"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ClipConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not (0.0 <= self.hard_batch_prob <= 1.0):
            raise ClipConfigError(f"hard_batch_prob must be in [0, 1], got {self.hard_batch_prob!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ClipConfigError(f"betas must be two numbers in [0, 1), got {self.betas!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClipTrainConfig:
        """Build from plain data; an unknown key raises ClipConfigError naming it and the known keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ClipConfigError(f"unknown config key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["betas"] = list(self.betas)
        return data


@dataclass
class ClipTrainResult:
    """What a run did: where it wrote, its losses, speed and (if evaluated) the evaluation report."""

    out: Path
    steps: int
    losses: list[float]
    seconds: float
    num_params: dict[str, int]
    eval: dict[str, Any] | None = None
    val_losses: list[tuple[int, float]] = field(default_factory=list)


# --- model ------------------------------------------------------------------------------


def clip_config(cfg: ClipTrainConfig, tokenizer):
    """The transformers `CLIPConfig` of the run; the text tower's ids come from the tokenizer."""
    from transformers import CLIPConfig

    text = dict(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=cfg.text_hidden * cfg.mlp_ratio,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads, max_position_embeddings=cfg.max_text_len,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        projection_dim=cfg.projection_dim,
    )  # fmt: skip
    vision = dict(
        hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_hidden * cfg.mlp_ratio,
        num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size, patch_size=cfg.patch_size, projection_dim=cfg.projection_dim,
    )  # fmt: skip
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim)


def init_patch_embedding(cfg: ClipTrainConfig, model, pixels: torch.Tensor) -> None:
    """Apply `cfg.patch_init` to the vision patch embedding (random: keep transformers' init)."""
    from llavakit.train.clip_init import patch_luma_, patch_pca_

    conv = model.vision_model.embeddings.patch_embedding
    if cfg.patch_init == "pca":
        patch_pca_(conv, pixels, seed=cfg.seed)
    elif cfg.patch_init == "luma":
        patch_luma_(conv, pixels, dims=cfg.luma_dims, seed=cfg.seed)


def build_model(cfg: ClipTrainConfig, tokenizer):
    """A freshly initialised `CLIPModel` (seeded) using SDPA attention."""
    import torch
    from transformers import CLIPModel

    torch.manual_seed(cfg.seed)
    config = clip_config(cfg, tokenizer)
    config._attn_implementation = "sdpa"
    return CLIPModel(config)


def count_params(model) -> dict[str, int]:
    def n(module) -> int:
        return sum(p.numel() for p in module.parameters())

    return {"vision": n(model.vision_model), "text": n(model.text_model), "total": n(model)}


def make_optimizer(model, cfg: ClipTrainConfig, total_steps: int, extra=()):
    """AdamW (no decay on biases, norms, logit_scale) and a warm-up + cosine LambdaLR; `extra`: more parameters
    trained alongside (the auxiliary heads)."""
    import torch

    params = [*model.parameters(), *extra]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(total_steps - warmup, 1)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# --- batches ----------------------------------------------------------------------------


def epoch_batches(n: int, batch_size: int, generator) -> list:
    """Index tensors of one shuffled epoch (the partial last batch is dropped: fixed shapes)."""
    import torch

    order = torch.randperm(n, generator=generator)  # [N]
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def batch_inputs(data, idx, caption: int | None, generator) -> dict:
    """pixel_values [B, 3, S, S] and input_ids [B, L] for images `idx`: caption `caption` or a random one each."""
    import torch

    from llavakit.train.clip_data import normalize

    ids = data.input_ids[idx]  # [B, C, L]
    if caption is None:
        pick = torch.randint(ids.shape[1], (len(idx),), generator=generator)  # [B]
    else:
        pick = torch.full((len(idx),), caption, dtype=torch.long)
    input_ids = ids[torch.arange(len(idx)), pick]  # [B, L]
    return {"pixel_values": normalize(data.pixels[idx]), "input_ids": input_ids}


def validation_loss(model, data, batch_size: int) -> float:
    """Mean CLIP loss over full batches of `data` with each image's first caption."""
    import torch

    model.eval()
    losses = []
    with torch.no_grad():
        for start in range(0, max(len(data) - batch_size, 0) + 1, batch_size):
            idx = torch.arange(start, min(start + batch_size, len(data)))
            losses.append(model(**batch_inputs(data, idx, 0, None), return_loss=True).loss.item())
    model.train()
    return sum(losses) / len(losses)


# --- run --------------------------------------------------------------------------------


def prepare_out(out: str | Path) -> Path:
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"output dir {path} exists and is not empty")
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_inputs(cfg: ClipTrainConfig) -> None:
    """Fail before any work if a world directory is missing or incomplete."""
    from llavakit.world.load import check_world

    check_world(cfg.world)
    if cfg.val_world:
        check_world(cfg.val_world)


def log_line(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


class CategoryHead:
    """The auxiliary category loss (`category_loss_weight`): which categories each training image holds."""

    def __init__(self, names: list[str], targets, head) -> None:
        self.names, self.targets, self.head = names, targets, head  # targets: [N, K] float multi-hot

    @classmethod
    def build(cls, cfg: ClipTrainConfig, scenes: list[dict], width: int) -> CategoryHead | None:
        import torch

        if cfg.category_loss_weight <= 0:
            return None
        names = sorted({o["category"] for s in scenes for o in s["objects"]})
        if len(names) < 2:
            raise ClipConfigError(f"category_loss_weight needs at least two object categories in the world, "
                                  f"found {names}")
        index = {n: i for i, n in enumerate(names)}
        targets = torch.zeros(len(scenes), len(names))  # [N, K]
        for row, scene in enumerate(scenes):
            for obj in scene["objects"]:
                targets[row, index[obj["category"]]] = 1.0
        torch.manual_seed(cfg.seed + 2)
        return cls(names, targets, torch.nn.Linear(width, len(names)))

    def parameters(self):
        return self.head.parameters()

    def loss(self, patches, images):
        """Mean binary cross-entropy of the head on the max over patches. patches: [B, P, D]; images: [B]."""
        import torch

        logits = self.head(patches.amax(1))  # [B, K]
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, self.targets[images])


def aux_heads(cfg: ClipTrainConfig, scenes: list[dict], width: int) -> list[tuple[str, float, Any]]:
    """(name, weight, head) of each auxiliary loss switched on: `category`, `object`, `position`."""
    import torch

    from llavakit.train.clip_objects import ObjectHead, PositionHead, object_targets

    heads = []
    categories = CategoryHead.build(cfg, scenes, width)
    if categories is not None:
        heads.append(("category", cfg.category_loss_weight, categories))
    if not (cfg.object_loss_weight or cfg.position_loss_weight):
        return heads
    targets = object_targets(scenes, cfg.image_size, cfg.patch_size)  # shared by both heads
    if cfg.object_loss_weight > 0:
        torch.manual_seed(cfg.seed + 3)
        heads.append(("object", cfg.object_loss_weight, ObjectHead(targets, width)))
    if cfg.position_loss_weight > 0:
        if not (targets.positions != -100).any():
            raise ClipConfigError("position_loss_weight needs objects with a `position` in the world's scene graphs; "
                                  "this world records none")
        torch.manual_seed(cfg.seed + 4)
        heads.append(("position", cfg.position_loss_weight, PositionHead(targets, width)))
    return heads


class _Trainer:
    """The training loop's state: model, optimiser, data, logs."""

    def __init__(self, cfg: ClipTrainConfig, out: Path, train, val, model, say, tokenizer, hard=None) -> None:
        import torch

        self.cfg, self.out, self.train, self.val, self.say = cfg, out, train, val, say
        self.tokenizer = tokenizer  # saved with each snapshot
        self.hard = hard  # a HardBatchSampler when cfg.hard_batch_prob > 0
        self.model = model
        self.aux = aux_heads(cfg, train.scenes, model.config.vision_config.hidden_size)
        self.forward = torch.compile(model) if cfg.compile else model
        per_epoch = len(train) // cfg.batch_size
        self.total = cfg.max_steps or cfg.epochs * per_epoch
        self.aux_params = [p for _, _, head in self.aux for p in head.parameters()]
        self.opt, self.sched = make_optimizer(model, cfg, self.total, self.aux_params)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.losses: list[float] = []
        self.aux_losses: dict[str, list[float]] = {name: [] for name, _, _ in self.aux}
        self.val_losses: list[tuple[int, float]] = []
        self.metrics = out / METRICS_FILE
        self.steps_done = 0
        self.pending: list = []  # the current epoch's batches not yet trained on (index tensors [B])
        self.earlier_seconds = 0.0  # training time before a resume
        self.start = time.perf_counter()

    def step(self, batch: dict) -> float:
        import torch

        images = batch.pop("images")  # [B] indices into the training world
        out = self.forward(**batch, return_loss=True, output_hidden_states=bool(self.aux))
        loss = out.loss
        if self.aux:
            patches = out.vision_model_output.hidden_states[-2][:, 1:]  # [B, P, D], CLS dropped
            for name, weight, head in self.aux:
                aux = head.loss(patches, images)
                self.aux_losses[name].append(aux.item())
                loss = loss + weight * aux
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([*self.model.parameters(), *self.aux_params], self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100.0))  # CLIP's temperature cap
        return out.loss.item()  # the CLIP loss: comparable across runs with and without auxiliary heads

    def next_batch(self, idx) -> dict:
        """A grouped hard batch with probability hard_batch_prob, else the random batch `idx`."""
        import torch

        from llavakit.train.clip_data import normalize

        if self.hard is not None and torch.rand((), generator=self.gen).item() < self.cfg.hard_batch_prob:
            images, input_ids = self.hard.draw()  # [B], [B, L]
            return {"pixel_values": normalize(self.train.pixels[images]), "input_ids": input_ids, "images": images}
        return {**batch_inputs(self.train, idx, None, self.gen), "images": idx}

    def run(self) -> None:
        while self.steps_done < self.total:
            if not self.pending:
                self.pending = epoch_batches(len(self.train), self.cfg.batch_size, self.gen)
            self.losses.append(self.step(self.next_batch(self.pending.pop(0))))
            self.steps_done += 1
            self.after_step(self.steps_done, self.steps_done * self.cfg.batch_size / len(self.train))
        step = self.steps_done
        if self.val is not None and (not self.val_losses or self.val_losses[-1][0] != step):
            self.validate(step)

    def elapsed(self) -> float:
        return self.earlier_seconds + time.perf_counter() - self.start

    def after_step(self, step: int, epoch: float) -> None:
        cfg = self.cfg
        if step % cfg.log_every == 0 or step == self.total or step == 1:
            elapsed = self.elapsed()
            recent = self.losses[-cfg.log_every :]
            record = {"step": step, "epoch": round(epoch, 3), "loss": sum(recent) / len(recent),
                      "lr": self.sched.get_last_lr()[0], "logit_scale": self.model.logit_scale.exp().item(),
                      "elapsed_s": round(elapsed, 2), "samples_per_s": round(step * cfg.batch_size / elapsed, 1)}  # fmt: skip
            extra = ""
            for name, values in self.aux_losses.items():
                recent = values[-cfg.log_every :]
                record[f"{name}_loss"] = sum(recent) / len(recent)
                extra += f" {name} {record[f'{name}_loss']:.4f}"
            log_line(self.metrics, record)
            self.say(f"step {step}/{self.total} epoch {epoch:.2f} loss {record['loss']:.4f}{extra} "
                     f"lr {record['lr']:.2e} {record['samples_per_s']:.0f} samples/s")  # fmt: skip
        if self.val is not None and cfg.eval_every and step % cfg.eval_every == 0:
            self.validate(step)
        if cfg.snapshot_every and step % cfg.snapshot_every == 0 and step < self.total:
            self.snapshot(step)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < self.total:
            self.save_state(step)

    def state(self) -> dict:
        """Everything the loop needs to go on from here as if it had never stopped (tensors and plain data)."""
        return {"step": self.steps_done, "model": self.model.state_dict(),
                "aux": [p.detach().clone() for p in self.aux_params], "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "generator": self.gen.get_state(),
                "hard_generator": self.hard.gen.get_state() if self.hard is not None else None,
                "pending": list(self.pending), "losses": list(self.losses),
                "aux_losses": {k: list(v) for k, v in self.aux_losses.items()},
                "val_losses": [[s, v] for s, v in self.val_losses], "seconds": self.elapsed()}

    def save_state(self, step: int) -> None:
        """checkpoint/: the state and the run's config, written beside and swapped in whole."""
        import torch

        from llavakit.fsutil import swap_dir

        tmp = self.out / f".tmp-{CHECKPOINT_DIR}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save(self.state(), tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
        swap_dir(tmp, self.out / CHECKPOINT_DIR)
        self.say(f"step {step} checkpoint -> {self.out / CHECKPOINT_DIR}")

    def load_state(self, state: dict) -> None:
        import torch

        self.model.load_state_dict(state["model"])
        if len(state["aux"]) != len(self.aux_params):
            raise ClipConfigError(f"checkpoint has {len(state['aux'])} auxiliary-head tensors, the run {len(self.aux_params)}")
        with torch.no_grad():
            for param, saved in zip(self.aux_params, state["aux"]):
                param.copy_(saved)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.gen.set_state(state["generator"])
        if self.hard is not None:
            self.hard.gen.set_state(state["hard_generator"])
        self.steps_done, self.pending, self.losses = state["step"], list(state["pending"]), list(state["losses"])
        self.aux_losses = {k: list(v) for k, v in state["aux_losses"].items()}
        self.val_losses = [(int(s), float(v)) for s, v in state["val_losses"]]
        self.earlier_seconds = float(state["seconds"])

    def snapshot(self, step: int) -> None:
        """snapshots/step-N: the model as it is now, written beside and renamed into place when complete."""
        final = self.out / "snapshots" / f"step-{step}"
        tmp = final.with_name(f".tmp-{final.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.tokenizer.save_pretrained(tmp)
        save_checkpoint(self.model, self.cfg, tmp)
        tmp.rename(final)
        self.say(f"step {step} snapshot -> {final}")

    def validate(self, step: int) -> None:
        loss = validation_loss(self.model, self.val, self.cfg.batch_size)
        self.val_losses.append((step, loss))
        log_line(self.metrics, {"step": step, "val_loss": loss})
        self.say(f"step {step} val_loss {loss:.4f}")


def plot_losses(path: Path, losses: list[float], val_losses: list[tuple[int, float]]) -> None:
    """loss.png: per-step training loss, its running mean, and validation loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="train (step)")
    k = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    ax.plot(steps[k - 1 :], smooth, color="tab:blue", lw=1.5, label=f"train (mean of {k})")
    if val_losses:
        ax.plot(*zip(*val_losses), "o-", color="tab:orange", label="val (caption 0)")
    ax.set_xlabel("step")
    ax.set_ylabel("CLIP loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_checkpoint(model, cfg: ClipTrainConfig, out: Path) -> None:
    """The HF CLIP checkpoint (tokenizer files are already there) and the run's config."""
    from llavakit.train.clip_data import image_processor

    model.save_pretrained(out)
    image_processor(cfg.image_size).save_pretrained(out)
    (out / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")


def train_clip(cfg: ClipTrainConfig, say=None, resume: bool = False) -> ClipTrainResult:
    """Train, save and (with a val world) evaluate an encoder; see the module docstring. resume: go on from
    the checkpoint of an interrupted run in cfg.out (saved with the same settings, RUN_KEYS aside)."""
    import torch

    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, say, resume)
    finally:
        torch.set_num_threads(threads)


def resume_diff(saved: dict[str, Any], cfg: ClipTrainConfig) -> list[str]:
    """Keys where a checkpoint's recorded config and `cfg` differ, leaving out what a resumed run may change."""
    free = set(RUN_KEYS) | {"snapshot_every"}
    before, now = ClipTrainConfig.from_dict(saved).to_dict(), cfg.to_dict()
    for data in (before, now):
        for key in PATH_KEYS:
            data[key] = str(Path(data[key]).resolve()) if data[key] else None
    return sorted(k for k in set(before) | set(now) if k not in free and before.get(k) != now.get(k))


def checkpoint_mismatch(cfg: ClipTrainConfig) -> list[str] | None:
    """None when cfg.out holds no checkpoint; else the settings it was saved with that differ from cfg's (empty:
    it can be resumed; a config that does not parse is one entry)."""
    from llavakit.fsutil import restore_dir

    ckpt = Path(cfg.out) / CHECKPOINT_DIR
    restore_dir(ckpt)  # a swap the kill interrupted
    if not (ckpt / STATE_FILE).is_file() or not (ckpt / CONFIG_FILE).is_file():
        return None
    try:
        return resume_diff(json.loads((ckpt / CONFIG_FILE).read_text(encoding="utf-8")), cfg)
    except (ValueError, TypeError) as exc:  # a torn or foreign config
        return [f"{ckpt / CONFIG_FILE}: {exc}"]


def read_state(cfg: ClipTrainConfig) -> dict:
    """The state saved in cfg.out's checkpoint/, after checking that it was saved with cfg's settings."""
    import torch

    ckpt = Path(cfg.out) / CHECKPOINT_DIR
    diff = checkpoint_mismatch(cfg)
    if diff is None:
        raise FileNotFoundError(f"{ckpt}: no checkpoint to resume from (the run stopped before its first one, "
                                "or checkpoint_every was 0); train afresh into an empty --out")
    if diff:
        raise ClipConfigError(f"{ckpt} was saved with other settings ({', '.join(diff)}); resume with the same ones "
                              f"(only {', '.join(RUN_KEYS)} and snapshot_every may change)")
    return torch.load(ckpt / STATE_FILE, weights_only=True)


def trim_after(out: Path, step: int) -> None:
    """What a stopped run wrote after its checkpoint at `step`: metrics lines and snapshots the resumed run redoes."""
    metrics = out / METRICS_FILE
    if metrics.is_file():
        kept = [line for line in metrics.read_text(encoding="utf-8").splitlines() if _logged_step(line) <= step]
        metrics.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    for snap in (out / "snapshots").glob("*") if (out / "snapshots").is_dir() else []:
        later = snap.name.startswith("step-") and snap.name[5:].isdigit() and int(snap.name[5:]) > step
        if later or snap.name.startswith(".tmp-"):
            shutil.rmtree(snap)


def hard_sampler(cfg: ClipTrainConfig, train, tokenizer):
    """The grouped hard-negative batch sampler, or None when hard_batch_prob is 0."""
    import torch

    if cfg.hard_batch_prob <= 0:
        return None
    from llavakit.train.clip_hard import HardBatchSampler, focus_objects

    objects = focus_objects(train.scenes, tokenizer, train.input_ids.shape[-1])
    return HardBatchSampler(objects, cfg.batch_size, torch.Generator().manual_seed(cfg.seed + 1))


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; a line torn by the kill counts as after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _train(cfg: ClipTrainConfig, say, resume: bool) -> ClipTrainResult:
    from transformers import CLIPTokenizer

    from llavakit.train.clip_data import build_tokenizer, load_world
    from llavakit.world import load_scenes

    check_inputs(cfg)
    t0 = time.perf_counter()
    scenes = load_scenes(cfg.world)
    if len(scenes) < cfg.batch_size:
        raise ClipConfigError(f"batch_size ({cfg.batch_size}) is larger than the training world ({len(scenes)} images)")
    state = read_state(cfg) if resume else None
    out = Path(cfg.out) if resume else prepare_out(cfg.out)
    tokenizer = CLIPTokenizer.from_pretrained(out) if resume else build_tokenizer(scenes, cfg.vocab_size, out)
    train = load_world(cfg.world, tokenizer, cfg.image_size, cfg.max_text_len, workers=cfg.threads)
    val = None
    if cfg.val_world:
        val = load_world(cfg.val_world, tokenizer, cfg.image_size, cfg.max_text_len, cfg.val_images, cfg.threads)
    say(f"loaded {len(train)} train / {len(val) if val else 0} val images, vocab {len(tokenizer)} "
        f"in {time.perf_counter() - t0:.1f}s")  # fmt: skip
    model = build_model(cfg, tokenizer)
    if state is None:
        init_patch_embedding(cfg, model, train.pixels)
    trainer = _Trainer(cfg, out, train, val, model, say, tokenizer, hard_sampler(cfg, train, tokenizer))
    if state is not None:
        trainer.load_state(state)
        trim_after(out, trainer.steps_done)
        say(f"resuming {out} at step {trainer.steps_done}/{trainer.total}")
    trainer.run()
    seconds = trainer.earlier_seconds + time.perf_counter() - t0
    model.eval()
    save_checkpoint(model, cfg, out)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)  # the run is whole: nothing left to resume
    plot_losses(out / LOSS_PNG, trainer.losses, trainer.val_losses)
    result = ClipTrainResult(out, trainer.total, trainer.losses, seconds, count_params(model), None, trainer.val_losses)
    if cfg.val_world and cfg.evaluate:
        from llavakit.train.clip_eval import EvalConfig, evaluate, format_report

        result.eval = evaluate(out, EvalConfig.from_train(cfg), say=say, train_seconds=seconds)
        say(format_report(result.eval))
    return result
