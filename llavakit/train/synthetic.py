"""Small synthetic LLaVA data: coloured squares drawn with PIL, captions and questions about them.

For dry runs (stand-in data shaped like a recipe's), tests and the throughput bench. The answer
to every question is visible in the image, so a model that learns from it measurably improves.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30),
    "purple": (140, 40, 180), "orange": (250, 140, 20), "black": (10, 10, 10), "cyan": (30, 210, 220),
}
PLACES = ("top left", "top right", "bottom left", "bottom right", "center")
FILLERS = (
    "The picture shows shapes of different colors on a white background.",
    "There is no cat in the picture.",
    "Describe the image in detail.",
)


def square_image(colour: str, place: str, size: int = 48, fraction: float = 0.75):
    """A white image with one square of `colour` (side `fraction` of the image) at `place`."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (255, 255, 255))
    s = int(size * fraction)
    x = {"left": 0, "right": size - s}.get(place.split()[-1], (size - s) // 2)
    y = {"top": 0, "bottom": size - s}.get(place.split()[0], (size - s) // 2)
    ImageDraw.Draw(img).rectangle([x, y, x + s - 1, y + s - 1], fill=COLOURS[colour])
    return img


def write_images(folder: Path, n: int, seed: int = 0, colours: list[str] | None = None) -> list[tuple[str, str, str]]:
    """n images `sq_{i}.png` in folder (colours drawn from `colours`, default all); returns (file, colour, place)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    palette = sorted(colours or COLOURS)
    out = []
    for i in range(n):
        colour, place = rng.choice(palette), rng.choice(PLACES)
        name = f"sq_{i}.png"
        square_image(colour, place).save(folder / name)
        out.append((name, colour, place))
    return out


def caption_records(images: list[tuple[str, str, str]], seed: int = 0) -> list[dict]:
    """Stage-1 style: image + a caption of varied length."""
    rng = random.Random(seed)
    records = []
    for i, (name, colour, place) in enumerate(images):
        caption = f"A {colour} square."
        if rng.random() < 0.5:
            caption = f"A {colour} square at the {place}. " + " ".join(rng.sample(FILLERS, rng.randint(1, 3)))
        records.append({"id": f"cap-{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": caption}]})
    return records


def instruct_records(images: list[tuple[str, str, str]], seed: int = 0, *, text_only: int = 0,
                     multi_image: int = 0) -> list[dict]:
    """Instruction style: 'What colour is the square?' (sometimes a second turn), plus optional
    text-only and two-image records."""
    rng = random.Random(seed)
    records = []
    for i, (name, colour, place) in enumerate(images):
        turns = [{"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": colour}]
        if rng.random() < 0.3:
            turns += [{"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": f"At the {place}."}]
        records.append({"id": f"qa-{i}", "image": name, "conversations": turns})
    for i in range(text_only):
        records.append({"id": f"text-{i}", "conversations": [
            {"from": "human", "value": "Answer with one word: what colour is the sky?"}, {"from": "gpt", "value": "blue"}]})
    for i in range(multi_image):
        (a, ca, _), (b, cb, _) = rng.sample(images, 2)
        records.append({"id": f"pair-{i}", "images": [a, b], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhat colours are the two squares?"},
            {"from": "gpt", "value": f"{ca} and {cb}"}]})
    return records


def write_dataset(root: Path, n_images: int, kind: str, seed: int = 0, **kw) -> tuple[Path, Path]:
    """Images in root/images and records in root/{kind}.json; returns (records file, image folder)."""
    images = write_images(root / "images", n_images, seed)
    records = caption_records(images, seed) if kind == "caption" else instruct_records(images, seed, **kw)
    path = root / f"{kind}.json"
    path.write_text(json.dumps(records, indent=1))
    return path, root / "images"


def write_tiny_setup(root: Path, n_images: int = 192) -> dict[str, Path]:
    """What configs/tiny/*.yaml expect under root: a tiny init model and squares data for both stages."""
    from llavakit.model import tiny
    from llavakit.model.build import InitConfig, init_model

    parts = root / "parts"
    init = init_model(InitConfig(vision=str(tiny.tiny_clip(parts / "clip")), lm=str(tiny.tiny_llama(parts / "llama")),
                                 out=str(root / "init"), template="vicuna_v1"))
    caption, images = write_dataset(root / "data", n_images, "caption", seed=0)
    qa, _ = write_dataset(root / "data", n_images, "qa", seed=0, text_only=16, multi_image=16)
    return {"init": init, "caption": caption, "qa": qa, "images": images}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m llavakit.train.synthetic",
                                description="Write a tiny init model and coloured-squares data for configs/tiny/*.yaml.")
    p.add_argument("root", nargs="?", default="runs/tiny", help="where to write (default runs/tiny)")
    p.add_argument("--images", type=int, default=192, help="number of square images (default 192)")
    args = p.parse_args(argv)
    for name, path in write_tiny_setup(Path(args.root), args.images).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
