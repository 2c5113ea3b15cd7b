"""The model: HF llava layout, parity with transformers, projectors, encoders, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import make_model
from llavakit.data.render import RenderOptions, render_record
from llavakit.model.io import load_model

RECORD = {"id": "r", "image": "a.png", "conversations": [
    {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A red square."}]}


def batch_for(lm, images=None):
    """input_ids/pixel_values for RECORD through llavakit's own data path."""
    s = render_record(RECORD, lm.tokenizer, lm.template, RenderOptions(lm.image_seq_length))
    images = images or [Image.new("RGB", (48, 30), (200, 20, 20))]
    pixels = lm.image_processor(images, return_tensors="pt")["pixel_values"]  # [N, 3, H, W]
    return torch.tensor([s.input_ids]), pixels, torch.tensor([s.labels])


def test_hf_llava_loads_with_same_logits(tiny_model_dir):
    from transformers import LlavaForConditionalGeneration

    lm = load_model(tiny_model_dir)
    hf, info = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, pixels, _ = batch_for(lm)
    with torch.no_grad():
        ours = lm.model(input_ids=ids, pixel_values=pixels).logits  # [1, T, V]
        theirs = hf.eval()(input_ids=ids, pixel_values=pixels).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("parts", [dict(vision="siglip", lm="qwen2", template="chatml"),  # tied embeddings (as SmolLM2)
                                   dict(select_strategy="full", vision_feature_layer=-1)],  # CLS kept, last layer
                         ids=["siglip-qwen2-tied", "clip-full-last-layer"])
def test_hf_llava_same_logits_for_other_towers_lms_and_feature_choices(tiny_parts, tmp_path, parts):
    from transformers import LlavaForConditionalGeneration

    out = make_model(tiny_parts, tmp_path / "m", **parts)
    lm = load_model(out)
    hf, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tied = lm.model.config.get_text_config().tie_word_embeddings
    assert tied == (parts.get("lm") == "qwen2")
    if tied:  # the `<image>` row added at init is in the output embedding too
        assert lm.model.get_output_embeddings().weight.data_ptr() == lm.model.get_input_embeddings().weight.data_ptr()
        assert hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    ids, pixels, _ = batch_for(lm)
    with torch.no_grad():
        ours = lm.model(input_ids=ids, pixel_values=pixels).logits  # [1, T, V]
        theirs = hf.eval()(input_ids=ids, pixel_values=pixels).logits
        blank = lm.model(input_ids=ids, pixel_values=torch.zeros_like(pixels)).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours - blank).abs().max().item() > 1e-3  # the image reaches the logits


SMOL_LIKE = (  # SmolLM2's chat template, as the default model records it: written for string content
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer_template_model(tiny_parts, tmp_path_factory) -> Path:
    """A model whose template is `tokenizer` (the default model's case), its LM's tokenizer holding SMOL_LIKE."""
    import shutil

    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tokenizer_template")
    lm_dir = Path(shutil.copytree(tiny_parts["llama"], root / "lm"))
    tok = AutoTokenizer.from_pretrained(lm_dir)
    tok.chat_template = SMOL_LIKE
    tok.save_pretrained(lm_dir)
    return make_model({**tiny_parts, "llama": lm_dir}, root / "m", template="tokenizer")


@pytest.mark.parametrize("which", ["vicuna_v1", "tokenizer"])
def test_hf_processor_matches_llavakit_data_path(tiny_model_dir, tokenizer_template_model, which):
    """AutoProcessor + apply_chat_template with content parts gives llavakit's ids, also for a tokenizer's own
    chat template written for string content."""
    from transformers import AutoProcessor

    model_dir = tiny_model_dir if which == "vicuna_v1" else tokenizer_template_model
    lm = load_model(model_dir)
    assert lm.template.name == which
    proc = AutoProcessor.from_pretrained(model_dir)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    image = Image.new("RGB", (48, 30), (200, 20, 20))
    enc = proc(images=image, text=text, return_tensors="pt")
    ids, pixels, _ = batch_for(lm, [image])
    assert enc["input_ids"][0].tolist() == ids[0, : enc["input_ids"].shape[1]].tolist()
    assert torch.equal(enc["pixel_values"], pixels)


def test_image_token_count_mismatch_raises(tiny_model_dir):
    lm = load_model(tiny_model_dir)
    ids, pixels, _ = batch_for(lm)
    image_id = lm.model.config.image_token_id
    bad = ids.clone()
    bad[0, (bad[0] == image_id).nonzero()[0, 0]] = lm.tokenizer.pad_token_id  # one image token fewer
    with pytest.raises(ValueError, match=r"15 <image> tokens in input_ids, 16 image features"):
        lm.model(input_ids=bad, pixel_values=pixels)


def test_save_load_round_trip(tiny_model_dir, tmp_path):
    from llavakit.model.io import has_cls_token, save_model

    lm = load_model(tiny_model_dir)
    ids, pixels, labels = batch_for(lm)
    out = save_model(lm.model, lm.tokenizer, lm.image_processor, tmp_path / "copy", has_cls=has_cls_token(lm.model.config))
    again = load_model(out)
    with torch.no_grad():
        a = lm.model(input_ids=ids, pixel_values=pixels, labels=labels)
        b = again.model(input_ids=ids, pixel_values=pixels, labels=labels)
    assert torch.equal(a.logits, b.logits) and a.loss.item() == b.loss.item()
    assert again.template == lm.template and again.meta == lm.meta
    from llavakit import __version__

    assert again.meta.version == __version__  # the version that wrote it


def test_saving_over_a_model_replaces_it_and_a_failed_save_keeps_it(tiny_model_dir, tmp_path, monkeypatch):
    import llavakit.model.io as io

    lm = load_model(tiny_model_dir)
    out = io.save_model(lm.model, lm.tokenizer, lm.image_processor, tmp_path / "m", has_cls=io.has_cls_token(lm.model.config))
    bias = lm.model.model.multi_modal_projector.linear_1.bias
    with torch.no_grad():
        bias += 1.0
    io.save_model(lm.model, lm.tokenizer, lm.image_processor, out, has_cls=io.has_cls_token(lm.model.config))
    assert torch.equal(load_model(out).model.model.multi_modal_projector.linear_1.bias, bias)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp or old copy left beside it
    real = os.replace

    def fail_moving_in(src, dst):
        if Path(dst) == out and not str(src).endswith(".old"):
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_moving_in)
    with torch.no_grad():
        bias += 1.0
    with pytest.raises(OSError, match="disk full"):
        io.save_model(lm.model, lm.tokenizer, lm.image_processor, out, has_cls=io.has_cls_token(lm.model.config))
    assert torch.equal(load_model(out).model.model.multi_modal_projector.linear_1.bias, bias - 1.0)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_checkpoint_records_its_config(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["architectures"] == ["LlavaForConditionalGeneration"]
    meta = cfg["llavakit"]
    assert meta["projector_type"] == "mlp2x_gelu" and meta["template"]["name"] == "vicuna_v1"
    assert meta["template"]["assistant_prefix"] == "ASSISTANT:" and meta["image_aspect_ratio"] == "pad"
    assert cfg["vision_feature_layer"] == -2 and cfg["vision_feature_select_strategy"] == "default"
    assert cfg["image_seq_length"] == 16  # (32 / 8) ** 2 patches, CLS dropped
    assert (tiny_model_dir / "chat_template.jinja").is_file()


def test_siglip_and_qwen2_linear(tiny_parts, tmp_path):
    """Another encoder and LM family, with LLaVA 1.0's linear projector (loads through llavakit)."""
    out = make_model(tiny_parts, tmp_path / "m", vision="siglip", lm="qwen2", projector="linear", template="chatml")
    lm = load_model(out)
    assert lm.model.config.vision_feature_select_strategy == "full"  # SigLIP has no CLS token
    assert lm.image_seq_length == 16
    proj = lm.model.model.multi_modal_projector
    assert [n for n, _ in proj.named_parameters()] == ["linear_1.weight", "linear_1.bias"]  # linear_2: fixed buffers
    assert [n for n, _ in proj.named_buffers()] == ["linear_2.weight", "linear_2.bias"]
    ids, pixels, labels = batch_for(lm)
    out_ = lm.model(input_ids=ids, pixel_values=pixels, labels=labels)
    assert torch.isfinite(out_.loss)


@pytest.mark.parametrize("lm_name", ["llama", "qwen2"])  # qwen2: tied embeddings
def test_hf_llava_loads_a_linear_projector_exactly(tiny_parts, tmp_path, lm_name):
    """`linear` is written in transformers' layout: projector_hidden_act 'linear' (the identity) and an
    identity linear_2, so plain LlavaForConditionalGeneration loads every tensor and gives our logits."""
    from transformers import LlavaForConditionalGeneration

    out = make_model(tiny_parts, tmp_path / "m", lm=lm_name, projector="linear")
    assert json.loads((out / "config.json").read_text())["projector_hidden_act"] == "linear"
    hf, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    width = hf.config.text_config.hidden_size
    assert torch.equal(hf.model.multi_modal_projector.linear_2.weight, torch.eye(width))
    assert torch.equal(hf.model.multi_modal_projector.linear_2.bias, torch.zeros(width))
    lm = load_model(out)
    ids, pixels, _ = batch_for(lm)
    with torch.no_grad():
        ours = lm.model(input_ids=ids, pixel_values=pixels).logits  # [1, T, V]
        theirs = hf.eval()(input_ids=ids, pixel_values=pixels).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_a_linear_projector_dir_written_without_linear_2_still_loads_exactly(tiny_parts, tmp_path):
    """Dirs written before the identity linear_2 (projector_hidden_act 'gelu', no linear_2 tensors): llavakit
    loads them with the identity (transformers would leave it uninitialised) and saves them in the new form."""
    from safetensors.torch import load_file, save_file

    from llavakit.model import io

    new = make_model(tiny_parts, tmp_path / "new", projector="linear")
    old = tmp_path / "old"
    old.mkdir()
    for f in new.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "projector_hidden_act": "gelu"}))
    tensors = {k: v for k, v in load_file(new / "model.safetensors").items() if ".linear_2." not in k}
    save_file(tensors, old / "model.safetensors", metadata={"format": "pt"})
    lm_new, lm_old = load_model(new), load_model(old)
    assert lm_old.model.config.projector_hidden_act == "linear"
    ids, pixels, _ = batch_for(lm_new)
    with torch.no_grad():
        want = lm_new.model(input_ids=ids, pixel_values=pixels).logits  # [1, T, V]
        assert torch.equal(lm_old.model(input_ids=ids, pixel_values=pixels).logits, want)
    resaved = io.save_model(lm_old.model, lm_old.tokenizer, lm_old.image_processor, tmp_path / "resaved", has_cls=True)
    assert json.loads((resaved / "config.json").read_text())["projector_hidden_act"] == "linear"
    assert load_file(resaved / "model.safetensors").keys() == load_file(new / "model.safetensors").keys()


def test_full_strategy_keeps_cls(tiny_parts, tmp_path):
    lm = load_model(make_model(tiny_parts, tmp_path / "m", select_strategy="full", vision_feature_layer=-1))
    assert lm.image_seq_length == 17
    ids, pixels, labels = batch_for(lm)
    assert torch.isfinite(lm.model(input_ids=ids, pixel_values=pixels, labels=labels).loss)


def test_pad_to_square_uses_mean_colour(tiny_model_dir):
    lm = load_model(tiny_model_dir)
    assert lm.image_processor.do_pad
    wide = Image.new("RGB", (64, 16), (255, 255, 255))
    px = lm.image_processor(wide, return_tensors="pt")["pixel_values"][0]  # [3, 32, 32]
    # Top rows are padding: the mean colour normalises to ~0; the centre row is the white image.
    assert px[:, 0, :].abs().max() < 0.02
    assert px[:, 16, :].min() > 1.5


def test_init_rejects_bad_input(tiny_parts, tmp_path):
    from llavakit.model.build import InitConfig

    with pytest.raises(ValueError, match="unknown projector .mlp3x."):
        InitConfig(vision="v", lm="l", out=str(tmp_path / "a"), projector="mlp3x")
    with pytest.raises(KeyError, match="unknown chat template"):
        InitConfig(vision="v", lm="l", out=str(tmp_path / "a"), template="nope")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        InitConfig(vision="v", lm="l", out=str(tmp_path / "full"))
    with pytest.raises(ValueError, match="unsupported"):
        from llavakit.model.build import load_vision

        load_vision(str(tiny_parts["llama"]))


def test_load_missing_model_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        load_model(tmp_path / "nothing")


@pytest.mark.parametrize("missing, part", [("processor_config.json", "image processor"),
                                           ("tokenizer.json", "tokenizer")])
def test_load_names_a_missing_processor_part(tiny_model_dir, tmp_path, missing, part):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir, copy)
    (copy / missing).unlink()
    if part == "tokenizer":
        (copy / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"model dir {copy} has no usable {part}"):
        load_model(copy)


def test_init_refuses_a_feature_layer_the_tower_lacks_and_default_without_cls(tiny_parts, tmp_path):
    """Caught when the model is assembled, not at its first forward (IndexError) or image (token count)."""
    with pytest.raises(ValueError, match=r"vision feature layer 40 is outside the tower's \d+ layers"):
        make_model(tiny_parts, tmp_path / "a", vision_feature_layer=40)
    with pytest.raises(ValueError, match=r"select strategy 'default' drops a CLS token, and this tower \(siglip"):
        make_model(tiny_parts, tmp_path / "b", vision="siglip", select_strategy="default")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_image_processor_keeps_the_towers_resample_mean_and_squash(tiny_parts, tmp_path):
    """The processor written next to a model uses the tower's own filter, mean/std and (SigLIP) squash to size."""
    import shutil

    from transformers import AutoImageProcessor, CLIPImageProcessor, CLIPVisionConfig

    from llavakit.model.build import image_processor_for

    tower = tmp_path / "clip"
    shutil.copytree(tiny_parts["clip"], tower)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=2,
                       image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25]).save_pretrained(tower)
    proc = image_processor_for(str(tower), CLIPVisionConfig(image_size=32), pad=True)
    assert (proc.resample, list(proc.image_mean), list(proc.image_std), proc.do_pad) == (2, [0.5] * 3, [0.25] * 3, True)
    bicubic = image_processor_for(str(tiny_parts["clip"]), CLIPVisionConfig(image_size=32), pad=False)
    assert bicubic.resample == 3 and bicubic.do_center_crop and bicubic.crop_size == {"height": 32, "width": 32}
    siglip = image_processor_for(str(tiny_parts["siglip"]), CLIPVisionConfig(image_size=32), pad=False)
    src = AutoImageProcessor.from_pretrained(tiny_parts["siglip"])
    assert not siglip.do_center_crop and siglip.size == {"height": 32, "width": 32}
    assert (siglip.resample, list(siglip.image_mean)) == (src.resample, list(src.image_mean))
