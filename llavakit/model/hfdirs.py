"""llava-hf dirs (no `llavakit` record) read as llavakit models.

Their projector is transformers' (`mlp2x_gelu`), their aspect mode follows the image processor
(`do_pad`), and their chat template is the dir's own: recorded as the `tokenizer` template with that
Jinja set on the tokenizer (or a named template if asked). The template must render llavakit's
string-content messages; templates that only work with content-part lists are refused with a pointer
to `--template`.
"""

from __future__ import annotations

import json
from pathlib import Path

_PROBE = [{"role": "user", "content": "<image>\nWhat colour is the ball?"}, {"role": "assistant", "content": "Red."}]


def model_dir(path: str | Path) -> Path:
    """A model dir, or a training run dir holding one in `model/`."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        return path / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path} (config.json missing)")
    return path


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
    if "<image>" not in text or "What colour is the ball?" not in text or "Red." not in text:
        raise ValueError(f"{source}: its chat template drops string message content (it expects content-part lists); "
                         "pass --template (e.g. vicuna_v1)")


def infer_meta(path: Path, tokenizer, image_processor, template_name: str | None):
    """LlavakitMeta for a llava-hf dir; sets the tokenizer's chat template for the `tokenizer` template."""
    from llavakit.data.templates import get_template
    from llavakit.model.modeling import LlavakitMeta

    template = get_template(template_name or "tokenizer")
    if template.use_tokenizer_template:
        tokenizer.chat_template = dir_chat_template(path, tokenizer)
    missing = [t for t in template.special_tokens if t not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"template {template.name!r} needs tokens {missing} that {path}'s tokenizer lacks")
    check_renders(template, tokenizer, path)
    aspect = "pad" if getattr(image_processor, "do_pad", False) else "resize"
    history = [{"from": "llava-hf", "source": str(path)}]
    return LlavakitMeta("mlp2x_gelu", template.to_dict(), aspect, stage="imported", history=history)


def load_hf_dir(path: str | Path, template: str | None = None):
    """A llava-hf dir (no llavakit record) as a LoadedModel, its meta inferred (see module doc)."""
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer

    from llavakit.data.templates import ChatTemplate
    from llavakit.model.io import LoadedModel
    from llavakit.model.modeling import LlavakitForConditionalGeneration

    path = model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path)
    meta = infer_meta(path, tokenizer, image_processor, template)
    model = LlavakitForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    model.config.llavakit = meta.to_dict()
    return LoadedModel(model, tokenizer, image_processor, ChatTemplate.from_dict(meta.template), meta, path)
