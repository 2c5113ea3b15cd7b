"""GGUF export for llama.cpp: the language model, and an `mmproj` file (vision encoder + projector).

Language model (`general.architecture = llama`): llama.cpp's tensor names (`token_embd`,
`blk.N.attn_q`, ..., `output`), q/k rows permuted from transformers' half-split rotary layout to
llama.cpp's interleaved pairs, and the tokenizer: a byte-level BPE as `tokenizer.ggml.model = gpt2`
with its merges and the pre-tokenizer llama.cpp knows by name (`gpt-2`, `smollm`), or a
SentencePiece-style BPE with byte fallback (Llama/Vicuna's tokenizer.json, e.g. a model converted from
LLaVA-1.5) as `tokenizer.ggml.model = llama` with scores and token types (see `llama_vocab`).

mmproj (`general.architecture = clip`, `clip.projector_type = mlp`): the vision tower under
`v.*` (`v.patch_embd`, `v.class_embd`, `v.position_embd`, `v.pre_ln`, `v.blk.N.{attn_q,attn_k,
attn_v,attn_out,ln1,ln2,ffn_up,ffn_down}`) and the projector as `mm.0`/`mm.2`. Only the encoder
layers the features come from are written, and `clip.vision.feature_layer` names the
hidden-state index explicitly, so llama.cpp runs exactly that many layers (without it, its llava
graph drops one more layer than the file holds). The post-layernorm and pooling head are left
out: LLaVA takes hidden states before them.

What llama.cpp cannot express is refused before anything is written: a `linear` projector (its
`mlp` graph always applies GELU after `mm.0`), keeping the CLS token (`full` with CLIP: it always
drops the first position) or dropping a patch of a CLS-free encoder (`default` with SigLIP), and
tokenizers other than the two kinds above.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

OUTTYPES = ("f32", "f16", "q8_0")
Q8_BLOCK = 32
TEMPLATE_KEY = "llavakit.template"  # the ChatTemplate record, JSON (llama.cpp ignores unknown keys)
LLAMACPP_PAD = (122, 116, 104)  # the fixed pad colour of llama.cpp's llava preprocessing (CLIP's mean)
# transformers' Llama names (under the language model) -> llama.cpp's, per block
LM_BLOCK_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
LM_NAMES = {"embed_tokens": "token_embd", "norm": "output_norm"}
# transformers' CLIP/SigLIP vision names -> llama.cpp's clip names
VISION_NAMES = {
    "embeddings.class_embedding": "v.class_embd", "embeddings.patch_embedding": "v.patch_embd",
    "embeddings.position_embedding": "v.position_embd", "pre_layrnorm": "v.pre_ln",
}
VISION_BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
}
VISION_SKIPPED = ("post_layernorm.", "head.")  # after the feature layer, or pooling only
PROJECTOR_NAMES = {"linear_1": "mm.0", "linear_2": "mm.2"}
# vision hidden_act -> the clip.* flag llama.cpp reads (none: gelu_quick)
VISION_ACTS = {"quick_gelu": None, "gelu": "use_gelu", "gelu_pytorch_tanh": "use_gelu", "silu": "use_silu"}
# a byte-level pre-tokenizer (as tokenizer.json has it) -> llama.cpp's name for it
PRE_TOKENIZERS = {
    "gpt-2": [{"type": "ByteLevel", "use_regex": True, "add_prefix_space": False}],
    "smollm": [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True, "add_prefix_space": False}],
}


@dataclass(frozen=True)
class GGUFFiles:
    lm: Path
    mmproj: Path
    notes: tuple[str, ...] = ()
    """Known differences llama.cpp will show (preprocessing, activations), for the user."""


# ---- checks -----------------------------------------------------------------------------------

def check_exportable(model, projector: str) -> None:
    """Raise ValueError for what llama.cpp's llama + clip `mlp` graphs cannot express."""
    cfg = model.config
    tc = cfg.text_config
    if tc.model_type != "llama":
        raise ValueError(f"GGUF export handles Llama-family language models; this one is {tc.model_type!r}")
    if tc.hidden_act != "silu" or getattr(tc, "mlp_bias", False):
        raise ValueError(f"GGUF export: hidden_act {tc.hidden_act!r} / mlp_bias are not llama's SiLU-gated MLP")
    rope = (getattr(tc, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope != "default":
        raise ValueError(f"GGUF export: rope_type {rope!r} is not exported (only unscaled RoPE)")
    if projector != "mlp2x_gelu":
        raise ValueError(f"GGUF export: projector {projector!r} cannot be expressed; llama.cpp's mlp projector always applies GELU after mm.0")
    if not isinstance(cfg.vision_feature_layer, int):
        raise ValueError("GGUF export: several vision feature layers are not supported")
    has_cls = "embeddings.class_embedding" in dict(model.model.vision_tower.named_parameters())
    if has_cls != (cfg.vision_feature_select_strategy == "default"):
        raise ValueError(
            f"GGUF export: llama.cpp drops the first position exactly when the encoder has a CLS token; this model uses "
            f"strategy {cfg.vision_feature_select_strategy!r} with{'' if has_cls else 'out'} a CLS token"
        )
    if cfg.vision_config.hidden_act not in VISION_ACTS:
        raise ValueError(f"GGUF export: vision activation {cfg.vision_config.hidden_act!r} has no llama.cpp flag")


def feature_index(cfg) -> int:
    """The hidden-state index LLaVA takes (0 = embeddings, n = after the last layer)."""
    n = cfg.vision_config.num_hidden_layers
    k = cfg.vision_feature_layer if cfg.vision_feature_layer >= 0 else n + 1 + cfg.vision_feature_layer
    if not 1 <= k <= n:
        raise ValueError(f"GGUF export: vision_feature_layer {cfg.vision_feature_layer} selects no encoder layer")
    return k


# ---- tensors ----------------------------------------------------------------------------------

def rope_permute(w, heads: int):
    """transformers' rotary halves -> llama.cpp's interleaved pairs, per head: rows of [heads * d, ...]."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)  # same shape


def lm_gguf_name(key: str) -> str:
    """'model.language_model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight'."""
    if key == "lm_head.weight":
        return "output.weight"
    rest = key.removeprefix("model.language_model.")
    if rest.startswith("layers."):
        _, block, tail = rest.split(".", 2)
        module, kind = tail.rsplit(".", 1)
        return f"blk.{block}.{LM_BLOCK_NAMES[module]}.{kind}"
    module, kind = rest.rsplit(".", 1)
    return f"{LM_NAMES[module]}.{kind}"


def lm_tensors(model):
    """(gguf name, float32 array) for the language model, q/k permuted."""
    tc = model.config.text_config
    state = model.state_dict()
    tied = tc.tie_word_embeddings
    for key, value in state.items():
        if not key.startswith("model.language_model.") and key != "lm_head.weight":
            continue
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reuses token_embd
        arr = value.detach().float().numpy()
        if ".self_attn.q_proj." in key:
            arr = rope_permute(arr, tc.num_attention_heads)  # [H * d, D] or [H * d]
        elif ".self_attn.k_proj." in key:
            arr = rope_permute(arr, tc.num_key_value_heads)  # [Hkv * d, D] or [Hkv * d]
        yield lm_gguf_name(key), arr


def vision_gguf_name(key: str, keep: int) -> str | None:
    """A vision-tower key -> clip name; None for what llama.cpp does not run (late layers, post-LN, head)."""
    if key.startswith(VISION_SKIPPED):
        return None
    if key.startswith("encoder.layers."):
        _, _, block, tail = key.split(".", 3)
        if int(block) >= keep:
            return None
        module, kind = tail.rsplit(".", 1)
        return f"v.blk.{block}.{VISION_BLOCK_NAMES[module]}.{kind}"
    if key == "embeddings.class_embedding":
        return "v.class_embd"
    module, kind = key.rsplit(".", 1)
    return f"{VISION_NAMES[module]}.{kind}"


def mmproj_tensors(model):
    """(gguf name, float32 array) for the encoder layers up to the feature layer and the projector."""
    cfg = model.config
    keep = feature_index(cfg)
    swap = cfg.vision_config.intermediate_size == cfg.vision_config.hidden_size
    for key, value in model.model.vision_tower.state_dict().items():
        name = vision_gguf_name(key, keep)
        if name is None:
            continue
        if swap and ".ffn_" in name:
            # llama.cpp swaps mlp up/down of mlp-projector files whose ffn_down has n_embd inputs (old
            # converters wrote them swapped); with intermediate == hidden that test always fires.
            name = name.replace(".ffn_up.", ".ffn_tmp.").replace(".ffn_down.", ".ffn_up.").replace(".ffn_tmp.", ".ffn_down.")
        yield name, value.detach().float().numpy()
    for key, value in model.model.multi_modal_projector.state_dict().items():
        module, kind = key.split(".")
        yield f"{PROJECTOR_NAMES[module]}.{kind}", value.detach().float().numpy()


def add_tensor(writer, name: str, arr, outtype: str) -> None:
    """1-D tensors stay f32; matrices (and the patch conv) become f16 / Q8_0 as asked."""
    import gguf
    import numpy as np

    if outtype == "f32" or arr.ndim == 1:
        writer.add_tensor(name, arr.astype(np.float32))
    elif outtype == "q8_0" and arr.ndim == 2 and arr.shape[-1] % Q8_BLOCK == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), qtype), raw_dtype=qtype)
    else:
        writer.add_tensor(name, arr.astype(np.float16))


# ---- tokenizer --------------------------------------------------------------------------------

def tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("GGUF export needs a fast (tokenizers) tokenizer")
    return json.loads(backend.to_str())


SPIECE = "\u2581"  # '▁', SentencePiece's escaped space
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def tokenizer_kind(tokenizer) -> str:
    """'gpt2' (byte-level BPE) or 'llama' (SentencePiece-style BPE with byte fallback); others raise ValueError."""
    data = tokenizer_json(tokenizer)
    model = data["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export: a {model.get('type')} tokenizer model is not supported (BPE only)")
    if model.get("byte_fallback"):
        space_prefix(data)  # raises unless llama.cpp's SentencePiece normalisation matches
        return "llama"
    if data.get("normalizer"):
        raise ValueError("GGUF export: a byte-level BPE tokenizer with a normalizer is not supported")
    pre_tokenizer_name(data)  # raises for unknown pre-tokenizers
    return "gpt2"


def space_prefix(data: dict) -> bool:
    """Whether a byte-fallback BPE tokenizer prepends '▁' (llama.cpp's `add_space_prefix`).

    llama.cpp's `llama` tokenizer escapes every space to '▁' and optionally prepends one, on the whole
    text: that is the Llama tokenizer.json's normalizer (Prepend '▁' + Replace ' ' -> '▁', no
    pre-tokenizer) or a non-splitting Metaspace pre-tokenizer (no normalizer). Anything else raises.
    """
    norm, pre = data.get("normalizer"), data.get("pre_tokenizer")
    if norm and not pre:
        steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
        kinds = [(st.get("type"), st.get("prepend") or st.get("content"), (st.get("pattern") or {}).get("String"))
                 for st in steps]
        if kinds in ([("Prepend", SPIECE, None), ("Replace", SPIECE, " ")], [("Replace", SPIECE, " ")]):
            return len(kinds) == 2
    if pre and not norm and pre.get("type") == "Metaspace" and pre.get("replacement") == SPIECE and not pre.get("split", True):
        scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never")
        if scheme in ("first", "always", "never"):
            return scheme != "never"
    raise ValueError(f"GGUF export: byte-fallback BPE with normalizer {json.dumps(norm)[:160]} and pre-tokenizer "
                     f"{json.dumps(pre)[:160]} has no llama.cpp equivalent (supported: Llama's '\u2581' escaping)")


def pre_tokenizer_name(data: dict) -> str:
    """llama.cpp's name for the tokenizer's byte-level pre-tokenizer; unknown ones raise."""
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for name, want in PRE_TOKENIZERS.items():
        if len(steps) == len(want) and all(all(s.get(k) == v for k, v in w.items()) for s, w in zip(steps, want)):
            return name
    raise ValueError(f"GGUF export: pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp equivalent here "
                     f"(supported: byte-level BPE as {', '.join(PRE_TOKENIZERS)})")


def bpe_vocab(tokenizer, rows: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens (padded to the embedding rows), their llama.cpp types, and the merges."""
    import gguf

    data = tokenizer_json(tokenizer)
    model = data["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback") or data.get("normalizer"):
        raise ValueError("GGUF export supports byte-level BPE tokenizers (no byte fallback, no normalizer) only")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, [int(t) for t in types], merges


def llama_vocab(tokenizer, rows: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens (padded to the embedding rows), scores and llama.cpp types of a byte-fallback BPE tokenizer.

    As llama.cpp's convert_hf_to_gguf writes a Llama tokenizer.json without tokenizer.model
    (`LlamaHfVocab`), except for the scores: it writes -1000 for every token, but llama.cpp's `llama`
    tokenizer merges the adjacent pair whose joined text has the highest score, so equal scores would
    merge left to right instead of in the BPE's order. Here a token made by merge number r scores -r
    (the merges are in priority order), every other token 0; for a tokenizer.json converted from a
    SentencePiece model this is the original score order. Types: `<0xNN>` BYTE, the unk token UNKNOWN,
    other special added tokens (`<s>`, `</s>`, `<image>`, `<pad>`) CONTROL, other added tokens
    USER_DEFINED, the rest NORMAL.
    """
    import gguf

    data = tokenizer_json(tokenizer)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    vocab = data["model"]["vocab"]
    scores_by_id: dict[int, float] = {}
    for rank, merge in enumerate(data["model"]["merges"]):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token_id = vocab.get(left + right)
        if token_id is not None:
            scores_by_id.setdefault(token_id, -float(rank))
    tokens, scores, types = [], [], []
    for i in range(rows):
        token = by_id.get(i)
        tokens.append(f"[PAD{i}]" if token is None else token)
        scores.append(scores_by_id.get(i, 0.0))
        if token is None:
            types.append(gguf.TokenType.UNUSED)
        elif BYTE_TOKEN.fullmatch(token):
            types.append(gguf.TokenType.BYTE)
        elif i == tokenizer.unk_token_id:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, scores, [int(t) for t in types]


def add_tokenizer(writer, tokenizer, rows: int) -> None:
    if tokenizer_kind(tokenizer) == "llama":
        tokens, scores, types = llama_vocab(tokenizer, rows)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(space_prefix(tokenizer_json(tokenizer)))
    else:
        tokens, types, merges = bpe_vocab(tokenizer, rows)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json(tokenizer)))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id)
    for token, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                       ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{token}_token_id")
        if token_id is not None:
            add(token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# ---- files ------------------------------------------------------------------------------------

def lm_hparams(writer, tc, rows: int) -> None:
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    rope = getattr(tc, "rope_parameters", None) or {}
    writer.add_context_length(tc.max_position_embeddings)
    writer.add_embedding_length(tc.hidden_size)
    writer.add_block_count(tc.num_hidden_layers)
    writer.add_feed_forward_length(tc.intermediate_size)
    writer.add_head_count(tc.num_attention_heads)
    writer.add_head_count_kv(tc.num_key_value_heads)
    writer.add_layer_norm_rms_eps(tc.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(tc, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * tc.num_attention_heads != tc.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(rows)


def mmproj_hparams(writer, cfg, image_processor) -> None:
    vc = cfg.vision_config
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type("mlp")
    writer.add_vision_image_size(vc.image_size)
    writer.add_vision_patch_size(vc.patch_size)
    writer.add_vision_embedding_length(vc.hidden_size)
    writer.add_vision_feed_forward_length(vc.intermediate_size)
    writer.add_vision_projection_dim(cfg.text_config.hidden_size)
    writer.add_vision_head_count(vc.num_attention_heads)
    writer.add_vision_attention_layernorm_eps(vc.layer_norm_eps)
    writer.add_vision_block_count(feature_index(cfg))
    writer.add_array("clip.vision.feature_layer", [feature_index(cfg)])
    writer.add_vision_image_mean([float(x) for x in image_processor.image_mean])
    writer.add_vision_image_std([float(x) for x in image_processor.image_std])
    flag = VISION_ACTS[vc.hidden_act]
    if flag:
        getattr(writer, f"add_vision_{flag}")(True)


def _write(path: Path, arch: str, fill) -> Path:
    """Write via a temp file beside `path`, then rename (no half-written GGUF under the final name)."""
    import gguf

    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # gguf.LlamaFileType: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0


def write_lm(lm, path: Path, outtype: str) -> Path:
    rows = lm.model.get_input_embeddings().weight.shape[0]

    def fill(w):
        w.add_name(f"{lm.path.name} (language model)")
        w.add_file_type(FILE_TYPES[outtype])
        lm_hparams(w, lm.model.config.text_config, rows)
        add_tokenizer(w, lm.tokenizer, rows)
        w.add_string(TEMPLATE_KEY, json.dumps(lm.template.to_dict()))
        for name, arr in lm_tensors(lm.model):
            add_tensor(w, name, arr, outtype)

    return _write(path, "llama", fill)


def write_mmproj(lm, path: Path, outtype: str) -> Path:
    def fill(w):
        w.add_name(f"{lm.path.name} (vision encoder + projector)")
        w.add_description("image encoder for LLaVA, written by llavakit")
        w.add_file_type(FILE_TYPES[outtype])
        mmproj_hparams(w, lm.model.config, lm.image_processor)
        for name, arr in mmproj_tensors(lm.model):
            add_tensor(w, name, arr, outtype)

    return _write(path, "clip", fill)


def export_notes(lm) -> tuple[str, ...]:
    """Differences llama.cpp's llava path will show against llavakit, by construction."""
    notes = ["llama.cpp's projector GELU is the tanh approximation (transformers: exact erf)"]
    mean = tuple(int(x * 255) for x in lm.image_processor.image_mean)
    if lm.meta.image_aspect_ratio != "pad":
        notes.append("this model resizes/crops images; llama.cpp pads them to a square")
    elif mean != LLAMACPP_PAD:
        notes.append(f"llama.cpp pads with colour {LLAMACPP_PAD}; this model pads with its mean {mean}")
    return tuple(notes)


def export_gguf(src: str | Path, out: str | Path, outtype: str = "f32") -> GGUFFiles:
    """Write `out/model-<outtype>.gguf` and `out/mmproj-<f32|f16>.gguf` for a llavakit (or llava-hf) dir."""
    from llavakit.interop.hf import load_any

    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {OUTTYPES}, got {outtype!r}")
    lm = load_any(src)
    check_exportable(lm.model, lm.meta.projector_type)
    tokenizer_kind(lm.tokenizer)  # an unsupported tokenizer is refused before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mm_type = "f32" if outtype == "f32" else "f16"
    lm_path = write_lm(lm, out / f"model-{outtype}.gguf", outtype)
    mm_path = write_mmproj(lm, out / f"mmproj-{mm_type}.gguf", mm_type)
    return GGUFFiles(lm_path, mm_path, export_notes(lm))
