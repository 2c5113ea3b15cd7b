"""Stage-0 data: a generated world as tensors, and the CLIP-format BPE tokenizer trained on its captions.

Images are padded to a square with the CLIP mean colour and resized (bicubic) exactly as LLaVA's
`pad` aspect mode does (`LlavaImageProcessorPil(do_pad=True)`), so the encoder is trained on the
same view of an image that the LLaVA model later gives it, and nothing is ever cropped away.
They are decoded once and kept as uint8; normalisation happens per batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# OpenAI CLIP's normalisation (transformers.image_utils.OPENAI_CLIP_MEAN/STD), kept for parity with real CLIP.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR: tuple[int, int, int] = tuple(int(x * 255) for x in CLIP_MEAN)  # as LLaVA pads: (122, 116, 104)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BASE_SYMBOLS = 512  # 256 byte symbols, each also with the end-of-word suffix "</w>"


# --- images -----------------------------------------------------------------------------


def square_pixels(path: str | Path, size: int) -> np.ndarray:
    """An image padded to a centred square with PAD_COLOR and resized to size x size: uint8 [3, S, S]."""
    from PIL import Image

    with Image.open(path) as im:
        image = im.convert("RGB")
    w, h = image.size
    side = max(w, h)
    if w != h:
        canvas = Image.new("RGB", (side, side), PAD_COLOR)
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        image = canvas
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image).transpose(2, 0, 1).copy()  # [3, S, S]


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, S, S] → float32 CLIP-normalised [B, 3, S, S]."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std  # [B, 3, S, S]


def image_processor(size: int):
    """The CLIP image processor saved with the encoder (PIL backend; CLIP's own resize-and-crop)."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )  # fmt: skip


# --- worlds -----------------------------------------------------------------------------


@dataclass
class WorldTensors:
    """One world split, decoded: pixels, tokenised captions and the scene graphs."""

    pixels: torch.Tensor  # [N, 3, S, S] uint8
    input_ids: torch.Tensor  # [N, C, L] int64, C captions per image, padded with EOS
    scenes: list[dict[str, Any]]

    def __len__(self) -> int:
        return self.pixels.shape[0]


def load_world_images(
    directory: str | Path, size: int, limit: int | None = None, workers: int = 2
) -> tuple[torch.Tensor, list[dict]]:
    """(uint8 pixels [N, 3, S, S], scenes) of a world dir (first `limit` images if given).

    PIL releases the GIL while decoding and resizing, so `workers` threads decode in parallel.
    """
    from concurrent.futures import ThreadPoolExecutor

    from llavakit.world import load_scenes

    root = Path(directory)
    scenes = load_scenes(root)
    if limit is not None:
        scenes = scenes[:limit]
    if not scenes:
        raise ValueError(f"world directory {root} has no images")
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        pixels = np.stack(list(pool.map(lambda s: square_pixels(root / s["file_name"], size), scenes)))
    return torch.from_numpy(pixels), scenes  # [N, 3, S, S]


def tokenize_captions(tokenizer, scenes: list[dict], max_len: int) -> torch.Tensor:
    """Every scene's captions as EOS-padded ids [N, C, L]; L is the longest caption, at most max_len."""
    per_image = len(scenes[0]["captions"])
    if any(len(s["captions"]) != per_image for s in scenes):
        raise ValueError(f"every image needs the same number of captions ({per_image})")
    texts = [c for s in scenes for c in s["captions"]]
    longest = max(len(ids) for ids in tokenizer(texts)["input_ids"])
    length = min(longest, max_len)
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    ids = enc["input_ids"]  # [N*C, L], truncation keeps the closing EOS
    return ids.view(len(scenes), per_image, length)  # [N, C, L]


def load_world(
    directory: str | Path, tokenizer, size: int, max_len: int, limit: int | None = None, workers: int = 2
) -> WorldTensors:
    """A world dir decoded for training or evaluation."""
    pixels, scenes = load_world_images(directory, size, limit, workers)
    return WorldTensors(pixels, tokenize_captions(tokenizer, scenes, max_len), scenes)


# --- tokenizer --------------------------------------------------------------------------
# A small BPE trained here on the world's own captions, in OpenAI CLIP's exact format (lowercase,
# CLIP's pre-tokenizer regex, byte-level symbols with the "</w>" end-of-word suffix, all 512 base
# symbols first, merges in order, then <|startoftext|> and <|endoftext|>). Chosen over CLIP's
# real 49k vocabulary because that would need an extra package just for its data file, and 49k
# embedding rows would dominate a text tower this small; the world's vocabulary is a few hundred words.


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable character map, in OpenAI's vocab order (printable bytes first)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    rest = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + n) for n, b in enumerate(rest)}


def clip_pretokenizer_tokenizer():
    """An untrained `tokenizers` BPE with CLIP's normaliser and pre-tokeniser (as `CLIPTokenizer` builds it)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(unk_token=EOS, continuing_subword_prefix="", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pattern = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return tok


def train_bpe(texts: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a CLIP-format BPE trained on `texts`, about `vocab_size` entries in all."""
    from tokenizers import trainers

    tok = clip_pretokenizer_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2, end_of_word_suffix="</w>", show_progress=False, special_tokens=[],
        initial_alphabet=list(bytes_to_unicode().values()),
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    base = list(bytes_to_unicode().values())
    symbols = base + [s + "</w>" for s in base]
    budget = max(vocab_size - BASE_SYMBOLS - 2, 0)
    merges = merges[:budget]
    for a, b in merges:
        if a + b not in symbols:
            symbols.append(a + b)
    symbols += [BOS, EOS]
    return {s: i for i, s in enumerate(symbols)}, merges


def save_clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], out: str | Path):
    """Write vocab.json + merges.txt (OpenAI format) and the `CLIPTokenizer` files; return the loaded tokenizer."""
    from transformers import CLIPTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in merges])
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(out)
    return CLIPTokenizer.from_pretrained(out)


def build_tokenizer(scenes: list[dict], vocab_size: int, out: str | Path):
    """Train the BPE on every caption of `scenes`, save it to `out`, return the `CLIPTokenizer`."""
    texts = [c for s in scenes for c in s["captions"]]
    vocab, merges = train_bpe(texts, vocab_size)
    return save_clip_tokenizer(vocab, merges, out)
