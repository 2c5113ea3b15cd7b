"""Read checkpoints in the original LLaVA layout (haotian-liu/LLaVA, `LlavaLlamaForCausalLM`).

A full checkpoint dir holds config.json (a Llama config plus `mm_*` keys; model_type `llava_llama`,
or `llava` in early releases) and weights (`pytorch_model*.bin` or `model*.safetensors`, sharded
with an index) named `model.embed_tokens|layers|norm`, `lm_head`, `model.mm_projector.{0,2}`
(`mlp2x_gelu`) or `model.mm_projector` (`linear`), and sometimes the vision tower under
`model.vision_tower.vision_tower.`. A stage-1 dir holds config.json and `mm_projector.bin`; a LoRA
dir holds config.json, adapter_config.json, adapter_model.{safetensors,bin} and
`non_lora_trainables.bin` (keys prefixed `base_model.model.`).

`.bin` files are read with `torch.load(weights_only=True)` only: a file that needs more of pickle
is refused, naming the file.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

# original model_type -> the transformers model_type of its language model
LM_TYPES: dict[str, str] = {"llava_llama": "llama", "llava": "llama"}
# mm_vision_select_feature -> vision_feature_select_strategy
SELECT_FEATURES: dict[str, str] = {"patch": "default", "cls_patch": "full"}
# image_aspect_ratio -> llavakit's aspect mode ('square' is the original's default: plain resize/crop)
ASPECTS: dict[str, str] = {"pad": "pad", "square": "resize"}
# mm_projector_type -> {original key under mm_projector: our key under multi_modal_projector}
PROJECTOR_KEYS: dict[str, dict[str, str]] = {
    "mlp2x_gelu": {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias",
                   "2.weight": "linear_2.weight", "2.bias": "linear_2.bias"},
    "linear": {"weight": "linear_1.weight", "bias": "linear_1.bias"},
}
# training-time settings of the original that are not part of the language model's config
_TRAINING_KEYS = {
    "image_aspect_ratio", "image_grid_pinpoints", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter",
    "tune_mm_vision_resampler", "unfreeze_mm_vision_tower", "use_mm_proj", "tokenizer_padding_side",
    "tokenizer_model_max_length", "architectures", "model_type", "_name_or_path", "transformers_version",
    "torch_dtype", "dtype",
}
# buffers older transformers saved with the weights; the models rebuild them
_STALE_SUFFIXES = ("rotary_emb.inv_freq", "position_ids")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class LegacyConfig:
    """What an original config.json says about the model."""

    path: Path
    text: dict
    """The language model's config (the `mm_*` and training keys removed)."""
    lm_type: str
    vision_tower: str | None
    projector: str
    select_layer: int
    strategy: str
    aspect: str
    mm_hidden_size: int | None


@dataclass
class LegacyWeights:
    """Weights sorted by part, each key remembering the file it came from."""

    lm: dict = field(default_factory=dict)
    """`LlamaForCausalLM` keys: model.embed_tokens.weight, model.layers..., lm_head.weight."""
    projector: dict = field(default_factory=dict)
    """Keys under `mm_projector.`: '0.weight', '2.bias' (mlp2x_gelu) or 'weight', 'bias' (linear)."""
    vision: dict = field(default_factory=dict)
    """Vision-tower keys as transformers' vision model names them: embeddings..., encoder..."""
    origin: dict = field(default_factory=dict)
    """part-qualified key ('lm:...', 'projector:...', 'vision:...') -> file."""

    def add(self, other: "LegacyWeights") -> None:
        self.lm.update(other.lm)
        self.projector.update(other.projector)
        self.vision.update(other.vision)
        self.origin.update(other.origin)


def read_config(src: Path) -> LegacyConfig:
    """Parse and check `src/config.json`; unknown or unsupported settings raise naming the file."""
    path = Path(src) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not an original-LLaVA checkpoint dir")
    data = json.loads(path.read_text(encoding="utf-8"))
    model_type = data.get("model_type")
    if model_type not in LM_TYPES:
        raise ValueError(f"{path}: model_type {model_type!r} is not an original-LLaVA Llama model (known: {', '.join(LM_TYPES)})")
    _check_supported(path, data)
    projector = data.get("mm_projector_type", "linear")  # the original's default
    if projector not in PROJECTOR_KEYS:
        raise ValueError(f"{path}: unknown mm_projector_type {projector!r}; convertible: {', '.join(PROJECTOR_KEYS)}")
    feature = data.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_FEATURES:
        raise ValueError(f"{path}: unknown mm_vision_select_feature {feature!r}; known: {', '.join(SELECT_FEATURES)}")
    aspect = data.get("image_aspect_ratio") or "square"
    if aspect not in ASPECTS:
        raise ValueError(f"{path}: image_aspect_ratio {aspect!r} is not supported (known: {', '.join(ASPECTS)}; 'anyres' is LLaVA-1.6)")
    text = {k: v for k, v in data.items() if not k.startswith("mm_") and k not in _TRAINING_KEYS}
    return LegacyConfig(
        path=path, text=text, lm_type=LM_TYPES[model_type], vision_tower=data.get("mm_vision_tower"),
        projector=projector, select_layer=int(data.get("mm_vision_select_layer", -1)),
        strategy=SELECT_FEATURES[feature], aspect=ASPECTS[aspect], mm_hidden_size=data.get("mm_hidden_size"),
    )


def _check_supported(path: Path, data: dict) -> None:
    if data.get("mm_use_im_start_end"):
        raise ValueError(f"{path}: mm_use_im_start_end=true (<im_start>/<im_end> around image features) is not supported")
    merge = data.get("mm_patch_merge_type", "flat")
    if merge != "flat":
        raise ValueError(f"{path}: mm_patch_merge_type {merge!r} (LLaVA-1.6) is not supported; only 'flat'")
    if data.get("mm_vision_tower") is None and "mm_hidden_size" not in data:
        raise ValueError(f"{path}: no mm_vision_tower or mm_hidden_size: a plain LM config, not a LLaVA one")


def read_weights(path: Path) -> dict:
    """A dict of tensors from one .safetensors or .bin file (the latter via weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    import torch

    try:  # mmap only works for the zip format of torch.save
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path}: refused by torch.load(weights_only=True), it holds more than tensors ({_unpickler_reason(exc)})") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{path}: not a readable PyTorch weights file ({exc})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return dict(obj)


def _unpickler_reason(exc: Exception) -> str:
    """The line of torch's long message that names what was refused."""
    lines = [ln.strip() for ln in str(exc).splitlines() if "WeightsUnpickler error" in ln]
    return (lines[0].removeprefix("WeightsUnpickler error: ").split(" was not")[0] + " is not allowed") if lines else str(exc).splitlines()[0]


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None


def weight_files(src: Path) -> list[Path]:
    """The weight files of a full checkpoint: from its index, else the single file; [] if none."""
    src = Path(src)
    for name in INDEX_FILES:
        index = src / name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            missing = [s for s in shards if not (src / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} names shards that are missing: {', '.join(missing)}")
            return [src / s for s in shards]
    return [src / name for name in SINGLE_FILES if (src / name).is_file()][:1]


def split_weights(state: dict, source: Path) -> LegacyWeights:
    """Sort one file's tensors into LM, projector and vision parts."""
    out = LegacyWeights()
    for key, tensor in state.items():
        key = key.removeprefix("base_model.model.")  # LoRA-era saves (non_lora_trainables.bin)
        if key.endswith(_STALE_SUFFIXES):
            continue
        part, name = _route(key, source)
        getattr(out, part)[name] = tensor
        out.origin[f"{part}:{name}"] = str(source)
    return out


def _route(key: str, source: Path) -> tuple[str, str]:
    if "mm_projector." in key:
        return "projector", key.split("mm_projector.", 1)[1]
    if key.startswith("model.vision_tower."):
        rest = key.removeprefix("model.vision_tower.").removeprefix("vision_tower.")
        return "vision", rest.removeprefix("vision_model.")
    if key.startswith(("model.image_newline", "model.vision_resampler")):
        raise ValueError(f"{source}: {key} belongs to a LLaVA-1.6 / resampler model, which is not supported")
    if key.startswith(("model.", "lm_head.")):
        return "lm", key
    raise ValueError(f"{source}: unexpected weight {key!r} for an original-LLaVA checkpoint")


def read_checkpoint(files: list[Path]) -> LegacyWeights:
    weights = LegacyWeights()
    for path in files:
        weights.add(split_weights(read_weights(path), path))
    return weights


def projector_state(weights: LegacyWeights, kind: str, source: str) -> dict:
    """The projector's tensors under transformers' names (`model.multi_modal_projector.linear_N`)."""
    mapping = PROJECTOR_KEYS[kind]
    if set(weights.projector) != set(mapping):
        raise ValueError(
            f"{source}: projector weights {sorted(weights.projector) or 'none'} do not fit "
            f"mm_projector_type {kind!r} (expected {sorted(mapping)})"
        )
    state = {f"model.multi_modal_projector.{mapping[k]}": v for k, v in weights.projector.items()}
    if kind == "linear":  # the identity linear_2 of its transformers layout (llavakit/model/projector.py)
        from llavakit.model.projector import FixedIdentity

        width = weights.projector["weight"].shape[0]  # [Dt, Dv]
        fixed = FixedIdentity(width, bias="bias" in weights.projector).state_dict()
        state.update({f"model.multi_modal_projector.linear_2.{k}": v for k, v in fixed.items()})
    return state


def adapter_file(src: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (Path(src) / name).is_file():
            return Path(src) / name
    raise FileNotFoundError(f"{src}: adapter_config.json without adapter_model.safetensors or adapter_model.bin")


def merge_lora(lm_state: dict, text_config, src: Path) -> dict:
    """Merge the LoRA adapter in `src` into the LM weights `lm_state` (`LlamaForCausalLM` keys)."""
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        lm = AutoModelForCausalLM.from_config(text_config)
    lm.load_state_dict(lm_state, strict=True, assign=True)
    lora = LoraConfig.from_pretrained(str(src))
    lora.base_model_name_or_path = None  # the base is given here, not the one the adapter recorded
    model = get_peft_model(lm, lora)
    path = adapter_file(src)
    result = set_peft_model_state_dict(model, read_weights(path))
    if result.unexpected_keys:
        raise ValueError(f"{path}: LoRA weights for modules the language model does not have: {result.unexpected_keys[:3]}")
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise ValueError(f"{path}: LoRA weights missing for {len(missing)} tensors, e.g. {missing[0]}")
    return model.merge_and_unload().state_dict()
