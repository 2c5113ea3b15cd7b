"""Hugging Face llava dirs: in (llava-hf checkpoints without llavakit's record) and out (clean export).

In: a llava-hf dir has no `llavakit` record. Its projector is transformers' (`mlp2x_gelu`), its
aspect mode follows the image processor (`do_pad`), and its chat template is the dir's own:
recorded as the `tokenizer` template with that Jinja set on the tokenizer (or a named template if
asked). The template must render llavakit's string-content messages; templates that only work
with content-part lists or use transformers-only tags (`{% generation %}`) are refused with a
pointer to `--template`.

Out: `export --format hf` writes the dir with the weight names llava-hf checkpoints use on the Hub
(`language_model.model.*`, `language_model.lm_head.weight`, `vision_tower.vision_model.*`,
`multi_modal_projector.*`), which transformers 4.x/5.x, vLLM and SGLang all read, plus the
processor and chat template.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from llavakit.model.hfdirs import (  # noqa: F401  (re-exported: the interop API)
    check_renders, dir_chat_template, has_record, infer_meta, load_hf_dir, model_dir,
)

# our module names -> the names llava-hf checkpoints use on disk
CANONICAL_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def load_any(path: str | Path, template: str | None = None):
    """A llavakit dir through `load_model`, a llava-hf dir through `load_hf_dir`."""
    from llavakit.model.io import load_model

    path = model_dir(path)
    if has_record(path):
        if template:
            raise ValueError(f"{path} records its own template; --template applies to llava-hf dirs only")
        return load_model(path)
    return load_hf_dir(path, template)


def import_hf(src: str | Path, out: str | Path, template: str | None = None) -> Path:
    """`convert --from llava-hf`: write a llavakit dir (with its record) from a llava-hf dir."""
    from llavakit.model.io import has_cls_token, save_model

    if has_record(model_dir(src)):
        raise ValueError(f"{src} is already a llavakit model dir (config.json has a 'llavakit' record); "
                         "use it as it is, or `llavakit export --format hf` for a llava-hf dir")
    lm = load_hf_dir(src, template)
    return save_model(lm.model, lm.tokenizer, lm.image_processor, out, has_cls=has_cls_token(lm.model.config))


def canonical_name(key: str) -> str:
    for ours, theirs in CANONICAL_PREFIXES:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    raise ValueError(f"unexpected weight {key!r} in a llava model")


def canonical_state(model) -> dict:
    """Weights under llava-hf's on-disk names (the tied LM head left out, as transformers does)."""
    tied = model.config.text_config.tie_word_embeddings
    return {canonical_name(k): v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


def export_hf(src: str | Path, out: str | Path) -> Path:
    """A clean llava-hf dir: canonical weight names, processor, tokenizer and chat template."""
    from safetensors.torch import save_file

    from llavakit.fsutil import swap_dir
    from llavakit.model.io import has_cls_token, save_model

    lm = load_any(src)
    if lm.meta.projector_type != "mlp2x_gelu":
        raise ValueError(f"{lm.path}: projector {lm.meta.projector_type!r} is not exported: transformers reads the "
                         "llavakit dir as it is (projector_hidden_act 'linear'), but the runtimes this export is for "
                         "(vLLM, SGLang) are only known to run mlp2x_gelu")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise FileExistsError(f"{out} exists and is not a model dir; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}-export-", dir=out.parent))
    try:
        written = save_model(lm.model, lm.tokenizer, lm.image_processor, stage / "m", has_cls=has_cls_token(lm.model.config))
        for f in list(written.glob("model*.safetensors")) + list(written.glob("model.safetensors.index.json")):
            f.unlink()
        save_file(canonical_state(lm.model), written / "model.safetensors", metadata={"format": "pt"})
        swap_dir(written, out)  # the old export stays on disk until the new one is in place
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out
