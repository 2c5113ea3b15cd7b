"""`llavakit convert --from llava`: tiny checkpoints written here in the original LLaVA layout.

Each converted model is checked against a reference forward that mimics the original repo from
the original-layout files alone: a LlamaForCausalLM with those weights, the CLIP tower's
hidden_states[layer], CLS dropped for 'patch', the projector as raw matrices, and the features
spliced into the embeddings where the original puts its -200 image index.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from llavakit.interop.convert import ConvertConfig, convert_llava
from llavakit.model.io import load_model

TOWER_ID = "openai/clip-vit-large-patch14-336"  # what the original config names; tests pass --vision
LEGACY_KEYS = {
    "mm_vision_tower": TOWER_ID, "mm_hidden_size": 32, "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
    "mm_patch_merge_type": "flat", "image_aspect_ratio": "pad", "tune_mm_mlp_adapter": False, "use_mm_proj": True,
    "freeze_mm_mlp_adapter": False, "tokenizer_padding_side": "right", "tokenizer_model_max_length": 2048,
}
PROMPT_BEFORE = "A chat between a curious human and an artificial intelligence assistant. USER: "
PROMPT_AFTER = "\nWhat is in the image? ASSISTANT:"


# ---- writing checkpoints in the original layout ------------------------------------------------

def legacy_config(parts, *, projector="mlp2x_gelu", feature="patch", layer=-2, **extra) -> dict:
    base = json.loads((parts["llama"] / "config.json").read_text())
    return {**base, **LEGACY_KEYS, "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
            "mm_projector_type": projector, "mm_vision_select_feature": feature, "mm_vision_select_layer": layer, **extra}


def lm_weights(parts) -> dict:
    from safetensors.torch import load_file

    return load_file(parts["llama"] / "model.safetensors")  # model.embed_tokens/layers/norm, lm_head


def projector_weights(projector: str, seed: int = 1, hidden: int = 64, mm_hidden: int = 32) -> dict:
    g = torch.Generator().manual_seed(seed)
    if projector == "linear":
        return {"model.mm_projector.weight": torch.randn(hidden, mm_hidden, generator=g) * 0.2,  # [Dt, Dv]
                "model.mm_projector.bias": torch.randn(hidden, generator=g) * 0.1}
    return {"model.mm_projector.0.weight": torch.randn(hidden, mm_hidden, generator=g) * 0.2,  # [Dt, Dv]
            "model.mm_projector.0.bias": torch.randn(hidden, generator=g) * 0.1,
            "model.mm_projector.2.weight": torch.randn(hidden, hidden, generator=g) * 0.2,  # [Dt, Dt]
            "model.mm_projector.2.bias": torch.randn(hidden, generator=g) * 0.1}


def tower_weights(parts, seed: int = 2) -> dict:
    """The tiny CLIP's vision weights, perturbed, named as the original stores an unfrozen tower."""
    from transformers import CLIPVisionModel

    g = torch.Generator().manual_seed(seed)
    tower = CLIPVisionModel.from_pretrained(parts["clip"]).state_dict()
    return {f"model.vision_tower.vision_tower.vision_model.{k}": v + 0.05 * torch.randn(v.shape, generator=g)
            for k, v in tower.items()}


def save_shards(out: Path, state: dict, fmt: str, shards: int) -> None:
    from safetensors.torch import save_file

    keys = sorted(state)
    stem, ext = ("pytorch_model", "bin") if fmt == "bin" else ("model", "safetensors")
    if shards == 1:
        part = {k: state[k].contiguous() for k in keys}
        torch.save(part, out / f"{stem}.{ext}") if fmt == "bin" else save_file(part, out / f"{stem}.{ext}")
        return
    weight_map = {}
    for i, chunk in enumerate(np.array_split(np.array(keys), shards), start=1):
        chunk = [str(k) for k in chunk]
        name = f"{stem}-{i:05d}-of-{shards:05d}.{ext}"
        part = {k: state[k].contiguous() for k in chunk}
        torch.save(part, out / name) if fmt == "bin" else save_file(part, out / name)
        weight_map.update({k: name for k in chunk})
    (out / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def copy_tokenizer(parts, out: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((parts["llama"] / name).read_bytes())


def write_full(out: Path, parts, *, projector="mlp2x_gelu", feature="patch", layer=-2, tower=False, fmt="bin", shards=2) -> Path:
    out.mkdir(parents=True)
    state = {**lm_weights(parts), **projector_weights(projector)}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # a buffer old transformers saved
    if tower:
        state.update(tower_weights(parts))
    save_shards(out, state, fmt, shards)
    (out / "config.json").write_text(json.dumps(legacy_config(parts, projector=projector, feature=feature, layer=layer)))
    copy_tokenizer(parts, out)
    return out


def write_stage1(out: Path, parts) -> Path:
    out.mkdir(parents=True)
    torch.save(projector_weights("mlp2x_gelu", seed=3), out / "mm_projector.bin")
    (out / "config.json").write_text(json.dumps(legacy_config(parts)))
    return out


def write_lora(out: Path, parts) -> Path:
    """A LoRA dir as the original's training writes it, with non-zero lora_B so the merge matters."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import LlamaForCausalLM

    out.mkdir(parents=True)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(LlamaForCausalLM.from_pretrained(parts["llama"]), lora)
    g = torch.Generator().manual_seed(4)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.2
    torch.save(get_peft_model_state_dict(model), out / "adapter_model.bin")
    lora.save_pretrained(out)
    torch.save({f"base_model.model.{k}": v for k, v in projector_weights("mlp2x_gelu", seed=5).items()}, out / "non_lora_trainables.bin")
    (out / "config.json").write_text(json.dumps(legacy_config(parts)))
    return out


# ---- the reference: the original's forward, from the original files ---------------------------

def read_all(src: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(src.glob("*.bin")) + sorted(src.glob("*.safetensors")):
        state.update(torch.load(f, weights_only=True) if f.suffix == ".bin" else load_file(f))
    return state


def manual_lora_merge(lm: dict, adapter: dict, scale: float) -> dict:
    out = dict(lm)
    for key in adapter:
        if ".lora_A." not in key:
            continue
        target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        a, b = adapter[key], adapter[key.replace("lora_A", "lora_B")]  # [r, in], [out, r]
        out[target] = lm[target] + scale * (b @ a)  # [out, in]
    return out


def reference_logits(parts, lm_state: dict, raw: dict, pixels, before, after, *, layer, drop_cls, projector):
    from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig.from_pretrained(parts["llama"])).eval()
    lm_keys = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
    llama.load_state_dict({k: v for k, v in lm_state.items() if k.startswith(lm_keys) and not k.endswith("inv_freq")})
    tower = CLIPVisionModel.from_pretrained(parts["clip"]).eval()
    own = {k.split("vision_model.", 1)[1]: v for k, v in raw.items() if k.startswith("model.vision_tower.")}
    if own:
        tower.load_state_dict(own)
    with torch.no_grad():
        h = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]  # [1, 1 + P, Dv]
        h = h[:, 1:] if drop_cls else h
        if projector == "linear":
            feats = F.linear(h, raw["model.mm_projector.weight"], raw["model.mm_projector.bias"])  # [1, N, Dt]
        else:
            mid = F.gelu(F.linear(h, raw["model.mm_projector.0.weight"], raw["model.mm_projector.0.bias"]))
            feats = F.linear(mid, raw["model.mm_projector.2.weight"], raw["model.mm_projector.2.bias"])  # [1, N, Dt]
        emb = llama.get_input_embeddings()
        x = torch.cat([emb(torch.tensor([before])), feats, emb(torch.tensor([after]))], dim=1)  # [1, T, Dt]
        return llama(inputs_embeds=x).logits  # [1, T, V]


def sample_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (30, 48, 3), dtype=np.uint8))  # wide: padding matters


def converted_logits(out: Path, before, after):
    lm = load_model(out)
    image_id = lm.model.config.image_token_id
    ids = torch.tensor([before + [image_id] * lm.image_seq_length + after])  # [1, T]
    pixels = lm.image_processor(sample_image(), return_tensors="pt")["pixel_values"]  # [1, 3, 32, 32]
    with torch.no_grad():
        return lm.model(input_ids=ids, pixel_values=pixels).logits, pixels, lm  # [1, T, V']


def prompt_ids(parts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(parts["llama"])
    before = [tok.bos_token_id] + tok(PROMPT_BEFORE, add_special_tokens=False)["input_ids"]
    return before, tok(PROMPT_AFTER, add_special_tokens=False)["input_ids"], len(tok)


def assert_matches_reference(parts, out, lm_state, raw, **kw):
    before, after, vocab = prompt_ids(parts)
    ours, pixels, lm = converted_logits(out, before, after)
    ref = reference_logits(parts, lm_state, raw, pixels, before, after, **kw)
    assert ours.shape[1] == ref.shape[1]
    assert (ours[..., :vocab] - ref).abs().max().item() <= 1e-4
    return lm


def convert(src, out, parts, **kw) -> Path:
    return convert_llava(ConvertConfig(src=str(src), out=str(out), vision=str(parts["clip"]), **kw))


# ---- tests ------------------------------------------------------------------------------------

def test_full_sharded_bin_mlp(tiny_parts, tmp_path):
    src = write_full(tmp_path / "src", tiny_parts, fmt="bin", shards=2)
    out = convert(src, tmp_path / "out", tiny_parts)
    raw = read_all(src)
    lm = assert_matches_reference(tiny_parts, out, raw, raw, layer=-2, drop_cls=True, projector="mlp2x_gelu")
    assert lm.image_seq_length == 16 and lm.meta.stage == "converted" and lm.meta.template["name"] == "vicuna_v1"
    assert lm.meta.history[0]["layout"] == "full" and lm.meta.history[0]["vision_weights"] == "tower"


def test_full_safetensors_linear_cls_patch_with_tower_weights(tiny_parts, tmp_path):
    """LLaVA 1.0 style: linear projector, CLS kept, last layer, tower weights inside the checkpoint."""
    src = write_full(tmp_path / "src", tiny_parts, projector="linear", feature="cls_patch", layer=-1,
                     tower=True, fmt="safetensors", shards=1)
    out = convert(src, tmp_path / "out", tiny_parts, template="llava_v1")
    raw = read_all(src)
    lm = assert_matches_reference(tiny_parts, out, raw, raw, layer=-1, drop_cls=False, projector="linear")
    assert lm.image_seq_length == 17 and lm.meta.projector_type == "linear"
    assert lm.meta.history[0]["vision_weights"] == "checkpoint"


def test_stage1_projector_with_base_lm(tiny_parts, tmp_path):
    src = write_stage1(tmp_path / "src", tiny_parts)
    with pytest.raises(ValueError, match="pass --lm"):
        convert(src, tmp_path / "nolm", tiny_parts)
    out = convert(src, tmp_path / "out", tiny_parts, lm=str(tiny_parts["llama"]))
    lm = assert_matches_reference(tiny_parts, out, lm_weights(tiny_parts), read_all(src), layer=-2, drop_cls=True, projector="mlp2x_gelu")
    assert lm.meta.history[0]["layout"] == "stage1"
    assert lm.template.name == "plain"  # how a stage-1 projector was trained (--template picks another)


def test_lora_dir_merged(tiny_parts, tmp_path):
    src = write_lora(tmp_path / "src", tiny_parts)
    out = convert(src, tmp_path / "out", tiny_parts, lm=str(tiny_parts["llama"]))
    adapter = torch.load(src / "adapter_model.bin", weights_only=True)
    merged = manual_lora_merge(lm_weights(tiny_parts), adapter, scale=8 / 4)
    raw = {k.removeprefix("base_model.model."): v for k, v in torch.load(src / "non_lora_trainables.bin", weights_only=True).items()}
    assert_matches_reference(tiny_parts, out, merged, raw, layer=-2, drop_cls=True, projector="mlp2x_gelu")
    # without the merge the answer differs: the test can tell a dropped adapter
    before, after, vocab = prompt_ids(tiny_parts)
    ours, pixels, _ = converted_logits(out, before, after)
    unmerged = reference_logits(tiny_parts, lm_weights(tiny_parts), raw, pixels, before, after, layer=-2, drop_cls=True, projector="mlp2x_gelu")
    assert (ours[..., :vocab] - unmerged).abs().max().item() > 1e-2


def test_tokens_added_and_embeddings_grown(tiny_parts, tmp_path):
    src = write_full(tmp_path / "src", tiny_parts, shards=1)
    lm = load_model(convert(src, tmp_path / "out", tiny_parts))
    _, _, vocab = prompt_ids(tiny_parts)
    image_id = lm.tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == vocab and len(lm.tokenizer) == vocab + 1
    emb = lm.model.get_input_embeddings().weight  # [V + 1, D]
    assert emb.shape[0] == vocab + 1 and lm.model.lm_head.weight.shape[0] == vocab + 1
    assert torch.allclose(emb[image_id], lm_weights(tiny_parts)["model.embed_tokens.weight"].mean(0), atol=1e-6)
    assert lm.tokenizer("USER: <image>\nhi", add_special_tokens=False)["input_ids"].count(image_id) == 1
    assert lm.meta.added_token_ids == [image_id]  # recorded, as by init


def test_added_tokens_in_spare_rows_get_the_mean_row_as_at_init():
    """A matrix with spare rows beyond the tokenizer: the added token's row (by id) is set to the mean of the rows
    before it, the spare rows after it are left alone; a short matrix grows, its added rows set the same way."""
    from llavakit.interop.convert import grow_vocab

    w = torch.randn(10, 4)  # [V, D]: 7 tokens, 3 spare rows
    source = w.clone()
    out = grow_vocab({"model.embed_tokens.weight": w, "lm_head.weight": w * 2}, rows=8, added=[7])
    for key, m in (("model.embed_tokens.weight", w), ("lm_head.weight", w * 2)):
        assert torch.allclose(out[key][7], m[:7].mean(0)) and torch.equal(out[key][[0, 6, 8, 9]], m[[0, 6, 8, 9]])
    assert torch.equal(w, source)  # set in a copy: the checkpoint's tensor is untouched
    grown = grow_vocab({"model.embed_tokens.weight": w}, rows=12, added=[10, 11])["model.embed_tokens.weight"]
    assert grown.shape == (12, 4) and torch.allclose(grown[10:], w.mean(0).expand(2, 4))


def test_pixels_match_original_pad_to_square(tiny_parts, tmp_path):
    """The original pads with the mean colour (expand2square), then runs the tower's CLIP processor."""
    from transformers import CLIPImageProcessor

    src = write_full(tmp_path / "src", tiny_parts, shards=1)
    lm = load_model(convert(src, tmp_path / "out", tiny_parts))
    clip = CLIPImageProcessor.from_pretrained(tiny_parts["clip"])
    img = sample_image()
    fill = tuple(int(x * 255) for x in clip.image_mean)
    square = Image.new("RGB", (48, 48), fill)
    square.paste(img, (0, (48 - 30) // 2))
    ref = clip(square, return_tensors="pt")["pixel_values"]  # [1, 3, 32, 32]
    ours = lm.image_processor(img, return_tensors="pt")["pixel_values"]
    assert (ours - ref).abs().max().item() < 0.05


def test_cli_convert(tiny_parts, tmp_path, capsys):
    from llavakit.cli import main

    src = write_full(tmp_path / "src", tiny_parts, shards=1)
    rc = main(["convert", "--from", "llava", str(src), "--vision", str(tiny_parts["clip"]), "--out", str(tmp_path / "out")])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    assert load_model(tmp_path / "out").meta.stage == "converted"


# ---- bad input --------------------------------------------------------------------------------

def test_unknown_projector_names_config(tiny_parts, tmp_path):
    src = write_full(tmp_path / "src", tiny_parts, shards=1)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "mm_projector_type": "mlp3x_gelu"}))
    with pytest.raises(ValueError, match=r"config.json: unknown mm_projector_type 'mlp3x_gelu'"):
        convert(src, tmp_path / "out", tiny_parts)


def test_projector_shape_mismatch_names_file(tiny_parts, tmp_path):
    src = write_stage1(tmp_path / "src", tiny_parts)
    bad = projector_weights("mlp2x_gelu")
    bad["model.mm_projector.2.weight"] = torch.zeros(64, 48)
    torch.save(bad, src / "mm_projector.bin")
    with pytest.raises(ValueError, match=r"mm_projector.bin: model.multi_modal_projector.linear_2.weight has shape \(64, 48\)"):
        convert(src, tmp_path / "out", tiny_parts, lm=str(tiny_parts["llama"]))


def test_projector_keys_must_fit_type(tiny_parts, tmp_path):
    src = write_stage1(tmp_path / "src", tiny_parts)
    torch.save(projector_weights("linear"), src / "mm_projector.bin")
    with pytest.raises(ValueError, match=r"mm_projector.bin: projector weights \['bias', 'weight'\] do not fit mm_projector_type 'mlp2x_gelu'"):
        convert(src, tmp_path / "out", tiny_parts, lm=str(tiny_parts["llama"]))


def test_pickle_beyond_weights_refused(tiny_parts, tmp_path):
    src = write_stage1(tmp_path / "src", tiny_parts)
    torch.save({**projector_weights("mlp2x_gelu"), "args": argparse.Namespace(lr=1e-3)}, src / "mm_projector.bin")
    with pytest.raises(ValueError, match=r"mm_projector.bin: refused by torch.load\(weights_only=True\).*GLOBAL argparse.Namespace is not allowed"):
        convert(src, tmp_path / "out", tiny_parts, lm=str(tiny_parts["llama"]))


def test_missing_files_are_named(tiny_parts, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        convert(empty, tmp_path / "out", tiny_parts)
    (empty / "config.json").write_text(json.dumps(legacy_config(tiny_parts)))
    with pytest.raises(FileNotFoundError, match="no weights found"):
        convert(empty, tmp_path / "out", tiny_parts)
    src = write_full(tmp_path / "src", tiny_parts, shards=2)
    (src / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(FileNotFoundError, match="shards that are missing: pytorch_model-00002-of-00002.bin"):
        convert(src, tmp_path / "out", tiny_parts)


def test_unsupported_settings_rejected(tiny_parts, tmp_path):
    src = write_full(tmp_path / "src", tiny_parts, shards=1)
    cfg = json.loads((src / "config.json").read_text())
    for change, message in [({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
                            ({"image_aspect_ratio": "anyres"}, "'anyres' is LLaVA-1.6"),
                            ({"model_type": "llava_mpt"}, "model_type 'llava_mpt'"),
                            ({"mm_hidden_size": 1024}, "mm_hidden_size 1024 != hidden size 32")]:
        (src / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match=message):
            convert(src, tmp_path / "out", tiny_parts)
