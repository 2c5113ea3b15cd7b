"""The offline benchmark: question building from a hand-made world, CHAIR, and scoring."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from llavakit.eval.chair import Mention, SceneObject, Vocabulary, chair_metrics, find_mentions, score_caption
from llavakit.eval.common import EvalError
from llavakit.eval.offline import (
    POSITIONS,
    Obj,
    Scene,
    build_offline,
    count_targets,
    pope_negatives,
    read_scenes,
    world_stats,
)
from llavakit.eval.registry import get_benchmark

WORLD = Path(__file__).parent / "fixtures" / "eval" / "world"

# The fixture world (tests/fixtures/eval/world/scenes.jsonl), by hand:
#   200000000: red circle (top left), blue square (bottom right), green square (center)
#   200000001: yellow triangle (top), blue circle (bottom left), a clip-art "animals" object (ignored)
#   200000002: red star (right), red circle (left), yellow square (top)
SCENE_CATEGORIES = {200000000: {"circle", "square"}, 200000001: {"triangle", "circle"}, 200000002: {"star", "circle", "square"}}
SHAPES = {  # (category, colour) of each scene's shape objects
    200000000: [("circle", "red"), ("square", "blue"), ("square", "green")],
    200000001: [("triangle", "yellow"), ("circle", "blue")],
    200000002: [("star", "red"), ("circle", "red"), ("square", "yellow")],
}


def count_by_hand(image: int, color: str | None, category: str | None) -> int:
    return sum(category in (None, cat) and color in (None, col) for cat, col in SHAPES[image])


@pytest.fixture
def bench_file(tmp_path):
    out = tmp_path / "bench" / "offline.json"
    build_offline(WORLD, out, seed=0)
    return out


def questions(path: Path) -> list[dict]:
    return json.loads(path.read_text())["questions"]


def image_id(q: dict) -> int:
    return int(q["question_id"].split("-")[0])


# ---------------------------------------------------------------- building


def test_scenes_keep_only_shapes():
    scenes = read_scenes(WORLD)
    assert [s.image_id for s in scenes] == [200000000, 200000001, 200000002]
    assert {s.image_id: s.categories for s in scenes} == SCENE_CATEGORIES


def test_build_is_deterministic_by_seed(tmp_path):
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    build_offline(WORLD, a, seed=0)
    build_offline(WORLD, b, seed=0)
    build_offline(WORLD, c, seed=1)
    assert a.read_bytes() == b.read_bytes()
    assert questions(a) != questions(c)
    assert [q["question_id"] for q in questions(a)] == [q["question_id"] for q in questions(c)]


def test_questions_agree_with_the_scenes(bench_file):
    qs = questions(bench_file)
    tasks = Counter(q["task"] for q in qs)
    assert tasks["describe"] == 3 and tasks["existence"] == 6 and tasks["count"] == 3
    for q in qs:
        cats = SCENE_CATEGORIES[image_id(q)]
        assert "animals" not in q["prompt"]
        if q["task"] == "count":  # "How many [<colour>] <category>s / shapes are there in the image?"
            color, category = q["count_of"]["color"], q["count_of"]["category"]
            noun = " ".join(w for w in (color, f"{category}s" if category else "shapes") if w)
            assert q["prompt"].split("\n")[1] == f"How many {noun} are there in the image?"
            assert q["answer"] == str(count_by_hand(image_id(q), color, category))
        if q["task"] in ("existence",) or q["task"].startswith("pope_"):
            cat = q["prompt"].split("Is there ")[1].split(" in the image")[0].split(" ", 1)[1]
            assert q["answer"] == ("yes" if cat in cats else "no")
        if q["task"] == "position":
            assert q["answer"] in POSITIONS
        if q["task"] == "shape":
            assert q["answer"] in cats
    for img in SCENE_CATEGORIES:  # existence and every POPE split are balanced per image
        for task in ("existence", "pope_random", "pope_popular", "pope_adversarial"):
            labels = Counter(q["answer"] for q in qs if image_id(q) == img and q["task"] == task)
            assert labels["yes"] == labels["no"] >= 1


def test_count_targets_by_hand():
    """Scene 0 (red circle, blue square, green square) in a world of circle/square/star/triangle."""
    scenes = read_scenes(WORLD)
    targets = count_targets(scenes[0], world_stats(scenes))
    assert targets == {
        0: [(None, "star"), (None, "triangle")],
        1: [("blue", "square"), ("blue", None), ("green", "square"), ("green", None), ("red", "circle"), ("red", None),
            (None, "circle")],
        2: [(None, "square")],
        3: [(None, None)],
    }


def test_count_answers_spread_over_zero_to_five(tmp_path):
    """Held-out world of 200 scenes: no count answer is the majority (it was "1" ~92% of the time when the
    question named a present category); 0..5 all occur; other seeds give other questions."""
    from llavakit.world.config import WorldConfig
    from llavakit.world.generate import generate_world

    world = tmp_path / "world"
    generate_world(WorldConfig(out=str(world), num_images=200, seed=7, split="test", max_objects=6))
    answers = []
    for seed in (0, 1):
        build_offline(world, tmp_path / f"b{seed}.json", seed=seed)
        answers.append([q["answer"] for q in questions(tmp_path / f"b{seed}.json") if q["task"] == "count"])
    dist = Counter(answers[0])
    assert len(answers[0]) == 200 and set(dist) == {"0", "1", "2", "3", "4", "5"}, dist
    assert dist.most_common(1)[0][1] <= 0.5 * len(answers[0]), dist
    assert answers[0] != answers[1]
    # the training data's count questions (datagen vqa, SceneQA) are drawn answer-first too
    from llavakit.datagen.config import SourceConfig, VQAConfig
    from llavakit.datagen.vqa import generate_vqa

    generate_vqa(VQAConfig(source=SourceConfig(annotations=world, images_dir=world / "images"), out=tmp_path / "vqa.json",
                           questions_per_image=1, mc_per_image=0, types=("count",), seed=0))
    train = Counter(r["conversations"][1]["value"] for r in json.loads((tmp_path / "vqa.json").read_text()))
    assert {"0", "1", "2", "3"} <= set(train) and train.most_common(1)[0][1] <= 0.5 * sum(train.values()), train


def test_fixed_questions_by_hand(bench_file):
    qs = {q["question_id"]: q for q in questions(bench_file)}
    # scene 0 has one circle (red) and two squares: the only category with a unique object is the circle,
    # and the squares are told apart by size, so colour questions name "circle", "small square" or "medium square".
    color = qs["200000000-color-0"]
    expected = {"circle": "red", "small square": "blue", "medium square": "green"}
    noun = color["prompt"].split("What color is the ")[1].split("?")[0]
    assert color["answer"] == expected[noun]
    # scene 2: red star and red circle are both medium, so only the yellow square can be named by colour.
    shape = qs["200000002-shape-0"]
    assert shape["prompt"].startswith("<image>\nWhat shape is the yellow object?\n") and shape["answer"] == "square"
    mc = qs["200000001-mc-0"]
    options = dict(line.split(". ", 1) for line in mc["prompt"].split("\n")[2:-1])
    noun = mc["prompt"].split("What color is the ")[1].split("?")[0]
    assert options[mc["answer"]] == {"triangle": "yellow", "circle": "blue"}[noun]
    assert len(options) == 4 and mc["num_choices"] == 4


def test_pope_negative_sampling_by_split():
    import random

    def sc(i, *cats):
        return Scene(i, f"{i}.png", "test", tuple(Obj(c, "red", "small", "center") for c in cats))

    # frequency: square 5, star 4, circle 1, heart 1; heart co-occurs with circle once, square/star never do
    scenes = [sc(0, "circle", "heart"), *(sc(i, "square", "star") for i in range(1, 5)), sc(5, "square")]
    stats = world_stats(scenes)
    probe = sc(9, "circle")
    assert pope_negatives("popular", probe, stats, 2, random.Random(0)) == ["square", "star"]
    assert pope_negatives("adversarial", probe, stats, 2, random.Random(0)) == ["heart", "square"]
    picked = pope_negatives("random", probe, stats, 3, random.Random(0))
    assert sorted(picked) == ["heart", "square", "star"]


def test_training_world_is_refused(tmp_path):
    world = tmp_path / "world"
    shutil.copytree(WORLD, world)
    text = (world / "scenes.jsonl").read_text().replace('"split": "test"', '"split": "train"')
    (world / "scenes.jsonl").write_text(text)
    with pytest.raises(EvalError, match="held-out"):
        build_offline(world, tmp_path / "b.json")
    build_offline(world, tmp_path / "b.json", allow_train=True)


def test_load_resolves_images_in_the_world(bench_file):
    items = get_benchmark("offline").load(bench_file)
    assert all(Path(p).is_file() for it in items for p in it.images)
    assert {it.max_new_tokens for it in items if it.category == "describe"} == {256}
    with pytest.raises(EvalError, match="not a llavakit-offline-benchmark"):
        get_benchmark("offline").load(WORLD / "world.json")


# ---------------------------------------------------------------- CHAIR


@pytest.fixture
def vocab():
    return Vocabulary.build(["circle", "square", "star", "ellipse", "cross"], ["red", "blue", "green", "gray", "yellow"])


def test_mentions(vocab):
    assert find_mentions("A large red circle and two blue squares.", vocab) == [Mention("circle", "red"), Mention("square", "blue")]
    assert find_mentions("A disc, an oval and crosses; the circle is red.", vocab) == [
        Mention("circle", None), Mention("ellipse", None), Mention("cross", None)]  # fmt: skip
    assert find_mentions("a grey plus sign", vocab) == [Mention("cross", "gray")]
    assert find_mentions("a magenta star", vocab) == [Mention("star", "magenta")]
    assert find_mentions("a blue, medium-sized square and a dark green star", vocab) == [
        Mention("square", "blue"), Mention("star", "green")]  # fmt: skip
    assert find_mentions("Stars are bright. Starting now.", vocab) == [Mention("star", None)]
    # the same object named again without its colour is not a second mention; another colour is
    assert find_mentions("A red circle. The circle is big, and so is the blue circle.", vocab) == [
        Mention("circle", "red"), Mention("circle", "blue")]  # fmt: skip


def test_chair_by_hand(vocab):
    scene = [SceneObject("circle", "red"), SceneObject("square", "blue"), SceneObject("square", "green")]
    a = score_caption("A large red circle sits next to a blue square and a yellow star.", scene, vocab)
    assert a.hallucinated == (Mention("star", "yellow"),) and (a.recalled, a.objects) == (2, 3)
    b = score_caption("There are two squares and an oval.", scene, vocab)
    assert b.hallucinated == (Mention("ellipse", None),) and b.recalled == 2
    c = score_caption("A grey circle.", [SceneObject("circle", "gray")], vocab)
    assert c.hallucinated == () and (c.recalled, c.objects) == (1, 1)
    d = score_caption("A blue circle.", scene, vocab)  # right shape, wrong colour: hallucinated, recalls nothing
    assert d.hallucinated == (Mention("circle", "blue"),) and d.recalled == 0
    m = chair_metrics([a, b, c])
    assert m["chair_i"] == pytest.approx(100 * 2 / 6)  # 2 hallucinated of 3 + 2 + 1 mentions
    assert m["chair_s"] == pytest.approx(100 * 2 / 3)  # captions a and b hallucinate
    assert m["recall"] == pytest.approx(100 * 5 / 7)  # (2 + 2 + 1) of (3 + 3 + 1) objects


# ---------------------------------------------------------------- scoring


def oracle(item) -> str:
    """A perfect answer for every offline question."""
    if item.category == "describe":
        return " ".join(f"There is a {color} {cat}." for cat, color in item.meta["objects"])
    return item.answer


def test_scores_perfect_and_all_yes(bench_file):
    bench = get_benchmark("offline")
    items = bench.load(bench_file)
    perfect = bench.score(items, {it.question_id: oracle(it) for it in items})
    m = perfect["metrics"]
    assert (m["short_answer_accuracy"], m["mc_accuracy"], m["pope_f1"]) == (100.0, 100.0, 100.0)
    assert (m["chair_i"], m["chair_s"], m["recall"]) == (0.0, 0.0, 100.0)
    assert perfect["primary"] == "short_answer_accuracy"

    # "Yes" to everything: POPE is balanced, so precision 50, recall 100, F1 66.67, yes-ratio 100;
    # of the short answers only the existence "yes" questions (one per image) are right.
    yes = bench.score(items, {it.question_id: "Yes" for it in items})
    for row in yes["breakdown"]["pope"].values():
        assert [row[k] for k in ("precision", "recall", "f1", "yes_ratio")] == pytest.approx([50, 100, 200 / 3, 100])
    short = [it for it in items if it.category in ("color", "shape", "count", "position", "existence")]
    assert yes["metrics"]["short_answer_accuracy"] == pytest.approx(100 * 3 / len(short))
    assert yes["breakdown"]["task"]["existence"] == {"accuracy": 50.0, "count": 6}
    assert yes["metrics"]["recall"] == 0.0 and yes["metrics"]["chair_i"] == 0.0


def test_chair_counts_every_shape_the_world_can_draw(bench_file):
    """A fixed word list (as CHAIR's COCO one): a hexagon is a hallucination though no scene of the benchmark has one."""
    bench = get_benchmark("offline")
    items = bench.load(bench_file)
    describe = next(it for it in items if it.category == "describe")
    drawn = {cat for it in items if it.category == "describe" for cat, _ in it.meta["objects"]}
    assert "hexagon" not in drawn and "hexagon" not in describe.meta["categories"]  # the benchmark's own words
    result = bench.score(items, {it.question_id: "There is a hexagon." if it.category == "describe" else "no"
                                 for it in items})
    describe = result["breakdown"]["describe"]["all"]
    assert describe["mentions"] == describe["hallucinated"] == describe["count"] and result["metrics"]["chair_i"] == 100.0


def test_short_answers_are_normalised(bench_file):
    bench = get_benchmark("offline")
    items = [it for it in bench.load(bench_file) if it.category in ("count", "color")]
    words = {"1": "One.", "2": "two", "3": "Three"}
    answers = {it.question_id: words.get(it.answer, f"The {it.answer.title()}.") for it in items}
    assert bench.score(items, answers)["metrics"]["short_answer_accuracy"] == 100.0
