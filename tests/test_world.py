"""Tests for the generated world (`llavakit world`)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llavakit.world import WorldConfig, WorldError, generate_world, load_scenes
from llavakit.world import cli as world_cli
from llavakit.world.captions import NUMBER_WORDS, make_captions
from llavakit.world.config import COLORS, POSITIONS, SHAPES, SPLIT_ID_OFFSET
from llavakit.world.scene import SceneContext, image_seed, sample_scene
from llavakit.world.shapes import shape_mask

EXTRAS = {"backgrounds": ("plain", "gradient", "noise"), "text_prob": 0.5, "chart_prob": 0.4}
NUMBERS = {w: i for i, w in enumerate(NUMBER_WORDS)}
SHAPE_WORDS = {s: s for s in SHAPES} | {s + "s": s for s in SHAPES} | {
    "crosses": "cross", "oval": "ellipse", "ovals": "ellipse"}  # fmt: skip
WORLD_FILES = ("world.json", "scenes.jsonl", "annotations/instances.json", "annotations/captions.json")


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world") / "train"
    generate_world(WorldConfig(out=out, num_images=40, seed=7, **EXTRAS))
    return out


@pytest.fixture(scope="module")
def scenes(world: Path) -> list[dict]:
    return load_scenes(world)


@pytest.fixture(scope="module")
def many_scenes() -> list[dict]:
    """Scene graphs (with captions) sampled without rendering, for wide caption coverage."""
    ctx = SceneContext(WorldConfig(out=Path("unused"), num_images=1, seed=11, **EXTRAS))
    out = []
    for i in range(300):
        record = sample_scene(ctx, i, i).record
        record["captions"] = make_captions(record, np.random.default_rng([record["seed"], 1]))
        out.append(record)
    return out


# --- determinism -------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    for name in ("a", "b"):
        generate_world(WorldConfig(out=tmp_path / name, num_images=12, seed=3, **EXTRAS))
    a, b = _all_files(tmp_path / "a"), _all_files(tmp_path / "b")
    assert len(a) == 12 + len(WORLD_FILES)
    assert a == b


def test_split_and_seed_change_the_world(tmp_path: Path) -> None:
    runs = {"train": ("train", 3), "val": ("val", 3), "other": ("train", 4)}
    loaded = {}
    for name, (split, seed) in runs.items():
        generate_world(WorldConfig(out=tmp_path / name, num_images=6, seed=seed, split=split))
        loaded[name] = load_scenes(tmp_path / name)
    train, val, other = loaded["train"], loaded["val"], loaded["other"]
    strip = lambda s: {k: v for k, v in s.items() if k not in ("image_id", "file_name", "split", "seed")}  # noqa: E731
    assert [strip(s) for s in train] != [strip(s) for s in val]
    assert [s["objects"] for s in train] != [s["objects"] for s in other]
    assert not {s["image_id"] for s in train} & {s["image_id"] for s in val}
    assert {s["image_id"] for s in val} == {SPLIT_ID_OFFSET["val"] + i for i in range(6)}
    assert all(s["file_name"] == f"images/val_{i:06d}.png" for i, s in enumerate(val))
    seeds = {image_seed(3, split, i) for split in ("train", "val", "test") for i in range(100)}
    assert len(seeds) == 300


# --- files and COCO structure ------------------------------------------------------------


def test_layout_and_coco_structure(world: Path, scenes: list[dict]) -> None:
    for rel in WORLD_FILES:
        assert (world / rel).is_file(), rel
    inst = json.loads((world / "annotations/instances.json").read_text())
    caps = json.loads((world / "annotations/captions.json").read_text())
    info = json.loads((world / "world.json").read_text())
    assert {"info", "images", "categories", "annotations"} <= inst.keys()
    assert info["config"]["seed"] == 7 and info["num_images"] == 40 and "out" not in info["config"]
    cats = {c["id"]: c for c in inst["categories"]}
    assert len(cats) == len(inst["categories"])
    assert [cats[i + 1]["name"] for i in range(len(SHAPES))] == list(SHAPES)
    images = {im["id"]: im for im in inst["images"]}
    assert len(images) == len(scenes) == 40
    assert len({a["id"] for a in inst["annotations"]}) == len(inst["annotations"])
    by_scene = {s["image_id"]: s for s in scenes}
    anns = Counter(a["image_id"] for a in inst["annotations"])
    for s in scenes:
        assert images[s["image_id"]]["file_name"] == s["file_name"]
        assert anns[s["image_id"]] == len(s["objects"])
    for a in inst["annotations"]:
        s = by_scene[a["image_id"]]
        obj = s["objects"][(a["id"] - 1) % 1000]
        assert cats[a["category_id"]]["name"] == obj["category"]
        assert a["bbox"] == obj["bbox"] and a["area"] == obj["area"] > 0 and a["iscrowd"] == 0
        assert a["attributes"] == {"color": obj["color"], "size": obj["size"]}
    per_image = Counter(c["image_id"] for c in caps["annotations"])
    assert set(per_image.values()) == {5} and set(per_image) == set(images)
    assert len({c["id"] for c in caps["annotations"]}) == len(caps["annotations"])


def test_boxes_inside_and_tight(world: Path, scenes: list[dict]) -> None:
    for s in scenes:
        with Image.open(world / s["file_name"]) as im:
            assert im.mode == "RGB" and im.size == (s["width"], s["height"])
            pixels = np.asarray(im)
        assert 128 <= s["width"] <= 224 and 128 <= s["height"] <= 224
        for obj in s["objects"]:
            x, y, w, h = obj["bbox"]
            assert x >= 0 and y >= 0 and w > 0 and h > 0
            assert x + w <= s["width"] and y + h <= s["height"]
            hit = (pixels[y : y + h, x : x + w] == COLORS[obj["color"]]).all(axis=2)
            # every border row and column of the box holds the object's colour: it can't shrink
            assert hit[0].any() and hit[-1].any() and hit[:, 0].any() and hit[:, -1].any(), obj
            assert hit.sum() >= obj["area"]
        for item in s["text"] + ([s["chart"]] if s["chart"] else []):
            x, y, w, h = item["bbox"]
            assert x >= 0 and y >= 0 and x + w <= s["width"] and y + h <= s["height"]


def test_positions_relations_and_overlap_follow_boxes(scenes: list[dict], many_scenes: list[dict]) -> None:
    for s in scenes + many_scenes:
        boxes = [o["bbox"] for o in s["objects"]]
        for o in s["objects"]:
            x, y, w, h = o["bbox"]
            col = min(2, int(3 * (x + w / 2) / s["width"]))
            row = min(2, int(3 * (y + h / 2) / s["height"]))
            assert o["position"] == POSITIONS[row * 3 + col]
        for r in s["relations"]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = boxes[r["subject"]], boxes[r["object"]]
            assert {
                "left of": ax + aw <= bx, "right of": bx + bw <= ax,
                "above": ay + ah <= by, "below": by + bh <= ay,
                # an occluded object's visible box may end where the one on top begins
                "overlapping": ax <= bx + bw and bx <= ax + aw and ay <= by + bh and by <= ay + ah,
            }[r["predicate"]], r  # fmt: skip
        assert 1 <= len(s["objects"]) <= 6 or s["chart"]


def test_zero_overlap_keeps_boxes_apart(tmp_path: Path) -> None:
    generate_world(WorldConfig(out=tmp_path, num_images=15, seed=2, max_overlap=0.0, min_objects=4))
    for s in load_scenes(tmp_path):
        assert not any(r["predicate"] == "overlapping" for r in s["relations"])
        bs = [o["bbox"] for o in s["objects"]]
        for i, (ax, ay, aw, ah) in enumerate(bs):
            for bx, by, bw, bh in bs[i + 1 :]:
                assert ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay


def test_every_shape_draws_a_tight_mask() -> None:
    rng = np.random.default_rng(0)
    for category in SHAPES:
        for extent in (18.0, 60.0):
            mask = np.asarray(shape_mask(category, extent, rng).mask) > 0
            assert mask.any(axis=1)[[0, -1]].all() and mask.any(axis=0)[[0, -1]].all(), category
            assert 0.3 * extent <= max(mask.shape) <= 1.15 * extent, (category, mask.shape)


# --- captions ----------------------------------------------------------------------------


def _scene_colors(s: dict) -> set[str]:
    colors = {o["color"] for o in s["objects"]} | {s["background"]["color"]}
    colors |= {s["background"].get("color2")} | {t["color"] for t in s["text"]}
    if s["chart"]:
        colors |= set(s["chart"]["colors"]) | {s["chart"]["axis_color"]}
    return colors


def _check_caption(caption: str, s: dict) -> None:
    assert (caption[0].isupper() or caption[0].isdigit()) and caption.endswith("."), caption
    plain = re.sub(r'"[^"]*"', " ", caption.lower())
    colors = _scene_colors(s)
    for word in re.findall(r"[a-z]+", plain):
        assert word not in COLORS or word in colors, (word, caption)
    categories = Counter(o["category"] for o in s["objects"])
    for word in re.findall(r"[a-z]+", plain):
        assert word not in SHAPE_WORDS or SHAPE_WORDS[word] in categories, (word, caption)
    color_counts = Counter(o["color"] for o in s["objects"] if o["supercategory"] == "shape")
    num_shapes = sum(color_counts.values())
    counted = rf"\b({'|'.join(NUMBER_WORDS)}|\d+)\s+(\w+)\s*(\w*)"
    for num, w1, w2 in re.findall(counted, plain):
        n = NUMBERS[num] if num in NUMBERS else int(num)
        if w1 in SHAPE_WORDS:
            assert categories[SHAPE_WORDS[w1]] == n, caption
        elif w1 in COLORS and w2 in ("shape", "shapes"):
            assert color_counts[w1] == n, caption
        elif w1 in ("shape", "shapes"):
            assert n == num_shapes, caption
        elif w1 in ("object", "objects"):
            assert n == len(s["objects"]), caption
        elif w1 == "bars":
            assert n == len(s["chart"]["values"]), caption
    for quoted in re.findall(r'"([^"]*)"', caption):
        assert quoted in {t["string"] for t in s["text"]}, caption


def test_captions_agree_with_the_scene(scenes: list[dict], many_scenes: list[dict]) -> None:
    kinds = Counter()
    for s in scenes + many_scenes:
        assert len(s["captions"]) == 5
        assert len(set(s["captions"])) >= 4, s["captions"]
        for caption in s["captions"]:
            _check_caption(caption, s)
            kinds["count"] += bool(re.search(r"\b(two|three|four|five|six) \w+", caption))
            kinds["position"] += any(p in caption for p in ("corner", "middle", "center", "left", "right"))
            kinds["text"] += '"' in caption
            kinds["chart"] += "bar chart" in caption
    assert min(kinds.values()) > 20, kinds
    distinct = {c for s in many_scenes for c in s["captions"]}
    assert len(distinct) > 1400  # varied phrasing: almost every caption is unique


def _two_object_scene(predicate: str) -> dict:
    objs = [
        {"id": 0, "category": "circle", "supercategory": "shape", "color": "red", "size": "large",
         "bbox": [10, 60, 40, 40], "area": 1200, "position": "left"},
        {"id": 1, "category": "square", "supercategory": "shape", "color": "blue", "size": "small",
         "bbox": [150, 60, 20, 20], "area": 400, "position": "right"},
    ]  # fmt: skip
    return {"objects": objs, "relations": [{"subject": 0, "predicate": predicate, "object": 1}],
            "text": [], "chart": None, "background": {"kind": "plain", "color": "white"},
            "width": 200, "height": 160}  # fmt: skip


def test_relation_and_position_phrases_are_right() -> None:
    scene = _two_object_scene("left of")
    for seed in range(60):
        for caption in make_captions(scene, np.random.default_rng(seed)):
            text = caption.lower()
            if " of a " in text and ("left" in text or "right" in text) and "circle" in text:
                first = "circle" if text.index("circle") < text.index("square") else "square"
                assert ("left of" in text) == (first == "circle"), caption
            for shape, wrong in (("circle", "right"), ("square", "left")):
                # "<shape> on the <side>" must name the object's own side
                assert not re.search(rf"{shape} (on|at) the {wrong}\b", text), caption


def test_caption_checker_catches_mismatches() -> None:
    scene = _two_object_scene("left of")
    for wrong in ("Two circles.", "A green circle.", "A red star.", "Three shapes on a white background.",
                  "One blue shape and two red shapes.", 'The word "EXIT".'):  # fmt: skip
        with pytest.raises(AssertionError):
            _check_caption(wrong, scene)
    _check_caption("One circle, one square and two shapes in all.", scene)


def test_counts_are_exact_for_a_known_scene() -> None:
    scene = _two_object_scene("left of")
    scene["objects"].append(dict(scene["objects"][0], id=2, bbox=[80, 10, 30, 30], position="top"))
    scene["relations"] = []
    seen = set()
    for seed in range(80):
        for caption in make_captions(scene, np.random.default_rng(seed)):
            _check_caption(caption, scene)
            seen |= set(re.findall(r"\b(two circles|one square|three \w+)\b", caption.lower()))
    assert {"two circles", "one square"} <= seen


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"num_images": 0}, "num_images"),
        ({"num_images": -3}, "num_images"),
        ({"categories": ("circle", "blob")}, "'blob'"),
        ({"colors": ("red", "magenta")}, "'magenta'"),
        ({"split": "dev"}, "'dev'"),
        ({"backgrounds": ("plain", "stripes")}, "'stripes'"),
        ({"min_size": 200, "max_size": 100}, "min_size"),
        ({"min_size": 8}, "min_size"),
        ({"max_overlap": 1.5}, "max_overlap"),
        ({"min_objects": 5, "max_objects": 2}, "min_objects"),
        ({"text_prob": 2.0}, "text_prob"),
        ({"seed": -1}, "seed"),
        ({"colors": ("white",), "background_colors": ("white",)}, "'white'"),
    ],
)
def test_bad_config_names_the_culprit(tmp_path: Path, kwargs: dict, culprit: str) -> None:
    with pytest.raises(WorldError, match=re.escape(culprit)):
        WorldConfig(out=tmp_path, **kwargs)


def test_unwritable_out_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(WorldError, match="not writable") as info:
        generate_world(WorldConfig(out=blocker / "world", num_images=2))
    assert str(blocker / "world") in str(info.value)


def test_clipart_missing_is_a_clear_error(tmp_path: Path) -> None:
    cfg = WorldConfig(out=tmp_path / "w", num_images=2, clipart_prob=0.5, clipart_dir=tmp_path / "none")
    with pytest.raises(WorldError, match="openclipart-png"):
        generate_world(cfg)
    assert not (tmp_path / "w").exists()


def _clipart_tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Two subject folders, each with one picture: a solid rectangle on transparency."""
    colors = {"animals/mammals": (120, 60, 20), "food": (200, 30, 200)}
    for subject, rgb in colors.items():
        (root / subject).mkdir(parents=True)
        pic = Image.new("RGBA", (80, 60), (0, 0, 0, 0))
        pic.paste(rgb + (255,), (10, 5, 70, 50))
        pic.save(root / subject / "pic.png")
    return colors


def test_clipart_from_a_subject_tree(tmp_path: Path) -> None:
    colors = _clipart_tree(tmp_path / "clip")
    out = tmp_path / "w"
    cfg = WorldConfig(out=out, num_images=6, seed=1, clipart_prob=1.0, clipart_dir=tmp_path / "clip",
                      background_colors=("white",))  # fmt: skip
    generate_world(cfg)
    inst = json.loads((out / "annotations/instances.json").read_text())
    names = {c["name"]: c["id"] for c in inst["categories"] if c["supercategory"] == "clipart"}
    assert names == {"animals": 101, "food": 102}
    scenes = load_scenes(out)
    objs = [o for s in scenes for o in s["objects"]]
    assert objs and all(o["supercategory"] == "clipart" and o["color"] is None for o in objs)
    assert {o["subject"] for o in objs} == {"animals/mammals", "food"}
    for s in scenes:
        pixels = np.asarray(Image.open(out / s["file_name"]))
        for o in s["objects"]:
            x, y, w, h = o["bbox"]
            diff = np.abs(pixels[y : y + h, x : x + w].astype(int) - colors[o["subject"]])
            hit = (diff <= 6).all(axis=2)  # resampled edges may be off by rounding
            assert hit[0].any() and hit[-1].any() and hit[:, 0].any() and hit[:, -1].any(), o
        for caption in s["captions"]:
            _check_caption(caption, s)


def test_unknown_clipart_subject(tmp_path: Path) -> None:
    _clipart_tree(tmp_path / "clip")
    cfg = WorldConfig(out=tmp_path / "w", num_images=1, clipart_prob=0.5, clipart_dir=tmp_path / "clip",
                      clipart_subjects=("animals", "dinosaurs"))  # fmt: skip
    with pytest.raises(WorldError, match="'dinosaurs'"):
        generate_world(cfg)


def test_load_scenes_names_missing_files(world: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(world, copy)
    (copy / "images" / "train_000003.png").unlink()
    with pytest.raises(FileNotFoundError, match="train_000003.png"):
        load_scenes(copy)
    assert len(load_scenes(copy, check_images=False)) == 40
    (copy / "annotations" / "captions.json").unlink()
    with pytest.raises(FileNotFoundError, match="annotations/captions.json"):
        load_scenes(copy)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_scenes(tmp_path / "nowhere")


# --- CLI ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llavakit")
    world_cli.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_is_registered() -> None:
    from llavakit.cli import COMMANDS

    assert "llavakit.world.cli" in COMMANDS


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["world", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--out", "--num-images", "--seed", "--split", "--max-overlap", "--clipart-dir"):
        assert option in out


def test_cli_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = _parser().parse_args([
        "world", "--out", str(out), "--num-images", "5", "--seed", "9", "--split", "test",
        "--categories", "circle,star", "--colors", "red,blue,green", "--text-prob", "1",
        "--width", "160", "--height", "128", "--max-objects", "3",
    ])  # fmt: skip
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "5 test images" in printed and "images/s" in printed and str(out) in printed
    scenes = load_scenes(out)
    assert all((s["width"], s["height"]) == (160, 128) and s["text"] for s in scenes)
    assert {o["category"] for s in scenes for o in s["objects"]} <= {"circle", "star"}
    assert {o["color"] for s in scenes for o in s["objects"]} <= {"red", "blue", "green"}
    bad = _parser().parse_args(["world", "--out", str(out), "--num-images", "0"])
    with pytest.raises(ValueError, match="num_images"):
        bad.func(bad)


def test_cli_through_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llavakit import cli

    assert cli.main(["world", "--out", str(tmp_path / "m"), "--num-images", "2"]) == 0
    assert cli.main(["world", "--out", str(tmp_path / "m"), "--categories", "blob"]) == 1
    assert "'blob'" in capsys.readouterr().err


# --- speed -------------------------------------------------------------------------------


def test_object_scale_draws_larger_objects_and_records_its_sizes(tmp_path: Path) -> None:
    """object_scale multiplies every size class; world.json records the scaled ranges; too large is refused."""
    extents = {}
    for scale in (1.0, 1.8):
        out = tmp_path / str(scale)
        generate_world(WorldConfig(out=out, num_images=40, seed=2, width=160, height=160, object_scale=scale,
                                   min_objects=1, max_objects=2))
        sizes = json.loads((out / "world.json").read_text())["sizes"]
        assert sizes["large"][1] == pytest.approx(0.45 * scale)
        objects = [o for s in load_scenes(out) for o in s["objects"]]
        for o in objects:  # no object outgrows its (scaled) size class (shapes may fill less than the extent)
            assert max(o["bbox"][2:]) <= sizes[o["size"]][1] * 160 + 2, o
        extents[scale] = np.mean([max(o["bbox"][2:]) for o in objects])
    assert extents[1.8] > 1.5 * extents[1.0]
    for bad in (2.5, 0.0, float("nan"), "big"):
        with pytest.raises(WorldError, match="object_scale"):
            WorldConfig(out=tmp_path / "x", object_scale=bad)
