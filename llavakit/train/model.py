"""The model as trained: what is frozen, LoRA via peft, the param groups, the module accelerate wraps."""

from __future__ import annotations

import warnings
from pathlib import Path

from torch import nn

from llavakit.data.render import IGNORE_INDEX

PROJECTOR = "multi_modal_projector"
VISION = "vision_tower"
"""transformers' name for the LLaVA projector module (a module name, not a model name)."""


def resolve_init(path: str | Path) -> Path:
    """A model dir, or a stage output dir holding `model/`."""
    path = Path(path)
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"init_from {path}: neither a model dir (config.json) nor a stage output dir (model/config.json)")


def llava_of(model: nn.Module) -> nn.Module:
    """The LlavaForConditionalGeneration inside a peft model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def set_trainable(llava: nn.Module, *, train_lm: bool, train_vision: bool) -> None:
    """Freeze everything, then unfreeze the projector and whatever the stage trains."""
    llava.requires_grad_(False)
    llava.model.multi_modal_projector.requires_grad_(True)
    if train_vision:
        llava.model.vision_tower.requires_grad_(True)
    if train_lm:
        llava.model.language_model.requires_grad_(True)
        llava.lm_head.requires_grad_(True)


def lm_linear_names(llava: nn.Module) -> list[str]:
    """Every nn.Linear of the language model, by full name (LLaVA's `find_all_linear_names`)."""
    prefix = "model.language_model."
    return [f"{prefix}{name}" for name, m in llava.model.language_model.named_modules() if isinstance(m, nn.Linear)]


def lora_targets(llava: nn.Module, names) -> list[str]:
    """Full names of the LM linears LoRA wraps: all of them, or those `names` picks as peft would (a name or a
    `.`-suffix: `q_proj`, `self_attn.q_proj`). Only the LM's: peft would also match the vision tower's `q_proj`."""
    linears = lm_linear_names(llava)
    if not names:
        return linears
    picked = [full for full in linears if any(full == n or full.endswith("." + n) for n in names)]
    unmatched = [n for n in names if not any(full == n or full.endswith("." + n) for full in linears)]
    if unmatched or not picked:
        raise ValueError(f"lora.target_modules {unmatched or list(names)}: no linear layer of the language model has "
                         f"that name (e.g. {', '.join(sorted({f.rsplit('.', 1)[-1] for f in linears})[:8])})")
    return picked


def new_token_ids(tokenizer, config) -> list[int]:
    """The tokens no row of the base LM was trained for: those `llavakit init` / `convert` added, but `<image>`
    (its positions hold image features) and the pad token (never a target nor attended to).

    The added ids are recorded in config.json (`llavakit.added_token_ids`). A dir from before they were has them
    guessed: `<image>` is added first, then the template's special tokens the LM lacks (chatml's `<|im_start|>`,
    `<|im_end|>`), then a pad token if missing, so every added token after `<image>`'s id; a template token the
    base tokenizer already had (SmolLM2's or Qwen2's chatml) comes before it and is excluded."""
    added = (getattr(config, "llavakit", None) or {}).get("added_token_ids")
    if added is None:
        added = [i for i in tokenizer.get_added_vocab().values() if i > config.image_token_id]
    return sorted(i for i in added if i not in (config.image_token_id, tokenizer.pad_token_id))


def trained_token_ids(cfg, tokenizer, config) -> list[int]:
    """The token rows this run trains as peft trainable tokens: `new_token_ids` for a LoRA run with
    `lora.train_new_tokens`, else none (full fine-tuning trains every row with the LM)."""
    if not (cfg.lora.enabled and cfg.lora.train_new_tokens):
        return []
    return new_token_ids(tokenizer, config)


def token_rows(llava: nn.Module, ids: list[int]) -> dict[str, list[int]] | None:
    """peft `trainable_token_indices`: these rows of the input embedding and of the LM head (one set of rows when
    the two are tied: peft then ties the LM head to the embedding's rows)."""
    if not ids:
        return None
    rows = {"embed_tokens": list(ids)}
    if not llava.config.get_text_config().tie_word_embeddings:
        rows["lm_head"] = list(ids)
    return rows


def apply_lora(llava: nn.Module, lora, *, train_vision: bool, new_tokens: list[int] = ()) -> nn.Module:
    """LoRA on the language model; the projector (and vision tower if trained) as full `modules_to_save`; the
    embedding and LM-head rows of `new_tokens` (see `new_token_ids`) as peft trainable tokens.

    Trainable tokens rather than the embedding and LM head in `modules_to_save`: the adapter then holds those
    rows only ([n, D] each), not two [V, D] matrices, and merging writes exactly those rows. Without them the
    rows of a template's stop token would stay at their initial mean for good under LoRA."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.tuners_utils import check_target_module_exists

    modules_to_save = [PROJECTOR] + (["vision_tower"] if train_vision else [])
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none", task_type="CAUSAL_LM",
        target_modules=lora_targets(llava, lora.target_modules), modules_to_save=modules_to_save,
        trainable_token_indices=token_rows(llava, new_tokens),
    )
    with warnings.catch_warnings():  # peft probes a deprecated transformers property
        warnings.simplefilter("ignore", FutureWarning)
        if not lora.init_adapter:
            return get_peft_model(llava, config)
        path = adapter_dir(lora.init_adapter)
        check_adapter(path, config)
        targets = {name for name, m in llava.named_modules() if isinstance(m, nn.Linear) and check_target_module_exists(config, name)}
        model = PeftModel.from_pretrained(llava, str(path), is_trainable=True)
    # peft may save target_modules in a compressed form: compare the layers it wrapped with this run's targets
    wrapped = {name.removeprefix("base_model.model.") for name, m in model.named_modules() if hasattr(m, "lora_A")}
    if wrapped != targets:
        raise ValueError(f"lora.init_adapter {path}: the adapter does not match this run's LoRA settings: "
                         + _differs("target_modules", wrapped, targets))
    return model


def adapter_dir(path: str | Path) -> Path:
    """A saved adapter dir, or a run dir holding `adapter/`."""
    path = Path(path)
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise FileNotFoundError(f"lora.init_adapter {path}: no adapter_config.json (a run's adapter/ dir, or the run dir)")


def check_adapter(path: Path, want) -> None:
    """The saved adapter at `path` has the shape `want` (a peft LoraConfig) would give; else a ValueError naming it."""
    from peft import PeftConfig

    have = PeftConfig.from_pretrained(str(path))
    pairs = {"r": (have.r, want.r), "alpha": (have.lora_alpha, want.lora_alpha),
             "dropout": (have.lora_dropout, want.lora_dropout),  # peft would use the saved one, silently
             "modules_to_save": (set(have.modules_to_save or ()), set(want.modules_to_save or ())),
             "trainable_token_indices": (have.trainable_token_indices, want.trainable_token_indices)}
    wrong = [_differs(key, a, b) + (_token_rows_hint(a, b) if key == "trainable_token_indices" else "")
             for key, (a, b) in pairs.items() if a != b]
    if wrong:
        raise ValueError(f"lora.init_adapter {path}: the adapter does not match this run's LoRA settings: "
                         + "; ".join(wrong))


def _token_rows_hint(there, here) -> str:
    """The likely cause of a trainable_token_indices mismatch (the rows of the tokens `llavakit init` added)."""
    if there is None:
        return (" (an adapter without token rows is likely from an llavakit version before LoRA trained the rows of "
                "the tokens `llavakit init` added: `lora.train_new_tokens: false` goes on training it without them, "
                "as that version did)")
    if here is None:
        return " (this run trains no token rows: lora.train_new_tokens is false, or init_from added no tokens)"
    return " (rows of other tokens: is init_from the model the adapter was trained on?)"


def _differs(key: str, there, here) -> str:
    if isinstance(there, set):
        return f"{key}: {sorted(there - here)[:3]} only there, {sorted(here - there)[:3]} only here"
    return f"{key}: {there!r} there, {here!r} here"


def prepare_model(llava: nn.Module, cfg, tokenizer) -> nn.Module:
    """Freeze per stage, enable gradient checkpointing, add LoRA; returns what is trained (llava or peft)."""
    set_trainable(llava, train_lm=bool(cfg.train_lm) and not cfg.lora.enabled, train_vision=cfg.train_vision)
    if cfg.runtime.gradient_checkpointing:
        set_checkpointing(llava, True)
        llava.config.use_cache = False
    if cfg.lora.enabled:
        return apply_lora(llava, cfg.lora, train_vision=cfg.train_vision,
                          new_tokens=trained_token_ids(cfg, tokenizer, llava.config))
    return llava


def set_checkpointing(llava: nn.Module, on: bool) -> None:
    """Gradient (activation) checkpointing of every layer, non-reentrant (works with frozen inputs)."""
    if hasattr(llava, "activation_checkpointing_enable"):  # transformers >= 5.x name
        if on:
            llava.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            llava.activation_checkpointing_disable()
    elif on:
        llava.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        llava.gradient_checkpointing_disable()


def _part(name: str) -> str:
    """Which learning-rate group a parameter belongs to: projector, vision (the tower) or model (the LM)."""
    if PROJECTOR in name:
        return "projector"
    return "vision" if VISION in name else "model"


def param_groups(model: nn.Module, optim) -> list[dict]:
    """AdamW groups: projector / vision tower / LM, each with and without weight decay (never on biases and norms)."""
    buckets: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            buckets.setdefault((_part(name), p.ndim >= 2), []).append(p)
    lrs = {"projector": optim.projector_lr or optim.lr, "vision": optim.vision_lr or optim.lr, "model": optim.lr}
    groups = []
    for (part, decay), params in sorted(buckets.items()):
        name = part + ("" if decay else "_no_decay")
        groups.append({"params": params, "lr": lrs[part], "weight_decay": optim.weight_decay if decay else 0.0, "name": name})
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen")
    return groups


class TrainModule(nn.Module):
    """What accelerate wraps: one forward is one micro-batch's loss.

    `num_items` is the divisor of the summed token loss (transformers' `num_items_in_batch`), set
    so that the gradient of a global batch is the mean over all its target tokens however the
    batch is split over processes and accumulation steps.
    """

    def __init__(self, model: nn.Module, freeze_vision_mode: bool, every_rank_encodes: str | None = None):
        """every_rank_encodes: "features" / "pixels" under FSDP or DeepSpeed with several processes: a micro-batch
        without images still runs the projector (and the tower, "pixels") on a blank image, weighted 0 (as LLaVA's
        dummy image), since there every module's forward is a collective all processes must join."""
        super().__init__()
        self.model = model
        self.freeze_vision_mode = freeze_vision_mode
        self.every_rank_encodes = every_rank_encodes
        self._no_split_modules = getattr(llava_of(model), "_no_split_modules", None)  # for FSDP auto-wrap

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_vision_mode:  # a frozen encoder stays in eval mode, as when its features are cached
            llava_of(self.model).model.vision_tower.eval()
        return self

    def forward(self, input_ids, attention_mask, labels, num_items, pixel_values=None, image_features=None):
        llava = llava_of(self.model)
        extra = {}
        if image_features is not None:  # cached encoder output: project it, let the model scatter it
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            weight = next(llava.model.multi_modal_projector.parameters())
            projected = llava.model.multi_modal_projector(image_features.to(weight.dtype))  # [N, S, Dt]
            # the same structure get_image_features returns: one [S, Dt] tensor per image
            extra["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=list(projected))}
        elif pixel_values is not None:
            extra["pixel_values"] = pixel_values  # [N, 3, H, W]
        hidden = llava.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                             **extra).last_hidden_state  # [B, T, D]
        loss = target_loss(llava.lm_head, hidden, labels, num_items)
        if not extra and self.every_rank_encodes:
            loss = loss + 0.0 * blank_image_features(llava, self.every_rank_encodes, hidden.device).sum()
        return loss


def blank_image_features(llava: nn.Module, source: str, device):
    """The projected features of one blank image: from a zero feature map ("features": a cached tower's output
    shape) or from zero pixels through the tower ("pixels")."""
    import torch

    projector = llava.model.multi_modal_projector
    if source == "features":
        weight = next(projector.parameters())
        width = next(m.in_features for m in projector.modules() if isinstance(m, nn.Linear))  # the cached width
        return projector(torch.zeros(1, llava.config.image_seq_length, width, device=device, dtype=weight.dtype))
    size = llava.config.vision_config.image_size
    weight = next(llava.model.vision_tower.parameters())
    out = llava.model.get_image_features(pixel_values=torch.zeros(1, 3, size, size, device=device, dtype=weight.dtype))
    parts = getattr(out, "pooler_output", out)
    return torch.cat([t.reshape(-1) for t in (parts if isinstance(parts, (list, tuple)) else [parts])])


def target_loss(lm_head: nn.Module, hidden, labels, num_items):
    """Summed next-token cross-entropy over the target tokens, divided by `num_items`.

    The same number as transformers' causal-LM loss (`num_items_in_batch`), but the LM head only
    runs where a label is trained: on instruction data that is ~5 % of the positions, and the
    head (vocab x width) is a large share of a small LM's compute and of its activation memory.
    """
    import torch.nn.functional as F

    targets = labels[:, 1:]  # [B, T-1]: position t predicts token t+1
    keep = targets != IGNORE_INDEX  # [B, T-1]
    logits = lm_head(hidden[:, :-1][keep])  # [N, V]
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum") / num_items


def count_params(model: nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def trainable_names(module: nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}
