"""GGUF export, read back with gguf.GGUFReader: names, shapes, metadata and values."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from conftest import make_model
from llavakit.data.templates import ChatTemplate
from llavakit.interop.gguf import export_gguf
from llavakit.model.io import load_model


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return export_gguf(tiny_model_dir, out), load_model(tiny_model_dir)


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def tensors(reader) -> dict:
    """name -> float32 array in numpy (row-major, transformers) order."""
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type) if t.tensor_type == gguf.GGMLQuantizationType.Q8_0 else t.data
        out[t.name] = np.asarray(data, dtype=np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))
    return out


def interleave(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout: per head, rows (0, d/2), (1, d/2 + 1), ... as adjacent pairs."""
    d = w.shape[0] // heads
    order = [h * d + j + half * d // 2 for h in range(heads) for j in range(d // 2) for half in (0, 1)]
    return w[order]


def test_lm_file(exported):
    files, lm = exported
    assert files.lm.name == "model-f32.gguf"
    reader = gguf.GGUFReader(files.lm)
    meta, got = fields(reader), tensors(reader)
    tc = lm.model.config.text_config
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == tc.num_hidden_layers
    assert meta["llama.attention.head_count"] == 4 and meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.rope.dimension_count"] == 16 and meta["llama.vocab_size"] == len(lm.tokenizer) == 385
    assert meta["llama.embedding_length"] == 64 and meta["llama.feed_forward_length"] == 128
    assert meta["general.file_type"] == 0
    state = {k: v.numpy() for k, v in lm.model.state_dict().items()}
    lang = "model.language_model."
    expected = {"token_embd.weight": state[lang + "embed_tokens.weight"], "output_norm.weight": state[lang + "norm.weight"],
                "output.weight": state["lm_head.weight"]}
    for i in range(tc.num_hidden_layers):
        p = f"{lang}layers.{i}."
        expected.update({
            f"blk.{i}.attn_q.weight": interleave(state[p + "self_attn.q_proj.weight"], 4),
            f"blk.{i}.attn_k.weight": interleave(state[p + "self_attn.k_proj.weight"], 2),
            f"blk.{i}.attn_v.weight": state[p + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": state[p + "self_attn.o_proj.weight"],
            f"blk.{i}.attn_norm.weight": state[p + "input_layernorm.weight"],
            f"blk.{i}.ffn_norm.weight": state[p + "post_attention_layernorm.weight"],
            f"blk.{i}.ffn_gate.weight": state[p + "mlp.gate_proj.weight"],
            f"blk.{i}.ffn_up.weight": state[p + "mlp.up_proj.weight"],
            f"blk.{i}.ffn_down.weight": state[p + "mlp.down_proj.weight"],
        })
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].shape == want.shape and np.array_equal(got[name], want), name


def test_lm_tokenizer_metadata(exported):
    files, lm = exported
    meta = fields(gguf.GGUFReader(files.lm))
    tok = lm.tokenizer
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == tok.convert_ids_to_tokens(list(range(len(tok))))
    types = meta["tokenizer.ggml.token_type"]
    image_id = tok.convert_tokens_to_ids("<image>")
    assert types[image_id] == gguf.TokenType.CONTROL and types[tok.bos_token_id] == gguf.TokenType.CONTROL
    assert types[100] == gguf.TokenType.NORMAL
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert ChatTemplate.from_dict(json.loads(meta["llavakit.template"])) == lm.template


def test_mmproj_file(exported):
    files, lm = exported
    assert files.mmproj.name == "mmproj-f32.gguf"
    reader = gguf.GGUFReader(files.mmproj)
    meta, got = fields(reader), tensors(reader)
    assert meta["general.architecture"] == "clip" and meta["clip.projector_type"] == "mlp"
    assert meta["clip.has_vision_encoder"] is True and "clip.use_gelu" not in meta  # quick_gelu: llama.cpp's default
    # feature layer -2 of 2 layers = hidden_states[1]: one encoder layer written, the index named explicitly
    assert meta["clip.vision.block_count"] == 1 and meta["clip.vision.feature_layer"] == [1]
    assert (meta["clip.vision.image_size"], meta["clip.vision.patch_size"]) == (32, 8)
    assert (meta["clip.vision.embedding_length"], meta["clip.vision.feed_forward_length"]) == (32, 64)
    assert meta["clip.vision.projection_dim"] == 64 and meta["clip.vision.attention.head_count"] == 2
    assert np.allclose(meta["clip.vision.image_mean"], lm.image_processor.image_mean)
    assert np.allclose(meta["clip.vision.image_std"], lm.image_processor.image_std)
    vt = {k: v.numpy() for k, v in lm.model.model.vision_tower.state_dict().items()}
    pj = {k: v.numpy() for k, v in lm.model.model.multi_modal_projector.state_dict().items()}
    expected = {"v.class_embd": vt["embeddings.class_embedding"], "v.patch_embd.weight": vt["embeddings.patch_embedding.weight"],
                "v.position_embd.weight": vt["embeddings.position_embedding.weight"],
                "v.pre_ln.weight": vt["pre_layrnorm.weight"], "v.pre_ln.bias": vt["pre_layrnorm.bias"],
                "mm.0.weight": pj["linear_1.weight"], "mm.0.bias": pj["linear_1.bias"],
                "mm.2.weight": pj["linear_2.weight"], "mm.2.bias": pj["linear_2.bias"]}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.out_proj": "attn_out",
             "layer_norm1": "ln1", "layer_norm2": "ln2", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
    for ours, theirs in names.items():
        for kind in ("weight", "bias"):
            expected[f"v.blk.0.{theirs}.{kind}"] = vt[f"encoder.layers.0.{ours}.{kind}"]
    assert set(got) == set(expected)  # no v.blk.1, no post-layernorm
    for name, want in expected.items():
        assert got[name].shape == want.shape and np.array_equal(got[name], want), name


def test_f16_and_q8_0(tiny_model_dir, tmp_path):
    files = export_gguf(tiny_model_dir, tmp_path, outtype="q8_0")
    assert (files.lm.name, files.mmproj.name) == ("model-q8_0.gguf", "mmproj-f16.gguf")
    lm_reader, mm_reader = gguf.GGUFReader(files.lm), gguf.GGUFReader(files.mmproj)
    kinds = {t.name: t.tensor_type for t in lm_reader.tensors}
    assert kinds["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0 and kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    ref = load_model(tiny_model_dir).model.state_dict()["model.language_model.layers.0.mlp.up_proj.weight"].numpy()  # [128, 64]
    q = tensors(lm_reader)["blk.0.ffn_up.weight"]
    assert q.shape == ref.shape and np.abs(q - ref).max() <= np.abs(ref).max() / 127 + 1e-6  # one Q8_0 step
    mm = {t.name: t.tensor_type for t in mm_reader.tensors}
    assert mm["mm.0.weight"] == gguf.GGMLQuantizationType.F16 and mm["mm.0.bias"] == gguf.GGMLQuantizationType.F32
    assert fields(lm_reader)["general.file_type"] == 7 and fields(mm_reader)["general.file_type"] == 1


@pytest.mark.parametrize("kw, message", [
    ({"projector": "linear"}, "always applies GELU after mm.0"),
    ({"select_strategy": "full"}, "strategy 'full' with a CLS token"),
    ({"lm": "qwen2", "template": "chatml"}, "Llama-family language models; this one is 'qwen2'"),
])
def test_refuses_what_llamacpp_cannot_express(tiny_parts, tmp_path, kw, message):
    src = make_model(tiny_parts, tmp_path / "m", **kw)
    with pytest.raises(ValueError, match=message):
        export_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_cli_export_gguf(tiny_model_dir, tmp_path, capsys):
    from llavakit.cli import main

    assert main(["export", str(tiny_model_dir), "--format", "gguf", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "model-f32.gguf" in printed and "mmproj-f32.gguf" in printed and "note:" in printed
    assert gguf.GGUFReader(tmp_path / "model-f32.gguf").fields["general.architecture"].contents() == "llama"


def test_agreement_counts_identical_answers_per_task(tmp_path):
    """The llama.cpp-vs-llavakit comparison: per offline task and in all, case/space-insensitive; refuses
    two files that answer different questions."""
    from llavakit.interop.llamacpp import agreement, agreement_table

    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"question_id": q, "text": t}) + "\n" for q, t in rows))
        return path

    ours = write("a.jsonl", [("1-color-0", "red"), ("1-shape-0", "star"), ("2-color-0", "Blue "), ("x", "yes")])
    theirs = write("b.jsonl", [("1-color-0", "red"), ("1-shape-0", "circle"), ("2-color-0", "blue"), ("x", "no")])
    rows = agreement(ours, theirs)
    assert rows == {"all": (2, 4), "color": (2, 2), "shape": (0, 1)}
    assert "| shape | 0/1 | 0.0 |" in agreement_table(rows)
    with pytest.raises(ValueError, match="different questions"):
        agreement(ours, write("c.jsonl", [("1-color-0", "red")]))
