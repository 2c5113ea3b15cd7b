"""The LLM judge and LLaVA-Bench scoring against a fake OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import re
import socket
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llavakit.eval.common import EvalError
from llavakit.eval.judge import (
    LLAVA_RULE_PREFIX,
    Judge,
    JudgeConfig,
    JudgeError,
    ReviewRequest,
    build_prompt,
    cache_key,
    judge_settings,
    load_rules,
    parse_scores,
)
from llavakit.eval.registry import get_benchmark

FIX = Path(__file__).parent / "fixtures" / "eval"
KEY_ENV = "LLAVAKIT_TEST_JUDGE_KEY"

# The fake judge's grades (reference, model), chosen by which question the prompt holds.
GRADES = {"What colour is the kettle?": "8 6", "Describe the kitchen in detail.": "9 6", "Why might the street be empty?": "7 7",
          "How many cups are on the table?": "8 4", "What might the person do next?": "6 6"}
LLAVA_RULES = FIX / "llava_rule.json"  # LLaVA's rule.json structure, our own words


class FakeJudge(BaseHTTPRequestHandler):
    """POST /v1/chat/completions; behaviour set by server.mode: ok, http500, garbled, flaky (503 once), http401,
    throttled (429 with Retry-After: 1 once)."""

    def do_POST(self):  # noqa: N802 (http.server API)
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if srv.mode == "http401":
            return self._send(401, {"error": {"message": "bad key"}})
        prompt = body["messages"][-1]["content"]
        question = next(q for q in GRADES if q in prompt)
        hard = question == "Why might the street be empty?"
        if hard and srv.mode == "throttled" and not srv.flaked:
            srv.flaked = True
            return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "1"})
        if hard and (srv.mode == "http500" or (srv.mode == "flaky" and not srv.flaked)):
            srv.flaked = True
            return self._send(500 if srv.mode == "http500" else 503, {"error": {"message": "overloaded"}})
        content = "Both answers look fine to me." if hard and srv.mode == "garbled" else f"{GRADES[question]}\nReasons follow."
        choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"], "choices": [choice]})

    def _send(self, status, obj, headers=None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    srv.requests, srv.mode, srv.flaked = [], "ok", False
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def config(server, tmp_path, **kw) -> JudgeConfig:
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    return JudgeConfig(url=url, model="judge-x", cache_dir=tmp_path / "cache", api_key_env=KEY_ENV, retry_wait=0.0, **kw)


def model_answers() -> dict:
    return {0: "It is red.", 1: "A kitchen with a kettle.", 2: "Because it is early."}


# ---------------------------------------------------------------- parsing and prompt


@pytest.mark.parametrize(
    ("reply", "scores"),
    [("8 6\nbecause", (8.0, 6.0)), ("8,6", (8.0, 6.0)), (" 8.5  7 \nx", (8.5, 7.0)), ("10 1", (10.0, 1.0))],
)
def test_parse_scores(reply, scores):
    assert parse_scores(reply, 3) == scores


@pytest.mark.parametrize("reply", ["Scores: 8 6", "8", "8 6 5", "", "\n8 6", "11 5", "0 7", "eight six"])
def test_parse_scores_strict(reply):
    with pytest.raises(JudgeError, match="question 3"):
        parse_scores(reply, 3)


def test_prompt_has_every_part_and_the_category_rule():
    rules = load_rules()
    assert set(rules.rules) == {"conv", "detail", "complex"} and rules.style == "llavakit" and rules.packaged
    req = ReviewRequest(5, "detail", "CTX-TEXT", "Q-TEXT", "REF-TEXT", "MODEL-TEXT")
    prompt = build_prompt(rules, req)
    order = [prompt.index(s) for s in ("CTX-TEXT", "Q-TEXT", "REF-TEXT", "MODEL-TEXT", rules.rules["detail"]["focus"])]
    assert order == sorted(order)
    assert "Assistant 1" in prompt and "Assistant 2" in prompt
    with pytest.raises(JudgeError, match=r"question 5: no judge rule for category 'chart' in .*judge_rules.json.*'chart'"):
        build_prompt(rules, replace(req, category="chart"))


def test_llava_rules_build_llavas_layout_with_the_files_rule():
    """A LLaVA rule.json: bracketed sections, texts as given, the release's rule key (llava_bench_<c> in the wild,
    the bare category for COCO); the file has no system message, so ours unless one is given."""
    rules = load_rules(LLAVA_RULES)
    assert rules.style == "llava" and rules.system == load_rules().system and rules.source == str(LLAVA_RULES)
    assert load_rules(LLAVA_RULES, "Grade as in the paper.").system == "Grade as in the paper."
    raw = json.loads(LLAVA_RULES.read_text())
    req = ReviewRequest(5, "detail", "Line one.\nLine two.", "Q?", " Ref. ", "Model.")
    assert build_prompt(rules, req) == (
        "[Context]\nLine one.\nLine two.\n\n[Question]\nQ?\n\n"
        "[Assistant 1]\n Ref. \n\n[End of Assistant 1]\n\n[Assistant 2]\nModel.\n\n[End of Assistant 2]\n\n"
        f"[System]\n{raw['llava_bench_detail']['prompt']}\n\n"
    )
    coco = build_prompt(rules, replace(req, release="llava-bench-coco"))
    assert coco.endswith(f"[System]\n{raw['detail']['prompt']}\n\n")
    with pytest.raises(JudgeError, match="no LLaVA rule key is known for release 'other'"):
        build_prompt(rules, replace(req, release="other"))


def test_every_release_has_its_llava_rule_prefix():
    from llavakit.eval.llava_bench import LAYOUTS

    assert {layout.release for layout in LAYOUTS} == set(LLAVA_RULE_PREFIX)


@pytest.mark.parametrize(("content", "message"), [
    ('[{"role": "Assistant", "prompt": "p"}]', r"neither llavakit's judge rules .* nor LLaVA's rule.json .*: it is a list"),
    ("{}", r"neither .*: it is an empty object"),
    ('{"conv": {"role": "Assistant"}}', r"neither .*: rule 'conv' lacks 'prompt'"),
    ('{"conv": "grade it"}', r"neither .*: rule 'conv' is a str, not an object with 'role' and 'prompt'"),
    ('{"system": "s", "instructions": "i {role} {focus}"}', r"\(llavakit judge rules\) lacks 'categories'"),
    ('{"system": "s", "categories": {}}', r"\(llavakit judge rules\) lacks 'instructions'"),
    ('{"system": "s", "instructions": "{role}", "categories": {"conv": {"role": "A"}}}', r"category 'conv' lacks 'focus'"),
    ('{"system": "s", "instructions": "{grade}", "categories": {"conv": {"role": "A", "focus": "f"}}}',
     r"'instructions' may only use \{role\} and \{focus\}"),
    ('{"conv": ', r"judge rules are not a JSON file"),
])  # fmt: skip
def test_rules_of_neither_format_name_the_file_and_the_key(tmp_path, content, message):
    path = tmp_path / "rules.json"
    path.write_text(content)
    with pytest.raises(EvalError, match=rf"^{re.escape(str(path))}.*{message}"):
        load_rules(path)
    with pytest.raises(FileNotFoundError, match="judge rules file not found: .*nope.json"):
        load_rules(tmp_path / "nope.json")


def test_cache_key_depends_on_model_question_answer_and_judge_settings():
    base = cache_key("m", 1, "answer", ("http://a/v1", 0.2, 1024))
    assert base == cache_key("m", 1, "answer", ("http://a/v1", 0.2, 1024))
    others = [cache_key("m2", 1, "answer", ("http://a/v1", 0.2, 1024)), cache_key("m", 2, "answer", ("http://a/v1", 0.2, 1024)),
              cache_key("m", 1, "other", ("http://a/v1", 0.2, 1024)), cache_key("m", 1, "answer", ("http://b/v1", 0.2, 1024)),
              cache_key("m", 1, "answer", ("http://a/v1", 0.7, 1024))]
    assert len({base, *others}) == 6


# ---------------------------------------------------------------- LLaVA-Bench with the fake server


def test_llava_bench_relative_scores_and_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")
    bench = replace(get_benchmark("llava_bench"), judge=config(server, tmp_path))
    items = bench.load(FIX / "llava_bench")
    assert items[0].prompt == "<image>\nWhat colour is the kettle?"
    assert items[1].max_new_tokens == 1024

    r = bench.score(items, model_answers())
    rows = r["breakdown"]["category"]
    assert rows["conv"]["relative_score"] == pytest.approx(75.0)  # 6 / 8
    assert rows["detail"]["relative_score"] == pytest.approx(200 / 3)  # 6 / 9
    assert rows["complex"]["relative_score"] == pytest.approx(100.0)  # 7 / 7
    # overall: mean(6, 6, 7) / mean(8, 9, 7) = (19/3) / 8
    assert r["metrics"]["relative_score"] == pytest.approx(100 * (19 / 3) / 8)
    assert rows["all"]["reference_mean"] == pytest.approx(8.0)
    assert r["details"]["judge_calls"] == 3

    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "judge-x" and req["body"]["messages"][0]["role"] == "system"
    user = server.requests[1]["body"]["messages"][1]["content"]
    assert "A small kitchen with a red kettle" in user and "A kitchen with a kettle." in user
    # list captions are joined line by line
    street = server.requests[2]["body"]["messages"][1]["content"]
    assert "A wide street at dawn with closed shops.\nNo cars or people are visible." in street

    again = bench.score(items, model_answers())  # every review cached
    assert len(server.requests) == 3 and again["details"]["judge_calls"] == 0
    assert again["metrics"] == r["metrics"]

    bench.score(items, model_answers() | {1: "A different answer."})  # only the changed answer is judged again
    assert len(server.requests) == 4
    assert "A different answer." in server.requests[3]["body"]["messages"][1]["content"]

    warmer = replace(bench, judge=config(server, tmp_path, temperature=0.7))  # the same judge model, sampled otherwise
    assert warmer.score(items, model_answers())["details"]["judge_calls"] == 3 and len(server.requests) == 7
    elsewhere = replace(bench, judge=replace(config(server, tmp_path), url=config(server, tmp_path).url + "/"))
    assert elsewhere.score(items, model_answers())["details"]["judge_calls"] == 0  # a trailing slash is the same server


def test_failed_call_is_an_error_naming_the_question(server, tmp_path):
    server.mode = "http500"
    cfg = config(server, tmp_path, retries=1)
    bench = replace(get_benchmark("llava_bench"), judge=cfg)
    with pytest.raises(JudgeError, match=r"question 2.*HTTP 500"):
        bench.score(bench.load(FIX / "llava_bench"), model_answers())
    assert len(server.requests) == 2 + 2  # two good reviews, then the failing one tried twice (1 retry)
    settings = judge_settings(cfg)
    assert not (cfg.cache_dir / f"{cache_key('judge-x', 2, model_answers()[2], settings)}.json").exists()
    assert (cfg.cache_dir / f"{cache_key('judge-x', 0, model_answers()[0], settings)}.json").exists()


def test_unreadable_reply_is_an_error_and_not_cached(server, tmp_path):
    server.mode = "garbled"
    cfg = config(server, tmp_path)
    bench = replace(get_benchmark("llava_bench"), judge=cfg)
    with pytest.raises(JudgeError, match="question 2.*not two grades"):
        bench.score(bench.load(FIX / "llava_bench"), model_answers())
    assert len(list(cfg.cache_dir.glob("*.json"))) == 2
    server.mode = "ok"  # the rerun judges only the missing review
    r = bench.score(bench.load(FIX / "llava_bench"), model_answers())
    assert r["details"]["judge_calls"] == 1


def test_transient_failure_is_retried(server, tmp_path):
    server.mode = "flaky"
    bench = replace(get_benchmark("llava_bench"), judge=config(server, tmp_path, retries=1))
    r = bench.score(bench.load(FIX / "llava_bench"), model_answers())
    assert r["details"]["judge_calls"] == 4 and r["breakdown"]["category"]["complex"]["relative_score"] == 100.0


def test_bad_key_is_not_retried_and_names_the_key_variable(server, tmp_path):
    server.mode = "http401"
    cfg = config(server, tmp_path, retries=3)
    with Judge(cfg) as judge, pytest.raises(JudgeError, match=rf"question 0: judge .* answered 401.*\${KEY_ENV}"):
        judge.review(ReviewRequest(0, "conv", "c", "What colour is the kettle?", "r", "a"))
    assert len(server.requests) == 1 and judge.calls == 1


def test_429_retry_after_is_honoured_like_the_teacher(server, tmp_path, sleeps):
    server.mode = "throttled"  # the shared client's policy: Retry-After wins over retry_wait (0 here)
    req = ReviewRequest(2, "complex", "c", "Why might the street be empty?", "r", "a")
    with Judge(config(server, tmp_path, retries=1)) as judge:
        assert judge.review(req).model_score == 7.0
        assert judge.calls == 2
    assert sleeps == [1.0]  # the server's Retry-After: 1; retry_wait alone would give 0


def test_unreachable_judge(tmp_path):
    with socket.socket() as held:  # bound but never listening, and held for the whole test: connections are refused
        held.bind(("127.0.0.1", 0))
        cfg = JudgeConfig(url=f"http://127.0.0.1:{held.getsockname()[1]}/v1", model="m", cache_dir=tmp_path, retries=0)
        with Judge(cfg) as judge, pytest.raises(JudgeError, match="question 'q7'.*failed"):
            judge.review(ReviewRequest("q7", "conv", "c", "q", "r", "a"))


def test_cached_review_with_a_changed_prompt_is_judged_again(server, tmp_path):
    cfg = config(server, tmp_path)
    req = ReviewRequest(0, "conv", "ctx", "What colour is the kettle?", "Red.", "It is red.")
    with Judge(cfg) as judge:
        judge.review(req)
        assert judge.review(req).cached
        assert not judge.review(replace(req, reference="Crimson.")).cached
    assert len(server.requests) == 2


def _llava_rules_copy(tmp_path, drop: str = "", edit: str = "") -> Path:
    """The LLaVA-structured rules fixture, one rule left out or one rule's text changed."""
    rules = json.loads(LLAVA_RULES.read_text())
    rules.pop(drop, None)
    if edit:
        rules[edit]["prompt"] += " Be brief."
    path = tmp_path / "rule.json"
    path.write_text(json.dumps(rules))
    return path


def test_llava_bench_with_llavas_rules(server, tmp_path):
    """In the wild under a LLaVA rule.json: LLaVA's layout, the llava_bench_<category> rules, our system message."""
    raw = json.loads(LLAVA_RULES.read_text())
    bench = replace(get_benchmark("llava_bench"), judge=config(server, tmp_path, rules=LLAVA_RULES))
    r = bench.score(bench.load(FIX / "llava_bench"), model_answers())
    assert r["metrics"]["relative_score"] == pytest.approx(100 * (19 / 3) / 8)
    assert r["details"]["judge_rules"]["format"] == "llava" and r["details"]["judge_rules"]["file"] == str(LLAVA_RULES)
    system, user = (m["content"] for m in server.requests[0]["body"]["messages"])
    assert system == load_rules().system == r["details"]["judge_rules"]["system"]
    # context.jsonl's caption is one string: LLaVA's script puts a newline between its characters, and so do we here
    caption = "A small kitchen with a red kettle on a gas stove and a window above the sink."
    assert user == (f"[Context]\n{chr(10).join(caption)}\n\n"
                    "[Question]\nWhat colour is the kettle?\n\n[Assistant 1]\nThe kettle is red.\n\n[End of Assistant 1]\n\n"
                    "[Assistant 2]\nIt is red.\n\n[End of Assistant 2]\n\n"
                    f"[System]\n{raw['llava_bench_conv']['prompt']}\n\n")
    street = server.requests[2]["body"]["messages"][1]["content"]
    assert street.startswith("[Context]\nA wide street at dawn with closed shops.\nNo cars or people are visible.\n\n")
    assert street.endswith(f"[System]\n{raw['llava_bench_complex']['prompt']}\n\n")


def test_llava_bench_coco_with_llavas_rules(server, tmp_path):
    """COCO under a LLaVA rule.json: the bare category's rule, captions then boxes as the context."""
    raw = json.loads(LLAVA_RULES.read_text())
    bench = replace(get_benchmark("llava_bench"), judge=config(server, tmp_path, rules=LLAVA_RULES))
    r = bench.score(bench.load(FIX / "llava_bench_coco"), {0: "Two cups.", 1: "Pour tea."})
    assert r["breakdown"]["category"]["conv"]["relative_score"] == pytest.approx(50.0)
    user = server.requests[0]["body"]["messages"][1]["content"]
    assert user.startswith("[Context]\nA person holds a teapot over a table.\nTwo cups stand on a wooden table.\n\n"
                           "person: [0.1, 0.05, 0.52, 0.98]\ncup: [0.6, 0.7, 0.68, 0.8]\ncup: [0.72, 0.69, 0.8, 0.79]\n\n"
                           "[Question]\nHow many cups are on the table?\n\n")
    assert user.endswith(f"[System]\n{raw['conv']['prompt']}\n\n")


@pytest.mark.parametrize(("data", "drop", "key"), [
    ("llava_bench", "llava_bench_complex", "llava_bench_complex"),
    ("llava_bench_coco", "conv", "conv"),
])  # fmt: skip
def test_a_category_without_a_rule_is_an_error_at_load(server, tmp_path, data, drop, key):
    """Before any question is predicted or judged: the error names the rules file and the missing key."""
    rules = _llava_rules_copy(tmp_path, drop=drop)
    bench = replace(get_benchmark("llava_bench"), judge=config(server, tmp_path, rules=rules))
    with pytest.raises(JudgeError, match=rf"question \d+: no judge rule for category '\w+' in {re.escape(str(rules))}: "
                       rf"it lacks the key '{key}'"):
        bench.load(FIX / data)
    assert server.requests == []


def test_the_rules_are_part_of_the_cache(server, tmp_path):
    """Another rules file, or a changed rule in it, is judged again; the packaged rules' reviews stay usable."""
    items = get_benchmark("llava_bench").load(FIX / "llava_bench")
    own = replace(get_benchmark("llava_bench"), judge=config(server, tmp_path))
    llava = replace(own, judge=config(server, tmp_path, rules=LLAVA_RULES))
    assert own.score(items, model_answers())["details"]["judge_calls"] == 3
    assert llava.score(items, model_answers())["details"]["judge_calls"] == 3
    assert own.score(items, model_answers())["details"]["judge_calls"] == 0  # side by side in one cache
    assert llava.score(items, model_answers())["details"]["judge_calls"] == 0
    edited = replace(own, judge=config(server, tmp_path, rules=_llava_rules_copy(tmp_path, edit="llava_bench_detail")))
    assert edited.score(items, model_answers())["details"]["judge_calls"] == 3  # another file: its own reviews


def test_a_changed_system_message_is_judged_again_and_old_records_stay_valid(server, tmp_path):
    cfg = config(server, tmp_path)
    req = ReviewRequest(0, "conv", "ctx", "What colour is the kettle?", "Red.", "It is red.")
    with Judge(cfg) as judge:
        judge.review(req)
    (record_path,) = cfg.cache_dir.glob("*.json")
    record = json.loads(record_path.read_text())
    del record["system_sha256"]  # as written before the system message was recorded: the packaged one
    record_path.write_text(json.dumps(record))
    with Judge(cfg) as judge:
        assert judge.review(req).cached
    with Judge(cfg, rules=replace(load_rules(), system="Grade harshly.")) as judge:
        assert not judge.review(req).cached
    assert len(server.requests) == 2


def _old_cache_key(model, question_id, answer, settings) -> str:
    """A cache key as computed before the system message and the release could join it."""
    import hashlib

    def digest(text):
        return hashlib.sha256(text.encode()).hexdigest()

    return digest(json.dumps([model, str(question_id), digest(answer), *settings]))


@pytest.mark.parametrize("rules", [None, LLAVA_RULES])
def test_default_reviews_keep_the_cache_keys_they_had(server, tmp_path, rules):
    """The packaged system message and in-the-wild add nothing to the key: caches written before stay valid."""
    cfg = config(server, tmp_path, rules=rules)
    req = ReviewRequest(0, "conv", "ctx", "What colour is the kettle?", "Red.", "It is red.")
    with Judge(cfg) as judge:
        judge.review(req)
        digest = () if rules is None else (judge.rules.digest,)
    (record,) = cfg.cache_dir.glob("*.json")
    assert record.stem == _old_cache_key("judge-x", 0, "It is red.", (cfg.url, 0.2, 1024, *digest))


def test_two_system_messages_and_two_releases_share_a_cache(server, tmp_path):
    """Reviews under another --judge-system, or of COCO's question 0 beside in-the-wild's, each keep their record:
    alternating runs judge nothing again."""
    req = ReviewRequest(0, "conv", "ctx", "What colour is the kettle?", "Red.", "It is red.")
    coco = replace(req, context="captions", release="llava-bench-coco")
    runs = [(config(server, tmp_path), req), (config(server, tmp_path, system="Grade harshly."), req),
            (config(server, tmp_path, system="Grade gently."), req), (config(server, tmp_path), coco),
            (config(server, tmp_path, rules=LLAVA_RULES), req), (config(server, tmp_path, rules=LLAVA_RULES), coco)]
    for cfg, r in runs + runs:
        with Judge(cfg) as judge:
            judge.review(r)
    assert len(server.requests) == len(runs) and len(list(runs[0][0].cache_dir.glob("*.json"))) == len(runs)
    packaged_text = config(server, tmp_path, system=load_rules().system)  # the packaged message given explicitly
    with Judge(packaged_text) as judge:
        assert judge.review(req).cached


def test_cli_judge_rules_option(server, tmp_path, capsys):
    from llavakit.cli import main

    out = tmp_path / "out"
    out.mkdir()
    answers = [{"question_id": q, "text": t} for q, t in model_answers().items()]
    (out / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    argv = ["eval", "score", "--benchmark", "llava_bench", "--data", str(FIX / "llava_bench"), "--out", str(out),
            "--judge-url", config(server, tmp_path).url, "--judge-model", "judge-x", "--judge-key-env", KEY_ENV]
    assert main([*argv, "--judge-rules", str(LLAVA_RULES), "--judge-system", "Check the answers."]) == 0
    written = json.loads((out / "results.json").read_text())["details"]["judge_rules"]
    assert written["format"] == "llava" and written["system"] == "Check the answers."
    assert server.requests[0]["body"]["messages"][0]["content"] == "Check the answers."
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    bad.write_text('{"conv": {"role": "Assistant"}}')
    assert main([*argv, "--judge-rules", str(bad)]) == 1
    assert f"{bad}: neither llavakit's judge rules" in capsys.readouterr().err and len(server.requests) == 3


def test_llava_bench_needs_a_judge():
    bench = get_benchmark("llava_bench")
    items = bench.load(FIX / "llava_bench")
    with pytest.raises(EvalError, match="needs a judge"):
        bench.score(items, model_answers())
    with pytest.raises(EvalError, match="URL and a model"):
        JudgeConfig(url="", model="m", cache_dir=Path("."))


# ---------------------------------------------------------------- LLaVA-Bench files


def test_llava_bench_coco_release_shows_captions_then_boxes():
    """llava-bench-coco: qa90 questions and references, and caps_boxes rows (captions + instances) as the context."""
    items = get_benchmark("llava_bench").load(FIX / "llava_bench_coco")
    assert [it.question_id for it in items] == [0, 1] and [it.category for it in items] == ["conv", "complex"]
    assert items[0].images == (str(FIX / "llava_bench_coco/images/COCO_val2014_000000000101.jpg"),)
    assert items[1].answer == "The person will probably pour tea into the cups."
    assert items[0].meta["context"] == (
        "A person holds a teapot over a table.\nTwo cups stand on a wooden table.\n\n"
        "person: [0.1, 0.05, 0.52, 0.98]\ncup: [0.6, 0.7, 0.68, 0.8]\ncup: [0.72, 0.69, 0.8, 0.79]"
    )
    assert items[0].meta["llava_context"] == items[0].meta["context"]  # LLaVA's script writes it the same way


def test_llava_bench_coco_row_without_instances_keeps_llavas_empty_boxes_section(server, tmp_path):
    """LLaVA's COCO review writes the boxes section and its blank lines even when empty; our layout leaves it out."""
    data = _bench_copy(tmp_path, "llava_bench_coco")
    _rewrite(data / "caps_boxes_coco2014_val_80.jsonl", 1, lambda r: r.update(instances=[]))
    items = get_benchmark("llava_bench").load(data)
    captions = "A person holds a teapot over a table.\nTwo cups stand on a wooden table."
    assert items[0].meta["context"] == captions and items[0].meta["llava_context"] == captions + "\n\n"
    bench = replace(get_benchmark("llava_bench"), judge=config(server, tmp_path, rules=LLAVA_RULES))
    bench.score(items, {0: "Two cups.", 1: "Pour tea."})
    user = server.requests[0]["body"]["messages"][1]["content"]
    assert user.startswith(f"[Context]\n{captions}\n\n\n\n[Question]\nHow many cups are on the table?\n\n")
    ours = replace(bench, judge=config(server, tmp_path / "own"))
    ours.score(items, {0: "Two cups.", 1: "Pour tea."})
    assert f"<<<\n{captions}\n>>>" in server.requests[2]["body"]["messages"][1]["content"]


def test_a_string_caption_is_joined_as_llavas_script_joins_it_only_in_llavas_layout():
    """context.jsonl gives `caption` as one string; LLaVA's in-the-wild review joins it item by item, i.e. one
    character per line. Our layout shows the caption as written; a list of captions is one per line in both."""
    items = get_benchmark("llava_bench").load(FIX / "llava_bench")
    caption = "A small kitchen with a red kettle on a gas stove and a window above the sink."
    assert items[0].meta["context"] == caption
    assert items[0].meta["llava_context"] == "\n".join(caption) and items[0].meta["llava_context"][:6] == "A\n \ns\n"
    lines = "A wide street at dawn with closed shops.\nNo cars or people are visible."
    assert items[2].meta["context"] == items[2].meta["llava_context"] == lines
    req = ReviewRequest(0, "conv", caption, "Q?", "R", "A", llava_context="\n".join(caption))
    assert caption in build_prompt(load_rules(), req)
    assert build_prompt(load_rules(LLAVA_RULES), req).startswith(f"[Context]\n{chr(10).join(caption)}\n\n[Question]")


def _bench_copy(tmp_path, name="llava_bench") -> Path:
    import shutil

    return Path(shutil.copytree(FIX / name, tmp_path / name))


def _rewrite(path: Path, line: int, edit) -> None:
    """Apply `edit` to the JSON object on 1-based `line` of a JSON-lines file."""
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    edit(rows[line - 1])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize(("name", "file", "line", "edit", "message"), [
    ("llava_bench", "context.jsonl", 1, lambda r: r.pop("caption"),
     r"context.jsonl:1: no 'caption' field \(nor 'captions'\)"),
    ("llava_bench", "context.jsonl", 1, lambda r: r.update(caption="  "),
     r"context.jsonl:1: 'caption' is '  ', not a non-empty text"),
    ("llava_bench", "context.jsonl", 2, lambda r: r.update(caption=[]), r"context.jsonl:2: 'caption' is \[\]"),
    ("llava_bench", "context.jsonl", 2, lambda r: r.pop("image"), r"context.jsonl:2: no 'image' field"),
    ("llava_bench", "context.jsonl", 2, lambda r: r.update(image="001.jpg"),
     r"context.jsonl:2: image '001.jpg' again \(first at line 1\)"),
    ("llava_bench", "questions.jsonl", 2, lambda r: r.pop("image"), r"questions.jsonl:2 \(question 1\): no 'image' field"),
    ("llava_bench", "questions.jsonl", 3, lambda r: r.pop("category"),
     r"questions.jsonl:3 \(question 2\): no 'category' field"),
    ("llava_bench", "questions.jsonl", 1, lambda r: r.pop("question_id"), r"questions.jsonl:1: no 'question_id' field"),
    ("llava_bench", "questions.jsonl", 3, lambda r: r.update(image="003.jpg"),
     r"questions.jsonl:3 \(question 2\): no description of image '003.jpg' in .*context.jsonl"),
    ("llava_bench", "answers_gpt4.jsonl", 2, lambda r: r.pop("text"), r"answers_gpt4.jsonl:2: no 'text' field"),
    ("llava_bench_coco", "caps_boxes_coco2014_val_80.jsonl", 1, lambda r: r.pop("instances"),
     r"caps_boxes_coco2014_val_80.jsonl:1: no 'instances' field"),
    ("llava_bench_coco", "caps_boxes_coco2014_val_80.jsonl", 1, lambda r: r["instances"][1].update(bbox=[1, 2, 3]),
     r"caps_boxes_coco2014_val_80.jsonl:1: instance 1: 'bbox' is \[1, 2, 3\], not \[x1, y1, x2, y2\]"),
    ("llava_bench_coco", "caps_boxes_coco2014_val_80.jsonl", 1, lambda r: r.update(captions=["ok", ""]),
     r"caps_boxes_coco2014_val_80.jsonl:1: 'captions' is \['ok', ''\]"),
    ("llava_bench_coco", "qa90_gpt4_answer.jsonl", 1, lambda r: r.update(question_id=1),
     r"qa90_gpt4_answer.jsonl:2: question_id 1 again \(first at line 1\)"),
])  # fmt: skip
def test_llava_bench_files_missing_a_field_name_the_file_and_line(tmp_path, name, file, line, edit, message):
    data = _bench_copy(tmp_path, name)
    _rewrite(data / file, line, edit)
    with pytest.raises(EvalError, match=message):
        get_benchmark("llava_bench").load(data)


def test_llava_bench_release_is_found_by_its_questions_file(tmp_path):
    data = _bench_copy(tmp_path)
    (data / "qa90_questions.jsonl").write_text((data / "questions.jsonl").read_text())
    with pytest.raises(EvalError, match="holds both questions.jsonl and qa90_questions.jsonl"):
        get_benchmark("llava_bench").load(data)
    for f in ("questions.jsonl", "qa90_questions.jsonl"):
        (data / f).unlink()
    with pytest.raises(FileNotFoundError, match="looked for questions.jsonl or qa90_questions.jsonl"):
        get_benchmark("llava_bench").load(data)
    coco = _bench_copy(tmp_path, "llava_bench_coco")
    (coco / "caps_boxes_coco2014_val_80.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="llava-bench-coco caps_boxes_coco2014_val_80.jsonl not found"):
        get_benchmark("llava_bench").load(coco)
