"""Save and load llavakit models in the Hugging Face `llava` layout.

On disk: config.json (`model_type: llava`, plus the `llavakit` record), model.safetensors,
tokenizer files with `<image>`, processor_config/preprocessor_config (LlavaProcessor) and the
chat template. `LlavaForConditionalGeneration.from_pretrained(dir)` and
`AutoProcessor.from_pretrained(dir)` read it as they read llava-hf checkpoints.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llavakit.data.templates import ChatTemplate
from llavakit.fsutil import restore_dir, swap_dir
from llavakit.model.modeling import LlavakitMeta


@dataclass
class LoadedModel:
    """A model with everything needed to feed it."""

    model: object
    tokenizer: object
    image_processor: object
    template: ChatTemplate
    meta: LlavakitMeta
    path: Path

    @property
    def image_seq_length(self) -> int:
        return int(self.model.config.image_seq_length)


def build_processor(tokenizer, image_processor, config, template: ChatTemplate, has_cls: bool):
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if has_cls else 0,
        chat_template=template.jinja(tokenizer.chat_template),
    )


def save_model(model, tokenizer, image_processor, out: str | Path, *, has_cls: bool) -> Path:
    """Write atomically: into a temp dir beside `out`, then swapped in (llavakit/fsutil.py)."""
    from llavakit import __version__

    out = Path(out)
    meta = LlavakitMeta.from_config(model.config)
    model.config.llavakit = {**model.config.llavakit, "version": __version__}
    template = ChatTemplate.from_dict(meta.template)
    tokenizer.chat_template = template.jinja(tokenizer.chat_template)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        _set_architecture(tmp / "config.json")
        build_processor(tokenizer, image_processor, model.config, template, has_cls).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        restore_dir(out)
        if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
            raise FileExistsError(f"{out} exists and is not a model dir; refusing to replace it")
        swap_dir(tmp, out)  # the old model stays on disk until the new one is in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _set_architecture(config_path: Path) -> None:
    """Name transformers' own class: our subclass only differs for `linear` projectors, and those are written
    in transformers' layout too (`projector_hidden_act: linear`, identity `linear_2`), so
    `LlavaForConditionalGeneration` computes the same model (tests/test_model.py)."""
    data = json.loads(config_path.read_text())
    data["architectures"] = ["LlavaForConditionalGeneration"]
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def has_cls_token(config) -> bool:
    from llavakit.model.build import VISION_TOWERS

    return VISION_TOWERS[config.vision_config.model_type][1]


def load_model(path: str | Path, *, dtype: str = "float32") -> LoadedModel:
    """Load a llavakit model dir (or a run dir holding one in `model/`, or a llava-hf dir)."""
    import torch
    from transformers.utils import logging as hf_logging

    from llavakit.model.hfdirs import has_record, load_hf_dir, load_processors, load_weights, model_dir

    path = model_dir(path)
    hf_logging.disable_progress_bar()
    if not has_record(path):
        return load_hf_dir(path, dtype=dtype)
    # load_weights, not from_pretrained: `export --format hf` writes the Hub's `language_model.lm_head.*`,
    # which transformers 5 maps for its own classes only (the LM head would stay random)
    tokenizer, image_processor = load_processors(path)  # first: a missing part fails before the weights load
    model = load_weights(path, getattr(torch, dtype))
    meta = LlavakitMeta.from_config(model.config)
    model.eval()
    return LoadedModel(model, tokenizer, image_processor, ChatTemplate.from_dict(meta.template), meta, path)
