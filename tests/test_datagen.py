"""llavakit datagen: annotations, the offline teacher's QA engine, parsing, packs, cache, engine, CLI,
captions, VQA and mix. (The openai teacher and kill/resume are in test_datagen_openai.py, hf in
test_datagen_hf.py.)"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest

from llavakit.datagen.annotations import AnnotationError, Dataset, ImageEntry, SceneObject
from llavakit.datagen.cache import Cache, cache_key
from llavakit.datagen.config import (
    CaptionsConfig,
    DatagenError,
    InstructConfig,
    MixConfig,
    SourceConfig,
    TeacherConfig,
    VQAConfig,
)
from llavakit.datagen.language import number
from llavakit.datagen.packs import PackError, load_list, load_pack
from llavakit.datagen.parse import Rejected, Rules, format_qa, parse_output
from llavakit.datagen.records import MC_SUFFIX, SHORT_ANSWER_SUFFIX
from llavakit.datagen.sceneqa import QTYPES, RELATION_SHORT, SceneQA
from llavakit.datagen.teachers.offline import OfflineTeacher

FIX = Path(__file__).parent / "fixtures" / "datagen"
WORLD = FIX / "world"
COCO = FIX / "coco"
N_WORLD = 7


def world_source(**kw) -> SourceConfig:
    return SourceConfig(annotations=WORLD, images_dir=WORLD / "images", **kw)


def world_dataset() -> Dataset:
    return world_source().load()


def raw_scenes() -> dict[int, dict]:
    """The fixture's scene graphs read directly (the ground truth, independent of the loader)."""
    lines = (WORLD / "scenes.jsonl").read_text().splitlines()
    return {s["image_id"]: s for s in map(json.loads, lines)}


def run_instruct(tmp_path: Path, name: str = "data", **kw):
    from llavakit.datagen.instruct import generate_instruct

    kw.setdefault("source", world_source())
    kw.setdefault("cache_dir", tmp_path / "cache")
    cfg = InstructConfig(out=tmp_path / f"{name}.json", progress=False, **kw)
    report = generate_instruct(cfg, log=lambda m: None)
    return report, json.loads((tmp_path / f"{name}.json").read_text())


def check_record(rec: dict, images_dir: Path) -> None:
    conv = rec["conversations"]
    assert conv and len(conv) % 2 == 0
    assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
    assert conv[0]["value"].count("<image>") == 1
    assert conv[0]["value"].startswith("<image>\n") or conv[0]["value"].endswith("\n<image>")
    assert sum(t["value"].count("<image>") for t in conv) == 1
    assert all(t["value"].strip() for t in conv)
    assert (images_dir / rec["image"]).is_file()


# ---------------------------------------------------------------- annotations


def test_context_is_captions_blank_line_then_normalised_boxes():
    img = world_dataset().by_id[1]
    assert img.context(with_boxes=True) == (
        "A large red circle in the top left and a small blue square in the bottom right.\n"
        "Two shapes on a white background: a red circle and a blue square.\n"
        "A small blue square sits below and to the right of a big red circle.\n"
        "\n"
        "circle: [0.052, 0.050, 0.365, 0.425]\n"
        "square: [0.781, 0.750, 0.927, 0.925]"
    )
    assert "circle:" not in img.context(with_boxes=False)


def test_world_sources_are_found_and_file_names_resolved(tmp_path):
    src = world_source()
    assert src.instances == WORLD / "annotations" / "instances.json"
    assert src.captions == WORLD / "annotations" / "captions.json"
    assert src.scenes == WORLD / "scenes.jsonl"
    ds = src.load()
    assert [i.image_id for i in ds.images] == list(range(1, N_WORLD + 1))
    assert ds.images[0].file_name == "train_000001.png"  # "images/" stripped: relative to images dir
    # with the world dir itself as images dir, the COCO file_name is used as is
    ds2 = SourceConfig(annotations=WORLD, images_dir=WORLD).load()
    assert ds2.images[0].file_name == "images/train_000001.png"
    # relations are closed under inversion; scene positions kept
    img = ds.by_id[2]
    assert (1, "right of", 0) in img.relations and (0, "left of", 1) in img.relations
    assert [o.position for o in img.objects] == ["left", "center", "top right"]
    assert ds.thing == "shape" and "red" in ds.colors


def test_coco_only_instances_work_without_scenes():
    src = SourceConfig(annotations=COCO / "annotations" / "instances_val2017.json", images_dir=COCO / "val2017")
    assert src.captions == COCO / "annotations" / "captions_val2017.json" and src.scenes is None
    ds = src.load()
    img = ds.by_id[139]
    dog = next(o for o in img.objects if o.category == "dog")
    assert dog.position == "bottom left" and dog.color is None
    person = next(o for o in img.objects if o.category == "person")
    cars = [o for o in img.objects if o.category == "car"]
    right_car = max(cars, key=lambda o: o.bbox[0])
    assert (person.index, "left of", right_car.index) in img.relations
    assert ds.thing == "object" and ds.colors == []
    engine = SceneQA(ds)
    assert "color" not in engine.available(img)
    crowd = ds.by_id[632]
    rng = random.Random(0)
    for _ in range(200):
        qa = engine.ask(crowd, "count", rng)
        assert qa is None or qa.facts["category"] != "person"  # crowd: count undefined, never asked
        assert engine.ask(crowd, "total", rng) is None


def test_missing_images_fail_with_count_or_are_skipped_and_reported(tmp_path):
    images = tmp_path / "images"
    shutil.copytree(WORLD / "images", images)
    (images / "train_000003.png").unlink()
    with pytest.raises(AnnotationError, match=r"1 of 7 images .* missing .*train_000003.*--allow-missing-images"):
        SourceConfig(annotations=WORLD, images_dir=images).load()
    src = SourceConfig(annotations=WORLD, images_dir=images, allow_missing_images=True)
    report, data = run_instruct(tmp_path, source=src, kinds=("detail",))
    assert len(data) == 6 and report.info["skipped_missing_images"] == ["images/train_000003.png"]


@pytest.mark.parametrize("change, match", [
    (lambda inst: inst["images"][0].update(width=0), r"image \d+: width must be > 0, got 0"),
    (lambda inst: inst["annotations"][0].update(bbox=[10, 10, -5, 8]), "negative width or height"),
    (lambda inst: inst["annotations"][0].update(bbox=[5000, 10, 20, 20]), r"lies outside the \d+x\d+ image"),
])
def test_coco_files_with_impossible_sizes_or_boxes_name_the_image(tmp_path, change, match):
    src = COCO / "annotations" / "instances_val2017.json"
    inst = json.loads(src.read_text())
    change(inst)
    bad = tmp_path / "instances.json"
    bad.write_text(json.dumps(inst))
    with pytest.raises(AnnotationError, match=match):
        SourceConfig(annotations=bad, images_dir=COCO / "val2017").load()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(annotations="nope"), "annotations not found: nope"),
        (dict(images_dir="nope/images"), "images dir not found"),
        (dict(captions="missing_captions.json"), "captions file not found: missing_captions.json"),
        (dict(limit=0), "limit must be a positive integer"),
    ],
)
def test_source_config_errors_name_the_culprit(kwargs, match):
    base = dict(annotations=WORLD, images_dir=WORLD / "images")
    with pytest.raises(DatagenError, match=match):
        SourceConfig(**{**base, **kwargs})


def test_config_errors_name_the_culprit(tmp_path):
    src = world_source()
    with pytest.raises(DatagenError, match="unknown kind 'dialog'"):
        InstructConfig(source=src, out=tmp_path / "o.json", cache_dir=tmp_path / "c", kinds="conversation,dialog")
    with pytest.raises(DatagenError, match="unknown teacher 'gpt5'; known: offline, openai, hf"):
        TeacherConfig(name="gpt5")
    with pytest.raises(DatagenError, match="--teacher-url"):
        TeacherConfig(name="openai", model="m")
    with pytest.raises(DatagenError, match="--teacher-model"):
        TeacherConfig(name="openai", url="http://127.0.0.1:1/v1")
    with pytest.raises(DatagenError, match="model directory not found: /no/such/model"):
        TeacherConfig(name="hf", model="/no/such/model")
    with pytest.raises(DatagenError, match="concurrency"):
        TeacherConfig(concurrency=0)
    with pytest.raises(DatagenError, match="is a directory"):
        InstructConfig(source=src, out=tmp_path, cache_dir=tmp_path / "c")
    with pytest.raises(DatagenError, match="unknown question type 'colour'"):
        VQAConfig(source=src, out=tmp_path / "v.json", types="count,colour")
    with pytest.raises(DatagenError, match="mix source not found"):
        MixConfig(sources=["nope.json:0.5"], out=tmp_path / "m.json")


# ---------------------------------------------------------------- the QA engine (offline teacher)


def _unique(scene_objs: list[dict], idx: int, attrs: tuple[str, ...]) -> bool:
    o = scene_objs[idx]
    return sum(all(p.get(a) == o.get(a) for a in attrs) for p in scene_objs) == 1


def _relation_holds(scene: dict, s: int, pred: str, o: int) -> bool:
    inverse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    rels = {(r["subject"], r["predicate"], r["object"]) for r in scene["relations"]}
    return (s, pred, o) in rels or (o, inverse[pred], s) in rels


def _count_in_text(n: int, text: str) -> bool:
    low = text.lower()
    if n == 0:
        return any(w in low for w in ("no ", "any ", "zero", "none"))
    return f" {number(n)} " in f" {low} " or f" {n} " in f" {low} " or low.startswith(number(n))


def test_every_offline_answer_matches_the_scene_graph():
    """Thousands of sampled QAs, each checked against the raw scene graph (not the engine's view)."""
    ds, scenes = world_dataset(), raw_scenes()
    engine = SceneQA(ds)
    seen = Counter()
    for img in ds.images:
        sc = scenes[img.image_id]
        objs = sc["objects"]
        for seed in range(60):
            rng = random.Random(seed)
            for qtype in QTYPES:
                qa = engine.ask(img, qtype, rng)
                if qa is None:
                    continue
                seen[qtype] += 1
                f, long, short = qa.facts, qa.long, qa.short
                assert qa.question.strip() and long.strip() and short.strip()
                if qa.choices:
                    assert short in qa.choices
                if qtype == "count":
                    truth = sum(1 for o in objs if (f["category"] in (None, o["category"]))
                                and (f["color"] in (None, o["color"])))
                    assert short == str(truth) == str(f["count"]), qa
                    assert _count_in_text(truth, long), qa
                elif qtype == "total":
                    assert short == str(len(objs)) and _count_in_text(len(objs), long), qa
                elif qtype == "exists":
                    present = any(o["category"] == f["category"] and f["color"] in (None, o["color"]) for o in objs)
                    assert short == ("yes" if present else "no"), qa
                    assert long.lower().startswith(short), qa
                elif qtype in ("color", "shape", "position", "size", "direction"):
                    o = objs[f["object"]]
                    key = {"color": "color", "shape": "category", "position": "position", "size": "size",
                           "direction": "direction"}[qtype]
                    assert short == o[key], qa
                    assert short.lower() in long.lower(), qa
                    if "attrs" in f:
                        assert _unique(objs, f["object"], f["attrs"]), qa  # the question is definite
                elif qtype == "relation":
                    holds = _relation_holds(sc, f["subject"], f["predicate"], f["object"])
                    if "answer" in f:
                        assert short == ("yes" if holds else "no") and long.lower().startswith(short), qa
                    else:
                        assert holds, qa
                        if "which" not in f:
                            assert short == RELATION_SHORT[f["predicate"]], qa
                elif qtype == "text":
                    t = sc["text"][0]
                    assert short in (t["string"], t["color"]) and short in long, qa
                elif qtype == "chart":
                    ch = sc["chart"]
                    if "max" in f:
                        assert short == ch["labels"][ch["values"].index(max(ch["values"]))], qa
                    elif "label" in f:
                        assert short == str(ch["values"][ch["labels"].index(f["label"])]), qa
                    else:
                        assert short == str(len(ch["labels"])), qa
                elif qtype == "background":
                    assert short == sc["background"]["color"], qa
    assert set(seen) == set(QTYPES), seen  # the fixture exercises every question type


def test_reasoning_answers_match_the_scene_graph():
    ds, scenes = world_dataset(), raw_scenes()
    engine = SceneQA(ds)
    kinds = Counter()
    for img in ds.images:
        objs = scenes[img.image_id]["objects"]
        colors = Counter(o["color"] for o in objs)
        for seed in range(40):
            qa = engine.reason(img, random.Random(seed))
            f = qa.facts
            assert qa.qtype == "reasoning" and len(qa.long) > len(qa.short)
            if "remove_color" in f:
                kinds["remove"] += 1
                assert f["remaining"] == sum(o["color"] != f["remove_color"] for o in objs) == int(qa.short)
            elif "na" in f:
                kinds["compare"] += 1
                key = "category" if f["a"] in {o["category"] for o in objs} else "color"
                assert (f["na"], f["nb"]) == (sum(o[key] == f["a"] for o in objs), sum(o[key] == f["b"] for o in objs))
            elif "distinct" in f:
                kinds["distinct"] += 1
                assert f["distinct"] == len(colors) == int(qa.short)
            elif "direction" in f:
                kinds["extreme"] += 1
                axis = 1 if f["direction"] in ("top", "bottom") else 0
                sign = 1 if f["direction"] in ("top", "left") else -1
                centres = [sign * (o["bbox"][axis] + o["bbox"][axis + 2] / 2) for o in objs]
                assert centres.index(min(centres)) == f["object"]
            elif "colors" in f:
                kinds["same_color"] += 1
                truth = Counter(o["color"] for o in objs if o["category"] == f["category"])
                assert f["colors"] == dict(truth) and qa.short == ("yes" if len(truth) == 1 else "no")
            elif "color" in f:
                kinds["majority"] += 1
                assert colors.most_common(1)[0][0] == f["color"] == qa.short
                assert list(colors.values()).count(colors[f["color"]]) == 1
            elif "object" in f:
                kinds["largest"] += 1
                areas = [o["bbox"][2] * o["bbox"][3] for o in objs]
                assert areas.index(max(areas)) == f["object"]
            else:
                kinds["add"] += 1
                assert f["count"] == sum(o["category"] == f["category"] for o in objs) + 1 == int(qa.short)
    assert len(kinds) >= 7, kinds


def test_existence_questions_are_balanced_and_negatives_include_hard_ones():
    ds = world_dataset()
    engine = SceneQA(ds)
    answers, hard = Counter(), 0
    for img in ds.images:
        present_cats = {o.category for o in img.objects}
        present_cols = {o.color for o in img.objects}
        for seed in range(120):
            for qa in engine.sample(img, random.Random(seed), 6):
                if qa.qtype == "exists" and not img.objects:
                    assert qa.short == "no"  # an empty image: nothing to say yes about
                elif qa.qtype == "exists":
                    answers[qa.short] += 1
                    if qa.short == "no" and (qa.facts["category"] in present_cats or qa.facts["color"] in present_cols):
                        hard += 1
    total = answers["yes"] + answers["no"]
    assert total > 300
    assert 0.4 <= answers["no"] / total <= 0.6, answers
    assert hard / answers["no"] > 0.3


def test_existence_and_zero_count_phrasing_does_not_give_the_answer_away():
    """Naming a colour or not is independent of the answer (generator v2 asked colour-less "Is there a star?" only
    of present shapes: a model learned "no colour named -> yes" and said yes to every POPE question), and "How many
    <shape>s?" can be zero."""
    ds = world_dataset()
    engine = SceneQA(ds)
    exists, zero_counts = Counter(), Counter()
    for img in ds.images:
        for seed in range(120):
            for qa in engine.sample(img, random.Random(seed), 6):
                if qa.qtype == "exists" and img.objects:
                    exists[(qa.facts["color"] is not None, qa.short)] += 1
                elif qa.qtype == "count" and qa.short == "0":
                    zero_counts[qa.facts["color"] is not None] += 1
    for named in (True, False):
        yes, no = exists[(named, "yes")], exists[(named, "no")]
        assert yes + no > 100 and 0.35 <= yes / (yes + no) <= 0.65, exists
    assert zero_counts[False] > 20 and zero_counts[True] > 20, zero_counts


def test_absent_things_are_of_categories_some_image_has():
    """A declared category no image has (the world lists all its shapes, a recipe may draw a few) is never asked
    about: its "no" / "0" would be learnt from the word alone (generator v3 did so)."""
    import dataclasses

    ds = world_dataset()
    occurring = {o.category for img in ds.images for o in img.objects}
    ds = dataclasses.replace(ds, categories=[*ds.categories, "hexagon", "octagon"])  # declared, never drawn
    engine = SceneQA(ds)
    named = Counter()
    for img in ds.images:
        for seed in range(60):
            for qa in engine.sample(img, random.Random(seed), 6):
                if qa.qtype in ("exists", "count") and qa.facts.get("category"):
                    named[qa.facts["category"] in occurring] += 1
    assert named[True] > 300 and named[False] == 0, named


def test_no_existence_answer_follows_from_earlier_turns():
    """Existence questions open a record (a turn naming a shape would give its existence away), and a record's
    second one is not forced to the opposite of its first (generator v1 did both)."""
    ds = world_dataset()
    engine = SceneQA(ds)
    pairs = Counter()
    for img in ds.images:
        for seed in range(120):
            qas = engine.sample(img, random.Random(seed), 6)
            qtypes = [qa.qtype for qa in qas]
            k = qtypes.count("exists")
            assert qtypes[:k] == ["exists"] * k, qtypes
            if k >= 2:
                pairs[qas[0].short == qas[1].short] += 1
    assert pairs[True] > 0.25 * sum(pairs.values()) and sum(pairs.values()) > 50, pairs


def test_phrasing_varies_widely():
    ds = world_dataset()
    engine = SceneQA(ds)
    img = ds.by_id[2]
    by_type: dict[str, set[str]] = {}
    for seed in range(400):
        rng = random.Random(seed)
        for qtype in ("count", "exists", "color", "position", "shape", "relation"):
            qa = engine.ask(img, qtype, rng)
            if qa:
                by_type.setdefault(qtype, set()).add(qa.question)
    for qtype, questions in by_type.items():
        assert len(questions) >= 12, (qtype, len(questions))
    counts = " ".join(by_type["count"])
    for phrase in ("How many", "Count the", "What number of"):
        assert phrase in counts
    exists = " ".join(by_type["exists"])
    for phrase in ("Is there", "Do you see any"):
        assert phrase in exists


def test_offline_teacher_is_deterministic_and_uses_the_teacher_format():
    ds = world_dataset()
    t1, t2 = OfflineTeacher(ds, seed=0), OfflineTeacher(ds, seed=1)
    conv = t1.complete([], kind="conversation", image_id=2)
    assert conv == OfflineTeacher(ds, seed=0).complete([], kind="conversation", image_id=2)
    assert conv != t2.complete([], kind="conversation", image_id=2)
    assert conv.startswith("Question:\n") and "\n===\nAnswer:\n" in conv
    pairs = parse_output(conv, load_pack("conversation").rules).pairs
    assert 3 <= len(pairs) <= 6
    reasoning = parse_output(t1.complete([], kind="reasoning", image_id=6), load_pack("reasoning").rules)
    assert len(reasoning.pairs) == 1 and len(reasoning.pairs[0][1]) > 40
    detail = parse_output(t1.complete([], kind="detail", image_id=4), load_pack("detail").rules).text
    assert "five shapes" in detail and "yellow star" in detail and "bar chart" in detail


def test_clipart_categories_are_said_as_nouns():
    obj = SceneObject(index=0, category="animals", bbox=(10, 10, 30, 30), position="top left",
                      supercategory="clipart", size="small")
    obj2 = SceneObject(index=1, category="circle", bbox=(100, 100, 30, 30), position="bottom right",
                       supercategory="shape", color="red", size="small")
    img = ImageEntry(image_id=1, file_name="x.png", width=150, height=150, objects=[obj, obj2])
    ds = Dataset(images=[img], categories=["circle", "animals"],
                 supercategories={"circle": "shape", "animals": "clipart"}, colors=["red", "blue"], sizes=["small"],
                 sources={})
    engine = SceneQA(ds)
    texts = []
    for seed in range(200):
        rng = random.Random(seed)
        for qtype in ("count", "exists", "shape"):
            qa = engine.ask(img, qtype, rng)
            if qa:
                texts += [qa.question, qa.long]
                if qtype == "shape" and qa.facts["object"] == 0:
                    assert qa.short == "animal"
    blob = " ".join(texts)
    assert "animal" in blob and "animalses" not in blob and "an animals" not in blob


# ---------------------------------------------------------------- parsing


QA_RULES = Rules(format="qa", min_pairs=1, max_pairs=3, max_chars=300)
PROSE_RULES = Rules(format="prose", min_chars=30, max_chars=300)


def test_parse_valid_outputs_in_several_styles():
    text = "Question:\nHow many dogs?\n===\nAnswer:\nTwo dogs.\n===\nQuestion:\nWhere?\n===\nAnswer:\nOn the left."
    assert parse_output(text, QA_RULES).pairs == [("How many dogs?", "Two dogs."), ("Where?", "On the left.")]
    loose = ("**Question:** How many dogs?\n**Answer:** Two dogs,\nboth brown.\n\n===\n"
             "Question 2: Where?\nAnswer 2: Left.")
    assert parse_output(loose, QA_RULES).pairs == [("How many dogs?", "Two dogs,\nboth brown."), ("Where?", "Left.")]
    assert format_qa([("Q?", "A.")]) == "Question:\nQ?\n===\nAnswer:\nA."
    prose = "A man walks a brown dog along a wet street under an umbrella."
    assert parse_output(prose, PROSE_RULES).text == prose


@pytest.mark.parametrize(
    "text, rules, code",
    [
        ("", QA_RULES, "empty"),
        ("Sure! Here it is.\nQuestion: Q?\n===\nAnswer: A.", QA_RULES, "unlabelled_text"),
        ("Answer: A.\n===\nQuestion: Q?", QA_RULES, "bad_order"),
        ("Question: Q?\n===\nQuestion: Q2?", QA_RULES, "bad_order"),
        ("Question: Q?\n===\nAnswer: A.\n===\nQuestion: Q2?", QA_RULES, "unanswered_question"),
        ("Question: Q?\n===\nAnswer:\n", QA_RULES, "empty_turn"),
        ("Question: <image> Q?\n===\nAnswer: A.", QA_RULES, "image_token"),
        ("Question: Where?\n===\nAnswer: At [0.12, 0.40, 0.5, 0.6].", QA_RULES, "coordinates"),
        ("Question: What?\n===\nAnswer: According to the captions, a dog.", QA_RULES, "mentions_context"),
        ("I'm sorry, but I cannot help with that.", QA_RULES, "refusal"),
        ("Question: Q?\n===\nAnswer: " + "the " * 12, QA_RULES, "degenerate"),
        ("Question: Q?\n===\nAnswer: A.\n===\nQuestion: q?\n===\nAnswer: B.", QA_RULES, "duplicate_question"),
        ("\n===\n".join(f"Question: Q{i}?\n===\nAnswer: A{i}." for i in range(4)), QA_RULES, "too_many_pairs"),
        ("Question: Q?\n===\nAnswer: " + "word " * 80, QA_RULES, "turn_too_long"),
        ("Question: Q?\n===\nAnswer: %%% ### @@@ !!! 123 456 789 /// ok", QA_RULES, "not_text"),
        ("The image shows a dog.\nQuestion: What?", PROSE_RULES, "qa_in_prose"),
        ("A dog.", PROSE_RULES, "too_short"),
        ("A dog on the grass. " * 20, PROSE_RULES, "too_long"),
    ],
)
def test_parse_rejects_with_a_reason(text, rules, code):
    with pytest.raises(Rejected) as info:
        parse_output(text, rules)
    assert info.value.code == code and info.value.message


def test_min_pairs_is_enforced():
    with pytest.raises(Rejected, match="too_few_pairs"):
        parse_output("Question: Q?\n===\nAnswer: A.", Rules(min_pairs=2))


# ---------------------------------------------------------------- prompt packs


def test_builtin_packs_load_and_build_messages():
    for kind, context, fmt in (("conversation", "captions", "qa"), ("detail", "captions+boxes", "prose"),
                               ("reasoning", "captions+boxes", "qa")):
        pack = load_pack(kind)
        assert pack.version and len(pack.sha) == 12 and pack.context == context and pack.rules.format == fmt
        assert len(pack.fewshot) >= 2
        msgs = pack.messages("CTX")
        assert msgs[0] == {"role": "system", "content": pack.system}
        assert [m["role"] for m in msgs[1:]] == ["user", "assistant"] * len(pack.fewshot) + ["user"]
        assert msgs[-1]["content"] == "CTX"
    assert len(load_list("detail_questions").prompts) >= 10
    assert len(load_list("brief_questions").prompts) >= 10


def test_pack_override_changes_cache_identity_and_bad_packs_are_refused(tmp_path):
    builtin = load_pack("conversation")
    data = json.loads(Path(builtin.path).read_text())
    data["system"] += "\nBe concise."
    (tmp_path / "conversation.json").write_text(json.dumps(data))
    override = load_pack("conversation", tmp_path)
    assert override.path == str(tmp_path / "conversation.json")
    assert override.version == builtin.version and override.cache_version != builtin.cache_version
    assert load_pack("detail", tmp_path).path == builtin.path.replace("conversation", "detail")  # fallback

    data["fewshot"][0]["response"] = "Question: what?"
    (tmp_path / "conversation.json").write_text(json.dumps(data))
    with pytest.raises(PackError, match=r"conversation.json: fewshot\[0\] .* unanswered_question"):
        load_pack("conversation", tmp_path)
    del data["system"]
    (tmp_path / "conversation.json").write_text(json.dumps(data))
    with pytest.raises(PackError, match="missing 'system'"):
        load_pack("conversation", tmp_path)
    (tmp_path / "detail_questions.json").write_text(json.dumps({"prompts": []}))
    with pytest.raises(PackError, match="detail_questions.json: 'prompts' must be a non-empty list"):
        load_list("detail_questions", tmp_path)


# ---------------------------------------------------------------- cache


def _entry(image_id: int, kind: str = "detail", status: str = "ok") -> dict:
    e = {"key": cache_key("offline", "m", "1+abc", image_id, kind, "in"), "teacher": "offline", "model": "m",
         "prompt_version": "1+abc", "image_id": image_id, "kind": kind, "inputs": "in", "status": status, "raw": "x"}
    if status == "ok":
        e["output"] = {"text": "x"}
    else:
        e["reason"] = {"code": "too_short", "message": "x"}
    return e


def test_cache_ignores_a_torn_tail_and_bad_lines_and_keeps_appending_cleanly(tmp_path):
    with Cache(tmp_path / "c", fsync_interval=0) as cache:
        cache.load("detail")
        for i in range(3):
            cache.append(_entry(i))
    path = tmp_path / "c" / "detail.jsonl"
    good = path.read_bytes()
    forged = dict(_entry(7), image_id=8)  # key does not match its fields
    path.write_bytes(good + json.dumps(forged).encode() + b"\n" + b'{"key": "abc", "teach')
    cache = Cache(tmp_path / "c").open()
    try:
        entries = cache.load("detail")
        assert sorted(e["image_id"] for e in entries.values()) == [0, 1, 2]
        assert (cache.stats.torn, cache.stats.invalid) == (1, 1)
        assert path.read_bytes().endswith(b"\n")  # the torn tail was cut off
        cache.append(_entry(3))
        cache.append(_entry(1, status="rejected"))  # an ok entry is never replaced by a rejection
    finally:
        cache.close()
    again = Cache(tmp_path / "c").open()
    try:
        entries = again.load("detail")
        assert sorted(e["image_id"] for e in entries.values()) == [0, 1, 2, 3]
        assert entries[cache_key("offline", "m", "1+abc", 1, "detail", "in")]["status"] == "ok"
        assert (again.stats.torn, again.stats.invalid, again.stats.duplicates) == (0, 1, 1)
    finally:
        again.close()


def test_cache_dir_is_locked_while_a_run_uses_it(tmp_path):
    with Cache(tmp_path / "c"):
        with pytest.raises(DatagenError, match="in use by another datagen run"):
            Cache(tmp_path / "c").open()
    Cache(tmp_path / "c").open().close()  # released


# ---------------------------------------------------------------- the engine with the offline teacher


def test_offline_run_writes_valid_records_report_and_reruns_from_cache(tmp_path):
    report, data = run_instruct(tmp_path)
    assert len(data) == 3 * N_WORLD
    assert len({r["id"] for r in data}) == len(data)
    assert {r["id"] for r in data} == {f"{i}-{k}" for i in range(1, N_WORLD + 1)
                                       for k in ("conversation", "detail", "reasoning")}
    detail_prompts = set(load_list("detail_questions").prompts)
    placements = Counter()
    for rec in data:
        check_record(rec, WORLD / "images")
        prov = rec["provenance"]
        assert prov["teacher"] == "offline" and prov["model"] == "sceneqa-v4-seed0"
        assert prov["prompt_version"] == "1" and prov["kind"] == rec["id"].split("-")[1]
        assert prov["image_id"] == int(rec["id"].split("-")[0])
        first = rec["conversations"][0]["value"]
        placements[first.startswith("<image>")] += 1
        if prov["kind"] == "detail":
            assert first.replace("<image>", "").strip() in detail_prompts
            assert len(rec["conversations"]) == 2
        if prov["kind"] == "reasoning":
            assert len(rec["conversations"]) == 2
    assert placements[True] and placements[False]  # <image> both before and after the question
    t = report.totals
    assert (t.items, t.records, t.generated, t.cached, t.rejected, t.calls) == (21, 21, 21, 0, 0, 21)
    saved = json.loads((tmp_path / "data.report.json").read_text())
    assert saved["kinds"]["detail"]["generated"] == N_WORLD and saved["records_per_s"] > 0
    assert (tmp_path / "data.rejections.jsonl").read_text() == ""

    first_bytes = (tmp_path / "data.json").read_bytes()
    report2, _ = run_instruct(tmp_path)
    t2 = report2.totals
    assert (t2.records, t2.generated, t2.cached, t2.calls) == (21, 0, 21, 0)  # zero teacher calls
    assert (tmp_path / "data.json").read_bytes() == first_bytes

    # the offline seed is part of the teacher's model id, hence of the cache key
    report3, _ = run_instruct(tmp_path, teacher=TeacherConfig(seed=5), kinds=("detail",))
    assert report3.totals.generated == N_WORLD and report3.totals.cached == 0


def test_offline_outputs_go_through_validation_and_rejections_are_counted_and_cached(tmp_path):
    pack = json.loads(Path(load_pack("conversation").path).read_text())
    pack["max_pairs"] = 3
    pack["fewshot"] = [{"context": "A dog.", "response": "Question: What animal?\n===\nAnswer: A dog.\n===\n"
                                                       "Question: Is there a cat?\n===\nAnswer: No, there is no cat."}]
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "conversation.json").write_text(json.dumps(pack))
    report, data = run_instruct(tmp_path, kinds=("conversation",), prompt_dir=prompts)
    st = report.kinds["conversation"]
    assert st.rejected > 0 and st.reasons == Counter({"too_many_pairs": st.rejected})
    assert st.records == len(data) == N_WORLD - st.rejected
    assert st.retried == 0 and st.calls == N_WORLD  # deterministic teacher: not asked twice
    rejections = [json.loads(x) for x in (tmp_path / "data.rejections.jsonl").read_text().splitlines()]
    assert len(rejections) == st.rejected
    assert all(r["code"] == "too_many_pairs" and r["raw"].startswith("Question:") for r in rejections)
    for rec in data:
        assert len(rec["conversations"]) <= 6
    report2, _ = run_instruct(tmp_path, kinds=("conversation",), prompt_dir=prompts)
    st2 = report2.kinds["conversation"]
    assert st2.calls == 0 and st2.rejected == st2.rejected_cached == st.rejected


def test_any_object_following_the_teacher_protocol_can_be_plugged_in(tmp_path):
    from llavakit.datagen.teachers import Teacher

    class Canned:
        name, model = "canned", "v0"

        def __init__(self):
            self.seen = []

        def complete(self, messages, *, kind, image_id):
            self.seen.append((kind, image_id, messages[-1]["content"]))
            return format_qa([(f"Which image is this ({image_id})?", f"This is image number {image_id}.")])

    teacher = Canned()
    assert isinstance(teacher, Teacher)
    cfg = InstructConfig(source=world_source(limit=2), out=tmp_path / "o.json", cache_dir=tmp_path / "c",
                         kinds=("reasoning",), progress=False)
    from llavakit.datagen.instruct import generate_instruct

    report = generate_instruct(cfg, teacher=teacher, log=lambda m: None)
    assert report.totals.generated == 2 and [s[:2] for s in teacher.seen] == [("reasoning", 1), ("reasoning", 2)]
    assert teacher.seen[0][2] == world_dataset().by_id[1].context(with_boxes=True)
    data = json.loads((tmp_path / "o.json").read_text())
    assert data[1]["conversations"][1]["value"] == "This is image number 2."
    assert data[1]["provenance"]["teacher"] == "canned" and data[1]["provenance"]["model"] == "v0"


def test_the_cache_key_covers_what_the_teacher_is_shown_and_its_settings(tmp_path):
    """A cached output is reused only for the same messages and sampling settings (an LLM teacher), or the same
    scene and vocabularies (offline): edited captions, another temperature or a changed scene ask again."""
    from llavakit.datagen.instruct import generate_instruct

    class Canned:
        name, model = "canned", "v0"

        def __init__(self, temperature=0.7):
            self.calls, self.settings = 0, {"temperature": temperature}

        def complete(self, messages, *, kind, image_id):
            self.calls += 1
            return format_qa([(f"Which image is this ({image_id})?", f"This is image number {image_id}.")])

    def run(teacher, annotations=WORLD):
        cfg = InstructConfig(source=SourceConfig(annotations=annotations, images_dir=WORLD / "images", limit=2),
                             out=tmp_path / "o.json", cache_dir=tmp_path / "c", kinds=("reasoning",), progress=False)
        generate_instruct(cfg, teacher=teacher, log=lambda m: None)
        return teacher.calls

    assert run(Canned()) == 2 and run(Canned()) == 0
    assert run(Canned(temperature=0.0)) == 2  # other settings: other outputs
    edited = tmp_path / "world"
    shutil.copytree(WORLD, edited, ignore=shutil.ignore_patterns("images"))
    captions_file = edited / "annotations" / "captions.json"
    captions = json.loads(captions_file.read_text())
    first = next(c for c in captions["annotations"] if c["image_id"] == 1)
    first["caption"] = "A completely different caption."
    captions_file.write_text(json.dumps(captions))
    assert run(Canned(), edited) == 1  # the image whose captions changed is asked again, the other is not

    from llavakit.datagen.cache import inputs_digest
    from llavakit.datagen.instruct import teacher_inputs
    from llavakit.datagen.teachers.offline import OfflineTeacher

    whole, one = OfflineTeacher(world_dataset()), OfflineTeacher(world_source(limit=1).load())
    assert whole.qa.categories != one.qa.categories  # --limit 1: the vocabulary of one image's objects
    image, pack = one.dataset.images[0], load_pack("detail")
    assert inputs_digest(teacher_inputs(whole, image, pack)) != inputs_digest(teacher_inputs(one, image, pack))
    assert inputs_digest(teacher_inputs(whole, image, pack)) == inputs_digest(teacher_inputs(whole, image, pack))


def test_coco_only_offline_run(tmp_path):
    src = SourceConfig(annotations=COCO / "annotations" / "instances_val2017.json", images_dir=COCO / "val2017")
    report, data = run_instruct(tmp_path, source=src)
    assert report.totals.rejected == 0 and len(data) == 9
    for rec in data:
        check_record(rec, COCO / "val2017")
    text = json.dumps(data)
    assert "dog" in text and "persons" not in text


# ---------------------------------------------------------------- CLI


def test_cli_is_registered_and_bare_datagen_equals_instruct(tmp_path, capsys):
    import argparse

    from llavakit import cli as top
    from llavakit.datagen import cli

    assert "llavakit.datagen.cli" in top.COMMANDS
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["datagen", "captions", "--annotations", "A", "--images-dir", "D", "--out", "o.json"])
    assert args.func is cli.run_captions and args.annotations == "A"

    common = ["--annotations", str(WORLD), "--images-dir", str(WORLD / "images"), "--kinds", "detail,reasoning",
              "--no-progress"]
    assert cli.main([*common, "--out", str(tmp_path / "a.json")]) == 0
    assert cli.main(["instruct", *common, "--out", str(tmp_path / "b.json"), "--cache", str(tmp_path / "c")]) == 0
    assert (tmp_path / "a.json.cache" / "detail.jsonl").is_file()
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    out = capsys.readouterr().out
    assert "datagen instruct" in out and "generated" in out

    assert cli.main([*common, "--out", str(tmp_path / "x.json"), "--kinds", "chat"]) == 1
    assert "unknown kind 'chat'" in capsys.readouterr().err
    assert cli.main(["vqa", "--images-dir", "D", "--out", "v.json"]) == 1
    assert "missing --annotations" in capsys.readouterr().err


def test_cli_captions_vqa_mix(tmp_path, capsys):
    from llavakit.datagen import cli

    src = ["--annotations", str(WORLD), "--images-dir", str(WORLD / "images")]
    assert cli.main(["captions", *src, "--out", str(tmp_path / "caps.json")]) == 0
    assert cli.main(["vqa", *src, "--out", str(tmp_path / "vqa.json"), "--types", "count,color"]) == 0
    assert cli.main(["mix", "--source", f"{tmp_path / 'caps.json'}:2", "--source", str(tmp_path / "vqa.json"),
                     "--out", str(tmp_path / "mix.json"), "--seed", "3"]) == 0
    mix = json.loads((tmp_path / "mix.json").read_text())
    assert len(mix) == 2 * N_WORLD + 2 * N_WORLD
    assert (tmp_path / "mix.report.json").is_file()


# ---------------------------------------------------------------- captions, VQA, mix


def test_captions_one_per_image_or_all(tmp_path):
    from llavakit.datagen.captions import generate_captions

    brief = set(load_list("brief_questions").prompts)
    caps_by_image = {i.image_id: i.captions for i in world_dataset().images}
    generate_captions(CaptionsConfig(source=world_source(), out=tmp_path / "one.json"))
    one = json.loads((tmp_path / "one.json").read_text())
    assert len(one) == N_WORLD
    for rec in one:
        check_record(rec, WORLD / "images")
        human, gpt = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
        assert human.replace("<image>", "").strip() in brief
        assert gpt in caps_by_image[rec["provenance"]["image_id"]]
    assert len({r["conversations"][0]["value"].replace("<image>", "").strip() for r in one}) > 2
    generate_captions(CaptionsConfig(source=world_source(), out=tmp_path / "all.json", per_image="all"))
    assert len(json.loads((tmp_path / "all.json").read_text())) == sum(len(c) for c in caps_by_image.values())

    captions = json.loads((COCO / "annotations" / "captions_val2017.json").read_text())
    captions["annotations"] = [a for a in captions["annotations"] if a["image_id"] != 285]
    (tmp_path / "caps.json").write_text(json.dumps(captions))
    src = SourceConfig(annotations=COCO / "annotations" / "instances_val2017.json", images_dir=COCO / "val2017",
                       captions=tmp_path / "caps.json")
    report = generate_captions(CaptionsConfig(source=src, out=tmp_path / "coco.json"))
    st = report.kinds["captions"]
    assert (st.items, st.records, st.rejected, dict(st.reasons)) == (3, 2, 1, {"no_captions": 1})


def test_vqa_short_answer_and_multiple_choice_items(tmp_path):
    from llavakit.datagen.vqa import generate_vqa

    generate_vqa(VQAConfig(source=world_source(), out=tmp_path / "vqa.json", questions_per_image=5, mc_per_image=2))
    data = json.loads((tmp_path / "vqa.json").read_text())
    short = [r for r in data if r["provenance"]["format"] == "short_answer"]
    mc = [r for r in data if r["provenance"]["format"] == "multiple_choice"]
    assert len(short) == N_WORLD and len(mc) >= N_WORLD
    letters = Counter()
    for rec in data:
        check_record(rec, WORLD / "images")
    for rec in short:
        conv = rec["conversations"]
        assert len(conv) >= 6
        for human, gpt in zip(conv[::2], conv[1::2], strict=True):
            assert human["value"].replace("\n<image>", "").endswith("\n" + SHORT_ANSWER_SUFFIX)
            assert len(gpt["value"].split()) <= 3 and not gpt["value"].endswith(".")
    for rec in mc:
        human = rec["conversations"][0]["value"].replace("\n<image>", "").replace("<image>\n", "")
        gpt = rec["conversations"][1]["value"]
        assert human.endswith("\n" + MC_SUFFIX)
        options = [ln for ln in human.splitlines() if len(ln) > 2 and ln[1:3] == ". " and ln[0] in "ABCD"]
        assert len(options) >= 3 and gpt in "ABCD" and len(gpt) == 1
        chosen = next(ln[3:] for ln in options if ln[0] == gpt)
        assert chosen == rec["provenance"]["answer"]
        assert len(set(options)) == len(options)
        letters[gpt] += 1
    assert len(letters) >= 3  # the right answer is not always at the same letter


def test_mix_ratios_ids_and_seed(tmp_path):
    from llavakit.datagen.mix import mix_sources

    def rec(i, tag):
        return {"id": str(i), "image": f"{tag}.png",
                "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": tag}]}

    (tmp_path / "a.json").write_text(json.dumps([rec(i, "a") for i in range(10)]))
    (tmp_path / "b.json").write_text(json.dumps([rec(i, "b") for i in (0, 100, 101, 102)]))
    cfg = dict(sources=[f"{tmp_path / 'a.json'}:0.5", f"{tmp_path / 'b.json'}:2"], out=tmp_path / "m.json")
    report = mix_sources(MixConfig(seed=1, **cfg))
    m1 = json.loads((tmp_path / "m.json").read_text())
    assert len(m1) == 5 + 8 and len({r["id"] for r in m1}) == 13
    assert Counter(r["image"] for r in m1) == {"a.png": 5, "b.png": 8}
    assert {"100", "100#2"} <= {r["id"] for r in m1}
    assert all(r["provenance"]["mix_source"].endswith(("a.json", "b.json")) for r in m1)
    assert report.kinds["a.json"].records == 5 and report.kinds["b.json"].records == 8
    mix_sources(MixConfig(seed=1, **cfg))
    assert json.loads((tmp_path / "m.json").read_text()) == m1
    mix_sources(MixConfig(seed=2, **cfg))
    assert json.loads((tmp_path / "m.json").read_text()) != m1
    report = mix_sources(MixConfig(sources=[str(tmp_path / "a.json"), str(tmp_path / "b.json")],
                                   out=tmp_path / "m3.json", shuffle=False))
    ids = [r["id"] for r in json.loads((tmp_path / "m3.json").read_text())]
    assert ids == [str(i) for i in range(10)] + ["0#b", "100", "101", "102"] and report.info["renamed"] == 1
    (tmp_path / "one.json").write_text(json.dumps([rec(7, "one")]))  # 0.5 of 1 record rounds half up, as 2.5 of 5
    mix_sources(MixConfig(sources=[f"{tmp_path / 'one.json'}:0.5"], out=tmp_path / "m4.json"))
    assert len(json.loads((tmp_path / "m4.json").read_text())) == 1
    (tmp_path / "bad.json").write_text(json.dumps([{"id": 1}]))
    with pytest.raises(DatagenError, match=r"bad.json: record 0 is not a LLaVA record"):
        mix_sources(MixConfig(sources=[str(tmp_path / "bad.json")], out=tmp_path / "m2.json"))


def test_grounding_records_ask_every_single_object_scene_the_same_questions(tmp_path):
    from llavakit.datagen.grounding import grounding_records
    from llavakit.world.config import WorldConfig
    from llavakit.world.generate import generate_world

    world = tmp_path / "w"
    generate_world(WorldConfig(out=str(world), num_images=12, seed=3, max_objects=2, chart_prob=0.0, text_prob=0.0))
    scenes = [json.loads(x) for x in (world / "scenes.jsonl").read_text().splitlines()]
    single = [s for s in scenes if len(s["objects"]) == 1]
    records, left_out = grounding_records(world)
    assert 0 < len(single) < 12 and len(records) == len(single) and left_out == 12 - len(single)
    for rec, scene in zip(records, single):
        obj, turns = scene["objects"][0], rec["conversations"]
        assert (world / "images" / rec["image"]).is_file()
        assert [t["value"] for t in turns] == ["<image>\nWhat color is the shape? Answer with one word.", obj["color"],
                                             "What shape is it? Answer with one word.", obj["category"]]
        assert rec["provenance"]["qtypes"] == ["color", "shape"]
    only_shape, _ = grounding_records(world, ("shape",))
    assert only_shape[0]["conversations"][0]["value"].startswith("<image>\nWhat shape")
    with pytest.raises(ValueError, match="known are color, shape, color_of"):
        grounding_records(world, ("size",))
    with pytest.raises(ValueError, match="each at most once"):
        grounding_records(world, ("color", "color"))
    with pytest.raises(FileNotFoundError, match="scenes.jsonl"):
        grounding_records(tmp_path)
    (world / "scenes.jsonl").write_text((world / "scenes.jsonl").read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"scenes.jsonl:13: not a scene record"):
        grounding_records(world)


def test_grounding_records_of_several_objects_ask_what_only_the_image_tells(tmp_path):
    """color_of / shape_of name only objects unique by shape / colour; count; exists asks first, of a present or an
    absent shape (from the world's shapes), fixed per scene; single-object questions skip these scenes."""
    from llavakit.datagen.grounding import grounding_records

    world = _scenes_world(tmp_path, [
        [("circle", "red"), ("circle", "blue"), ("star", "red")],   # circle twice, red twice
        [("heart", "green")],                                    # one object: none of these attributes
        [("star", "blue"), ("heart", "yellow")],
    ])
    records, left_out = grounding_records(world, ("color_of", "shape_of", "count", "exists"))
    assert left_out == 1 and [r["id"] for r in records] == ["train-0", "train-2"]
    first = dict(zip([t["value"].removeprefix("<image>\n") for t in records[0]["conversations"][::2]],
                     [t["value"] for t in records[0]["conversations"][1::2]]))
    assert first["What color is the star? Answer with one word."] == "red"
    assert first["What shape is the blue one? Answer with one word."] == "circle"
    assert first["How many shapes are there? Answer with a number."] == "3"
    assert not any("circle?" in q or "red one" in q for q in first)  # ambiguous referents are never asked
    second = [t["value"] for t in records[1]["conversations"][::2]]  # star/blue and heart/yellow: both unique
    assert sum("star?" in q or "blue one" in q for q in second) == 1  # one question per object: no give-away
    assert sum("heart?" in q or "yellow one" in q for q in second) == 1
    for rec in records:
        qtypes, turns = rec["provenance"]["qtypes"], rec["conversations"]
        assert len(qtypes) * 2 == len(turns) and turns[0]["value"].startswith("<image>\n")
        assert qtypes[:2] == ["exists", "count"] and qtypes.count("exists") == 1  # before any turn naming an object
        shape = turns[0]["value"].split("Is there a ")[1].split(" in")[0]
        assert shape in {"circle", "star", "heart"}  # only shapes the world uses
        present = shape in {"circle", "star"} if rec["id"] == "train-0" else shape in {"star", "heart"}
        assert turns[1]["value"] == ("yes" if present else "no")
    again, _ = grounding_records(world, ("color_of", "shape_of", "count", "exists"))
    assert again == records
    clipart = _scenes_world(tmp_path / "clipart", [[("cat", None), ("star", "blue")], [("dog", None)]])
    recs, _ = grounding_records(clipart, ("color", "shape", "color_of", "shape_of", "count"))
    assert [[t["value"] for t in r["conversations"][::2]] for r in recs] == [
        ["<image>\nHow many shapes are there? Answer with a number.", "What color is the star? Answer with one word."],
        ["<image>\nWhat shape is it? Answer with one word."]]  # clip art has no colour: never asked one
    many = _scenes_world(tmp_path / "many", [[("circle", "red"), ("star", "blue")]] * 60 + [[("heart", "red")]])
    answers = Counter(r["conversations"][1]["value"] for r in grounding_records(many, ("exists",))[0])
    assert 18 <= answers["yes"] <= 42 and answers["yes"] + answers["no"] == 60, answers  # a coin per scene
    assert grounding_records(world)[1] == 2  # color/shape: single-object scenes only


def test_grounding_records_ask_where_an_object_is(tmp_path):
    """position: the cell the world recorded, of the only object or of one with a unique shape; one question per object."""
    from llavakit.datagen.annotations import POSITIONS
    from llavakit.datagen.grounding import grounding_records

    world = _scenes_world(tmp_path, [[("heart", "green")], [("circle", "red"), ("circle", "blue"), ("star", "red")],
                                     [("cat", None)]], positions=[["top left"], ["left", "right", "bottom"], [None]])
    records, left_out = grounding_records(world, ("position",))
    assert left_out == 1 and [r["id"] for r in records] == ["train-0", "train-1"]  # a scene with no position: not asked
    options = f"Answer with one of: {', '.join(POSITIONS)}."
    assert [[t["value"] for t in r["conversations"]] for r in records] == [
        [f"<image>\nWhere is the shape? {options}", "top left"],
        [f"<image>\nWhere is the star? {options}", "bottom"]]  # the two circles are never asked
    both, _ = grounding_records(world, ("color_of", "position"))
    assert len(both[1]["conversations"]) == 2  # the star is named once: colour or position, not both


def _scenes_world(world: Path, scenes: list[list[tuple[str, str | None]]], positions: list | None = None) -> Path:
    world.mkdir(parents=True, exist_ok=True)
    where = positions or [[None] * len(objects) for objects in scenes]
    lines = [json.dumps({"split": "train", "image_id": i, "file_name": f"images/train_{i:06d}.png",
                         "objects": [{"category": c, "color": k, **({"position": p} if p else {})}
                                     for (c, k), p in zip(objects, cells)]})
             for i, (objects, cells) in enumerate(zip(scenes, where))]
    (world / "scenes.jsonl").write_text("\n".join(lines) + "\n")
    return world
