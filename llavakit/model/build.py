"""Assemble an untrained LLaVA model from parts: `llavakit init`.

vision tower (CLIP / SigLIP, hub id or local dir) + projector (registry) + any causal LM,
written in the Hugging Face `llava` layout with tokenizer (`<image>` added), processor and chat
template, and llavakit's own record of projector/template/aspect mode in config.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llavakit.model.modeling import ASPECT_MODES, LlavakitMeta
from llavakit.model.projector import HIDDEN_ACT, PROJECTORS

# model_type of a vision checkpoint -> (vision model class name, has a CLS token)
VISION_TOWERS: dict[str, tuple[str, bool]] = {
    "clip": ("CLIPVisionModel", True),
    "clip_vision_model": ("CLIPVisionModel", True),
    "siglip": ("SiglipVisionModel", False),
    "siglip_vision_model": ("SiglipVisionModel", False),
}


@dataclass
class InitConfig:
    """How to assemble a model from parts."""

    vision: str
    """Vision encoder: hub id or local dir of a CLIP/SigLIP (full or vision-only) checkpoint."""
    lm: str
    """Causal LM: hub id, local dir, or a short name (see `llavakit.model.hub.SHORT_NAMES`)."""
    out: str
    """Directory to write the model to (must not exist or be empty)."""
    projector: str = "mlp2x_gelu"
    template: str = "vicuna_v1"
    vision_feature_layer: int = -2
    select_strategy: str | None = None
    """'default' drops CLS, 'full' keeps all tokens; None picks 'default' for encoders with a CLS token."""
    image_aspect_ratio: str = "pad"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.projector not in PROJECTORS:
            raise ValueError(f"unknown projector {self.projector!r}; known: {', '.join(PROJECTORS)}")
        if self.select_strategy not in (None, "default", "full"):
            raise ValueError(f"select_strategy must be 'default' or 'full', got {self.select_strategy!r}")
        if self.image_aspect_ratio not in ASPECT_MODES:
            raise ValueError(f"image_aspect_ratio must be one of {ASPECT_MODES}")
        from llavakit.data.templates import get_template

        get_template(self.template)  # raises KeyError naming the known templates
        out = Path(self.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FileExistsError(f"output dir {out} exists and is not empty")


def load_vision(source: str):
    """(vision model, has_cls) from a CLIP/SigLIP checkpoint, full or vision-only."""
    import transformers
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(source)
    if cfg.model_type not in VISION_TOWERS:
        raise ValueError(f"{source}: vision model_type {cfg.model_type!r} unsupported; known: {', '.join(VISION_TOWERS)}")
    cls_name, has_cls = VISION_TOWERS[cfg.model_type]
    return getattr(transformers, cls_name).from_pretrained(source), has_cls


def check_tower_settings(vc, has_cls: bool, strategy: str, layer: int, what: str) -> None:
    """A feature layer the tower has, and `default` (drop the first token) only for a tower with a CLS token."""
    n = vc.num_hidden_layers
    if not -n - 1 <= layer <= n:
        raise ValueError(f"{what}: vision feature layer {layer} is outside the tower's {n} layers "
                         f"(its hidden states are -{n + 1}..{n}; LLaVA reads -2)")
    if strategy == "default" and not has_cls:
        raise ValueError(f"{what}: select strategy 'default' drops a CLS token, and this tower ({vc.model_type}) has "
                         "none: use 'full' (every patch token)")


def image_processor_for(source: str, vision_config, pad: bool):
    """LLaVA's image processor with the encoder's own size/crop/mean/std (pad to square if asked)."""
    from transformers import AutoImageProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    s = vision_config.image_size
    kw = dict(size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    try:
        src = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError):
        src = None  # a checkpoint without a preprocessor_config.json: CLIP defaults at the tower's size
    if src is not None:
        kw["image_mean"], kw["image_std"] = list(src.image_mean), list(src.image_std)
        if getattr(src, "resample", None) is not None:  # the encoder's own filter (CLIP and SigLIP: bicubic)
            kw["resample"] = src.resample
        if not getattr(src, "do_center_crop", None):  # SigLIP-style (unset or False): squash to size x size
            kw = dict(kw, size={"height": s, "width": s}, do_center_crop=False)
    return LlavaImageProcessorPil(do_pad=pad, **kw)


def add_tokens(tokenizer, template) -> list[int]:
    """`<image>`, the template's own special tokens, and a pad token if missing; returns the ids of the tokens added
    (those the tokenizer already had are not), ascending: what `LlavakitMeta.added_token_ids` records."""
    from llavakit.data.templates import IMAGE_TOKEN

    before = set(tokenizer.get_vocab())
    extra = [IMAGE_TOKEN] + [t for t in template.special_tokens if t not in before]
    tokenizer.add_special_tokens({"additional_special_tokens": extra}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return sorted(i for t, i in tokenizer.get_vocab().items() if t not in before)


def mean_rows(weight, ids: list[int]) -> None:
    """Rows `ids` of a [V, D] embedding or LM-head matrix set in place to the mean of the rows before the first of
    them (the base LM's), as LLaVA initialises new tokens: a stop token like chatml's `<|im_end|>` starts as an
    average token, not a random one. By id: a token placed in a spare row of the matrix (Qwen2 has some) gets the
    mean too. transformers' `mean_resizing` only fills appended rows, and samples around the mean."""
    import torch

    if not ids:
        return
    with torch.no_grad():
        weight[ids] = weight[:min(ids)].float().mean(0).to(weight.dtype)  # [D] into each of the rows


def mean_init_rows(lm, ids: list[int]) -> None:
    """`mean_rows` on the LM's input and output embeddings (and a bias, if the head has one)."""
    import torch

    for layer in (lm.get_input_embeddings(), lm.get_output_embeddings()):  # the same tensor twice when tied
        mean_rows(layer.weight, ids)
        if ids and getattr(layer, "bias", None) is not None:
            with torch.no_grad():
                layer.bias[ids] = layer.bias[:min(ids)].float().mean().to(layer.bias.dtype)


def init_model(cfg: InitConfig) -> Path:
    """Assemble, save and return the output dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaConfig

    from llavakit.data.templates import IMAGE_TOKEN, get_template
    from llavakit.model.hub import resolve_lm
    from llavakit.model.io import save_model
    from llavakit.model.modeling import LlavakitForConditionalGeneration

    template = get_template(cfg.template)
    vision, has_cls = load_vision(cfg.vision)
    strategy = cfg.select_strategy or ("default" if has_cls else "full")
    check_tower_settings(vision.config, has_cls, strategy, cfg.vision_feature_layer, f"--vision {cfg.vision}")
    lm_path = resolve_lm(cfg.lm)
    tokenizer = AutoTokenizer.from_pretrained(lm_path)
    lm = AutoModelForCausalLM.from_pretrained(lm_path, dtype=torch.float32)
    added = add_tokens(tokenizer, template)
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    mean_init_rows(lm, added)
    vc = vision.config
    patches = (vc.image_size // vc.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vc.to_dict(), text_config=lm.config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=patches + (1 if has_cls and strategy == "full" else 0),
        vision_feature_layer=cfg.vision_feature_layer, vision_feature_select_strategy=strategy,
        projector_hidden_act=HIDDEN_ACT[cfg.projector], pad_token_id=tokenizer.pad_token_id,
        llavakit=LlavakitMeta(cfg.projector, template.to_dict(), cfg.image_aspect_ratio,
                              added_token_ids=added).to_dict(),
    )
    torch.manual_seed(cfg.seed)
    model = LlavakitForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(lm.base_model.state_dict())
    model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
    processor = image_processor_for(cfg.vision, vc, pad=cfg.image_aspect_ratio == "pad")
    return save_model(model, tokenizer, processor, cfg.out, has_cls=has_cls)
