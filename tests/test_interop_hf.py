"""llava-hf interop: transformers answers as llavakit does; llava-hf dirs come in; clean HF export."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from PIL import Image

from conftest import make_model
from llavakit.data.render import render_text
from llavakit.data.templates import IMAGE_TOKEN
from llavakit.model.io import load_model

QUESTION = "What is in the picture?"
# a chat template that renders llavakit's string-content messages
STRING_TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() }}: {{ m['content'] }} {% endfor %}"
                   "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
MAX_NEW = 12


def sample_image() -> Image.Image:
    img = Image.new("RGB", (48, 30), (200, 20, 20))
    img.paste((20, 20, 220), (10, 5, 30, 25))
    return img


def hf_generate(model_dir, image) -> tuple[list[int], list[int]]:
    """(prompt ids, new ids) through AutoProcessor + apply_chat_template + LlavaForConditionalGeneration."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    enc = proc(images=image, text=text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False)  # [1, T + new]
    n = enc["input_ids"].shape[1]
    return enc["input_ids"][0].tolist(), out[0, n:].tolist()


def llavakit_prompt(lm) -> list[int]:
    """The prompt through llavakit's render path: `<image>` expanded, the recorded template."""
    content = f"{IMAGE_TOKEN}\n{QUESTION}".replace(IMAGE_TOKEN, IMAGE_TOKEN * lm.image_seq_length)
    text = render_text(lm.template, lm.tokenizer, [{"role": "user", "content": content}], add_generation_prompt=True)
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def greedy(lm, ids: list[int], image) -> list[int]:
    """Greedy decoding through LlavakitForConditionalGeneration, full recompute each step, EOS stops."""
    pixels = lm.image_processor(image, return_tensors="pt")["pixel_values"]  # [1, 3, H, W]
    seq, new = list(ids), []
    with torch.no_grad():
        for _ in range(MAX_NEW):
            logits = lm.model(input_ids=torch.tensor([seq]), pixel_values=pixels).logits  # [1, T, V]
            token = int(logits[0, -1].argmax())
            new.append(token)
            if token == lm.tokenizer.eos_token_id:
                break
            seq.append(token)
    return new


# llava-1.5-hf's chat template (Hub, chat_template.json): content-part lists only, `{% generation %}` tags
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def tiny_llava_hf(out, chat_template=LLAVA_HF_TEMPLATE):
    """A llava-hf-style dir as transformers writes one: `LlavaForConditionalGeneration.save_pretrained`
    (untied LM head, Hub weight names) + `LlavaProcessor` with `chat_template`; no llavakit record."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from llavakit.model.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=16, vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(out)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=chat_template).save_pretrained(out)
    return out


def image_logits(model, lm, image=None):
    """Logits of `model` on llavakit's prompt for QUESTION + one image, fed through `lm`'s processor."""
    ids = torch.tensor([llavakit_prompt(lm)])
    pixels = lm.image_processor(image or sample_image(), return_tensors="pt")["pixel_values"]  # [1, 3, H, W]
    with torch.no_grad():
        return model.eval()(input_ids=ids, pixel_values=pixels).logits  # [1, T, V]


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def strip_record(src, dst):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["llavakit"]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_transformers_generate_matches_llavakit(tiny_model_dir):
    lm = load_model(tiny_model_dir)
    image = sample_image()
    hf_prompt, hf_new = hf_generate(tiny_model_dir, image)
    ours = llavakit_prompt(lm)
    assert hf_prompt == ours
    assert hf_new == greedy(lm, ours, image)
    assert len(set(hf_new)) > 1  # a non-degenerate answer, so the comparison means something


def test_transformers_generate_matches_infer_pipeline(tiny_model_dir):
    from llavakit.infer.api import load_pipeline
    from llavakit.infer.params import SamplingParams

    pipe = load_pipeline(tiny_model_dir, fast=False)
    image = sample_image()
    _, hf_new = hf_generate(tiny_model_dir, image)
    done = pipe.complete([([image], f"{IMAGE_TOKEN}\n{QUESTION}")], SamplingParams(max_new_tokens=MAX_NEW))[0]
    assert list(done.token_ids) == hf_new and len(set(hf_new)) > 1


def test_llava_hf_dir_without_record(tiny_model_dir, tmp_path):
    """No llavakit record: projector mlp2x_gelu, template = the dir's chat template, aspect from do_pad."""
    from llavakit.interop.hf import import_hf, load_any

    plain = strip_record(tiny_model_dir, tmp_path / "hf")
    lm, ref = load_any(plain), load_model(tiny_model_dir)
    assert lm.template.name == "tokenizer" and lm.template.use_tokenizer_template
    assert lm.meta.image_aspect_ratio == "pad" and lm.meta.stage == "imported"
    assert llavakit_prompt(lm) == llavakit_prompt(ref)
    image = sample_image()
    assert greedy(lm, llavakit_prompt(lm), image) == greedy(ref, llavakit_prompt(ref), image)
    again = load_model(import_hf(plain, tmp_path / "imported"))
    assert again.meta.history == [{"from": "llava-hf", "source": str(plain)}]
    assert llavakit_prompt(again) == llavakit_prompt(ref)
    with pytest.raises(ValueError, match="already a llavakit model dir"):
        import_hf(tiny_model_dir, tmp_path / "not-written")
    assert not (tmp_path / "not-written").exists()


@pytest.mark.parametrize("change, needle", [
    ({"model_type": "llava_next"}, "model_type 'llava_next': LLaVA-NeXT (anyres tiling, image_newline) is not supported"),
    ({"model_type": "llava_llama"}, "an original LLaVA checkpoint: convert it with `llavakit convert --from llava`"),
    ({"vision_config": {"model_type": "pixtral"}}, "vision tower 'pixtral' is not supported"),
])
def test_llava_hf_dirs_of_other_kinds_are_refused_naming_what_they_are(tiny_model_dir, tmp_path, change, needle):
    from llavakit.interop.hf import import_hf, load_any

    plain = strip_record(tiny_model_dir, tmp_path / "hf")
    config = json.loads((plain / "config.json").read_text())
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (plain / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(needle)):
        load_any(plain)
    with pytest.raises(ValueError, match=re.escape(needle)):
        import_hf(plain, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_llava_hf_template_for_part_lists_refused(tiny_model_dir, tmp_path):
    """A template that only reads content-part lists cannot drive llavakit's render path."""
    from llavakit.interop.hf import load_any

    plain = strip_record(tiny_model_dir, tmp_path / "hf")
    parts_only = ("{% for m in messages %}{{ m['role'].upper() }}: {% for p in m['content'] %}"
                  "{% if p['type'] == 'image' %}<image>\n{% else %}{{ p['text'] }}{% endif %}{% endfor %} {% endfor %}"
                  "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    (plain / "chat_template.jinja").write_text(parts_only)
    with pytest.raises(ValueError, match="expects content-part lists.*--template"):
        load_any(plain)
    lm = load_any(plain, template="vicuna_v1")
    assert llavakit_prompt(lm) == llavakit_prompt(load_model(tiny_model_dir))


def test_export_hf_canonical_layout(tiny_model_dir, tmp_path):
    from safetensors import safe_open
    from transformers import LlavaForConditionalGeneration

    from llavakit.interop.hf import export_hf

    out = export_hf(tiny_model_dir, tmp_path / "export")
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    prefixes = ("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.", "multi_modal_projector.")
    assert keys and all(k.startswith(prefixes) for k in keys)
    assert "vision_tower.vision_model.embeddings.class_embedding" in keys and "language_model.lm_head.weight" in keys
    hf, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ref = load_model(tiny_model_dir)
    ids = torch.tensor([llavakit_prompt(ref)])
    pixels = ref.image_processor(sample_image(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        assert torch.equal(hf.eval()(input_ids=ids, pixel_values=pixels).logits, ref.model(input_ids=ids, pixel_values=pixels).logits)
    again = load_model(out)
    assert again.meta == ref.meta and llavakit_prompt(again) == llavakit_prompt(ref)


def test_export_hf_from_a_training_run_dir(tiny_model_dir, tmp_path):
    from llavakit.interop.hf import export_hf

    shutil.copytree(tiny_model_dir, tmp_path / "run" / "model")
    out = export_hf(tmp_path / "run", tmp_path / "export")
    assert load_model(out).meta == load_model(tiny_model_dir).meta


def test_export_hf_refuses_linear(tiny_parts, tmp_path):
    from llavakit.interop.hf import export_hf

    src = make_model(tiny_parts, tmp_path / "lin", projector="linear")
    with pytest.raises(ValueError, match="projector 'linear' is not exported: transformers reads the llavakit dir as it is"):
        export_hf(src, tmp_path / "out")


def test_export_hf_logits_round_trip(tiny_model_dir, tmp_path):
    """The exported dir (llava-hf Hub names) loads back, through load_model and transformers, to the same logits."""
    from transformers import LlavaForConditionalGeneration

    from llavakit.interop.hf import export_hf

    ref = load_model(tiny_model_dir)
    assert not ref.model.config.text_config.tie_word_embeddings  # an LM head of its own, stored under its Hub name
    out = export_hf(tiny_model_dir, tmp_path / "export")
    want = image_logits(ref.model, ref)
    again = load_model(out)
    assert llavakit_prompt(again) == llavakit_prompt(ref)
    diff = max_diff(image_logits(again.model, again), want)
    assert diff <= 1e-4, f"load_model of the export: max |dlogit| {diff:.3g}"
    hf, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    diff = max_diff(image_logits(hf, ref), want)
    assert diff <= 1e-4, f"LlavaForConditionalGeneration of the export: max |dlogit| {diff:.3g}"
    assert want.abs().max().item() > 0.1  # not trivially zero


def test_llava_hf_dir_with_hub_names_loads_its_lm_head(tmp_path):
    """A dir as transformers writes it (`language_model.lm_head.weight`, ...): same logits as transformers,
    also after `convert --from llava-hf`, which writes llavakit's own names."""
    from transformers import LlavaForConditionalGeneration

    from llavakit.interop.hf import import_hf

    plain = tiny_llava_hf(tmp_path / "hf", chat_template=STRING_TEMPLATE)
    lm = load_model(plain)
    assert lm.template.name == "tokenizer" and lm.meta.image_aspect_ratio == "resize"
    want = image_logits(LlavaForConditionalGeneration.from_pretrained(plain), lm)
    diff = max_diff(image_logits(lm.model, lm), want)
    assert diff <= 1e-4, f"load_model: max |dlogit| {diff:.3g}"
    imported = load_model(import_hf(plain, tmp_path / "imported"))
    diff = max_diff(image_logits(imported.model, imported), want)
    assert diff <= 1e-4, f"load_model after convert --from llava-hf: max |dlogit| {diff:.3g}"


def test_llava_hf_dir_with_its_own_template_refused_by_load_model(tmp_path):
    """llava-hf's own template (part lists, `{% generation %}`): load_model refuses and names --template."""
    from llavakit.interop.hf import load_any

    plain = tiny_llava_hf(tmp_path / "hf")
    with pytest.raises(ValueError, match="cannot be used by llavakit.*pass --template"):
        load_model(plain)
    assert load_any(plain, template="vicuna_v1").template.name == "vicuna_v1"
