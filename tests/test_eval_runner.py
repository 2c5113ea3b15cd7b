"""The runner (batching, resume, reports), the inference seam and the `llavakit eval` command."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

from llavakit.eval.common import EvalError, EvalItem
from llavakit.eval.predict import pipeline_predict_fn
from llavakit.eval.registry import BENCHMARKS
from llavakit.eval.runner import batches, evaluate, load_answers

FIX = Path(__file__).parent / "fixtures" / "eval"


class Counting:
    """A predict_fn that answers "Yes", records every batch, and can fail after some batches."""

    def __init__(self, fail_after: int | None = None):
        self.batches: list[list] = []
        self.fail_after = fail_after

    def __call__(self, items: list[EvalItem]) -> list[str]:
        if self.fail_after is not None and len(self.batches) == self.fail_after:
            raise RuntimeError("simulated crash")
        self.batches.append([it.question_id for it in items])
        return [" Yes \n" for _ in items]

    @property
    def answered(self) -> int:
        return sum(map(len, self.batches))


def test_resume_skips_finished_questions(tmp_path):
    out = tmp_path / "run"
    crashing = Counting(fail_after=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate("pope", FIX / "pope", crashing, out, batch_size=5, model_id="m1")
    lines = (out / "answers.jsonl").read_text().splitlines()
    assert len(lines) == 10  # two finished batches were kept
    row = json.loads(lines[0])
    assert set(row) == {"question_id", "prompt", "text", "model_id"}
    assert row["text"] == "Yes" and row["model_id"] == "m1" and row["prompt"].startswith("<image>\n")

    rerun = Counting()
    results = evaluate("pope", FIX / "pope", rerun, out, batch_size=5, model_id="m1")
    assert rerun.answered == 2 and len(rerun.batches) == 1
    assert results["run"] == {"new_answers": 2, "reused_answers": 10}
    assert results["metrics"]["yes_ratio"] == 100.0 and results["metrics"]["recall"] == 100.0
    assert len((out / "answers.jsonl").read_text().splitlines()) == 12

    third = Counting()
    again = evaluate("pope", FIX / "pope", third, out, batch_size=5, model_id="m1")
    assert third.answered == 0 and again["metrics"] == results["metrics"]
    for name in ("results.json", "results.md", "chart.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "results.json").read_text())["model_id"] == "m1"
    md = (out / "results.md").read_text()
    assert "# pope — m1" in md and "| random |" in md and "| f1 |" in md


def test_answers_to_questions_asked_otherwise_are_not_reused(tmp_path):
    """A benchmark that changed under the same ids (another prompt): resuming would score old answers."""
    out = tmp_path / "run"
    evaluate("pope", FIX / "pope", Counting(), out, batch_size=5, model_id="m1")
    lines = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    lines[3]["prompt"] = lines[3]["prompt"].replace("Is there", "Was there")
    (out / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(EvalError, match=rf"answers question {lines[3]['question_id']!r} as it was asked before"):
        evaluate("pope", FIX / "pope", Counting(), out, batch_size=5, model_id="m1")


def test_other_model_answers_are_not_reused(tmp_path):
    evaluate("pope", FIX / "pope", Counting(), tmp_path, batch_size=4, model_id="m1")
    with pytest.raises(EvalError, match="answers of model 'm1', not 'm2'"):
        evaluate("pope", FIX / "pope", Counting(), tmp_path, batch_size=4, model_id="m2")


def test_interrupted_last_line_is_dropped(tmp_path):
    path = tmp_path / "answers.jsonl"
    good = json.dumps({"question_id": "random/1", "prompt": "p", "text": "Yes", "model_id": ""})
    path.write_text(good + "\n" + '{"question_id": "random/2", "pro')
    assert load_answers(path) == {"random/1": "Yes"}
    assert path.read_text() == good + "\n"
    path.write_text(good)  # complete but unterminated: kept, and terminated so appends stay valid
    assert load_answers(path) == {"random/1": "Yes"} and path.read_text() == good + "\n"
    path.write_text("{bad\n" + good + "\n")
    with pytest.raises(EvalError, match="answers.jsonl:1: not valid JSON"):
        load_answers(path)


def test_predict_fn_must_answer_each_item(tmp_path):
    with pytest.raises(EvalError, match="returned 1 answers for 4 questions"):
        evaluate("pope", FIX / "pope", lambda items: ["yes"], tmp_path, batch_size=4)


def test_missing_image_fails_before_predicting(tmp_path):
    data = tmp_path / "pope"
    data.mkdir()
    (data / "coco_pope_random.json").write_text((FIX / "pope/coco_pope_random.json").read_text())
    predict = Counting()
    with pytest.raises(FileNotFoundError, match="4 image file"):
        evaluate("pope", data, predict, tmp_path / "out")
    assert predict.batches == []


def test_limit_and_batches(tmp_path):
    predict = Counting()
    r = evaluate("scienceqa", FIX / "scienceqa", predict, tmp_path, batch_size=2, limit=3)
    assert r["num_questions"] == 3 and predict.batches == [["101", "102"], ["103"]]
    items = [EvalItem(i, "p", max_new_tokens=n) for i, n in enumerate([256, 32, 256, 32])]
    assert [[it.question_id for it in b] for b in batches(items, 3)] == [[1, 3, 0], [2]]


def test_every_fixture_runs_end_to_end(tmp_path):
    """Each benchmark except llava_bench (judge-tested on its own) loads, predicts and reports."""
    from llavakit.eval.offline import build_offline

    offline = tmp_path / "offline.json"
    build_offline(FIX / "world", offline)
    data = {name: FIX / name for name in BENCHMARKS} | {"offline": offline}
    for name in BENCHMARKS:
        if name == "llava_bench":
            continue
        r = evaluate(name, data[name], Counting(), tmp_path / name, batch_size=16)
        assert r["benchmark"] == name and r["primary"] in r["metrics"]
        assert (tmp_path / name / "chart.png").is_file()


# ---------------------------------------------------------------- the inference seam


class FakePipeline:
    """The pipeline calls the adapter makes: `prompt` (recorded; PromptError on a marker/image mismatch),
    `run_prompts` (answers "answer <n>" in call order) and `max_batch_size`."""

    def __init__(self, max_batch_size: int = 8):
        self.max_batch_size = max_batch_size
        self.prompts: list[tuple[list, str]] = []
        self.runs: list[list] = []

    def prompt(self, images, text):
        from llavakit.infer.prompt import PromptError

        if text.count("<image>") != len(images):
            raise PromptError(f"the conversation has {text.count('<image>')} <image> marker(s) but {len(images)} image(s)")
        self.prompts.append((images, text))
        return len(self.prompts) - 1

    def run_prompts(self, prompts, params):
        self.runs.append([(self.prompts[p][1], sp.max_new_tokens, sp.temperature) for p, sp in zip(prompts, params)])
        return [types.SimpleNamespace(text=f"answer {p}") for p in prompts]


def test_pipeline_adapter_passes_images_and_prompts():
    items = BENCHMARKS["scienceqa"].load(FIX / "scienceqa")[:2]
    pipe = FakePipeline()
    assert pipeline_predict_fn(pipe)(items) == ["answer 0", "answer 1"]
    assert pipe.runs == [[(items[0].prompt, 32, 0.0), (items[1].prompt, 32, 0.0)]]
    (imgs0, _), (imgs1, _) = pipe.prompts
    assert len(imgs0) == 1 and imgs0[0].mode == "RGB" and imgs0[0].size == (8, 8)
    assert imgs1 == []  # a text-only question has no image and no <image> marker
    pipeline_predict_fn(pipe, max_new_tokens=5)(items)
    assert [budget for _, budget, _ in pipe.runs[-1]] == [5, 5]


def test_pipeline_adapter_runs_the_batch_as_generate_would():
    """The largest budget of the batch for every row (as before), the pipeline's own batch size."""
    items = [EvalItem(f"q{i}", "text only", max_new_tokens=n) for i, n in enumerate([32, 32, 256])]
    pipe = FakePipeline(max_batch_size=2)
    assert pipeline_predict_fn(pipe)(items) == ["answer 0", "answer 1", "answer 2"]
    assert [[budget for _, budget, _ in run] for run in pipe.runs] == [[256, 256], [256]]


def test_pipeline_adapter_loads_images_as_training_does(tmp_path):
    """RGBA is composited on white and 16-bit grey scaled, by llavakit's loader, not Pillow's convert."""
    import numpy as np
    from PIL import Image

    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.fromarray(np.full((4, 4), 128 * 257, dtype=np.uint16)).save(tmp_path / "deep.png")
    items = [EvalItem(1, "<image>\nq", images=(str(tmp_path / "clear.png"),)),
             EvalItem(2, "<image>\nq", images=(str(tmp_path / "deep.png"),))]  # fmt: skip
    pipe = FakePipeline()
    pipeline_predict_fn(pipe)(items)
    (clear, _), (deep, _) = pipe.prompts
    assert clear[0].mode == "RGB" and clear[0].getpixel((0, 0)) == (255, 255, 255)
    assert deep[0].getpixel((0, 0)) == (128, 128, 128)  # Pillow's convert clips it to 255


def test_corrupt_image_names_the_question_and_the_file(tmp_path, capsys, monkeypatch):
    """A benchmark image that is not an image (or is cut short) stops the run with the question id and the path,
    through the CLI as an error line, not a traceback; the answers before it are kept."""
    data = _copy_fixture(tmp_path, "gqa")
    questions = json.loads((data / "testdev_balanced_questions.json").read_text())
    (data / "images" / "n1002.jpg").write_bytes(b"this is not a jpeg")
    pipe = FakePipeline()
    with pytest.raises(EvalError, match=r"question 'g003': .*n1002\.jpg: not an image"):
        pipeline_predict_fn(pipe)([BENCHMARKS["gqa"].load(data)[2]])
    whole = (data / "images" / "n1001.jpg").read_bytes()
    (data / "images" / "n1002.jpg").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(EvalError, match=r"question 'g003': .*n1002\.jpg: corrupt or truncated image"):
        pipeline_predict_fn(pipe)([BENCHMARKS["gqa"].load(data)[2]])

    api = types.ModuleType("llavakit.infer.api")
    api.load_pipeline = lambda model: pipe
    monkeypatch.setitem(sys.modules, "llavakit.infer.api", api)
    out = tmp_path / "out"
    argv = ["eval", "--model", "m", "--benchmark", "gqa", "--data", str(data), "--out", str(out), "--batch-size", "2"]
    code, _, err = run_cli(argv, capsys)
    assert code == 1 and "Traceback" not in err
    assert re.search(r"error: question 'g003': .*n1002\.jpg: corrupt or truncated image", err), err
    assert len((out / "answers.jsonl").read_text().splitlines()) == 2 and len(questions) == 3


def test_prompt_error_names_the_question_and_its_images(tmp_path):
    item = EvalItem("q9", "no marker here", images=(str(FIX / "gqa/images/n1001.jpg"),))
    with pytest.raises(EvalError, match=r"question 'q9' \(.*n1001\.jpg\): the conversation has 0 <image> marker"):
        pipeline_predict_fn(FakePipeline())([item])


# ---------------------------------------------------------------- the command


def run_cli(argv, capsys):
    from llavakit.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_names_match_registry():
    from llavakit.eval.cli import BENCHMARK_NAMES

    assert list(BENCHMARK_NAMES) == list(BENCHMARKS)


def test_cli_eval_with_a_fake_inference_layer(tmp_path, capsys, monkeypatch):
    pipe = FakePipeline()
    loaded = []
    api = types.ModuleType("llavakit.infer.api")
    api.load_pipeline = lambda model: loaded.append(model) or pipe
    monkeypatch.setitem(sys.modules, "llavakit.infer.api", api)
    argv = ["eval", "--model", "tiny-m", "--benchmark", "gqa", "--data", str(FIX / "gqa"), "--out", str(tmp_path)]
    argv += ["--batch-size", "2"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert loaded == ["tiny-m"] and [len(run) for run in pipe.runs] == [2, 1]
    assert "# gqa — tiny-m" in out and "| accuracy |" in out
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [r["model_id"] for r in rows] == ["tiny-m"] * 3


def test_cli_score_and_build_offline(tmp_path, capsys):
    bench = tmp_path / "offline.json"
    code, out, err = run_cli(["eval", "build-offline", "--world", str(FIX / "world"), "--out", str(bench), "--seed", "3"], capsys)
    assert code == 0, err
    assert "3 scenes" in out and json.loads(bench.read_text())["seed"] == 3

    out_dir = tmp_path / "scored"
    out_dir.mkdir()
    answers = [{"question_id": f"{s}/{i}", "prompt": "", "text": "No", "model_id": "x"}
               for s in ("random", "popular", "adversarial") for i in range(1, 5)]  # fmt: skip
    (out_dir / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    code, out, err = run_cli(["eval", "score", "--benchmark", "pope", "--data", str(FIX / "pope"), "--out", str(out_dir)], capsys)
    assert code == 0, err
    results = json.loads((out_dir / "results.json").read_text())
    assert results["metrics"]["yes_ratio"] == 0.0 and results["metrics"]["accuracy"] == 50.0


def test_cli_errors(tmp_path, capsys, monkeypatch):
    from llavakit import default_model

    monkeypatch.setattr(default_model, "WEIGHTS", tmp_path / "no-weights")  # --model defaults to `default`
    code, _, err = run_cli(["eval", "--benchmark", "pope", "--data", str(FIX / "pope"), "--out", str(tmp_path)], capsys)
    assert code == 1 and "default model is not shipped" in err
    monkeypatch.setitem(sys.modules, "llavakit.infer.api", None)  # an install without the inference layer
    argv = ["eval", "--model", "m", "--benchmark", "pope", "--data", str(FIX / "pope"), "--out", str(tmp_path)]
    code, _, err = run_cli(argv, capsys)
    assert code == 1 and "inference layer is not available" in err
    argv = ["eval", "--model", "m", "--benchmark", "llava_bench", "--data", str(FIX / "llava_bench"), "--out", str(tmp_path)]
    code, _, err = run_cli(argv, capsys)
    assert code == 1 and "--judge-url" in err
    argv = ["eval", "score", "--benchmark", "gqa", "--data", str(FIX / "gqa"), "--out", str(tmp_path / "none")]
    code, _, err = run_cli(argv, capsys)
    assert code == 1 and "answers file not found" in err


def _copy_fixture(tmp_path, name: str) -> Path:
    import shutil

    return Path(shutil.copytree(FIX / name, tmp_path / name))


def test_bad_benchmark_files_name_the_file_and_question(tmp_path):
    """A missing field, a file of the wrong shape or an impossible answer is an EvalError naming where it is."""
    from llavakit.eval.registry import get_benchmark

    gqa = _copy_fixture(tmp_path, "gqa")
    qfile = gqa / "testdev_balanced_questions.json"
    questions = json.loads(qfile.read_text())
    first = next(iter(questions))
    del questions[first]["answer"]  # as in GQA's test and challenge files
    qfile.write_text(json.dumps(questions))
    with pytest.raises(EvalError, match=rf"question '{first}': no 'answer' field \(GQA's test and challenge"):
        get_benchmark("gqa").load(gqa)
    qfile.write_text(json.dumps(list(questions.values())))
    with pytest.raises(EvalError, match="expected an object of question id -> question, got a JSON list"):
        get_benchmark("gqa").load(gqa)

    pope = _copy_fixture(tmp_path, "pope")
    rows = [json.loads(line) for line in (pope / "coco_pope_random.json").read_text().splitlines() if line.strip()]
    (pope / "coco_pope_random.json").write_text("\n".join(json.dumps({k: v for k, v in r.items() if k != "label"})
                                                          for r in rows))
    with pytest.raises(EvalError, match=r"coco_pope_random.json:1 \(question .*\): no 'label' field \(a file of questions"):
        get_benchmark("pope").load(pope)

    sqa = _copy_fixture(tmp_path, "scienceqa")
    problems = json.loads((sqa / "problems.json").read_text())
    pid = json.loads((sqa / "pid_splits.json").read_text())["test"][0]
    problems[pid]["answer"] = len(problems[pid]["choices"])
    (sqa / "problems.json").write_text(json.dumps(problems))
    with pytest.raises(EvalError, match=rf"problem '{pid}': answer {len(problems[pid]['choices'])} is not the index"):
        get_benchmark("scienceqa").load(sqa)

    vqa = _copy_fixture(tmp_path, "vqav2")
    afile = vqa / "v2_mscoco_val2014_annotations.json"
    anns = json.loads(afile.read_text())
    qid = anns["annotations"][0]["question_id"]
    anns["annotations"][0]["answers"] = []
    afile.write_text(json.dumps(anns))
    with pytest.raises(EvalError, match=rf"question {qid!r} has no annotator answers"):
        get_benchmark("vqav2").load(vqa)


@pytest.mark.parametrize("lines, message", [
    (['{"question_id": 1, "text": "yes"}', '{"question_id": 2, "text": null}'], "answers.jsonl:2: answer 'text' is NoneType"),
    (['{"question_id": 1, "text": "yes"}', '{"question_id": 1, "text": "no"}'], "answers.jsonl:2: a second answer to question 1"),
    (['{"question_id": 1, "text": "yes"}', '["not", "an", "object"]'], "answers.jsonl:2: expected a JSON object, got list"),
    (['{"question_id": 1, "answer": "yes"}'], "answers.jsonl:1: no 'text' field"),
])
def test_answers_file_lines_must_be_whole_answers(tmp_path, lines, message):
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(EvalError, match=re.escape(message)):
        load_answers(path)


def test_cli_eval_with_a_real_tiny_model(tiny_model_dir, tmp_path, capsys):
    """`llavakit eval` end to end with a real (tiny, random) model, no fakes: every question of the fixture
    benchmark gets an answer line from the model, and the results hold the official metric."""
    argv = ["eval", "--model", str(tiny_model_dir), "--benchmark", "pope", "--data", str(FIX / "pope"),
            "--out", str(tmp_path), "--batch-size", "4"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    questions = BENCHMARKS["pope"].load(FIX / "pope")
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert sorted(r["question_id"] for r in rows) == sorted(q.question_id for q in questions)
    assert all(isinstance(r["text"], str) for r in rows) and {r["model_id"] for r in rows} == {str(tiny_model_dir)}
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["benchmark"] == "pope" and 0.0 <= results["metrics"][results["primary"]] <= 100.0
    assert "# pope" in out


# ---------------------------------------------------------------- VQAv2 test-dev submission


def _vqa_testdev(tmp_path) -> Path:
    """A test-dev2015 directory: questions only (no annotations), images in test2015/ as COCO_test2015_*.jpg."""
    data = tmp_path / "testdev"
    (data / "test2015").mkdir(parents=True)
    questions = json.loads((FIX / "vqav2/v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    questions["data_subtype"] = "test-dev2015"
    (data / "v2_OpenEnded_mscoco_test-dev2015_questions.json").write_text(json.dumps(questions))
    for image_id in (42, 77):
        src = FIX / f"vqav2/val2014/COCO_val2014_{image_id:012d}.jpg"
        (data / "test2015" / f"COCO_test2015_{image_id:012d}.jpg").write_bytes(src.read_bytes())
    everything = dict(questions, data_subtype="test2015")
    everything["questions"] = questions["questions"] + [{"image_id": 90, "question": "Why?", "question_id": 90000}]
    (tmp_path / "v2_OpenEnded_mscoco_test2015_questions.json").write_text(json.dumps(everything))
    return data


def test_vqav2_submission_rows_are_normalised_and_fill_the_other_test_questions(tmp_path):
    from llavakit.eval.vqav2 import VQAv2, submission_rows, write_submission

    data = _vqa_testdev(tmp_path)
    items = VQAv2(questions_only=True).load(data)
    assert items[0].images == (str(data / "test2015/COCO_test2015_000000000042.jpg"),) and items[0].answer is None
    with pytest.raises(EvalError, match="without annotations .* --submission"):
        VQAv2(questions_only=True).score(items, {})
    with pytest.raises(FileNotFoundError, match="no VQA annotations .* see --submission"):
        VQAv2().load(data)
    answers = {42000: "Two.", 42001: "Yes, it is", 77000: "An umbrella"}
    assert submission_rows(items, answers) == [
        {"question_id": 42000, "answer": "2"}, {"question_id": 42001, "answer": "yes it is"},
        {"question_id": 77000, "answer": "umbrella"}]  # fmt: skip
    with pytest.raises(EvalError, match="no answer for 1 question"):
        submission_rows(items, {42000: "2", 42001: "yes"})
    done = write_submission(tmp_path / "s.json", items, answers, tmp_path / "v2_OpenEnded_mscoco_test2015_questions.json")
    assert (done.answered, done.blank) == (3, 1)
    assert json.loads((tmp_path / "s.json").read_text())[-1] == {"question_id": 90000, "answer": ""}
    with pytest.raises(EvalError, match="1 answered question.*e.g. 77000.*not among the full question list"):
        submission_rows(items, answers, [42000, 42001])


def test_partial_submission_warning_only_for_test_dev_without_the_full_list(tmp_path):
    from llavakit.eval.vqav2 import VQAv2, partial_submission_warning

    testdev = VQAv2(questions_only=True).load(_vqa_testdev(tmp_path))
    assert {it.meta["data_subtype"] for it in testdev} == {"test-dev2015"}
    assert "may reject" in partial_submission_warning(Path("s.json"), testdev, None)
    assert partial_submission_warning(Path("s.json"), testdev, tmp_path / "all.json") is None
    val = VQAv2().load(FIX / "vqav2")  # a scored split keeps its question types beside the subtype
    assert val[0].meta["data_subtype"] == "val2014" and "question_type" in val[0].meta
    assert partial_submission_warning(Path("s.json"), val, None) is None


def test_cli_vqav2_submission(tmp_path, capsys, monkeypatch):
    data = _vqa_testdev(tmp_path)
    everything = str(tmp_path / "v2_OpenEnded_mscoco_test2015_questions.json")
    pipe = FakePipeline()
    api = types.ModuleType("llavakit.infer.api")
    api.load_pipeline = lambda model: pipe
    monkeypatch.setitem(sys.modules, "llavakit.infer.api", api)
    out = tmp_path / "run"
    argv = ["eval", "--model", "m", "--benchmark", "vqav2", "--data", str(data), "--out", str(out), "--submission",
            "--all-questions", everything]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    assert f"wrote {out / 'submission.json'}: 3 answer(s), and an empty answer to 1 other question(s)" in stdout
    assert "warning" not in err  # every test2015 question is in the file
    rows = json.loads((out / "submission.json").read_text())
    assert [r["question_id"] for r in rows] == [42000, 42001, 77000, 90000] and rows[0]["answer"] == "answer 0"
    assert not (out / "results.json").exists()

    (out / "submission.json").unlink()  # from the answers file alone, no model
    code, stdout, err = run_cli(["eval", "vqav2-submission", "--data", str(data), "--out", str(out)], capsys)
    assert code == 0, err
    assert [r["question_id"] for r in json.loads((out / "submission.json").read_text())] == [42000, 42001, 77000]
    assert (f"warning: {out / 'submission.json'} answers only the 3 test-dev2015 question(s) of --data" in err
            and "may reject" in err and "--all-questions v2_OpenEnded_mscoco_test2015_questions.json" in err)
    assert "warning" not in stdout  # the warning goes to stderr only

    code, _, err = run_cli(["eval", "--model", "m", "--benchmark", "gqa", "--data", str(FIX / "gqa"), "--out",
                            str(tmp_path / "g"), "--submission"], capsys)  # fmt: skip
    assert code == 1 and "--submission writes the VQAv2 evaluation-server file; not for gqa" in err
    code, _, err = run_cli(["eval", "--model", "m", "--benchmark", "vqav2", "--data", str(data), "--out",
                            str(tmp_path / "v"), "--all-questions", everything], capsys)  # fmt: skip
    assert code == 1 and "--all-questions goes with --submission" in err
