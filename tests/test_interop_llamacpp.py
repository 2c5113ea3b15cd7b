"""Exported GGUF files in llama.cpp itself (slow; needs llama-cpp-python, which is not a dependency).

    nice -n 19 .venv/bin/pip install llama-cpp-python==0.3.36 diskcache   # builds llama.cpp, ~10 min
    .venv/bin/python -m pytest -m slow tests/test_interop_llamacpp.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_model
from llavakit.interop.gguf import export_gguf
from llavakit.model.io import load_model

pytestmark = pytest.mark.slow
llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36 diskcache; not a llavakit dependency)"
)

PROMPT = "A chat between a curious human and an artificial intelligence assistant. USER: How many objects are there? ASSISTANT:"
QUESTION = "<image>\nWhat is in the picture?"


def square_image(size: int) -> Image.Image:
    """Exactly the encoder's size: no resampling, so preprocessing cannot blur the comparison."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))


def llavakit_greedy(lm, image, n: int) -> tuple[list[int], np.ndarray]:
    """Greedy ids through llavakit's render path and model, and the first step's logits."""
    from llavakit.data.render import render_text

    content = QUESTION.replace("<image>", "<image>" * lm.image_seq_length)
    text = render_text(lm.template, lm.tokenizer, [{"role": "user", "content": content}], add_generation_prompt=True)
    seq = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    pixels = lm.image_processor(image, return_tensors="pt")["pixel_values"]  # [1, 3, H, W]
    out, first = [], None
    with torch.no_grad():
        for _ in range(n):
            logits = lm.model(input_ids=torch.tensor([seq]), pixel_values=pixels).logits[0, -1]  # [V]
            first = logits.numpy() if first is None else first
            token = int(logits.argmax())
            if token == lm.tokenizer.eos_token_id:
                break
            out.append(token)
            seq.append(token)
    return out, first


def hf_image_features(lm, image) -> np.ndarray:
    cfg = lm.model.config
    pixels = lm.image_processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        h = lm.model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
        h = h[:, 1:] if cfg.vision_feature_select_strategy == "default" else h  # [1, N, Dv]
        return lm.model.model.multi_modal_projector(h)[0].numpy()  # [N, Dt]


def cls_last_features(lm, image) -> np.ndarray:
    """What llama.cpp issue #25814 computes: CLS appended after the patches, positions 0..P in order, rows 1..P kept."""
    cfg = lm.model.config
    tower = lm.model.model.vision_tower
    pixels = lm.image_processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        patches = tower.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)[0]  # [P, Dv]
        x = torch.cat([patches, tower.embeddings.class_embedding[None]]) + tower.embeddings.position_embedding.weight  # [P + 1, Dv]
        x = tower.pre_layrnorm(x)[None]
        k = cfg.vision_config.num_hidden_layers + 1 + cfg.vision_feature_layer
        for layer in tower.encoder.layers[:k]:
            out = layer(x, None)
            x = out[0] if isinstance(out, tuple) else out
        return lm.model.model.multi_modal_projector(x[0, 1:]).numpy()  # [P, Dt]


def both_logits(llm, lm, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's and transformers' logits for the same ids: ([T, V], [T, V])."""
    llm.eval(ids)
    cpp = np.array(llm.scores[: len(ids)])  # [T, V]
    with torch.no_grad():
        ref = lm.model(input_ids=torch.tensor([ids])).logits[0].numpy()  # [T, V]
    return cpp, ref


@pytest.mark.parametrize("outtype, tol", [("f32", 1e-3), ("f16", 5e-3), ("q8_0", 5e-2)])
def test_lm_tokens_and_logits_match_transformers(tiny_model_dir, tmp_path, outtype, tol):
    from llama_cpp import Llama

    files = export_gguf(tiny_model_dir, tmp_path, outtype=outtype)
    lm = load_model(tiny_model_dir)
    ids = [lm.tokenizer.bos_token_id] + lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    llm = Llama(model_path=str(files.lm), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    try:
        assert llm.tokenize(PROMPT.encode(), add_bos=False, special=True) == ids[1:]
        cpp, ref = both_logits(llm, lm, ids)
    finally:
        llm.close()
    assert np.abs(cpp - ref).max() <= tol
    assert (cpp.argmax(-1) == ref.argmax(-1)).all()


def test_siglip_model_answers_exactly_as_llavakit(tiny_parts, tmp_path):
    """A CLS-free encoder: llama.cpp's image features, first logits and greedy answer equal llavakit's."""
    from llavakit.interop.llamacpp import LlamaCppLlava

    src = make_model(tiny_parts, tmp_path / "m", vision="siglip")
    export_gguf(src, tmp_path / "gguf")
    lm, image = load_model(src), square_image(32)
    runner = LlamaCppLlava(tmp_path / "gguf")
    try:
        feats = runner.image_embeddings(image)
        _, ids = runner.answer([image], QUESTION, max_new_tokens=10)
        runner.feed([image], runner.prompt_text(QUESTION))
        first = runner.last_logits()
    finally:
        runner.close()
    ours, ref_first = llavakit_greedy(lm, image, 10)
    assert np.abs(feats - hf_image_features(lm, image)).max() <= 1e-4
    assert np.abs(first - ref_first).max() <= 1e-3
    assert ids == ours


def test_clip_encoder_matches_transformers_or_the_known_cls_defect(tiny_model_dir, tmp_path):
    """CLIP (with CLS): a fixed llama.cpp matches transformers; builds with issue #25814 (0.3.36 here)
    match that defect's simulation exactly. Anything else means our mmproj is wrong."""
    from llavakit.interop.llamacpp import LlamaCppLlava

    export_gguf(tiny_model_dir, tmp_path)
    lm, image = load_model(tiny_model_dir), square_image(32)
    runner = LlamaCppLlava(tmp_path)
    try:
        feats = runner.image_embeddings(image)
    finally:
        runner.close()
    to_hf = np.abs(feats - hf_image_features(lm, image)).max()
    to_defect = np.abs(feats - cls_last_features(lm, image)).max()
    assert min(to_hf, to_defect) <= 1e-4, (to_hf, to_defect)


def test_llava15_chat_handler_takes_the_mmproj(tiny_model_dir, tmp_path):
    """llama-cpp-python's own LLaVA-1.5 handler loads both files and answers (f16 mmproj)."""
    import base64
    import io

    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    files = export_gguf(tiny_model_dir, tmp_path, outtype="f16")
    buf = io.BytesIO()
    square_image(32).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    llm = Llama(model_path=str(files.lm), chat_handler=Llava15ChatHandler(clip_model_path=str(files.mmproj), verbose=False),
                n_ctx=512, verbose=False, n_threads=2)
    try:
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}],
            max_tokens=4, temperature=0.0)
    finally:
        llm.close()
    assert out["usage"]["prompt_tokens"] > load_model(tiny_model_dir).image_seq_length  # the image's 16 tokens were fed
    assert out["choices"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize("metaspace", [False, True], ids=["legacy-normalizer", "metaspace"])
def test_llama_spm_vocab_tokenizes_and_scores_as_transformers(tiny_parts, tmp_path, metaspace):
    """A LLaVA-1.5-style vocabulary (SentencePiece BPE, byte fallback) exported as llama.cpp's `llama` tokenizer:
    llama.cpp's own tokenizer gives the HF ids, and its logits match."""
    from llama_cpp import Llama
    from test_interop_gguf import SPM_PROBES, spm_llama

    src = make_model({**tiny_parts, "llama": spm_llama(tmp_path / "llama", metaspace)}, tmp_path / "m")
    files = export_gguf(src, tmp_path / "gguf")
    lm = load_model(src)
    llm = Llama(model_path=str(files.lm), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    try:
        for text in SPM_PROBES:
            hf = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            cpp = llm.tokenize(text.encode(), add_bos=False, special=False)
            # known: tokenizers' Metaspace adds no '▁' before a text that starts with a space; llama.cpp does
            assert (cpp == hf) != (metaspace and text.startswith(" ")), text
        ids = [lm.tokenizer.bos_token_id] + lm.tokenizer(SPM_PROBES[0], add_special_tokens=False)["input_ids"]
        cpp_logits, ref = both_logits(llm, lm, ids)
    finally:
        llm.close()
    assert np.abs(cpp_logits - ref).max() <= 1e-3
