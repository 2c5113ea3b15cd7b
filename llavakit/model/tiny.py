"""Tiny real parts built in code from transformers configs: for tests, benchmarks and dry runs.

Nothing here downloads. The tokenizer is a real byte-level BPE trained with `tokenizers` on a
fixed corpus, so any text encodes and offsets work exactly as with hub tokenizers.
"""

from __future__ import annotations

from pathlib import Path

_CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "USER: What is in the image? ASSISTANT: There is a red circle and a blue square.",
    "How many objects are there? There are three objects: a green star, a yellow triangle and a purple hexagon.",
    "Is there a cat in the picture? No, there is no cat. Yes, the circle is on the left of the square.",
    "Describe the image in detail. The picture shows shapes of different colors on a white background.",
    "top left, top, top right, left, center, right, bottom left, bottom, bottom right. small medium large",
    "Answer the question using a single word or phrase. Answer with the option's letter from the given choices directly.",
    "red green blue yellow orange purple pink brown black gray white cyan one two three four five six",
]


def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer with <s>, </s>, <unk>, <pad> (fast, with offsets)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def tiny_llama(out: str | Path, *, hidden: int = 64, layers: int = 2, vocab_size: int = 384, seed: int = 0) -> Path:
    """Write a tiny random LlamaForCausalLM + tokenizer to `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(vocab_size)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return Path(out)


def tiny_qwen2(out: str | Path, *, hidden: int = 64, layers: int = 2, vocab_size: int = 384, seed: int = 0) -> Path:
    """Write a tiny random Qwen2ForCausalLM (another LM family) + tokenizer to `out`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = tiny_tokenizer(vocab_size)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return Path(out)


def tiny_clip(out: str | Path, *, hidden: int = 32, layers: int = 2, image_size: int = 32, patch: int = 8, seed: int = 0) -> Path:
    """Write a tiny random CLIPModel (vision + text towers) + image processor to `out`."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=2, vocab_size=384, max_position_embeddings=32),
        vision_config=dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                           num_attention_heads=2, image_size=image_size, patch_size=patch),
        projection_dim=hidden,
    )
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}).save_pretrained(out)
    return Path(out)


def tiny_siglip(out: str | Path, *, hidden: int = 32, layers: int = 2, image_size: int = 32, patch: int = 8, seed: int = 0) -> Path:
    """Write a tiny random SiglipVisionModel + image processor to `out`."""
    import torch
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                             num_attention_heads=2, image_size=image_size, patch_size=patch)
    torch.manual_seed(seed)
    SiglipVisionModel(cfg).save_pretrained(out)
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(out)
    return Path(out)
