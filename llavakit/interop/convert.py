"""`llavakit convert --from llava`: original-LLaVA checkpoints to llavakit's HF-native layout.

Three source layouts (see `legacy.py`): a full checkpoint, a stage-1 dir (`mm_projector.bin`, with
the base LM from `--lm`) and a LoRA dir (merged into `--lm`/`--base` with peft). The vision tower
comes from `--vision` or the config's `mm_vision_tower` (hub id); tower weights stored inside the
checkpoint take precedence over the tower's own. `<image>` (and a pad token if missing) is added to
the tokenizer, and their embedding and LM-head rows are set to the mean row, as `llavakit init` does; the
template is recorded from `--template`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llavakit.interop.legacy import LegacyConfig, LegacyWeights

DTYPES = ("auto", "float32", "float16", "bfloat16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass
class ConvertConfig:
    """What to convert and how."""

    src: str
    out: str
    vision: str | None = None
    """Vision tower dir or hub id; default: the checkpoint's mm_vision_tower."""
    lm: str | None = None
    """Base LM dir for stage-1 and LoRA dirs (the original's --model_base)."""
    template: str | None = None
    """Chat template to record; default `plain` for a stage-1 projector (how it was trained), else vicuna_v1."""
    dtype: str = "auto"
    """'auto' keeps the dtype of the checkpoint's LM weights."""

    def __post_init__(self) -> None:
        from llavakit.data.templates import get_template

        if self.template is not None:
            get_template(self.template)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not Path(self.src).is_dir():
            raise FileNotFoundError(f"{self.src}: no such checkpoint dir")
        out = Path(self.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FileExistsError(f"output dir {out} exists and is not empty")


def detect_layout(src: Path) -> str:
    """'lora', 'stage1' or 'full', from the files present."""
    from llavakit.interop.legacy import weight_files

    if (src / "adapter_config.json").is_file():
        return "lora"
    if weight_files(src):
        return "full"
    if (src / "mm_projector.bin").is_file():
        return "stage1"
    raise FileNotFoundError(
        f"{src}: no weights found (expected model*.safetensors / pytorch_model*.bin, mm_projector.bin, "
        "or adapter_config.json + adapter_model.* + non_lora_trainables.bin)"
    )


def gather_weights(src: Path, layout: str, lm_dir: str | None, legacy: LegacyConfig) -> LegacyWeights:
    """LM, projector and (if stored) vision weights, with the LoRA merged for 'lora' dirs."""
    from llavakit.interop.legacy import merge_lora, read_checkpoint, weight_files

    if layout == "full":
        return read_checkpoint(weight_files(src))
    if not lm_dir:
        raise ValueError(f"{src} is a {layout} dir without LM weights: pass --lm (the base LM it was trained on)")
    base = read_checkpoint(_lm_files(Path(lm_dir)))
    if base.projector or base.vision:
        raise ValueError(f"{lm_dir}: expected a plain causal LM, found multimodal weights")
    extra = read_checkpoint([src / ("mm_projector.bin" if layout == "stage1" else "non_lora_trainables.bin")])
    base.add(extra)
    if layout == "lora":
        base.lm = merge_lora(base.lm, text_config(legacy, _rows(base.lm)), src)
    return base


def _lm_files(lm_dir: Path) -> list[Path]:
    from llavakit.interop.legacy import weight_files

    files = weight_files(lm_dir)
    if not files:
        raise FileNotFoundError(f"{lm_dir}: no model*.safetensors or pytorch_model*.bin")
    return files


def _rows(lm_state: dict) -> int:
    return int(lm_state["model.embed_tokens.weight"].shape[0])


def text_config(legacy: LegacyConfig, vocab_size: int):
    from transformers import AutoConfig

    return AutoConfig.for_model(legacy.lm_type, **{**legacy.text, "vocab_size": vocab_size})


def grow_vocab(lm_state: dict, rows: int, added: list[int]) -> dict:
    """Embedding and LM-head rows up to `rows` (ids stay put); the rows of the `added` token ids and every appended
    row set to the mean row, as `llavakit init` does (`build.mean_rows`: also when a token lands in a spare row)."""
    import torch

    from llavakit.model.build import mean_rows

    out = dict(lm_state)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        w = out.get(key)  # [V, D]
        if w is None or (not added and w.shape[0] >= rows):
            continue
        grown = torch.cat([w, w.new_zeros(max(rows - w.shape[0], 0), w.shape[1])])  # [max(V, rows), D], a copy
        mean_rows(grown, sorted(set(added) | set(range(w.shape[0], rows))))  # no appended row left at zero
        out[key] = grown
    return out


def load_tokenizer(src: Path, lm_dir: str | None):
    """The checkpoint's own tokenizer, else the base LM's (LoRA and stage-1 dirs often have none)."""
    from transformers import AutoTokenizer

    for where in (src, Path(lm_dir) if lm_dir else None):
        if where is not None and any((where / f).is_file() for f in TOKENIZER_FILES):
            return AutoTokenizer.from_pretrained(where)
    raise FileNotFoundError(f"no tokenizer in {src}" + (f" or {lm_dir}" if lm_dir else " (pass --lm)"))


def model_state(weights: LegacyWeights, legacy: LegacyConfig, vision_state: dict, tied: bool) -> tuple[dict, dict]:
    """Our model's state dict and each key's source file."""
    from llavakit.interop.legacy import projector_state

    state, origin = {}, {}
    for key, value in weights.lm.items():
        ours = "lm_head.weight" if key == "lm_head.weight" else "model.language_model." + key.removeprefix("model.")
        state[ours], origin[ours] = value, weights.origin[f"lm:{key}"]
    if tied and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]
    vision = weights.vision or vision_state
    for key, value in vision.items():
        state["model.vision_tower." + key] = value
        origin["model.vision_tower." + key] = weights.origin.get(f"vision:{key}", "the vision tower")
    sources = {weights.origin[f"projector:{k}"] for k in weights.projector} or {str(legacy.path.parent)}
    proj = projector_state(weights, legacy.projector, ", ".join(sorted(sources)))
    state.update(proj)
    origin.update({k: ", ".join(sorted(sources)) for k in proj})
    return state, origin


def check_state(model, state: dict, origin: dict) -> None:
    """Missing, unexpected and mis-shaped tensors raise ValueError naming their files."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"weights missing for {len(missing)} tensors, e.g. {missing[0]}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ValueError(f"{origin[extra[0]]}: unexpected weight {extra[0]} ({len(extra)} unexpected in all)")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{origin[key]}: {key} has shape {tuple(value.shape)}, the model needs {tuple(expected[key].shape)}")


def assemble(config, state: dict, origin: dict):
    """Build the model on the meta device and assign the tensors (no second copy in memory)."""
    from accelerate import init_empty_weights

    from llavakit.model.modeling import LlavakitForConditionalGeneration

    with init_empty_weights():
        model = LlavakitForConditionalGeneration(config)
    check_state(model, state, origin)
    model.load_state_dict(state, strict=True, assign=True)
    if config.text_config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def resolve_dtype(name: str, lm_state: dict):
    import torch

    return lm_state["model.embed_tokens.weight"].dtype if name == "auto" else getattr(torch, name)


def convert_llava(cfg: ConvertConfig) -> Path:
    """Convert and save; returns the output dir."""
    from transformers import LlavaConfig

    from llavakit.data.templates import IMAGE_TOKEN, get_template
    from llavakit.interop.legacy import read_config
    from llavakit.model.build import add_tokens, check_tower_settings, image_processor_for, load_vision
    from llavakit.model.io import save_model
    from llavakit.model.modeling import LlavakitMeta
    from llavakit.model.projector import HIDDEN_ACT

    src = Path(cfg.src)
    legacy = read_config(src)
    layout = detect_layout(src)
    weights = gather_weights(src, layout, cfg.lm, legacy)
    vision_src = cfg.vision or legacy.vision_tower
    if not vision_src:
        raise ValueError(f"{legacy.path} names no mm_vision_tower: pass --vision")
    vision, has_cls = load_vision(vision_src)
    _check_vision(legacy, vision.config, vision_src)
    check_tower_settings(vision.config, has_cls, legacy.strategy, legacy.select_layer, f"{legacy.path} with tower {vision_src}")
    template = get_template(cfg.template or ("plain" if layout == "stage1" else "vicuna_v1"))
    tokenizer = load_tokenizer(src, cfg.lm)
    added = add_tokens(tokenizer, template)
    weights.lm = grow_vocab(weights.lm, len(tokenizer), added)
    dtype = resolve_dtype(cfg.dtype, weights.lm)
    tcfg = text_config(legacy, _rows(weights.lm))
    state, origin = model_state(weights, legacy, vision.state_dict(), tcfg.tie_word_embeddings)
    state = {k: v.to(dtype) for k, v in state.items()}
    vc = vision.config
    history = [{"from": "llava", "layout": layout, "source": str(src), "vision": vision_src, "lm": cfg.lm,
                "vision_weights": "checkpoint" if weights.vision else "tower"}]
    config = LlavaConfig(
        vision_config=vc.to_dict(), text_config=tcfg.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(vc.image_size // vc.patch_size) ** 2 + (1 if has_cls and legacy.strategy == "full" else 0),
        vision_feature_layer=legacy.select_layer, vision_feature_select_strategy=legacy.strategy,
        projector_hidden_act=HIDDEN_ACT[legacy.projector], pad_token_id=tokenizer.pad_token_id,
        llavakit=LlavakitMeta(legacy.projector, template.to_dict(), legacy.aspect, stage="converted", history=history,
                              added_token_ids=added).to_dict(),
    )
    model = assemble(config, state, origin)
    processor = image_processor_for(vision_src, vc, pad=legacy.aspect == "pad")
    return save_model(model, tokenizer, processor, cfg.out, has_cls=has_cls)


def _check_vision(legacy: LegacyConfig, vc, vision_src: str) -> None:
    if legacy.mm_hidden_size is not None and legacy.mm_hidden_size != vc.hidden_size:
        raise ValueError(f"{legacy.path}: mm_hidden_size {legacy.mm_hidden_size} != hidden size {vc.hidden_size} of the vision tower {vision_src}")
    n = vc.num_hidden_layers
    if not -n - 1 <= legacy.select_layer <= n:
        raise ValueError(f"{legacy.path}: mm_vision_select_layer {legacy.select_layer} is outside the tower's {n} layers")
