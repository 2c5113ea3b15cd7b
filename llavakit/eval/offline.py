"""The offline benchmark: questions generated from a held-out generated world's scene graphs.

`build_offline(world_dir, out_file, seed)` reads `world_dir/scenes.jsonl` (docs/world-format.md)
and writes one JSON file of questions, the same for the same world and seed. Only objects of
supercategory "shape" are asked about (clip-art objects are left out). Per image:

- short answers, exact match after VQA normalisation: colour of an object, shape of an
  object, count (0..5: of a category, colour + category, colour, or all shapes; the answer is
  drawn first so counts spread, absent categories giving 0), position (3x3 grid cell),
  existence (one "yes" and one "no" question, so the task is balanced);
- multiple choice (`mc`): an object's colour among lettered options, scored by letter;
- POPE-style yes/no probes in three splits, positives being present categories and
  negatives absent ones: `random` (uniform), `popular` (most frequent categories in the
  world), `adversarial` (categories that co-occur most with the present ones);
- `describe`: a detailed description scored with CHAIR_i / CHAIR_s / recall (see chair.py).
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from llavakit.eval.chair import CaptionScore, SceneObject, Vocabulary, chair_metrics, plurals, score_caption
from llavakit.eval.common import (
    LETTER_SUFFIX,
    SHORT_ANSWER_SUFFIX,
    SHORT_MAX_NEW_TOKENS,
    EvalError,
    EvalItem,
    QuestionId,
    answers_for,
    check_unique_ids,
    group_rows,
    image_prompt,
    make_result,
    percent,
    read_json,
    read_jsonl,
    require_file,
)
from llavakit.eval.pope import binary_metrics
from llavakit.eval.text import LETTERS, normalize_vqa, parse_letter, parse_yes_no_pope
from llavakit.world.config import POSITIONS  # the nine cells, one definition

FORMAT = "llavakit-offline-benchmark"
VERSION = 2  # 2: count questions balanced over 0..5 (colours, all shapes, absent categories)
SHORT_TASKS = ("color", "shape", "count", "position", "existence")
POPE_SPLITS = ("random", "popular", "adversarial")
DESCRIBE_PROMPT = "Describe this image in detail."
DESCRIBE_MAX_NEW_TOKENS = 256
MAX_COUNT = 5


@dataclass(frozen=True)
class Obj:
    """A shape object of a scene."""

    category: str
    color: str | None
    size: str | None
    position: str


@dataclass(frozen=True)
class Scene:
    """What the benchmark needs of one scenes.jsonl line."""

    image_id: int
    file_name: str
    split: str
    objects: tuple[Obj, ...]

    @property
    def categories(self) -> set[str]:
        return {o.category for o in self.objects}


@dataclass(frozen=True)
class WorldStats:
    """World-wide category statistics for POPE negatives, and the vocabulary."""

    categories: tuple[str, ...]
    colors: tuple[str, ...]
    frequency: Mapping[str, int]
    cooccurrence: Mapping[tuple[str, str], int]


def read_scenes(world_dir: Path) -> list[Scene]:
    """The world's scenes, sorted by image id, keeping only shape objects."""
    path = require_file(Path(world_dir) / "scenes.jsonl", "world scenes.jsonl")
    scenes = []
    for row in read_jsonl(path):
        objs = tuple(
            Obj(o["category"], o.get("color"), o.get("size"), o["position"])
            for o in row.get("objects", [])
            if o.get("supercategory", "shape") == "shape"
        )
        scenes.append(Scene(int(row["image_id"]), row["file_name"], row.get("split", ""), objs))
    return sorted(scenes, key=lambda s: s.image_id)


def world_stats(scenes: Sequence[Scene]) -> WorldStats:
    """Category frequencies (images containing it) and pairwise co-occurrence counts."""
    freq: Counter[str] = Counter()
    co: Counter[tuple[str, str]] = Counter()
    for s in scenes:
        cats = sorted(s.categories)
        freq.update(cats)
        for a, b in combinations(cats, 2):
            co[(a, b)] += 1
            co[(b, a)] += 1
    colors = sorted({o.color for s in scenes for o in s.objects if o.color})
    return WorldStats(tuple(sorted(freq)), tuple(colors), dict(freq), dict(co))


def article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def describe(obj: Obj, objs: Sequence[Obj], keys: Sequence[tuple[str, ...]]) -> str | None:
    """The shortest attribute phrase from `keys` naming `obj` uniquely among `objs`, or None."""
    for key in keys:
        value = tuple(getattr(obj, k) for k in key)
        if None in value:
            continue
        if sum(tuple(getattr(o, k) for k in key) == value for o in objs) == 1:
            return " ".join(value)
    return None


def _q(scene: Scene, task: str, n: int | str, prompt: str, answer: Any, **extra: Any) -> dict[str, Any]:
    return {"question_id": f"{scene.image_id}-{task}-{n}", "image": scene.file_name, "task": task,
            "prompt": prompt, "answer": answer, **extra}  # fmt: skip


def color_question(scene: Scene, rng: random.Random) -> dict[str, Any] | None:
    """"What color is the <category>?" for an object named without its colour."""
    cands = [(o, d) for o in scene.objects if o.color and (d := describe(o, scene.objects, [("category",), ("size", "category")]))]
    if not cands:
        return None
    obj, desc = rng.choice(cands)
    return _q(scene, "color", 0, image_prompt(f"What color is the {desc}?", SHORT_ANSWER_SUFFIX), obj.color)


def shape_question(scene: Scene, rng: random.Random) -> dict[str, Any] | None:
    """"What shape is the <colour> object?" for an object named by colour (and size)."""
    cands = [(o, d) for o in scene.objects if (d := describe(o, scene.objects, [("color",), ("size", "color")]))]
    if not cands:
        return None
    obj, desc = rng.choice(cands)
    return _q(scene, "shape", 0, image_prompt(f"What shape is the {desc} object?", SHORT_ANSWER_SUFFIX), obj.category)


def count_targets(scene: Scene, stats: WorldStats) -> dict[int, list[tuple[str | None, str | None]]]:
    """(colour, category) targets by their count (0..MAX_COUNT): every category of the world (the absent
    ones count 0), the scene's colour + category pairs and colours (None: any), and all its shapes."""
    targets = {(None, c) for c in stats.categories} | {(None, None)}
    targets |= {(o.color, o.category) for o in scene.objects if o.color}
    targets |= {(o.color, None) for o in scene.objects if o.color}
    by_count: dict[int, list[tuple[str | None, str | None]]] = {}
    for color, category in sorted(targets, key=str):
        n = sum((category in (None, o.category)) and (color in (None, o.color)) for o in scene.objects)
        if n <= MAX_COUNT:
            by_count.setdefault(n, []).append((color, category))
    return by_count


def count_question(scene: Scene, stats: WorldStats, rng: random.Random) -> dict[str, Any] | None:
    """"How many <plural> are there in the image?" with the answer drawn first, uniformly over the counts
    the scene offers, then a target with that count: most single categories occur once, so drawing the
    target first would make "1" the answer almost always."""
    by_count = count_targets(scene, stats)
    if not by_count:
        return None
    n = rng.choice(sorted(by_count))
    color, category = rng.choice(by_count[n])
    noun = " ".join(w for w in (color, plurals(category)[1] if category else "shapes") if w)
    prompt = image_prompt(f"How many {noun} are there in the image?", SHORT_ANSWER_SUFFIX)
    return _q(scene, "count", 0, prompt, str(n), count_of={"color": color, "category": category})


def position_question(scene: Scene, rng: random.Random) -> dict[str, Any] | None:
    """"Where is the <object>?" answered with one of the nine grid-cell names."""
    keys = [("category",), ("color", "category"), ("size", "color", "category")]
    cands = [(o, d) for o in scene.objects if (d := describe(o, scene.objects, keys))]
    if not cands:
        return None
    obj, desc = rng.choice(cands)
    suffix = "Answer with one of: " + ", ".join(POSITIONS) + "."
    return _q(scene, "position", 0, image_prompt(f"Where is the {desc} in the image?", suffix), obj.position)


def existence_questions(scene: Scene, stats: WorldStats, rng: random.Random) -> list[dict[str, Any]]:
    """One "yes" and one "no" "Is there a <category> in the image?" question (none if either is impossible)."""
    present = sorted(scene.categories)
    absent = [c for c in stats.categories if c not in scene.categories]
    if not present or not absent:
        return []
    out = []
    for n, (cat, label) in enumerate([(rng.choice(present), "yes"), (rng.choice(absent), "no")]):
        prompt = image_prompt(f"Is there {article(cat)} {cat} in the image?", SHORT_ANSWER_SUFFIX)
        out.append(_q(scene, "existence", n, prompt, label))
    return out


def mc_question(scene: Scene, stats: WorldStats, rng: random.Random, num_options: int) -> dict[str, Any] | None:
    """A colour question with lettered options: the true colour and distractors from the world's colours."""
    cands = [(o, d) for o in scene.objects if o.color and (d := describe(o, scene.objects, [("category",), ("size", "category")]))]
    others_pool = list(stats.colors)
    if not cands or len(others_pool) < 2:
        return None
    obj, desc = rng.choice(cands)
    others = [c for c in others_pool if c != obj.color]
    options = [obj.color, *rng.sample(others, min(num_options - 1, len(others)))]
    rng.shuffle(options)
    lines = [f"What color is the {desc}?"] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(options)]
    prompt = image_prompt("\n".join(lines), LETTER_SUFFIX)
    return _q(scene, "mc", 0, prompt, LETTERS[options.index(obj.color)], num_choices=len(options))


def pope_negatives(split: str, scene: Scene, stats: WorldStats, k: int, rng: random.Random) -> list[str]:
    """k absent categories: uniform (random), most frequent (popular) or most co-occurring (adversarial)."""
    absent = [c for c in stats.categories if c not in scene.categories]
    if split == "random":
        return rng.sample(absent, k)
    if split == "popular":
        return sorted(absent, key=lambda c: (-stats.frequency[c], c))[:k]
    present = scene.categories
    co = {c: sum(stats.cooccurrence.get((p, c), 0) for p in present) for c in absent}
    return sorted(absent, key=lambda c: (-co[c], -stats.frequency[c], c))[:k]


def pope_questions(scene: Scene, stats: WorldStats, rng: random.Random, per_image: int) -> list[dict[str, Any]]:
    """Balanced POPE probes per split: k present and k absent categories, interleaved."""
    present = sorted(scene.categories)
    absent_count = len(stats.categories) - len(present)
    k = min(per_image, len(present), absent_count)
    if not k:
        return []
    out = []
    for split in POPE_SPLITS:
        pos = rng.sample(present, k)
        neg = pope_negatives(split, scene, stats, k, rng)
        pairs = [(c, lab) for p, n in zip(pos, neg) for c, lab in ((p, "yes"), (n, "no"))]
        for n, (cat, label) in enumerate(pairs):
            prompt = image_prompt(f"Is there {article(cat)} {cat} in the image?", SHORT_ANSWER_SUFFIX)
            out.append(_q(scene, f"pope_{split}", n, prompt, label))
    return out


def describe_question(scene: Scene) -> dict[str, Any]:
    """The detailed-description request, with the scene's objects for CHAIR."""
    objects = [[o.category, o.color] for o in scene.objects]
    return _q(scene, "describe", 0, image_prompt(DESCRIBE_PROMPT, None), None, objects=objects)


def scene_questions(scene: Scene, stats: WorldStats, seed: int, pope_per_image: int, mc_options: int) -> list[dict[str, Any]]:
    """Every question of one scene; the scene's own RNG makes it independent of the others."""
    rng = random.Random(f"{seed}:{scene.image_id}")
    singles = [color_question(scene, rng), shape_question(scene, rng), count_question(scene, stats, rng), position_question(scene, rng)]
    out = [q for q in singles if q is not None]
    out += existence_questions(scene, stats, rng)
    mc = mc_question(scene, stats, rng, mc_options)
    out += [mc] if mc else []
    out += pope_questions(scene, stats, rng, pope_per_image)
    out.append(describe_question(scene))
    return out


def build_offline(
    world_dir: Path, out_file: Path, seed: int = 0, pope_per_image: int = 3, mc_options: int = 4, allow_train: bool = False
) -> dict[str, Any]:
    """Write the offline benchmark file for a held-out world; returns a summary (questions per task)."""
    world_dir, out_file = Path(world_dir), Path(out_file)
    scenes = read_scenes(world_dir)
    if not scenes:
        raise EvalError(f"{world_dir / 'scenes.jsonl'}: no scenes")
    splits = sorted({s.split for s in scenes})
    if "train" in splits and not allow_train:
        raise EvalError(f"{world_dir}: this world holds training scenes; build the benchmark from a held-out (val/test) world")
    if not 2 <= mc_options <= len(LETTERS) or pope_per_image < 1:
        raise EvalError(f"mc_options must be 2..{len(LETTERS)} and pope_per_image >= 1")
    stats = world_stats(scenes)
    questions = [q for s in scenes for q in scene_questions(s, stats, seed, pope_per_image, mc_options)]
    doc = {
        "format": FORMAT, "version": VERSION, "seed": seed, "splits": splits,
        "world": os.path.relpath(world_dir.resolve(), out_file.parent.resolve()),
        "world_config": _world_config(world_dir),
        "categories": list(stats.categories), "colors": list(stats.colors), "questions": questions,
    }  # fmt: skip
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return {"file": str(out_file), "scenes": len(scenes), "questions": dict(Counter(q["task"] for q in questions))}


def _world_config(world_dir: Path) -> dict[str, Any] | None:
    path = world_dir / "world.json"
    return read_json(path) if path.is_file() else None


@dataclass(frozen=True)
class Offline:
    """Offline benchmark entry; `load` takes the file written by `build_offline`."""

    name: str = "offline"

    def load(self, data_path: Path) -> list[EvalItem]:
        """Items of the benchmark file; images resolved inside the recorded world directory."""
        path = require_file(Path(data_path), "offline benchmark file")
        doc = read_json(path)
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise EvalError(f"{path}: not a {FORMAT} v{VERSION} file (build it with `llavakit eval build-offline`)")
        world = path.parent / doc["world"]
        vocab = {"categories": doc["categories"], "colors": doc["colors"]}
        items = [_item(q, world, vocab) for q in doc["questions"]]
        check_unique_ids(items, path)
        return items

    def score(self, items: Sequence[EvalItem], answers: Mapping[QuestionId, str]) -> dict[str, Any]:
        """Short-answer / mc accuracy per task, POPE metrics per split, CHAIR on descriptions."""
        texts = answers_for(items, answers, self.name)
        pairs = list(zip(items, texts))
        short = [(i.category, normalize_vqa(t) == normalize_vqa(i.answer)) for i, t in pairs if i.category in SHORT_TASKS]
        mc = [("mc", parse_letter(t, i.meta["num_choices"]) == i.answer) for i, t in pairs if i.category == "mc"]
        pope = {s: [(parse_yes_no_pope(t), i.answer) for i, t in pairs if i.category == f"pope_{s}"] for s in POPE_SPLITS}
        pope_rows = {s: binary_metrics([p for p, _ in v], [l for _, l in v]) for s, v in pope.items() if v}
        captions = [(i, t) for i, t in pairs if i.category == "describe"]
        metrics: dict[str, float] = {}
        if short:
            metrics["short_answer_accuracy"] = percent(sum(ok for _, ok in short), len(short))
        if mc:
            metrics["mc_accuracy"] = percent(sum(ok for _, ok in mc), len(mc))
        if pope_rows:
            metrics["pope_f1"] = sum(r["f1"] for r in pope_rows.values()) / len(pope_rows)
        breakdown: dict[str, Any] = {"task": group_rows(short + mc), "pope": pope_rows}
        if captions:
            vocab = chair_vocabulary(captions[0][0].meta["categories"], captions[0][0].meta["colors"])
            chair = chair_metrics([_caption_score(i, t, vocab) for i, t in captions])
            metrics.update(chair_i=chair["chair_i"], chair_s=chair["chair_s"], recall=chair["recall"])
            breakdown["describe"] = {"all": chair}
        if not metrics:
            raise EvalError("offline: no questions to score")
        primary = next(iter(metrics))
        return make_result(self.name, len(items), primary, metrics, {k: v for k, v in breakdown.items() if v})


def chair_vocabulary(categories: Sequence[str], colors: Sequence[str]) -> Vocabulary:
    """CHAIR's words: every shape and colour the world generator knows, whatever the benchmark's scenes hold (and
    theirs, for worlds of other categories)."""
    from llavakit.world.config import COLORS, SHAPES

    return Vocabulary.build(sorted({*SHAPES, *categories}), sorted({*COLORS, *colors}))


def _item(q: Mapping[str, Any], world: Path, vocab: Mapping[str, Any]) -> EvalItem:
    task = q["task"]
    meta: dict[str, Any] = {}
    if task == "mc":
        meta["num_choices"] = q["num_choices"]
    if task == "describe":
        meta.update(vocab, objects=q["objects"])
    return EvalItem(
        question_id=q["question_id"],
        prompt=q["prompt"],
        images=(str(world / q["image"]),),
        answer=q["answer"],
        category=task,
        max_new_tokens=DESCRIBE_MAX_NEW_TOKENS if task == "describe" else SHORT_MAX_NEW_TOKENS,
        meta=meta,
    )


def _caption_score(item: EvalItem, text: str, vocab: Vocabulary) -> CaptionScore:
    objects = [SceneObject(cat, color) for cat, color in item.meta["objects"]]
    return score_caption(text, objects, vocab)
