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


# ---- a Llama/Vicuna-style tokenizer (SentencePiece BPE with byte fallback), as in a model converted from LLaVA-1.5

SPIECE = "\u2581"
SPM_CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "USER: What is in the image? ASSISTANT: There is a red circle and a blue square.",
    "How many objects are there? There are three objects: a green star and a yellow triangle.",
    "Is there a cat in the picture? No, there is no cat. Yes, the circle is on the left of the square.",
]
SPM_PROBES = ["What is in the image?", "There are three red circles.", "  two  spaces and\na newline",
              "café déjà vu €5 🙂", "unseen-words: zyxw qqq", "ASSISTANT:The answer"]


def spm_tokenizer(metaspace: bool):
    """Llama's tokenizer.json layout, built with `tokenizers`: <unk> <s> </s>, <0x00>..<0xFF>, then BPE pieces
    learned on '▁'-escaped text; byte fallback; Llama's legacy normalizer (Prepend '▁' + Replace ' ' -> '▁')
    or the newer non-splitting Metaspace pre-tokenizer; BOS added by the post-processor."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    escape = normalizers.Sequence([normalizers.Prepend(SPIECE), normalizers.Replace(" ", SPIECE)])
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.normalizer = escape
    learner.train_from_iterator(SPM_CORPUS * 4, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                                    show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE, prepend_scheme="first", split=False)
    else:
        tok.normalizer = escape
    tok.decoder = decoders.Sequence([decoders.Replace(SPIECE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def spm_llama(out, metaspace: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = spm_tokenizer(metaspace)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def llamacpp_spm_tokenize(text: str, tokens: list[str], scores: list[float], add_space_prefix: bool) -> list[int]:
    """llama.cpp's `llama` (SPM) tokenizer (llm_tokenizer_spm_session), no special-token parsing: escape spaces,
    start from UTF-8 characters, repeatedly merge the adjacent pair whose joined text is a token with the highest
    score (ties: leftmost), then emit each symbol's token or its <0xNN> bytes."""
    import heapq

    ids = {t: i for i, t in enumerate(tokens)}
    syms = list(((" " if add_space_prefix else "") + text).replace(" ", SPIECE))
    prev, nxt = list(range(-1, len(syms) - 1)), list(range(1, len(syms))) + [-1]
    heap: list = []

    def bigram(left: int, right: int) -> None:
        if left != -1 and right != -1 and (joined := syms[left] + syms[right]) in ids:
            heapq.heappush(heap, (-scores[ids[joined]], left, right, len(joined)))

    for i in range(1, len(syms)):
        bigram(i - 1, i)
    while heap:
        _, left, right, size = heapq.heappop(heap)
        if not syms[left] or not syms[right] or len(syms[left]) + len(syms[right]) != size:
            continue
        syms[left], syms[right] = syms[left] + syms[right], ""
        nxt[left] = nxt[right]
        if nxt[left] != -1:
            prev[nxt[left]] = left
        bigram(prev[left], left)
        bigram(left, nxt[left])
    out, i = [], 0
    while i != -1:
        out += [ids[syms[i]]] if syms[i] in ids else [ids[f"<0x{b:02X}>"] for b in syms[i].encode()]
        i = nxt[i]
    return out


@pytest.mark.parametrize("metaspace", [False, True], ids=["legacy-normalizer", "metaspace"])
def test_llama_spm_tokenizer_exported(tiny_parts, tmp_path, metaspace):
    """A converted LLaVA-1.5's vocabulary (SentencePiece BPE, byte fallback) as llama.cpp's `llama` tokenizer."""
    src = make_model({**tiny_parts, "llama": spm_llama(tmp_path / "llama", metaspace)}, tmp_path / "m")
    files = export_gguf(src, tmp_path / "gguf")
    lm = load_model(src)
    tok = lm.tokenizer
    reader = gguf.GGUFReader(files.lm)
    meta = fields(reader)
    rows = lm.model.get_input_embeddings().weight.shape[0]
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.pre"] == "default"
    assert "tokenizer.ggml.merges" not in meta
    tokens, scores, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], meta["tokenizer.ggml.token_type"]
    assert tokens == tok.convert_ids_to_tokens(list(range(rows))) and len(scores) == len(types) == rows == len(tok)
    T = gguf.TokenType
    assert tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)] and set(types[3:259]) == {T.BYTE}
    image_id, pad_id = tok.convert_tokens_to_ids("<image>"), tok.pad_token_id
    assert image_id >= 259 and pad_id >= 259  # added by llavakit init after the base vocabulary
    assert (types[0], types[1], types[2]) == (T.UNKNOWN, T.CONTROL, T.CONTROL)  # <unk> <s> </s>
    assert types[image_id] == types[pad_id] == T.CONTROL
    assert {types[i] for i in range(259, rows) if i not in (image_id, pad_id)} == {T.NORMAL}
    ids = (meta["tokenizer.ggml.unknown_token_id"], meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
           meta["tokenizer.ggml.padding_token_id"])
    assert ids == (0, 1, 2, pad_id)
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.ggml.add_space_prefix"] is True
    assert meta["tokenizer.chat_template"] == tok.chat_template
    # GGUF value types as llama.cpp reads them
    V = gguf.GGUFValueType
    kinds = {k: reader.fields[k].types for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                                                  "tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_bos_token",
                                                  "tokenizer.ggml.add_space_prefix")}
    assert kinds == {"tokenizer.ggml.tokens": [V.ARRAY, V.STRING], "tokenizer.ggml.scores": [V.ARRAY, V.FLOAT32],
                     "tokenizer.ggml.token_type": [V.ARRAY, V.INT32], "tokenizer.ggml.bos_token_id": [V.UINT32],
                     "tokenizer.ggml.add_bos_token": [V.BOOL], "tokenizer.ggml.add_space_prefix": [V.BOOL]}
    # the scores make llama.cpp's SPM merge order the BPE's: same ids as the HF tokenizer (incl. byte fallback)
    for text in SPM_PROBES:
        same = llamacpp_spm_tokenize(text, tokens, scores, True) == tok(text, add_special_tokens=False)["input_ids"]
        # known: tokenizers' Metaspace adds no '▁' to a text that starts with a space; SentencePiece and llama.cpp do
        assert same != (metaspace and text.startswith(" ")), text
    # llama.cpp's converter writes -1000 for every score (LlamaHfVocab): merging left to right then differs
    flat = [-1000.0] * rows
    assert any(llamacpp_spm_tokenize(t, tokens, flat, True) != tok(t, add_special_tokens=False)["input_ids"] for t in SPM_PROBES)


def test_refuses_an_unsupported_tokenizer_before_writing(tiny_model_dir, tmp_path):
    src = tmp_path / "m"
    import shutil

    shutil.copytree(tiny_model_dir, src)
    data = json.loads((src / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "Lowercase"}
    (src / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="byte-level BPE tokenizer with a normalizer is not supported"):
        export_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
