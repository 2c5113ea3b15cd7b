"""The model the inference benchmarks run on, built once into the cache.

SmolLM2-135M-Instruct (real weights, the `smollm2-135m` short name) behind a tiny random CLIP
tower at 96 px with 4 px patches: 576 image tokens per image, LLaVA-1.5's geometry, so the LM
carries LLaVA-1.5's per-image load while the vision tower costs almost nothing. The projector is
untrained, so answers about images are not meaningful; speed and agreement measurements are.
"""

from __future__ import annotations

from pathlib import Path

NAME = "clip96p4-smollm2-135m"


def bench_model_dir() -> Path:
    """Build (first call) and return the benchmark model dir under the llavakit cache."""
    from llavakit.model.build import InitConfig, init_model
    from llavakit.model.hub import cache_dir
    from llavakit.model.tiny import tiny_clip

    root = cache_dir() / "bench"
    target = root / NAME
    if (target / "config.json").is_file():
        return target
    clip = root / "clip-96-p4"
    if not (clip / "config.json").is_file():
        tiny_clip(clip, image_size=96, patch=4)
    return init_model(InitConfig(vision=str(clip), lm="smollm2-135m", out=str(target), template="chatml"))


def bench_image(seed: int = 0, size: tuple[int, int] = (160, 120)):
    """A deterministic RGB test picture (a few coloured boxes)."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = rng.randrange(size[0] - 30), rng.randrange(size[1] - 30)
        draw.rectangle([x, y, x + rng.randrange(10, 30), y + rng.randrange(10, 30)],
                       fill=tuple(rng.randrange(256) for _ in range(3)))
    return img


def lm_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every LM matrix and the LM head, not the embedding table
    (one row of it is read per token). Counted from the fp32 checkpoint shapes."""
    lm = model.model.language_model
    embed = lm.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in lm.parameters() if p is not embed)
    head = model.config.text_config.vocab_size * model.config.text_config.hidden_size * 4
    return total + head


def cpu_pressure() -> dict | None:
    """Linux PSI: share of time runnable tasks waited for a CPU (avg10/avg60, %); None where unavailable.

    High values mean other processes competed for the cores during a benchmark."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    fields = dict(kv.split("=") for kv in line.split()[1:])
    return {k: float(fields[k]) for k in ("avg10", "avg60") if k in fields}
