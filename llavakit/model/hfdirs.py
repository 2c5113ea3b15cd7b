"""llava-hf dirs (no `llavakit` record) read as llavakit models.

Their projector is transformers' (`mlp2x_gelu`), their aspect mode follows the image processor
(`do_pad`), and their chat template is the dir's own: recorded as the `tokenizer` template with that
Jinja set on the tokenizer (or a named template if asked). The template must render llavakit's
string-content messages; templates that only work with content-part lists are refused with a pointer
to `--template`.

Weights are read under either naming: llavakit's own (`model.language_model.*`, `lm_head.*`) or the
llava-hf Hub's (`language_model.model.*`, `language_model.lm_head.*`, `vision_tower.vision_model.*`,
`multi_modal_projector.*`, which `export --format hf` writes); see `load_weights`.
"""

from __future__ import annotations

import json
from pathlib import Path

# transformers 5 maps the Hub's `language_model.lm_head.*` to `lm_head.*` only for its own classes: it
# skips a model type's conversion mapping for subclasses defined outside transformers (`is_custom_code`),
# and LlavakitForConditionalGeneration is one. The other Hub names are still mapped (by the native
# LlavaModel / CLIP sub-modules' own mappings), so without this the LM head alone stays randomly
# initialised (reported as a missing key, which TRANSFORMERS_VERBOSITY=error hides).
HUB_KEY_MAPPING = {r"^language_model\.lm_head\.": "lm_head."}

_PROBE = [{"role": "user", "content": "<image>\nWhat colour is the ball?"}, {"role": "assistant", "content": "Red."}]


def model_dir(path: str | Path) -> Path:
    """A model dir, or a training run dir holding one in `model/`."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        return path / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path} (config.json missing)")
    return path


NOT_LLAVA = {
    "llava_next": "LLaVA-NeXT (anyres tiling, image_newline) is not supported; llavakit reads LLaVA-1.5-style `llava` dirs",
    "llava_onevision": "LLaVA-OneVision (anyres tiling) is not supported; llavakit reads LLaVA-1.5-style `llava` dirs",
    "llava_next_video": "LLaVA-NeXT-Video is not supported; llavakit reads LLaVA-1.5-style `llava` dirs",
    "llava_llama": "an original LLaVA checkpoint: convert it with `llavakit convert --from llava`",
}
"""model_type -> why a dir of that type is refused (transformers would read it into LlavaConfig with a warning)."""


def check_llava_config(path: Path) -> None:
    """A llava-hf dir: model_type `llava` with a vision tower llavakit knows; else a ValueError saying what it is."""
    from llavakit.model.build import VISION_TOWERS

    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    kind = config.get("model_type")
    if kind != "llava":
        raise ValueError(f"{path}: model_type {kind!r}: " + NOT_LLAVA.get(kind, "not a llava model dir"))
    tower = (config.get("vision_config") or {}).get("model_type", "clip_vision_model")
    if tower not in VISION_TOWERS:
        raise ValueError(f"{path}: vision tower {tower!r} is not supported; known: {', '.join(VISION_TOWERS)}")


def load_processors(path: Path):
    """(tokenizer, image processor) of a model dir; FileNotFoundError naming the dir and the part that is missing.

    transformers raises an OSError with a Hub-oriented message (and a traceback from the CLI) instead."""
    from transformers import AutoImageProcessor, AutoTokenizer

    parts = (("tokenizer", AutoTokenizer, "tokenizer.json / tokenizer_config.json"),
             ("image processor", AutoImageProcessor, "preprocessor_config.json or processor_config.json"))
    loaded = []
    for what, auto, files in parts:
        try:
            loaded.append(auto.from_pretrained(path))
        except (OSError, ValueError) as exc:  # missing files: OSError, or ValueError when no tokenizer can be built
            raise FileNotFoundError(f"model dir {path} has no usable {what} ({files}): {exc}") from None
    return tuple(loaded)


def load_weights(path: str | Path, dtype=None):
    """`LlavakitForConditionalGeneration.from_pretrained(path)` for llavakit's and llava-hf's weight names.

    The next `save_pretrained` writes llavakit's own names (as for a freshly built model), not a
    mixture of the two: transformers 5 otherwise reverts the load-time renames on save.
    """
    import torch

    from llavakit.model.modeling import LlavakitForConditionalGeneration

    model = LlavakitForConditionalGeneration.from_pretrained(path, dtype=dtype or torch.float32,
                                                             key_mapping=HUB_KEY_MAPPING)
    if hasattr(model, "_weight_conversions"):
        model._weight_conversions = None
    return model.eval()


def named_template(name: str):
    """The registered template `name`; ValueError listing the known names otherwise."""
    from llavakit.data.templates import get_template, template_names

    if name not in template_names():
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(template_names())}")
    return get_template(name)


def use_template(lm, name: str):
    """`lm` (a loaded llavakit dir) prompted with the registered template `name` instead of its recorded one.

    For inference only (`chat`/`predict`/`serve --template`): the dir on disk is not changed. The
    template's special tokens must be in the vocabulary and it must render llavakit's messages.
    """
    import dataclasses

    template = named_template(name)
    missing = [t for t in template.special_tokens if t not in lm.tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"template {template.name!r} needs tokens {missing} that {lm.path}'s tokenizer lacks")
    if template.use_tokenizer_template and not lm.tokenizer.chat_template:
        raise ValueError(f"{lm.path}: its tokenizer has no chat template for --template tokenizer")
    check_renders(template, lm.tokenizer, lm.path)
    meta = dataclasses.replace(lm.meta, template=template.to_dict())
    lm.model.config.llavakit = meta.to_dict()
    return dataclasses.replace(lm, template=template, meta=meta)


def load_with_template(path: str | Path, template: str | None = None, *, dtype: str = "float32"):
    """`load_model(path)`, prompted with the registered template `template` if given.

    A llava-hf dir (no record) is loaded with that template instead of its own (which then need not
    be usable); a llavakit dir keeps its record on disk and is prompted with `template` (`use_template`).
    """
    from llavakit.model.io import load_model

    if template is None:
        return load_model(path, dtype=dtype)
    named_template(template)  # an unknown name fails before anything loads
    path = model_dir(path)
    if not has_record(path):
        return load_hf_dir(path, template, dtype=dtype)
    return use_template(load_model(path, dtype=dtype), template)


def has_record(path: Path) -> bool:
    return bool(json.loads((path / "config.json").read_text(encoding="utf-8")).get("llavakit"))


def dir_chat_template(path: Path, tokenizer) -> str:
    """The dir's chat template: the tokenizer's, else the processor's (chat_template.json/.jinja)."""
    if tokenizer.chat_template:
        return tokenizer.chat_template
    for name, key in (("chat_template.jinja", None), ("chat_template.json", "chat_template")):
        f = path / name
        if f.is_file():
            text = f.read_text(encoding="utf-8")
            return json.loads(text)[key] if key else text
    raise ValueError(f"{path} has no chat template (tokenizer or processor): pass --template")


def check_renders(template, tokenizer, source: Path) -> None:
    """The template must render llavakit's string-content messages with the image marker and text."""
    from jinja2 import TemplateError

    from llavakit.data.render import render_text

    try:
        text = render_text(template, tokenizer, _PROBE, add_generation_prompt=False)
    except TemplateError as exc:
        raise ValueError(f"{source}: its chat template cannot be used by llavakit ({exc}); pass --template (e.g. vicuna_v1)") from None
    asked = template.user_images_only or "What colour is the ball?" in text  # `plain` keeps a user turn's images only
    if "<image>" not in text or not asked or "Red." not in text:
        raise ValueError(f"{source}: its chat template drops string message content (it expects content-part lists); "
                         "pass --template (e.g. vicuna_v1)")


def infer_meta(path: Path, tokenizer, image_processor, template_name: str | None):
    """LlavakitMeta for a llava-hf dir; sets the tokenizer's chat template for the `tokenizer` template."""
    from llavakit.data.templates import get_template
    from llavakit.model.modeling import LlavakitMeta

    template = named_template(template_name) if template_name else get_template("tokenizer")
    if template.use_tokenizer_template:
        tokenizer.chat_template = dir_chat_template(path, tokenizer)
    missing = [t for t in template.special_tokens if t not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"template {template.name!r} needs tokens {missing} that {path}'s tokenizer lacks")
    check_renders(template, tokenizer, path)
    aspect = "pad" if getattr(image_processor, "do_pad", False) else "resize"
    history = [{"from": "llava-hf", "source": str(path)}]
    return LlavakitMeta("mlp2x_gelu", template.to_dict(), aspect, stage="imported", history=history)


def load_hf_dir(path: str | Path, template: str | None = None, *, dtype: str = "float32"):
    """A llava-hf dir (no llavakit record) as a LoadedModel, its meta inferred (see module doc)."""
    import torch

    from llavakit.data.templates import ChatTemplate
    from llavakit.model.io import LoadedModel

    path = model_dir(path)
    check_llava_config(path)
    tokenizer, image_processor = load_processors(path)
    meta = infer_meta(path, tokenizer, image_processor, template)
    model = load_weights(path, getattr(torch, dtype))
    model.config.llavakit = meta.to_dict()
    return LoadedModel(model, tokenizer, image_processor, ChatTemplate.from_dict(meta.template), meta, path)
