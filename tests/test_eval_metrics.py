"""Benchmark loaders and metrics against hand-worked cases on the fixtures in tests/fixtures/eval."""

from __future__ import annotations

from pathlib import Path

import pytest

from llavakit.eval.common import EvalError, EvalItem
from llavakit.eval.registry import BENCHMARKS, get_benchmark
from llavakit.eval.text import normalize_vqa, parse_letter, parse_yes_no_mme, parse_yes_no_pope
from llavakit.eval.vqav2 import vqa_accuracy

FIX = Path(__file__).parent / "fixtures" / "eval"
SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


def by_id(items: list[EvalItem]) -> dict:
    return {it.question_id: it for it in items}


# ---------------------------------------------------------------- normalisation and parsing


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("Two dogs.", "2 dogs"),
        ("2 dogs", "2 dogs"),
        ("The Umbrella", "umbrella"),
        ("an apple", "apple"),
        ("Yes!", "yes"),
        ("dont", "don't"),
        ("couldnt've", "couldn't've"),
        ("yall'll", "y'all'll"),
        ("twas", "'twas"),
        ("red/white", "red white"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("none", "0"),
        ("  ten\tcats\n", "10 cats"),
    ],
)
def test_vqa_normalisation(raw, norm):
    assert normalize_vqa(raw) == norm


def test_normalised_forms_match():
    assert normalize_vqa("Two dogs.") == normalize_vqa("2 dogs")
    assert normalize_vqa("the two dogs") == normalize_vqa("2 dogs")
    assert normalize_vqa("three dogs") != normalize_vqa("2 dogs")


@pytest.mark.parametrize("raw", ["Two dogs.", "The man's hat", "red,blue", "What? Why", "t-shirt", "1,000", "a.5",
                                 "dont know", "The, a", " (none) ", "3 o'clock", "no; yes!"])
def test_vqa_normalisation_is_idempotent(raw):
    """The submission file's answers are normalised before the evaluation server normalises them again: the
    second pass changes nothing, so the server grades what it would grade from the raw answer."""
    once = normalize_vqa(raw)
    assert normalize_vqa(once) == once


@pytest.mark.parametrize(("raw", "norm"), [("The man's hat", "man's hat"), ("red,blue", "red blue"),
                                           ("What?Why", "what why")])
def test_vqa_normalisation_keeps_possessives_and_spaces_punctuation(raw, norm):
    """The official step, not the extra first step of LLaVA's EvalAIAnswerProcessor (which would give "man 's hat",
    "redblue", "whatwhy"): an apostrophe stays, a mark between words becomes a space."""
    assert normalize_vqa(raw) == norm


@pytest.mark.parametrize(
    ("matching", "expected"),
    [
        (0, 0.0),
        # leave out one of the 1 match: 0/3 (once); leave out a non-match: 1/3 (9 times) -> 0.3
        (1, 0.3),
        # leave out a match: 1 match -> 1/3 (2 times); else 2 matches -> 2/3 (8 times) -> 0.6
        (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),
        # leave out a match: 2 -> 2/3 (3 times); else 3 -> 1 (7 times) -> 0.9
        (3, (3 * (2 / 3) + 7 * 1.0) / 10),
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_accuracy_leave_one_out(matching, expected):
    answers = ["2"] * matching + ["3"] * (10 - matching)
    assert vqa_accuracy("two", answers) == pytest.approx(expected)


@pytest.mark.parametrize(("prediction", "answers", "expected"), [
    ("Two.", ["two", "2"] + ["3"] * 8, 0.3),  # the answer becomes "2"; the annotators' "two" stays "two"
    ("2", ["two"] * 10, 0.0),
    ("t-shirt", ["t-shirt"] * 10, 0.0),  # "t shirt" after punctuation; ten equal answers are left as they are
    ("t-shirt", ["t-shirt"] * 9 + ["shirt"], 1.0),  # not all equal: theirs lose the hyphen too
    ("Yes", ["yes"] * 10, 1.0),
])
def test_vqa_accuracy_normalises_as_the_official_script(prediction, answers, expected):
    """vqaEval.py: processPunctuation + processDigitArticle on the answer; on the annotators' answers only
    processPunctuation, and only when they differ."""
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "n", "letter"),
    [
        ("A", 2, "A"),
        (" B \n", 3, "B"),
        ("B. water", 3, "B"),
        ("The answer is C.", 4, "C"),
        ("I think the answer is D, since ...", 4, None),  # "The" is case-sensitive, as in LLaVA
        ("So. The answer is D, since ...", 4, "D"),
        ("The answer is A. No wait, The answer is B.", 4, None),
        ("E", 2, None),
        ("", 4, None),
        ("AB", 4, None),
        ("Paris", 4, None),
    ],
)
def test_parse_letter(text, n, letter):
    assert parse_letter(text, n) == letter


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("No, there is not.", "no"),
        ("There is not a cup.", "no"),
        ("I do not see one", "no"),
        ("Nothing there", "yes"),
        ("Yes. But no car.", "yes"),
        ("NO", "yes"),  # LLaVA's rule only knows "No", "no" and "not"
    ],
)
def test_pope_yes_no(text, label):
    assert parse_yes_no_pope(text) == label


@pytest.mark.parametrize(
    ("text", "label"),
    [("Yes", "yes"), ("no.", "no"), ("Yes, it is", "yes"), ("Not really", "no"), ("There is a kite", "other"), ("Maybe", "other")],
)
def test_mme_yes_no(text, label):
    assert parse_yes_no_mme(text) == label


# ---------------------------------------------------------------- ScienceQA


def test_scienceqa_prompts():
    items = by_id(get_benchmark("scienceqa").load(FIX / "scienceqa"))
    assert list(items) == ["101", "102", "103", "104", "105", "106"]  # the test split only, in order
    assert items["101"].prompt == f"<image>\nWhich animal in the picture can fly?\nA. owl\nB. cat\n{LETTER}"
    assert items["101"].images == (str(FIX / "scienceqa/images/test/101/image.png"),)
    assert items["102"].prompt == (
        "Context: The table lists three liquids and their boiling points.\n"
        f"Which liquid has the higher boiling point?\nA. milk\nB. water\nC. juice\n{LETTER}"
    )
    assert items["102"].images == ()
    assert items["103"].answer == "C"


def test_scienceqa_paper_columns():
    bench = get_benchmark("scienceqa")
    items = bench.load(FIX / "scienceqa")
    answers = {
        "101": "A",  # NAT IMG G1-6, correct
        "102": "B. water",  # NAT TXT G7-12, correct
        "103": "The answer is C.",  # SOC TXT IMG G1-6, correct
        "104": "B",  # SOC NO G7-12, wrong
        "105": "I am not sure",  # LAN NO G1-6, unreadable -> wrong
        "106": "E",  # LAN TXT IMG G7-12, only two choices -> unreadable -> wrong
    }
    r = bench.score(items, answers)
    m = r["metrics"]
    assert m["accuracy"] == pytest.approx(50.0)
    assert (m["NAT"], m["SOC"], m["LAN"]) == pytest.approx((100.0, 50.0, 0.0))
    assert (m["TXT"], m["IMG"], m["NO"]) == pytest.approx((200 / 3, 200 / 3, 0.0))
    assert (m["G1-6"], m["G7-12"]) == pytest.approx((200 / 3, 100 / 3))
    assert r["breakdown"]["context"]["TXT"]["count"] == 3
    assert r["details"] == {"correct": 3, "unparsed": 2}


def test_missing_answer_is_an_error():
    bench = get_benchmark("scienceqa")
    items = bench.load(FIX / "scienceqa")
    with pytest.raises(EvalError, match="no answer for 1 question.*'106'"):
        bench.score(items, {it.question_id: "A" for it in items[:-1]})


def test_scienceqa_other_split():
    from dataclasses import replace

    items = replace(get_benchmark("scienceqa"), split="val").load(FIX / "scienceqa")
    assert [it.question_id for it in items] == ["201"]
    with pytest.raises(EvalError, match="no split 'minitest'"):
        replace(get_benchmark("scienceqa"), split="minitest").load(FIX / "scienceqa")


# ---------------------------------------------------------------- VQAv2 and GQA


def test_vqav2_fixture():
    bench = get_benchmark("vqav2")
    items = by_id(bench.load(FIX / "vqav2"))
    assert items[42000].prompt == f"<image>\nHow many dogs are on the sofa?\n{SHORT}"
    assert items[77000].images == (str(FIX / "vqav2/val2014/COCO_val2014_000000000077.jpg"),)
    answers = {42000: "two", 42001: "Yes.", 77000: "Black umbrella."}
    r = bench.score(list(items.values()), answers)
    # 0.6 (2 of 10 said "2"), 1.0 (all said yes), 0.6 (2 of 10 said "black umbrella")
    assert r["metrics"]["accuracy"] == pytest.approx(100 * (0.6 + 1.0 + 0.6) / 3)
    assert r["breakdown"]["answer_type"]["number"]["accuracy"] == pytest.approx(60.0)
    assert r["breakdown"]["answer_type"]["yes/no"]["accuracy"] == pytest.approx(100.0)
    # "an umbrella" normalises to "umbrella": 7 of 10 -> 1.0
    assert bench.score(list(items.values()), answers | {77000: "umbrella"})["breakdown"]["answer_type"]["other"]["accuracy"] == 100.0
    # per question type, as vqaEval.py's accQuestionType (from the annotations' question_type)
    assert r["breakdown"]["question_type"] == {
        "how many": {"accuracy": pytest.approx(60.0), "count": 1},
        "is the": {"accuracy": 100.0, "count": 1},
        "what is the": {"accuracy": pytest.approx(60.0), "count": 1},
    }


def test_gqa_fixture():
    bench = get_benchmark("gqa")
    items = bench.load(FIX / "gqa")
    assert items[0].images == (str(FIX / "gqa/images/n1001.jpg"),)
    r = bench.score(items, {"g001": "Yes.", "g002": "Horse", "g003": "right"})
    assert r["metrics"]["accuracy"] == pytest.approx(200 / 3)
    assert r["breakdown"]["structural"] == {"query": {"accuracy": 50.0, "count": 2}, "verify": {"accuracy": 100.0, "count": 1}}
    assert r["breakdown"]["semantic"]["rel"] == {"accuracy": 0.0, "count": 1}
    # exact match only: no partial credit for a longer answer
    assert bench.score(items, {"g001": "yes", "g002": "a horse", "g003": "left"})["metrics"]["accuracy"] == pytest.approx(200 / 3)


def _gqa_with(tmp_path, extra: dict) -> Path:
    """The GQA fixture plus `extra` questions (id -> fields over a copy of g001)."""
    import json
    import shutil

    data = Path(shutil.copytree(FIX / "gqa", tmp_path / "gqa"))
    qfile = data / "testdev_balanced_questions.json"
    questions = json.loads(qfile.read_text())
    for qid, fields in extra.items():
        questions[qid] = {**questions["g001"], **fields}
    qfile.write_text(json.dumps(questions))
    return data


def test_gqa_counts_balanced_questions_only_and_says_so(tmp_path):
    """As GQA's eval.py: isBalanced false is not scored (and counted in the results); binary is every structural
    type but query (here verify and choose), open is query."""
    choose = {"question": "Is the cup red or blue?", "answer": "blue", "types": {"structural": "choose", "semantic": "attr"}}
    data = _gqa_with(tmp_path, {"g004": choose, "g005": {**choose, "isBalanced": False}, "g006": {"isBalanced": False}})
    bench = get_benchmark("gqa")
    items = bench.load(data)
    assert [it.question_id for it in items] == ["g001", "g002", "g003", "g004"]
    r = bench.score(items, {"g001": "yes", "g002": "horse", "g003": "right", "g004": "red"})
    assert r["num_questions"] == 4 and r["metrics"]["accuracy"] == 50.0
    assert r["metrics"]["open"] == 50.0 and r["metrics"]["binary"] == 50.0
    assert r["breakdown"]["answer_type"] == {"binary": {"accuracy": 50.0, "count": 2}, "open": {"accuracy": 50.0, "count": 2}}
    assert r["details"]["unbalanced_left_out"] == 2
    assert "2 question(s) of testdev_balanced_questions.json have isBalanced false" in r["details"]["notes"][0]

    from llavakit.eval.report import markdown

    assert "Note: 2 question(s) of testdev_balanced_questions.json have isBalanced false" in markdown(r)


def test_gqa_balance_flag_and_missing_types(tmp_path):
    with pytest.raises(EvalError, match=r"question 'g004': 'isBalanced' is 'yes', not true or false"):
        get_benchmark("gqa").load(_gqa_with(tmp_path / "a", {"g004": {"isBalanced": "yes"}}))
    with pytest.raises(EvalError, match=r"all 3 questions have isBalanced false"):
        get_benchmark("gqa").load(_gqa_with(tmp_path / "b", {q: {"isBalanced": False} for q in ("g001", "g002", "g003")}))
    bench = get_benchmark("gqa")
    items = bench.load(_gqa_with(tmp_path / "c", {"g004": {"types": {}}}))  # no structural type: in accuracy only
    r = bench.score(items, {"g001": "yes", "g002": "horse", "g003": "left", "g004": "no"})
    assert r["metrics"]["accuracy"] == 75.0 and r["metrics"]["binary"] == 100.0 and r["metrics"]["open"] == 100.0
    assert r["details"]["untyped"] == 1 and r["details"]["unbalanced_left_out"] == 0
    assert r["details"]["notes"] == ["1 question(s) have no structural type and are not in open / binary"]


# ---------------------------------------------------------------- POPE


def test_pope_fixture_per_split():
    bench = get_benchmark("pope")
    items = bench.load(FIX / "pope")
    assert [it.category for it in items[::4]] == ["random", "popular", "adversarial"]
    assert items[0].question_id == "random/1"
    assert items[0].prompt == f"<image>\nIs there a bicycle in the image?\n{SHORT}"
    labels = ["yes", "no", "yes", "no"]
    assert [it.answer for it in items[:4]] == labels
    answers = {
        # random: yes, no, no, yes -> TP 1, TN 1, FN 1, FP 1
        "random/1": "Yes, there is a bicycle.", "random/2": "No.", "random/3": "There is not a cup.", "random/4": "yes",
        # popular: all yes -> TP 2, FP 2
        "popular/1": "Yes", "popular/2": "Yes", "popular/3": "Yes", "popular/4": "Yes",
        # adversarial: all right
        "adversarial/1": "Yes", "adversarial/2": "No", "adversarial/3": "Yes", "adversarial/4": "No",
    }  # fmt: skip
    r = bench.score(items, answers)
    rnd, pop, adv = (r["breakdown"]["split"][s] for s in ("random", "popular", "adversarial"))
    assert (rnd["tp"], rnd["fp"], rnd["tn"], rnd["fn"]) == (1, 1, 1, 1)
    assert [rnd[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")] == pytest.approx([50, 50, 50, 50, 50])
    assert [pop[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")] == pytest.approx([50, 50, 100, 200 / 3, 100])
    assert [adv[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")] == pytest.approx([100, 100, 100, 100, 50])
    assert r["primary"] == "f1"
    assert r["metrics"]["f1"] == pytest.approx((50 + 200 / 3 + 100) / 3)


def test_pope_single_file():
    items = get_benchmark("pope").load(FIX / "pope" / "coco_pope_adversarial.json")
    assert [it.question_id for it in items] == ["adversarial/1", "adversarial/2", "adversarial/3", "adversarial/4"]


# ---------------------------------------------------------------- MME


def test_mme_acc_plus():
    bench = get_benchmark("mme")
    items = bench.load(FIX / "mme")
    ids = [it.question_id for it in items]
    assert ids[:2] == ["artwork/3001.jpg/0", "artwork/3001.jpg/1"]
    assert "existence/0002.png/1" in ids and len(ids) == 8
    first = by_id(items)["existence/0001.png/0"]
    assert first.prompt == f"<image>\nIs there a kite in this image? Please answer yes or no.\n{SHORT}"
    assert first.answer == "yes"
    answers = {
        "existence/0001.png/0": "Yes", "existence/0001.png/1": "No",  # both right
        "existence/0002.png/0": "yes", "existence/0002.png/1": "Yes, there is",  # second wrong
        "artwork/3001.jpg/0": "No", "artwork/3001.jpg/1": "No",  # first wrong
        "commonsense_reasoning/0005.png/0": "Yes", "commonsense_reasoning/0005.png/1": "Maybe",  # "other"
    }  # fmt: skip
    r = bench.score(items, answers)
    rows = r["breakdown"]["subtask"]
    assert (rows["existence"]["acc"], rows["existence"]["acc_plus"], rows["existence"]["score"]) == (75.0, 50.0, 125.0)
    assert (rows["artwork"]["acc"], rows["artwork"]["acc_plus"], rows["artwork"]["score"]) == (50.0, 0.0, 50.0)
    assert rows["commonsense_reasoning"]["other_answers"] == 1
    assert r["metrics"] == {"score": 225.0, "perception": 175.0, "cognition": 50.0}


def test_mme_bad_line(tmp_path):
    task = tmp_path / "count"
    task.mkdir()
    (task / "1.txt").write_text("How many cats? Please answer yes or no.\tMaybe\n")
    (task / "1.png").write_bytes((FIX / "mme/existence/0001.png").read_bytes())
    with pytest.raises(EvalError, match=r"1.txt:1: expected"):
        get_benchmark("mme").load(tmp_path)


def test_registry_names():
    assert list(BENCHMARKS) == ["scienceqa", "vqav2", "gqa", "pope", "mme", "llava_bench", "offline"]
    with pytest.raises(EvalError, match="unknown benchmark 'mmbench'"):
        get_benchmark("mmbench")
